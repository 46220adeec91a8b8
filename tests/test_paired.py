"""seamlm paired: two models' HS on the same prompts, paired prompt by prompt from the saved answers."""

import json
import math
import statistics

import pytest

from seamlm.attack import samples_file
from seamlm.cli import main
from seamlm.errors import DataError
from seamlm.paired import paired_hs

PROMPTS = ["p1", "p2", "p3", "p4"]
CELLS = ("sft-lr1", "sft-lr2")


def _write(run, model, cell, scores, prompts=PROMPTS):
    f = samples_file(run, model, cell)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("".join(json.dumps({"prompt": p, "answer": "x", "p_harmful": s}) + "\n" for p, s in zip(prompts, scores, strict=True)))


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


def test_what_cannot_be_paired_is_said(tmp_path, capsys):
    run = _run(tmp_path / "s0", [[0.1] * 4] * 3, [[0.2] * 4] * 3)
    _write(run, "seam", CELLS[0], [0.1, 0.2, 0.3], PROMPTS[:3])  # another prompt set: not paired
    rows = {r.cell: r for r in paired_hs([run])}
    assert rows[CELLS[0]].diff is None and rows[CELLS[1]].diff == pytest.approx(10.0)
    with pytest.raises(DataError, match="no cell .* holds saved answers of both aligned and sam"):
        paired_hs([run], b="sam")
    assert main(["paired", str(tmp_path / "nowhere")]) == 1
    assert "no run folder (no results.jsonl)" in capsys.readouterr().err
