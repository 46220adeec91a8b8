"""The checkpoint files themselves: re-saving a step replaces it whole, and an unreadable one is a clear error."""

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
