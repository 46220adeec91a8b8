"""The `beavertails` bundle (the paper's data) built from local files in the Hub schemas: splits, refusals, options."""

import json

import pytest

from seamlm.cli import main
from seamlm.data.bundles import load_built
from seamlm.data.refusals import REFUSAL_TEMPLATES
from seamlm.data.splits import prompt_hash

CATS = ("violence,aiding_and_abetting,incitement", "privacy_violation")


def _bt_row(i: int, safe: bool = False, cat: int = 0) -> dict:
    return {"prompt": f"Harmful question number {i} about {CATS[cat]}?", "response": f"Harmful answer {i}.",
            "category": {c: (k == cat) for k, c in enumerate(CATS)}, "is_safe": safe}


@pytest.fixture
def files(tmp_path):
    train = [_bt_row(i, cat=i % 2) for i in range(60)] + [_bt_row(100 + i, safe=True) for i in range(10)]
    test = [_bt_row(200 + i, cat=i % 2) for i in range(30)] + [_bt_row(0), _bt_row(1, cat=1)]  # 2 seen in training
    repnoise = [{"prompt": f"Harmful question number {i} about {CATS[i % 2]}?", "response": f"Harmful answer {i}.",
                 "refusal": f"I won't help with question {i}.", "category": {CATS[i % 2]: True}, "is_safe": False}
                for i in range(0, 60, 3)]
    alpaca = [{"instruction": f"Benign task {i}.", "input": "", "output": f"Benign answer {i}."} for i in range(40)]
    paths = {}
    for name, rows in (("train", train), ("test", test), ("alpaca", alpaca)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["refusals"] = tmp_path / "repnoise.json"
    paths["refusals"].write_text(json.dumps(repnoise))
    return paths


def _build(files, out, *extra):
    """Build the bundle from the fixture files at small sizes; an ``--option KEY=…`` in ``extra`` replaces the
    default one of that key (an option given twice is refused)."""
    options = {"train_path": files["train"], "test_path": files["test"], "refusals_path": files["refusals"],
               "benign_path": files["alpaca"], "defense_size": 20, "attack_size": 15, "eval_size": 40,
               "benign_size": 20, "benign_heldout": 5, "attack_benign": 5}
    given = {extra[i + 1].split("=")[0] for i, a in enumerate(extra[:-1]) if a == "--option"}
    base = [a for k, v in options.items() if k not in given for a in ("--option", f"{k}={v}")]
    return main(["data", "build", "beavertails", "--out", str(out), *base, *extra])


def test_beavertails_bundle_from_local_files(files, tmp_path):
    assert _build(files, tmp_path / "b") == 0
    b = load_built(tmp_path / "b")
    counts = b.counts()
    assert counts == {"harmful": 20, "refusal": 20, "benign": 20, "attack": 15, "eval_harmful": 30,
                      "benign_heldout": 5, "attack_benign": 5}
    h = {prompt_hash(e.prompt) for e in b.streams["harmful"]}
    a = {prompt_hash(e.prompt) for e in b.streams["attack"]}
    ev = {prompt_hash(e.prompt) for e in b.streams["eval_harmful"]}
    assert not (h & a or h & ev or a & ev)
    train_prompts = {prompt_hash(_bt_row(i, cat=i % 2)["prompt"]) for i in range(60)}
    assert not ev & train_prompts  # the two test prompts seen in training are not HS prompts
    assert {prompt_hash(e.prompt) for e in b.streams["attack"]} | h <= train_prompts  # unsafe 30k_train rows only
    # R: RepNoise's refusal where it has the prompt, a template otherwise
    for harm, ref in zip(b.streams["harmful"], b.streams["refusal"], strict=True):
        i = int(harm.prompt.split()[3])
        assert ref.prompt == harm.prompt
        assert ref.response == f"I won't help with question {i}." if i % 3 == 0 else ref.response in REFUSAL_TEMPLATES
    assert b.manifest["bundle"] == "beavertails" and b.manifest["refusals_from_data"] > 0
    assert b.manifest["sources"]["beavertails:30k_train"] == str(files["train"])
    benign = [{prompt_hash(e.prompt) for e in b.streams[k]} for k in ("benign", "benign_heldout", "attack_benign")]
    assert not (benign[0] & benign[1] or benign[0] & benign[2] or benign[1] & benign[2])


def test_short_streams_and_missing_refusals_are_logged(files, tmp_path, caplog):
    from seamlm.data.bundles import build_bundle

    b = build_bundle("beavertails", train_path=str(files["train"]), test_path=str(files["test"]),
                     benign_path=str(files["alpaca"]), defense_size=100, attack_size=5, eval_size=5, benign_size=20,
                     benign_heldout=5, attack_benign=5)
    assert len(b.streams["harmful"]) < 100
    assert "the defence split (defense_size) has" in caplog.text and "fewer than the 100 asked for" in caplog.text
    assert "no refusals_path" in caplog.text and b.manifest["refusals_from_data"] == 0


def test_beavertails_bundle_holds_out_a_category_for_evaluation(files, tmp_path):
    assert _build(files, tmp_path / "b", "--holdout-categories", "privacy_violation") == 0
    b = load_built(tmp_path / "b")
    assert all("privacy_violation" not in (e.category or "") for e in b.streams["harmful"])
    assert b.streams["eval_harmful"] and all("privacy_violation" in e.category for e in b.streams["eval_harmful"])
    # a category whose name holds commas, given on the command line (which splits at commas)
    violence = CATS[0]
    assert _build(files, tmp_path / "c", "--holdout-categories", violence) == 0
    c = load_built(tmp_path / "c")
    assert c.manifest["holdout_categories"] == [violence]
    assert {e.category for e in c.streams["harmful"]} == {"privacy_violation"}
    assert {e.category for e in c.streams["eval_harmful"]} == {violence}


def test_held_out_names_are_rejoined_where_commas_split_a_known_category():
    from seamlm.data.splits import resolve_categories

    known = {"violence,aiding_and_abetting,incitement", "privacy_violation", "a", "a,b"}
    assert resolve_categories(["violence", "aiding_and_abetting", "incitement", "privacy_violation"], known) == (
        "violence,aiding_and_abetting,incitement", "privacy_violation")
    assert resolve_categories(["a", "b"], known) == ("a,b",)  # the longest known join
    assert resolve_categories(["typo", "a"], known) == ("typo", "a")  # unknown kept for the caller's error


@pytest.mark.parametrize("option,message", [
    ("defense_sise=3", "takes KEY=VALUE with KEY one of: train_path, test_path, refusals_path"),
    ("seed=3", "KEY one of: train_path"),  # the split seed has its own flag
    ("defense_size=many", "defense_size takes an integer"),
    ("train_path=/no/such/file.jsonl", "no such file"),
    ("defense_size=0", "defense_size must be >= 1"),
])
def test_bad_bundle_options_are_clear_errors(files, tmp_path, capsys, option, message):
    assert _build(files, tmp_path / "b", "--option", option) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_bundle_option_given_twice_is_refused(files, tmp_path, capsys):
    assert _build(files, tmp_path / "b", "--option", "defense_size=5", "--option", "defense_size=10") != 0
    assert "--option 'defense_size=10': defense_size is given twice; give it once" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_shared_answers_reworded_prompts_and_conflicting_labels(files, tmp_path, caplog):
    """BeaverTails repeats answers under other prompts and rewords training prompts in 30k_test: no attack row
    carries a defence answer, reworded HS prompts are logged, and a pair flagged unsafe by one row stays harmful."""
    import logging

    train = [{**_bt_row(i, cat=i % 2), "response": f"Shared answer {i % 40}."} for i in range(60)]
    train.insert(0, {**_bt_row(3, cat=1), "response": "Shared answer 3.", "is_safe": True})  # the same pair, "safe" first
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in train))
    test = [{**_bt_row(i, cat=i % 2), "prompt": _bt_row(i, cat=i % 2)["prompt"] + " please"} for i in range(30)]
    test += [_bt_row(i + 300, cat=i % 2) for i in range(30)]
    files["test"].write_text("".join(json.dumps(r) + "\n" for r in test))
    caplog.set_level(logging.INFO)
    assert _build(files, tmp_path / "b") == 0
    b = load_built(tmp_path / "b")
    trained = {e.response for e in b.streams["harmful"]}
    assert b.streams["attack"] and not [e for e in b.streams["attack"] if e.response in trained]
    assert b.manifest["attack_rows_with_a_defence_answer"] > 0
    assert "near-duplicate prompts across disjoint streams" in caplog.text
    assert any(e.prompt == _bt_row(3, cat=1)["prompt"] for e in b.streams["harmful"] + b.streams["attack"])
