"""The one place that decides splits: disjoint by normalised prompt text, optionally by harm category.

A prompt's split is a pure function of (seed, normalised prompt hash), so adding data never moves an existing
prompt to another split, and every response of a prompt stays with it.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Iterable

from seamlm.data.files import CATEGORY_SEPARATOR, Example
from seamlm.errors import DataError

_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def normalize_prompt(text: str) -> str:
    """Case-, width- (NFKC), punctuation- and whitespace-insensitive form (accents kept) used for de-duplication
    and leakage checks. Invisible format characters (Unicode Cf: soft hyphen, zero-width space, BOM …) are removed,
    not turned into spaces: ``pi\u00adpe`` is ``pipe``."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if not text.isascii():
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return _NON_WORD.sub(" ", text).strip()


def prompt_hash(text: str) -> str:
    return hashlib.sha256(normalize_prompt(text).encode()).hexdigest()[:16]


def without_answers_of(rows: list[Example], trained: list[Example]) -> tuple[list[Example], int]:
    """``rows`` less those whose answer (normalised) is an answer of ``trained``, and how many went: a source that
    reuses one answer for several prompts (PyRIT does) would hand the attacker, under another prompt, the very
    answers the defence unlearned."""
    seen = {normalize_prompt(e.response) for e in trained if e.response}
    kept = [e for e in rows if not (e.response and normalize_prompt(e.response) in seen)]
    return kept, len(rows) - len(kept)


def _unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) determined by (seed, key)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def categories_of(e: Example) -> set[str]:
    """The row's harm categories, case-folded: a row with several holds them joined by ``|``."""
    return {c.strip().casefold() for c in (e.category or "").split(CATEGORY_SEPARATOR) if c.strip()}


def resolve_categories(requested: Iterable[str], known: Iterable[str]) -> tuple[str, ...]:
    """``requested`` names as given, with neighbours rejoined by commas where they form a known category (the CLI
    splits ``--holdout-categories`` at commas, and BeaverTails names hold some:
    ``violence,aiding_and_abetting,incitement``); the longest known join wins. Unknown names are kept, so the
    caller's error lists them."""
    parts, folded = [c.strip() for c in requested if c.strip()], {c.casefold() for c in known}
    out, i = [], 0
    while i < len(parts):
        j = next((j for j in range(len(parts), i, -1) if ",".join(parts[i:j]).casefold() in folded), i + 1)
        out.append(",".join(parts[i:j]))
        i = j
    return tuple(out)


def assign_splits(
    examples: Iterable[Example],
    fractions: dict[str, float],
    seed: int,
    holdout_categories: Iterable[str] = (),
    train_split: str = "defense",
) -> dict[str, list[Example]]:
    """Partition examples into named splits by prompt (never splitting one prompt's rows across splits).

    Without ``holdout_categories`` each prompt lands in split s with probability ``fractions[s]``. With them (the
    paper's cross-category test) prompts with a row in a held-out category (any one of a row's categories) never
    reach ``train_split``; they are
    shared among the other splits in proportion to their fractions, and all other prompts go to ``train_split``. A
    held-out category that matches no row is an error (a typo would otherwise hold nothing out). The order of
    ``fractions`` is part of the split (each prompt's uniform number is cut into intervals in that order): the same
    fractions listed in another order give another split.
    """
    total = sum(fractions.values())
    if not fractions or total <= 0 or any(f < 0 for f in fractions.values()):
        raise DataError(f"split fractions must be non-negative and sum to > 0, got {fractions}")
    holdout = {c.casefold() for c in holdout_categories}
    others = {k: v for k, v in fractions.items() if k != train_split}
    if holdout and (train_split not in fractions or not others or sum(others.values()) <= 0):
        raise DataError(f"a category hold-out needs '{train_split}' and at least one other split with a fraction > 0")
    out: dict[str, list[Example]] = {k: [] for k in fractions}
    hashed = [(prompt_hash(e.prompt), e) for e in examples]
    held: set[str] = set()  # prompts with a row in a held-out category: all their rows are held out
    if holdout:
        known = {c for _, e in hashed for c in categories_of(e)}
        if holdout - known:
            raise DataError(f"held-out categor(ies) {sorted(holdout - known)} match no row; the categories are: "
                            f"{', '.join(sorted(c for c in known if c))}")
        held = {h for h, e in hashed if categories_of(e) & holdout}
    for h, e in hashed:
        if holdout:
            if h in held:
                out[_pick(others, _unit(seed, h))].append(e)
            else:
                out[train_split].append(e)
        else:
            out[_pick(fractions, _unit(seed, h))].append(e)
    return out


def _pick(fractions: dict[str, float], u: float) -> str:
    total, acc = sum(fractions.values()), 0.0
    for name, f in fractions.items():
        acc += f / total
        if u < acc:
            return name
    return name


def hashes(examples: Iterable[Example]) -> set[str]:
    return {prompt_hash(e.prompt) for e in examples}


def overlaps(splits: dict[str, list[Example]]) -> dict[str, int]:
    """Number of shared normalised prompts for every pair of splits (``"a&b": n``), zero pairs omitted."""
    names, hs = list(splits), {k: hashes(v) for k, v in splits.items()}
    found = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            n = len(hs[a] & hs[b])
            if n:
                found[f"{a}&{b}"] = n
    return found


def near_duplicates(splits: dict[str, list[Example]], threshold: float = 0.8) -> dict[str, int]:
    """For every pair of splits (``"a&b": n``, zero pairs omitted), how many prompts of b have a prompt in a whose
    word sets (of the normalised text) have Jaccard similarity >= ``threshold`` but a different normalised text:
    the reworded repeats the exact-hash split cannot see. Prefix filtering (Chaudhuri et al. 2006) keeps it near
    linear: two sets with J >= t share a word among the first |A| - ceil(t|A|) + 1 of each one's rarest words."""
    texts = {k: [normalize_prompt(e.prompt) for e in v] for k, v in splits.items()}
    words = {k: [(t, frozenset(t.split())) for t in v] for k, v in texts.items()}
    df: dict[str, int] = {}
    for sets in words.values():
        for w in {w for _, ws in sets for w in ws}:
            df[w] = df.get(w, 0) + 1

    def prefix(ws: frozenset) -> list[str]:
        return sorted(ws, key=lambda w: (df[w], w))[: len(ws) - math.ceil(threshold * len(ws) - 1e-9) + 1]

    names, found = list(splits), {}
    for i, a in enumerate(names):
        index: dict[str, list[tuple[str, frozenset]]] = {}
        for text, ws in set(words[a]):
            for w in prefix(ws):
                index.setdefault(w, []).append((text, ws))
        for b in names[i + 1:]:
            n = 0
            for text, ws in words[b]:
                cands = {c for w in prefix(ws) for c in index.get(w, ())}
                # another text (the same one is the exact split's business), even with the same words reordered
                n += any(t != text and len(c & ws) >= threshold * len(c | ws) for t, c in cands)
            if n:
                found[f"{a}&{b}"] = n
    return found


def check_disjoint(splits: dict[str, list[Example]]) -> None:
    bad = overlaps(splits)
    if bad:
        raise DataError(f"prompt leakage between splits (shared normalised prompts): {bad}")


def split_manifest(
    splits: dict[str, list[Example]], seed: int, disjoint: list[list[str]] | None = None, **extra: object
) -> dict:
    """Counts, prompt hashes and a digest per split: enough to check any later run for leakage.

    ``disjoint`` lists groups of splits that must share no prompt (default: all of them); their measured
    overlaps are recorded (and are empty for a valid bundle).
    """
    groups = disjoint or [list(splits)]
    body = {}
    for name, rows in splits.items():
        hs = sorted(hashes(rows))
        body[name] = {
            "rows": len(rows), "prompts": len(hs),
            "digest": hashlib.sha256("".join(hs).encode()).hexdigest()[:16], "prompt_hashes": hs,
        }
    measured = {}
    for group in groups:
        measured.update(overlaps({k: splits[k] for k in group}))
    return {"seed": seed, "splits": body, "disjoint_groups": groups, "overlaps": measured, **extra}
