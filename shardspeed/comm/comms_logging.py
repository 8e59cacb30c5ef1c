"""DeepSpeed's comms logger: every collective in the process counted, sized and timed, summarised by
`shardspeed.comm.log_summary()`.

The one interception point is torch.distributed itself. While the logger is enabled (the `comms_logger`
section, or `shardspeed.comm.configure(enabled=True)`), torch.distributed's collective functions (the
keys of `MESSAGE_ARG`: `dist.all_reduce`, `dist.all_gather_into_tensor`, `dist.isend`, ...) are replaced
by timing wrappers, and restored when it is disabled. Every shardspeed package calls them as `dist.<name>` (ZeRO's gathers and
reductions, pipeline sends, tensor- and expert-parallel all-reduces and all-to-alls), and
`shardspeed.comm.<name>` (DeepSpeed's `deepspeed.comm.<name>`) forwards to them at call time, so nothing
escapes and nothing is counted twice. Collectives torch issues from C++ (DDP's reducer) are not seen.

What a record holds, per operation name and message size (DeepSpeed's layout): the count, and for each
completed call its latency (ms), algorithmic and bus bandwidth (Gbps). The message size is DeepSpeed's:
the bytes of the collective's input tensor (all_gather: this rank's shard; reduce_scatter and
all_to_all: the whole input; list forms: the sum of the list). Bandwidths follow
deepspeed/utils/comms_logging.py's formulas (nccl-tests' conventions) with two corrections, see
`bandwidths`. A blocking call is timed to its return; an asynchronous one (`async_op=True`, `isend`,
`irecv`) is counted at launch and timed from launch to the moment its completion is seen (`wait()`,
or `is_completed()` answering True). With an accelerator the device is synchronised around each timed
call, as DeepSpeed does. The logger is process-wide, as DeepSpeed's is: `log_summary()` takes no engine.
"""
from __future__ import annotations

import inspect
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..accelerator import get_accelerator

# torch.distributed's collectives the logger wraps, and the argument whose bytes make the message size
# (DeepSpeed's `tensor` argument: the input).
MESSAGE_ARG: dict[str, str | None] = {
    "all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor", "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor", "all_gather_single": "input_tensor", "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input", "reduce_scatter_single": "input",
    "all_to_all": "input_tensor_list", "all_to_all_single": "input", "gather": "tensor", "scatter": "tensor",
    "send": "tensor", "recv": "tensor", "isend": "tensor", "irecv": "tensor", "batch_isend_irecv": "p2p_op_list",
    "barrier": None,
}
_GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_single")
_SCATTERS = ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single")
_ALL_TO_ALL = ("all_to_all", "all_to_all_single")


def convert_size(size_bytes: int) -> str:
    """A byte count as DeepSpeed prints it: "0B", "512.0 B", "1.5 KB", "678.86 MB"."""
    if size_bytes == 0:
        return "0B"
    names = ("B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
    power = int(math.floor(math.log(size_bytes, 1024)))
    return f"{round(size_bytes / math.pow(1024, power), 2)} {names[power]}"


def bandwidths(op: str, size: int, duration_ms: float, n: int) -> tuple[float, float]:
    """(algorithmic, bus) bandwidth in Gbps of `op` moving `size` message bytes over `n` ranks in `duration_ms`.

    DeepSpeed's formulas, except that `n` is the size of the group the op ran on (DeepSpeed uses the
    world size, wrong for tensor-, expert- and pipeline-parallel groups) and that a reduce-scatter's
    message, already the whole input, is not multiplied by `n` again (DeepSpeed's is, n times too high).
    An all-reduce's algorithmic bandwidth is DeepSpeed's 2 x size / time.
    """
    per_ms = size / max(duration_ms, 1e-9)
    share = (n - 1) / n if n > 0 else 0.0
    if op in _ALL_TO_ALL or op in _SCATTERS:
        alg, bus = per_ms, per_ms * share
    elif op in _GATHERS:
        alg = per_ms * n
        bus = alg * share
    elif op == "all_reduce":
        alg, bus = 2 * per_ms, per_ms * 2 * share
    else:  # point to point, broadcast, reduce, gather, scatter, barrier
        alg = bus = per_ms
    to_gbps = 8 / 1e6  # bytes per ms -> gigabits per second
    return alg * to_gbps, bus * to_gbps


def trim_mean(data: Sequence[float], trim_percent: float) -> float:
    """The mean of `data` without its top and bottom `trim_percent` (DeepSpeed's outlier trimming)."""
    n = len(data)
    if n == 0:
        return 0.0
    k = int(round(n * trim_percent))
    kept = sorted(data)[k:n - k]
    return sum(kept) / len(kept)


@dataclass
class OpRecord:
    """One operation name at one message size."""

    count: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    algbw_gbps: list[float] = field(default_factory=list)
    busbw_gbps: list[float] = field(default_factory=list)

    def summary(self, size: int) -> dict[str, Any]:
        """DeepSpeed's summary entry (averages trimmed by 10% at each end)."""
        return {"count": self.count, "total_latency_ms": sum(self.latencies_ms),
                "avg_latency_ms": trim_mean(self.latencies_ms, 0.1), "tput_avg_gbps": trim_mean(self.algbw_gbps, 0.1),
                "busbw_avg_gbps": trim_mean(self.busbw_gbps, 0.1), "msg_size_bytes": size, "msg_size_str": convert_size(size)}


@dataclass(frozen=True)
class _Call:
    """A collective being timed: what it is, and when it started."""

    op: str
    name: str
    size: int
    group_size: int
    start: float
    device: bool  # a tensor on an accelerator: synchronise before reading the clock


class TimedWork:
    """An asynchronous collective's work handle that reports its completion to the logger.

    Everything but `wait` and `is_completed` is the wrapped handle's own.
    """

    def __init__(self, work: Any, done: Callable[[], None]) -> None:
        self._work, self._done = work, done

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        result = self._work.wait(*args, **kwargs)
        self._done()
        return result

    def is_completed(self) -> bool:
        completed = bool(self._work.is_completed())
        if completed:
            self._done()
        return completed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class CommsLogger:
    """Records of every collective while enabled; DeepSpeed's `deepspeed.comm.comms_logger`."""

    def __init__(self) -> None:
        self.comms_dict: dict[str, dict[int, OpRecord]] = {}
        self.enabled = False
        self.verbose = False
        self.debug = False
        self.prof_all = True
        self.prof_ops: list[str] = []
        self._lock = threading.Lock()
        self._local = threading.local()  # a DeepSpeed-style call's log_name / prof, for the next collective
        self._originals: dict[str, Callable[..., Any]] = {}
        self._signatures: dict[str, inspect.Signature] = {}

    # ---- configuration ---------------------------------------------------------------------------
    def configure(self, enabled: bool | None = None, prof_all: bool | None = None, prof_ops: list[str] | None = None,
                  verbose: bool | None = None, debug: bool | None = None) -> None:
        """Set what is given; enabling wraps torch.distributed's collectives, disabling restores them."""
        if prof_all is not None:
            self.prof_all = prof_all
        if prof_ops is not None:
            self.prof_ops = list(prof_ops)
        if verbose is not None:
            self.verbose = verbose
        if debug is not None:
            self.debug = debug
        if enabled is not None:
            self.enabled = enabled
            self._install() if enabled else self._uninstall()

    def start_profiling_comms(self) -> None:
        self.prof_all = True

    def stop_profiling_comms(self) -> None:
        self.prof_all = False

    def start_profiling_op(self, op_name_list: list[str]) -> None:
        self.prof_ops = sorted(set(self.prof_ops) | set(op_name_list))

    def stop_profiling_op(self, op_name_list: list[str]) -> None:
        self.prof_ops = [op for op in self.prof_ops if op not in op_name_list]

    def _install(self) -> None:
        for op in MESSAGE_ARG:
            current = getattr(dist, op)
            if getattr(current, "_comms_logger", None) is self:
                continue
            self._originals[op] = current
            self._signatures[op] = inspect.signature(current)
            setattr(dist, op, self._wrapper(op, current))

    def _uninstall(self) -> None:
        for op, original in self._originals.items():
            if getattr(getattr(dist, op), "_comms_logger", None) is self:
                setattr(dist, op, original)
        self._originals.clear()

    def original(self, op: str) -> Callable[..., Any]:
        """torch.distributed's own `op`, for the logger's own collectives (never logged)."""
        return self._originals.get(op) or getattr(dist, op)

    @contextmanager
    def naming(self, log_name: str | None, prof: bool) -> Iterator[None]:
        """The next collective on this thread is logged as `log_name` (and always, with `prof`): DeepSpeed's keywords."""
        self._local.override = (log_name, prof)
        try:
            yield
        finally:
            self._local.override = None

    # ---- the wrapper -----------------------------------------------------------------------------
    def _wrapper(self, op: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def logged(*args: Any, **kwargs: Any) -> Any:
            call = self._begin(op, args, kwargs) if self.enabled else None
            result = original(*args, **kwargs)
            if call is None:
                return result
            if result is None:  # blocking (or this rank is outside the group)
                self._finish(call)
                return None
            if isinstance(result, list):  # batch_isend_irecv: done when every handle is
                left = [len(result)]

                def one_done() -> None:
                    left[0] -= 1
                    if left[0] == 0:
                        self._finish(call)
                return [TimedWork(w, _once(one_done)) for w in result]
            return TimedWork(result, _once(lambda: self._finish(call)))

        logged.__name__ = logged.__qualname__ = op
        logged.__doc__ = original.__doc__
        logged.__wrapped__ = original  # type: ignore[attr-defined]  # inspect.signature shows torch's
        logged._comms_logger = self  # type: ignore[attr-defined]
        return logged

    def _begin(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call | None:
        log_name, prof = getattr(self._local, "override", None) or (None, False)
        name = log_name or op
        if not (prof or self.prof_all or name in self.prof_ops or op in self.prof_ops):
            return None
        bound = self._signatures[op].bind(*args, **kwargs).arguments
        key = MESSAGE_ARG[op]
        tensors = _tensors(bound.get(key)) if key else []
        group = bound.get("group")
        if self.debug:
            name = f"{name} | [Caller Func: {_caller()}]"
        device = any(t.device.type not in ("cpu", "meta") for t in tensors)
        if device:
            get_accelerator().synchronize()
        return _Call(op, name, sum(t.numel() * t.element_size() for t in tensors),
                     dist.get_world_size(group) if op not in ("send", "recv", "isend", "irecv") else 2,
                     time.perf_counter(), device)

    def _finish(self, call: _Call) -> None:
        if call.device:
            get_accelerator().synchronize()
        self.append(call.op, call.name, (time.perf_counter() - call.start) * 1000.0, call.size, call.group_size)

    def append(self, raw_name: str, record_name: str, latency_ms: float, msg_size: int, group_size: int) -> None:
        """Add one completed call (DeepSpeed's `append`, with the group size the bandwidths need)."""
        algbw, busbw = bandwidths(raw_name, msg_size, latency_ms, group_size)
        with self._lock:
            record = self.comms_dict.setdefault(record_name, {}).setdefault(msg_size, OpRecord())
            record.count += 1
            record.latencies_ms.append(latency_ms)
            record.algbw_gbps.append(algbw)
            record.busbw_gbps.append(busbw)
        if self.verbose and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"comm op: {record_name} | time (ms): {latency_ms:.2f} | msg size: {convert_size(msg_size)} | "
                  f"algbw (Gbps): {algbw:.2f} | busbw (Gbps): {busbw:.2f}")

    # ---- reading ---------------------------------------------------------------------------------
    def reset_data(self) -> None:
        with self._lock:
            self.comms_dict.clear()

    def has_data(self) -> bool:
        return bool(self.comms_dict)

    def get_operation_names(self) -> list[str]:
        return list(self.comms_dict)

    def get_total_operations(self) -> int:
        return sum(r.count for sizes in self.comms_dict.values() for r in sizes.values())

    def get_raw_data(self) -> dict[str, dict[int, list[Any]]]:
        """DeepSpeed's raw layout: {name: {size: [count, latencies, algbws, busbws]}}."""
        return {name: {size: [r.count, list(r.latencies_ms), list(r.algbw_gbps), list(r.busbw_gbps)]
                       for size, r in sizes.items()} for name, sizes in self.snapshot().items()}

    def get_operation_summary(self, operation_name: str) -> dict[int, dict[str, Any]] | None:
        sizes = self.snapshot().get(operation_name)
        return None if sizes is None else {size: r.summary(size) for size, r in sizes.items()}

    def snapshot(self) -> dict[str, dict[int, OpRecord]]:
        with self._lock:
            return {name: {size: OpRecord(r.count, list(r.latencies_ms), list(r.algbw_gbps), list(r.busbw_gbps))
                           for size, r in sizes.items()} for name, sizes in self.comms_dict.items()}

    def log_all(self, print_log: bool = True, show_straggler: bool = False, return_dict: bool = False) -> dict[str, Any] | None:
        """Print (and/or return) the table: per operation and message size, count, total and average
        latency (ms), average algorithmic and bus bandwidth (Gbps). `show_straggler` needs every rank."""
        data = self.snapshot()
        summary = {name: {size: r.summary(size) for size, r in sorted(sizes.items())} for name, sizes in data.items()}
        if print_log:
            _print_table(("Comm. Op", "Message Size", "Count", "Total Latency(ms)", "Avg Latency(ms)", "tput_avg (Gbps)",
                          "busbw_avg (Gbps)"),
                         {name: [(s["msg_size_str"], s["count"], s["total_latency_ms"], s["avg_latency_ms"], s["tput_avg_gbps"],
                                  s["busbw_avg_gbps"]) for s in sizes.values()] for name, sizes in summary.items()})
        stragglers = self._stragglers(data, print_log) if show_straggler else None
        if not return_dict:
            return None
        return {"summary": summary, "straggler_analysis": stragglers,
                "metadata": {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                             "rank": dist.get_rank() if dist.is_initialized() else 0,
                             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}}

    def _stragglers(self, data: dict[str, dict[int, OpRecord]], print_log: bool) -> dict[str, Any]:
        """Per record, the fastest rank's latencies and how much longer this rank waited (every rank calls this)."""
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {(n, s): r.latencies_ms for n, sizes in data.items() for s, r in sizes.items()})
        out: dict[str, dict[int, dict[str, Any]]] = {}
        rows: dict[str, list[tuple[Any, ...]]] = {}
        for name, sizes in data.items():
            for size, record in sorted(sizes.items()):
                theirs = [other.get((name, size), []) for other in everyone]
                calls = min(len(t) for t in theirs)  # calls every rank has completed
                fastest = [min(t[i] for t in theirs) for i in range(calls)]
                waited = [mine - low for mine, low in zip(record.latencies_ms, fastest)]
                out.setdefault(name, {})[size] = {
                    "count": record.count, "total_comm_lat_ms": sum(fastest), "total_straggler_ms": sum(waited),
                    "avg_comm_lat_ms": trim_mean(fastest, 0.1), "avg_straggler_ms": trim_mean(waited, 0.1),
                    "msg_size_bytes": size, "msg_size_str": convert_size(size)}
                e = out[name][size]
                rows.setdefault(name, []).append((e["msg_size_str"], e["count"], e["total_comm_lat_ms"], e["total_straggler_ms"],
                                                  e["avg_comm_lat_ms"], e["avg_straggler_ms"]))
        if print_log:
            print("_______________________________\nBreakdown with straggler effect\n-------------------------------")
            _print_table(("Comm. Op", "Message Size", "Count", "Total comm lat(ms)", "Total straggler(ms)", "Avg comm lat(ms)",
                          "Avg straggler(ms)"), rows)
        return out


def _print_table(header: tuple[str, ...], rows: dict[str, list[tuple[Any, ...]]]) -> None:
    """DeepSpeed's layout: 20-wide columns, the operation on its own line, then one line per message size."""
    print("".join(f"{h: <20}" for h in header))
    for name, lines in rows.items():
        print(name)
        for size_str, count, *numbers in lines:
            print(f"{' ': <20}{size_str: <20}{count: <20}" + "".join(f"{x: <20.2f}" for x in numbers))


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = [False]

    def call() -> None:
        if not done[0]:
            done[0] = True
            fn()
    return call


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors a collective's message argument holds (a tensor, a list of them, or P2POps)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        held = (getattr(v, "tensor", v) for v in value)
        return [t for t in held if isinstance(t, torch.Tensor)]
    return []


_SKIPPED_FILES = (__file__, "dist_api.py", "contextlib.py")


def _caller() -> str:
    """The function that called the collective (outside this logger and the deepspeed.comm forwarders)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.endswith(_SKIPPED_FILES):
        frame = frame.f_back  # type: ignore[assignment]
    return frame.f_code.co_name if frame is not None else "?"


comms_logger = CommsLogger()
