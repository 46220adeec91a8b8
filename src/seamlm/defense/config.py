"""``DefenseConfig``: every knob of a SEAM run, with the reference defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from seamlm.config import BaseConfig, warmup_check

#: Keys that may differ between a checkpoint and the run resuming it (they do not change the trajectory).
#: compute_dtype is compared as resolved (``auto`` is bf16 on CUDA, fp32 on CPU) against the checkpoint's record
#: instead, so ``auto`` → ``bfloat16`` on another device is a valid resume.
RESUME_SAFE_KEYS = frozenset({"output_dir", "checkpoint_every", "keep_checkpoints", "log_every", "compute_dtype"})


@dataclass
class DefenseConfig(BaseConfig):
    """Configuration of :class:`seamlm.SEAMTrainer`. Objective: L = L_ul + α·L_up + β·L_sd."""

    alpha: float = 1.0
    """α, weight of L_up = CE(refusals) — keeps the model refusing harmful prompts."""
    beta: float = 0.01
    """β, weight of L_sd = cos(g_a, g_b), the self-destruction coupling (paper default 0.01)."""
    epsilon: float = 1e-3
    """ε, finite-difference step of the Hessian-free estimate of ∇L_sd (error is first order in ε)."""
    fd_scheme: Literal["forward", "central"] = "forward"
    """Not in the paper. ``forward``: (g(θ+εδ) − g(θ))/ε, 2 extra gradient passes, error O(ε) (the paper's).
    ``central``: (g(θ+εδ) − g(θ−εδ))/2ε, 4 extra passes, error O(ε²), so ε can be larger — which large models
    need: in float32 θ+εδ is itself rounded (each coordinate moves ≈ ε/√n, about one ulp of the weight; the step
    applied to SmolLM2-135M is 5.4 % off at ε = 1e-3, 0.5 % at 1e-2). Try ``central`` with ε = 1e-2 above ~1B."""
    lookahead_lr: float = 0.0
    """Not in the paper. > 0: take L_sd at θ' = θ − η·Σ sign(g_a), the first ``lookahead_steps`` updates of an
    AdamW attacker at learning rate η (AdamW's first update is η·sign(g)), instead of at θ; its gradient is applied
    at θ to first order (the Jacobian of θ' is taken as the identity, as in first-order MAML). The paper's L_sd
    holds the coupling at θ only, and an attack's first steps undo it (docs/demo-tuning.md); this trains it where
    the attack goes. Costs 1 + ``lookahead_steps`` passes and one parameter-sized buffer more per step.
    0 = at θ (paper)."""
    lookahead_steps: int = 1
    """Simulated attacker updates on the step's harmful batch, each a sign step of ``lookahead_lr`` at the point
    the previous one reached."""
    lookahead_weight: float = 1.0
    """w, share of L_sd taken at θ' with the look-ahead: L_sd = (1 − w)·cos at θ + w·cos at θ'. 1 = at θ' only;
    below 1 the trap must also hold at the defended point (2 passes more: the coupling's pair at θ too)."""
    unlearn_loss: Literal["logit_lens", "final_layer"] = "logit_lens"
    """L_ul variant: ``logit_lens`` averages answer CE over the final head and the logit lens of every earlier
    hidden state (RepNoise / reference form); ``final_layer`` uses the final head only (much cheaper)."""
    lr: float = 2e-5
    """Peak AdamW learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule (``transformers.get_scheduler`` names)."""
    warmup_ratio: float = 0.1
    """Fraction of ``steps`` spent warming up linearly from 0 (transformers' schedule: lr × step / warm-up steps,
    so with a warm-up the first step's lr is 0 and it only feeds AdamW's moments). Warm-up steps are
    ``ceil(warmup_ratio × steps)``, as the HF Trainer counts them (before 2026-11-27: rounded down)."""
    weight_decay: float = 0.0
    """AdamW weight decay (reference: 0), on every trainable parameter — biases and norm weights too, unlike the
    attack's HF-Trainer groups (SEAM's sharded update holds one flat vector per rank)."""
    max_grad_norm: float | None = None
    """Clip the global norm of the combined update direction; ``None`` = no clipping (reference)."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch and process, the same for each stream (H, R, B)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per step and process; the global batch is ``batch_size × gradient_accumulation_steps × number
    of processes`` per stream (as the HF Trainer's ``per_device_train_batch_size`` counts: more processes, a larger
    batch; ``run.json`` records it). The attack's ``batch_size``, by contrast, is the global batch."""
    max_length: int = 256
    """Maximum tokens per example; the log counts each cut (see ``truncate_first``)."""
    truncate_first: Literal["answer", "prompt"] = "answer"
    """What a longer example loses first: ``answer`` keeps the prompt whole and cuts the answer's end, down to 8
    answer tokens, then the prompt's start (after its BOS); ``prompt`` cuts the prompt's start down to half of
    ``max_length`` first, so refusals to long prompts are trained whole."""
    mask_benign_prompt: bool = True
    """Train CE(B) on answer tokens only (True) or on all tokens like the reference code (False)."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype of the L_ul and L_up passes. Parameters, perturbations and the coupling's gradients
    (g_a, g_b and their perturbed versions) stay float32: the bf16 precision trap. ``auto`` = float32 on CPU,
    bfloat16 on CUDA. float16 is not offered: its small gradients underflow without loss scaling, which the SEAM
    step does not do."""
    coupling_precision: Literal["ieee", "tf32"] = "ieee"
    """Matmul precision of the four float32 coupling passes (g_a, g_b and their recomputations at θ + εδ).
    ``ieee``: full float32, whatever the process set — the estimate's error is then the O(ε) of the method.
    ``tf32``: TensorFloat-32 on Ampere and later GPUs, several times faster but with a 10-bit mantissa, so the
    difference g(θ + εδ) − g(θ) carries a rounding error ∝ 1/ε: raise ε with it (docs/gpu.md has the measured
    error against ε). No effect on CPU, where it is refused."""
    seed: int = 42
    """Seeds data order and every RNG."""
    output_dir: str = "runs/defend"
    """Where the log, checkpoints and the final model go."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every N steps (0 = none: only the final ``model/``, so no ``--resume``)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 1
    """Write a JSONL log row every N steps."""
    shard_gradients: bool = False
    """Under several processes, shard the flat gradient buffers and the optimizer state across ranks (ZeRO-2 /
    FSDP-style memory: ≈ 1 + 8/world parameter copies per rank instead of ≈ 8, plus a world × 16 MB buffer for
    writing θ back chunk by chunk); parameters stay replicated.
    Same update as unsharded. Ignored, with a warning, in a single process."""
    shard_parameters: bool = False
    """Under several processes, shard the parameters too, with FSDP2 (``fully_shard``, ZeRO-3): each decoder
    layer is gathered only while it computes, and the weights, gradient buffers, AdamW state and master copy hold
    this rank's rows only: ≈ (1 + 8)/world parameter copies per rank, plus the gathered root unit (embeddings,
    head) and layer(s) of the pass in flight. The CLI reads the weights on rank 0 only (CPU) and broadcasts each
    rank's rows after sharding; no GPU holds the whole model. Same update as one process. Implies
    ``shard_gradients``. Ignored, with a warning, in a single process."""
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the saved model; ``auto`` = the dtype the model was given in."""

    def validate(self) -> None:
        self._require([
            (self.alpha >= 0, "alpha must be >= 0"),
            (self.beta >= 0, "beta must be >= 0"),
            (self.epsilon > 0, "epsilon must be > 0"),
            (self.lookahead_lr >= 0, "lookahead_lr must be >= 0 (0 = the paper's L_sd at θ)"),
            (self.lookahead_steps >= 1, "lookahead_steps must be >= 1"),
            (self.lookahead_lr == 0 or self.beta > 0, "lookahead_lr moves where L_sd is taken, but beta = 0 "
             "switches L_sd off: set beta > 0 or lookahead_lr = 0"),
            (self.lookahead_steps == 1 or self.lookahead_lr > 0, "lookahead_steps needs lookahead_lr > 0 (with 0 "
             "L_sd is taken at θ)"),
            (0 < self.lookahead_weight <= 1, "lookahead_weight must be in (0, 1] (for L_sd at θ alone set "
             "lookahead_lr = 0)"),
            (self.lookahead_weight == 1 or self.lookahead_lr > 0, "lookahead_weight splits L_sd between θ and the "
             "look-ahead point, but lookahead_lr = 0 takes none: set lookahead_lr > 0 or drop lookahead_weight"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            warmup_check(self.lr_scheduler, self.warmup_ratio),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None"),
            (self.steps > 0, "steps must be > 0"),
            (self.batch_size > 0, "batch_size must be > 0"),
            (self.gradient_accumulation_steps > 0, "gradient_accumulation_steps must be > 0"),
            (self.max_length >= 16, "max_length must be >= 16"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
        ])
