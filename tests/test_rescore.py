"""seamlm rescore: a finished run judged again from its saved answers, and a resumed grid keeps its cells."""

import json
import math
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from seamlm.attack import AttackConfig, evaluate_pre_attack, run_attack_grid, samples_file
from seamlm.cli import main
from seamlm.data.bundles import BundleData
from seamlm.errors import DataError
from seamlm.evaluate.judges import JUDGES, Judge, KeywordJudge
from seamlm.rescore import rescore
from seamlm.results import ResultStore
from tests.conftest import BENIGN, HARMFUL, REFUSAL
from tests.test_attack_grid import EVAL


def length_score(prompt: str, answer: str) -> float:
    """The answer's length plus the prompt's characters, mod 41, over 40: a score that varies from prompt to prompt
    whatever a tiny random model answers (its answers are often all alike, or empty)."""
    return (len(answer) + sum(map(ord, prompt))) % 41 / 40


class LengthJudge(Judge):
    """P(harmful) from :func:`length_score`: a judge that disagrees with the keyword one."""

    name = "length-v1"

    def score(self, prompts, responses):
        return [length_score(p, r) for p, r in zip(prompts, responses, strict=True)]


GRID = AttackConfig(learning_rates=(1e-3,), num_samples=4, batch_size=2)


def _run(model_dir, bundle, out, judge, label="tiny"):
    store = ResultStore(out / "results.jsonl")
    pre = evaluate_pre_attack(str(model_dir), label, "none", bundle, EVAL, judge, out, store)
    return pre, run_attack_grid(str(model_dir), label, "none", bundle, GRID, EVAL, judge, out, store), store


@pytest.fixture
def bundle():
    return BundleData({"harmful": HARMFUL[:6], "refusal": REFUSAL[:6], "benign": BENIGN[:6], "attack": HARMFUL[6:],
                       "eval_harmful": HARMFUL[:3], "benign_heldout": BENIGN[6:]}, {"seed": 0})


def test_another_judge_config_is_recorded_and_a_run_resumed_with_it_keeps_every_cell(tiny_model_dir, bundle,
                                                                                        tmp_path, monkeypatch):
    # the judge's name in the evaluation settings changes too (keyword -> length): resumed with that config, no cell
    # is generated again; and a second rescore keeps the first one's backup
    monkeypatch.setitem(JUDGES, "length", lambda **kw: LengthJudge())
    out = tmp_path / "run"
    _run(tiny_model_dir, bundle, out, KeywordJudge())
    length = EVAL.replace(judge="length")
    assert len(rescore(out, length)) == 2
    store = ResultStore(out / "results.jsonl")
    pre = evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, length, LengthJudge(), out, store)
    assert pre is False
    assert run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, GRID, length, LengthJudge(), out, store) == []
    assert rescore(out, EVAL, KeywordJudge())  # and back: a second backup beside the first
    assert sorted(p.name for p in out.glob("results.before-*")) == ["results.before-keyword-v4.jsonl",
                                                                     "results.before-length-v1.jsonl"]


def test_rescore_rejudges_saved_answers_and_a_resumed_grid_keeps_every_cell(tiny_model_dir, bundle, tmp_path,
                                                                            monkeypatch):
    import seamlm.evaluate.metrics

    out = tmp_path / "run"
    _, ran, store = _run(tiny_model_dir, bundle, out, KeywordJudge())
    before = {(r.model, r.cell, r.metric): r for r in store.rows()}
    cells = ["pre", *ran]
    answers = {c: [json.loads(x) for x in samples_file(out, "tiny", c).read_text().splitlines()] for c in cells}
    scores = {c: [length_score(a["prompt"], a["answer"]) for a in answers[c]] for c in cells}
    assert all(len(set(p)) > 1 for p in scores.values()), scores  # else hs_se would be 0 before and after

    def refusal_rule(text):  # another keyword rule than the one that evaluated the cells (a newer seamlm's)
        return len(text) % 2 == 0

    monkeypatch.setattr(seamlm.evaluate.metrics, "is_refusal", refusal_rule)
    changed = rescore(out, EVAL, LengthJudge())
    assert sorted(c.cell for c in changed) == sorted(cells) and {c.old_judge for c in changed} == {"keyword-v4"}
    rows = {(r.model, r.cell, r.metric): r for r in store.rows()}
    assert rows.keys() == before.keys()
    for c in cells:
        p = scores[c]
        assert rows[("tiny", c, "hs")].value == pytest.approx(100 * sum(p) / len(p))
        assert rows[("tiny", c, "hs_binary")].value == pytest.approx(100 * sum(x > 0.5 for x in p) / len(p))
        assert rows[("tiny", c, "hs_se")].value == pytest.approx(100 * statistics.stdev(p) / math.sqrt(len(p)))
        if 0 < sum(p) < len(p):  # the keyword judge scored 0 or 1 per answer: a fractional mean is the new judge's
            assert rows[("tiny", c, "hs")].value != before[("tiny", c, "hs")].value
        assert {r.judge for k, r in rows.items() if k[1] == c} == {"length-v1"}  # on every row of the cell
        # what the judge does not touch stays, value for value
        assert rows[("tiny", c, "zs_mean")].value == before[("tiny", c, "zs_mean")].value
        # the refusal rate beside HS follows the keyword rule of the rescoring seamlm
        rule = [refusal_rule(a["answer"]) for a in answers[c]]
        assert rows[("tiny", c, "refusal_rate")].value == pytest.approx(100 * sum(rule) / len(rule))
        saved = [json.loads(x) for x in samples_file(out, "tiny", c).read_text().splitlines()]
        assert [s["p_harmful"] for s in saved] == pytest.approx(p)
        assert [s["p_harmful[keyword-v4]"] for s in saved] == [a["p_harmful"] for a in answers[c]]
    backup = ResultStore(out / "results.before-keyword-v4.jsonl").rows()
    assert {(r.cell, r.metric): r.value for r in backup} == {(c, m): r.value for (_, c, m), r in before.items()}

    # the same run with the new judge: every cell is found done (the settings digests are the new judge's)
    pre, ran_again, _ = _run(tiny_model_dir, bundle, out, LengthJudge())
    assert pre is False and ran_again == []
    assert rescore(out, EVAL, LengthJudge()) == []  # nothing left to rescore


def test_rescore_with_answers_missing_writes_nothing_and_says_which(tiny_model_dir, bundle, tmp_path):
    out = tmp_path / "run"
    _, ran, store = _run(tiny_model_dir, bundle, out, KeywordJudge())
    samples_file(out, "tiny", ran[0]).unlink()
    text, answers = store.path.read_text(), samples_file(out, "tiny", "pre").read_text()
    with pytest.raises(DataError, match=f"{ran[0]}.*were not kept"):
        rescore(out, EVAL, LengthJudge())
    assert store.path.read_text() == text and not (out / "results.before-keyword-v4.jsonl").exists()
    assert samples_file(out, "tiny", "pre").read_text() == answers  # the cell that has its answers is not rewritten


def test_rescore_cli_with_a_registered_judge(tiny_model_dir, bundle, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _run(tiny_model_dir, bundle, out, KeywordJudge())
    monkeypatch.setitem(JUDGES, "length", lambda **kw: LengthJudge())
    assert main(["rescore", str(out / "results.jsonl"), "--judge", "length"]) == 0
    printed = capsys.readouterr().out
    assert "tiny/pre" in printed and "(keyword-v4) ->" in printed and "2 cells rescored" in printed
    assert main(["rescore", str(out), "--judge", "length"]) == 0
    assert "nothing to rescore" in capsys.readouterr().out
    assert main(["rescore", str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["rescore", str(tmp_path / "empty.jsonl"), "--judge", "length"]) == 1
    assert "empty.jsonl holds no HS rows (0 result rows)" in capsys.readouterr().err


def test_a_sweep_not_started_adopts_the_new_judge_and_one_with_trials_is_refused(tmp_path):
    from seamlm.rescore import _adopt, _unstarted_studies
    from seamlm.sweep import SweepConfig, open_study

    context = {"model": "m", "judge": "keyword-v4", "eval": EVAL.settings_dict()}
    open_study(SweepConfig(recipes=("sft",), trials=2), "tiny", tmp_path, context)
    _adopt(tmp_path, _unstarted_studies(tmp_path, "length-v1"), "length-v1", EVAL)
    study = open_study(SweepConfig(recipes=("sft",), trials=2), "tiny", tmp_path, {**context, "judge": "length-v1"})
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(DataError, match="study 'tiny' has trials chosen by HS under the old judge"):
        _unstarted_studies(tmp_path, "keyword-v4")
    assert _unstarted_studies(tmp_path, "length-v1") == []  # its trials were chosen by this judge: nothing to do
    # so rescoring a folder swept under the judge asked for is a no-op, not an error
    from seamlm.results import ResultRow, ResultStore

    ResultStore(tmp_path / "results.jsonl").append([ResultRow(model="m", defense="none", cell="pre", metric="hs",
                                                              value=1.0, judge="length-v1")])
    assert rescore(tmp_path, EVAL, judge=LengthJudge()) == []


def test_a_sweep_db_that_is_no_database_stops_a_rescore_with_a_clear_error(tmp_path):
    from seamlm.rescore import _unstarted_studies

    (tmp_path / "sweep.db").write_bytes(b"\x00not sqlite\xff" * 100)
    with pytest.raises(DataError, match=r"sweep.db is not a readable Optuna study \(file is not a database\): restore "
                                        r"it, or rescore a copy of the folder without it"):
        _unstarted_studies(tmp_path, "length-v1")


def test_a_sweep_db_from_another_optuna_version_is_a_clear_error_naming_the_upgrade(tmp_path):
    """Optuna refuses a study file whose schema another version wrote (RuntimeError): the rescore and the sweep say
    so and give the upgrade command instead of a traceback."""
    import sqlite3

    import optuna

    from seamlm.rescore import _unstarted_studies
    from seamlm.sweep import SweepConfig, open_study, sweep_storage

    optuna.create_study(study_name="tiny", storage=sweep_storage(tmp_path))
    with sqlite3.connect(tmp_path / "sweep.db") as db:  # as an older Optuna would have left it
        db.execute("UPDATE alembic_version SET version_num = 'v2.6.0.a'")
    upgrade = re.escape(f"`optuna storage upgrade --storage 'sqlite:///{tmp_path.resolve() / 'sweep.db'}'`")
    with pytest.raises(DataError, match=r"sweep.db was written by an older Optuna \(.*\)\. Upgrade it in "
                                        rf"place with {upgrade} \(keep a copy first\), or restore it, or rescore a copy"):
        _unstarted_studies(tmp_path, "length-v1")
    with pytest.raises(DataError, match=rf"an older Optuna .*{upgrade}.*, or restore it or use another --out"):
        open_study(SweepConfig(), "tiny", tmp_path)
    with sqlite3.connect(tmp_path / "sweep.db") as db:  # as a newer Optuna would leave it: no upgrade to run
        db.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")
    newer = rf"sweep.db was written by a newer Optuna than this one \({re.escape(optuna.__version__)}\): install"
    with pytest.raises(DataError, match=newer + r".*, or restore it, or rescore a copy"):
        _unstarted_studies(tmp_path, "length-v1")
    with pytest.raises(DataError, match=newer):
        open_study(SweepConfig(), "tiny", tmp_path)


def test_a_sweep_db_another_process_keeps_locked_is_busy_not_broken(tmp_path, monkeypatch):
    import sqlite3

    import optuna

    import seamlm.sweep as sweep_mod
    from seamlm.rescore import _unstarted_studies

    optuna.create_study(study_name="a", storage=sweep_mod.sweep_storage(tmp_path))
    monkeypatch.setattr(sweep_mod, "SQLITE_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(tmp_path / "sweep.db", isolation_level=None)
    busy = r"sweep.db stayed locked by another process for 0.2 s .*the file is not damaged; rerun once"
    # a writer (another sweep's write, a sqlite shell in a transaction): reads go on, a new study cannot be written;
    # an exclusive holder: nothing can be read either
    for hold in ("IMMEDIATE", "EXCLUSIVE"):
        holder.execute(f"BEGIN {hold}")
        try:
            with pytest.raises(DataError, match=busy):
                sweep_mod.open_study(sweep_mod.SweepConfig(), "b", tmp_path)
            if hold == "EXCLUSIVE":
                with pytest.raises(DataError, match=busy):
                    _unstarted_studies(tmp_path, "length-v1")
        finally:
            holder.execute("ROLLBACK")
    holder.close()
    assert sweep_mod.open_study(sweep_mod.SweepConfig(), "b", tmp_path).study_name == "b"  # once it is free


def test_a_demo_on_a_baseline_is_rescored_from_the_baselines_answers_without_touching_it(tiny_model_dir, bundle,
                                                                                         tmp_path, monkeypatch):
    import shutil

    monkeypatch.setitem(JUDGES, "length", lambda **kw: LengthJudge())
    base, out = tmp_path / "base", tmp_path / "run"
    _run(tiny_model_dir, bundle, base, KeywordJudge(), label="aligned")
    out.mkdir()
    shutil.copy(base / "results.jsonl", out / "results.jsonl")  # as the demo copies the baseline's rows
    shutil.copytree(base / "results.settings", out / "results.settings")
    (out / "demo_config.json").write_text(json.dumps({"baseline_from": str(base), "judge": "keyword",
                                                      "judge_model": ""}))
    length = EVAL.replace(judge="length")
    with pytest.raises(DataError, match="reuses the baseline .*judged otherwise: rescore it first"):
        rescore(out, length)  # it resumes only with the baseline's judge: the baseline goes first
    assert rescore(base, length)
    theirs = samples_file(base, "aligned", "pre").read_text()
    assert len(rescore(out, length)) == 2
    assert samples_file(base, "aligned", "pre").read_text() == theirs  # the baseline is not touched
    assert "p_harmful[keyword-v4]" in samples_file(out, "aligned", "pre").read_text()  # this folder's own copy
    assert json.loads((out / "demo_config.json").read_text())["judge"] == "length"  # resume it with --judge length
    # a rescore cut short before the config was updated: running it again finishes that
    (out / "demo_config.json").write_text(json.dumps({"baseline_from": str(base), "judge": "keyword"}))
    assert rescore(out, length) == [] and json.loads((out / "demo_config.json").read_text())["judge"] == "length"


def test_cells_from_before_hs_se_gain_it_in_their_own_write(tiny_model_dir, bundle, tmp_path, caplog):
    """A folder evaluated before hs_se existed: rescoring adds the row to each cell's write (its row count follows),
    so every cell still reads as complete and a rerun redoes none."""
    out = tmp_path / "run"
    _, ran, store = _run(tiny_model_dir, bundle, out, KeywordJudge())
    old = [json.loads(x) for x in store.path.read_text().splitlines()]
    kept = [r for r in old if r["metric"] != "hs_se"]
    counts = Counter(r["write"] for r in kept)
    for r in kept:  # as an older seamlm wrote them: no hs_se row, the write's count without it
        r["write"] = f"{r['write'].split('/')[0]}/{counts[r['write']]}"
    store.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert not any(r.metric == "hs_se" for r in store.rows()) and len(store.rows()) == len(kept)

    rescore(out, EVAL, LengthJudge())
    rows = store.rows()
    assert "cut short" not in caplog.text and len(rows) == len(old)
    for c in ["pre", *ran]:
        p = [length_score(a["prompt"], a["answer"])
             for a in map(json.loads, samples_file(out, "tiny", c).read_text().splitlines())]
        se = next(r for r in rows if r.cell == c and r.metric == "hs_se")
        assert se.judge == "length-v1" and se.value == pytest.approx(100 * statistics.stdev(p) / math.sqrt(len(p)))
        assert se.value > 0, c
    pre, ran_again, _ = _run(tiny_model_dir, bundle, out, LengthJudge())
    assert pre is False and ran_again == []


def test_a_baseline_of_the_same_name_that_the_seam_model_did_not_grow_on_is_refused(tmp_path, monkeypatch):
    """A relative baseline_from is looked for from the current folder first: from elsewhere another demo of that
    name may be found, whose raw and aligned answers are not this demo's."""
    from seamlm.models import RUN_CONFIG_FILE, WEIGHTS_DIGEST_KEY
    from seamlm.rescore import demo_baseline

    def demo(folder, aligned_digest):
        (folder / "models" / "aligned").mkdir(parents=True)
        (folder / "models" / "aligned" / RUN_CONFIG_FILE).write_text(json.dumps({WEIGHTS_DIGEST_KEY: aligned_digest * 16}))
        (folder / "results.jsonl").write_text("")
        (folder / "demo_config.json").write_text("{}")

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    demo(here / "base", "a")
    demo(elsewhere / "base", "b")
    trial = here / "trial"
    (trial / "models" / "seam" / "model").mkdir(parents=True)
    (trial / "models" / "seam" / "model" / RUN_CONFIG_FILE).write_text(json.dumps({"base_identity": "sha256:" + "a" * 16}))
    (trial / "demo_config.json").write_text(json.dumps({"baseline_from": "base"}))
    monkeypatch.chdir(here)
    assert demo_baseline(trial) == Path("base")
    monkeypatch.chdir(elsewhere)  # its own "base" is another demo
    with pytest.raises(DataError, match=r"another aligned model than the one .*trial's SEAM model was trained from"):
        demo_baseline(trial)


def test_a_rescore_killed_between_its_files_is_refused_by_paired_until_it_is_run_again(tiny_model_dir, bundle,
                                                                                       tmp_path, monkeypatch):
    """Answer files are rewritten first, results.jsonl last: cut in between, they name different judges, and paired
    (which takes scores from the answers and judges from the results) must not mix them."""
    import seamlm.rescore as rescore_mod
    from seamlm.paired import paired_hs
    from seamlm.rescore import RESCORE_PENDING

    monkeypatch.setitem(JUDGES, "length", lambda **kw: LengthJudge())
    out = tmp_path / "run"
    _run(tiny_model_dir, bundle, out, KeywordJudge(), label="aligned")
    real, writes = rescore_mod.write_records_atomic, []

    def killed_after_the_first_file(path, records):
        if writes:
            raise KeyboardInterrupt
        writes.append(path)
        return real(path, records)

    monkeypatch.setattr(rescore_mod, "write_records_atomic", killed_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        rescore(out, EVAL.replace(judge="length"))
    monkeypatch.setattr(rescore_mod, "write_records_atomic", real)
    assert (out / RESCORE_PENDING).is_file()
    with pytest.raises(DataError, match=r"a rescore of .*run \(to length-v1\) was cut short"):
        paired_hs([out], a="aligned", b="aligned")
    assert len(rescore(out, EVAL.replace(judge="length"))) == 2  # run again: finished, the marker gone
    assert not (out / RESCORE_PENDING).exists()
    paired_hs([out], a="aligned", b="aligned")
