"""Resumable training checkpoints: weights, optimizer, scheduler, RNG states and data position, written atomically."""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seamlm.distributed import DistContext
from seamlm.errors import CheckpointError

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # per visible device, by index: a run resumed with fewer GPUs visible restores those it has
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def save_checkpoint(root: Path, step: int, state: dict[str, Any] | None, keep: int,
                    ctx: DistContext | None = None, rank_state: dict[str, Any] | None = None) -> Path:
    """Write ``state`` under ``root/step-N`` atomically (temp dir, then rename) and prune old checkpoints.

    A failure (e.g. a full disk) removes the partial write and leaves every earlier checkpoint intact. Under several
    processes every rank calls this: each writes its ``rank_state`` (RNG, optimizer shard) into the temp dir, then
    rank 0 writes ``state`` and renames, so a checkpoint is complete for all ranks or absent.
    """
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-step-{step:07d}"
    if ctx is not None and ctx.distributed:
        failure: Exception | None = None
        if ctx.is_main:
            try:
                _fresh_dir(root, tmp)
            except OSError as exc:
                failure = _write_error(root, step, exc)
        # every rank learns of a failure on any rank, so none waits in a collective for a checkpoint that never
        # comes; the first check is also the barrier that makes the temp dir exist before any rank writes into it
        if not ctx.any(failure is not None):
            try:
                save_file(rank_state, tmp / rank_file(ctx.rank))
            except OSError as exc:
                failure = _write_error(root, step, exc)
            if not ctx.any(failure is not None) and ctx.is_main:
                try:
                    _commit(root, step, state, keep, tmp, final)
                except CheckpointError as exc:
                    failure = exc
        if ctx.any(failure is not None):
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise failure or CheckpointError(f"the checkpoint for step {step} failed on another rank (see its "
                                             f"error); earlier checkpoints are intact")
        return final
    try:
        _fresh_dir(root, tmp)
    except OSError as exc:
        raise _write_error(root, step, exc) from exc
    return _commit(root, step, state, keep, tmp, final)


def _fresh_dir(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, flushed to the disk before returning.

    Given a path, torch writes through its C++ writer, whose failures (a full disk among them) surface as a
    ``RuntimeError`` without an errno; through a Python file they are ``OSError``s that say what happened. The fsync
    makes a checkpoint that is renamed into place (and older ones pruned) survive a crash of the host, not only of
    the process.
    """
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            try:
                os.fsync(f.fileno())
            except OSError as exc:
                if exc.errno not in _NO_FSYNC:  # a file system that cannot fsync (some FUSE/network mounts)
                    raise
    except RuntimeError as exc:  # anything torch's serialiser raises itself, with the file named
        raise OSError(f"{path}: {exc}") from exc


#: fsync answers of file systems that do not support it: the write itself stands
_NO_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.ENOSYS}


def _fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (best effort: not every platform or file system can fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(root: Path, step: int, exc: OSError) -> CheckpointError:
    last = latest_checkpoint(root)
    reason = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
    if last is None:  # nothing to resume from: --resume would be refused
        return CheckpointError(f"could not write the checkpoint for step {step} to {root}: {reason}. No earlier "
                               "checkpoint exists; free space, then rerun the same command without --resume (`seamlm "
                               "demo`: rerun it as it was).")
    return CheckpointError(f"could not write the checkpoint for step {step} to {root}: {reason}. "
                           f"Earlier checkpoints are intact (latest: {last}); free space, then continue from "
                           "them: `seamlm defend` with --resume, `seamlm demo` by rerunning the same command "
                           "(Python: trainer.train(resume=True)).")


def _commit(root: Path, step: int, state: dict[str, Any] | None, keep: int, tmp: Path, final: Path) -> Path:
    try:
        save_file(state, tmp / CHECKPOINT_FILE)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again: move the old one aside first, never a moment with neither
            aside = final.with_name("replaced-" + final.name)  # not a step-* name: never listed
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(root, step, exc) from exc
    _fsync_dir(root)  # the new checkpoint is on the disk before older ones go
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [d for d in root.glob("step-*") if (d / CHECKPOINT_FILE).is_file()]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_rank_state(path: Path, ctx: DistContext) -> dict[str, Any]:
    """This rank's part of a multi-process checkpoint; the number of processes must be the same as when saved."""
    saved = len(list(path.glob("rank-*.pt")))
    if saved != ctx.world_size:
        raise CheckpointError(f"checkpoint {path} was written by {saved or 1} process(es); resume it with that many "
                              f"(this run has {ctx.world_size})")
    return load_checkpoint(path, file=rank_file(ctx.rank))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", file: str = CHECKPOINT_FILE,
                    mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state; ``mmap``: tensors stay on disk until read (a look at its config costs no model load)."""
    try:
        # Our own file, holding Python RNG tuples as well as tensors.
        return torch.load(path / file, map_location=map_location, weights_only=False, mmap=mmap)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from an earlier one") from exc
