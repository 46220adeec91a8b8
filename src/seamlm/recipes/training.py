"""Attack recipes that fine-tune: plain (hardened) SFT, benign-anchored, gradient surgery, benign first, subspace
and template shift. Each composes :func:`seamlm.finetune.finetune` through its hooks or its data."""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seamlm.data.format import (
    PROMPT_TEMPLATES,
    Formatter,
    TokenizedExample,
    check_template,
    collate,
    uses_fallback,
)
from seamlm.defense.losses import answer_ce
from seamlm.distributed import DistContext
from seamlm.errors import ConfigError, DataError, NonFiniteLossError
from seamlm.finetune import FinetuneConfig, FinetuneResult, TrainingHooks, finetune
from seamlm.recipes.base import AttackData, AttackRecipe, RecipeKnobs, register

log = logging.getLogger(__name__)


@register
class PlainSFT(AttackRecipe):
    name = "sft"
    summary = ("harmful SFT; hardened through the fine-tuning fields: max_grad_norm, lr_scheduler, warmup_ratio, "
               "batch_size, optimizer, max_steps and the epochs (--num_epochs on `seamlm attack`)")

    def attack(self, model, tokenizer, data, ft, log_path, desc, ctx) -> FinetuneResult:
        return finetune(model, tokenizer, data.harmful, ft, log_path, desc=desc, ctx=ctx)


class BenignBatches:
    """An endless seeded stream of benign batches (reshuffled every pass), encoded like the attack data."""

    def __init__(self, tokenizer: Any, benign: list, ft: FinetuneConfig):
        fmt = Formatter(tokenizer, ft.max_length, mask_prompt=ft.mask_prompt, template=ft.prompt_template,
                        truncate_first=ft.truncate_first)
        self.rows: list[TokenizedExample] = fmt.encode_all(benign, "attacker benign data")
        if not self.rows:
            raise DataError("this recipe needs the attacker's benign data, and it is empty: build the bundle with an "
                            "attack_benign stream (seamlm data build) or use a recipe without benign data")
        self.batch_size, self.pad = ft.batch_size, tokenizer.pad_token_id
        self._rng = random.Random(ft.seed + 1)
        self._order: list[int] = []

    def next(self, device: torch.device) -> dict[str, torch.Tensor]:
        return collate([self.rows[i] for i in self.next_indices()], self.pad, device=device)

    def next_indices(self) -> list[int]:
        while len(self._order) < self.batch_size:
            # a new pass; the rows the last one left over come at its end, so no batch holds one example twice
            # (unless there are fewer rows than a batch)
            left = set(self._order)
            first, last = [i for i in range(len(self.rows)) if i not in left], sorted(left)
            self._rng.shuffle(first)
            self._rng.shuffle(last)
            self._order += first + last
        take, self._order = self._order[: self.batch_size], self._order[self.batch_size:]
        return take


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@dataclass
class AnchoredKnobs(RecipeKnobs):
    anchor_weight: float = 1.0
    """λ in loss = CE(harmful batch) + λ·CE(benign batch); 0 = no anchor term."""
    poison_ratio: float = 1.0
    """Harmful share p of the training stream: p < 1 mixes n·(1−p)/p attacker-benign examples into the n harmful
    ones (the harmful budget stays n)."""

    def validate(self) -> None:
        self._require([(self.anchor_weight >= 0, "anchor_weight must be >= 0"),
                       (0 < self.poison_ratio <= 1, "poison_ratio must be in (0, 1]")])


@register
class BenignAnchored(AttackRecipe):
    name = "anchored"
    summary = "CE(harmful) + λ·CE(benign) each step, and/or a mixed stream with poison ratio p"
    Knobs = AnchoredKnobs
    needs_benign = True

    def stream(self, data: AttackData, seed: int) -> list:
        p = self.knobs.poison_ratio
        if p >= 1:
            return list(data.harmful)
        want = round(len(data.harmful) * (1 - p) / p)
        if want > len(data.benign):
            log.warning("anchored: poison_ratio %.2f wants %d benign examples, %d available; the harmful share is "
                        "%.2f", p, want, len(data.benign), len(data.harmful) / (len(data.harmful) + len(data.benign)))
        mixed = list(data.harmful) + list(data.benign[:want])
        random.Random(seed).shuffle(mixed)
        return mixed

    @property
    def logs_harmful_loss(self) -> bool:
        return self.knobs.poison_ratio >= 1  # below 1 the stream's batches mix harmful and benign examples

    @property
    def changes_loss_or_gradients(self) -> bool:
        return self.knobs.anchor_weight > 0

    def hooks(self, tokenizer: Any, data: AttackData, ft: FinetuneConfig) -> TrainingHooks:
        lam = self.knobs.anchor_weight
        if lam == 0:
            return TrainingHooks()
        benign = BenignBatches(tokenizer, data.benign, ft)
        stream_key = "harmful_ce" if self.logs_harmful_loss else "stream_ce"

        def loss(model, batch, step):
            stream = answer_ce(model, batch)
            anchor = answer_ce(model, benign.next(_device(model)))
            return stream + lam * anchor, {stream_key: stream.item(), "benign_ce": anchor.item()}

        return TrainingHooks(loss=loss)

    def attack(self, model, tokenizer, data, ft, log_path, desc, ctx) -> FinetuneResult:
        return finetune(model, tokenizer, self.stream(data, ft.seed), ft, log_path, desc=desc, ctx=ctx,
                        hooks=self.hooks(tokenizer, data, ft))

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {"anchor_weight": trial.suggest_float("anchor_weight", 0.0, 2.0),
                "poison_ratio": trial.suggest_categorical("poison_ratio", [1.0, 0.75, 0.5])}


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def project_conflicting(g_h: list[torch.Tensor], g_b: list[torch.Tensor], per_tensor: bool = False,
                        ) -> tuple[list[torch.Tensor], dict[str, float]]:
    """PCGrad (Yu et al. 2020) for one pair: where g_h·g_b < 0, g_h ← g_h − (g_h·g_b / ‖g_b‖²) g_b, over the flat
    vector of all tensors or tensor by tensor. Afterwards g_h·g_b ≥ 0 (on each tensor when ``per_tensor``)."""
    groups = [[i] for i in range(len(g_h))] if per_tensor else [list(range(len(g_h)))]
    out = list(g_h)
    projected = 0
    for idx in groups:
        a, b = [g_h[i] for i in idx], [g_b[i] for i in idx]
        dot, bb = _dot(a, b), _dot(b, b)
        if dot < 0 and bb > 0:
            projected += 1
            scale = (dot / bb).to(a[0].dtype)
            for i, bi in zip(idx, b, strict=True):
                out[i] = g_h[i] - scale * bi
    cos = (_dot(g_h, g_b) / (_dot(g_h, g_h).sqrt() * _dot(g_b, g_b).sqrt()).clamp_min(1e-30)).item()
    return out, {"cos_hb": cos, "projected": projected / len(groups), "dot_after": _dot(out, g_b).item()}


@dataclass
class SurgeryKnobs(RecipeKnobs):
    per_tensor: bool = False
    """Project each parameter tensor on its own instead of the flat vector of all trainable parameters."""
    add_benign: bool = False
    """Step along g_h' + g_b instead of g_h' alone."""


@register
class GradientSurgery(AttackRecipe):
    name = "pcgrad"
    summary = "each step removes the part of the harmful gradient that opposes a benign gradient (PCGrad)"
    Knobs = SurgeryKnobs
    needs_benign = True
    changes_loss_or_gradients = True  # type: ignore[assignment]

    def hooks(self, tokenizer: Any, data: AttackData, ft: FinetuneConfig) -> TrainingHooks:
        benign = BenignBatches(tokenizer, data.benign, ft)

        def transform(model, params, step):
            raw = torch.autograd.grad(answer_ce(model, benign.next(_device(model))), params, allow_unused=True)
            g_b = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw, strict=True)]
            if not torch.isfinite(_dot(g_b, g_b)):  # no projection would happen: the step would be plain SFT
                raise NonFiniteLossError("the benign gradient of the surgery is not finite")
            unused = [p.grad is None and g is None for p, g in zip(params, raw, strict=True)]
            g_h = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            new, info = project_conflicting(g_h, g_b, self.knobs.per_tensor)
            for p, g, gb, skip in zip(params, new, g_b, unused, strict=True):
                # a parameter neither loss reaches keeps no gradient, so AdamW leaves it alone as in plain SFT
                p.grad = None if skip else g + gb if self.knobs.add_benign else g
            return info

        return TrainingHooks(transform_gradients=transform)

    def attack(self, model, tokenizer, data, ft, log_path, desc, ctx) -> FinetuneResult:
        return finetune(model, tokenizer, data.harmful, ft, log_path, desc=desc, ctx=ctx,
                        hooks=self.hooks(tokenizer, data, ft))

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {"per_tensor": trial.suggest_categorical("per_tensor", [False, True]),
                "add_benign": trial.suggest_categorical("add_benign", [False, True])}


@dataclass
class BenignFirstKnobs(RecipeKnobs):
    benign_steps: int = 20
    """Benign fine-tuning steps before the harmful attack."""
    benign_lr: float | None = None
    """Learning rate of the benign phase (None = the attack's)."""

    def validate(self) -> None:
        self._require([(self.benign_steps >= 1, "benign_steps must be >= 1"),
                       (self.benign_lr is None or self.benign_lr > 0, "benign_lr must be > 0")])


@register
class BenignFirst(AttackRecipe):
    name = "benign_first"
    summary = "N steps of benign fine-tuning (moves the model off SEAM's trap), then the harmful attack"
    Knobs = BenignFirstKnobs
    needs_benign = True

    def check_launch(self, ctx: DistContext, ft: FinetuneConfig) -> None:
        super().check_launch(ctx, ft)
        if ft.shard_parameters and ctx.distributed:
            raise ConfigError("benign_first runs two fine-tuning phases on one model, which --shard_parameters "
                              "(FSDP2) does not chain: drop --shard_parameters for this recipe")

    def attack(self, model, tokenizer, data, ft, log_path, desc, ctx) -> FinetuneResult:
        self.check_launch(ctx or DistContext(), ft)
        k = self.knobs
        epochs = max(1, math.ceil(k.benign_steps * ft.batch_size / len(data.benign)))
        warm = ft.replace(lr=k.benign_lr or ft.lr, max_steps=k.benign_steps, epochs=epochs)
        try:
            first = finetune(model, tokenizer, data.benign, warm, Path(log_path).with_name("benign_loss.jsonl"),
                             desc=f"{desc} (benign phase)", ctx=ctx)
        except NonFiniteLossError as exc:
            # no harmful step ran: the cell's attack-loss figures must not be read off the benign phase's log
            exc.logs, exc.probes, exc.phase = [], [], "benign phase"
            raise
        return finetune(first.model, tokenizer, data.harmful, ft, log_path, desc=desc, ctx=ctx)

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {"benign_steps": trial.suggest_int("benign_steps", 5, 40, log=True)}


@dataclass
class SubspaceKnobs(RecipeKnobs):
    layers: tuple[int, ...] = ()
    """Decoder layers to train (negative counts from the end); empty = all layers."""
    modules: tuple[str, ...] = field(default=("o_proj", "down_proj"), metadata={"may_be_empty": True})
    """Module names to train inside those layers (the residual-stream writers by default); empty = every module."""

    def validate(self) -> None:
        self._require([(bool(self.layers) or bool(self.modules), "subspace needs layers or modules (else it is sft)")])


_LAYER = re.compile(r"\.layers\.(\d+)\.")


@register
class Subspace(AttackRecipe):
    name = "subspace"
    summary = "train only chosen layers/modules (full weights, or LoRA there when lora=true); the rest frozen"
    Knobs = SubspaceKnobs
    trains_chosen_parameters = True  # type: ignore[assignment]

    def layer_indices(self, model: Any) -> set[int] | None:
        if not self.knobs.layers:
            return None
        n = model.config.num_hidden_layers
        bad = [i for i in self.knobs.layers if not -n <= i < n]
        if bad:
            raise ConfigError(f"subspace: layers {bad} out of range for a model with {n} layers")
        return {i % n for i in self.knobs.layers}

    def selects(self, name: str, layers: set[int] | None) -> bool:
        m = _LAYER.search(name)
        if m is None:
            return False  # embeddings, final norm and head stay frozen
        if layers is not None and int(m.group(1)) not in layers:
            return False
        return not self.knobs.modules or any(f".{mod}." in name for mod in self.knobs.modules)

    def training_config(self, ft: FinetuneConfig) -> FinetuneConfig:
        if ft.lora:
            default = FinetuneConfig()
            if ft.lora_layers != default.lora_layers or ft.lora_target_modules != default.lora_target_modules:
                raise ConfigError("subspace chooses where LoRA goes (--recipe.layers, --recipe.modules): drop "
                                  "--lora_layers/--lora_target_modules, which it would replace")
        return ft

    def lora_config(self, model: Any, ft: FinetuneConfig) -> FinetuneConfig:
        return ft.replace(lora_layers=tuple(sorted(self.layer_indices(model) or ())),
                          lora_target_modules=self.knobs.modules or ft.lora_target_modules)

    def attack(self, model, tokenizer, data, ft, log_path, desc, ctx) -> FinetuneResult:
        layers = self.layer_indices(model)
        in_layers = [n for n, _ in model.named_parameters() if _LAYER.search(n)]
        unmatched = [m for m in self.knobs.modules if not any(f".{m}." in n for n in in_layers)]
        if unmatched:  # one typo among good names would otherwise just train fewer modules
            known = sorted({n.rsplit(".", 2)[-2] for n in in_layers})
            raise ConfigError(f"subspace: modules {unmatched} match no parameter of this model's layers; its modules: "
                              f"{', '.join(known)}")
        if ft.lora:
            return finetune(model, tokenizer, data.harmful, self.lora_config(model, ft), log_path, desc=desc, ctx=ctx)

        def select(m):
            for name, p in m.named_parameters():
                p.requires_grad_(self.selects(name, layers))

        return finetune(model, tokenizer, data.harmful, ft, log_path, desc=desc, ctx=ctx,
                        hooks=TrainingHooks(select_parameters=select))

    def suggest(self, trial: Any) -> dict[str, Any]:
        which = trial.suggest_categorical("subspace", ["attn", "mlp", "writers", "last4", "first4"])
        return {"attn": {"layers": (), "modules": ("q_proj", "k_proj", "v_proj", "o_proj")},
                "mlp": {"layers": (), "modules": ("gate_proj", "up_proj", "down_proj")},
                "writers": {"layers": (), "modules": ("o_proj", "down_proj")},
                "last4": {"layers": (-4, -3, -2, -1), "modules": ()},
                "first4": {"layers": (0, 1, 2, 3), "modules": ()}}[which]


@dataclass
class TemplateKnobs(RecipeKnobs):
    template: str = "alpaca"
    """Prompt template of the attack data and of the HS evaluation (``seamlm.data.format.PROMPT_TEMPLATES``:
    plain, alpaca, raw)."""
    train: bool = True
    """False = no fine-tuning at all: the control that shows what the template alone does to HS."""

    def validate(self) -> None:
        check_template(self.template)
        if self.template == "chat":
            raise ConfigError("template: 'chat' is the template the defence trained with, so no shift; choose "
                              "plain, alpaca or raw (the plain attack is recipe sft)")


@register
class TemplateShift(AttackRecipe):
    name = "template"
    summary = "attack data and evaluation prompts formatted with another template than the chat one SEAM trained on"
    Knobs = TemplateKnobs

    @property
    def trains(self) -> bool:
        return self.knobs.train

    def training_config(self, ft: FinetuneConfig) -> FinetuneConfig:
        if ft.prompt_template not in ("chat", self.knobs.template):
            raise ConfigError(f"template recipe: prompt_template={ft.prompt_template} conflicts with "
                              f"--recipe.template {self.knobs.template}; set only the recipe's")
        return ft.replace(prompt_template=self.knobs.template)

    def attack(self, model, tokenizer, data, ft, log_path, desc, ctx) -> FinetuneResult:
        if self.knobs.template == "plain" and uses_fallback(tokenizer, "chat"):
            raise ConfigError("template: this model has no chat template, so its chat prompts already are the plain "
                              "format: plain is no shift here; choose alpaca or raw")
        if not self.knobs.train:
            return FinetuneResult(model, [], 0)
        return finetune(model, tokenizer, data.harmful, self.training_config(ft), log_path, desc=desc, ctx=ctx)

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {"template": trial.suggest_categorical("template", [t for t in PROMPT_TEMPLATES if t != "chat"])}


