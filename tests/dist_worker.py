"""One SEAM run on a tiny float64 model, for tests/test_distributed.py.

Run under ``torchrun --nproc_per_node N`` (the process group comes up through accelerate, as for a user) or with
plain ``python`` for the single-process reference. Usage: ``dist_worker.py OUT OVERRIDES_JSON [KILL_AT] [--resume]``.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from seamlm.defense import DefenseConfig, SEAMTrainer  # noqa: E402
from seamlm.distributed import full_state_dict  # noqa: E402
from tests.conftest import BENIGN, HARMFUL, REFUSAL, make_model, make_tokenizer  # noqa: E402


def finetune_main(out: Path, overrides: dict) -> int:
    from seamlm.distributed import current_context
    from seamlm.finetune import FinetuneConfig, finetune

    tok = make_tokenizer()
    model = make_model(len(tok), dtype=torch.float64)
    cfg = FinetuneConfig(**{"lr": 1e-3, "batch_size": 5, "max_steps": 3, "max_length": 48, **overrides})
    ctx = current_context()
    res = finetune(model, tok, HARMFUL, cfg, out / "loss.jsonl", ctx=ctx)
    held = [p.to_local() if hasattr(p, "to_local") else p for p in res.model.parameters()]
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({
        "held": sum(t.numel() for t in held), "numel": sum(p.numel() for p in res.model.parameters())}))
    if ctx.is_main:
        torch.save({n: p.detach().clone() for n, p in res.model.named_parameters()}, out / "params.pt")
    return 0


def refusal_sft_main(out: Path, overrides: dict) -> int:
    """The refusal-SFT defence with rank 1 arriving ``_late`` seconds after rank 0 (a slower model load)."""
    import time

    from seamlm.defense import defense_class
    from seamlm.distributed import current_context
    from seamlm.finetune import FinetuneConfig

    ctx = current_context()
    tok = make_tokenizer()
    model = make_model(len(tok), dtype=torch.float64)
    if ctx.rank == 1:
        time.sleep(overrides.pop("_late", 0))
    defense = defense_class("refusal-sft")(FinetuneConfig(lr=1e-3, batch_size=4, max_steps=2, max_length=48))
    defense.run(model, tok, {"refusal": REFUSAL, "benign": BENIGN}, out / "run", ctx=ctx)
    return 0


def main() -> int:
    out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    mode = overrides.pop("_mode", None)
    if mode == "finetune":
        return finetune_main(out, overrides)
    if mode == "refusal_sft":
        return refusal_sft_main(out, overrides)
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "--resume" else 0
    fail = overrides.pop("_fail_rank_save_at", None)  # [rank, step]: that rank's checkpoint write hits a full disk
    if fail is not None and int(os.environ.get("RANK", "0")) == fail[0]:
        import builtins

        import seamlm.checkpoint as checkpoint

        def full_disk(path, *a, **k):  # that rank's file goes to /dev/full, which answers every write with ENOSPC
            full = Path(path).name.startswith("rank-") and f"{fail[1]:07d}" in str(path)
            return builtins.open("/dev/full" if full else path, *a, **k)

        checkpoint.open = full_disk
    tok = make_tokenizer()
    untied = overrides.pop("_meta_untied", False)  # forget tie_weights(): rank 1's model then differs from rank 0's
    if overrides.pop("_meta_init", False) and int(os.environ.get("RANK", "0")) != 0:
        # as load_model_for_rank builds it: only rank 0 has the weights
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = make_model(len(tok), dtype=torch.float64)
        if not untied:
            model.tie_weights()
        assert all(p.is_meta for p in model.parameters())
    else:
        model = make_model(len(tok), dtype=torch.float64)
    cfg = DefenseConfig(**{"steps": 3, "beta": 1.0, "lr": 1e-3, "batch_size": 2, "max_length": 48, "epsilon": 1e-4,
                           "output_dir": str(out / "run"), "checkpoint_every": 0, "seed": 0, **overrides})

    def kill(trainer: SEAMTrainer, row: dict) -> None:
        if trainer.step == kill_at:
            raise SystemExit(17)  # every rank at the same step, like a job killed right after a checkpoint

    trainer = SEAMTrainer(model, tok, cfg, harmful=HARMFUL, refusal=REFUSAL, benign=BENIGN, callbacks=[kill])
    trainer.train(resume="--resume" in sys.argv)
    opt_state = [v.numel() for st in trainer.optimizer.state.values() for v in st.values() if v.dim() > 0]
    local = [p.to_local() if trainer.fsdp else p for p in model.parameters()]
    info = {
        "world": trainer.ctx.world_size, "numel": trainer.flat.total_numel, "optimizer_state_numel": opt_state,
        "buffers": {n: getattr(trainer, n).numel() for n in ("total", "g_a", "g_b", "_scratch", "_backup", "_origin")
                    if getattr(trainer, n) is not None},
        "param_numel_held": sum(t.numel() for t in local),
    }
    (out / f"rank{trainer.ctx.rank}.json").write_text(json.dumps(info))
    weights = full_state_dict(trainer.answer_losses, "model.") if trainer.fsdp else dict(model.named_parameters())
    if trainer.ctx.is_main:
        torch.save({n: weights[n].detach().clone() for n, _ in model.named_parameters()}, out / "params.pt")
    return 0


if __name__ == "__main__":
    from seamlm.distributed import shutdown

    rc = main()
    shutdown()
    sys.exit(rc)
