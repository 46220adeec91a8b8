"""Flat-vector gradient algebra and the Hessian-free gradient of L_sd = cos(g_a, g_b).

All trainable parameters are treated as ONE vector θ (global norms, global cosine), as in the paper. With
ĝ = g/‖g‖ and c = cos(g_a, g_b):

    ∇c = H_a δ_a / ‖g_a‖ + H_b δ_b / ‖g_b‖,   δ_a = ĝ_b − c ĝ_a,   δ_b = ĝ_a − c ĝ_b

and each Hessian-vector product is a forward difference of gradients on the same batch:

    H_a δ_a ≈ (g_a(θ + ε δ_a) − g_a(θ)) / ε        (error O(ε), paper Thm 1)

θ is perturbed in the parameters' own dtype, which the trainer keeps at float32 (or float64) whatever the compute
dtype, and restored by copying a saved copy back — bit-exact, unlike subtracting ε δ again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: A function that accumulates a gradient (at the model's current parameters) into the given flat buffer.
GradFn = Callable[[torch.Tensor], None]


class FlatParams:
    """A list of parameters seen as one flat vector, with flat buffers that autograd can accumulate into."""

    def __init__(self, params: list[torch.nn.Parameter]):
        if not params:
            raise ValueError("no trainable parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
            raise ValueError(
                f"flat gradient buffers need all trainable parameters in float32 or float64, got {dtypes}"
            )
        self.params = params
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.numel = sum(p.numel() for p in params)
        self._offsets = []
        offset = 0
        for p in params:
            self._offsets.append((offset, p.numel()))
            offset += p.numel()

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view_as(p) for (o, n), p in zip(self._offsets, self.params, strict=True)]

    @contextmanager
    def grad_sink(self, flat: torch.Tensor) -> Iterator[None]:
        """Within the block, ``loss.backward()`` accumulates into ``flat`` (``p.grad`` are views of it)."""
        views = self.views(flat)
        for p, v in zip(self.params, views, strict=True):
            p.grad = v
        try:
            yield
            for p, v in zip(self.params, views, strict=True):
                # autograd accumulates in place into an existing .grad; copy if it ever replaced the tensor.
                if p.grad is not None and p.grad.data_ptr() != v.data_ptr():
                    v.copy_(p.grad)
        finally:
            for p in self.params:
                p.grad = None

    @torch.no_grad()
    def read(self, out: torch.Tensor) -> torch.Tensor:
        for p, v in zip(self.params, self.views(out), strict=True):
            v.copy_(p)
        return out

    @torch.no_grad()
    def write(self, flat: torch.Tensor) -> None:
        for p, v in zip(self.params, self.views(flat), strict=True):
            p.copy_(v)


@dataclass
class CouplingStats:
    cos: float
    norm_a: float
    norm_b: float


def cosine(g_a: torch.Tensor, g_b: torch.Tensor) -> CouplingStats:
    na, nb = g_a.norm().item(), g_b.norm().item()
    cos = (torch.dot(g_a, g_b).item() / (na * nb)) if na > 0 and nb > 0 else float("nan")
    return CouplingStats(cos, na, nb)


def hessian_free_cos_grad(
    flat: FlatParams,
    g_a: torch.Tensor,
    g_b: torch.Tensor,
    grad_a: GradFn,
    grad_b: GradFn,
    eps: float,
    out: torch.Tensor,
    scale: float = 1.0,
    scratch: torch.Tensor | None = None,
    backup: torch.Tensor | None = None,
) -> CouplingStats:
    """Add ``scale · ∇̂cos(g_a, g_b)`` to ``out`` with two extra gradient evaluations and no Hessian.

    ``g_a``/``g_b`` are the gradients at the current θ; ``grad_a``/``grad_b`` recompute them (same batches) at a
    perturbed θ. The parameters are bit-identical to their input values on return, even on error.
    """
    stats = cosine(g_a, g_b)
    if not (stats.norm_a > 0 and stats.norm_b > 0):
        return stats
    scratch = flat.zeros() if scratch is None else scratch
    backup = flat.read(flat.zeros() if backup is None else backup)
    c = stats.cos
    legs = ((g_a, stats.norm_a, g_b, stats.norm_b, grad_a), (g_b, stats.norm_b, g_a, stats.norm_a, grad_b))
    try:
        for g_self, n_self, g_other, n_other, grad_fn in legs:
            with torch.no_grad():
                # θ + ε δ  with  δ = ĝ_other − c ĝ_self
                torch.mul(g_other, eps / n_other, out=scratch)
                scratch.add_(g_self, alpha=-eps * c / n_self).add_(backup)
            flat.write(scratch)
            scratch.zero_()
            grad_fn(scratch)
            flat.write(backup)
            with torch.no_grad():
                # (g(θ + ε δ) − g(θ)) / (ε ‖g‖)
                scratch.sub_(g_self)
                out.add_(scratch, alpha=scale / (eps * n_self))
    finally:
        flat.write(backup)
    return stats
