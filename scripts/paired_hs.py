"""HS of two models on the same prompts, paired prompt by prompt: per cell, B − A ± its standard error.

    python scripts/paired_hs.py runs/demo-v2/seed-0 runs/demo-v2/seed-1 runs/demo-v2/seed-2   # aligned vs seam
    python scripts/paired_hs.py RUN... --a aligned --b seam --cells pre,attacks

Reads each cell's saved answers and judge scores (``samples/<model>/pre.jsonl``,
``attacks/<model>/<cell>/samples.jsonl``; a demo run on ``--baseline_from`` finds model A's there), matched by
prompt. Per run, the attack cells together: each prompt's difference averaged over the run's attack cells, then
the standard error over the prompts (the cells of one run share models and prompts, so they are not independent).
Last, the runs together (independent data seeds): the mean of their means, ± √(Σ se²) / runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from seamlm.attack import samples_file  # noqa: E402
from seamlm.evaluate.metrics import paired_difference  # noqa: E402
from seamlm.rescore import demo_baseline  # noqa: E402
from seamlm.runinfo import path_part  # noqa: E402


def _scores(run: Path, model: str, cell: str) -> dict[str, float] | None:
    for root in (run, demo_baseline(run)):
        f = samples_file(root, model, cell) if root else None
        if f is not None and f.is_file():
            rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            return {r["prompt"]: 100 * r["p_harmful"] for r in rows}
    return None


def _row(*cols: object) -> str:
    return "| " + " | ".join(str(c) for c in cols) + " |"


def _pm(diff: float, se: float) -> tuple[str, str]:
    return f"{diff:+.1f} ± {se:.1f}", f"{diff / se:+.2f}" if se else "–"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--a", default="aligned")
    p.add_argument("--b", default="seam")
    p.add_argument("--cells", default="pre,attacks", help="pre, attacks, or both (comma-separated)")
    args = p.parse_args()
    print(_row("run", "cell", "prompts", f"HS {args.a}", f"HS {args.b}", f"{args.b} − {args.a} ± se", "t"))
    print(_row(*["---"] * 7))
    per_run = []
    for run in args.runs:
        attacks = sorted(d.name for d in (run / "attacks" / path_part(args.b)).glob("*") if d.is_dir())
        cells = (["pre"] if "pre" in args.cells else []) + (attacks if "attacks" in args.cells else [])
        diffs: dict[str, list[float]] = {}  # prompt -> its differences over the run's attack cells
        for cell in cells:
            a, b = _scores(run, args.a, cell), _scores(run, args.b, cell)
            if not a or not b or a.keys() != b.keys():
                print(_row(run, cell, "–", "–", "–", "not paired (answers missing, empty or other prompts)", "–"))
                continue
            keys = sorted(a)
            xa, xb = [a[k] for k in keys], [b[k] for k in keys]
            print(_row(run, cell, len(keys), f"{sum(xa) / len(xa):.1f}", f"{sum(xb) / len(xb):.1f}",
                       *_pm(*paired_difference(xa, xb))))
            if cell != "pre":
                for k in keys:
                    diffs.setdefault(k, []).append(b[k] - a[k])
        if diffs and len(next(iter(diffs.values()))) > 1:
            mean_per_prompt = [sum(d) / len(d) for d in diffs.values()]
            diff, se = paired_difference([0.0] * len(mean_per_prompt), mean_per_prompt)
            per_run.append((diff, se))
            print(_row(run, f"attack cells together ({len(next(iter(diffs.values())))})", len(diffs), "", "",
                       *_pm(diff, se)))
        elif diffs:
            per_run.append(paired_difference([0.0] * len(diffs), [d[0] for d in diffs.values()]))
    if len(per_run) > 1:
        mean = sum(d for d, _ in per_run) / len(per_run)
        se = math.sqrt(sum(s * s for _, s in per_run)) / len(per_run)
        print(_row("all runs", "attack cells", "", "", "", *_pm(mean, se)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
