"""Resumable training checkpoints: weights, optimizer, scheduler, RNG states and data position, written atomically."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def save_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` under ``root/step-N`` atomically (temp dir, then rename) and prune old checkpoints.

    A failure (e.g. a full disk) removes the partial write and leaves every earlier checkpoint intact.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        torch.save(state, tmp / CHECKPOINT_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root)
        reason = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
        raise CheckpointError(
            f"could not write the checkpoint for step {step} to {root}: {reason}. "
            f"Earlier checkpoints are intact (latest: {last or 'none'}); free space and rerun with --resume."
        ) from exc
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


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        # Our own file, holding Python RNG tuples as well as tensors.
        return torch.load(path / CHECKPOINT_FILE, map_location=map_location, weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from an earlier one") from exc
