"""Zero-shot scoring: the choices of a context sharing its forward pass vs one row per choice (lm-eval's way).

Same items, same model, same batch size, side by side in one run; prints seconds, tokens fed to the model, the
speed-up and the largest difference between the two paths' log-likelihoods (float rounding only: acc is the same).

    python benchmarks/zero_shot_throughput.py                 # SmolLM2-135M, 60 items of ARC-Easy, SciQ, HellaSwag, BoolQ
    python benchmarks/zero_shot_throughput.py --model tiny    # a tiny random llama, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "sciq", "hellaswag", "boolq"])
    ap.add_argument("--limit", type=int, default=60, help="items per task (the quick demo's ZS takes 60)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from seamlm.evaluate.zeroshot import choice_loglikelihoods, score_items, task_items

    if args.model == "tiny":
        sys.path.insert(0, str(ROOT))
        from tests.conftest import make_model, make_tokenizer

        tok = make_tokenizer()
        model = make_model(len(tok), layers=4, hidden=64).eval()
    else:
        from seamlm import load_model

        model, tok = load_model(args.model)
    fed: list[int] = []

    def count(module, a, kwargs, out) -> None:  # tokens fed: the new input's mask columns, not the cache's
        fed.append(int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:].sum()))

    model.get_decoder().register_forward_hook(count, with_kwargs=True)
    choice_loglikelihoods(model, tok, task_items(args.tasks[0], 2), args.batch_size)  # warm-up
    print(f"\nmodel={args.model}  {args.limit} items per task, batch size {args.batch_size}, "
          f"torch threads={torch.get_num_threads()}\n")
    print("| task | one row per choice: s (tokens) | shared context: s (tokens) | speed-up | max abs Δ log-lik | acc equal |")
    print("|---|---|---|---|---|---|")
    total = [0.0, 0.0]
    for task in args.tasks:
        items = task_items(task, args.limit)
        runs = []
        for share in (False, True):
            fed.clear()
            t0 = time.perf_counter()
            lls = choice_loglikelihoods(model, tok, items, args.batch_size, desc=task, share_contexts=share)
            runs.append((time.perf_counter() - t0, sum(fed), lls))
        (t_rows, n_rows, ll_rows), (t_shared, n_shared, ll_shared) = runs
        total[0] += t_rows
        total[1] += t_shared
        gap = max(abs(a - b) for x, y in zip(ll_rows, ll_shared, strict=True) for a, b in zip(x, y, strict=True))
        same = score_items(items, ll_rows)["acc"] == score_items(items, ll_shared)["acc"]
        print(f"| {task} | {t_rows:.1f} ({n_rows}) | {t_shared:.1f} ({n_shared}) | {t_rows / t_shared:.2f}× | "
              f"{gap:.1e} | {'yes' if same else 'NO'} |")
    print(f"| all | {total[0]:.1f} | {total[1]:.1f} | {total[0] / total[1]:.2f}× | | |")


if __name__ == "__main__":
    main()
