"""The checkpoint files themselves: re-saving a step replaces it whole, and an unreadable one is a clear error."""

from pathlib import Path

import pytest
import torch

from seamlm.checkpoint import (
    CHECKPOINT_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from seamlm.errors import CheckpointError


def test_saving_a_step_again_replaces_it_and_leaves_nothing_else(tmp_path):
    save_checkpoint(tmp_path, 2, {"v": torch.tensor(1.0)}, keep=3)
    save_checkpoint(tmp_path, 2, {"v": torch.tensor(2.0)}, keep=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000002"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["v"].item() == 2.0
    save_checkpoint(tmp_path, 4, {"v": torch.tensor(4.0)}, keep=1)  # keep=1 prunes the older step
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004"]


@pytest.mark.parametrize("garbage", [b"", b"not a pickle at all", b"\x80\x04K"])
def test_an_unreadable_checkpoint_names_itself_and_the_fix(tmp_path, garbage):
    path = save_checkpoint(tmp_path, 1, {"v": 1}, keep=2)
    (path / CHECKPOINT_FILE).write_bytes(garbage)
    with pytest.raises(CheckpointError, match="unreadable.*delete it to resume from an earlier one"):
        load_checkpoint(path)


def test_rng_state_restores_the_gpus_it_has_when_fewer_are_visible(monkeypatch):
    """Saved with two GPUs visible, resumed with one (CUDA_VISIBLE_DEVICES=0): set_rng_state_all would raise an
    IndexError; each visible device gets its saved state. (No GPU here: torch.cuda's calls are recorded.)"""
    from seamlm.checkpoint import rng_state, set_rng_state

    state = rng_state()
    state["cuda"] = [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((device, s.sum().item())))
    set_rng_state(state)
    assert restored == [(0, 0)]


def test_a_serialiser_failure_is_a_checkpoint_error_that_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    """torch raises RuntimeError for its own write failures (given a path, even a full disk comes out that way):
    it must reach the user as the checkpoint error with the fix, not a bare RuntimeError, and leave no temp dir."""
    import seamlm.checkpoint as ckpt

    save_checkpoint(tmp_path, 2, {"v": torch.tensor(2.0)}, keep=3)

    def failing_save(obj, f, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"step 4 .*unexpected pos.*latest: .*step-0000002.*--resume"):
        save_checkpoint(tmp_path, 4, {"v": torch.tensor(4.0)}, keep=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000002"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_save_file_reports_a_full_disk_as_enospc():
    import errno

    from seamlm.checkpoint import save_file

    with pytest.raises(OSError) as info:
        save_file({"v": torch.zeros(10_000)}, Path("/dev/full"))
    assert info.value.errno == errno.ENOSPC


def test_a_file_system_without_fsync_still_saves(tmp_path, monkeypatch):
    import errno
    import os

    import seamlm.checkpoint as ckpt

    def no_fsync(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(ckpt.os, "fsync", no_fsync)
    path = save_checkpoint(tmp_path, 1, {"v": torch.tensor(3.0)}, keep=2)
    assert load_checkpoint(path)["v"].item() == 3.0
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(CheckpointError, match="I/O error"):
        save_checkpoint(tmp_path, 2, {"v": torch.tensor(4.0)}, keep=2)
    assert os.path.isdir(path)
