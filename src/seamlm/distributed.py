"""The process group a run lives in: one process, or several under ``accelerate launch`` / ``torchrun``.

``accelerate`` sets up ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) and picks each rank's device; the SEAM
step then does its own collectives on flat gradient buffers (see :mod:`seamlm.defense.coupling`), because its five
passes and two perturbations per step do not fit DDP's one-backward-per-step model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from seamlm.errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and device of this process; collectives are no-ops in a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the mean of ``tensor`` over ranks."""
        if self.distributed:
            dist.all_reduce(tensor)
            tensor.div_(self.world_size)
        return tensor

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, value: float) -> float:
        """Mean of a Python float over ranks (float64 on the wire: logged figures match one process)."""
        return self._reduce_scalar(value, self.all_reduce_mean_)

    def sum(self, value: float) -> float:
        """Sum of a Python float over ranks (float64 on the wire)."""
        return self._reduce_scalar(value, self.all_reduce_sum_)

    def _reduce_scalar(self, value: float, reduce_: Callable[[torch.Tensor], torch.Tensor]) -> float:
        if not self.distributed:
            return value
        return reduce_(torch.tensor([value], dtype=torch.float64, device=self._wire_device())).item()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the answer: a collective, so also a barrier)."""
        return self.mean(1.0 if flag else 0.0) > 0

    def all_gather_into(self, out: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """``out`` (``world_size × shard.numel()``) ← every rank's ``shard``, in rank order."""
        if self.distributed:
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
            gather(out, shard)
        else:
            out.copy_(shard)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _wire_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


#: how long a rank may wait in one collective; long by default, since under --shard_parameters the other ranks wait
#: while rank 0 alone reads a whole checkpoint (NCCL's own default, 10 minutes, is too short for 70B on slow disks)
TIMEOUT_ENV = "SEAMLM_COLLECTIVE_TIMEOUT_S"


def collective_timeout() -> timedelta:
    """The process group's collective timeout: ``$SEAMLM_COLLECTIVE_TIMEOUT_S`` seconds, default 2 hours."""
    raw = os.environ.get(TIMEOUT_ENV, "7200")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout as a positive number of seconds")
    return timedelta(seconds=seconds)


def launched_distributed() -> bool:
    """Whether this process was started by ``accelerate launch``/``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


#: accelerate plugins that would wrap a model in ``Accelerator.prepare``, which seamlm's trainers do not call
_ACCELERATE_PLUGINS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                       "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def check_launcher_options() -> None:
    """Refuse what an ``accelerate`` config asks for and seamlm would not do, rather than ignore it: the FSDP,
    DeepSpeed and Megatron plugins (seamlm shards itself: ``--shard_parameters`` is FSDP2) and mixed precision
    (seamlm's compute dtype is its own ``--compute_dtype``)."""
    plugins = [name for var, name in _ACCELERATE_PLUGINS.items() if os.environ.get(var, "").lower() == "true"]
    if plugins:
        raise ConfigError(
            f"the accelerate config asks for {plugins[0]} (distributed_type: {plugins[0].upper()}), which seamlm "
            "does not apply: launch with a MULTI_GPU config (examples/accelerate/) and shard with seamlm's own "
            "option --shard_parameters true (FSDP2, ZeRO-3; defend and attack), or --shard_gradients true (ZeRO-2, "
            "defend)")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("no", ""):
        raise ConfigError(f"the accelerate config asks for mixed_precision: {precision}, which accelerate would "
                          "apply only through Accelerator.prepare, which seamlm does not call: set mixed_precision: "
                          "no; SEAM's compute dtype is --compute_dtype (auto = bf16 autocast on GPUs, fp32 weights)")


def current_context(device: str | torch.device | None = None) -> DistContext:
    """The context of this process. Under a multi-process launcher the process group is initialised through
    ``accelerate`` (which also chooses ``cuda:<local_rank>`` or the CPU); a process group the caller initialised
    itself is used as is; otherwise a single-process context. Launcher options seamlm would not honour are
    refused (:func:`check_launcher_options`)."""
    from seamlm.models import check_device

    check_launcher_options()
    dev = torch.device(check_device(device)) if device is not None else None
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        if dev is None:
            dev = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)
    if not launched_distributed():
        return DistContext(device=dev or torch.device("cpu"))
    from accelerate import PartialState

    state = PartialState(cpu=(dev is not None and dev.type == "cpu") or not torch.cuda.is_available(),
                         timeout=collective_timeout())
    return DistContext(rank=state.process_index, world_size=state.num_processes,
                       local_rank=state.local_process_index, device=torch.device(state.device))


def shutdown() -> None:
    """Leave the process group cleanly (every rank): a process that exits with gloo threads alive can abort."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def main_process_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), the others after it."""
    if not ctx.is_main:
        ctx.barrier()
    yield
    if ctx.is_main:
        ctx.barrier()


def load_model_for_rank(name: str, ctx: DistContext, dtype: str | torch.dtype = "auto", device: str | None = None,
                        shard_parameters: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for this rank: one process loads on ``device``; several load on their own device.

    A model about to be FSDP-sharded (``shard_parameters``) is read once per job: rank 0 loads it on the CPU, in
    the dtype ``auto`` gives on the ranks' device, and sends the config and tokenizer; the other ranks build the
    same architecture with their parameters on the meta device (no memory; buffers real), and
    :func:`fully_shard_model` later gives every rank its rows of rank 0's weights. A load error on rank 0 stops every
    rank with its message.
    """
    from seamlm.models import load_model, resolve_dtype, skeleton_from_config

    if not ctx.distributed:
        return load_model(name, dtype=dtype, device=device)
    if not shard_parameters:
        return load_model(name, dtype=dtype, device=str(ctx.device))
    torch_dtype = resolve_dtype(dtype, str(ctx.device))
    model = tokenizer = failure = None
    if ctx.is_main:
        try:
            model, tokenizer = load_model(name, dtype=torch_dtype, device="cpu")
        except Exception as exc:  # noqa: BLE001 — any failure must reach the ranks waiting for the weights
            failure = exc
    config, tok, error = ctx.broadcast_object(
        (None, None, str(failure)) if failure else (model.config, tokenizer, None) if ctx.is_main else None)
    if failure is not None:
        raise failure
    if error is not None:
        raise ModelLoadError(f"rank 0 could not load the model: {error}")
    if ctx.is_main:
        return model, tokenizer
    return skeleton_from_config(config, torch_dtype).eval(), tok


def fully_shard_model(model: torch.nn.Module, ctx: DistContext, root: torch.nn.Module | None = None) -> int:
    """Shard ``model``'s parameters over the ranks with FSDP2 (``fully_shard``, ZeRO-3), in place.

    When some rank holds its parameters on the meta device (:func:`load_model_for_rank`), rank 0's weights are
    broadcast into every rank's rows after sharding (``set_model_state_dict`` with ``broadcast_from_rank0``), one
    tensor at a time; the meta ranks' buffers (rotary tables: not in the state dict) are kept as they were built.

    Every block named in the model's ``_no_split_modules`` (the decoder layers of a transformers model: the same
    policy as accelerate's transformer auto-wrap) becomes its own FSDP unit, gathered only while it computes; the
    rest (embeddings, final norm, head) forms the root unit, placed on ``root`` (a module that contains ``model``
    and whose forward is the one called) when given. Returns the number of wrapped blocks (0: the whole
    model is gathered at once for every forward, which saves optimizer and gradient memory but not activations').
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    target = root if root is not None else model
    prefix = next(n for n, m in target.named_modules() if m is model)
    prefix = prefix + "." if prefix else ""
    on_meta = any(p.is_meta for p in model.parameters())
    from_rank0 = ctx.any(on_meta)
    if from_rank0 and ctx.any(ctx.is_main and on_meta):  # collective: every rank raises, none waits
        raise ValueError("rank 0 must hold the real weights to broadcast them")
    if from_rank0:  # the same parameters everywhere, or FSDP's collectives would mismatch (and abort, not raise)
        layout = [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]
        if ctx.any(layout != ctx.broadcast_object(layout)):
            raise ValueError("the meta-device model on some rank does not have rank 0's parameters (names, shapes, "
                             "dtypes, tied weights): build it from rank 0's config and call tie_weights()")
    full = {prefix + k: v for k, v in model.state_dict().items()} if from_rank0 and ctx.is_main else {}
    # buffers built at init (rotary tables) survive to_empty through this copy; meta ones (made from a meta weight)
    # are persistent state and come with rank 0's state dict
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta} if on_meta else {}

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(target, mesh=mesh)
    if from_rank0:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if on_meta:
            target.to_empty(device=ctx.device)
            with torch.no_grad():
                for name, buf in buffers.items():
                    model.get_buffer(name).copy_(buf)
        set_model_state_dict(target, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
    return len(blocks)


def full_state_dict(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP-sharded module, on the CPU of rank 0 (empty on the other ranks), keys
    starting with ``prefix`` only and without it. Every rank must call it: the shards are gathered one tensor at a
    time, so no GPU ever holds the whole model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
