"""Point-to-point transfers between neighbouring pipeline stages of one data-parallel replica.

An activation message is a tensor or a tuple of tensors: a fixed-size int64 header (tuple or not,
and each tensor's dtype and shape) followed by the tensors, so shapes may change from one micro
batch to the next. A gradient message carries no header: it holds one tensor for each floating
tensor of the activation it answers, in order, shaped like it (the receiver knows them).

Sends are queued with `isend` and never block; the tensors stay referenced until `flush`. Receives
block. Activations and gradients travel in two process groups of their own (over the same ranks):
each direction between two stages is then one ordered stream of messages that both ends post in
the same order. With NCCL, whose point-to-point operations between two ranks of one group run in
order on one stream, sharing a group would let a send of an activation wait behind the receive of
a gradient that itself waits for that activation (a deadlock); with gloo the split costs nothing.
"""
from __future__ import annotations

import time
from typing import Any, Union

import torch
import torch.distributed as dist

from ..comm.groups import groups_for

Activation = Union[torch.Tensor, tuple[torch.Tensor, ...]]

HEADER_SLOTS = 64
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
_DTYPE_ID = {dtype: i for i, dtype in enumerate(_DTYPES)}


def encode_header(value: Activation) -> torch.Tensor:
    """[is_tuple, count, (dtype, ndim, *shape) per tensor], zero-padded to HEADER_SLOTS."""
    tensors = _as_tuple(value)
    fields = [int(isinstance(value, tuple)), len(tensors)]
    for t in tensors:
        if t.dtype not in _DTYPE_ID:
            raise TypeError(f"pipeline stages cannot send {t.dtype} tensors; supported: {_DTYPES}")
        fields += [_DTYPE_ID[t.dtype], t.dim(), *t.shape]
    if len(fields) > HEADER_SLOTS:
        raise ValueError(f"a stage output of {len(tensors)} tensors needs {len(fields)} header slots, more than "
                         f"{HEADER_SLOTS}; pack it into fewer tensors")
    return torch.tensor(fields + [0] * (HEADER_SLOTS - len(fields)), dtype=torch.int64)


def decode_header(header: torch.Tensor) -> tuple[bool, list[tuple[torch.dtype, list[int]]]]:
    fields = header.tolist()
    is_tuple, count, at = bool(fields[0]), fields[1], 2
    specs = []
    for _ in range(count):
        dtype, ndim = _DTYPES[fields[at]], fields[at + 1]
        specs.append((dtype, fields[at + 2:at + 2 + ndim]))
        at += 2 + ndim
    return is_tuple, specs


def _as_tuple(value: Any) -> tuple[torch.Tensor, ...]:
    tensors = value if isinstance(value, tuple) else (value,)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"a pipeline stage must output a tensor or a tuple of tensors, got {type(t).__name__} "
                            "inside its output")
    return tensors


def floating(value: Activation) -> list[torch.Tensor]:
    """The tensors of an activation that carry gradients back (the floating-point ones)."""
    return [t for t in _as_tuple(value) if t.is_floating_point()]


def make_p2p_groups(pipelines: list[list[int]], rank: int) -> tuple[Any, Any]:
    """(activation group, gradient group) of `rank`'s pipeline; collective: every rank asks for every pair.

    Two groups per pipeline so the two directions' messages never queue behind each other."""
    activations, grads = groups_for(pipelines, tag="pipe-activations"), groups_for(pipelines, tag="pipe-grads")
    for ranks in pipelines:
        if rank in ranks:
            return activations[tuple(ranks)], grads[tuple(ranks)]
    return None, None


class StageChannel:
    """This rank's links to the previous and next stage (global ranks; None at the ends).

    gloo moves a message only once its receive is posted, so receives are posted early where
    their shapes are known: the gradient of an activation right after sending it, and the next
    activation's header right after the current one's tensors. `wait_seconds` adds up the time
    spent blocked in receives: the stage's idle time.
    """

    def __init__(self, prev_rank: int | None, next_rank: int | None, device: torch.device,
                 groups: tuple[Any, Any] = (None, None)) -> None:
        self.prev_rank, self.next_rank, self.device = prev_rank, next_rank, device
        self.activation_group, self.gradient_group = groups
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self._next_header: tuple[dist.Work, torch.Tensor] | None = None
        self.wait_seconds = 0.0

    def send_activation(self, value: Activation) -> None:
        self._send(encode_header(value).to(self.device), self.next_rank, self.activation_group)
        for t in _as_tuple(value):
            self._send(t.detach(), self.next_rank, self.activation_group)

    def recv_activation(self, requires_grad: bool, prefetch_next: bool = False) -> Activation:
        """The previous stage's output; its floating tensors are leaves that collect their gradient.

        `prefetch_next`: another activation follows in this batch; post its header's receive now.
        """
        header = self._wait([self._next_header or self._post_header()])[0]
        self._next_header = None
        is_tuple, specs = decode_header(header)
        posted = [self._post(torch.empty(shape, dtype=dtype, device=self.device), self.prev_rank, self.activation_group)
                  for dtype, shape in specs]
        if prefetch_next:  # posted after this message's tensors: receives match sends in order
            self._next_header = self._post_header()
        tensors = [t.requires_grad_() if requires_grad and t.is_floating_point() else t for t in self._wait(posted)]
        return tuple(tensors) if is_tuple else tensors[0]

    def post_grad_recv(self, like: list[torch.Tensor]) -> list[tuple[dist.Work, torch.Tensor]]:
        """Post the receive of the gradients answering an activation just sent (`like`: its floating tensors)."""
        return [self._post(torch.empty(t.shape, dtype=t.dtype, device=self.device), self.next_rank, self.gradient_group)
                for t in like]

    def wait_grads(self, posted: list[tuple[dist.Work, torch.Tensor]]) -> list[torch.Tensor]:
        return self._wait(posted)

    def send_grads(self, grads: list[torch.Tensor]) -> None:
        for g in grads:
            self._send(g, self.prev_rank, self.gradient_group)

    def flush(self) -> None:
        """Wait for every queued send (before the buffers may be released or reused)."""
        assert self._next_header is None, "a prefetched activation header was never consumed"
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _send(self, tensor: torch.Tensor, dst: int | None, group: Any) -> None:
        assert dst is not None, "no stage to send to"
        tensor = tensor.contiguous()
        work = dist.isend(tensor, dst, group=group)
        assert work is not None  # None only for a rank outside `group`: ours are its own pipeline's (or the world)
        self._pending.append((work, tensor))
        if len(self._pending) > 64:  # drop finished sends so a long GPipe batch does not hold them all
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def _post_header(self) -> tuple[dist.Work, torch.Tensor]:
        return self._post(torch.empty(HEADER_SLOTS, dtype=torch.int64, device=self.device), self.prev_rank, self.activation_group)

    @staticmethod
    def _post(buffer: torch.Tensor, src: int | None, group: Any) -> tuple[dist.Work, torch.Tensor]:
        assert src is not None, "no stage to receive from"
        work = dist.irecv(buffer, src, group=group)
        assert work is not None  # None only for a rank outside `group`: ours are its own pipeline's (or the world)
        return work, buffer

    def _wait(self, posted: list[tuple[dist.Work, torch.Tensor]]) -> list[torch.Tensor]:
        start = time.perf_counter()
        for work, _ in posted:
            work.wait()
        self.wait_seconds += time.perf_counter() - start
        return [buffer for _, buffer in posted]
