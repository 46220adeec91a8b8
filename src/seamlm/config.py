"""Dataclass configs: YAML files plus ``--key value`` overrides; unknown keys are errors, never ignored."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar

import yaml

from seamlm.errors import ConfigError

C = TypeVar("C", bound="BaseConfig")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"config key '{name}' may not be empty (expected {getattr(inner, '__name__', inner)})")
    origin = typing.get_origin(inner)
    if origin is tuple:
        item_type = typing.get_args(inner)[0]
        if isinstance(value, str):
            items = value.split(",")
        else:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
        items = [i.strip() if isinstance(i, str) else i for i in items]
        if not items or any(i == "" for i in items):
            raise ConfigError(f"config key '{name}' needs a comma-separated list, got {value!r}")
        return tuple(_coerce(name, i, item_type) for i in items)
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"config key '{name}' must be one of {list(choices)}, got {value!r}")
        return value
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            if isinstance(value, str) and "e" in value.lower():  # "1e3"; "5e-1" is not a whole number
                value = float(value)
                if not value.is_integer():
                    raise ValueError(value)
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):  # no setting means nan or inf: it would only fail steps later, or never
                raise ConfigError(f"config key '{name}' must be a finite number, got {value!r}")
            return number
        if inner is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{name}' expects {getattr(inner, '__name__', inner)}, got {value!r}"
        ) from None
    return value


def unknown_keys(unknown: list[str], valid: list[str]) -> str:
    """``'k' (did you mean 'key'?)``, … for keys that are not among ``valid``."""
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, valid, n=1)
        hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return ", ".join(hints)


#: The seeds every library a run seeds accepts: numpy and Optuna's samplers take 0 … 2**32 − 1 (torch more).
MAX_SEED = 2**32 - 1


def is_seed_field(name: str) -> bool:
    return name in ("seed", "seeds") or name.endswith("_seed")


def check_seed(name: str, value: int) -> int:
    """``value`` when it is a seed every library here takes, else a ConfigError naming ``name``."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be in 0 … {MAX_SEED} (the seeds numpy and Optuna take), got {value}")
    return value


@dataclasses.dataclass
class BaseConfig:
    """Shared behaviour of every seamlm config: strict construction, YAML, overrides, validation."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_keys(cls, values: Collection[str], source: str) -> None:
        """Raise ConfigError naming ``source`` when ``values`` holds a key that is no field."""
        unknown = [k for k in values if k not in cls.field_names()]
        if unknown:
            raise ConfigError(
                f"{source}: unknown {cls.__name__} key(s) {unknown_keys(unknown, cls.field_names())}. "
                + (f"Valid keys: {', '.join(cls.field_names())}" if cls.field_names() else "It takes no keys.")
            )

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
        cls.check_keys(values, source)
        return cls(**values)

    def __post_init__(self) -> None:
        # Coerce every field by its type (so "5" -> 5, "1e-4,2e-4" -> (1e-4, 2e-4)) and validate, however built.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # a list field whose default is empty (or marked may_be_empty) may be set empty ("" on the command line)
            empty = (f.default == () or f.metadata.get("may_be_empty")) and value in ((), [], "")
            object.__setattr__(self, f.name, () if empty else _coerce(f.name, value, hints[f.name]))
            if is_seed_field(f.name):
                for seed in getattr(self, f.name) if f.name == "seeds" else (getattr(self, f.name),):
                    check_seed(f.name, seed)
        self.validate()

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None) -> C:
        cls.check_keys(overrides or {}, "command line")  # a typo there is not the file's
        data = read_yaml_mapping(path)
        data.update(overrides or {})
        return cls.from_dict(data, source=str(path))

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_dict_omitting_defaults(self, names: Collection[str]) -> dict[str, Any]:
        """:meth:`to_dict` without those of ``names`` left at their default: fields a stored settings digest
        leaves out unless set, so results made before such a field existed keep their digests."""
        d, default = self.to_dict(), type(self)().to_dict()
        return {k: v for k, v in d.items() if not (k in names and v == default[k])}

    def changed_from(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Fields whose value differs from ``saved`` (an earlier :meth:`to_dict`), as name -> (then, now). A field
        added since ``saved`` was written counts at its default (it did not exist, so it was off); a key of
        ``saved`` that is no field any more counts as changed."""
        now = self.to_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        then = {k: saved.get(k, defaults.get(k)) for k in {*saved, *now}}
        then = {k: list(v) if isinstance(v, tuple) else v for k, v in then.items()}  # as to_dict writes them
        return {k: (then[k], now.get(k)) for k in sorted(then) if then[k] != now.get(k)}

    def to_yaml(self, path: str | Path) -> None:
        """Write the config as YAML (atomically: a resumed run reads it back, and a full disk must not cut it)."""
        from seamlm.jsonl import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> None:
        """Raise ConfigError for values that are well-typed but meaningless. Subclasses extend this."""

    def _require(self, checks: list[tuple[bool, str]]) -> None:
        """Raise one ConfigError naming every failed ``(condition, message)``."""
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(bad))


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """Turn ``["--steps", "5", "--beta=0.1"]`` into ``{"steps": "5", "beta": "0.1"}``.

    Dashes in keys become underscores (``--warmup-ratio`` == ``--warmup_ratio``). A key without a value
    is an error rather than a silent boolean, so that a typo cannot swallow the next option.
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("-v", "--verbose"):
            raise ConfigError(f"{tok} goes before the sub-command: seamlm -v COMMAND …")
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: overrides are written --key value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(f"option --{key} needs a value: --{key} VALUE or --{key}=VALUE (a flag of another "
                                  "sub-command is not one of this one's: see its --help)")
            value = tokens[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key in out:  # the later one would silently win
            raise ConfigError(f"option --{key} is given twice ({out[key]!r} and {value!r}): give it once")
        out[key] = value
    return out


def warmup_check(lr_scheduler: str, warmup_ratio: float) -> tuple[bool, str]:
    """A ``_require`` check for configs with a schedule: transformers' ``constant`` schedule ignores warm-up."""
    return (lr_scheduler != "constant" or warmup_ratio == 0,
            "lr_scheduler constant has no warm-up (transformers ignores it): set warmup_ratio 0 or use "
            "constant_with_warmup")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden, by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (the later one would silently win)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The ``key: value`` mapping of a YAML config file, with a clear error for a missing or malformed file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; name a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as "
                          "UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    named = [k for k in data if not isinstance(k, str)]
    if named:  # YAML reads `1:` as a number and `on:`/`yes:` as true
        raise ConfigError(f"config file {path}: keys are field names, got {', '.join(repr(k) for k in named)} (quote "
                          "a key YAML reads as a number or a boolean, or correct it)")
    return data
