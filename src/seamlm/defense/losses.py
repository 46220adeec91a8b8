"""The loss terms of SEAM: answer-only cross-entropy, L_up = CE(R), L_ul = -log(m + 1).

Every loss is evaluated on answer tokens only, and the LM head is applied only at those positions (the head of a
small model with a 49k vocabulary costs more than the model body; the logit lens multiplies that by L+1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seamlm.data.format import IGNORE_INDEX
from seamlm.errors import ConfigError

log = logging.getLogger(__name__)

UnlearnVariant = Literal["logit_lens", "final_layer"]

_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


@dataclass
class ModelParts:
    """The pieces of a causal LM the losses need: its body, final norm and output head."""

    decoder: Any
    final_norm: Any | None
    lm_head: Any
    softcap: float | None
    scale: float = 1.0
    """What the model's own forward multiplies its logits by (Cohere's ``logit_scale``, 1/Granite's
    ``logits_scaling``): the losses and the zero-shot scorer call the head directly, so they must apply it too."""

    @classmethod
    def of(cls, model: Any) -> ModelParts:
        decoder = model.get_decoder()
        norm = next((getattr(decoder, n) for n in _FINAL_NORM_NAMES if hasattr(decoder, n)), None)
        # a multimodal model (Gemma-3n …) keeps these on its text config
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

        def factor(key: str) -> float:
            return float(getattr(cfg, key, None) or 1.0)

        # Granite divides by logits_scaling, HyperCLOVAX multiplies (µP); Cohere's logit_scale, Falcon-H1's
        # lm_head_multiplier and output_multiplier multiply. check_logit_head tells a model none of these fit.
        scaling = factor("logits_scaling")
        scale = (factor("logit_scale") * factor("lm_head_multiplier") * factor("output_multiplier")
                 * (scaling if cfg.model_type.startswith("hyperclovax") else 1.0 / scaling))
        softcap = getattr(cfg, "final_logit_softcapping", None)
        return cls(decoder, norm, model.get_output_embeddings(), softcap, float(scale))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(hidden)
        if self.scale != 1.0:
            out = out * self.scale
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def check_logit_head(model: Any, name: str) -> None:
    """The losses, the attacks and the zero-shot scorer call the decoder and the output head themselves (the head
    only where an answer token is predicted): refuse a model whose own forward makes other logits of them (a
    scaling or cap :class:`ModelParts` does not know), which they would train and score in its place."""
    was_training = model.training
    try:
        parts = ModelParts.of(model)
        with torch.no_grad():
            model.eval()
            vocab = model.get_output_embeddings().weight.shape[0]
            ids = (torch.arange(1, 6) % vocab)[None].to(next(model.parameters()).device)
            theirs = model(input_ids=ids, use_cache=False).logits.float()
            ours = parts.logits(parts.decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
    except Exception as exc:  # noqa: BLE001 — an architecture the probe cannot run: say so, do not block the load
        log.warning("%s: could not check its output head against its forward (%s: %s)", name,
                    type(exc).__name__, exc)
        return
    finally:
        model.train(was_training)
    tol = (1e-3 if ours.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 3e-2)
    gap = (theirs - ours).abs().max().item()
    if not gap <= tol * max(1.0, theirs.abs().max().item()):
        raise ConfigError(f"{name} ({type(model).__name__}, model_type {model.config.model_type!r}) post-processes its "
                          f"logits in its forward in a way seamlm does not reproduce (max difference {gap:.3g}): SEAM, "
                          "the attacks and the zero-shot scorer would use other logits than it generates with. Its "
                          "scaling or cap goes in seamlm.defense.losses.ModelParts.of")


def _targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose *next* token is an answer token, and those next tokens (the causal shift)."""
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    if not keep.any():
        raise ValueError("batch has no answer tokens (every label is -100); check the data and max_length")
    return keep, shifted[keep]


def _ce(parts: ModelParts, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # at least fp32 log-softmax whatever the compute dtype: the vocabulary sum is where bf16 loses most
    # (float64 stays float64: the exactness tests and the distributed equivalence need it).
    logits = parts.logits(hidden)
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets)


def _lens_ce(parts: ModelParts, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _ce(parts, parts.final_norm(hidden), targets)


@dataclass
class HarmfulForward:
    """Answer-token CE of a batch through the final head, and through the logit lens of each earlier state."""

    ce_final: torch.Tensor
    ce_lens: list[torch.Tensor]

    @property
    def num_terms(self) -> int:
        return 1 + len(self.ce_lens)

    @property
    def mean_ce(self) -> torch.Tensor:
        """m = mean of the L+1 cross-entropies (just CE_final without the lens)."""
        return (self.ce_final + sum(self.ce_lens)) / self.num_terms


def answer_ce(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the batch (labels != -100), through the final head."""
    return harmful_forward(model, batch, "final_layer").ce_final


def harmful_forward(model: Any, batch: dict[str, torch.Tensor], variant: UnlearnVariant) -> HarmfulForward:
    """One forward pass giving CE_final and, for ``logit_lens``, CE_l = CE(lm_head(final_norm(h_l))).

    h_0 … h_{L-1} are the embedding output and the outputs of layers 1 … L-1; layer L's output goes through the
    final head, so there are L+1 terms (RepNoise's form). Each lens term is recomputed in backward
    (activation checkpointing) so that L+1 logit tensors are never held at once.
    """
    parts = ModelParts.of(model)
    lens = variant == "logit_lens"
    if lens and parts.final_norm is None:
        raise ConfigError(
            f"{type(model).__name__} has no recognisable final norm for the logit lens; use unlearn_loss=final_layer"
        )
    out = parts.decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        output_hidden_states=lens, use_cache=False,
    )
    keep, targets = _targets(batch["labels"])
    ce_final = _ce(parts, out.last_hidden_state[:, :-1][keep], targets)
    ce_lens: list[torch.Tensor] = []
    if lens:
        for h in out.hidden_states[:-1]:
            ce_lens.append(checkpoint(_lens_ce, parts, h[:, :-1][keep], targets, use_reentrant=False))
    return HarmfulForward(ce_final, ce_lens)


class AnswerLosses(torch.nn.Module):
    """:func:`harmful_forward` as the forward of one module around ``model``.

    The losses call the decoder and the head separately (the head only at answer positions), never the model's own
    forward, so an FSDP root placed on the model would not gather its embeddings, norm and head. With this module
    as the FSDP root they are gathered for the call and their gradients reduce-scattered after backward. Returns
    ``(ce_final, *ce_lens)``: plain tensors, which FSDP finds to hook its backward onto.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], variant: UnlearnVariant) -> tuple[torch.Tensor, ...]:
        hf = harmful_forward(self.model, batch, variant)
        return (hf.ce_final, *hf.ce_lens)


def unlearn_loss(mean_ce: torch.Tensor) -> torch.Tensor:
    """L_ul = -log(m + 1): bounded gradient ascent on the harmful answers (RepNoise / SEAM reference form)."""
    return -torch.log(mean_ce + 1.0)
