"""``SEAMTrainer``: minimise L = L_ul + α·L_up + β·cos(g_a, g_b) with the Hessian-free estimate of ∇L_sd.

One step (5 forward passes; the reference needs 6 plus a separate logit-lens pass):
  1+3. H: one forward gives CE(H) and the logit-lens terms → g_a = ∇CE(H) and ∇L_ul = −∇m / (m + 1)
  2.   R: ∇L_up = ∇CE(R)
  4.   B: g_b = ∇CE(B)
  5,6. g_a at θ + εδ_a on the same H batch, g_b at θ + εδ_b on the same B batch  (coupling.py)
       (``lookahead_lr`` > 0, not in the paper: 3 + lookahead_steps passes replace 5, 6 — g_a for each simulated
       update after the first, then g_a, g_b and 5, 6 at θ' = θ − η·Σ sign(g_a), where those updates land; with
       ``lookahead_weight`` < 1, 5 and 6 are taken at θ as well, weighted 1 − w)
  θ ← AdamW(∇L_ul + α∇L_up + β∇̂L_sd)
The model runs in eval mode (no dropout): the finite differences need the same function at θ and θ + εδ.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from seamlm.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_rank_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from seamlm.data.files import Example
from seamlm.data.format import Formatter, TokenizedExample, answer_token_count, collate
from seamlm.data.sampling import StreamSampler
from seamlm.data.splits import prompt_hash
from seamlm.defense.base import Defense, StreamData, register_defense, stream_examples
from seamlm.defense.config import RESUME_SAFE_KEYS, DefenseConfig
from seamlm.defense.coupling import (
    CouplingStats,
    cosine,
    float32_matmul,
    hessian_free_cos_grad,
    make_flat_params,
)
from seamlm.defense.losses import AnswerLosses, HarmfulForward, unlearn_loss
from seamlm.distributed import (
    DistContext,
    current_context,
    full_state_dict,
    fully_shard_model,
    launched_distributed,
)
from seamlm.errors import CheckpointError, ConfigError, NonFiniteLossError
from seamlm.finetune import warmup_steps
from seamlm.jsonl import read_records, write_records_atomic, write_text_atomic
from seamlm.models import is_saved_model, legacy_identities, save_model
from seamlm.runinfo import environment_info, fingerprint

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
#: a step's micro-batches of one stream on this rank, each with its weight in the global answer-token mean
Weighted = list[tuple[Batch, float]]
#: how a step's CEs combine its micro-batches (recorded in checkpoints; before 2026-11-27: "micro_batch_mean")
CE_WEIGHTING = "answer_tokens"
StepCallback = Callable[["SEAMTrainer", dict[str, Any]], None]
_AUTOCAST = {"bfloat16": torch.bfloat16}


def check_run_folder(out: Path, resume: bool) -> None:
    """Refuse ``out`` when a SEAM run cannot go there: a finished run (``model/``) is neither resumed nor rerun,
    an unfinished one with checkpoints only resumed."""
    finished = is_saved_model(out / "model")
    if resume and finished:  # resuming would redo its last steps from a checkpoint and overwrite model/
        raise CheckpointError(f"{out} holds a finished run (model/): nothing to resume; choose another --out for a "
                              "new run")
    if resume and not finished and latest_checkpoint(out / "checkpoints") is None:
        raise CheckpointError(f"--resume: no checkpoint under {out / 'checkpoints'}; start without --resume")
    if not resume and (finished or latest_checkpoint(out / "checkpoints")):
        what = "a finished run (model/)" if finished else "an unfinished run with checkpoints"
        raise CheckpointError(f"{out} already holds {what}; choose another --out (or delete it) for a new run"
                              + ("" if finished else ", or pass --resume to continue it"))


def refuse_changed_config(config: DefenseConfig, saved: dict[str, Any], path: Path) -> None:
    """A resume with other settings than the checkpoint's (but those that do not change the trajectory) is refused,
    naming each change."""
    changed = {k: v for k, v in config.changed_from(saved).items() if k not in RESUME_SAFE_KEYS}
    if changed:
        diffs = ", ".join(f"{k}: {then!r} -> {now!r}" for k, (then, now) in changed.items())
        raise CheckpointError(f"cannot resume {path}: the config changed ({diffs}); resume with the same settings")


def check_precision_device(config: DefenseConfig, device: torch.device) -> None:
    """Refuse ``coupling_precision=tf32`` off CUDA: TF32 exists on NVIDIA GPUs only."""
    if config.coupling_precision == "tf32" and device.type != "cuda":
        raise ConfigError(f"coupling_precision=tf32 needs a CUDA device (the model runs on {device}); "
                          "TF32 does not exist there: use coupling_precision=ieee")


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def pair_refusals(harmful: list[Example], refusal: list[Example]) -> tuple[list[Example], bool]:
    """R as SEAM draws it, and whether it is paired with H row by row: R itself when it already is; else, when R
    refuses every prompt of H, R's rows in H's order (a prompt H holds k times takes its R rows in turn), so that a
    row one file lost — a blank answer dropped on loading — or another order does not unpair the two streams; else
    R as given, sampled independently."""
    h_keys, r_keys = [prompt_hash(h.prompt) for h in harmful], [prompt_hash(r.prompt) for r in refusal]
    if h_keys == r_keys:  # R row i refuses the prompt of H row i: each step draws the same rows from both
        return refusal, True
    by_prompt: dict[str, list[Example]] = {}
    for key, r in zip(r_keys, refusal, strict=True):
        by_prompt.setdefault(key, []).append(r)
    missing = sum(key not in by_prompt for key in h_keys)
    if missing:
        log.warning("H and R are not row-aligned and R refuses the prompts of %d of H's %d rows only: they are sampled "
                    "independently; give a refusal for every H prompt to pair them", len(harmful) - missing,
                    len(harmful))
        return refusal, False
    seen: dict[str, int] = {}
    paired = []
    for key in h_keys:
        paired.append(by_prompt[key][seen.get(key, 0) % len(by_prompt[key])])
        seen[key] = seen.get(key, 0) + 1
    unused = len(refusal) - sum(min(seen.get(key, 0), len(rows)) for key, rows in by_prompt.items())
    (log.warning if unused else log.info)("R paired with H by prompt (R was in another order or of another length)%s",
                                          f"; {unused} R rows are left out (prompts H does not hold, or holds fewer "
                                          "times)" if unused else "")
    return paired, True


class SEAMTrainer:
    """Harden ``model`` with SEAM on harmful (H), refusal (R) and benign (B) examples.

    ``harmful``/``refusal``/``benign`` are lists of :class:`~seamlm.data.Example` or paths to JSONL/CSV files
    with ``prompt``/``response`` columns. When R holds H's prompts row by row they are index-aligned and each step
    draws the same rows from both; otherwise the two streams are sampled independently.

    Under ``shard_parameters`` the model is FSDP-sharded in place and its forward runs through
    ``trainer.answer_losses`` (the FSDP root): a callback must not call ``trainer.model`` directly.

    A peft (LoRA) model trains its trainable (adapter) parameters only — the objective and the coupling are over
    them — and is saved merged into its base weights, a plain HF directory; ``trainer.model`` is then the merged
    model.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: DefenseConfig,
        harmful: str | Path | list[Example],
        refusal: str | Path | list[Example],
        benign: str | Path | list[Example],
        callbacks: list[StepCallback] | None = None,
        run_info: dict[str, Any] | None = None,
        ctx: DistContext | None = None,
    ):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        first = next(model.parameters())
        # the model's device, except under several processes for a model on the CPU or meta device (rank 0 may hold
        # the real weights on the CPU and the others meta skeletons): there every rank takes the launcher's
        several = (dist.is_available() and dist.is_initialized()) or launched_distributed()
        on_cpu = first.is_meta or first.device.type == "cpu"
        self.ctx = ctx or current_context(None if first.is_meta or (several and on_cpu) else first.device)
        self.callbacks = list(callbacks or [])
        self.run_info = dict(run_info or {})
        self.out = Path(config.output_dir)
        seed_everything(config.seed)
        if self.ctx.distributed and not config.shard_parameters and self.ctx.device != first.device:
            # a replicated model must sit where the collectives run (NCCL cannot reduce CPU buffers)
            if first.is_meta:
                raise ConfigError("the model is on the meta device: only shard_parameters (FSDP) fills such a model "
                                  "from rank 0's weights; load the weights on every rank, or set shard_parameters")
            log.info("moving the model from %s to this rank's device %s", first.device, self.ctx.device)
            model.to(self.ctx.device)

        streams = {"harmful": harmful, "refusal": refusal, "benign": benign}
        examples = {k: stream_examples(v, k) for k, v in streams.items()}
        examples["refusal"], aligned = pair_refusals(examples["harmful"], examples["refusal"])
        self.trained_prompts = sorted({e.prompt for v in examples.values() for e in v})
        answer_only = Formatter(tokenizer, config.max_length, mask_prompt=True, truncate_first=config.truncate_first)
        benign_fmt = Formatter(tokenizer, config.max_length, mask_prompt=config.mask_benign_prompt,
                               truncate_first=config.truncate_first)
        self.data: dict[str, list[TokenizedExample]] = {
            "harmful": answer_only.encode_all(examples["harmful"], "harmful"),
            "refusal": answer_only.encode_all(examples["refusal"], "refusal"),
            "benign": benign_fmt.encode_all(examples["benign"], "benign"),
        }
        self.data_sizes = {k: len(v) for k, v in self.data.items()}
        self.data_fingerprint = fingerprint({k: [e.input_ids for e in v] for k, v in self.data.items()})
        self.samplers = {
            "harmful": StreamSampler(len(self.data["harmful"]), config.seed, "harmful"),
            "refusal": StreamSampler(len(self.data["refusal"]), config.seed, "harmful" if aligned else "refusal"),
            "benign": StreamSampler(len(self.data["benign"]), config.seed, "benign"),
        }

        self.device = next(model.parameters()).device
        self.original_dtype = next(model.parameters()).dtype
        low = [p for p in model.parameters() if p.is_floating_point() and p.dtype not in (torch.float32, torch.float64)]
        if low:
            # fp32 master weights: perturbation and differencing below bf16 resolution would be rounding noise; the
            # frozen ones too, since the coupling passes run in float32 without autocast
            log.warning("%d parameters are %s; keeping float32 master weights", len(low),
                        "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in low})))
            for p in low:
                p.data = p.data.float()
        # (a model about to be FSDP-sharded sits on the CPU or the meta device; it will run on the rank's device)
        runs_on = self.ctx.device if config.shard_parameters and self.ctx.distributed else self.device
        check_precision_device(config, runs_on)
        for option in ("shard_gradients", "shard_parameters"):
            if getattr(config, option) and not self.ctx.distributed:
                log.warning("%s has no effect in a single process: the whole model and full buffers are used", option)
        del low  # under FSDP a reference to an unsharded parameter would keep the whole model alive
        self.fsdp = config.shard_parameters and self.ctx.distributed
        if self.fsdp and _is_peft(model):
            raise ConfigError("shard_parameters (FSDP) with a peft (LoRA) model is not supported: train the adapters "
                              "unsharded (shard_gradients still shards the buffers) or give the full model")
        self.answer_losses = AnswerLosses(model)
        if self.fsdp:  # after the float32 cast: FSDP shards the parameters as they are
            blocks = fully_shard_model(model, self.ctx, root=self.answer_losses)
            log.info("FSDP: parameters sharded over %d ranks in %d blocks + the root", self.ctx.world_size, blocks)
            self.device = next(model.parameters()).device  # FSDP moved a model loaded on the CPU to the rank's device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.flat = make_flat_params(self.params, self.ctx, sharded=config.shard_gradients)
        self.sharded = self.flat.holds_shard
        self.autocast_dtype = self._autocast_dtype()

        # Sharded: each rank updates an fp32 master copy of its own shard and all-gathers the parameters.
        self.master = torch.nn.Parameter(self.flat.read(self.flat.zeros())) if self.sharded else None
        opt_params = [self.master] if self.sharded else self.params
        self.optimizer = torch.optim.AdamW(opt_params, lr=config.lr, weight_decay=config.weight_decay)
        from transformers import get_scheduler

        self.warmup_steps = warmup_steps(config.warmup_ratio, config.steps)  # rounded up, as the HF Trainer does
        self.scheduler = get_scheduler(
            config.lr_scheduler, self.optimizer,
            num_warmup_steps=self.warmup_steps, num_training_steps=config.steps,
        )
        # Persistent flat buffers (each one parameter vector): update direction, g_a, g_b, and two work buffers.
        self.total, self.g_a, self.g_b = self.flat.zeros(), self.flat.zeros(), self.flat.zeros()
        self._scratch, self._backup = self.flat.zeros(), self.flat.zeros()
        self._origin: torch.Tensor | None = None  # θ while the look-ahead moves the parameters (lookahead_lr > 0)
        self.step = 0
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ data
    def _micro_batches(self, stream: str, step: int) -> list[Batch]:
        """This rank's micro-batches of the step's global batch (micro-batch i goes to rank i mod world)."""
        cfg, w = self.config, self.ctx.world_size
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps * w
        idx = self.samplers[stream].indices(step * per_step, per_step)
        rows = [self.data[stream][i] for i in idx]
        pad = self.tokenizer.pad_token_id
        starts = range(self.ctx.rank * cfg.batch_size, per_step, cfg.batch_size * w)
        return [collate(rows[i:i + cfg.batch_size], pad, device=self.device) for i in starts]

    def _token_weighted(self, batches: list[Batch]) -> Weighted:
        """Each micro-batch with its weight in the step's CE: its answer tokens × world size / the global batch's
        (the flat gradients are averaged over ranks), so that k micro-batches on w ranks give the answer-token mean
        over the whole global batch, as one process on it would — not the mean of k·w micro-batch means."""
        counts = [answer_token_count(b) for b in batches]
        total = self.ctx.sum(float(sum(counts)))
        return [(b, n * self.ctx.world_size / total) for b, n in zip(batches, counts, strict=True)]

    def _losses(self, batch: Batch, variant: str) -> HarmfulForward:
        ce_final, *ce_lens = self.answer_losses(batch, variant)
        return HarmfulForward(ce_final, ce_lens)

    def _autocast_dtype(self) -> torch.dtype | None:
        name = self.config.compute_dtype
        if name == "auto":
            name = "bfloat16" if self.device.type == "cuda" else "float32"
        return _AUTOCAST.get(name)

    def _compute_dtype_name(self) -> str:
        return str(self.autocast_dtype or torch.float32).removeprefix("torch.")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _accumulate_ce(self, batches: Weighted, into: torch.Tensor, weight: float = 1.0, mixed: bool = True) -> float:
        """Backward ``weight ·`` the global batch's answer-token mean CE into the flat buffer ``into``; returns that CE.

        ``mixed=False`` computes in float32 whatever ``compute_dtype`` says (the coupling's gradients).
        """
        total = 0.0
        with self.flat.grad_sink(into):
            for b, w in batches:
                with self._autocast() if mixed else contextlib.nullcontext():
                    ce = self._losses(b, "final_layer").ce_final
                (ce * (weight * w)).backward()
                total += ce.item() * w
        return self.ctx.mean(total)

    # ------------------------------------------------------------------ one step
    def compute_update(self, step: int) -> dict[str, Any]:
        """Fill ``self.total`` with ∇L_ul + α∇L_up + β∇̂L_sd for ``step``; return the step's statistics.

        float32 matmuls run at ``coupling_precision`` for the whole step (g_a, g_b and their perturbed
        recomputations must share one precision; TF32 unasked would drown the difference); autocast is unaffected."""
        with float32_matmul(self.config.coupling_precision):
            return self._compute_update(step)

    def _compute_update(self, step: int) -> dict[str, Any]:
        cfg = self.config
        h_batches = self._token_weighted(self._micro_batches("harmful", step))
        r_batches = self._token_weighted(self._micro_batches("refusal", step))
        b_batches = self._token_weighted(self._micro_batches("benign", step))
        self.total.zero_()
        self.g_a.zero_()
        self.g_b.zero_()

        # 1 + 3: one forward of H. In float32, g_a = ∇CE(H) comes from the same forward as L_ul. Under bf16/fp16
        # autocast it cannot: a step of ε·δ is below bf16 resolution, so g_a, g_b and their perturbed versions are
        # all computed in float32 (the spec's precision trap) and only L_ul and L_up use the compute dtype.
        shared = self.autocast_dtype is None
        m, ce_h, n_terms = 0.0, 0.0, 1
        for b, wt in h_batches:
            with self._autocast():
                hf = self._losses(b, cfg.unlearn_loss)
            n_terms = hf.num_terms
            if shared:
                with self.flat.grad_sink(self.g_a):
                    (hf.ce_final * wt).backward(retain_graph=bool(hf.ce_lens))
                if hf.ce_lens:
                    with self.flat.grad_sink(self.total):
                        (sum(hf.ce_lens) * wt).backward()
            else:
                with self.flat.grad_sink(self.total):
                    ((hf.ce_final + sum(hf.ce_lens)) * wt).backward()
            ce_h += hf.ce_final.item() * wt
            m += hf.mean_ce.item() * wt
        ce_h, m = self.ctx.mean(ce_h), self.ctx.mean(m)  # global, as one process on the global batch
        # ∇L_ul = −∇m/(m+1) with ∇m = (g_a + Σ_l ∇CE_l)/(L+1)
        if shared:
            self.total.add_(self.g_a)
        self.total.mul_(-1.0 / (n_terms * (m + 1.0)))
        if not shared:
            self._accumulate_ce(h_batches, self.g_a, mixed=False)
        l_ul = unlearn_loss(torch.tensor(m, dtype=torch.float64)).item()  # logged at the precision m has

        # 2: + α ∇CE(R)
        l_up = self._accumulate_ce(r_batches, self.total, weight=cfg.alpha)
        # 4: g_b (float32, like every coupling gradient)
        ce_b = self._accumulate_ce(b_batches, self.g_b, mixed=False)

        # 5, 6: + β ∇̂cos(g_a, g_b) at θ (paper), and/or (look-ahead) at the simulated attacker's θ' with weight
        # w: L_sd = (1 − w)·cos(θ) + w·cos(θ'); stats are at θ
        ahead: dict[str, float] = {}
        w = cfg.lookahead_weight if cfg.lookahead_lr > 0 else 0.0
        if cfg.beta > 0 and w < 1:
            stats = self._add_coupling_grad(h_batches, b_batches, cfg.beta * (1.0 - w))  # keeps g_a, g_b
        else:
            stats = cosine(self.g_a, self.g_b, self.flat)  # before the look-ahead overwrites g_a, g_b
        if cfg.beta > 0 and w > 0:
            ahead = self._lookahead_coupling(h_batches, b_batches, cfg.beta * w)
        grad_norm = self.flat.norm(self.total)
        l_sd = (1.0 - w) * stats.cos + w * ahead["cos_lookahead"] if ahead else stats.cos
        return {
            "loss": l_ul + cfg.alpha * l_up + cfg.beta * l_sd,
            "L_ul": l_ul, "L_up": l_up, "L_sd": l_sd, "ce_harmful": ce_h, "ce_benign": ce_b,
            "mean_ce_lens": m, "norm_g_a": stats.norm_a, "norm_g_b": stats.norm_b, "cos_g_a_g_b": stats.cos,
            **ahead, "grad_norm": grad_norm,
        }

    def _add_coupling_grad(self, h_batches: Weighted, b_batches: Weighted, scale: float) -> CouplingStats:
        """Add scale·∇̂cos(g_a, g_b) at the current parameters to ``self.total`` (``self.g_a``/``self.g_b`` hold the
        gradients there, and still do on return); returns the cosine and norms."""
        return hessian_free_cos_grad(
            self.flat, self.g_a, self.g_b,
            grad_a=lambda buf: self._accumulate_ce(h_batches, buf, mixed=False),
            grad_b=lambda buf: self._accumulate_ce(b_batches, buf, mixed=False),
            eps=self.config.epsilon, out=self.total, scale=scale, scratch=self._scratch,
            backup=self._backup, precision=self.config.coupling_precision, scheme=self.config.fd_scheme,
        )

    def _lookahead_coupling(self, h_batches: Weighted, b_batches: Weighted, scale: float) -> dict[str, float]:
        """Move to θ' = θ − η·Σ sign(g_a) (``lookahead_steps`` AdamW-like first updates on the harmful batch), add
        scale·∇̂cos(g_a, g_b) taken there to ``self.total``, and restore θ bit-exactly (even on error)."""
        cfg = self.config
        if self._origin is None:
            self._origin = self.flat.zeros()
        self.flat.read(self._origin)
        try:
            for i in range(cfg.lookahead_steps):
                if i:  # g_a where the previous simulated update landed
                    self.g_a.zero_()
                    self._accumulate_ce(h_batches, self.g_a, mixed=False)
                with torch.no_grad():
                    self.flat.read(self._scratch).sub_(torch.sign(self.g_a), alpha=cfg.lookahead_lr)
                self.flat.write(self._scratch)
            self.g_a.zero_()
            self.g_b.zero_()
            ce_h = self._accumulate_ce(h_batches, self.g_a, mixed=False)
            ce_b = self._accumulate_ce(b_batches, self.g_b, mixed=False)
            stats = self._add_coupling_grad(h_batches, b_batches, scale)
        finally:
            self.flat.write(self._origin)
        return {"cos_lookahead": stats.cos, "ce_harmful_lookahead": ce_h, "ce_benign_lookahead": ce_b}

    def _apply_update(self, grad_norm: float) -> None:
        if self.config.max_grad_norm is not None and grad_norm > self.config.max_grad_norm:
            self.total.mul_(self.config.max_grad_norm / grad_norm)
        if self.sharded:
            self.master.grad = self.total
            self.optimizer.step()
            self.master.grad = None
            self.flat.write(self.master.detach())
        else:
            for p, v in zip(self.params, self.flat.views(self.total), strict=True):
                p.grad = v
            self.optimizer.step()
            for p in self.params:
                p.grad = None
        self.scheduler.step()

    # ------------------------------------------------------------------ loop
    def train(self, resume: bool = False) -> Path:
        """Run to ``config.steps``; write ``log.jsonl``, checkpoints and ``model/``. Returns the model directory."""
        cfg = self.config
        main = self.ctx.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.ctx.barrier()
        check_run_folder(self.out, resume)
        if resume:
            self._resume()
        elif main:
            if (self.out / "log.jsonl").is_file() and (self.out / "log.jsonl").stat().st_size:
                log.warning("%s: restarting a run that stopped before its first checkpoint (its log is replaced)",
                            self.out)
            (self.out / "log.jsonl").write_text("")
        if main:
            self._write_run_info()
        # transformers ≥ 5 renamed the property (the old name warns); older versions only have the old one
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        if checkpointing:
            log.warning("the model has gradient checkpointing on, but SEAM runs it in eval mode (no dropout in the "
                        "finite differences) and transformers checkpoints only in training mode: activations are "
                        "kept, so memory is that of a run without it")
        self.model.eval()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="SEAM defence", unit="step", dynamic_ncols=True,
                   disable=not main)
        with (self.out / "log.jsonl").open("a", encoding="utf-8") if main else contextlib.nullcontext() as logf:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                row = self.compute_update(self.step)
                self._check_finite(row)
                row["lr"] = self.scheduler.get_last_lr()[0]
                self._apply_update(row["grad_norm"])
                self.step += 1
                row = {"step": self.step, **row, "step_time_s": time.perf_counter() - t0}
                if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    logf.write(json.dumps(row) + "\n")
                    logf.flush()
                bar.update(1)
                bar.set_postfix(L_ul=f"{row['L_ul']:.3f}", L_up=f"{row['L_up']:.3f}", cos=f"{row['cos_g_a_g_b']:+.3f}")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb(self, row)
        bar.close()
        return self.save_final()

    def _check_finite(self, row: dict[str, Any]) -> None:
        keys = ("L_ul", "L_up", "ce_harmful", "ce_benign", "grad_norm")
        bad = [k for k in keys if not math.isfinite(row[k])]
        for key in ("cos_g_a_g_b", "cos_lookahead"):
            if self.config.beta > 0 and key in row and not math.isfinite(row[key]):
                bad.append(f"{key} (a zero gradient?)")
        if bad:
            where = self.last_checkpoint or "none written yet"
            raise NonFiniteLossError(
                f"step {self.step + 1}: non-finite {', '.join(bad)} — the parameters were NOT updated. "
                f"Last good checkpoint: {where}. Resuming with the same settings would repeat the divergence: "
                f"start a new run (another --out) with a lower lr or epsilon, or with max_grad_norm set."
            )

    # ------------------------------------------------------------------ persistence
    def save_checkpoint(self) -> Path:
        """Every rank calls this. One process: one file. Several: rank 0 writes the scheduler and the replicated
        weights, every rank its RNG state and — when sharded — its optimizer shard and (FSDP) its rows of the
        weights."""
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "config": self.config.to_dict(),
            "data_fingerprint": self.data_fingerprint,
            "world_size": self.ctx.world_size,
            "model_dtype": str(self.original_dtype),  # what the model came in: save_dtype auto saves in it
            "compute_dtype": self._compute_dtype_name(),  # compute_dtype auto resolves by device
            "ce_weighting": CE_WEIGHTING,
            "warmup_steps": self.warmup_steps,
        } if self.ctx.is_main else None
        per_rank = {"rng": rng_state(), "optimizer": self.optimizer.state_dict()}
        if self.fsdp:  # every rank its own rows of every parameter
            per_rank["model_shard"] = {n: p.to_local().detach().cpu() for n, p in self.model.named_parameters()}
        elif self.ctx.is_main:
            state["model"] = {n: p.detach().cpu() for n, p in self.model.state_dict().items()}
        if not self.ctx.distributed:
            state.update(per_rank)
        elif not self.sharded:
            optimizer = per_rank.pop("optimizer")  # identical on every rank: stored once, by rank 0
            if self.ctx.is_main:
                state["optimizer"] = optimizer
        self.last_checkpoint = save_checkpoint(self.out / "checkpoints", self.step, state,
                                               self.config.keep_checkpoints, ctx=self.ctx, rank_state=per_rank)
        return self.last_checkpoint

    def _read_on_every_rank(self, path: Path, read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``read()``; a rank that cannot read (a file missing or cut short on its host: a CheckpointError) tells
        the others, which would otherwise wait at the next collective."""
        state, err = {}, None
        try:
            state = read()
        except CheckpointError as exc:
            err = exc
        if self.ctx.any(err is not None):
            raise err or CheckpointError(f"cannot resume {path}: another process could not read the checkpoint (its "
                                         "error names the file); delete the checkpoint to resume from an earlier one")
        return state

    def _resume(self) -> None:
        path = latest_checkpoint(self.out / "checkpoints")
        assert path is not None  # train() ran check_run_folder, which refuses a resume without a checkpoint
        other = self._started_from_another_model()
        if self.ctx.any(other is not None):  # (only rank 0 knows the model's digest)
            raise CheckpointError(f"cannot resume {path}: the run started from {other or 'another model'}. Its "
                                  "weights come from the checkpoint, but the saved model would name this one as its "
                                  "base (and check its held-out data against it): resume with the same --model, or "
                                  "start a new run in another --out")
        # RNG states must stay CPU tensors; loaders move the rest
        state = self._read_on_every_rank(path, lambda: load_checkpoint(path, map_location="cpu"))
        refuse_changed_config(self.config, state["config"], path)
        if state["data_fingerprint"] != self.data_fingerprint:
            raise CheckpointError(f"cannot resume {path}: the training data differ from the checkpointed run's (or "
                                  "their encoding: since 2026-11-27 a model without a chat template is prompted in "
                                  "prompt format 2, see CHANGELOG.md)")
        micro_batches = self.config.gradient_accumulation_steps * self.ctx.world_size
        weighting = state.get("ce_weighting", "micro_batch_mean")  # checkpoints from before 2026-11-27
        if micro_batches > 1 and weighting != CE_WEIGHTING:
            raise CheckpointError(f"cannot resume {path}: its run averaged the CEs of its {micro_batches} micro-batches "
                                  f"per step ({weighting}); this seamlm weights them by answer tokens "
                                  f"({CE_WEIGHTING}), another objective: start a new run, or resume with the seamlm "
                                  "that wrote the checkpoint")
        # checkpoints from before 2026-11-27 rounded the warm-up down
        then_warmup = state.get("warmup_steps", int(self.config.warmup_ratio * self.config.steps))
        if then_warmup != self.warmup_steps:
            raise CheckpointError(f"cannot resume {path}: its run warmed up for {then_warmup} steps (rounded down); "
                                  f"this seamlm warms up for {self.warmup_steps} (rounded up, as the HF Trainer), "
                                  "another schedule: start a new run, or resume with the seamlm that wrote it")
        if state.get("model_dtype", str(self.original_dtype)) != str(self.original_dtype):
            raise CheckpointError(f"cannot resume {path}: the run loaded the model in {state['model_dtype']}, this one "
                                  f"in {self.original_dtype}; resume with the same --dtype")
        if state.get("compute_dtype", self._compute_dtype_name()) != self._compute_dtype_name():
            raise CheckpointError(f"cannot resume {path}: the run computed L_ul and L_up in {state['compute_dtype']}, "
                                  f"this one would in {self._compute_dtype_name()} (compute_dtype "
                                  f"{self.config.compute_dtype} on {self.device.type}): resume on the same kind of "
                                  f"device, set compute_dtype to {state['compute_dtype']}, or start a new run")
        if state.get("world_size", 1) != self.ctx.world_size:
            raise CheckpointError(f"checkpoint {path} was written by {state.get('world_size', 1)} process(es); "
                                  f"resume it with that many (this run has {self.ctx.world_size})")
        if self.ctx.distributed:
            state = {**state, **self._read_on_every_rank(path, lambda: load_rank_state(path, self.ctx))}
        if self.fsdp:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.to_local().copy_(state["model_shard"][n])
        else:
            self.model.load_state_dict(state["model"])
        if self.sharded:
            self.flat.read(self.master.data)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.last_checkpoint = path
        self.ctx.barrier()  # every rank has read the checkpoint before rank 0 rewrites the log
        if not self.ctx.is_main:
            return
        # Drop log rows written after the checkpoint: those steps are recomputed.
        log_path = self.out / "log.jsonl"
        kept = [row for _, row in read_records(log_path) if row["step"] <= self.step]
        write_records_atomic(log_path, kept)
        log.info("resumed from %s (step %d)", path, self.step)

    def _started_from_another_model(self) -> str | None:
        """The model the run being resumed started from (its ``run.json``), where this run names another."""
        if not self.ctx.is_main:
            return None
        try:
            then = json.loads((self.out / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        for key in ("model_identity", "base_identity"):  # (the CLI's, the demo's)
            old, new = then.get(key), self.run_info.get(key)
            if old and new and old != new and old not in legacy_identities(self.run_info.get("model", ""), new):
                return (f"{then.get('model', old)} ({old}), this one names {self.run_info.get('model', new)} "
                        f"({new})")
        return None

    def _write_run_info(self) -> None:
        info = {
            "config": self.config.to_dict(),
            "seed": self.config.seed,
            "data_sizes": self.data_sizes,
            "data_fingerprint": self.data_fingerprint,
            "num_trainable_params": self.flat.total_numel,
            "world_size": self.ctx.world_size,
            "global_batch_per_stream": self.config.batch_size * self.config.gradient_accumulation_steps
            * self.ctx.world_size,
            "gradient_buffer_numel_per_rank": self.flat.numel,
            "device": str(self.device),
            **environment_info(),
            **self.run_info,
        }
        write_text_atomic(self.out / "run.json", json.dumps(info, indent=2, default=str))  # (read back on resume)
        self.config.to_yaml(self.out / "config.yaml")

    def save_final(self) -> Path:
        dtype = None if self.config.save_dtype == "auto" else self.config.save_dtype
        if dtype is None and self.original_dtype != self.params[0].dtype:
            dtype = self.original_dtype
        run_config = {
            "stage": "defend", "method": "seam", "defense_config": self.config.to_dict(), "steps_done": self.step,
            "warmup_steps": self.warmup_steps,
            "data_sizes": self.data_sizes, "data_fingerprint": self.data_fingerprint, **self.run_info,
        }
        weights = full_state_dict(self.answer_losses, "model.") if self.fsdp else None  # every rank takes part
        if _is_peft(self.model):  # the adapters join the base weights: a plain HF directory, as finetune saves LoRA
            self.model = self.model.merge_and_unload()
            run_config["lora_merged"] = True
        if self.ctx.is_main:
            save_model(self.model, self.tokenizer, self.out / "model", run_config, dtype=dtype,
                       trained_prompts=self.trained_prompts, state_dict=weights)
        self.ctx.barrier()
        return self.out / "model"


@register_defense
class SEAMDefense(Defense):
    """The registry's SEAM: :class:`SEAMTrainer` with checkpoints every ``checkpoint_every`` steps (``--resume``)."""

    name = "seam"
    summary = "SEAM (arXiv 2505.12186): L_ul + α·L_up + β·cos(g_a, g_b), Hessian-free ∇cos"
    Config = DefenseConfig
    streams = ("harmful", "refusal", "benign")
    resumable = True

    @classmethod
    def configure(cls, values: dict[str, Any], source: str, out_dir: str | Path) -> DefenseConfig:
        given = values.get("output_dir")
        if given is not None and Path(str(given)).resolve() != Path(out_dir).resolve():
            raise ConfigError(f"{source} sets output_dir: {given}, but --out is {out_dir}; --out names the output "
                              "folder: drop output_dir from the YAML or give the same folder")
        return DefenseConfig.from_dict({**values, "output_dir": str(out_dir)}, source)

    @classmethod
    def check_out(cls, out_dir: str | Path, resume: bool) -> None:
        check_run_folder(Path(out_dir), resume)

    @classmethod
    def check_device(cls, config: DefenseConfig, device: torch.device) -> None:
        check_precision_device(config, device)

    @classmethod
    def check_resume(cls, out_dir: str | Path, config: DefenseConfig) -> None:
        path = latest_checkpoint(Path(out_dir) / "checkpoints")
        if path is None:
            return
        try:
            saved = load_checkpoint(path, mmap=True)["config"]
        except CheckpointError as exc:  # e.g. a file system that cannot memory-map: the trainer's full load decides
            log.info("early resume check skipped (%s)", exc)
            return
        refuse_changed_config(config, saved, path)  # (the trainer checks the rest: data, dtype, world size)

    def run(self, model: Any, tokenizer: Any, data: dict[str, StreamData], out_dir: str | Path, *,
            resume: bool = False, run_info: dict[str, Any] | None = None, ctx: DistContext | None = None) -> Path:
        config = self.config.replace(output_dir=str(out_dir))
        trainer = SEAMTrainer(model, tokenizer, config, run_info=run_info, ctx=ctx, **self.examples(data))
        return trainer.train(resume=resume)
