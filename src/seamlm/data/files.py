"""Read prompt/response tables (JSONL or CSV) with errors that name the file and the fix."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from seamlm.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One prompt with its answer (a harmful answer, a refusal, or a benign answer, depending on the stream)."""

    prompt: str
    response: str
    category: str | None = None


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    if suffix in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); each line must be one object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno} must be a JSON object with prompt/response keys")
            rows.append(row)
        return rows
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    raise DataError(f"{path}: unsupported file type '{suffix}'; use .jsonl or .csv with prompt/response columns")


def load_examples(path: str | Path, require_response: bool = True) -> list[Example]:
    """Load a JSONL/CSV file with ``prompt`` and ``response`` (and optional ``category``) columns.

    Rows with an empty prompt (or an empty response when required) are dropped with a logged count;
    a file with no usable rows is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"data file {path} is empty; it needs at least one row with prompt/response")
    needed = ["prompt", "response"] if require_response else ["prompt"]
    columns = set(rows[0].keys())
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"data file {path} lacks column(s) {missing}; found {sorted(columns)}. "
            f"Rename your columns to prompt/response."
        )
    examples, dropped = [], 0
    for row in rows:
        prompt = str(row.get("prompt") or "").strip()
        response = str(row.get("response") or "").strip()
        if not prompt or (require_response and not response):
            dropped += 1
            continue
        category = row.get("category")
        examples.append(Example(prompt, response, str(category) if category not in (None, "") else None))
    if dropped:
        log.warning("%s: dropped %d of %d rows with an empty prompt or response", path, dropped, len(rows))
    if not examples:
        raise DataError(f"data file {path} has no row with a non-empty prompt and response")
    return examples
