"""Where a checkpoint's saved inputs wait between the forward and the recompute.

`torch.utils.checkpoint` (non-reentrant) keeps the checkpointed function's positional tensor
inputs as ordinary autograd saved tensors, saved *before* it installs its own hook for the tensors
saved inside the function. A `saved_tensors_hooks` context around the checkpoint call therefore
sees exactly those inputs and nothing else: `InputStash.pack` replaces each floating-point input
by a `PackedInput`, and `InputStash.unpack` rebuilds it when the backward pass starts the
recompute.

What is sharded, before and after:

- before pack: every tensor-parallel rank holds the whole input. `partition_activations` relies on
  the tensor-parallel contract that this input is *identical* on every rank of the group (as the
  input of a column-parallel layer is); it does not check it.
- after pack: rank r keeps elements [r*s, (r+1)*s) of the flattened input, zero-padded to tp*s
  elements (s = ceil(numel / tp)); with `cpu_checkpointing` that slice (or, without partitioning,
  the whole input) is a host-memory copy.
- after unpack: the whole input again (the slices all-gathered across the group), on its original
  device, with its shape and dtype (contiguous, whatever its strides were).

Parameters, integer tensors, empty tensors and tensors marked `no_checkpointing = True` pass
through untouched (DeepSpeed's `is_activation_to_checkpoint` rule, plus parameters, which the model
holds anyway so a copy would only add memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from ..comm.collectives import CommPolicy, all_gather_partitions
from ..comm.topology import AxisGroup, axis_of_group


@dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's tensor-parallel group as a Megatron-style `mpu` object describes it."""

    rank: int = 0
    size: int = 1
    axis: AxisGroup | None = None  # None when size is 1

    @classmethod
    def from_mpu(cls, mpu: Any) -> "TensorParallelGroup":
        """Read `get_tensor_model_parallel_*` (Megatron-Core's names), else `get_model_parallel_*`."""
        if mpu is None:
            return cls()
        prefix = "get_tensor_model_parallel_" if hasattr(mpu, "get_tensor_model_parallel_rank") else "get_model_parallel_"
        rank = int(getattr(mpu, prefix + "rank")())
        size = int(getattr(mpu, prefix + "world_size")())
        if size <= 1:
            return cls(rank=0, size=1)
        group = getattr(mpu, prefix + "group")()
        if not dist.is_initialized():
            raise RuntimeError(f"the mpu reports a tensor-parallel size of {size} but torch.distributed is not initialized")
        axis = axis_of_group(group)
        if axis.size != size or axis.rank != rank:
            raise ValueError(
                f"mpu is inconsistent: {prefix}world_size()={size}, {prefix}rank()={rank}, but its group holds "
                f"global ranks {list(axis.ranks)} and this is global rank {dist.get_rank()}"
            )
        return cls(rank=rank, size=size, axis=axis)


@dataclass
class SavedInputStats:
    """What the packed inputs cost, summed since the last `reset()` (counted while the stash is active)."""

    tensors: int = 0
    bytes_kept: int = 0  # held by this rank between forward and recompute
    bytes_full: int = 0  # what keeping the whole inputs where they were would hold
    devices: set[str] = field(default_factory=set)  # device types the kept bytes live on

    def snapshot(self) -> "SavedInputStats":
        return replace(self, devices=set(self.devices))


@dataclass(frozen=True)
class PackedInput:
    """A saved input while it waits: the whole tensor or this rank's padded slice, maybe on the host."""

    data: torch.Tensor
    shape: torch.Size
    device: torch.device
    numel: int
    slice_size: int  # 0: `data` is the whole tensor; else each rank's slice length


def is_activation(t: torch.Tensor) -> bool:
    return (t.is_floating_point() and t.numel() > 0 and not isinstance(t, torch.nn.Parameter)
            and not getattr(t, "no_checkpointing", False))


class InputStash:
    """`pack`/`unpack` for `torch.autograd.graph.saved_tensors_hooks` around one checkpoint call."""

    def __init__(self, tp: TensorParallelGroup, partition: bool, to_host: bool, stats: SavedInputStats) -> None:
        self.tp = tp
        self.partition = partition and tp.size > 1
        self.to_host = to_host
        self.stats = stats

    @property
    def active(self) -> bool:
        """False when packing would keep every input as it is (then no hooks are installed)."""
        return self.partition or self.to_host

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor) -> torch.Tensor | PackedInput:
        if not is_activation(t):
            return t
        shard = self.partition and t.numel() >= self.tp.size
        host = self.to_host and t.device.type != "cpu"
        data = t.detach()
        if shard:
            data = _my_slice(data, self.tp)
        if host:
            data = _host_copy(data)
        self._count(t, data)
        if not (shard or host):
            return t
        return PackedInput(data, t.shape, t.device, t.numel(), data.numel() if shard else 0)

    def unpack(self, packed: torch.Tensor | PackedInput) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        data = packed.data.to(packed.device, non_blocking=True)
        if packed.slice_size:
            data = _gather(data, packed, self.tp)
        return data.view(packed.shape)

    def _count(self, whole: torch.Tensor, kept: torch.Tensor) -> None:
        self.stats.tensors += 1
        self.stats.bytes_full += whole.numel() * whole.element_size()
        self.stats.bytes_kept += kept.numel() * kept.element_size()
        self.stats.devices.add(kept.device.type)


def _my_slice(t: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """A new tensor with this rank's ceil(numel/tp) elements of `t` flattened, zero-padded at the end."""
    flat = t.reshape(-1)
    size = math.ceil(flat.numel() / tp.size)
    start = min(tp.rank * size, flat.numel())
    mine = flat[start:start + size]
    out = torch.empty(size, dtype=t.dtype, device=t.device)
    out[:mine.numel()].copy_(mine)
    out[mine.numel():].zero_()
    return out


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy; pinned, and copied asynchronously on the current stream, when `t` is on CUDA.

    Safe without a sync: the copy back in `unpack` is queued on the same stream, after this one.
    """
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    host.copy_(t, non_blocking=t.is_cuda)
    return host


def _gather(mine: torch.Tensor, packed: PackedInput, tp: TensorParallelGroup) -> torch.Tensor:
    """The whole flattened input from every rank's slice (an all-gather over the tensor-parallel group).

    On gloo, `all_gather_partitions` sums zero-filled buffers, so a -0.0 in another rank's slice
    comes back as +0.0: equal values, and the recompute's results compare equal.
    """
    assert tp.axis is not None  # a slice is only made when tp.size > 1
    size = packed.slice_size
    full = torch.empty(size * tp.size, dtype=mine.dtype, device=mine.device)
    full[tp.rank * size:(tp.rank + 1) * size].copy_(mine)
    all_gather_partitions(full, size, tp.axis, chunk_elements=size, policy=CommPolicy.for_group(tp.axis.group))
    return full[:packed.numel]
