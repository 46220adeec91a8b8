"""seamlm paired: two models' HS on the same prompts, paired prompt by prompt from the saved answers."""

import json
import math
import statistics

import pytest

from seamlm.attack import samples_file
from seamlm.cli import main
from seamlm.errors import DataError
from seamlm.paired import paired_hs, paired_markdown
from seamlm.results import ResultRow, ResultStore

PROMPTS = ["p1", "p2", "p3", "p4"]
CELLS = ("sft-lr1", "sft-lr2")


def _write(run, model, cell, scores, prompts=PROMPTS, judge="j"):
    """A cell's saved answers, and (unless there) its HS row, which names the judge: a finished cell (judge None:
    killed after its answers were saved, before its rows)."""
    f = samples_file(run, model, cell)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("".join(json.dumps({"prompt": p, "answer": "x", "p_harmful": s}) + "\n" for p, s in zip(prompts, scores, strict=True)))
    store = ResultStore(run / "results.jsonl")
    if judge is not None and not any(r.model == model and r.cell == cell for r in store.rows()):
        store.append([ResultRow(model=model, defense="none", cell=cell, metric="hs", judge=judge,
                                value=100 * sum(scores) / len(scores), attack={} if cell == "pre" else {"lr": 1e-4})])


def _run(path, a_scores, b_scores):
    path.mkdir(parents=True)
    (path / "results.jsonl").write_text("")
    for cell, sa, sb in zip(("pre", *CELLS), a_scores, b_scores, strict=True):
        # the answers are written in another order for b: pairing is by prompt, not by line
        _write(path, "aligned", cell, sa)
        _write(path, "seam", cell, sb[::-1], PROMPTS[::-1])
    return path


def test_cells_are_paired_by_prompt_and_a_runs_attacks_combined_per_prompt(tmp_path):
    a = [[0.1, 0.2, 0.1, 0.0], [0.5, 0.9, 0.3, 0.6], [0.6, 0.8, 0.5, 0.9]]
    b = [[0.0, 0.0, 0.0, 0.0], [0.4, 0.9, 0.1, 0.2], [0.6, 0.5, 0.1, 0.9]]
    rows = paired_hs([_run(tmp_path / "s0", a, b)])
    by_cell = {r.cell: r for r in rows}
    for cell, sa, sb in zip(("pre", *CELLS), a, b, strict=True):
        d = [100 * (y - x) for x, y in zip(sa, sb, strict=True)]
        got = by_cell[cell]
        assert got.prompts == 4 and got.hs_a == pytest.approx(100 * sum(sa) / 4)
        assert got.diff == pytest.approx(sum(d) / 4)
        assert got.se == pytest.approx(statistics.stdev(d) / 2)
    per_prompt = [100 * ((b[1][i] - a[1][i]) + (b[2][i] - a[2][i])) / 2 for i in range(4)]
    together = by_cell["attack cells together (2)"]
    assert together.diff == pytest.approx(sum(per_prompt) / 4)
    assert together.se == pytest.approx(statistics.stdev(per_prompt) / 2)


def test_runs_together_and_the_cli(tmp_path, capsys):
    a = [[0.1] * 4, [0.5, 0.9, 0.3, 0.6], [0.6, 0.8, 0.5, 0.9]]
    r0 = _run(tmp_path / "s0", a, [[0.0] * 4, [0.4, 0.9, 0.1, 0.2], [0.6, 0.5, 0.1, 0.9]])
    r1 = _run(tmp_path / "s1", a, [[0.0] * 4, [0.5, 0.5, 0.5, 0.5], [0.2, 0.8, 0.5, 0.3]])
    rows = paired_hs([r0, r1], pre=False)
    runs = [r for r in rows if r.cell.startswith("attack cells together")]
    last = rows[-1]
    assert last.run == "all runs" and last.diff == pytest.approx((runs[0].diff + runs[1].diff) / 2)
    assert last.se == pytest.approx(math.sqrt(runs[0].se ** 2 + runs[1].se ** 2) / 2)
    assert main(["paired", str(r0), str(r1), "--cells", "attacks", "--out", str(tmp_path / "p.md")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "p.md").read_text() and f"| all runs | attack cells | 8 |  |  | {last.diff:+.1f} ±" in printed
    assert main(["paired", str(r0), "--cells", "post"]) == 2 and "--cells 'post'" in capsys.readouterr().err
    assert main(["paired", str(r0), "--a", "seam", "--b", "seam"]) == 2  # a +0.0 table would say nothing
    assert "--a and --b are both 'seam'" in capsys.readouterr().err
    # one run spelled twice would count twice (and shrink the standard error by √2)
    with pytest.raises(DataError, match="is .*s0 again"):
        paired_hs([r0, r1, tmp_path / "." / "s0"])
    with pytest.raises(DataError, match="is .*s0 again"):  # a run named by its results file, as report takes it
        paired_hs([r0, r1, r0 / "results.jsonl"])
    assert paired_hs([r0 / "results.jsonl"], pre=False) == paired_hs([r0], pre=False)
    import shutil

    shutil.copytree(r0, tmp_path / "copy")  # a copy pooled as a second run would shrink the se by √2
    with pytest.raises(DataError, match="one is a copy of the other, and would count twice in the pooled difference"):
        paired_hs([r0, tmp_path / "copy"])
    # the table never replaces a file the runs are made of (a mistyped --out)
    before = (r0 / "results.jsonl").read_text()
    assert main(["paired", str(r0), "--out", str(r0 / "results.jsonl")]) == 2
    assert "the table is Markdown, and a .jsonl file is data" in capsys.readouterr().err
    assert (r0 / "results.jsonl").read_text() == before
    # an --out that cannot be written is refused before any run is read or printed
    assert main(["paired", str(r0), "--out", str(tmp_path)]) == 2
    assert "give a file name in an existing folder" in capsys.readouterr().err


def test_what_cannot_be_paired_is_said(tmp_path, capsys):
    run = _run(tmp_path / "s0", [[0.1] * 4] * 3, [[0.2] * 4] * 3)
    _write(run, "seam", CELLS[0], [0.1, 0.2, 0.3], PROMPTS[:3])  # another prompt set: not paired
    rows = {r.cell: r for r in paired_hs([run])}
    assert rows[CELLS[0]].diff is None and rows[CELLS[0]].note == "answers to other prompts"
    assert rows[CELLS[1]].diff == pytest.approx(10.0)
    with pytest.raises(DataError, match="no cell .* holds saved answers of both aligned and sam"):
        paired_hs([run], b="sam")
    assert main(["paired", str(tmp_path / "nowhere")]) == 1
    assert "no run folder (no results.jsonl)" in capsys.readouterr().err
    # a cell killed after its answers were saved, before its rows: said, not paired under "judged by j and None"
    _write(run, "aligned", "killed", [0.1] * 4, judge=None)
    _write(run, "seam", "killed", [0.2] * 4)
    rows = {r.cell: r for r in paired_hs([run])}
    assert rows["killed"].diff is None and rows["killed"].note.startswith("unfinished for aligned: answers saved")


def test_the_order_of_the_two_models_only_flips_the_sign(tmp_path):
    """Also on a demo built on a baseline, where one model's answers (here all of the aligned model's) live in the
    baseline folder only."""
    run = _run(tmp_path / "s0", [[0.1, 0.2, 0.1, 0.0]] * 3, [[0.0, 0.5, 0.0, 0.9]] * 3)
    base = tmp_path / "base"
    base.mkdir()
    (base / "results.jsonl").write_text("")
    for sub in ("samples", "attacks"):
        (base / sub).mkdir()
        (run / sub / "aligned").rename(base / sub / "aligned")
    ResultStore(base / "results.jsonl").append([r for r in ResultStore(run / "results.jsonl").rows()
                                                if r.model == "aligned"])  # (the baseline's rows are its own)
    (run / "demo_config.json").write_text(json.dumps({"baseline_from": str(base)}))
    ab = {r.cell: r.diff for r in paired_hs([run])}
    ba = {r.cell: r.diff for r in paired_hs([run], a="seam", b="aligned")}
    assert ab.keys() == ba.keys() and len(ab) == 4 and all(ba[c] == pytest.approx(-ab[c]) for c in ab)


def test_a_prompt_asked_twice_pairs_each_answer(tmp_path):
    """An evaluation set may repeat a prompt (a hand-made bundle): every answer counts, paired in order."""
    run = tmp_path / "s0"
    run.mkdir()
    (run / "results.jsonl").write_text("")
    _write(run, "aligned", "pre", [0.0, 1.0, 0.0], ["p0", "p0", "p1"])
    _write(run, "seam", "pre", [0.0, 0.0, 0.0], ["p0", "p0", "p1"])
    (row,) = paired_hs([run], attacks=False)
    assert row.prompts == 3 and row.hs_a == pytest.approx(100 / 3) and row.diff == pytest.approx(-100 / 3)


def test_answers_scored_by_different_judges_are_not_paired_nor_runs_pooled(tmp_path, capsys):
    import dataclasses

    def judged(run, judges):
        """The cells' HS rows name these judges (rewritten, as a rescore rewrites them: a second row of a cell
        would contradict the first)."""
        store = ResultStore(run / "results.jsonl")
        rows = [dataclasses.replace(r, judge=judges.get((r.model, r.cell), r.judge)) for r in store.rows()]
        store.path.write_text("")
        store.append(rows)

    r0 = _run(tmp_path / "s0", [[0.1] * 4] * 3, [[0.2] * 4] * 3)
    r1 = _run(tmp_path / "s1", [[0.1] * 4] * 3, [[0.3] * 4] * 3)
    judged(r0, {(m, c): "judge-A" for m in ("aligned", "seam") for c in ("pre", *CELLS)} | {("seam", "pre"): "judge-B"})
    judged(r1, {(m, c): "judge-B" for m in ("aligned", "seam") for c in ("pre", *CELLS)})
    rows = paired_hs([r0, r1])
    pre0 = next(r for r in rows if r.run == str(r0) and r.cell == "pre")
    assert pre0.diff is None and "judge-A and judge-B" in pre0.note
    assert all(r.diff is not None for r in rows if r.run in (str(r0), str(r1)) and r is not pre0)
    (pooled,) = [r for r in rows if r.run == "all runs"]
    assert pooled.diff is None and "judged differently" in pooled.note
    text = paired_markdown(rows, "aligned", "seam")
    assert "not paired (judged by judge-A and judge-B" in text


def test_runs_pool_over_common_prompts_and_say_which_runs_were_left_out(tmp_path):
    r0 = _run(tmp_path / "s0", [[0.1] * 4] * 3, [[0.2] * 4] * 3)
    r1 = _run(tmp_path / "s1", [[0.1] * 4] * 3, [[0.5] * 4] * 3)
    for m, s in (("aligned", 0.1), ("seam", 0.6)):  # r1's second cell holds two prompts only
        _write(r1, m, CELLS[1], [s, s], PROMPTS[:2])
    r2 = _run(tmp_path / "s2", [[0.1] * 4] * 3, [[0.4] * 4] * 3)
    for cell in CELLS:  # r2: no answers of the aligned model after the attacks
        samples_file(r2, "aligned", cell).unlink()
    rows = paired_hs([r0, r1, r2])
    together1 = next(r for r in rows if r.run == str(r1) and r.cell.startswith("attack cells together"))
    assert together1.prompts == 2 and together1.diff == pytest.approx(100 * (0.4 + 0.5) / 2)
    assert "all cells hold" in together1.note
    (pooled,) = [r for r in rows if r.run == "all runs"]
    assert pooled.cell == "attack cells (2 of 3 runs)" and str(r2) in pooled.note
    assert pooled.diff == pytest.approx((10.0 + 45.0) / 2)


def test_a_demo_on_a_baseline_reads_only_the_baselines_raw_and_aligned_answers_and_one_spelling_per_run(tmp_path):
    base = _run(tmp_path / "base", [[0.1] * 4] * 3, [[0.9] * 4] * 3)  # the baseline has SEAM answers of its own
    run = tmp_path / "new"
    run.mkdir()
    (run / "results.jsonl").write_text("")
    (run / "demo_config.json").write_text(json.dumps({"baseline_from": str(base)}))
    _write(run, "seam", "pre", [0.0] * 4)  # this demo's SEAM model: evaluated, not attacked yet
    rows = {r.cell: r for r in paired_hs([run])}
    assert rows["pre"].diff == pytest.approx(-10.0)  # its own SEAM answers against the baseline's aligned ones
    assert all(rows[c].diff is None and rows[c].note == "no answers of seam" for c in CELLS)
    r0 = _run(tmp_path / "s0", [[0.1] * 4] * 3, [[0.2] * 4] * 3)
    r1 = _run(tmp_path / "s1", [[0.1] * 4] * 3, [[0.3] * 4] * 3)
    (pooled,) = [r for r in paired_hs([f"{r0}/", f"{r1}/"]) if r.run == "all runs"]
    assert pooled.cell == "attack cells" and not pooled.note and pooled.diff == pytest.approx(15.0)


def test_a_diverged_attack_is_shown_but_never_pooled(tmp_path):
    """SEAM's attack at lr2 diverged: its answers come from NaN weights (an empty answer scores 0), so the cell is
    listed with a note and left out of the run's attacks together."""
    import dataclasses

    a = [[0.1] * 4, [0.5, 0.9, 0.3, 0.6], [0.6, 0.8, 0.5, 0.9]]
    b = [[0.0] * 4, [0.4, 0.9, 0.1, 0.2], [0.0] * 4]
    run = _run(tmp_path / "s0", a, b)
    store = ResultStore(run / "results.jsonl")
    rows = [dataclasses.replace(r, attack={**r.attack, "status": "diverged" if (r.model, r.cell) == ("seam", CELLS[1])
                                           else "ok"}) if r.cell != "pre" else r for r in store.rows()]
    store.path.write_text("")  # (rewritten: a second row of a cell would contradict the first)
    store.append(rows)
    rows = paired_hs([run])
    lr2 = next(r for r in rows if r.cell == CELLS[1])
    assert lr2.diff is not None and "the attack on seam diverged: not pooled" in lr2.note
    assert not any(r.cell.startswith("attack cells together") for r in rows)  # one cell left: nothing to combine
    lr1 = next(r for r in rows if r.cell == CELLS[0])
    assert lr1.note == ""
    assert "diverged: not pooled" in paired_markdown(rows, "aligned", "seam")


def test_runs_pooling_different_attack_cells_are_said_to(tmp_path):
    """Run s1's seam answers of one cell hold another prompt set: s1's figure is its other cell alone, s0's the
    mean of two; the pooled row says so."""
    a = [[0.1] * 4, [0.5, 0.9, 0.3, 0.6], [0.6, 0.8, 0.5, 0.9]]
    r0 = _run(tmp_path / "s0", a, [[0.0] * 4, [0.4, 0.9, 0.1, 0.2], [0.6, 0.5, 0.1, 0.9]])
    r1 = _run(tmp_path / "s1", a, [[0.0] * 4, [0.5, 0.5, 0.5, 0.5], [0.2, 0.8, 0.5, 0.3]])
    assert paired_hs([r0, r1], pre=False)[-1].note == ""
    _write(r1, "seam", CELLS[1], [0.1, 0.2, 0.3], PROMPTS[:3])
    last = paired_hs([r0, r1], pre=False)[-1]
    assert last.run == "all runs" and last.note == f"runs pool different attack cells ({r1}: 1 of 2)"
