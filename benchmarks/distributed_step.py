"""One SEAM step on 2 processes (torchrun, gloo on CPU / NCCL on GPUs) against 1 process, same global batch.

    python benchmarks/distributed_step.py                   # SmolLM2-135M, global batch 8 x 128 tokens per stream
    python benchmarks/distributed_step.py --model tiny      # a tiny random llama, seconds

Rows: ``1 process`` (2 micro-batches of 4, accumulated), ``2 processes`` (one micro-batch of 4 each, replicated
flat buffers), ``2 processes, sharded`` (``shard_gradients``, ZeRO-2: each rank holds half of every gradient buffer
and of the AdamW state) and ``2 processes, FSDP`` (``shard_parameters``, FSDP2/ZeRO-3: the weights too). Per-rank
memory is counted from the tensors SEAM keeps between steps (this rank's parameters, the five flat buffers, the
AdamW state, the sharded master copy) in units of the parameter memory, and measured as the peak resident memory
above the loaded model (which every rank loads whole before FSDP shards it, so that figure understates FSDP's
saving: the freed full weights are reused by the allocator). On a 2-core CPU the processes share the same two cores, so the
time ratio shows the communication overhead, not a speed-up; on GPUs each rank brings its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import DATA, PeakRSS, _load  # noqa: E402


def worker(args: argparse.Namespace) -> dict:
    import torch

    from seamlm import DefenseConfig, SEAMTrainer
    from seamlm.data import load_examples

    torch.manual_seed(0)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    model, tok = _load(args.model, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    times = []
    with PeakRSS() as mem:
        base = mem.peak
        cfg = DefenseConfig(steps=args.warmup + args.repeats, batch_size=args.batch_size, max_length=args.max_length,
                            gradient_accumulation_steps=args.global_micro_batches // world, beta=1.0,
                            unlearn_loss="final_layer", output_dir=tempfile.mkdtemp(), checkpoint_every=0,
                            shard_gradients=args.sharding == "gradients",
                            shard_parameters=args.sharding == "parameters")
        tr = SEAMTrainer(model, tok, cfg, harmful=load_examples(DATA / "harmful.jsonl"),
                         refusal=DATA / "refusal.jsonl", benign=DATA / "benign.jsonl")
        def settled() -> None:  # queued CUDA work belongs to the step it came from (a barrier alone does not wait)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            tr.ctx.barrier()

        for i in range(args.warmup + args.repeats):
            settled()
            t0 = time.perf_counter()
            row = tr.compute_update(0)  # step 0 every time: the same global batch
            tr._apply_update(row["grad_norm"])
            settled()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    kept = [tr.total, tr.g_a, tr.g_b, tr._scratch, tr._backup] + ([tr.master] if tr.master is not None else [])
    weights = sum(p.to_local().numel() if tr.fsdp else p.numel() for p in tr.params)
    opt_state = sum(v.numel() for st in tr.optimizer.state.values() for v in st.values() if v.dim() > 0)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return {
        "rank": tr.ctx.rank, "world": tr.ctx.world_size, "step_s": statistics.median(times), "n_params": n_params,
        "buffer_numel": tr.flat.numel, "state_copies": (weights + sum(t.numel() for t in kept) + opt_state) / n_params,
        "peak_over_model_copies": (mem.peak - base) / (n_params * 4),
    }


def _launch(args: argparse.Namespace, procs: int, sharding: str = "none") -> list[dict]:
    script = [__file__, "--worker", "--model", args.model, "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
              "--global-micro-batches", str(args.global_micro_batches), "--sharding", sharding]
    if procs > 1:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(procs), *script]
    else:
        cmd = [sys.executable, *script]
    # every process gets cores / procs threads: the same CPU budget for every row
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // procs)))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    rows = [json.loads(ln[len("RESULT "):]) for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if len(rows) != procs:
        sys.exit(f"{procs}-process run failed:\n{out.stderr[-3000:]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias/path, or 'tiny' for a random tiny llama")
    ap.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch per stream")
    ap.add_argument("--global-micro-batches", type=int, default=2, help="micro-batches per step over all ranks")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sharding", default="none", choices=["none", "gradients", "parameters"], help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        from seamlm.distributed import shutdown

        print("RESULT " + json.dumps(worker(args)), flush=True)
        shutdown()
        return

    runs = {"1 process": _launch(args, 1), "2 processes": _launch(args, 2),
            "2 processes, sharded": _launch(args, 2, "gradients"), "2 processes, FSDP": _launch(args, 2, "parameters")}
    one = runs["1 process"][0]["step_s"]
    print(f"\nmodel={args.model}  global batch {args.global_micro_batches} x {args.batch_size} examples x "
          f"≤{args.max_length} tokens per stream  cores={os.cpu_count()}  median of {args.repeats} steps\n")
    print("| run | time per step (s) | × 1 process | gradient buffer per rank (elements) | "
          "kept state per rank (× parameter memory) | peak above the model (× parameter memory) |")
    print("|---|---|---|---|---|---|")
    for name, rows in runs.items():
        t = max(r["step_s"] for r in rows)
        print(f"| {name} | {t:.2f} | {t / one:.2f} | {rows[0]['buffer_numel']:,} | "
              f"{max(r['state_copies'] for r in rows):.1f} | {max(r['peak_over_model_copies'] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
