"""Named bundles: which sources feed H, R, B, the attack set and the evaluation prompts, split without leakage.

``seamlm data build offline-default --out DIR`` writes one JSONL per stream plus ``manifest.json``;
``seamlm defend --data offline-default`` (or ``--data DIR``) trains on the defence streams.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seamlm.data.files import Example, load_examples
from seamlm.data.refusals import refusal_for
from seamlm.data.sources import get_source, load_source, pyrit_labelled
from seamlm.data.splits import (
    assign_splits,
    categories_of,
    check_disjoint,
    hashes,
    near_duplicates,
    overlaps,
    prompt_hash,
    resolve_categories,
    split_manifest,
    without_answers_of,
)
from seamlm.errors import DataError
from seamlm.jsonl import records_text

log = logging.getLogger(__name__)

#: Files of a built bundle, stream -> file name.
STREAM_FILES = {
    "harmful": "defense_harmful.jsonl",     # H: harmful prompt + harmful answer
    "refusal": "defense_refusal.jsonl",     # R: the same prompts (row-aligned) + refusals
    "benign": "defense_benign.jsonl",       # B: benign prompt + answer
    "attack": "attack_harmful.jsonl",       # harmful Q+A for the fine-tuning attack (disjoint prompts)
    "eval_harmful": "eval_harmful.jsonl",   # held-out harmful prompts for HS (responses empty)
    "benign_heldout": "benign_heldout.jsonl",  # held-out benign Q+A for coherence / perplexity
    "attack_benign": "attack_benign.jsonl",  # benign Q+A an adaptive attacker mixes in (disjoint from B)
}
#: Streams a bundle built before they existed may lack (loaded as empty; the recipes that need them say so).
OPTIONAL_STREAMS = {"attack_benign"}
MANIFEST = "manifest.json"
#: sha256 of each stream file as the build wrote it: the manifest digests prompts only, so an answer edited by hand
#: afterwards would otherwise keep the bundle's identity (and a resumed grid would reuse cells made before the edit)
CONTENTS = "contents.json"


@dataclass
class BundleData:
    streams: dict[str, list[Example]]
    manifest: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.streams.items()}

    def _text(self, stream: str) -> str:
        """The JSONL text of one stream's file."""
        return records_text(({"prompt": e.prompt, "response": e.response, "category": e.category, "label": e.label,
                              "source": e.source} for e in self.streams[stream]), ensure_ascii=False)

    def write(self, out_dir: str | Path) -> Path:
        """Write one JSONL per stream, then ``manifest.json`` — the mark of a complete bundle, so a killed build
        leaves none (a new folder is written beside it and renamed into place; an existing empty one, or one holding
        only a killed build's files, in place). The same bundle already there (the manifest holds each split's
        digest) is kept, with a warning when its rows differ; another one is refused, not overwritten, since runs
        trained on it name it by path."""
        out = Path(out_dir).expanduser().resolve()  # '.', a symlink: the folder itself
        if (out / MANIFEST).is_file():
            try:
                old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise DataError(f"{out / MANIFEST} is not valid JSON (a cut-off write?); delete {out} to rebuild "
                                "the bundle there") from None
            if old == self.manifest:
                # the manifest digests prompts only: answers, refusals, labels or categories may come from another
                # seamlm or source package version. Kept (a resumed run goes on with the data it trained on), said.
                stale = [f for stream, f in STREAM_FILES.items()
                         if not (out / f).is_file() or (out / f).read_text(encoding="utf-8") != self._text(stream)]
                edited = _edited_files(out)
                if edited:
                    log.warning("%s holds this bundle's splits but %s changed since its build (contents.json): "
                                "kept, and loaded as another bundle; delete the folder to build it anew", out,
                                ", ".join(edited))
                elif stale:
                    log.warning("%s holds this bundle's splits but other rows in %s (built by another seamlm or "
                                "source package version): kept, as runs trained on it expect; delete the folder (seamlm "
                                "demo: --fresh, or another --out) to build this version's", out, ", ".join(stale))
                return out
            changed = sorted(k for k in {*old, *self.manifest} if old.get(k) != self.manifest.get(k))
            raise DataError(f"{out} holds a bundle built with other settings (differs in: {', '.join(changed)}); "
                            "choose another --out, or delete that folder to rebuild it")
        check_bundle_target(out)
        target = out if out.is_dir() else out.with_name(out.name + ".partial")
        if target != out and target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        for stream, fname in STREAM_FILES.items():
            (target / fname).write_text(self._text(stream), encoding="utf-8")
        (target / CONTENTS).write_text(json.dumps({f: _sha256(target / f) for f in STREAM_FILES.values()}, indent=1),
                                       encoding="utf-8")
        (target / MANIFEST).write_text(json.dumps(self.manifest, indent=2), encoding="utf-8")
        if target != out:
            os.replace(target, out)
        return out


def check_bundle_target(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` a bundle cannot be written to: a file, or a folder holding other files than a bundle's
    (a finished bundle, or a killed build's stream files, is fine). Callable before the build, so the error comes first."""
    out = Path(out_dir).expanduser().resolve()
    ours = {*STREAM_FILES.values(), MANIFEST, CONTENTS}
    if out.exists() and (not out.is_dir() or any(p.name not in ours for p in out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder or a bundle; choose a new --out")


@dataclass(frozen=True)
class Bundle:
    name: str
    description: str
    sources: dict[str, list[str]]
    build: Callable[..., BundleData]


BUNDLES: dict[str, Bundle] = {}


def get_bundle(name: str) -> Bundle:
    if name not in BUNDLES:
        raise DataError(f"unknown data bundle '{name}'; available: {', '.join(sorted(BUNDLES))}")
    return BUNDLES[name]


def bundle_options(name: str, options: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> keyword arguments of bundle ``name``'s builder (integers where the builder's default
    is one); an unknown key or a malformed option is an error naming the builder's options."""
    import inspect

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    # the options a command line can give: sizes (int) and files (*_path); seed and hold-out have their own flags
    params = {k: p for k, p in inspect.signature(get_bundle(name).build).parameters.items()
              if k != "seed" and (k.endswith("_path") or is_int(p.default))}
    known = ", ".join(params) or "none"
    out: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in params:
            raise DataError(f"--option {option!r}: bundle '{name}' takes KEY=VALUE with KEY one of: {known}")
        if key in out:  # the later one would silently win
            raise DataError(f"--option {option!r}: {key} is given twice; give it once")
        if is_int(params[key].default):
            try:
                out[key] = int(value)
            except ValueError:
                raise DataError(f"--option {option!r}: {key} takes an integer") from None
        elif key.endswith("_path") and not Path(value).is_file():
            raise DataError(f"--option {option!r}: no such file")
        else:
            out[key] = value
    return out


def build_bundle(name: str, seed: int = 0, holdout_categories: tuple[str, ...] = (), **kwargs: Any) -> BundleData:
    return get_bundle(name).build(seed=seed, holdout_categories=tuple(holdout_categories), **kwargs)


def load_built(directory: str | Path) -> BundleData:
    """Read a bundle written by :meth:`BundleData.write` (checks that every file is there)."""
    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise DataError(f"{d} is not a built data bundle (no {MANIFEST}); run `seamlm data build NAME --out {d}`")
    streams = {}
    for stream, fname in STREAM_FILES.items():
        if stream in OPTIONAL_STREAMS and not (d / fname).is_file():
            log.warning("%s has no %s (built by an older seamlm); rebuild it for adaptive attacks", d, fname)
            streams[stream] = []
            continue
        # no de-duplication: R is row-aligned with H, and H may hold several answers to one prompt
        streams[stream] = load_examples(d / fname, require_response=stream != "eval_harmful", dedupe=False)
    h, r = streams["harmful"], streams["refusal"]
    if len(h) != len(r) or any(prompt_hash(a.prompt) != prompt_hash(b.prompt) for a, b in zip(h, r, strict=False)):
        raise DataError(f"{d}: {STREAM_FILES['refusal']} must hold the prompts of {STREAM_FILES['harmful']} row by "
                        f"row; rebuild the bundle")
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{d / MANIFEST} is not valid JSON ({exc}); rebuild the bundle with `seamlm data build`") from None
    # a folder edited by hand (a row pasted into the attack file …) must not leak into a run unseen
    for group in manifest.get("disjoint_groups", []):
        bad = overlaps({k: streams[k] for k in group if k in streams})
        if bad:
            raise DataError(f"{d}: streams that must share no prompt do ({bad}); the folder was changed after "
                            f"`seamlm data build` — rebuild it")
    edited = _edited_files(d)
    if edited:
        # another bundle now: its identity (the results' data digest) gains the edited files' digests, so cells made
        # on the bundle as built are neither reused nor set beside new ones under one label
        log.warning("%s: %s changed since `seamlm data build` (%s differs): the runs on it count it as another "
                    "bundle", d, ", ".join(edited), CONTENTS)
        manifest = {**manifest, "edited_after_build": edited}
    return BundleData(streams, manifest)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edited_files(d: Path) -> dict[str, str]:
    """The stream files whose bytes differ from the build's record (file -> its sha256 now, or "missing"); none for
    a bundle built before the record existed."""
    if not (d / CONTENTS).is_file():
        return {}
    try:
        built = json.loads((d / CONTENTS).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{d / CONTENTS} is not valid JSON ({exc}); rebuild the bundle with `seamlm data build`") from None
    now = {f: _sha256(d / f) if (d / f).is_file() else "missing" for f in built}
    return {f: h for f, h in now.items() if h != built[f]}


def resolve_data(spec: str, seed: int = 0) -> BundleData:
    """``spec`` is a built bundle directory (its own seed applies) or a bundle name (built in memory with ``seed``).

    The split seed is a property of the data, not of a training run: defence, attack and evaluation must use the
    same one, or the attack set may overlap the defence set.
    """
    if Path(spec).is_dir():
        return load_built(spec)
    if spec not in BUNDLES:
        raise DataError(f"--data {spec}: no such directory, and not a bundle name (available: "
                        f"{', '.join(sorted(BUNDLES))}); give a folder written by `seamlm data build` or a name")
    return build_bundle(spec, seed=seed)


def _refusals_by_prompt(rows: list[Example]) -> dict[str, list[Example]]:
    """The rows labelled ``refusal``, by prompt hash (what :func:`_pair_refusals` pairs H with)."""
    out: dict[str, list[Example]] = {}
    for e in rows:
        if e.label == "refusal":
            out.setdefault(prompt_hash(e.prompt), []).append(e)
    return out


def _pair_refusals(harmful: list[Example], refusals_by_prompt: dict[str, list[Example]], seed: int) -> list[Example]:
    """R row i = prompt of H row i + a human-labelled refusal of that prompt if one exists, else a template."""
    out, seen = [], {}
    for e in harmful:
        h = prompt_hash(e.prompt)
        k = seen[h] = seen.get(h, -1) + 1  # k-th answer to this prompt gets the k-th refusal (cycling)
        real = refusals_by_prompt.get(h)
        if real:
            pick = real[k % len(real)]
            out.append(Example(e.prompt, pick.response, e.category, "refusal", pick.source))
        else:
            out.append(Example(e.prompt, refusal_for(f"{e.prompt}#{k}", seed), e.category, "refusal", "template"))
    return out


#: fewer HS prompts than this and one prompt moves HS by more than 5 points
MIN_HS_PROMPTS = 20


def _check_filled(streams: dict[str, list[Example]], holdout: tuple[str, ...], pool: list[Example],
                  bundle: str = "offline-default") -> None:
    """A hold-out of a small category can leave the attack or HS set empty (a bundle no run could load) or HS on a
    handful of prompts: refuse the first, warn about the second."""
    def what() -> str:  # counted only for a message
        if not holdout:
            return "this build"
        held = {prompt_hash(e.prompt) for e in pool if categories_of(e) & {c.strip().casefold() for c in holdout}}
        return f"holding out {', '.join(holdout)} ({len(held)} harmful prompts)"

    empty = [k for k, rows in streams.items() if not rows]
    if empty:
        fix = ("hold out a category with more rows, or several (an unknown category's error lists them all)"
               if holdout else "the sources ran out of rows for them: lower the sizes of the streams drawn from the same "
               "source (an unknown --option lists the sizes), or give larger source files")
        raise DataError(f"{bundle}: {what()} leaves {', '.join(empty)} empty: {fix}")
    if len(streams["eval_harmful"]) < MIN_HS_PROMPTS:
        log.warning("%s: %s leaves %d HS prompts: each one moves HS by %.0f points", bundle, what(),
                    len(streams["eval_harmful"]), 100 / len(streams["eval_harmful"]))


def _check_groups(streams: dict[str, list[Example]], groups: list[list[str]]) -> None:
    """Each group's streams share no prompt; reworded repeats across them (near duplicates) are logged."""
    for group in groups:
        check_disjoint({k: streams[k] for k in group})
        near = near_duplicates({k: streams[k] for k in group})
        if near:
            log.info("near-duplicate prompts across disjoint streams (word Jaccard >= 0.8, another normalised text; "
                     "counted in the second stream): %s", near)


def _log_shared_answers(bundle: str, n: int) -> None:
    if n:
        log.info("%s: %d attack row(s) left out: their answer is one the defence trains on (under another prompt)",
                 bundle, n)


#: zero-shot tasks whose rows feed offline-default's training streams (PIQA feeds B): not utility measures there
OFFLINE_DEFAULT_ZS_EXCLUDE = ("piqa",)


def _offline_default(seed: int = 0, holdout_categories: tuple[str, ...] = (),
                     fractions: dict[str, float] | None = None, benign_piqa: int = 400,
                     benign_heldout: int = 100, attack_benign: int = 200) -> BundleData:
    fractions = fractions or {"defense": 0.45, "attack": 0.45, "eval": 0.10}
    sizes = {"benign_piqa": (benign_piqa, 0), "benign_heldout": (benign_heldout, 1), "attack_benign": (attack_benign, 1)}
    bad = [f"{k} must be >= {low}" for k, (v, low) in sizes.items() if v < low]
    if bad:
        raise DataError(f"offline-default bundle: {', '.join(bad)}")
    labelled = pyrit_labelled()
    harmful_pool = [e for e in labelled if e.label == "harmful"]
    holdout_categories = resolve_categories(holdout_categories, {c for e in harmful_pool for c in categories_of(e)})
    refusals = _refusals_by_prompt(labelled)

    split = assign_splits(harmful_pool, fractions, seed, holdout_categories)
    check_disjoint(split)
    used = hashes(split["defense"]) | hashes(split["attack"])
    split["attack"], shared_answers = without_answers_of(split["attack"], split["defense"])
    _log_shared_answers("offline-default", shared_answers)

    # HS prompts: the held-out pool prompts (one row per prompt) + HarmBench, minus anything seen in training.
    eval_rows: dict[str, Example] = {}
    # with a category hold-out, HS must measure the held-out categories: HarmBench's prompts span the trained ones
    candidates = split["eval"] + ([] if holdout_categories else load_source("harmbench"))
    if holdout_categories:
        log.info("HS prompts: held-out categories only (HarmBench left out: its prompts cover the trained ones)")
    for e in candidates:
        h = prompt_hash(e.prompt)
        if h not in used and h not in eval_rows:
            eval_rows[h] = Example(e.prompt, "", e.category, None, e.source)
    log.info("HS prompts: %d of %d candidates (%d repeat a prompt or were seen in defence/attack data)",
             len(eval_rows), len(candidates), len(candidates) - len(eval_rows))

    # B: ForgeLM chats + a seeded PIQA subset; the next PIQA rows are the held-out benign set, then the benign
    # rows an adaptive attacker may use (disjoint from both).
    import random

    piqa = load_source("piqa-benign")
    random.Random(seed).shuffle(piqa)
    benign = load_source("forgelm-chat") + piqa[:benign_piqa]
    # PIQA repeats some goals: each later set skips the goals of the sets before it
    seen_benign, heldout, rest = hashes(benign), [], piqa[benign_piqa:]
    for i, e in enumerate(rest):
        if len(heldout) == benign_heldout:
            rest = rest[i:]
            break
        if prompt_hash(e.prompt) not in seen_benign:
            heldout.append(e)
    seen_benign |= hashes(heldout)
    attacker_benign = [e for e in rest if prompt_hash(e.prompt) not in seen_benign][:attack_benign]

    streams = {
        "harmful": split["defense"],
        "refusal": _pair_refusals(split["defense"], refusals, seed),
        "benign": benign,
        "attack": split["attack"],
        "eval_harmful": list(eval_rows.values()),
        "benign_heldout": heldout,
        "attack_benign": attacker_benign,
    }
    _check_filled(streams, holdout_categories, harmful_pool)
    groups = [["harmful", "attack", "eval_harmful"], ["benign", "benign_heldout", "attack_benign"]]
    _check_groups(streams, groups)
    manifest = split_manifest(
        streams, seed, disjoint=groups,
        bundle="offline-default", fractions=fractions, holdout_categories=list(holdout_categories),
        sources={k: get_source(k).origin for k in BUNDLES["offline-default"].sources["all"]},
        refusals_from_data=sum(1 for e in streams["refusal"] if e.source != "template"),
        zero_shot_exclude=list(OFFLINE_DEFAULT_ZS_EXCLUDE), attack_rows_with_a_defence_answer=shared_answers,
    )
    return BundleData(streams, manifest)


BUNDLES["offline-default"] = Bundle(
    "offline-default",
    "Harmful Q+A with human labels from PyRIT's scorer evaluations, split by prompt into defence / attack / eval "
    "(45/45/10 %); R pairs each defence prompt with a human-labelled refusal of it where PyRIT has one, else a "
    "varied template refusal; B = ForgeLM chats + 400 PIQA goal->solution pairs; HS prompts = the held-out pool "
    "prompts + HarmBench; 100 further PIQA pairs for coherence; 200 more for adaptive attackers' benign data.",
    {"all": ["pyrit-harm", "pyrit-objective", "pyrit-refusal", "harmbench", "forgelm-chat", "piqa-benign"]},
    _offline_default,
)


def _beavertails(seed: int = 0, holdout_categories: tuple[str, ...] = (), train_path: str | None = None,
                 test_path: str | None = None, refusals_path: str | None = None, benign_path: str | None = None,
                 defense_size: int = 2000, attack_size: int = 1000, eval_size: int = 500, benign_size: int = 2000,
                 benign_heldout: int = 100, attack_benign: int = 200) -> BundleData:
    """The paper's data: BeaverTails harmful answers (30k_train, is_safe=False) split by prompt into defence and
    attack halves (with a category hold-out: every other prompt to the defence, the held-out categories' to the
    attack), HS prompts from 30k_test (unseen in training; with a hold-out, only the held-out categories'), R from
    RepNoise's refusal file where it has the prompt (else a template), B and the benign held-out sets from
    Alpaca-cleaned. ``*_path``: local files in the Hub schema instead of the Hub."""
    import random

    sizes = {"defense_size": defense_size, "attack_size": attack_size, "eval_size": eval_size,
             "benign_size": benign_size, "benign_heldout": benign_heldout, "attack_benign": attack_benign}
    bad = [k for k, v in sizes.items() if v < 1]
    if bad:
        raise DataError(f"beavertails bundle: {', '.join(bad)} must be >= 1")
    harmful = [e for e in load_source("beavertails", split="30k_train", path=train_path) if e.label == "harmful"]
    holdout_categories = resolve_categories(holdout_categories, {c for e in harmful for c in categories_of(e)})
    split = assign_splits(harmful, {"defense": 0.5, "attack": 0.5}, seed, holdout_categories)
    check_disjoint(split)
    rng = random.Random(seed)

    def sample(rows: list[Example], n: int, what: str) -> list[Example]:
        rows = list(rows)
        rng.shuffle(rows)
        if len(rows) < n:
            log.warning("beavertails: %s has %d rows, fewer than the %d asked for", what, len(rows), n)
        return rows[:n]

    used = hashes(split["defense"]) | hashes(split["attack"])
    held = {c.strip().casefold() for c in holdout_categories}
    eval_rows: dict[str, Example] = {}
    for e in load_source("beavertails", split="30k_test", path=test_path):
        h = prompt_hash(e.prompt)
        if e.label == "harmful" and h not in used and h not in eval_rows and (not held or categories_of(e) & held):
            eval_rows[h] = Example(e.prompt, "", e.category, None, e.source)
    defense = sample(split["defense"], defense_size, "the defence split (defense_size)")
    attack, shared_answers = without_answers_of(split["attack"], defense)
    _log_shared_answers("beavertails", shared_answers)
    refusals: dict[str, list[Example]] = {}
    if not refusals_path:
        log.warning("beavertails: no refusals_path (RepNoise's refusal JSON, not on the Hub): R is template refusals")
    else:
        refusals = _refusals_by_prompt(load_source("repnoise-refusals", path=refusals_path))

    alpaca = load_source("alpaca-cleaned", path=benign_path)
    rng.shuffle(alpaca)
    benign_sets: list[list[Example]] = [[], [], []]
    seen: set[str] = set()
    for e in alpaca:  # one prompt in one set only; B first, then the held-out set, then the attacker's
        h = prompt_hash(e.prompt)
        if h in seen:
            continue
        seen.add(h)
        for rows, n in zip(benign_sets, (benign_size, benign_heldout, attack_benign), strict=True):
            if len(rows) < n:
                rows.append(e)
                break
        else:
            break
    streams = {
        "harmful": defense,
        "refusal": _pair_refusals(defense, refusals, seed),
        "benign": benign_sets[0],
        "attack": sample(attack, attack_size, "the attack split (attack_size)"),
        "eval_harmful": sample(list(eval_rows.values()), eval_size, "the HS prompt pool (eval_size)"),
        "benign_heldout": benign_sets[1],
        "attack_benign": benign_sets[2],
    }
    _check_filled(streams, holdout_categories, harmful, "beavertails")
    groups = [["harmful", "attack", "eval_harmful"], ["benign", "benign_heldout", "attack_benign"]]
    _check_groups(streams, groups)
    manifest = split_manifest(
        streams, seed, disjoint=groups, bundle="beavertails", fractions={"defense": 0.5, "attack": 0.5},
        holdout_categories=list(holdout_categories), sizes=sizes,
        sources={"beavertails:30k_train": train_path or get_source("beavertails").origin,
                 "beavertails:30k_test": test_path or get_source("beavertails").origin,
                 "repnoise-refusals": refusals_path or "none (template refusals)",
                 "alpaca-cleaned": benign_path or get_source("alpaca-cleaned").origin},
        refusals_from_data=sum(1 for e in streams["refusal"] if e.source != "template"),
        zero_shot_exclude=[], attack_rows_with_a_defence_answer=shared_answers,
    )
    return BundleData(streams, manifest)


BUNDLES["beavertails"] = Bundle(
    "beavertails",
    "The paper's data (Hub, or local files in its schema via `seamlm data build beavertails --option "
    "train_path=FILE ...`): BeaverTails 30k_train harmful answers split by prompt into defence / attack halves "
    "(2000 / 1000 rows sampled), HS prompts from 30k_test unseen in training (500), R from RepNoise's refusal JSON "
    "(refusals_path=) where it has the prompt, else a template; B, held-out and attacker benign sets from "
    "Alpaca-cleaned (2000 / 100 / 200).",
    {"all": ["beavertails", "repnoise-refusals", "alpaca-cleaned"]},
    _beavertails,
)
