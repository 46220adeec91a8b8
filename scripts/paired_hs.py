"""HS of two models on the same prompts, paired prompt by prompt: per attack cell, B − A ± its standard error.

    python scripts/paired_hs.py runs/demo-v2/seed-0 runs/demo-v2/seed-1 runs/demo-v2/seed-2   # aligned vs seam
    python scripts/paired_hs.py RUN... --a aligned --b seam --cells pre,attacks

Reads each cell's saved answers and judge scores (``samples/<model>/pre.jsonl``,
``attacks/<model>/<cell>/samples.jsonl``; a demo run on ``--baseline_from`` finds model A's there), matched by
prompt. The last row pools the cells as if independent (the attacks on one model are not quite).
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


def _scores(run: Path, model: str, cell: str) -> dict[str, float] | None:
    base = run / "demo_config.json"
    roots = [run]
    if base.is_file() and json.loads(base.read_text()).get("baseline_from"):
        roots.append(Path(json.loads(base.read_text())["baseline_from"]))
    for root in roots:
        f = samples_file(root, model, cell)
        if f.is_file():
            return {r["prompt"]: r["p_harmful"] for r in map(json.loads, f.read_text().splitlines()) if r}
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--a", default="aligned")
    p.add_argument("--b", default="seam")
    p.add_argument("--cells", default="pre,attacks", help="pre, attacks, or both (comma-separated)")
    args = p.parse_args()
    print(f"| run | cell | prompts | HS {args.a} | HS {args.b} | {args.b} − {args.a} ± se | t |")
    print("|---|---|---|---|---|---|---|")
    pooled = []
    for run in args.runs:
        cells = (["pre"] if "pre" in args.cells else []) + (
            sorted(d.name for d in (run / "attacks" / args.b).glob("*") if d.is_dir()) if "attacks" in args.cells else [])
        for cell in cells:
            a, b = _scores(run, args.a, cell), _scores(run, args.b, cell)
            if a is None or b is None or a.keys() != b.keys():
                print(f"| {run} | {cell} | – | – | – | not paired (answers missing or other prompts) | – |")
                continue
            keys = sorted(a)
            xa, xb = [100 * a[k] for k in keys], [100 * b[k] for k in keys]
            diff, se = paired_difference(xa, xb)
            pooled.append((diff, se))
            print(f"| {run} | {cell} | {len(keys)} | {sum(xa) / len(xa):.1f} | {sum(xb) / len(xb):.1f} | "
                  f"{diff:+.1f} ± {se:.1f} | {diff / se if se else math.nan:+.2f} |")
    if len(pooled) > 1:
        mean = sum(d for d, _ in pooled) / len(pooled)
        se = math.sqrt(sum(s * s for _, s in pooled)) / len(pooled)
        print(f"| all | {len(pooled)} cells | | | | {mean:+.1f} ± {se:.1f} | {mean / se if se else math.nan:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
