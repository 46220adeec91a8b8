"""Flat-vector gradient algebra and the Hessian-free gradient of L_sd = cos(g_a, g_b).

All trainable parameters are treated as ONE vector θ (global norms, global cosine), as in the paper. With
ĝ = g/‖g‖ and c = cos(g_a, g_b):

    ∇c = H_a δ_a / ‖g_a‖ + H_b δ_b / ‖g_b‖,   δ_a = ĝ_b − c ĝ_a,   δ_b = ĝ_a − c ĝ_b

and each Hessian-vector product is a forward difference of gradients on the same batch:

    H_a δ_a ≈ (g_a(θ + ε δ_a) − g_a(θ)) / ε        (error O(ε), paper Thm 1)

or, with ``scheme="central"`` (not in the paper), (g_a(θ + ε δ_a) − g_a(θ − ε δ_a)) / 2ε, error O(ε²) for two
more gradient passes: it allows a larger ε, which matters at scale — in float32 θ + εδ is itself rounded, each
coordinate moving by ≈ ε·√(1 − c²)/√n (‖δ‖ = √(1 − c²) for c = cos(g_a, g_b)), near one ulp of the weight
(SmolLM2-135M: the step actually applied is 5.4 % off εδ at ε = 1e-3, 0.5 % at 1e-2; worse as n grows).

θ is perturbed in the parameters' own dtype, which the trainer keeps at float32 (or float64) whatever the compute
dtype, and restored by copying a saved copy back — bit-exact, unlike subtracting ε δ again. The gradients of the
difference are computed with IEEE float32 matmuls (:func:`float32_matmul`) unless TF32 is asked for.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from seamlm.distributed import DistContext


@contextmanager
def float32_matmul(precision: str = "ieee") -> Iterator[None]:
    """Inside: float32 matmuls at ``precision`` — ``ieee`` (full float32) or ``tf32`` (TensorFloat-32 on CUDA) —
    whatever the process set; the process's setting is restored exactly on exit.

    Why ``ieee`` by default: ‖δ‖ = ‖ĝ_other − c·ĝ_self‖ = √(1 − c²) ≤ 1, so each coordinate of θ moves by about
    ε·√(1 − c²)/√n (less the stronger the coupling: 0.46·ε/√n at c = −0.89), and g(θ + εδ) − g(θ) is a relative
    change far below TF32's 10-bit mantissa (relative error ≈ 1e-3): with TF32 on —
    ``torch.set_float32_matmul_precision("high")`` or ``allow_tf32 = True``, common on Ampere and later (accelerate
    sets the latter) — the difference would be rounding noise (measured on an H200: 0.3 % → 11 % relative error at
    ε = 1e-3). On torch ≥ 2.9 the per-backend settings (CUDA, oneDNN) are saved and written back as they were (the
    legacy getter folds them into one value, so restoring through it would not be exact); older torch has only the
    legacy API.
    """
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"float32 matmul precision must be 'ieee' or 'tf32', not {precision!r}")
    cuda_matmul = torch.backends.cuda.matmul
    if not hasattr(cuda_matmul, "fp32_precision"):  # torch < 2.9
        saved_legacy = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest" if precision == "ieee" else "high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved_legacy)
        return
    # TF32 exists on CUDA only; CPU (oneDNN) matmuls stay IEEE either way
    wanted = {cuda_matmul: precision, torch.backends.mkldnn.matmul: "ieee"}
    saved = {backend: backend.fp32_precision for backend in (torch.backends, *wanted)}
    try:  # unreadable when the process set backends apart with the new API ("mix of the legacy and new APIs")
        saved_legacy: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:
        saved_legacy = None
    try:
        # the global setting first, then the per-backend ones: setting only the latter leaves torch's legacy and new
        # TF32 flags contradicting each other, which cuBLAS paths reading the legacy flag refuse
        if saved_legacy is not None:  # (else it could not be put back: the per-backend settings alone)
            torch.set_float32_matmul_precision("highest" if precision == "ieee" else "high")
        for backend, value in wanted.items():
            backend.fp32_precision = value
        yield
    finally:
        if saved_legacy is not None:
            torch.set_float32_matmul_precision(saved_legacy)
        for backend, value in saved.items():
            backend.fp32_precision = value


#: A function that accumulates a gradient (at the model's current parameters) into the given flat buffer.
GradFn = Callable[[torch.Tensor], None]


class FlatParams:
    """A list of parameters seen as one flat vector, with flat buffers that autograd can accumulate into.

    Under data parallelism (``ctx.world_size > 1``) every buffer holds the full vector on every rank and
    :meth:`grad_sink` leaves the *global* gradient in it (mean over ranks, like one process on the global batch).
    Invariant: outside a sink every buffer is identical on all ranks, so the all-reduce at the sink's exit
    (mean of identical old content + each rank's new gradient) adds exactly the global gradient.
    """

    #: whether this rank's buffers hold only its own part of the vector (the optimizer then works on that part)
    holds_shard = False

    def __init__(self, params: list[torch.nn.Parameter], ctx: DistContext | None = None):
        if not params:
            raise ValueError("no trainable parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
            raise ValueError(
                f"flat gradient buffers need all trainable parameters in float32 or float64, got {dtypes}"
            )
        self.params = params
        self.ctx = ctx or DistContext(device=params[0].device)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.total_numel = sum(p.numel() for p in params)
        self._offsets = []
        offset = 0
        for p in params:
            n = self._local(p).numel()
            self._offsets.append((offset, n))
            offset += n
        self.local_numel = offset

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        """The part of ``p`` this rank holds and its buffers lay out: all of it, unless FSDP shards it."""
        return p

    @property
    def numel(self) -> int:
        """Length of this rank's buffers."""
        return self.local_numel

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view_as(self._local(p)) for (o, n), p in zip(self._offsets, self.params, strict=True)]

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Global dot product: over the whole vector, or (sharded) the sum of the shard-local ones."""
        if self.holds_shard:
            return self.ctx.all_reduce_sum_(torch.dot(a, b).double().reshape(1)).item()
        return torch.dot(a, b).item()

    def norm(self, a: torch.Tensor) -> float:
        return math.sqrt(max(self.dot(a, a), 0.0))

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
        self.ctx.all_reduce_mean_(flat)

    @torch.no_grad()
    def read(self, out: torch.Tensor) -> torch.Tensor:
        for p, v in zip(self.params, self.views(out), strict=True):
            v.copy_(self._local(p))
        return out

    @torch.no_grad()
    def write(self, flat: torch.Tensor) -> None:
        for p, v in zip(self.params, self.views(flat), strict=True):
            self._local(p).copy_(v)


class ShardedFlatParams(FlatParams):
    """ZeRO-2-style sharding of the flat vector: rank r owns elements ``[r·S, (r+1)·S)`` (S = ⌈N / world⌉).

    Every gradient buffer (and the optimizer's state, see :class:`seamlm.defense.seam.SEAMTrainer`) holds only
    the local shard, so no rank ever holds a full gradient vector: each parameter's gradient is all-reduced and
    sliced into the shard by a post-accumulate hook as soon as autograd produces it, then freed. Dot products and
    norms are shard-local sums, all-reduced. The parameters themselves stay replicated (each rank runs the full
    forward); :meth:`write` rebuilds them from every rank's shard, all-gathered ``gather_chunk`` elements per rank
    at a time so that no full-length vector is ever allocated (a 7B model's would be 28 GB in float32).
    """

    holds_shard = True
    #: elements per rank in one all-gather of :meth:`write` (the transient buffer is world × this)
    gather_chunk: int = 1 << 22

    def __init__(self, params: list[torch.nn.Parameter], ctx: DistContext):
        super().__init__(params, ctx)
        w, r = ctx.world_size, ctx.rank
        self.shard_size = -(-self.total_numel // w)
        self.start = r * self.shard_size
        self.stop = min(self.start + self.shard_size, self.total_numel)
        # (param, slice of the param's flat view, slice of the shard) for the parameters this shard touches
        self._pieces = []
        for (o, n), p in zip(self._offsets, self.params, strict=True):
            a, b = max(o, self.start), min(o + n, self.stop)
            if a < b:
                self._pieces.append((p, slice(a - o, b - o), slice(a - self.start, b - self.start)))

    @property
    def numel(self) -> int:
        return self.shard_size

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError("a shard has no per-parameter views; use read/write")

    @contextmanager
    def grad_sink(self, flat: torch.Tensor) -> Iterator[None]:
        pieces = {id(p): (src, dst) for p, src, dst in self._pieces}

        def to_shard(p: torch.Tensor) -> None:
            g = self.ctx.all_reduce_mean_(p.grad)  # every rank reduces every parameter, in the same order
            if id(p) in pieces:
                src, dst = pieces[id(p)]
                flat[dst].add_(g.reshape(-1)[src])
            p.grad = None

        for p in self.params:  # a gradient left on the model (a caller's own loop) must not join the first backward's
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(to_shard) for p in self.params]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for p in self.params:
                p.grad = None

    @torch.no_grad()
    def read(self, out: torch.Tensor) -> torch.Tensor:
        out.zero_()
        for p, src, dst in self._pieces:
            out[dst].copy_(p.reshape(-1)[src])
        return out

    @torch.no_grad()
    def write(self, flat: torch.Tensor) -> None:
        world, size = self.ctx.world_size, self.shard_size
        chunk = min(self.gather_chunk, size)
        buf = torch.empty(world * chunk, dtype=self.dtype, device=self.device)
        starts = [o for o, _ in self._offsets]
        for c in range(0, size, chunk):
            n_c = min(chunk, size - c)
            gathered = self.ctx.all_gather_into(buf[: world * n_c], flat[c:c + n_c])
            for r in range(world):  # rank r's piece: global elements [lo, hi), at gathered[r·n_c ...]
                lo, hi = r * size + c, min(r * size + c + n_c, self.total_numel)
                shift = r * n_c - lo  # global element g sits at gathered[g + shift]
                i = max(0, bisect.bisect_right(starts, lo) - 1)  # the parameter holding element lo
                while i < len(self.params) and starts[i] < hi:  # (a padding-only piece copies nothing)
                    o, n = self._offsets[i]
                    a, b = max(lo, o), min(hi, o + n)
                    if a < b:
                        self.params[i].view(-1)[a - o:b - o].copy_(gathered[a + shift:b + shift])
                    i += 1


class FSDPFlatParams(FlatParams):
    """Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``, ZeRO-3): each is a ``DTensor`` of
    which this rank holds a block of rows, and the flat vector of this rank is the concatenation of its local
    blocks. Nothing is ever gathered by this class: FSDP all-gathers one wrapped block (a decoder layer) at a time
    for its forward and backward, and its reduce-scatter leaves each rank the *global* (mean over ranks) gradient
    of its own rows. Perturbing θ is a write to the local rows, which the next forward's all-gather picks up; dot
    products and norms are shard-local sums, all-reduced — the same global cosine as one process.
    """

    holds_shard = True

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        # to_local() each time: the local rows are FSDP's storage, not a copy to cache
        return p.to_local()

    @contextmanager
    def grad_sink(self, flat: torch.Tensor) -> Iterator[None]:
        # FSDP owns p.grad (a sharded DTensor it reduce-scatters into and accumulates over backward calls): let it,
        # then add the local rows into the flat buffer — already the global gradient, so no collective here.
        for p in self.params:
            p.grad = None
        try:
            yield
            with torch.no_grad():
                for p, v in zip(self.params, self.views(flat), strict=True):
                    if p.grad is not None:
                        v.add_(p.grad.to_local())
        finally:
            for p in self.params:
                p.grad = None


def is_fsdp_param(p: torch.Tensor) -> bool:
    """Whether ``p`` is sharded by FSDP2 (a ``DTensor``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def make_flat_params(params: list[torch.nn.Parameter], ctx: DistContext | None = None,
                     sharded: bool = False) -> FlatParams:
    """The flat view that fits ``params``: FSDP-sharded parameters (DTensors) get :class:`FSDPFlatParams`;
    replicated ones :class:`ShardedFlatParams` when ``sharded`` under several processes, else :class:`FlatParams`."""
    if params and is_fsdp_param(params[0]):
        if ctx is None:
            raise ValueError("FSDP-sharded parameters need the process group's DistContext")
        return FSDPFlatParams(params, ctx)
    if sharded and ctx is not None and ctx.distributed:
        return ShardedFlatParams(params, ctx)
    return FlatParams(params, ctx)


@dataclass
class CouplingStats:
    cos: float
    norm_a: float
    norm_b: float


def cosine(g_a: torch.Tensor, g_b: torch.Tensor, flat: FlatParams | None = None) -> CouplingStats:
    """Global cos(g_a, g_b) and norms (``flat`` makes them global over shards)."""
    if flat is None:
        na, nb, ab = g_a.norm().item(), g_b.norm().item(), torch.dot(g_a, g_b).item()
    else:
        na, nb, ab = flat.norm(g_a), flat.norm(g_b), flat.dot(g_a, g_b)
    cos = ab / (na * nb) if na > 0 and nb > 0 else float("nan")
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
    precision: str = "ieee",
    scheme: str = "forward",
) -> CouplingStats:
    """Add ``scale · ∇̂cos(g_a, g_b)`` to ``out`` with two extra gradient evaluations and no Hessian.

    ``g_a``/``g_b`` are the gradients at the current θ; ``grad_a``/``grad_b`` recompute them (same batches) at a
    perturbed θ. The parameters are bit-identical to their input values on return, even on error. The
    recomputations run under :func:`float32_matmul` at ``precision``; compute ``g_a``/``g_b`` under the same
    setting, or the difference mixes two precisions. ``scheme``: ``forward`` (the paper's, 2 passes) or ``central``
    (4 passes, O(ε²)).
    """
    if scheme not in ("forward", "central"):
        raise ValueError(f"finite-difference scheme must be 'forward' or 'central', not {scheme!r}")
    stats = cosine(g_a, g_b, flat)
    if not (stats.norm_a > 0 and stats.norm_b > 0):
        return stats
    with float32_matmul(precision):
        _add_finite_differences(flat, g_a, g_b, grad_a, grad_b, eps, out, scale, stats, scratch, backup, scheme)
    return stats


def _add_finite_differences(flat: FlatParams, g_a: torch.Tensor, g_b: torch.Tensor, grad_a: GradFn, grad_b: GradFn,
                            eps: float, out: torch.Tensor, scale: float, stats: CouplingStats,
                            scratch: torch.Tensor | None, backup: torch.Tensor | None, scheme: str = "forward") -> None:
    scratch = flat.zeros() if scratch is None else scratch
    backup = flat.read(flat.zeros() if backup is None else backup)
    c = stats.cos
    legs = ((g_a, stats.norm_a, g_b, stats.norm_b, grad_a), (g_b, stats.norm_b, g_a, stats.norm_a, grad_b))
    # forward: (g(θ + εδ) − g(θ)) / ε;  central: ((g(θ + εδ) − g(θ)) − (g(θ − εδ) − g(θ))) / 2ε — each difference
    # taken against g(θ) at the gradients' own scale before it is scaled up, as in the forward one
    sides = ((1.0, 1.0),) if scheme == "forward" else ((1.0, 0.5), (-1.0, -0.5))
    try:
        for g_self, n_self, g_other, n_other, grad_fn in legs:
            for sign, weight in sides:
                with torch.no_grad():
                    # θ ± ε δ  with  δ = ĝ_other − c ĝ_self
                    torch.mul(g_other, sign * eps / n_other, out=scratch)
                    scratch.add_(g_self, alpha=-sign * eps * c / n_self).add_(backup)
                flat.write(scratch)
                scratch.zero_()
                grad_fn(scratch)
                flat.write(backup)
                with torch.no_grad():
                    scratch.sub_(g_self)
                    out.add_(scratch, alpha=weight * scale / (eps * n_self))
    finally:
        flat.write(backup)
