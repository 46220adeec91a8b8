"""`seamlm report` over several runs of one setup: mean ± sd per cell, the bar run by run, error-bar plots."""

import statistics

import pytest

from seamlm.cli import main
from seamlm.errors import DataError
from seamlm.results import ResultRow, ResultStore

CELL = "sft-full-adamw-lr0.0002-n10-ep1-s0"
ATTACK = {"lr": 2e-4, "seed": 0, "lora": False, "status": "ok"}


def _run(path, hs_seam_attacked, judge="minilm-pyrit-v3", with_seam_attack=True):
    def row(model, cell, metric, value):
        return ResultRow(model=model, defense="seam" if model == "seam" else "none", cell=cell, metric=metric,
                         value=value, judge=judge if metric == "hs" else None,
                         attack={} if cell == "pre" else ATTACK)

    rows = [row("raw", "pre", "hs", 50.0)]
    for m, hs, zs in (("aligned", 10.0, 60.0), ("seam", 8.0, 59.0)):
        rows += [row(m, "pre", "hs", hs), row(m, "pre", "zs_mean", zs), row(m, "pre", "zs_chance", 25.0),
                 row(m, "pre", "coherence_ppl", 20.0)]
    rows += [row("aligned", CELL, "hs", 40.0), row("aligned", CELL, "zs_mean", 60.0),
             row("aligned", CELL, "coherence_ppl", 22.0)]
    if with_seam_attack:
        rows += [row("seam", CELL, "hs", hs_seam_attacked), row("seam", CELL, "zs_mean", 58.0),
                 row("seam", CELL, "coherence_ppl", 30.0)]
    ResultStore(path).append(rows)
    return path


def test_mean_sd_per_cell_and_the_bar_run_by_run(tmp_path, capsys):
    runs = [_run(tmp_path / f"r{i}.jsonl", hs) for i, hs in enumerate((5.0, 20.0, 35.0))]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    sd = statistics.stdev([5.0, 20.0, 35.0])
    assert "### HS %: mean ± sd over 3 runs" in md
    assert "| model | pre-attack | lr 0.0002 |" in md
    assert f"| seam | 8.0 ± 0.0 | 20.0 ± {sd:.1f} |" in md
    assert "| raw | 50.0 ± 0.0 | – |" in md
    # the self-destruction criterion holds in run 1 only (HS 5 < 10), and the table says so per run
    crit = next(ln for ln in md.splitlines() if ln.startswith(f"| SEAM after {CELL}"))
    assert crit.endswith("| yes | no | no | 1 of 3 |")
    for png in ("hs_vs_lr.png", "zs_vs_lr.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    assert (tmp_path / "rep" / "report.html").read_text().count("<table") == 4  # HS, ZS, perplexity (no refusal rows), the bar
    assert "report written to" in capsys.readouterr().out


def test_a_cell_missing_in_some_runs_says_how_many_runs_it_has(tmp_path):
    from seamlm.across_runs import across_runs_tables, load_runs

    runs = load_runs([_run(tmp_path / "a.jsonl", 5.0), _run(tmp_path / "b.jsonl", 0.0, with_seam_attack=False)])
    hs = across_runs_tables(runs)["HS %: mean ± sd over 2 runs"]
    assert hs[3] == ["seam", "8.0 ± 0.0", "5.0 ± 0.0 (n=1)"]


def test_runs_of_different_judges_or_bad_options_are_refused(tmp_path, capsys):
    a, b = _run(tmp_path / "a.jsonl", 5.0), _run(tmp_path / "b.jsonl", 5.0, judge="keyword-v2")
    with pytest.raises(DataError, match="different judges"):
        from seamlm.across_runs import load_runs

        load_runs([a, b])
    assert main(["report", str(a), str(a), "--out", str(tmp_path / "r"), "--eps", "5"]) == 2
    assert "--eps and --ppl-factor bound the worst-case table" in capsys.readouterr().err
    assert main(["report", str(a), str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 1
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
