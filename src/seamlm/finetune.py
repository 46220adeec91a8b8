"""Supervised fine-tuning on prompt/answer pairs: the harmful-fine-tuning attack, benign fine-tuning (FS) and
alignment all run this one loop (full parameters or LoRA through ``peft``)."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from seamlm.checkpoint import seed_everything
from seamlm.config import BaseConfig, warmup_check
from seamlm.data.files import Example
from seamlm.data.format import Formatter, answer_token_count, check_template, collate
from seamlm.defense.losses import AnswerLosses, answer_ce
from seamlm.distributed import DistContext, full_state_dict, fully_shard_model
from seamlm.errors import ConfigError, DataError, NonFiniteLossError
from seamlm.jsonl import append_records

log = logging.getLogger(__name__)


#: Version of what the loop does beyond its config's fields, part of every attack cell's settings digest so a
#: resumed grid never mixes the two: 2 = warm-up rounded up like the HF Trainer (was rounded down).
LOOP_VERSION = 2


def warmup_steps(ratio: float, steps: int) -> int:
    """Warm-up steps as ``transformers.TrainingArguments.get_warmup_steps`` counts them (rounded up). When they are
    all the steps the learning rate never reaches its peak — one step runs at lr 0 and trains nothing —: said."""
    n = math.ceil(steps * ratio)
    if steps and n >= steps:
        log.warning("warm-up takes all %d step(s) (warmup_ratio %g): the learning rate never reaches its peak%s; "
                    "lower warmup_ratio or run more steps", steps, ratio,
                    " and the only step runs at lr 0, so nothing is trained" if steps == 1 else "")
    return n


@dataclass
class FinetuneConfig(BaseConfig):
    """One supervised fine-tuning run. Defaults follow the paper's attack: AdamW, cosine, 10 % warm-up, wd 0.01."""

    lr: float = 2e-5
    """Peak learning rate."""
    epochs: int = 1
    """Passes over the data."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = no cap). A cap only: more steps than ``epochs`` passes give is a
    warning, not more training."""
    batch_size: int = 4
    """Examples per step, over all processes together (each of W processes takes every W-th example)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW or plain SGD (momentum 0)."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming up (rounded up; transformers' schedule: the first step's lr is 0)."""
    weight_decay: float = 0.01
    """Weight decay (AdamW) / L2 (SGD), on the weights the HF Trainer decays: not biases or norm weights."""
    max_grad_norm: float | None = None
    """Gradient clipping; None = off (the paper's attack does not clip)."""
    max_length: int = 256
    """Maximum tokens per example."""
    truncate_first: Literal["answer", "prompt"] = "answer"
    """What a longer example loses first: ``answer`` keeps the prompt whole and cuts the answer's end (down to 8
    tokens); ``prompt`` cuts the prompt's start down to half of ``max_length`` first, so long-prompt refusals are
    trained whole."""
    mask_prompt: bool = True
    """Train on answer tokens only."""
    prompt_template: str = "chat"
    """Prompt template of the training examples (``seamlm.data.format.PROMPT_TEMPLATES``; chat = the model's own)."""
    seed: int = 0
    """Data order and initialisation of LoRA weights."""
    lora: bool = False
    """Fine-tune LoRA adapters instead of all parameters; merged into the weights afterwards."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Module names that get adapters."""
    lora_layers: tuple[int, ...] = ()
    """Decoder layers (indices) that get adapters; empty = all."""
    shard_parameters: bool = False
    """Under several processes, shard the weights, gradients and optimizer state with FSDP2 (``fully_shard``,
    one unit per decoder layer): ≈ 16/world bytes per parameter per rank instead of 16 (fp32 AdamW), e.g. a 7B
    full-parameter attack on 8 GPUs. Same model as one process; rank 0 gathers it for evaluation. Full
    fine-tuning only (not with ``lora`` or a recipe that selects parameters). Ignored, with a warning, in a single
    process. An execution setting: it does not change cell keys or results."""

    #: fields that say how a run is executed, not what it computes: left out of cell keys and stored settings
    EXECUTION_ONLY = frozenset({"shard_parameters"})
    #: fields added after results were stored: in the settings only when set, so older cells keep their digests
    ADDED_LATER = frozenset({"truncate_first"})

    def trajectory_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the execution-only fields and the later fields left at their defaults: equal
        for runs that train the same model."""
        return {k: v for k, v in self.to_dict_omitting_defaults(self.ADDED_LATER).items() if k not in self.EXECUTION_ONLY}

    def validate(self) -> None:
        self._require([
            (self.lr > 0, "lr must be > 0"), (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps >= 0, "max_steps must be >= 0"), (self.batch_size >= 1, "batch_size must be >= 1"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"), (self.max_length >= 16, "max_length must be >= 16"),
            warmup_check(self.lr_scheduler, self.warmup_ratio),
            (self.lora_r >= 1, "lora_r must be >= 1"),
            (self.lora_alpha > 0, "lora_alpha must be > 0 (at 0 the adapters' update is scaled to nothing)"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None"),
            (all(i >= 0 for i in self.lora_layers), "lora_layers are layer indices >= 0"),
        ])
        unused = [f for f in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_layers")
                  if getattr(self, f) != getattr(FinetuneConfig, f)]
        if unused and not self.lora:
            raise ConfigError(f"{', '.join(unused)} set but lora is off (full-parameter training would ignore them): "
                              "add --lora true, or drop them")
        check_template(self.prompt_template)


def check_launch(ctx: DistContext, cfg: FinetuneConfig | None = None, one_process: bool = False,
                 chosen_parameters: bool = False) -> None:
    """Refuse a launch the loop cannot train under: a loss or gradient hook (``one_process``) under several
    processes; LoRA or a recipe that trains chosen parameters under ``shard_parameters``. (Also called before the
    pre-attack evaluation, so a wrong launch fails in seconds.)"""
    if ctx.distributed and one_process:
        raise ConfigError("this attack recipe changes the loss or the gradients and runs in one process; "
                          "start it without accelerate launch / torchrun")
    if ctx.distributed and cfg is not None and cfg.shard_parameters and (cfg.lora or chosen_parameters):
        raise ConfigError("shard_parameters shards full-parameter fine-tuning; LoRA and recipes that train chosen "
                          "parameters only run unsharded: drop --shard_parameters")


@dataclass
class TrainingHooks:
    """Extension points of :func:`finetune`. Adaptive attacks compose the one training loop through these.

    The order within a step: ``loss`` → backward → ``transform_gradients`` → clipping → optimizer step.
    """

    select_parameters: Callable[[Any], None] | None = None
    """(model) -> None: sets ``requires_grad`` on the parameters to train, before the optimizer is built (called on
    the LoRA-wrapped model when ``lora`` is on)."""
    loss: Callable[[Any, dict[str, torch.Tensor], int], tuple[torch.Tensor, dict[str, float]]] | None = None
    """(model, batch, step) -> (loss to differentiate, extra log fields). Default: the batch's answer-only CE."""
    transform_gradients: Callable[[Any, list[torch.nn.Parameter], int], dict[str, float]] | None = None
    """(model, trainable parameters, step) -> extra log fields; rewrites ``p.grad`` in place. A
    :class:`NonFiniteLossError` it raises ends the run as diverged, like a non-finite loss."""

    def check(self, ctx: DistContext, cfg: FinetuneConfig | None = None) -> None:
        """Refuse a launch these hooks cannot train under (:func:`check_launch`)."""
        check_launch(ctx, cfg, one_process=bool(self.loss or self.transform_gradients),
                     chosen_parameters=self.select_parameters is not None)


@dataclass
class Probe:
    """A measurement of the model along a training run that no update depends on (e.g. the benign perplexity
    during an attack: does SEAM's trap fire on the way even where the end point has recovered?). Taken after 0,
    ``every``, 2·``every``, … updates and after the last; rows go to ``<log>.probe.jsonl`` (``updates`` + the
    measured values) and to :attr:`FinetuneResult.probes`."""

    measure: Callable[[Any], dict[str, float]]
    """(model) -> values. Called in eval mode, gradients cleared; it must not change the weights or draw from the
    random generators (the trajectory is then the same as without the probe)."""
    every: int

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"probe every={self.every}: must be >= 1")


_PROBE: ContextVar[Probe | None] = ContextVar("seamlm_probe", default=None)


@contextmanager
def probing(probe: Probe | None) -> Iterator[None]:
    """Run ``probe`` in every :func:`finetune` inside the block (none when ``probe`` is None). A context rather than
    an argument: it measures whatever loop an attack recipe runs without every recipe passing it on."""
    token = _PROBE.set(probe)
    try:
        yield
    finally:
        _PROBE.reset(token)


def probe_log_path(log_path: str | Path) -> Path:
    return Path(log_path).with_suffix(".probe.jsonl")


@dataclass
class FinetuneResult:
    model: Any
    losses: list[float]
    steps: int
    logs: list[dict[str, float]] = field(default_factory=list)
    """Per-step log rows (step, loss, lr and the hooks' fields), as in the JSONL log."""
    probes: list[dict[str, float]] = field(default_factory=list)
    """The :class:`Probe` rows of the run (empty without one)."""


def _batches(n: int, cfg: FinetuneConfig) -> list[list[int]]:
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        out.extend(order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size))
    if cfg.max_steps > len(out):
        # max_steps caps the plan, it does not extend it (unlike transformers' Trainer): say so, never ignore it
        log.warning("max_steps=%d exceeds the %d steps of %d epoch(s) over %d examples at batch %d: %d steps run; "
                    "raise epochs for more", cfg.max_steps, len(out), cfg.epochs, n, cfg.batch_size, len(out))
    return out[: cfg.max_steps] if cfg.max_steps else out


def _with_lora(model: Any, cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, cfg)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM",
                      layers_to_transform=list(cfg.lora_layers) or None)
    return get_peft_model(model, lora)


def check_lora_targets(model: Any, cfg: FinetuneConfig) -> None:
    """Refuse LoRA targets ``model`` does not have (modules, layers) or ties to its output head. ``model`` may be a
    skeleton on the meta device (:func:`seamlm.models.model_skeleton`): the check reads names and tying only."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora_target_modules if m not in present]
    if missing:
        raise ConfigError(f"lora_target_modules {missing} are not modules of this model; some present: "
                          f"{sorted(p for p in present if p.endswith('proj'))[:12]}")
    layers = getattr(model.config, "num_hidden_layers", None)
    beyond = [i for i in cfg.lora_layers if isinstance(layers, int) and i >= layers]
    if beyond:
        raise ConfigError(f"lora_layers {beyond} are beyond this model's {layers} decoder layers (0 … {layers - 1})")
    tied = tied_embedding_names(model)
    if tied & set(cfg.lora_target_modules):
        raise ConfigError(f"lora_target_modules {sorted(tied & set(cfg.lora_target_modules))}: this model ties its input "
                          "embeddings to its output head, so an adapter trained on one use of the shared matrix would "
                          "change both when merged (the evaluated model would not be the trained one); target "
                          "projections, or fine-tune all parameters")


def tied_embedding_names(model: Any) -> set[str]:
    """Names (last part) of the input-embedding and output-head modules when they share one weight; else empty."""
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or outp is None or inp.weight is not outp.weight:
        return set()
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and m in (inp, outp)}


def decay_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups the way the HF ``Trainer`` builds them — the attack the paper
    ran —: ``weight_decay`` on the weights, none on biases and LayerNorm/RMSNorm weights."""
    from transformers import Trainer

    decayed = set(Trainer.get_decay_parameter_names(None, model))  # uses no trainer state: the rule alone
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decayed], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def finetune(
    model: Any, tokenizer: Any, examples: list[Example], cfg: FinetuneConfig,
    log_path: str | Path | None = None, desc: str = "fine-tuning", ctx: DistContext | None = None,
    hooks: TrainingHooks | None = None,
) -> FinetuneResult:
    """Train ``model`` on ``examples`` (answer-only CE); returns the trained (LoRA-merged) model and the losses.

    Every step's loss is written to ``log_path`` (JSONL) as it happens. A non-finite loss stops the run with
    :class:`NonFiniteLossError` (an attack that diverges is a result; the caller records it).

    Under several processes (``ctx``) each rank takes every world-th example of each batch, and the gradients are
    all-reduced with token weights, so the step is the one-process step on the whole batch (the answer-token mean).
    ``hooks`` change the loss, the gradients or the trained parameters (see :class:`TrainingHooks`).
    """
    ctx = ctx or DistContext()
    hooks = hooks or TrainingHooks()
    hooks.check(ctx, cfg)
    if not examples:
        raise DataError(f"{desc}: no training examples (the data stream or file it trains on is empty: check it, or "
                        f"rebuild the bundle)")
    seed_everything(cfg.seed)
    rows = Formatter(tokenizer, cfg.max_length, mask_prompt=cfg.mask_prompt, template=cfg.prompt_template,
                     truncate_first=cfg.truncate_first).encode_all(examples, desc)
    shard = cfg.shard_parameters and ctx.distributed
    if cfg.shard_parameters and not ctx.distributed:
        log.warning("shard_parameters has no effect in a single process: the whole model is trained")
    probe = _PROBE.get()
    if probe and shard:
        raise ConfigError("trajectory probes measure a whole model and shard_parameters splits it over the ranks: "
                          "drop one of them (e.g. --eval.trajectory_every 0)")
    if cfg.lora:
        model = _with_lora(model, cfg)
    if hooks.select_parameters:
        hooks.select_parameters(model)
    forward = AnswerLosses(model)  # the FSDP root when sharded (see AnswerLosses)
    gather = _FSDPGather(model, forward, ctx) if shard else None
    device = next(model.parameters()).device  # (FSDP moves a model loaded on the CPU to the rank's device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{desc}: no trainable parameters (the parameter selection matched nothing)")
    groups = decay_groups(model, cfg.weight_decay)
    opt = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD)(groups, lr=cfg.lr)
    plan = _batches(len(rows), cfg)
    from transformers import get_scheduler

    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=warmup_steps(cfg.warmup_ratio, len(plan)),
                          num_training_steps=len(plan))
    losses: list[float] = []
    logs: list[dict[str, float]] = []
    log_path = log_path if ctx.is_main else None
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    logf = open(log_path, "w", encoding="utf-8") if log_path else None  # noqa: SIM115 (closed in finally)
    # under several processes rank 0 measures (its model is whole) while the others wait at the next all-reduce
    probes = _ProbeRecorder(probe if ctx.is_main else None, probe_log_path(log_path) if log_path else None)
    model.train()
    opt.zero_grad(set_to_none=True)  # a gradient the caller left on the model must not join the first update
    try:
        for step, idx in enumerate(tqdm(plan, desc=desc, unit="step", dynamic_ncols=True, disable=not ctx.is_main), 1):
            probes.maybe(model, step - 1)
            extra: dict[str, float] = {}
            t_step = time.perf_counter()
            if ctx.distributed:
                value = _data_parallel_backward(forward, params, rows, idx, tokenizer.pad_token_id, device, ctx,
                                                fsdp=shard)
            else:
                batch = collate([rows[i] for i in idx], tokenizer.pad_token_id, device=device)
                if hooks.loss:
                    loss, extra = hooks.loss(model, batch, step)
                else:
                    loss = answer_ce(model, batch)
                value = loss.item()
            if not math.isfinite(value):
                raise _diverged(f"{desc}: loss became {value} at step {step}", model, cfg, losses, logs, gather)
            if not ctx.distributed:
                loss.backward()
            if hooks.transform_gradients:
                try:
                    extra.update(hooks.transform_gradients(model, params, step))
                except NonFiniteLossError as err:  # a quantity of the hook's own (e.g. a benign gradient)
                    raise _diverged(f"{desc}: {err} at step {step}", model, cfg, losses, logs, gather) from err
            if cfg.max_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if hasattr(norm, "full_tensor"):  # sharded gradients: the norm is a DTensor over the ranks
                norm = norm.full_tensor()
            if not torch.isfinite(norm):  # a finite loss can still give inf/NaN gradients: stop before the update
                raise _diverged(f"{desc}: gradient norm became {norm.item()} at step {step}", model, cfg, losses,
                                logs, gather)
            lr = sched.get_last_lr()[0]  # the rate this step uses
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(value)
            logs.append({"step": step, "loss": value, "lr": lr, **extra, "step_time": time.perf_counter() - t_step})
            if logf:
                logf.write(json.dumps(logs[-1]) + "\n")
                logf.flush()
        probes.maybe(model, len(plan), last=True)
    except NonFiniteLossError as err:
        err.probes = probes.rows
        raise
    finally:
        if logf:
            logf.close()
        model.eval()
    if cfg.lora:
        model = model.merge_and_unload()
    if gather:
        model = gather()
        if not ctx.is_main:  # the other ranks hand back their shards; only rank 0 evaluates
            return FinetuneResult(model, losses, len(plan), logs)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        # the last update produced inf/NaN weights although every loss was finite
        err = NonFiniteLossError(f"{desc}: non-finite weights after the last step (lr={cfg.lr})")
        err.model, err.losses, err.logs, err.probes = model, losses, logs, probes.rows
        raise err
    return FinetuneResult(model, losses, len(plan), logs, probes.rows)


class _ProbeRecorder:
    """Takes a :class:`Probe`'s measurements when due and appends them to its file (nothing without a probe)."""

    def __init__(self, probe: Probe | None, path: Path | None):
        self.probe, self.path, self.rows = probe, path, []
        if probe and path:
            path.write_text("", encoding="utf-8")

    def maybe(self, model: Any, updates: int, last: bool = False) -> None:
        if not self.probe or not (last or updates % self.probe.every == 0):
            return
        model.eval()
        try:
            self.rows.append({"updates": updates, **self.probe.measure(model)})
        finally:
            model.train()
            model.zero_grad(set_to_none=True)  # nothing a measurement leaves may reach the next update
        if self.path:
            append_records(self.path, self.rows[-1:])


def _diverged(message: str, model: Any, cfg: FinetuneConfig, losses: list[float],
              logs: list[dict[str, float]], gather: _FSDPGather | None = None) -> NonFiniteLossError:
    """The error a diverged run raises, carrying the weights before the failed step and the losses so far, so a
    caller can still evaluate the model. (Sharded: every rank sees the same global loss and norm, so all of them
    get here and take part in the gather.) The message gains the learning rate and what usually avoids it."""
    err = NonFiniteLossError(f"{message} (lr={cfg.lr}; a lower learning rate or --max_grad_norm usually avoids it)")
    model.zero_grad(set_to_none=True)  # the failed step's non-finite gradients must not reach a later run
    err.model = gather() if gather else model.merge_and_unload() if cfg.lora else model
    err.losses, err.logs = losses, logs
    return err


def _data_parallel_backward(forward: AnswerLosses, params: list[torch.nn.Parameter], rows: list, idx: list[int],
                            pad: int, device: torch.device, ctx: DistContext, fsdp: bool = False) -> float:
    """This rank's share of one step (every world-th example of the batch ``idx``): backward of its token-weighted
    loss, then the gradients' all-reduce (under FSDP its reduce-scatter does the mean). Returns the global batch's
    answer-token mean CE."""
    local = idx[ctx.rank::ctx.world_size]
    tokens = 0
    if local:
        batch = collate([rows[i] for i in local], pad, device=device)
        tokens = answer_token_count(batch)
    total = int(ctx.sum(float(tokens)))
    value = 0.0
    if tokens or fsdp:
        if not tokens:  # FSDP's collectives need every rank in every pass: a zero-weight pass on a real example
            batch = collate([rows[idx[0]]], pad, device=device)
        loss = forward(batch, "final_layer")[0]
        # mean over ranks of (tokens_r · world / total) · CE_r  =  Σ_r tokens_r · CE_r / total
        weight = tokens * ctx.world_size / total if tokens else 0.0
        (loss * weight).backward()
        value = loss.item() * weight
    if fsdp:
        return ctx.mean(value)
    for p in params:  # the same order on every rank; a rank without examples contributes zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        ctx.all_reduce_mean_(p.grad)
    return ctx.mean(value)


class _FSDPGather:
    """Shards ``model`` with FSDP2 (root: ``forward``) and, when called after training, gathers the trained weights
    into an ordinary model on rank 0 for evaluation — built on the meta device beforehand and filled from the full
    state dict; buffers (rotary tables, not in the state dict) are copied from the sharded model, which keeps them
    whole. The other ranks get their sharded model back."""

    def __init__(self, model: Any, forward: AnswerLosses, ctx: DistContext):
        self.model, self.forward, self.ctx = model, forward, ctx
        self.dtype = next(model.parameters()).dtype
        self.skeleton = None
        if ctx.is_main:
            with torch.device("meta"):
                self.skeleton = type(model)(model.config).to(self.dtype)
        fully_shard_model(model, ctx, root=forward)

    def __call__(self) -> Any:
        weights = full_state_dict(self.forward, "model.")  # a collective: every rank takes part
        if not self.ctx.is_main:
            return self.model
        whole = self.skeleton.to_empty(device=self.ctx.device)
        whole.load_state_dict(weights)
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                whole.get_buffer(name).copy_(buf)
        whole.generation_config = self.model.generation_config
        whole.tie_weights()
        return whole.eval()
