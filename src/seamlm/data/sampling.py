"""Deterministic, resumable batch order: the samples of step s depend only on (seed, stream, s)."""

from __future__ import annotations

import torch


class StreamSampler:
    """Cycles through ``n`` examples in a fresh seeded permutation per epoch.

    Sample ``k`` of the whole run is ``perm(epoch = k // n)[k % n]``, so resuming needs only the step number.
    Two streams built with the same ``n``, ``seed`` and ``key`` visit the same indices (index-aligned H and R).
    """

    def __init__(self, n: int, seed: int, key: str):
        if n <= 0:
            raise ValueError("cannot sample from an empty stream")
        self.n, self.seed, self.key = n, seed, key
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            salt = sum((i + 1) * ord(ch) for i, ch in enumerate(self.key))
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + salt * 7919 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}  # keep only the current epoch
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """Indices of samples ``start … start+count-1`` of the run."""
        return [int(self._perm(k // self.n)[k % self.n]) for k in range(start, start + count)]
