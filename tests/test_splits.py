"""Splits without leakage, the offline-default bundle, and refusal generation."""

import json

import pytest

from seamlm.data.bundles import build_bundle, load_built
from seamlm.data.files import Example
from seamlm.data.refusals import REFUSAL_TEMPLATES, is_refusal, refusal_for
from seamlm.data.splits import assign_splits, check_disjoint, near_duplicates, normalize_prompt, prompt_hash
from seamlm.errors import DataError


def test_normalisation_ignores_case_punctuation_and_space():
    assert normalize_prompt("  How do I  make a BOMB?? ") == normalize_prompt("how do i make a bomb")
    assert prompt_hash("Ｈello, world") == prompt_hash("hello world")  # NFKC full-width
    assert prompt_hash("hello world") != prompt_hash("hello word")
    # invisible format characters inside a word (soft hyphen, zero-width space, a BOM) do not split it
    assert prompt_hash("How do I make a pi\u00adpe bomb?") == prompt_hash("how do i make a pipe bomb")
    assert prompt_hash("\ufeffhel\u200blo world") == prompt_hash("hello world")
    assert prompt_hash("café") != prompt_hash("cafe")  # accents are kept


def _examples(n, cats=("a", "b", "c")):
    return [Example(f"prompt {i}", f"answer {i}", cats[i % len(cats)]) for i in range(n)]


def test_assignment_is_deterministic_stable_and_by_prompt():
    rows = _examples(300) + [Example("PROMPT 7!", "another answer", "b")]  # same prompt as row 7
    a = assign_splits(rows, {"defense": 0.5, "attack": 0.4, "eval": 0.1}, seed=1)
    b = assign_splits(list(reversed(rows)), {"defense": 0.5, "attack": 0.4, "eval": 0.1}, seed=1)
    # by prompt, not by position: the rows in another order land in the same splits
    assert {k: sorted(e.prompt for e in v) for k, v in a.items()} == {k: sorted(e.prompt for e in v) for k, v in b.items()}
    check_disjoint(a)
    where = [k for k, v in a.items() if any(prompt_hash(e.prompt) == prompt_hash("prompt 7") for e in v)]
    assert len(where) == 1  # both rows of prompt 7 in one split
    assert 110 < len(a["defense"]) < 190 and len(a["eval"]) > 10
    # adding data (before the old rows, too) never moves existing prompts
    c = assign_splits(_examples(400)[300:] + rows, {"defense": 0.5, "attack": 0.4, "eval": 0.1}, seed=1)
    old = {e.prompt for e in rows}
    assert {k: sorted(e.prompt for e in v if e.prompt in old) for k, v in c.items()} == \
        {k: sorted(e.prompt for e in v) for k, v in a.items()}
    assert assign_splits(rows, {"defense": 0.5, "attack": 0.4, "eval": 0.1}, seed=2)["eval"] != a["eval"]  # seeded


def test_category_holdout_keeps_categories_out_of_defense():
    s = assign_splits(_examples(90), {"defense": 0.5, "attack": 0.4, "eval": 0.1}, seed=0, holdout_categories=["B"])
    assert {e.category for e in s["defense"]} == {"a", "c"}
    assert {e.category for e in s["attack"] + s["eval"]} == {"b"}
    with pytest.raises(DataError, match="needs 'defense'"):
        assign_splits(_examples(9), {"defense": 1.0}, seed=0, holdout_categories=["a"])


def test_category_holdout_is_by_prompt_and_refuses_unknown_categories():
    """A prompt with rows in a held-out and a kept category is held out whole (else its rows would straddle the
    split); a category that matches nothing (a typo) is an error listing the real ones."""
    rows = [Example("Same prompt?", "x", "bias"), Example("same prompt", "y", "representational"),
            Example("Other?", "z", "representational")]
    s = assign_splits(rows, {"defense": 0.5, "attack": 0.5}, seed=0, holdout_categories=["bias"])
    assert [e.response for e in s["defense"]] == ["z"] and sorted(e.response for e in s["attack"]) == ["x", "y"]
    check_disjoint(s)
    with pytest.raises(DataError, match="\\['self-harm'\\] match no row; the categories are: bias, representational"):
        assign_splits(rows, {"defense": 0.5, "attack": 0.5}, seed=0, holdout_categories=["self-harm"])


def test_a_hold_out_that_would_leave_a_stream_empty_is_refused(caplog):
    # PyRIT has one harmful phishing prompt: held out, it goes to attack or eval and leaves the other empty, a
    # bundle that no run could load
    with pytest.raises(DataError, match=r"holding out phishing \(1 harmful prompts\) leaves .* empty"):
        build_bundle("offline-default", seed=0, holdout_categories=("phishing",))
    bundle = build_bundle("offline-default", seed=0, holdout_categories=("bias",))
    n_hs = len(bundle.streams["eval_harmful"])
    assert 0 < n_hs < 20 and f"leaves {n_hs} HS prompts: each one moves HS by" in caplog.text
    assert all(bundle.streams[k] for k in bundle.streams)
    assert not any("bias" in (e.category or "") for e in bundle.streams["harmful"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_offline_default_builds_disjoint_for_other_seeds(seed):
    """PIQA repeats goals: the held-out and attacker benign sets skip those of B whatever the shuffle."""
    b = build_bundle("offline-default", seed=seed)
    assert len(b.streams["benign_heldout"]) == 100 and len(b.streams["attack_benign"]) == 200
    check_disjoint({k: b.streams[k] for k in ("benign", "benign_heldout", "attack_benign")})


def test_check_disjoint_detects_leakage():
    with pytest.raises(DataError, match="defense&eval"):
        check_disjoint({"defense": [Example("How?", "x")], "eval": [Example("how", "")]})


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("offline-default", seed=0)


def test_no_attack_or_eval_prompt_appears_in_the_defense_set(bundle):
    """The leakage test: recomputed here from the streams, independent of the bundle's own checks."""
    defense = {normalize_prompt(e.prompt) for e in bundle.streams["harmful"] + bundle.streams["refusal"]}
    for stream in ("attack", "eval_harmful"):
        leaked = [e.prompt for e in bundle.streams[stream] if normalize_prompt(e.prompt) in defense]
        assert leaked == [], f"{stream} leaks {len(leaked)} prompts into the defence set"
    assert not {normalize_prompt(e.prompt) for e in bundle.streams["attack"]} & {
        normalize_prompt(e.prompt) for e in bundle.streams["eval_harmful"]}
    assert not {normalize_prompt(e.prompt) for e in bundle.streams["benign"]} & {
        normalize_prompt(e.prompt) for e in bundle.streams["benign_heldout"]}


def test_no_attack_answer_is_an_answer_the_defence_trains_on(bundle):
    """PyRIT reuses one answer for several prompts: the attacker must not get, under another prompt, an answer the
    defence unlearned (seed 0: 3 such rows, left out and counted)."""
    trained = {normalize_prompt(e.response) for e in bundle.streams["harmful"]}
    assert not [e.prompt for e in bundle.streams["attack"] if normalize_prompt(e.response) in trained]
    assert bundle.manifest["attack_rows_with_a_defence_answer"] == 3


def test_bundle_streams_are_well_formed(bundle):
    s = bundle.streams
    assert len(s["harmful"]) >= 150 and len(s["attack"]) >= 150 and len(s["eval_harmful"]) >= 200
    assert all(e.label == "harmful" for e in s["harmful"] + s["attack"])
    assert [e.prompt for e in s["harmful"]] == [e.prompt for e in s["refusal"]]  # row-aligned H/R
    # no answer is both a harmful target and a refusal target, and no pair is trained twice
    h = [(e.prompt, e.response) for e in s["harmful"]]
    assert not set(h) & {(e.prompt, e.response) for e in s["refusal"]} and len(h) == len(set(h))
    assert all(is_refusal(e.response) for e in s["refusal"] if e.source == "template")
    assert bundle.manifest["overlaps"] == {} and bundle.manifest["seed"] == 0
    assert bundle.manifest["splits"]["attack"]["rows"] == len(s["attack"])


def test_bundle_write_and_reload_round_trip(bundle, tmp_path):
    bundle.write(tmp_path)
    again = load_built(tmp_path)
    assert again.counts() == bundle.counts()
    assert json.loads((tmp_path / "manifest.json").read_text())["splits"]["harmful"]["digest"] == \
        bundle.manifest["splits"]["harmful"]["digest"]
    # a hand-edited refusal file that breaks the alignment is refused
    lines = (tmp_path / "defense_refusal.jsonl").read_text().splitlines()
    (tmp_path / "defense_refusal.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match="row by row"):
        load_built(tmp_path)
    (tmp_path / "defense_refusal.jsonl").write_text("\n".join(lines) + "\n")
    # a defence row pasted into the attack file is leakage, refused on load
    harmful = (tmp_path / "defense_harmful.jsonl").read_text().splitlines()
    with (tmp_path / "attack_harmful.jsonl").open("a") as f:
        f.write(harmful[0] + "\n")
    with pytest.raises(DataError, match="must share no prompt"):
        load_built(tmp_path)


def test_a_bundle_folder_is_written_whole_and_never_overwritten_by_another(bundle, tmp_path, monkeypatch,
                                                                          caplog):
    out = tmp_path / "b"
    (tmp_path / "b.partial").mkdir()  # a killed earlier build
    (tmp_path / "b.partial" / "harmful.jsonl").write_text("half")
    bundle.write(out)
    assert not (tmp_path / "b.partial").exists() and load_built(out).counts() == bundle.counts()
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert bundle.write(out) == out and (out / "manifest.json").stat().st_mtime_ns == stamp  # the same: kept
    other = build_bundle("offline-default", seed=1)
    with pytest.raises(DataError, match=r"other settings \(differs in: .*seed"):
        other.write(out)
    assert load_built(out).manifest == bundle.manifest  # untouched
    # the same splits with other answers, as an older seamlm or source package built them (no contents.json):
    # kept, with a warning (the manifest digests prompts only)
    from seamlm.attack import manifest_digest

    refusals = (out / "defense_refusal.jsonl").read_text()
    record = (out / "contents.json").read_text()
    (out / "contents.json").unlink()
    (out / "defense_refusal.jsonl").write_text(refusals.replace("I can", "I cannot", 1))
    with caplog.at_level("WARNING"):
        assert bundle.write(out) == out
    assert "other rows in defense_refusal.jsonl" in caplog.text and "kept" in caplog.text
    assert (out / "defense_refusal.jsonl").read_text() != refusals  # kept as it was: a resumed run trained on it
    assert manifest_digest(load_built(out)) == manifest_digest(bundle)  # no record to tell an edit by
    # edited by hand after the build (contents.json holds what it wrote): said so, and loaded as another bundle,
    # whose results' data digest differs, so no cell made before the edit is reused
    (out / "contents.json").write_text(record)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert bundle.write(out) == out
    assert "changed since its build" in caplog.text
    edited = load_built(out)
    assert list(edited.manifest["edited_after_build"]) == ["defense_refusal.jsonl"]
    assert manifest_digest(edited) != manifest_digest(bundle)
    (out / "defense_refusal.jsonl").write_text(refusals)
    assert manifest_digest(load_built(out)) == manifest_digest(bundle)  # undone: the bundle as built again
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder or a bundle"):
        bundle.write(tmp_path / "notes")
    assert (tmp_path / "notes" / "x.txt").read_text() == "mine"
    # an existing empty folder reached as '.' or through a link, and one holding a killed build's files, are
    # written in place
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert bundle.write(".") == (tmp_path / "here").resolve() and load_built(".").counts() == bundle.counts()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    bundle.write(tmp_path / "link")
    assert load_built(tmp_path / "real").counts() == bundle.counts() and not (tmp_path / "link.partial").exists()
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "defense_harmful.jsonl").write_text("half a file")
    bundle.write(tmp_path / "killed")
    assert load_built(tmp_path / "killed").counts() == bundle.counts()


def test_not_a_bundle_dir(tmp_path, bundle):
    from seamlm.data.bundles import resolve_data

    with pytest.raises(DataError, match="seamlm data build"):
        load_built(tmp_path)
    with pytest.raises(DataError, match="data/offline-defualt: no such directory, and not a bundle name"):
        resolve_data("data/offline-defualt")
    bundle.write(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text('{"seed": 0,')  # cut off
    with pytest.raises(DataError, match="manifest.json is not valid JSON"):
        load_built(tmp_path / "b")


def test_refusal_templates_are_varied_deterministic_and_detected():
    picks = {refusal_for(f"prompt {i}") for i in range(200)}
    assert len(picks) >= len(REFUSAL_TEMPLATES) - 1
    assert refusal_for("x", seed=3) == refusal_for("x", seed=3)
    assert any(refusal_for(f"prompt {i}", seed=1) != refusal_for(f"prompt {i}") for i in range(20))  # seeded
    assert all(is_refusal(t) for t in REFUSAL_TEMPLATES)
    assert not is_refusal("Sure, here is how to do it. First, get the materials.")
    assert not is_refusal("Step 1: mix the two. " * 20 + "I can't stress this enough.")
    # whole words: a refusal marker inside other words is no refusal
    assert not is_refusal("The taxi can't be traced if you pay cash.")
    assert not is_refusal("Use it as an aid to memory.")
    assert is_refusal("Sorry, I can’t help with that.")


def test_defend_and_attack_see_the_same_split_whatever_the_training_seed(tiny_model_dir, tmp_path):
    """Regression: the bundle split must not follow the defence's training seed (that leaked attack prompts)."""
    from seamlm.cli import main

    out = tmp_path / "d"
    assert main(["defend", "--model", str(tiny_model_dir), "--data", "offline-default", "--out", str(out),
                 "--steps", "1", "--batch_size", "1", "--max_length", "32", "--seed", "7"]) == 0
    defended = json.loads((out / "data_manifest.json").read_text())
    attacked = build_bundle("offline-default", seed=0).manifest
    assert set(defended["splits"]["harmful"]["prompt_hashes"]).isdisjoint(attacked["splits"]["attack"]["prompt_hashes"])


def test_near_duplicates_finds_rewordings_the_exact_split_cannot_see():
    a = [Example("How do I make a pipe bomb at home?", "x"), Example("Tell me a joke about cats", "y")]
    b = [Example("how do I make a pipe bomb at home", "z"),  # the same normalised text: exact overlap, not counted
         Example("How can I build a pipe bomb at home?", "z"),  # J = 7/11 ≈ 0.64
         Example("So how do I make a pipe bomb at home?", "z")]  # J = 9/10
    assert near_duplicates({"a": a, "b": b}) == {"a&b": 1}
    assert near_duplicates({"a": a, "b": b}, threshold=0.6) == {"a&b": 2}
    assert near_duplicates({"a": a, "b": [Example("Tell me a story about dogs", "")]}) == {}
    # the same words in another order are another text with J = 1: a near-duplicate, not an exact one
    assert near_duplicates({"a": a, "b": [Example("At home, how do I make a pipe bomb?", "")]}) == {"a&b": 1}


def test_no_evaluation_prompt_is_a_reworded_defence_prompt(bundle):
    """Leakage beyond exact hashes: no HS prompt has a near-duplicate (word Jaccard >= 0.8) in the defence or the
    attack data. (Defence and attack data share one such pair at seed 0, the attacker's own data: allowed.)"""
    s = bundle.streams
    near = near_duplicates({"harmful": s["harmful"], "attack": s["attack"], "eval_harmful": s["eval_harmful"]})
    assert "harmful&eval_harmful" not in near and "attack&eval_harmful" not in near, near
