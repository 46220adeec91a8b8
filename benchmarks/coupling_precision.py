"""Accuracy and cost of the Hessian-free estimate of ∇cos(g_a, g_b) by matmul precision and ε.

The exact gradient comes from double back-propagation in float64 on the same random llama and batches; the
estimate runs in float32 at IEEE precision or with TF32 (CUDA only), for each ε. The rounding error of a forward
difference grows like u/ε (u: unit round-off, 2^-24 for float32, 2^-11 for TF32) while the method's own error
shrinks like ε (like ε² with central differences, ``fd_scheme: central``), so TF32 needs a larger ε; this prints
where each precision's and scheme's error is smallest.

    python benchmarks/coupling_precision.py                          # CPU, IEEE only (seconds)
    python benchmarks/coupling_precision.py --device cuda --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_tokenizer  # noqa: E402
from tests.test_coupling import estimate, exact_cos_grad  # noqa: E402

from seamlm.data import Formatter, collate, load_examples  # noqa: E402
from seamlm.defense.coupling import float32_matmul  # noqa: E402

DATA = ROOT / "examples" / "data"


def _model(vocab: int, hidden: int, layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), tie_word_embeddings=True, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(device=device, dtype=torch.float64).eval()


def timed_estimate(model, bh, bb, eps: float, precision: str, scheme: str = "forward") -> tuple[torch.Tensor, float]:
    """The estimate as the trainer computes it (g_a, g_b and the recomputations under one precision) and its
    wall time."""
    cuda = bh["input_ids"].is_cuda
    with float32_matmul(precision):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = estimate(model, list(model.parameters()), bh, bb, eps, precision, scheme)
        if cuda:
            torch.cuda.synchronize()
    return out.double(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 3e-2, 1e-1])
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    precisions = ["ieee", "tf32"] if args.device.startswith("cuda") else ["ieee"]

    tok = make_tokenizer()
    fmt = Formatter(tok, args.max_length)
    bh, bb = (collate([fmt(e) for e in load_examples(DATA / f"{name}.jsonl")[: args.batch_size]], tok.pad_token_id,
                      device=args.device) for name in ("harmful", "benign"))
    m64 = _model(len(tok), args.hidden, args.layers, args.device)
    ref = exact_cos_grad(m64, list(m64.parameters()), bh, bb)
    m32 = m64.float()  # same weights, rounded to float32
    rows = []
    runs = [(p, s) for p in precisions for s in ("forward", "central")]
    for precision in precisions:  # untimed: first-call set-up (kernels, allocator) is no part of any row's seconds
        timed_estimate(m32, bh, bb, args.eps[0], precision, "forward")
    for precision, scheme in runs:
        for eps in args.eps:
            est, seconds = timed_estimate(m32, bh, bb, eps, precision, scheme)
            rows.append({"precision": precision, "scheme": scheme, "eps": eps,
                         "relative_error": ((est - ref).norm() / ref.norm()).item(), "seconds": seconds})
    n = sum(p.numel() for p in m32.parameters())
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\nrandom llama hidden={args.hidden} layers={args.layers} ({n / 1e6:.1f} M params), batch {args.batch_size}, "
          f"device={where}; error = ‖estimate − exact‖ / ‖exact‖\n")
    print("| precision | fd_scheme | " + " | ".join(f"ε={e:g}" for e in args.eps) + " |")
    print("|---|---|" + "---|" * len(args.eps))
    for precision, scheme in runs:
        errs = [r["relative_error"] for r in rows if (r["precision"], r["scheme"]) == (precision, scheme)]
        print(f"| {precision} | {scheme} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    print("\nseconds per estimate (g_a, g_b and the perturbed recomputations; central: two more)\n")
    print("| precision | fd_scheme | median seconds |")
    print("|---|---|---|")
    for precision, scheme in runs:
        secs = sorted(r["seconds"] for r in rows if (r["precision"], r["scheme"]) == (precision, scheme))
        print(f"| {precision} | {scheme} | {secs[len(secs) // 2]:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
