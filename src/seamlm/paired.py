"""Two models' HS on the same prompts, paired prompt by prompt (``seamlm paired``).

Two separate standard errors count the prompts' own spread twice (some prompts draw harmful answers from every
model); the paired difference b − a cancels it. Read from each cell's saved answers and judge scores
(``samples/<model>/pre.jsonl``, ``attacks/<model>/<cell>/samples.jsonl``), matched by prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from seamlm.attack import samples_file
from seamlm.errors import DataError
from seamlm.evaluate.metrics import paired_difference
from seamlm.jsonl import read_records
from seamlm.rescore import demo_baseline
from seamlm.runinfo import path_part


@dataclass(frozen=True)
class PairedRow:
    run: str
    cell: str
    """A cell key, ``attack cells together (N)`` for a run's attacks combined, or ``all runs``."""
    prompts: int
    hs_a: float | None
    hs_b: float | None
    diff: float | None
    """Mean of HS_b − HS_a over the prompts (points); None when the cell could not be paired."""
    se: float | None


def _scores(roots: list[Path], model: str, cell: str) -> dict[str, float] | None:
    for root in roots:
        f = samples_file(root, model, cell)
        if f.is_file():
            return {r["prompt"]: 100 * r["p_harmful"] for _, r in read_records(f)}
    return None


def paired_hs(runs: list[str | Path], a: str = "aligned", b: str = "seam", pre: bool = True,
              attacks: bool = True) -> list[PairedRow]:
    """Per run and cell, HS_b − HS_a ± its standard error over the prompts; per run, its attack cells together
    (each prompt's difference averaged over them, since the cells share models and prompts); last, the runs
    together (independent data seeds: the mean of their means, ± √(Σ se²) / runs)."""
    out: list[PairedRow] = []
    per_run: list[tuple[float, float, int]] = []  # (difference, its se, prompts) of each run's attack cells
    for run in map(Path, runs):
        if not (run / "results.jsonl").is_file():
            raise DataError(f"{run} is no run folder (no results.jsonl): give the --out of a demo, eval or attack run")
        # a demo on --baseline_from keeps the aligned model's answers there
        roots = [run, *filter(None, [demo_baseline(run)])]
        attack_cells = sorted(d.name for d in (run / "attacks" / path_part(b)).glob("*") if d.is_dir())
        diffs: dict[str, list[float]] = {}
        for cell in (["pre"] if pre else []) + (attack_cells if attacks else []):
            sa, sb = _scores(roots, a, cell), _scores(roots, b, cell)
            if not sa or not sb or sa.keys() != sb.keys():
                out.append(PairedRow(str(run), cell, 0, None, None, None, None))
                continue
            keys = sorted(sa)
            xa, xb = [sa[k] for k in keys], [sb[k] for k in keys]
            diff, se = paired_difference(xa, xb)
            out.append(PairedRow(str(run), cell, len(keys), sum(xa) / len(xa), sum(xb) / len(xb), diff, se))
            if cell != "pre":
                for k in keys:
                    diffs.setdefault(k, []).append(sb[k] - sa[k])
        counts = {len(d) for d in diffs.values()}
        if len(counts) == 1:  # every prompt in every paired attack cell (the cells of one run share their prompts)
            n = counts.pop()
            diff, se = paired_difference([0.0] * len(diffs), [sum(d) / n for d in diffs.values()])
            per_run.append((diff, se, len(diffs)))
            if n > 1:
                out.append(PairedRow(str(run), f"attack cells together ({n})", len(diffs), None, None, diff, se))
    if len(per_run) > 1:
        mean = sum(d for d, _, _ in per_run) / len(per_run)
        out.append(PairedRow("all runs", "attack cells", sum(n for _, _, n in per_run), None, None, mean,
                             math.sqrt(sum(s * s for _, s, _ in per_run)) / len(per_run)))
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
            lines.append(f"| {r.run} | {r.cell} | – | – | – | not paired (answers missing, empty or other prompts) | – |")
            continue
        t = f"{r.diff / r.se:+.2f}" if r.se and math.isfinite(r.se) else "–"
        lines.append(f"| {r.run} | {r.cell} | {r.prompts or ''} | {num(r.hs_a)} | {num(r.hs_b)} | "
                     f"{r.diff:+.1f} ± {r.se:.1f} | {t} |")
    return "\n".join(lines) + "\n"
