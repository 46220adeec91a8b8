"""What a run records next to its results so that it can be reproduced: versions, device, time."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import platform
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from seamlm.errors import ConfigError, DataError
from seamlm.jsonl import append_records, read_records
from seamlm.locks import HolderLock

log = logging.getLogger(__name__)

#: the file :func:`folder_lock` holds in an output folder (left in place: removing it would race a waiting command)
LOCK_FILE = ".seamlm.lock"


@contextmanager
def folder_lock(folder: Path, command: str, shared: bool = False) -> Iterator[None]:
    """One seamlm command at a time on ``folder`` (an advisory ``flock``, released when the process ends, also by a
    kill): two demos or rescores on one folder would train the same stage twice, interleave one log and write every
    missing cell twice. ``shared``: beside other shared commands (attack, eval, sweep: their cells are locked one by
    one), never beside an exclusive one (demo, adaptive, rescore, which rewrites the results file). A command that
    made ``folder`` and fails before writing anything there removes it again (no folder holding only the lock)."""
    made = not folder.exists()
    lock = HolderLock(folder / LOCK_FILE, command)
    if not lock.acquire(shared=shared):
        raise ConfigError(f"{folder} is in use by another seamlm command ({lock.holder()}): wait for it to end, or "
                          "choose another --out")
    try:
        yield
    except BaseException:
        # removed only while no other command holds the folder (a shared one may be starting there)
        if made and [p.name for p in folder.iterdir()] == [LOCK_FILE] and lock.discard():
            with contextlib.suppress(OSError):  # (something written there meanwhile: the folder stays)
                folder.rmdir()
        raise
    finally:
        lock.release()


def package_versions(names: tuple[str, ...] = ("seamlm", "torch", "transformers", "accelerate", "peft", "gguf")) -> dict[str, str]:
    """Versions of Python and the packages that make the numbers, and the CPU (:func:`cpu_info`)."""
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {**out, **cpu_info()}


@functools.cache
def cpu_info() -> dict[str, str]:
    """The CPU model and the vector instruction set torch's CPU kernels use. With the same code, versions and seed,
    another CPU can round float sums otherwise (MKL and oneDNN choose kernels by CPU), and a long trajectory that
    amplifies small differences — SEAM's, steered by a cosine — ends elsewhere: a run reproduces to the digit on a
    CPU of the same kind (docs/demo-tuning.md, 2026-11-28)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def environment_info() -> dict[str, Any]:
    return {
        "versions": package_versions(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def path_part(label: str) -> str:
    """``label`` as one folder or file-name part: a model label may be a hub id (``org/name``) or an absolute path,
    which joined to the output folder as it is would nest folders or, absolute, write into the model's own."""
    return re.sub(r"[^\w.-]+", "_", label).strip("._") or "model"


def refuse_repeated_run(paths: list[Path], counted_in: str) -> None:
    """Refuse a run given twice, however spelled ("runs/s0/", "./runs/s0"): it would count twice ``counted_in``."""
    seen: dict[Path, Path] = {}
    for path in paths:
        twin = seen.setdefault(path.resolve(), path)
        if twin is not path:
            raise DataError(f"{path} is {twin} again: one run given twice would count twice in {counted_in}")


def seed_runs_hint(folder: Path, command: str, each: bool = False) -> str:
    """For a folder without a results.jsonl that holds a ``demo --seeds`` run: a hint naming the command on its
    seed folders (together, or ``each`` one by one); else ''."""
    seeds = sorted(p for p in folder.glob("seed-*") if (p / "results.jsonl").is_file()) if folder.is_dir() else []
    if not seeds:
        return ""
    if each:
        return f" (a `--seeds` demo: {command} each of its runs, `seamlm {command} {seeds[0]}`, … `{seeds[-1]}`)"
    return f" (a `--seeds` demo: give its runs, `seamlm {command} {' '.join(map(str, seeds))}`)"


def refuse_copied_runs(rows: dict[Path, list[Any]], counted_in: str) -> None:
    """Refuse two runs holding one write of result rows (``write`` ids are unique per write): one folder is a copy
    of the other and would count twice in ``counted_in``. Runs made on the same data (one data manifest, e.g. a
    demo rerun with its data seed) are warned about: their spread is rounding, not the seed-to-seed spread."""
    writes: dict[str, Path] = {}
    data: dict[str, Path] = {}
    for path, run_rows in rows.items():
        for w in sorted({r.write for r in run_rows if r.write}):
            twin = writes.setdefault(w, path)
            if twin != path:
                raise DataError(f"{path} holds rows {twin} wrote (write {w}): one is a copy of the other, and would "
                                f"count twice in {counted_in}; give each run once")
        for digest in sorted({r.data_manifest for r in run_rows if r.data_manifest}):
            twin = data.setdefault(digest, path)
            if twin != path:
                log.warning("%s and %s were made on the same data (data manifest %s): runs of one data seed differ "
                            "by little more than rounding, so %s understates the spread between seeds", twin, path,
                            digest, counted_in)


def fingerprint(obj: Any) -> str:
    """Short stable hash of JSON-serialisable data (used to check that a resumed run sees the same data)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StageClock:
    """Wall time per stage of a resumable job, one JSON line per finished stage in ``path``.

    A stage's line is written the moment it ends, so a killed job keeps the stages it finished and a resumed one
    adds its own lines: :meth:`totals` sums them into what the job really cost, however many invocations it took.
    Time spent in a stage that an error or Ctrl-C stopped is charged to ``interrupted``
    (:meth:`charging_interruptions`; a ``kill -9`` leaves no line).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.invocation = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._t = time.time()

    def lap(self, stage: str) -> float:
        """Record the seconds since the previous lap (or since this clock started) under ``stage``."""
        now = time.time()
        seconds, self._t = now - self._t, now
        append_records(self.path, [{"invocation": self.invocation, "stage": stage, "seconds": round(seconds, 2)}])
        return seconds

    def plan(self, stages: list[str]) -> None:
        """Record the stages this invocation is to run (:meth:`left` then tells which it has not finished)."""
        append_records(self.path, [{"invocation": self.invocation, "plan": stages}])

    @staticmethod
    def left(path: str | Path) -> list[str] | None:
        """The stages the last invocation that recorded a :meth:`plan` has not finished (lapped); None when no
        invocation recorded one. A resumed invocation laps the stages it finds done at once, so its plan and laps
        alone say where the job stands, whatever earlier invocations planned."""
        records = [rec for _, rec in read_records(path)]
        plans = [rec for rec in records if isinstance(rec.get("plan"), list)]
        if not plans:
            return None
        last = plans[-1]
        lapped = {rec.get("stage") for rec in records if rec.get("invocation") == last.get("invocation")}
        return [s for s in last["plan"] if s not in lapped]

    @contextmanager
    def charging_interruptions(self) -> Iterator[None]:
        """Within the block, a stage stopped by an exception (Ctrl-C included) still has its seconds recorded."""
        try:
            yield
        except BaseException:
            self.lap("interrupted")
            raise

    @staticmethod
    def totals(path: str | Path) -> dict[str, float]:
        """Seconds per stage summed over every invocation in ``path``, in first-seen order, plus ``total``; lines
        of another format (older seamlm) are skipped."""
        out: dict[str, float] = {}
        for _, rec in read_records(path):
            if "stage" in rec and "seconds" in rec:
                out[rec["stage"]] = out.get(rec["stage"], 0.0) + rec["seconds"]
        return out | {"total": sum(out.values())}
