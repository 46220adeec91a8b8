"""Cost of one SEAM step against one plain SFT step on the same model and batch size.

Each configuration runs in its own process so that its peak memory is its own. Memory is reported as the peak
memory above the loaded model (resident memory on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), in units of
the parameter memory (numel × 4 bytes: the fp32 weights, which are the master weights under bf16 autocast).

    python benchmarks/step_cost.py                      # SmolLM2-135M, batch 4 x 128 tokens (≈ 5 min on 2 cores)
    python benchmarks/step_cost.py --model tiny --repeats 5   # a tiny random llama, seconds
    python benchmarks/step_cost.py --device cuda --model random:smollm2-1.7b --batch-size 8   # GPU, bf16 autocast

``random:ARCH`` builds a randomly initialised model of a known architecture (no weights needed: cost does not
depend on the values) with a byte-level tokenizer; ARCH is one of ``RANDOM_ARCHS``. On CUDA the SFT step and SEAM
compute in bf16 autocast with fp32 weights (SEAM's coupling gradients stay fp32, see the spec's precision trap).

Modes: ``sft`` (HF loss, AdamW), ``seam-final_layer`` and ``seam-logit_lens`` (SEAMTrainer),
``seam-final_layer+lookahead`` (the look-ahead coupling, one simulated attacker update: 2 passes more),
``seam-final_layer+lookahead_both`` (L_sd half at θ, half at θ': ``lookahead_weight`` 0.5, 2 passes more again), and
``reference-logit_lens`` (the reference code's six-pass structure with full-sequence logits and lens, rebuilt
from the same primitives) to show what sharing the H forward and answer-only heads save.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
MODES = ["sft", "seam-final_layer", "seam-final_layer+lookahead", "seam-final_layer+lookahead_both",
         "seam-final_layer+central", "seam-logit_lens", "reference-logit_lens"]
#: Llama-family shapes for ``random:ARCH`` (hidden, intermediate, layers, heads, kv heads, vocab).
RANDOM_ARCHS = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "smollm2-360m": (960, 2560, 32, 15, 5, 49152),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, 49152),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size every 5 ms; ``peak`` is the maximum seen since start()."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PeakCuda:
    """Peak CUDA memory allocated by tensors between enter and exit (same interface as :class:`PeakRSS`)."""

    def __enter__(self) -> PeakCuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.peak = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def _load(model_name: str, device: str):
    import torch

    from seamlm import load_model

    if model_name != "tiny" and not model_name.startswith("random:"):
        return load_model(model_name, dtype="float32", device=device)
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    if model_name == "tiny":
        return make_model(len(tok), layers=4, hidden=64).to(device), tok
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = model_name.split(":", 1)[1]
    if arch not in RANDOM_ARCHS:
        sys.exit(f"unknown architecture {arch!r}; known: {', '.join(RANDOM_ARCHS)}")
    hidden, inter, layers, heads, kv, vocab = RANDOM_ARCHS[arch]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(cfg), tok


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_steps(step, args: argparse.Namespace) -> list[float]:
    """Seconds of each of ``args.repeats`` calls of ``step`` after ``args.warmup`` untimed ones (CUDA: synchronised)."""
    times = []
    for i in range(args.warmup + args.repeats):
        _sync(args.device)
        t0 = time.perf_counter()
        step()
        _sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def reference_step(model, params, batches, opt, eps: float = 1e-3, beta: float = 0.1) -> None:
    """The reference code's pass structure, for comparison: six separate passes, full-sequence logits, and the
    logit lens over every position (HF loss with -100 labels)."""
    import torch
    import torch.nn.functional as F

    from seamlm.defense.coupling import FlatParams, hessian_free_cos_grad

    flat = FlatParams(params)
    h, r, b = batches

    def ce(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    def grad_of(batch):
        def fn(buf):
            with flat.grad_sink(buf):
                model(**batch).loss.backward()
        return fn

    total, g_a, g_b = flat.zeros(), flat.zeros(), flat.zeros()
    out = model(**h, output_hidden_states=True)  # pass 1: L_ul through the lens at every position
    terms = [ce(model.lm_head(model.model.norm(hs)), h["labels"]) for hs in out.hidden_states[:-1]]
    terms.append(ce(out.logits, h["labels"]))
    with flat.grad_sink(total):
        (-torch.log(sum(terms) / len(terms) + 1)).backward()
        model(**r).loss.backward()  # pass 2: L_up
    grad_of(h)(g_a)  # pass 3: g_a (a second forward of H)
    grad_of(b)(g_b)  # pass 4: g_b
    hessian_free_cos_grad(flat, g_a, g_b, grad_of(h), grad_of(b), eps, total, scale=beta)  # passes 5, 6
    for p, v in zip(params, flat.views(total), strict=True):
        p.grad = v
    opt.step()
    opt.zero_grad(set_to_none=True)


def worker(mode: str, args: argparse.Namespace) -> dict:
    import torch

    from seamlm import DefenseConfig, SEAMTrainer
    from seamlm.data import Formatter, collate, load_examples

    torch.manual_seed(0)
    dev = args.device
    model, tok = _load(args.model, dev)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    harmful = load_examples(DATA / "harmful.jsonl")
    mixed = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda"))
    with PeakCuda() if dev.startswith("cuda") else PeakRSS() as mem:
        base = mem.peak
        if mode == "sft":
            model.train()
            fmt = Formatter(tok, args.max_length)
            batch = collate([fmt(e) for e in harmful[: args.batch_size]], tok.pad_token_id, device=dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step() -> None:
                with mixed:
                    loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            times = _time_steps(step, args)
        elif mode.startswith("reference"):
            model.eval()
            fmt = Formatter(tok, args.max_length)
            streams = [harmful, load_examples(DATA / "refusal.jsonl"), load_examples(DATA / "benign.jsonl")]
            batches = [collate([fmt(e) for e in s[: args.batch_size]], tok.pad_token_id, device=dev) for s in streams]
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5)
            times = _time_steps(lambda: reference_step(model, params, batches, opt), args)
        else:
            variant, _, option = mode.removeprefix("seam-").partition("+")
            cfg = DefenseConfig(
                steps=args.warmup + args.repeats, batch_size=args.batch_size, max_length=args.max_length,
                unlearn_loss=variant, beta=0.1, output_dir="/tmp/seamlm-bench", checkpoint_every=0,
                coupling_precision=args.coupling_precision, lookahead_lr=1e-4 if option.startswith("lookahead") else 0.0,
                lookahead_weight=0.5 if option == "lookahead_both" else 1.0,
                fd_scheme="central" if option == "central" else "forward",
            )
            tr = SEAMTrainer(model, tok, cfg, harmful=harmful, refusal=DATA / "refusal.jsonl", benign=DATA / "benign.jsonl")

            def step() -> None:
                row = tr.compute_update(0)  # step 0 every time: the same batches
                tr._apply_update(row["grad_norm"])

            times = _time_steps(step, args)
    return {
        "mode": mode, "step_s": statistics.median(times), "n_params": n_params,
        "peak_over_model_bytes": mem.peak - base, "param_bytes": n_params * 4, "threads": torch.get_num_threads(),
    }


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="alias/path, 'tiny' for a random tiny llama, or random:ARCH (" + ", ".join(RANDOM_ARCHS) + ")")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast, fp32 weights)")
    ap.add_argument("--coupling-precision", default="ieee", choices=["ieee", "tf32"],
                    help="DefenseConfig.coupling_precision of the SEAM modes (tf32: CUDA only)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES,
                    help="reference-logit_lens is the CPU comparison: on CUDA it runs in plain float32 (no autocast, "
                         "no --coupling-precision), so it does not compare with the other modes there")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return

    results = {}
    env = dict(os.environ, TQDM_DISABLE="1")
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--device", args.device,
               "--coupling-precision", args.coupling_precision,
               "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"worker {mode} failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(line[len("RESULT "):])
        print(f"  {mode}: {results[mode]['step_s']:.2f} s/step", file=sys.stderr, flush=True)

    sft = results.get("sft", {}).get("step_s")
    threads = sorted({r.get("threads") for r in results.values()})  # what torch used in the workers
    where = (f"device={_device_name(args.device)}" if args.device != "cpu"
             else f"torch threads={'/'.join(map(str, threads))}")
    print(f"\nmodel={args.model}  batch={args.batch_size} x ≤{args.max_length} tokens  {where}  "
          f"coupling={args.coupling_precision}  median of {args.repeats} steps\n")
    print("| step | time per step (s) | × SFT step | peak memory above the model (× parameter memory) |")
    print("|---|---|---|---|")
    for mode, r in results.items():
        ratio = f"{r['step_s'] / sft:.1f}" if sft else "–"
        print(f"| {mode} | {r['step_s']:.2f} | {ratio} | {r['peak_over_model_bytes'] / r['param_bytes']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
