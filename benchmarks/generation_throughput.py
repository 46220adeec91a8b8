"""Generation throughput for HS: batched greedy generation (left padding, KV cache) vs one prompt at a time.

    python benchmarks/generation_throughput.py                 # SmolLM2-135M, 32 prompts x 50 new tokens
    python benchmarks/generation_throughput.py --model tiny    # a tiny random llama, seconds
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
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    args = ap.parse_args()

    import torch

    from seamlm.data.bundles import build_bundle
    from seamlm.generation import generate_answers

    if args.model == "tiny":
        sys.path.insert(0, str(ROOT))
        from tests.conftest import make_model, make_tokenizer

        tok = make_tokenizer()
        model = make_model(len(tok), layers=4, hidden=64)
    else:
        from seamlm import load_model

        model, tok = load_model(args.model)
    prompts = [e.prompt for e in build_bundle("offline-default").streams["eval_harmful"][: args.prompts]]
    torch.manual_seed(0)
    generate_answers(model, tok, prompts[:2], 4, 2)  # warm-up
    results = []
    for bs in args.batch_sizes:
        t0 = time.perf_counter()
        answers = generate_answers(model, tok, prompts, args.max_new_tokens, bs)
        dt = time.perf_counter() - t0
        # generated tokens, up to EOS (what the judge reads)
        n_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
        results.append((bs, dt, n_tokens))
    base = results[0][2] / results[0][1]
    print(f"\nmodel={args.model}  {args.prompts} prompts x ≤{args.max_new_tokens} new tokens, greedy, "
          f"torch threads={torch.get_num_threads()}\n")
    print("| batch size | seconds | generated tokens/s | × one prompt at a time |")
    print("|---|---|---|---|")
    for bs, dt, n in results:
        print(f"| {bs} | {dt:.1f} | {n / dt:.1f} | {(n / dt) / base:.1f} |")


if __name__ == "__main__":
    main()
