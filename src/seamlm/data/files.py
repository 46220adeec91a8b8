"""Read prompt/response tables (JSONL or CSV) with errors that name the file and the fix."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seamlm.errors import DataError

log = logging.getLogger(__name__)


#: Separates the harm categories of a row that has several (BeaverTails flags up to 14 per answer).
CATEGORY_SEPARATOR = "|"


@dataclass(frozen=True)
class Example:
    """One prompt with its answer (a harmful answer, a refusal, or a benign answer, depending on the stream)."""

    prompt: str
    response: str
    category: str | None = None
    label: str | None = None
    """What the response is, where a source says: ``harmful``, ``refusal``, ``safe`` or ``benign``."""
    source: str | None = None


def _check_encodable(row: dict, where: str) -> None:
    """JSON may escape half of a UTF-16 pair (``"\\ud83d"``, an emoji cut in two): text no UTF-8 file can hold."""
    for key, value in row.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(f"{where}: {key} holds a lone surrogate escape ({value[exc.start:exc.start + 1]!r} at "
                                f"character {exc.start}), half of a character cut in two: repair or drop that row") from None


class _RepeatedKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's ``object_pairs_hook``: a key given twice is an error (json keeps the later one silently)."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _RepeatedKeyError(", ".join(repr(k) for k in sorted({k for k in keys if keys.count(k) > 1})))
    return dict(pairs)


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _RepeatedKeyError as exc:
        raise DataError(f"{where}: the key {exc} is given twice in one object (the later one would silently win); "
                        "keep one") from None


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL, JSON (a list of objects), CSV or Parquet file as dicts; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file: name a JSONL/JSON/CSV/Parquet file (a folder built by "
                        "`seamlm data build` goes to --data)")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path} is not a readable Parquet file ({exc})") from None
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = _loads(text, str(path))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path} must be a JSON list of objects")
        for i, row in enumerate(rows):
            _check_encodable(row, f"{path}: object {i}")
        return rows
    if suffix in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
            if not line.strip():
                continue
            try:
                row = _loads(line, f"{path}:{lineno}")
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); each line must be one object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno} must be a JSON object with prompt/response keys")
            _check_encodable(row, f"{path}:{lineno}")
            rows.append(row)
        return rows
    if suffix == ".csv":
        # Leading '#' lines are metadata in some shipped CSVs (PyRIT's scorer evals).
        lines = text.splitlines(keepends=True)
        skipped, last_comment = 0, ""
        while lines and lines[0].startswith("#"):
            last_comment = lines.pop(0)
            skipped += 1
        if csv.field_size_limit() < 2**31 - 1:  # the default, 131072 characters, refuses a long (valid) answer
            csv.field_size_limit(2**31 - 1)
        reader = csv.DictReader(io.StringIO("".join(lines)), strict=True)
        try:
            rows = list(reader)
        except csv.Error as exc:  # e.g. a stray quote that would swallow the rows after it
            raise DataError(f"{path}:{reader.line_num + skipped} is not valid CSV ({exc}); check its quoting") from None
        names = reader.fieldnames or []
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # csv keeps the last column of a repeated name: the first would be dropped unseen
            raise DataError(f"{path}: the header names {', '.join(map(repr, twice))} more than once; rename or drop "
                            "the repeated column")
        if skipped and not names:
            raise DataError(f"{path} has only '#' lines: a header line may not start with '#' (seamlm skips leading "
                            "'#' lines as metadata)")
        commented = next(csv.reader([last_comment.lstrip("#").strip()]), []) if skipped else []
        if "prompt" in commented and "prompt" not in names:  # '#prompt,response': its data row became the header
            raise DataError(f"{path}:{skipped}: the header line starts with '#', which marks metadata lines seamlm "
                            "skips; remove the '#' so it reads prompt,response,…")
        extra = next((i for i, r in enumerate(rows) if None in r), None)
        if extra is not None:  # more fields than the header names: csv files them under the key None
            raise DataError(f"{path}: data row {extra + 1} has more fields than the header "
                            f"({', '.join(reader.fieldnames or [])}); quote fields that contain commas")
        return rows
    raise DataError(
        f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .csv or .parquet with prompt/response columns"
    )


def load_examples(path: str | Path, require_response: bool = True, dedupe: bool = True) -> list[Example]:
    """Load a JSONL/CSV file with ``prompt`` and ``response`` (and optional ``category``) columns.

    Rows with an empty prompt (or an empty response when required) are dropped with a logged count, and so are
    repeated (prompt, response) pairs unless ``dedupe=False``; a file with no usable rows is an error.
    """
    path = Path(path)
    rows = read_rows(path)
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
    examples, empty = [], 0
    for i, row in enumerate(rows, 1):
        absent = [c for c in needed if c not in row]
        if absent:  # a JSON line with other keys than the first (CSV rows all share the header)
            raise DataError(f"{path}: row {i} has no {absent} field(s) (it has {sorted(row)}); every row needs "
                            f"{'/'.join(needed)}")
        bad = [c for c in ("prompt", "response", "category") if not isinstance(row.get(c), (str, type(None)))]
        if bad:  # str() of a list would train on its Python repr
            raise DataError(f"{path}: row {i} has a {type(row[bad[0]]).__name__} in column '{bad[0]}'; every "
                            f"prompt/response/category must be text")
        prompt = (row.get("prompt") or "").strip()
        response = (row.get("response") or "").strip()
        if not prompt or (require_response and not response):
            empty += 1
            continue
        category, label = row.get("category"), row.get("label")
        examples.append(Example(prompt, response, str(category) if category not in (None, "") else None,
                                str(label) if label not in (None, "") else None, source=str(path)))
    if empty:
        log.warning("%s: dropped %d of %d rows with an empty prompt or response", path, empty, len(rows))
    if not examples:
        raise DataError(f"data file {path} has no row with a non-empty prompt and response")
    return drop_duplicates(examples, str(path)) if dedupe else examples


def merge_categories(*categories: str | None) -> str | None:
    """The union of several rows' categories (``a|b``, first-seen order): a pair kept once for rows of two
    categories belongs to both, so a hold-out of either holds it out."""
    parts = [c.strip() for cat in categories if cat for c in cat.split(CATEGORY_SEPARATOR) if c.strip()]
    return CATEGORY_SEPARATOR.join(dict.fromkeys(parts)) or None


def drop_duplicates(examples: list[Example], name: str, level: int = logging.WARNING) -> list[Example]:
    """Remove repeated (prompt, response) pairs, keeping the first (with every repeat's category too), and log how
    many went."""
    kept: dict[tuple[str, str], int] = {}
    out: list[Example] = []
    for e in examples:
        key = (e.prompt, e.response)
        if key not in kept:
            kept[key] = len(out)
            out.append(e)
        elif e.category and e.category != out[kept[key]].category:
            first = out[kept[key]]
            out[kept[key]] = dataclasses.replace(first, category=merge_categories(first.category, e.category))
    if len(out) < len(examples):
        log.log(level, "%s: dropped %d duplicate (prompt, response) rows of %d", name, len(examples) - len(out), len(examples))
    return out
