"""Defences behind one small base and a registry: ``seamlm defend --method NAME`` runs any of them, and a baseline
is a new file with a :func:`register_defense` class, not an edit of the command line, the demo or the attack.

A defence reads the three training streams it names (harmful Q+A H, harmful Q + refusal R, benign Q+A B — files or
a bundle's streams), trains the model and writes a plain Hugging Face directory ``OUT/model`` whose
``trained_prompts.txt`` lets ``seamlm attack`` and ``seamlm eval`` refuse held-out sets it trained on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from seamlm.config import BaseConfig
from seamlm.data.files import Example, load_examples
from seamlm.distributed import DistContext
from seamlm.errors import ConfigError, DataError

#: every stream a defence may train on, in the order ``--harmful --refusal --benign``
DEFENSE_STREAMS = ("harmful", "refusal", "benign")

StreamData = str | Path | list[Example]


class Defense(ABC):
    """One defence. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[BaseConfig]]
    """Its config dataclass: ``seamlm defend --method NAME --key value`` and ``--config YAML`` fill it."""
    streams: ClassVar[tuple[str, ...]]
    """The streams of :data:`DEFENSE_STREAMS` it trains on (the command line requires exactly these)."""
    resumable: ClassVar[bool] = False
    """Whether ``--resume`` continues a killed run (from its checkpoints)."""

    def __init__(self, config: BaseConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        if type(self.config) is not self.Config:
            raise ConfigError(f"defence {self.name} takes {self.Config.__name__}, got {type(self.config).__name__}")

    @classmethod
    def configure(cls, values: dict[str, Any], source: str, out_dir: str | Path) -> BaseConfig:
        """The config from YAML/command-line ``values`` (unknown keys are errors); ``out_dir`` is ``--out``."""
        return cls.Config.from_dict(values, source)

    @classmethod
    def check_out(cls, out_dir: str | Path, resume: bool) -> None:
        """Refuse ``out_dir`` before anything is loaded or written when the run cannot go there (e.g. it holds a
        finished or another run). Here: ``resume`` for a defence that keeps no checkpoints; subclasses add their
        folder checks."""
        if resume and not cls.resumable:
            raise ConfigError(f"--resume: defence {cls.name} keeps no checkpoints; rerun it without --resume, into "
                              "an empty --out")

    @classmethod
    def check_device(cls, config: Any, device: Any) -> None:
        """Refuse ``config`` on ``device`` (a ``torch.device``) before the model loads when it cannot run there (the
        base accepts every device)."""
        return None

    @classmethod
    def check_resume(cls, out_dir: str | Path, config: Any) -> None:
        """Refuse a ``--resume`` whose ``config`` differs from the unfinished run's before the model loads (a
        defence that keeps checkpoints checks their settings here; the base has none)."""
        return None

    @abstractmethod
    def run(self, model: Any, tokenizer: Any, data: dict[str, StreamData], out_dir: str | Path, *,
            resume: bool = False, run_info: dict[str, Any] | None = None, ctx: DistContext | None = None) -> Path:
        """Train ``model`` on ``data`` (a value per name of :attr:`streams`); write ``out_dir/model`` (on rank 0)
        and a per-step ``out_dir/log.jsonl``; return the model directory."""

    def examples(self, data: dict[str, StreamData]) -> dict[str, list[Example]]:
        """``data`` as examples (:func:`stream_examples`), checked: exactly :attr:`streams`, each non-empty."""
        missing, extra = [s for s in self.streams if s not in data], [s for s in data if s not in self.streams]
        if missing or extra:
            raise ConfigError(f"defence {self.name} trains on {', '.join(self.streams)}"
                              + (f"; missing {', '.join(missing)}" if missing else "")
                              + (f"; not used: {', '.join(extra)}" if extra else ""))
        return {name: stream_examples(data[name], name) for name in self.streams}


def stream_examples(value: StreamData, name: str) -> list[Example]:
    """One training stream as examples: a file read without de-duplication (H and R are row-aligned, and H may
    repeat a prompt with several answers) or a list taken as it is; empty is an error."""
    rows = load_examples(value, dedupe=False) if isinstance(value, (str, Path)) else list(value)
    if not rows:
        raise DataError(f"the {name} set is empty" + (f" ({value})" if isinstance(value, (str, Path)) else ""))
    return rows


DEFENSES: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    if not set(cls.streams) <= set(DEFENSE_STREAMS) or not cls.streams:
        raise ConfigError(f"defence {cls.name}: streams must be among {DEFENSE_STREAMS}, got {cls.streams}")
    if cls.name in DEFENSES and DEFENSES[cls.name] is not cls:
        raise ConfigError(f"defence name {cls.name!r} is taken by {DEFENSES[cls.name].__qualname__}: give "
                          f"{cls.__qualname__} another name")
    DEFENSES[cls.name] = cls
    return cls


def defense_class(name: str) -> type[Defense]:
    """The registered defence ``name`` (a clear error naming the known ones otherwise)."""
    if name not in DEFENSES:
        raise ConfigError(f"unknown defence '{name}'; known: {', '.join(DEFENSES)} (`seamlm defend --list-methods`)")
    return DEFENSES[name]
