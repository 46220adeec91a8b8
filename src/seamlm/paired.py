"""Two models' HS on the same prompts, paired prompt by prompt (``seamlm paired``).

Two separate standard errors count the prompts' own spread twice (some prompts draw harmful answers from every
model); the paired difference b − a cancels it. Read from each cell's saved answers and judge scores
(``samples/<model>/pre.jsonl``, ``attacks/<model>/<cell>/samples.jsonl``), matched by prompt.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from seamlm.attack import samples_file
from seamlm.errors import DataError
from seamlm.evaluate.stats import paired_difference
from seamlm.jsonl import read_records
from seamlm.rescore import BASELINE_MODELS, check_not_mid_rescore, demo_baseline
from seamlm.results import ResultRow, ResultStore
from seamlm.runinfo import path_part, refuse_copied_runs, refuse_repeated_run, seed_runs_hint


@dataclass(frozen=True)
class PairedRow:
    run: str
    cell: str
    """A cell key, ``attack cells together (N)`` for a run's attacks combined, or ``attack cells`` (``all runs``)."""
    prompts: int
    hs_a: float | None
    hs_b: float | None
    diff: float | None
    """Mean of HS_b − HS_a over the prompts (points); None when the cell could not be paired (``note`` says why)."""
    se: float | None
    note: str = ""


Scores = dict[tuple[str, int], float]
"""HS of each answer (points) by (prompt, occurrence): a prompt asked twice pairs its first answers, then its second."""


def _results(root: Path) -> list[ResultRow]:
    f = root / "results.jsonl"
    return ResultStore(f).rows() if f.is_file() else []


def _hs_rows(rows: list[ResultRow]) -> dict[tuple[str, str], ResultRow]:
    return {(r.model, r.cell): r for r in rows if r.metric == "hs"}


def _roots(run: Path, base: Path | None, model: str) -> list[Path]:
    # a demo on --baseline_from keeps the raw and aligned models' answers there; its other models are its own
    return [run, base] if base is not None and model in BASELINE_MODELS else [run]


def _scores(roots: list[Path], model: str, cell: str,
            hs_rows: dict[Path, dict[tuple[str, str], ResultRow]]) -> tuple[Scores, str | None, bool] | None:
    """The cell's per-answer scores, the judge that gave them and whether the cell's attack diverged: from the HS
    row in the results file of the folder the answers were read from (a demo's baseline holds its own)."""
    for root in roots:
        f = samples_file(root, model, cell)
        if f.is_file():
            seen: Counter[str] = Counter()
            scores: Scores = {}
            for _, r in read_records(f):
                scores[(r["prompt"], seen[r["prompt"]])] = 100 * r["p_harmful"]
                seen[r["prompt"]] += 1
            if root not in hs_rows:  # (a demo's baseline, read when first met)
                hs_rows[root] = _hs_rows(_results(root))
            row = hs_rows[root].get((model, cell))
            return scores, row and row.judge, bool(row) and row.attack.get("status") == "diverged"
    return None


def _attack_cells(run: Path, base: Path | None, models: tuple[str, str]) -> list[str]:
    return sorted({d.name for m in models for root in _roots(run, base, m)
                   for d in (root / "attacks" / path_part(m)).glob("*") if d.is_dir()})


def paired_hs(runs: list[str | Path], a: str = "aligned", b: str = "seam", pre: bool = True,
              attacks: bool = True) -> list[PairedRow]:
    """Per run and cell, HS_b − HS_a ± its standard error over the prompts; per run, its attack cells together
    (each prompt's difference averaged over the cells, over the prompts all of them hold); last, the runs together
    (independent data seeds: the mean of their means, ± √(Σ se²) / runs). Answers scored by different judges are
    never paired, nor runs judged differently pooled."""
    out: list[PairedRow] = []
    per_run: dict[str, tuple[float, float, int, str | None]] = {}  # run → (difference, se, prompts, judge)
    pooled_cells: dict[str, list[str]] = {}  # run → its attack cells in its "together" row
    # one spelling: "runs/s0/", "runs/s0" and "runs/s0/results.jsonl" are one run
    runs = [Path(r).parent if Path(r).name == "results.jsonl" and Path(r).is_file() else Path(r) for r in runs]
    refuse_repeated_run(runs, "the pooled difference")
    results = {r: _results(r) for r in runs}
    refuse_copied_runs(results, "the pooled difference")
    hs_rows = {r: _hs_rows(rows) for r, rows in results.items()}  # each results file read once
    for run in runs:
        if not (run / "results.jsonl").is_file():
            raise DataError(f"{run} is no run folder (no results.jsonl){seed_runs_hint(run, 'paired')}: give the "
                            "--out of a demo, eval or attack run")
        base = demo_baseline(run)
        for folder in (run, base) if base else (run,):
            check_not_mid_rescore(folder)
        cells = (["pre"] if pre else []) + (_attack_cells(run, base, (a, b)) if attacks else [])
        diffs: list[dict[tuple[str, int], float]] = []  # per paired attack cell: each answer's difference
        judges: set[str | None] = set()
        for cell in cells:
            ra, rb = _scores(_roots(run, base, a), a, cell, hs_rows), _scores(_roots(run, base, b), b, cell, hs_rows)
            if not ra or not rb or not ra[0] or ra[0].keys() != rb[0].keys():
                why = (f"no answers of {a if not ra else b}" if not ra or not rb else
                       "no answers" if not ra[0] else "answers to other prompts")
                out.append(PairedRow(str(run), cell, 0, None, None, None, None, why))
                continue
            (sa, ja, da), (sb, jb, db) = ra, rb
            unfinished = [m for m, j in ((a, ja), (b, jb)) if j is None]
            if unfinished:  # (answers are saved before the cell's rows: a kill in between leaves them alone)
                out.append(PairedRow(str(run), cell, 0, None, None, None, None, f"unfinished for "
                                     f"{' and '.join(unfinished)}: answers saved, no HS row in results.jsonl (rerun "
                                     "its command to finish the cell)"))
                continue
            if ja != jb:
                out.append(PairedRow(str(run), cell, 0, None, None, None, None, f"judged by {ja} and {jb}: "
                                     "`seamlm rescore` both folders with one judge"))
                continue
            keys = sorted(sa)
            xa, xb = [sa[k] for k in keys], [sb[k] for k in keys]
            diff, se = paired_difference(xa, xb)
            # a diverged attack's answers come from NaN (or last finite) weights: shown, never pooled
            failed = [m for m, d in ((a, da), (b, db)) if d]
            note = f"the attack on {' and '.join(failed)} diverged: not pooled" if failed else ""
            out.append(PairedRow(str(run), cell, len(keys), sum(xa) / len(xa), sum(xb) / len(xb), diff, se, note))
            if cell != "pre" and not failed:
                diffs.append({k: sb[k] - sa[k] for k in keys})
                judges.add(ja)
                pooled_cells.setdefault(str(run), []).append(cell)
        if not diffs:
            continue
        common = sorted(set.intersection(*(set(d) for d in diffs)))
        label = f"attack cells together ({len(diffs)})"
        if not common or len(judges) > 1:
            why = "the cells share no prompt" if not common else f"the cells' judges differ ({sorted(map(str, judges))})"
            out.append(PairedRow(str(run), label, 0, None, None, None, None, why))
            continue
        diff, se = paired_difference([0.0] * len(common), [sum(d[k] for d in diffs) / len(diffs) for k in common])
        per_run[str(run)] = (diff, se, len(common), judges.pop())
        if len(diffs) > 1:
            out.append(PairedRow(str(run), label, len(common), None, None, diff, se,
                                 "" if all(len(d) == len(common) for d in diffs) else "over the prompts all cells hold"))
    if len(runs) > 1 and attacks:
        left_out = [str(r) for r in runs if str(r) not in per_run]
        run_judges = {j for *_, j in per_run.values()}
        label = f"attack cells ({len(per_run)} of {len(runs)} runs)" if left_out else "attack cells"
        if len(run_judges) > 1:
            out.append(PairedRow("all runs", label, 0, None, None, None, None,
                                 f"runs judged differently ({sorted(map(str, run_judges))})"))
        elif len(per_run) > 1:
            vals = list(per_run.values())
            notes = [f"left out (nothing paired): {', '.join(left_out)}"] if left_out else []
            every = sorted({c for r in per_run for c in pooled_cells[r]})
            fewer = [f"{r}: {len(pooled_cells[r])} of {len(every)}" for r in per_run if len(pooled_cells[r]) < len(every)]
            if fewer:  # each run's figure averages the cells it paired: say which runs stand on fewer
                notes.append(f"runs pool different attack cells ({'; '.join(fewer)})")
            note = "; ".join(notes)
            out.append(PairedRow("all runs", label, sum(n for _, _, n, _ in vals), None, None,
                                 sum(d for d, *_ in vals) / len(vals),
                                 math.sqrt(sum(s * s for _, s, *_ in vals)) / len(vals), note))
    if not any(r.diff is not None for r in out):
        raise DataError(f"no cell of {', '.join(map(str, runs))} holds saved answers of both {a} and {b} on the same "
                        "prompts (check --a / --b: the models' labels in results.jsonl)")
    return out


def paired_markdown(rows: list[PairedRow], a: str, b: str) -> str:
    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.1f}"

    lines = [f"| run | cell | prompts | HS {a} | HS {b} | {b} − {a} ± se | t |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.diff is None:
            lines.append(f"| {r.run} | {r.cell} | – | – | – | not paired ({r.note}) | – |")
            continue
        t = f"{r.diff / r.se:+.2f}" if r.se and math.isfinite(r.se) else "–"
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.run} | {r.cell} | {r.prompts or ''} | {num(r.hs_a)} | {num(r.hs_b)} | "
                     f"{r.diff:+.1f} ± {r.se:.1f}{note} | {t} |")
    return "\n".join(lines) + "\n"
