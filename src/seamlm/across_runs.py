"""Several results files of one setup (e.g. demos with different ``--data_seed``) -> mean ± sd tables, the bar's
verdict run by run, and HS/ZS-vs-lr plots with error bars. One run of a 135M model on 32 HS prompts moves by several
points with the seed: a claim about SEAM at this scale should come with the spread."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from seamlm.errors import DataError
from seamlm.results import ResultRow, ResultStore, write_results_csv
from seamlm.runinfo import refuse_copied_runs, refuse_repeated_run
from seamlm.verdict import check_bar

#: (metric, what the table calls it, decimals) of the across-runs tables
METRICS = (("hs", "HS %", 1), ("refusal_rate", "refusal rate % (keyword)", 1), ("zs_mean", "ZS % (mean accuracy)", 1),
           ("coherence_ppl", "benign perplexity", 1), ("coupling_cos", "cos(g_harmful, g_benign) on the attack data", 3),
           ("fs_accuracy", "FS: SST-2 accuracy %", 1))


@dataclass
class Run:
    path: Path
    rows: list[ResultRow]


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Each results file's plain-grid rows (pre-attack and the plain SFT grid); every run must use one judge, the
    same one, so the means never mix judges."""
    from seamlm.report import is_plain_grid

    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir() and (path / "results.jsonl").is_file():
            path = path / "results.jsonl"
        if path.is_dir():
            raise DataError(f"{path} has no results.jsonl: give the results.jsonl files (or run folders) to compare")
        if not path.is_file():
            raise DataError(f"{path} does not exist; give the results.jsonl files (or run folders) to compare")
        files.append(path)
    refuse_repeated_run(files, "the mean ± sd")
    runs: list[Run] = []
    for path in files:
        rows = [_whole_stream_as_asked(r) for r in ResultStore(path).rows() if is_plain_grid(r)]
        if not rows:
            raise DataError(f"{path} holds no pre-attack or plain attack rows")
        runs.append(Run(path, rows))
    refuse_copied_runs({run.path: run.rows for run in runs}, "the mean ± sd")
    labels = [{r.model for r in run.rows} for run in runs]
    if len(runs) > 1 and not set.intersection(*labels):
        listed = "; ".join(f"{run.path}: {', '.join(sorted(models))}" for run, models in zip(runs, labels, strict=True))
        raise DataError(f"the runs share no model label ({listed}): a mean over them would be one run's figures per "
                        "cell; compare runs of the same models")
    judges = {r.judge for run in runs for r in run.rows if r.metric == "hs"}
    if len(judges) > 1:
        raise DataError(f"the runs' HS rows come from different judges ({', '.join(sorted(map(str, judges)))}); "
                        f"their mean would mix two scales: compare runs of one judge")
    _check_same_evaluation(runs)
    return runs


def _whole_stream_as_asked(r: ResultRow) -> ResultRow:
    """An attack that asked for more examples than its run's attack stream held trained on all of them, and its cell
    key names how many (``-n168-``): runs of other data seeds, whose streams hold other counts, ran the same attack.
    Their cells line up as one column, keyed and sized by the count asked for (``-nall1000-``)."""
    asked, got = r.attack.get("samples_requested"), r.attack.get("samples")
    if r.cell == "pre" or not isinstance(asked, int) or not isinstance(got, int) or got >= asked:
        return r
    return dataclasses.replace(r, cell=re.sub(rf"-n{got}(?=-)", f"-nall{asked}", r.cell, count=1),
                               attack={**r.attack, "samples": asked})


def _check_same_evaluation(runs: list[Run]) -> None:
    """Each model's pre-attack rows must come from one evaluation setup in every run (the results files' settings
    records; the sampling seed may differ): a mean over a quick and a full preset would mix 32 and 100 HS prompts
    and two sets of ZS tasks. Rows from before settings records are not checked."""
    first: dict[str, tuple[dict, Path]] = {}
    for run in runs:
        store = ResultStore(run.path)
        for model, digest in sorted({(r.model, r.settings) for r in run.rows if r.cell == "pre" and r.settings}):
            record = store.settings_record(digest) or {}
            ev = record.get("eval")
            if not isinstance(ev, dict):
                continue
            # the fallback prompt format's version, where the cell used it (absent otherwise and before versions)
            ev = {**{k: v for k, v in ev.items() if k != "seed"}, "prompt_format": record.get("prompt_format")}
            seen, where = first.setdefault(model, (ev, run.path))
            if ev != seen:
                changed = [k for k in sorted(set(seen) | set(ev)) if seen.get(k) != ev.get(k)]
                raise DataError(f"'{model}' in {run.path} was evaluated with other settings than in {where} "
                                f"({', '.join(changed[:6])}{' …' if len(changed) > 6 else ''} differ): its numbers "
                                "are on another scale. Compare runs of one setup (same preset and eval options), "
                                "varying only the seeds")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], digits: int, runs: int, diverged: int = 0) -> str:
    """mean ± sd of the finite values; an infinite one (a perplexity that overflowed: a broken model) is counted
    beside it, not averaged; ``diverged``: how many of the runs' attacks on this cell diverged (their values are
    not among ``values``)."""
    values = [v for v in values if not math.isnan(v)]
    finite = [v for v in values if math.isfinite(v)]
    notes = [f"inf in {len(values) - len(finite)}"] if len(finite) < len(values) else []
    if diverged:
        notes.append(f"diverged in {diverged}")
    if finite:
        m, s = mean_sd(finite)
        text = f"{m:.{digits}f} ± {s:.{digits}f}"
        if len(finite) != runs:
            notes.insert(0, f"n={len(finite)}")
    elif values:
        text = "inf"
    else:
        text = "–"
    return f"{text} ({', '.join(notes)})" if notes else text


def across_runs_tables(runs: list[Run]) -> dict[str, list[list[str]]]:
    """Per metric, model × cell: mean ± sd over the runs that have it (``n=`` where some lack it); then the bar's
    criteria with each run's verdict."""
    from seamlm.report import _cells, column_header

    n = len(runs)
    rows = [r for run in runs for r in run.rows]
    cells = _cells(rows)
    models = list(dict.fromkeys(r.model for r in rows))
    header = column_header(cells)
    # a diverged attack's numbers measure NaN (or last finite) weights — an empty answer scores HS 0 — so they are
    # counted beside the mean, never in it (as the error bars leave them out)
    per_run = [{(r.model, r.cell, r.metric): r.value for r in run.rows if r.attack.get("status") != "diverged"}
               for run in runs]
    # how many runs' attacks on each (model, cell) diverged
    diverged = Counter(mc for run in runs
                       for mc in {(r.model, r.cell) for r in run.rows if r.attack.get("status") == "diverged"})
    tables: dict[str, list[list[str]]] = {}
    for metric, title, digits in METRICS:
        if not any(r.metric == metric for r in rows):
            continue
        body = [[m] + [_fmt([v[(m, c, metric)] for v in per_run if (m, c, metric) in v], digits, n, diverged[(m, c)])
                       for c, _ in cells]
                for m in models]
        tables[f"{title}: mean ± sd over {n} runs"] = [header] + body
    if {"aligned", "seam"} <= set(models):
        verdicts = [check_bar(run.rows, evaluations=ResultStore(run.path).label_evaluations(run.rows)) for run in runs]
        mark = {True: "yes", False: "no", None: "–"}
        criteria = list(dict.fromkeys(c.criterion for checks in verdicts for c in checks))
        table = [["criterion"] + [f"run {i + 1}" for i in range(n)] + ["met in"]]
        for crit in criteria:
            got = [next((c.passed for c in checks if c.criterion == crit), None) for checks in verdicts]
            table.append([crit] + [mark[g] for g in got] + [f"{sum(g is True for g in got)} of {n}"])
        tables["Does SEAM clear the bar? Run by run (criteria: seamlm/verdict.py)"] = table
    return tables


def error_bar_lines(rows: list[ResultRow], metric: str) -> dict[str, dict[tuple[bool, str], dict[float, list[float]]]]:
    """model -> (LoRA, the attack settings besides the lr that differ) -> lr -> the runs' values of ``metric``.
    One line per setting, as in the single-run report: a mean over cells of different attacks would mix the spread
    across settings into the spread across runs. Diverged attacks are left out (their numbers measure NaN
    weights; the tables count them), and so are non-finite values."""
    from seamlm.report import plot_lines

    trained = [r for r in rows if r.cell != "pre" and isinstance(r.attack.get("lr"), (int, float))
               and r.attack.get("status") != "diverged" and math.isfinite(r.value)]
    line_of = plot_lines(trained)
    out: dict[str, dict[tuple[bool, str], dict[float, list[float]]]] = {}
    for r in trained:
        if r.metric == metric:
            out.setdefault(r.model, {}).setdefault(line_of(r), {}).setdefault(r.attack["lr"], []).append(r.value)
    return out


def _error_bar_plots(runs: list[Run], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seamlm.report import _save

    rows = [r for run in runs for r in run.rows]
    models = list(dict.fromkeys(r.model for r in rows))
    made = []
    for metric, ylabel, fname in (("hs", "HS (%)", "hs_vs_lr.png"), ("zs_mean", "ZS mean accuracy (%)", "zs_vs_lr.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        per_model = error_bar_lines(rows, metric)
        for i, m in enumerate(models):
            lines = per_model.get(m, {})
            for j, ((lora, what), by_lr) in enumerate(sorted(lines.items())):
                lrs = sorted(by_lr)
                stats = [mean_sd(by_lr[x]) for x in lrs]
                ax.errorbar(lrs, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="s--" if lora else "o-",
                            color=f"C{i}", alpha=1.0 - 0.5 * j / len(lines), capsize=3,
                            label=f"{m} ({'LoRA ' if lora else ''}attacked{': ' + what if what else ''})")
            pre = [r.value for r in rows if r.model == m and r.metric == metric and r.cell == "pre"
                   and math.isfinite(r.value)]
            if pre:
                mu, sd = mean_sd(pre)
                ax.axhline(mu, color=f"C{i}", linestyle="--", alpha=0.6, label=f"{m} (pre-attack)")
                ax.axhspan(mu - sd, mu + sd, color=f"C{i}", alpha=0.1)
        ax.set_xscale("log")
        ax.set_xlabel("attack learning rate")
        ax.set_ylabel(f"{ylabel}, mean ± sd over {len(runs)} runs")
        if not ax.get_legend_handles_labels()[0]:  # no row of this metric
            plt.close(fig)
            continue
        ax.legend(fontsize=7)
        made.append(_save(fig, out / fname))
    return made


def write_across_runs_report(paths: list[str | Path], out_dir: str | Path) -> Path:
    """``report.md``/``report.html``, error-bar plots and ``results.csv`` (every run's rows, with a ``run`` column)
    for several runs; returns the Markdown path."""
    from seamlm.report import write_documents

    runs = load_runs(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results_csv(out / "results.csv", [r for run in runs for r in run.rows],
                      [str(run.path) for run in runs for _ in run.rows])
    tables = across_runs_tables(runs)
    plots = _error_bar_plots(runs, out)
    listing = [f"run {i + 1}: `{run.path}` (data manifest "
               + ", ".join(sorted({r.data_manifest or "–" for r in run.rows})) + ")" for i, run in enumerate(runs)]
    return write_documents(out, f"seamlm report across {len(runs)} runs", listing, tables, plots,
                           sorted({json.dumps(r.versions, sort_keys=True) for run in runs for r in run.rows}))
