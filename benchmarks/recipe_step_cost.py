"""Cost of one training step of each adaptive attack recipe against one plain SFT step, side by side in one run,
on the same model, data and batch size. The ratio is what a sweep over the recipes pays per trial.

    python benchmarks/recipe_step_cost.py                   # SmolLM2-135M, batch 4 x 128 tokens (≈ 4 min on 2 cores)
    python benchmarks/recipe_step_cost.py --model tiny      # a tiny random llama, seconds

Each recipe trains ``--steps`` steps after one warm-up step; the time per step is the median over the steps
(``step_time`` of the fine-tuning log). Plain SFT runs first and again last: the base of the ratios is the median
of both runs' steps, and the two rows show how much the machine drifted over the run (recipes whose step is the
SFT step — template, benign_first's harmful phase — differ from it by that noise alone). ``ablation`` is a weight
edit: its row is the whole edit's time, with no ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model(name: str):
    if name == "tiny":
        from tests.conftest import make_model, make_tokenizer

        tok = make_tokenizer()
        return lambda: make_model(len(tok), layers=4, hidden=64), tok
    from seamlm.models import load_model

    model, tok = load_model(name, dtype="float32")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh():
        model.load_state_dict(state)
        return model

    return fresh, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias/path, or 'tiny'")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()

    from seamlm.data.bundles import build_bundle
    from seamlm.distributed import DistContext
    from seamlm.finetune import FinetuneConfig
    from seamlm.recipes import AttackData, make_recipe

    bundle = build_bundle("offline-default")
    n = args.batch_size * (args.steps + 1)
    data = AttackData(bundle.streams["attack"][:n], bundle.streams["attack_benign"][:n])
    fresh, tok = _model(args.model)
    ft = FinetuneConfig(lr=1e-5, batch_size=args.batch_size, max_length=args.max_length, max_steps=args.steps + 1)
    runs = [("sft", "sft", {}), ("anchored", "anchored", {}), ("pcgrad", "pcgrad", {}), ("subspace", "subspace", {}),
            ("template", "template", {}), ("benign_first", "benign_first", {"benign_steps": args.steps + 1}),
            ("ablation", "ablation", {}), ("sft (again, last)", "sft", {})]
    results, steps = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        # a discarded first run: the allocator and thread pools warm up on it, not on the first measured recipe
        make_recipe("sft").attack(fresh(), tok, data, ft, Path(tmp) / "warm" / "loss.jsonl", "warm-up", DistContext())
        for i, (row, name, knobs) in enumerate(runs):
            recipe = make_recipe(name, knobs)
            log = Path(tmp) / str(i) / "loss.jsonl"
            t0 = time.perf_counter()
            res = recipe.attack(fresh(), tok, data, ft, log, name, DistContext())
            if recipe.trains:
                # the harmful phase's steps after the first (warm-up); benign_first's benign phase is not counted
                steps[row] = [r["step_time"] for r in res.logs[1:]]
                results[row] = statistics.median(steps[row])
            else:
                results[row] = time.perf_counter() - t0
    base = statistics.median(steps["sft"] + steps["sft (again, last)"])
    print(f"model {args.model}, batch {args.batch_size} x {args.max_length} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps; base (plain SFT, both runs) {base:.2f} s")
    print("| recipe | seconds per step | × plain SFT step |")
    print("|---|---|---|")
    for row, sec in results.items():
        if row == "ablation":
            print(f"| {row} | {sec:.2f} s (whole edit) | – |")
        else:
            print(f"| {row} | {sec:.2f} | {sec / base:.1f} |")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
