"""Cost of one training step of each adaptive attack recipe against one plain SFT step, side by side in one run,
on the same model, data and batch size. The ratio is what a sweep over the recipes pays per trial.

    python benchmarks/recipe_step_cost.py                   # SmolLM2-135M, batch 4 x 128 tokens (≈ 4 min on 2 cores)
    python benchmarks/recipe_step_cost.py --model tiny      # a tiny random llama, seconds

Each recipe trains ``--steps`` steps after one warm-up step; the time per step is the median over the steps
(``step_time`` of the fine-tuning log). ``ablation`` is a weight edit: its row is the whole edit's time.
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
    ap.add_argument("--steps", type=int, default=4)
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
    recipes = {"sft": {}, "anchored": {}, "pcgrad": {}, "subspace": {}, "template": {},
               "benign_first": {"benign_steps": args.steps + 1}, "ablation": {}}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # a discarded first run: the allocator and thread pools warm up on it, not on the first measured recipe
        make_recipe("sft").attack(fresh(), tok, data, ft, Path(tmp) / "warm" / "loss.jsonl", "warm-up", DistContext())
        for name, knobs in recipes.items():
            recipe = make_recipe(name, knobs)
            log = Path(tmp) / name / "loss.jsonl"
            t0 = time.perf_counter()
            res = recipe.attack(fresh(), tok, data, ft, log, name, DistContext())
            if recipe.trains:
                # the harmful phase's steps after the first (warm-up); benign_first's benign phase is not counted
                results[name] = statistics.median(r["step_time"] for r in res.logs[1:])
            else:
                results[name] = time.perf_counter() - t0
    base = results["sft"]
    print(f"model {args.model}, batch {args.batch_size} x {args.max_length} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| recipe | seconds per step | × plain SFT step |")
    print("|---|---|---|")
    for name, sec in results.items():
        unit = "s (whole edit)" if name == "ablation" else ""
        print(f"| {name} | {sec:.2f}{unit} | {sec / base:.2f} |")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
