"""Refusal-direction ablation (Arditi et al. 2024), a weight edit with no gradient step: SEAM's trap fires on
gradient descent, so this asks whether its refusals survive an attack that never descends."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seamlm.data.format import encode_prompts
from seamlm.errors import ConfigError, NonFiniteLossError
from seamlm.finetune import FinetuneResult
from seamlm.generation import eval_mode
from seamlm.recipes.base import AttackRecipe, RecipeKnobs, register


@dataclass
class AblationKnobs(RecipeKnobs):
    layer: int | None = None
    """Residual stream entering this decoder layer (0 = the embeddings); None = ``layer_fraction`` of the depth."""
    layer_fraction: float = 0.6
    """With ``layer`` None: the layer at this fraction of the depth, rounded (the knob a sweep searches, since it
    means the same on any depth)."""
    n_prompts: int = 64
    """Harmful prompts (attack set) and harmless prompts (attacker benign set) averaged for the direction."""
    writers: tuple[str, ...] = ("o_proj", "down_proj")
    """Modules that write to the residual stream; the input embeddings are always edited too."""
    batch_size: int = 16
    """Prompts per forward pass."""

    def validate(self) -> None:
        self._require([(self.n_prompts >= 1, "n_prompts must be >= 1"), (self.batch_size >= 1, "batch_size >= 1"),
                       (self.layer is None or self.layer >= 0, "layer must be >= 0 or None"),
                       (0 <= self.layer_fraction < 1, "layer_fraction must be in [0, 1)"),
                       (bool(self.writers), "writers must name at least one module")])


def _residual_states(model: Any, tokenizer: Any, prompts: list[str], template: str) -> tuple[tuple, torch.Tensor]:
    """``hidden_states`` of left-padded ``prompts`` (the stream entering each decoder layer, then the final norm's
    output) and their attention mask; positions count from each row's first real token."""
    enc = encode_prompts(tokenizer, prompts, template, device=next(model.parameters()).device)
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model(**enc, position_ids=positions, output_hidden_states=True).hidden_states, enc["attention_mask"]


@torch.no_grad()
def mean_last_token_state(model: Any, tokenizer: Any, prompts: list[str], layer: int, batch_size: int = 16,
                          template: str = "chat") -> torch.Tensor:
    """Mean residual-stream vector entering ``layer`` at the last prompt token (the position that answers)."""
    total = None
    with eval_mode(model):  # no dropout in the states the direction is taken from
        for i in range(0, len(prompts), batch_size):
            # left padded: the last position is the last real token of every row
            states = _residual_states(model, tokenizer, prompts[i:i + batch_size], template)[0][layer][:, -1].double()
            total = states.sum(0) if total is None else total + states.sum(0)
    return total / len(prompts)


def _diverged(model: Any, message: str) -> NonFiniteLossError:
    """The error of an ablation on non-finite states, carrying the model as it is: the grid records the cell as
    diverged and evaluates that model, as for a fine-tuning attack that diverged."""
    err = NonFiniteLossError(message)
    err.model = model
    return err


@torch.no_grad()
def residual_share_along(model: Any, tokenizer: Any, prompts: list[str], direction: torch.Tensor,
                         template: str = "chat") -> float:
    """The largest |h·r| / |h| over the residual states entering every decoder layer (the embeddings up to the last
    layer's input; the final norm's output is not the stream) at the prompts' real tokens: ≈ 0 after a complete
    ablation."""
    r = (direction / direction.norm()).to(next(model.parameters()).device, torch.float64)
    with eval_mode(model):
        hidden, mask = _residual_states(model, tokenizer, prompts, template)
    worst = 0.0
    for h in hidden[:-1]:
        h = h.double()[mask.bool()]
        share = ((h @ r).abs() / h.norm(dim=-1).clamp(min=1e-12)).max().item()
        if math.isnan(share):
            return math.nan  # max() would skip it
        worst = max(worst, share)
    return worst


def residual_writers(model: Any, names: tuple[str, ...]) -> list[torch.nn.Module]:
    found = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names and isinstance(m, torch.nn.Linear)]
    if not found:
        raise ConfigError(f"ablation: no Linear modules named {list(names)} in this model")
    return found


@torch.no_grad()
def orthogonalize(model: Any, direction: torch.Tensor, writers: tuple[str, ...] = ("o_proj", "down_proj")) -> int:
    """Project ``direction`` out of every weight that writes to the residual stream: W ← (I − r rᵀ) W for the
    writers' outputs and each embedding row. A tied output head is untied first so that only writes change.
    Returns the number of edited tensors."""
    r = direction / direction.norm()
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    edited = 0
    for w in [emb.weight] + [m.weight for m in residual_writers(model, writers)]:
        rr = r.to(w.device, torch.float64)
        w64 = w.double()
        if w is emb.weight:  # rows are residual vectors: E ← E − (E r) rᵀ
            w.copy_(w64 - torch.outer(w64 @ rr, rr))
        else:  # outputs along dim 0: W ← W − r (rᵀ W)
            w.copy_(w64 - torch.outer(rr, rr @ w64))
        edited += 1
    for m in residual_writers(model, writers):
        if m.bias is not None:
            b = m.bias.double()
            m.bias.copy_(b - (b @ r.double()) * r.double())
    return edited


@register
class RefusalAblation(AttackRecipe):
    name = "ablation"
    summary = "weight-free: project the harmful-minus-harmless mean activation direction out of every residual writer"
    Knobs = AblationKnobs
    trains = False  # type: ignore[assignment]  (a weight edit: no gradient step)
    needs_benign = True

    def suggest(self, trial: Any) -> dict[str, Any]:
        # the direction's layer moves the result most (Arditi et al. sweep it too); fractions, not indices, because
        # the recipe does not know the model's depth here
        return {"layer_fraction": trial.suggest_categorical("layer_fraction", [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
                "n_prompts": trial.suggest_categorical("n_prompts", [16, 32, 64])}

    def attack(self, model, tokenizer, data, ft, log_path, desc, ctx) -> FinetuneResult:
        k = self.knobs
        n_layers = model.config.num_hidden_layers
        layer = min(n_layers - 1, round(k.layer_fraction * n_layers)) if k.layer is None else k.layer
        if layer >= n_layers:
            raise ConfigError(f"ablation: layer {layer} >= the model's {n_layers} layers")
        harmful = [e.prompt for e in data.harmful[: k.n_prompts]]
        harmless = [e.prompt for e in data.benign[: k.n_prompts]]
        mu_h = mean_last_token_state(model, tokenizer, harmful, layer, k.batch_size, ft.prompt_template)
        mu_b = mean_last_token_state(model, tokenizer, harmless, layer, k.batch_size, ft.prompt_template)
        direction = mu_h - mu_b
        if not torch.isfinite(direction).all():
            raise _diverged(model, f"ablation: the mean residual states at layer {layer} are not finite (an "
                                   "overflowing half-precision model or broken weights): nothing to ablate; check "
                                   "the model's weights")
        if direction.norm() <= 1e-6 * max(mu_h.norm(), mu_b.norm()):
            # layer 0 is the embeddings, and a chat template ends every prompt with the same token
            raise ConfigError(f"ablation: harmful and harmless prompts have the same mean state at layer {layer} "
                              f"(no direction to ablate): choose a later --recipe.layer / --recipe.layer_fraction")
        edited = orthogonalize(model, direction, k.writers)
        left = residual_share_along(model, tokenizer, harmful[: k.batch_size], direction, ft.prompt_template)
        if math.isnan(left):  # the edited model's states overflow somewhere: a divergence, not an architecture
            raise _diverged(model, "ablation: the edited model's residual states are not finite; try another "
                                   "--recipe.layer or check the model's weights")
        if left > 1e-4:
            # e.g. Gemma2/3 and OLMo2: a weighted norm sits between o_proj/down_proj and the residual stream
            raise ConfigError(f"ablation: after editing {list(k.writers)} the residual stream still carries "
                              f"{100 * left:.2f} % of its norm along the direction: this architecture writes to the "
                              f"residual stream through modules the edit cannot reach (a norm after each sublayer?); "
                              f"name them in --recipe.writers or use a model without post-sublayer norms")
        info = {"layer": layer, "harmful_prompts": len(harmful), "harmless_prompts": len(harmless),
                "direction_norm": direction.norm().item(), "edited_tensors": edited, "residual_share_left": left}
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).with_name("ablation.json").write_text(json.dumps(info, indent=2))
        return FinetuneResult(model, [], 0, [info])
