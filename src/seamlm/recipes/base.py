"""Attack recipes: how an adversary turns harmful data into a harmful model. One small class per recipe behind
:class:`AttackRecipe` and a registry; every recipe that trains runs :func:`seamlm.finetune.finetune` through its
hooks (loss, gradient transform, parameter selection) or its data, never a copy of the loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from seamlm.config import BaseConfig
from seamlm.data.files import Example
from seamlm.distributed import DistContext
from seamlm.errors import ConfigError, DataError
from seamlm.finetune import FinetuneConfig, FinetuneResult, check_launch


@dataclass
class RecipeKnobs(BaseConfig):
    """A recipe's own settings (``--recipe.KEY VALUE`` on the command line). Plain SFT has none: its hardened
    knobs — clipping, schedule, warm-up, batch size, optimizer, epochs — are the fine-tuning fields themselves."""


@dataclass
class AttackData:
    """What the attacker holds: the harmful budget (the same examples as the plain attack) and benign Q+A disjoint
    from the defence's benign data (the bundle's ``attack_benign`` stream)."""

    harmful: list[Example]
    benign: list[Example]


class AttackRecipe(ABC):
    """One attack. ``attack`` returns the attacked model (and its per-step log when it trains)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Knobs: ClassVar[type[RecipeKnobs]] = RecipeKnobs
    needs_benign: ClassVar[bool] = False

    def __init__(self, knobs: RecipeKnobs | None = None):
        self.knobs = knobs if knobs is not None else self.Knobs()
        if type(self.knobs) is not self.Knobs:
            raise ConfigError(f"recipe {self.name} takes {self.Knobs.__name__}, got {type(self.knobs).__name__}")

    @abstractmethod
    def attack(self, model: Any, tokenizer: Any, data: AttackData, ft: FinetuneConfig, log_path: Path,
               desc: str, ctx: DistContext) -> FinetuneResult:
        """Attack ``model``; ``ft`` is the fine-tuning recipe of this cell, ``log_path`` its per-step JSONL log."""

    @property
    def trains(self) -> bool:
        """False for attacks without gradient steps (a weight edit, a prompt change): learning rates do not apply."""
        return True

    @property
    def logs_harmful_loss(self) -> bool:
        """Whether the per-step log's ``harmful_ce`` (or, without it, ``loss``) is the CE of harmful answers only —
        the attack-loss figures of the results. False for a stream that mixes in benign examples."""
        return self.trains

    def training_config(self, ft: FinetuneConfig) -> FinetuneConfig:
        """The fine-tuning config this recipe trains with (and whose prompt template the evaluation uses)."""
        return ft

    def lora_config(self, model: Any, ft: FinetuneConfig) -> FinetuneConfig:
        """The LoRA layers and target modules it trains on ``model`` (which may be a meta-device skeleton) when
        ``ft.lora`` is on: ``ft``'s own unless the recipe chooses them."""
        return ft

    @property
    def changes_loss_or_gradients(self) -> bool:
        """Whether it trains through a loss or gradient hook (which runs in one process only)."""
        return False

    @property
    def trains_chosen_parameters(self) -> bool:
        """Whether it trains chosen parameters only (which runs unsharded)."""
        return False

    def check_launch(self, ctx: DistContext, ft: FinetuneConfig) -> None:
        """Refuse, before anything runs, a launch (processes, sharding) this recipe cannot train under."""
        if self.trains:
            check_launch(ctx, self.training_config(ft), self.changes_loss_or_gradients, self.trains_chosen_parameters)

    def check_data(self, data: AttackData) -> None:
        if not data.harmful:
            raise DataError(f"recipe {self.name}: no harmful examples")
        if self.needs_benign and not data.benign:
            raise DataError(f"recipe {self.name} needs benign attacker data: the bundle's attack_benign stream is "
                            f"empty (rebuild the bundle with this seamlm: `seamlm data build NAME --out DIR`)")

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Knob values for one Optuna trial (``seamlm sweep``); {} when the recipe has nothing to search."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"recipe": self.name, "knobs": self.knobs.to_dict()}


RECIPES: dict[str, type[AttackRecipe]] = {}


def register(cls: type[AttackRecipe]) -> type[AttackRecipe]:
    RECIPES[cls.name] = cls
    return cls


def make_recipe(name: str, knobs: dict[str, Any] | None = None) -> AttackRecipe:
    """The recipe ``name`` with ``knobs`` (unknown knobs and bad values are errors)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown attack recipe '{name}'; known: {', '.join(RECIPES)} (`seamlm attack --list-recipes`)")
    cls = RECIPES[name]
    return cls(cls.Knobs.from_dict(dict(knobs or {}), f"recipe {name}"))
