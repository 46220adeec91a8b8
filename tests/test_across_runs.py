"""`seamlm report` over several runs of one setup: mean ± sd per cell, the bar run by run, error-bar plots."""

import csv
import statistics

import pytest

from seamlm.cli import main
from seamlm.errors import DataError
from seamlm.results import ResultRow, ResultStore

CELL = "sft-full-adamw-lr0.0002-n10-ep1-s0"
ATTACK = {"lr": 2e-4, "seed": 0, "lora": False, "status": "ok"}


def _run(path, hs_seam_attacked, judge="minilm-pyrit-v3", with_seam_attack=True, hs_prompts=None,
         seam_ppl=30.0, seam_status="ok", eval_seed=0, prompt_format=None):
    parts = None if hs_prompts is None else {"eval": {"hs_prompts": hs_prompts, "seed": eval_seed}, "judge": judge,
                                              **({"prompt_format": prompt_format} if prompt_format else {})}

    def row(model, cell, metric, value):
        return ResultRow(model=model, defense="seam" if model == "seam" else "none", cell=cell, metric=metric,
                         value=value, judge=judge if metric == "hs" else None,
                         attack={} if cell == "pre" else {**ATTACK, "status": seam_status if model == "seam" else "ok"},
                         settings=None if parts is None else f"digest{hs_prompts}-{prompt_format}")

    rows = [row("raw", "pre", "hs", 50.0)]
    for m, hs, zs in (("aligned", 10.0, 60.0), ("seam", 8.0, 59.0)):
        rows += [row(m, "pre", "hs", hs), row(m, "pre", "zs_mean", zs), row(m, "pre", "zs_chance", 25.0),
                 row(m, "pre", "coherence_ppl", 20.0)]
    rows += [row("aligned", CELL, "hs", 40.0), row("aligned", CELL, "zs_mean", 60.0),
             row("aligned", CELL, "coherence_ppl", 22.0)]
    if with_seam_attack:
        rows += [row("seam", CELL, "hs", hs_seam_attacked), row("seam", CELL, "zs_mean", 58.0),
                 row("seam", CELL, "coherence_ppl", seam_ppl)]
    ResultStore(path).append(rows, settings_parts=parts)
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
    assert f"every row: {tmp_path / 'rep' / 'results.csv'})" in capsys.readouterr().out
    # every run's rows, flat, each under its results file
    lines = list(csv.DictReader((tmp_path / "rep" / "results.csv").open()))
    assert [ln["run"] for ln in lines] == [str(p) for p in runs for _ in ResultStore(p).rows()]
    seam_hs = [float(ln["value"]) for ln in lines if (ln["model"], ln["cell"], ln["metric"]) == ("seam", CELL, "hs")]
    assert seam_hs == [5.0, 20.0, 35.0]


def test_a_cell_missing_in_some_runs_says_how_many_runs_it_has(tmp_path):
    from seamlm.across_runs import across_runs_tables, load_runs

    runs = load_runs([_run(tmp_path / "a.jsonl", 5.0), _run(tmp_path / "b.jsonl", 0.0, with_seam_attack=False)])
    hs = across_runs_tables(runs)["HS %: mean ± sd over 2 runs"]
    assert hs[3] == ["seam", "8.0 ± 0.0", "5.0 ± 0.0 (n=1)"]


def test_runs_of_different_judges_or_bad_options_are_refused(tmp_path, capsys):
    a, b = _run(tmp_path / "a.jsonl", 5.0), _run(tmp_path / "b.jsonl", 5.0, judge="keyword-v4")
    with pytest.raises(DataError, match="different judges"):
        from seamlm.across_runs import load_runs

        load_runs([a, b])
    assert main(["report", str(a), str(a), "--out", str(tmp_path / "r"), "--eps", "5"]) == 2
    assert "--eps and --ppl-factor bound the worst-case table" in capsys.readouterr().err
    assert main(["report", str(a), str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 1
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_infinite_values_are_counted_not_averaged_and_divergence_is_marked(tmp_path):
    from seamlm.across_runs import across_runs_tables, load_runs

    # a broken model's perplexity overflows to inf (statistics.stdev raises on it): the finite runs are averaged
    # and the inf ones counted; a diverged attack is named in every metric's cell and kept out of its mean (its
    # numbers measure NaN weights)
    runs = load_runs([_run(tmp_path / "a.jsonl", 5.0, seam_ppl=float("inf")), _run(tmp_path / "b.jsonl", 9.0),
                      _run(tmp_path / "c.jsonl", 7.0, seam_ppl=50.0, seam_status="diverged")])
    tables = across_runs_tables(runs)
    ppl = tables["benign perplexity: mean ± sd over 3 runs"]
    assert ppl[3][2] == "30.0 ± 0.0 (n=1, inf in 1, diverged in 1)"
    assert tables["HS %: mean ± sd over 3 runs"][3][2] == f"7.0 ± {statistics.stdev([5.0, 9.0]):.1f} (n=2, diverged in 1)"
    only_inf = load_runs([_run(tmp_path / "d.jsonl", 5.0, seam_ppl=float("inf"))])
    assert across_runs_tables(only_inf)["benign perplexity: mean ± sd over 1 runs"][3][2] == "inf (inf in 1)"


def test_the_same_run_twice_or_runs_of_other_evaluation_settings_are_refused(tmp_path, capsys):
    from seamlm.across_runs import load_runs

    a = _run(tmp_path / "a.jsonl", 5.0, hs_prompts=32)
    with pytest.raises(DataError, match="given twice"):
        load_runs([a, tmp_path / "." / "a.jsonl"])
    (tmp_path / "copy").mkdir()  # a copy of the run (its rows keep their write ids): not an independent run
    (tmp_path / "copy" / "results.jsonl").write_text(a.read_text())
    with pytest.raises(DataError, match=r"copy/results.jsonl holds rows .*a.jsonl wrote .*: one is a copy of the "
                                        r"other, and would count twice in the mean ± sd"):
        load_runs([a, tmp_path / "copy"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no results.jsonl"):
        load_runs([a, tmp_path / "empty"])
    other = ResultStore(tmp_path / "other.jsonl")
    other.append([ResultRow(model="mine", defense="none", cell="pre", metric="zs_mean", value=50.0)])
    with pytest.raises(DataError, match="share no model label"):
        load_runs([a, other.path])
    # the sampling seed may differ (it is left out of the comparison); the number of HS prompts may not
    load_runs([a, _run(tmp_path / "b.jsonl", 7.0, hs_prompts=32, eval_seed=1)])
    with pytest.raises(DataError, match=r"'aligned' in .*c.jsonl was evaluated with other settings .*hs_prompts"):
        load_runs([a, _run(tmp_path / "c.jsonl", 7.0, hs_prompts=100)])
    # a model without a chat template, prompted in another fallback format version (absent: before versions)
    with pytest.raises(DataError, match=r"evaluated with other settings .*\(prompt_format differ\)"):
        load_runs([a, _run(tmp_path / "d.jsonl", 7.0, hs_prompts=32, prompt_format=2)])


def test_a_folder_without_results_names_its_seed_runs(tmp_path, capsys):
    for s in (0, 1):
        (tmp_path / "demo" / f"seed-{s}").mkdir(parents=True)
        _run(tmp_path / "demo" / f"seed-{s}" / "results.jsonl", 5.0)
    assert main(["report", str(tmp_path / "demo"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    seeds = f"{tmp_path / 'demo' / 'seed-0'} {tmp_path / 'demo' / 'seed-1'}"
    assert "is a folder without a results.jsonl" in err and f"give its runs, `seamlm report {seeds}`" in err
    # paired and rescore name them too
    assert main(["paired", str(tmp_path / "demo")]) == 1
    assert f"no run folder (no results.jsonl) (a `--seeds` demo: give its runs, `seamlm paired {seeds}`)" in \
        capsys.readouterr().err
    assert main(["rescore", str(tmp_path / "demo"), "--judge", "keyword"]) == 1
    assert f"rescore each of its runs, `seamlm rescore {tmp_path / 'demo' / 'seed-0'}`" in capsys.readouterr().err


def test_error_bars_average_one_attack_setting_over_runs_never_two_settings(tmp_path):
    from seamlm.across_runs import error_bar_lines, load_runs

    # run a attacked at lr 2e-4 with seed 0 and seed 1 (two cells), run b with seed 0 only; a diverged cell and
    # a LoRA cell at the same lr stay out of / apart from the full fine-tuning line
    def rows_of(path, cells):
        out = []
        for cell, attack, hs in cells:
            out.append(ResultRow(model="seam", defense="seam", cell=cell, metric="hs", value=hs, judge="j",
                                 attack={"lr": 2e-4, "lora": False, "status": "ok", **attack}))
        out.append(ResultRow(model="seam", defense="seam", cell="pre", metric="hs", value=5.0, judge="j"))
        ResultStore(path).append(out)
        return path

    a = rows_of(tmp_path / "a.jsonl", [("s0", {"seed": 0}, 10.0), ("s1", {"seed": 1}, 50.0),
                                       ("lora", {"seed": 0, "lora": True}, 70.0)])
    b = rows_of(tmp_path / "b.jsonl", [("s0", {"seed": 0}, 20.0), ("s1", {"seed": 1, "status": "diverged"}, 90.0)])
    lines = error_bar_lines([r for run in load_runs([a, b]) for r in run.rows], "hs")["seam"]
    assert lines == {(False, "seed=0"): {2e-4: [10.0, 20.0]}, (False, "seed=1"): {2e-4: [50.0]},
                     (True, "seed=0"): {2e-4: [70.0]}}


def test_attacks_on_the_whole_attack_stream_line_up_across_data_seeds(tmp_path):
    """`--preset full` asks for 1000 attack examples; each data seed's stream holds another count (168, 134 …) and
    the cell keys name it: the runs' cells are one column all the same."""
    from seamlm.across_runs import across_runs_tables, load_runs

    paths = []
    for i, (n, hs) in enumerate(((168, 5.0), (134, 15.0))):
        cell = f"sft-full-adamw-lr0.0002-n{n}-ep1-b4-s0"
        attack = {**ATTACK, "samples": n, "samples_requested": 1000}
        rows = [ResultRow(model=m, defense="none", cell=c, metric="hs", value=v, judge="j",
                          attack={} if c == "pre" else attack)
                for m, c, v in (("aligned", "pre", 10.0), ("seam", "pre", 8.0), ("seam", cell, hs))]
        ResultStore(tmp_path / f"r{i}.jsonl").append(rows)
        paths.append(tmp_path / f"r{i}.jsonl")
    runs = load_runs(paths)
    assert {r.cell for run in runs for r in run.rows} == {"pre", "sft-full-adamw-lr0.0002-nall1000-ep1-b4-s0"}
    hs = across_runs_tables(runs)["HS %: mean ± sd over 2 runs"]
    assert hs[0] == ["model", "pre-attack", "lr 0.0002"] and hs[2] == ["seam", "8.0 ± 0.0", "10.0 ± 7.1"]
