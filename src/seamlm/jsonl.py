"""Append-only JSON Lines files that a kill can cut mid-line (result rows, caches, per-step logs)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from seamlm.errors import ConfigError, DataError
from seamlm.locks import lock_open_file

log = logging.getLogger(__name__)


def _whole_record(line: str | bytes) -> dict[str, Any] | None:
    """The JSON object on ``line``, or None when it is not one (every record seamlm writes is an object, so a
    line cut short never parses as one: its closing brace comes last)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def drop_partial_tail(path: str | Path) -> None:
    """Before an append, end the file on a line end: a last line that is a whole record without its newline (a kill
    just before it, or a hand edit) gets it; one cut off by a kill or a full disk is cut."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        start = data.rfind(b"\n") + 1
        if _whole_record(data[start:]) is not None:
            with path.open("ab") as f:
                f.write(b"\n")
        else:  # truncate in place (one call): rewriting the file would empty it first, and a second kill lose it
            os.truncate(path, start)


def replace_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: a kill or a full disk leaves the old
    file or the new one, never a cut one, for files a resumed run reads back. A symbolic link is written through
    (its target replaced, the link kept); a device, pipe or folder at ``path`` is refused, not replaced."""
    path = Path(path)
    try:  # a loop: RuntimeError before Python 3.13, a result that is still a link after
        target = path.resolve(strict=False) if path.is_symlink() else path
        looped = target.is_symlink()
    except (OSError, RuntimeError):
        looped = True
    if looped:
        raise ConfigError(f"{path} is a symbolic link that resolves to no file (a loop): give the path of a file to "
                          "write")
    if target.exists() and not target.is_file():
        what = "a folder" if target.is_dir() else "not a regular file (a device or a pipe)"
        raise ConfigError(f"{path} is {what}: give the path of a file to write")
    if target != path and not target.parent.is_dir():
        raise ConfigError(f"{path} links to {target}, in a folder that does not exist: make that folder, or give "
                          "another path")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with :func:`replace_atomically`."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def keep_record(path: Path, text: str, same: Callable[[str, str], bool] | None = None,
                tag: str | None = None) -> Path:
    """Write a run's record (its data manifest, its attack config) at ``path``, unless the folder already holds
    another one there: a later command into the same --out (another grid, or one the results store then refuses)
    must not rewrite what the earlier rows were made with; it goes beside, ``<stem>.<tag>.<suffix>`` (``tag``: a
    digest of ``text`` unless given). ``same(old_text, text)``: whether the folder's record says the same (default:
    equal texts), e.g. ignoring fields that only describe the software that wrote it."""
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if (same or str.__eq__)(old, text):
            return path
        path = path.with_name(f"{path.stem}.{tag or hashlib.sha256(text.encode()).hexdigest()[:8]}{path.suffix}")
        log.info("%s holds another run's record: this one is %s", path.parent, path.name)
    if not path.is_file():
        write_text_atomic(path, text)
    return path


def records_text(records: Iterable[dict[str, Any]], ensure_ascii: bool = True) -> str:
    """``records`` as JSON lines, each ended by a newline (what :func:`read_records` reads back); non-ASCII text
    escaped unless ``ensure_ascii`` is False."""
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records)


def write_records_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Replace ``path`` with ``records`` as JSON lines (:func:`write_text_atomic`)."""
    return write_text_atomic(path, records_text(records))


def append_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Append ``records`` as JSON lines in one write, after cutting a line a kill left unfinished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        # one writer at a time (several attack processes may share a results file): a write in progress is not a
        # cut one, and two writes' lines must not interleave
        lock_open_file(f, path, wait=True)
        drop_partial_tail(path)
        f.write(records_text(records))
        f.flush()


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line. A last line without its newline counts when it is a whole
    record (its newline lost, or the file edited by hand: the next :func:`append_records` adds the newline); one
    that is not was cut short by a kill or a full disk, and is skipped: its work is redone. Any other line that is
    not JSON is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        with path.open(encoding="utf-8-sig") as f:  # (-sig: a byte order mark an editor put first is no JSON)
            lock_open_file(f, path, wait=True, shared=True)  # not half of another process's write
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}): a file seamlm writes is UTF-8 JSON lines; "
                        "restore or delete it") from None
    lines = text.split("\n")  # not splitlines(): U+2028 and U+0085 are legal inside a JSON string
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if i == len(lines):  # text does not end with a newline
            record = _whole_record(line)
            if record is None:
                log.warning("%s:%d: the last line is cut short (a kill or a full disk during a write): ignored, its "
                            "work is redone", path, i)
            else:
                out.append((i, record))
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError:
            raise DataError(f"{path}:{i} is not valid JSON: repair or delete that line") from None
    return out
