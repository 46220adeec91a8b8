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
    # the base: one prompt at a time when measured, else the first batch size given
    first = next((r for r in results if r[0] == 1), results[0])
    by_tokens = all(n > 0 for _, _, n in results)  # a random tiny model's ids may decode to no text at all

    def speed(dt: float, n: int) -> float:
        return n / dt if by_tokens else args.prompts / dt

    base = speed(first[1], first[2])
    print(f"\nmodel={args.model}  {args.prompts} prompts x ≤{args.max_new_tokens} new tokens, greedy, "
          f"torch threads={torch.get_num_threads()}\n")
    unit = "generated tokens/s" if by_tokens else "prompts/s (the answers decode to no text)"
    print(f"| batch size | seconds | {unit} | × batch size {first[0]} |")
    print("|---|---|---|---|")
    for bs, dt, n in results:
        print(f"| {bs} | {dt:.1f} | {speed(dt, n):.1f} | {speed(dt, n) / base:.1f} |")


if __name__ == "__main__":
    main()
