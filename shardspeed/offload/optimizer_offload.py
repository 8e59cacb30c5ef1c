"""ZeRO-Offload: fp32 master weights and optimizer states in host memory or on NVMe, stepped on the CPU.

A ZeRO stage hands over, per optimizer param group, the pieces of its partition as `Segment`s: a
gradient slice on the device and the model-dtype parameter slice the update goes back to. The
segments are cut into sub-groups of at most `sub_group_size` elements. Each sub-group has one
fp32 master tensor in host memory (page-locked when the device is CUDA), which becomes one
parameter of the user's optimizer: any elementwise torch optimizer steps it, and its states are
created beside it in host memory. The stage keeps computing the global norm and the overflow
verdict on the device; this class only moves and steps.

A step goes sub-group by sub-group: its gradients are copied to a host staging buffer and
multiplied by the clip/unscale factor (the same arithmetic as without offload, so results are
bit-identical), the optimizer steps it, and the master is copied back into the model's
parameters. On CUDA the copies of the next sub-group are issued before the CPU steps the current
one, so the transfers overlap the step. On a CPU device there is nothing to overlap and every
sub-group is stepped in one optimizer call.

With `device: nvme` the master and the per-element optimizer states of each sub-group live in a
swap file (`swap_space.SwapSpace`); only `buffer_count` sub-groups are in memory at once. With
`pipeline_read` the next sub-groups are read while one is stepped; with `pipeline_write` the
stepped ones are written back while the next are stepped (both off by default, as in DeepSpeed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..accelerator import get_accelerator
from ..config.errors import ConfigError
from ..config.sections import AioConfig, OffloadOptimizerConfig
from .sub_group_swap import SubGroupSwap


@dataclass(eq=False)
class Segment:
    """One piece of this rank's partition: where its gradient is and where updated values go.

    `param` is the model-dtype slice updated from the master. Parameters that are not resident
    (stage 3 on NVMe) give `load` (their current values) and `store` (takes updated fp32 values)
    instead, and are never split across sub-groups.
    """

    grad: torch.Tensor
    param: torch.Tensor | None
    load: Callable[[], torch.Tensor] | None = None
    store: Callable[[torch.Tensor], None] | None = None

    @property
    def numel(self) -> int:
        return self.grad.numel()

    @property
    def splittable(self) -> bool:
        return self.param is not None

    def values(self) -> torch.Tensor:
        if self.param is not None:
            return self.param
        assert self.load is not None  # a segment without `param` gives `load` and `store`
        return self.load()


@dataclass(eq=False)
class _SubGroup:
    group: int
    pieces: list[tuple[Segment, int, int, int]]  # (segment, start in segment, length, start in master)
    numel: int
    master: torch.nn.Parameter
    scalars: dict[str, Any] = field(default_factory=dict)  # NVMe: non-element states (step) kept in memory
    has_state: bool = False  # NVMe: optimizer states have been written to disk


def cut_sub_groups(segments: list[Segment], sub_group_size: int) -> list[list[tuple[Segment, int, int]]]:
    """Consecutive pieces of `segments`, at most `sub_group_size` elements per sub-group where possible.

    Splittable segments are cut at the boundary; a segment that can't be split starts a new
    sub-group when it doesn't fit, and one bigger than the size is a sub-group of its own.
    """
    limit = max(1, sub_group_size)
    out: list[list[tuple[Segment, int, int]]] = []
    current: list[tuple[Segment, int, int]] = []
    filled = 0
    for seg in segments:
        start = 0
        while start < seg.numel:
            room = limit - filled
            if not seg.splittable:
                if current and seg.numel > room:
                    out.append(current)
                    current, filled = [], 0
                take = seg.numel
            else:
                take = min(room, seg.numel - start)
            current.append((seg, start, take))
            filled += take
            start += take
            if filled >= limit:
                out.append(current)
                current, filled = [], 0
    if current:
        out.append(current)
    return out


class OffloadedOptimizer:
    """Host (or NVMe) masters and optimizer states for a ZeRO stage, stepped on the CPU."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        groups: list[list[Segment]],
        cfg: OffloadOptimizerConfig,
        sub_group_size: int,
        *,
        aio: AioConfig,
        rank: int,
        timers: Any = None,
    ) -> None:
        if cfg.ratio != 1.0:
            raise ConfigError("`zero_optimization.offload_optimizer.ratio` below 1 (partial offload) is not supported yet; "
                              "set it to 1.0")
        if cfg.super_offload:
            raise ConfigError("`zero_optimization.offload_optimizer.super_offload` is not supported yet; set it to false")
        self.optimizer = optimizer
        self.cfg = cfg
        self.nvme = cfg.device == "nvme"
        self.timers = timers
        self.accelerator = get_accelerator()
        self.device = groups[0][0].grad.device if groups and groups[0] else torch.device("cpu")
        self.pin = cfg.pin_memory and self.device.type == "cuda"
        self.group_segments = groups
        self.sub_groups: list[_SubGroup] = []
        for g, segments in enumerate(groups):
            for pieces in cut_sub_groups(segments, sub_group_size):
                numel = sum(n for _, _, n in pieces)
                placed, offset = [], 0
                for seg, start, n in pieces:
                    placed.append((seg, start, n, offset))
                    offset += n
                master = torch.nn.Parameter(torch.empty(0, dtype=torch.float32))
                self.sub_groups.append(_SubGroup(g, placed, numel, master))
        for g, group in enumerate(optimizer.param_groups):
            group["params"] = [sg.master for sg in self.sub_groups if sg.group == g]
        _use_fused_cpu_kernels(optimizer)
        self._staging: list[torch.Tensor] = []
        self.swap: SubGroupSwap | None = None
        if self.nvme:
            self.swap = SubGroupSwap(self.sub_groups, optimizer, cfg, aio, rank, self.pin, self._time)
            for i, sg in enumerate(self.sub_groups):  # masters start on disk; only the buffers stay in memory
                buf = self.swap.acquire()
                self._fill_master(sg, self.swap.views(sg, buf)[0])
                self.swap.write_now(i, buf, sg.numel * 4)
                self.swap.release(buf)
        else:
            for sg in self.sub_groups:
                sg.master.data = self._host_empty(sg.numel)
                self._fill_master(sg, sg.master.data)

    # ---- set-up ------------------------------------------------------------------------------
    def _host_empty(self, numel: int) -> torch.Tensor:
        t = torch.empty(numel, dtype=torch.float32)
        return self.accelerator.pin_memory(t) if self.pin else t

    def _fill_master(self, sg: _SubGroup, out: torch.Tensor) -> None:
        """Masters start from the model's current values (fp32 models: exact; 16-bit: upcast)."""
        for seg, start, n, at in sg.pieces:
            out[at:at + n].copy_(seg.values().reshape(-1)[start:start + n])

    # ---- the step ------------------------------------------------------------------------------
    def step(self, factor: float) -> None:
        """Step every sub-group with its gradients multiplied by `factor` (clip and loss-scale)."""
        if self.nvme:
            self._step_nvme(factor)
        elif self.device.type == "cpu":
            self._step_waves([self.sub_groups], factor)  # nothing to overlap: one optimizer call
        else:
            self._step_waves([[sg] for sg in self.sub_groups], factor)

    def _step_waves(self, waves: list[list[_SubGroup]], factor: float) -> None:
        staged: tuple[list[torch.Tensor], Any] | None = self._stage_grads(waves[0], factor, slot=0)
        for w, wave in enumerate(waves):
            assert staged is not None  # the first wave is staged above, each later one in the pass before it
            following = self._stage_grads(waves[w + 1], factor, slot=(w + 1) % 2) if w + 1 < len(waves) else None
            self._wait_staged(staged)
            self._optimizer_step(wave, staged[0])
            self._copy_back(wave)
            staged = following

    def _stage_grads(self, wave: list[_SubGroup], factor: float, slot: int) -> tuple[list[torch.Tensor], Any]:
        """Host fp32 gradients of `wave`, multiplied by `factor`. A CPU fp32 gradient of one piece is used in place."""
        self._time("offload_grad_copy", True)
        grads: list[torch.Tensor] = []
        need = sum(sg.numel for sg in wave if not self._in_place_grad(sg))
        staging = self._staging_buffer(slot, need) if need else None
        at = 0
        for sg in wave:
            if self._in_place_grad(sg):
                seg, start, n, _ = sg.pieces[0]
                grads.append(seg.grad.reshape(-1)[start:start + n])
                continue
            assert staging is not None  # `need` counted this sub-group
            host = staging[at:at + sg.numel]
            at += sg.numel
            for seg, start, n, off in sg.pieces:
                host[off:off + n].copy_(seg.grad.reshape(-1)[start:start + n], non_blocking=self.pin)
            grads.append(host)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._time("offload_grad_copy", False)
        return grads, (event, factor)

    def _wait_staged(self, staged: tuple[list[torch.Tensor], Any]) -> None:
        grads, (event, factor) = staged
        if event is not None:
            event.synchronize()
        if factor != 1.0:
            torch._foreach_mul_(grads, factor)

    def _in_place_grad(self, sg: _SubGroup) -> bool:
        if len(sg.pieces) != 1:
            return False
        grad = sg.pieces[0][0].grad
        return grad.device.type == "cpu" and grad.dtype == torch.float32 and grad.is_contiguous()

    def _staging_buffer(self, slot: int, numel: int) -> torch.Tensor:
        while len(self._staging) <= slot:
            self._staging.append(torch.empty(0, dtype=torch.float32))
        if self._staging[slot].numel() < numel:
            self._staging[slot] = self._host_empty(numel)
        return self._staging[slot]

    def _optimizer_step(self, wave: list[_SubGroup], grads: list[torch.Tensor]) -> None:
        self._time("optimizer_step_cpu", True)
        for sg, grad in zip(wave, grads):
            sg.master.grad = grad
        self.optimizer.step()
        for sg in wave:
            sg.master.grad = None
        self._time("optimizer_step_cpu", False)

    def _copy_back(self, wave: list[_SubGroup]) -> None:
        """Updated masters into the model's parameter partitions (asynchronously from pinned memory on CUDA)."""
        self._time("offload_param_copy", True)
        with torch.no_grad():
            for sg in wave:
                master = sg.master.detach()
                for seg, start, n, off in sg.pieces:
                    if seg.param is None:
                        assert seg.store is not None  # a segment without `param` gives `load` and `store`
                        seg.store(master[off:off + n])
                    else:
                        seg.param.reshape(-1)[start:start + n].copy_(master[off:off + n], non_blocking=self.pin)
        self._time("offload_param_copy", False)

    # ---- NVMe ----------------------------------------------------------------------------------
    def _step_nvme(self, factor: float) -> None:
        swap = self.swap
        assert swap is not None
        reads: dict[int, tuple[torch.Tensor, Any]] = {}
        order = list(range(len(self.sub_groups)))
        for k, i in enumerate(order):
            if i not in reads:
                reads[i] = swap.read(i, self.sub_groups[i])
            if self.cfg.pipeline_read:
                for j in order[k + 1:]:
                    if j in reads:
                        continue
                    if not swap.has_free():
                        break
                    reads[j] = swap.read(j, self.sub_groups[j])
            buf, request = reads.pop(i)
            self._time("swap_in_wait", True)
            request.wait()
            self._time("swap_in_wait", False)
            sg = self.sub_groups[i]
            swap.attach(sg, buf)
            staged = self._stage_grads([sg], factor, slot=0)
            self._wait_staged(staged)
            self._optimizer_step([sg], staged[0])
            self._copy_back([sg])
            self._device_sync()  # the copies read the buffer, which is reused below
            swap.detach(sg, buf)
            swap.write_behind(i, buf, swap.footprint[i])
            if not self.cfg.pipeline_write:
                swap.retire_write()
        swap.flush()

    def _materialized(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """A sub-group's master and states as tensors this caller may keep (NVMe: read from disk)."""
        sg = self.sub_groups[i]
        if self.swap is None:
            return sg.master.detach(), dict(self.optimizer.state.get(sg.master, {}))
        return self.swap.stored(i, sg)

    # ---- whole partitions, for checkpoints ---------------------------------------------------------
    def group_master_and_state(self, g: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Group g's fp32 master (its segments end to end) and optimizer state, per element where it is."""
        masters: list[torch.Tensor] = []
        per_element: dict[str, list[torch.Tensor]] = {}
        scalars: dict[str, Any] = {}
        for i, sg in enumerate(self.sub_groups):
            if sg.group != g:
                continue
            master, state = self._materialized(i)
            masters.append(master)
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.numel() == sg.numel:
                    per_element.setdefault(key, []).append(value)
                else:
                    scalars.setdefault(key, value)
        state = {**scalars, **{k: torch.cat(v) for k, v in per_element.items()}}
        return torch.cat(masters) if masters else torch.empty(0), state

    def load_group(self, g: int, master: torch.Tensor, state: dict[str, Any]) -> None:
        """Set group g's masters and states from whole-group tensors; the model's parameters follow."""
        at = 0
        for i, sg in enumerate(self.sub_groups):
            if sg.group != g:
                continue
            piece = master[at:at + sg.numel]
            own = {k: (v[at:at + sg.numel].clone() if torch.is_tensor(v) and v.dim() > 0 and v.numel() == master.numel()
                       else (v.clone() if torch.is_tensor(v) else v)) for k, v in state.items()}
            at += sg.numel
            if self.swap is not None:
                buf = self.swap.acquire()
                views = self.swap.views(sg, buf)
                views[0].copy_(piece)
                for (key, _), view in zip(self.swap.state_layout, views[1:]):
                    if key in own:
                        view.copy_(own.pop(key).reshape(-1))
                sg.scalars, sg.has_state = own, bool(state)
                self.swap.write_now(i, buf, self.swap.footprint[i])
                sg.master.data = views[0]
                self._copy_back([sg])
                self._device_sync()
                sg.master.data = torch.empty(0, dtype=torch.float32)
                self.swap.release(buf)
            else:
                sg.master.data.copy_(piece)
                if own:
                    self.optimizer.state[sg.master] = own
                self._copy_back([sg])

    def reload_from_params(self, segments: list[Segment] | None = None) -> None:
        """Masters from the model's (just loaded or rewritten) parameters; states untouched.

        With `segments`, only the sub-groups holding a piece of one of them.
        """
        wanted = None if segments is None else {id(seg) for seg in segments}
        for i, sg in enumerate(self.sub_groups):
            if wanted is not None and not any(id(seg) in wanted for seg, *_ in sg.pieces):
                continue
            if self.swap is not None:
                buf, request = self.swap.read(i, sg)
                request.wait()
                self._fill_master(sg, self.swap.views(sg, buf)[0])
                self.swap.write_now(i, buf, self.swap.state_bytes(i, sg))
                self.swap.release(buf)
            else:
                self._fill_master(sg, sg.master.data)

    # ---- reporting -------------------------------------------------------------------------------
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes by where they live: host memory (`cpu_*`) and the swap file (`nvme_*`)."""
        masters = sum(sg.numel for sg in self.sub_groups) * 4
        staging = sum(t.numel() * t.element_size() for t in self._staging)
        if self.swap is not None:
            return {**self.swap.memory_breakdown(masters), "cpu_gradient_staging": staging}
        states = sum(v.numel() * v.element_size() for sg in self.sub_groups
                     for v in self.optimizer.state.get(sg.master, {}).values() if torch.is_tensor(v))
        return {"cpu_master_weights": masters, "cpu_optimizer_states": states, "cpu_gradient_staging": staging}

    def _device_sync(self) -> None:
        if self.pin:
            torch.cuda.current_stream(self.device).synchronize()

    def _time(self, name: str, start: bool) -> None:
        if self.timers is not None:
            timer = self.timers(name)
            timer.start() if start else timer.stop()

    def close(self) -> None:
        if self.swap is not None:
            self.swap.close()
            self.swap = None


TIMER_NAMES = ("offload_grad_copy", "optimizer_step_cpu", "offload_param_copy", "swap_in_wait", "swap_out_wait")


def _use_fused_cpu_kernels(optimizer: torch.optim.Optimizer) -> None:
    """torch Adam/AdamW groups take the fused CPU kernel (several times faster than foreach there)."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        if not group.get("fused") and not group.get("differentiable") and not torch.is_tensor(group.get("lr")):
            group["fused"], group["foreach"] = True, False
