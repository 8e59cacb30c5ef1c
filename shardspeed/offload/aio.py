"""Asynchronous positional file I/O on a pool of threads, for NVMe offload (ZeRO-Infinity).

DeepSpeed drives NVMe through libaio; this module gets the same effect with plain threads:
`os.pwrite` / `os.preadv` release the GIL, so each worker thread keeps one request in flight in
the kernel and `thread_count` workers keep `thread_count` in flight. No new dependency.

A request (one tensor, one file offset) is cut into `block_size` chunks. Chunks go through one
shared bounded task queue of `thread_count * queue_depth` slots that the workers drain; a request
completes when its last chunk does, and its first error is re-raised by `IORequest.wait()` as a
`SwapIOError` naming the file, the offset and the size.

What each DeepSpeed `aio` knob does here (they are *not* libaio semantics):

- `block_size`: bytes per syscall (one chunk).
- `queue_depth`: tasks queued per worker thread: the shared task queue holds
  `thread_count * queue_depth` tasks (a task is one chunk, or one whole request with
  `single_submit`). Submissions beyond it wait in an unbounded request list (see `overlap_events`).
  A synchronous thread has exactly one syscall in flight, so this is not a device queue depth.
- `thread_count` (`intra_op_parallelism`): worker threads, i.e. syscalls in flight.
- `single_submit=True`: all chunks of one request are issued in order by one worker instead of
  being spread over all workers (so one request never uses more than one thread; several requests
  still run in parallel).
- `overlap_events=True` (default): a submitter thread feeds the task queue, so `pwrite`/`pread`
  return at once however large the request. `False`: the caller's thread feeds the queue itself
  and blocks while it is full, i.e. it returns only once all but the last
  `thread_count * queue_depth` chunks have been taken by workers.
- `use_gds`: rejected (no GPUDirect Storage on this path).

O_DIRECT: `pwrite`/`pread` take an optional `direct_fd` (the same file opened with `os.O_DIRECT`).
When the tensor address, the file offset and `block_size` are all multiples of 4096, every whole
4096-byte block goes through `direct_fd` and only the last partial block (if any) through the
buffered `fd`; otherwise the whole request is buffered. Linux keeps the two views coherent at page
granularity (a direct read first flushes dirty cached pages of its range; a direct write
invalidates them), and each page is touched by one chunk only. Whether O_DIRECT pays was measured,
not assumed: see `swap_space`'s docstring.

Ordering: chunks of different requests may run in any order, so requests touching the same bytes
must be ordered by the caller (wait for one before issuing the other); `SwapSpace` does this per
region. The caller keeps the tensor alive and unchanged until the request is done (the request
holds a reference to it until then, so dropping yours is safe).
"""
from __future__ import annotations

import ctypes
import os
import queue
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

DIRECT_ALIGNMENT = 4096  # bytes; covers 512- and 4096-byte logical block devices alike
_THREAD = threading.local()  # `.aio` is True on this module's threads


def on_io_thread() -> bool:
    """True on an AsyncIO worker/submitter thread, where waiting for I/O would wait for oneself.

    Finalizers can run on any thread (the cyclic GC runs wherever an allocation triggers it), so
    cleanup code that waits for I/O must hand itself to a fresh thread when this is True.
    """
    return getattr(_THREAD, "aio", False)


class SwapIOError(OSError):
    """An offload read or write failed; the message names the file, the byte offset and the size."""


class IORequest:
    """One asynchronous read or write of a whole tensor; completed by worker threads."""

    def __init__(self, op: str, path: str, offset: int, nbytes: int, nchunks: int, keep: Any) -> None:
        self._op, self._path, self._offset, self._nbytes = op, path, offset, nbytes
        self._lock = threading.Lock()
        self._remaining = nchunks
        self._event = threading.Event()
        self._error: tuple[OSError, int, int] | None = None  # (error, chunk offset, chunk bytes)
        self._keep: Any = keep  # the tensor and its memoryview: alive until the last chunk is done
        if nchunks == 0:
            self._finish()

    def done(self) -> bool:
        """True once every chunk has completed (successfully or not); never blocks."""
        return self._event.is_set()

    def wait(self) -> None:
        """Block until done; raise `SwapIOError` if any chunk failed. May be called again."""
        self._event.wait()
        if self._error is not None:
            err, off, size = self._error
            raise SwapIOError(err.errno, (
                f"{self._op} of {self._nbytes} bytes at offset {self._offset} of {self._path} failed "
                f"(chunk of {size} bytes at offset {off}): {err.strerror or err}")) from err

    @property
    def failed(self) -> bool:
        """True if a chunk has failed (workers then skip the request's remaining chunks)."""
        return self._error is not None

    def _chunk_done(self, error: OSError | None = None, offset: int = 0, size: int = 0) -> None:
        with self._lock:
            if error is not None and self._error is None:
                self._error = (error, offset, size)
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        self._keep = None
        self._event.set()


@dataclass(frozen=True)
class _Chunk:
    request: IORequest
    fd: int
    buffered_fd: int  # to finish a direct chunk that came back short and is no longer aligned
    write: bool
    buf: memoryview
    offset: int


def _run_chunk(chunk: _Chunk) -> None:
    """Do one chunk's syscalls, looping over short transfers; report to its request, never raise."""
    req = chunk.request
    if req.failed:  # an earlier chunk failed: the request is lost anyway, finish fast
        req._chunk_done()
        return
    done, total, fd = 0, len(chunk.buf), chunk.fd
    try:
        while done < total:
            view = chunk.buf[done:]
            n = os.pwrite(fd, view, chunk.offset + done) if chunk.write else os.preadv(fd, [view], chunk.offset + done)
            if n <= 0:
                raise OSError(5, "end of file" if not chunk.write else "write made no progress")
            done += n
            fd = chunk.buffered_fd  # a short direct transfer leaves an unaligned rest
    except OSError as err:
        req._chunk_done(err, chunk.offset + done, total - done)
    except Exception as err:  # a bug must not hang wait(): report it as an I/O error of this chunk
        req._chunk_done(OSError(5, f"{type(err).__name__}: {err}"), chunk.offset + done, total - done)
    else:
        req._chunk_done()


def _worker(tasks: queue.Queue) -> None:
    _THREAD.aio = True
    while True:
        task = tasks.get()
        if task is None:
            return
        for chunk in task:
            _run_chunk(chunk)


def _submitter(requests: queue.Queue, tasks: queue.Queue, nworkers: int) -> None:
    _THREAD.aio = True
    while True:
        item = requests.get()
        if item is None:
            for _ in range(nworkers):
                tasks.put(None)
            return
        for task in item:
            tasks.put(task)


@dataclass
class _Pool:
    """Everything the threads use; kept apart from `AsyncIO` so a finalizer can stop them."""
    tasks: queue.Queue
    requests: queue.Queue | None  # None: the caller feeds `tasks` itself (overlap_events=False)
    threads: list[threading.Thread] = field(default_factory=list)
    pid: int = field(default_factory=os.getpid)  # a forked child has none of these threads
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _stop(pool: _Pool) -> None:
    """Queue the stop sentinels after all queued work and join the threads (FIFO: work finishes first)."""
    if on_io_thread():  # collected on our own worker: it would wait for itself (queue full, join)
        threading.Thread(target=_stop, args=(pool,), daemon=True).start()
        return
    with pool.lock:
        if pool.closed:
            return
        pool.closed = True
    if pool.pid != os.getpid():
        return
    if pool.requests is not None:
        pool.requests.put(None)
    else:
        for _ in pool.threads:
            pool.tasks.put(None)
    for t in pool.threads:
        if t is not threading.current_thread():
            t.join()


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A zero-copy writable byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"offload I/O needs a CPU tensor, got one on {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("offload I/O needs a contiguous tensor; call .contiguous() first")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


class AsyncIO:
    """A pool of `thread_count` worker threads doing positional reads/writes of `block_size` chunks."""

    def __init__(self, block_size: int = 1 << 20, queue_depth: int = 8, thread_count: int = 1,
                 single_submit: bool = False, overlap_events: bool = True) -> None:
        for key, value in (("block_size", block_size), ("queue_depth", queue_depth),
                           ("intra_op_parallelism", thread_count)):
            if int(value) < 1:
                raise ValueError(f"aio.{key} must be >= 1, got {value}")
        self.block_size, self.queue_depth, self.thread_count = int(block_size), int(queue_depth), int(thread_count)
        self.single_submit, self.overlap_events = bool(single_submit), bool(overlap_events)
        tasks: queue.Queue = queue.Queue(maxsize=self.thread_count * self.queue_depth)
        self._pool = _Pool(tasks, queue.Queue() if self.overlap_events else None)
        for i in range(self.thread_count):  # daemon: an unclosed pool must not block interpreter exit
            self._pool.threads.append(threading.Thread(target=_worker, args=(tasks,), daemon=True,
                                                       name=f"shardspeed-aio-{i}"))
        if self._pool.requests is not None:
            self._pool.threads.append(threading.Thread(target=_submitter, daemon=True, name="shardspeed-aio-submit",
                                                       args=(self._pool.requests, tasks, self.thread_count)))
        for t in self._pool.threads:
            t.start()
        self._finalizer = weakref.finalize(self, _stop, self._pool)

    @classmethod
    def from_config(cls, aio_cfg: Any) -> AsyncIO:
        """Build from the `aio` config section (`shardspeed.config.sections.AioConfig`)."""
        if getattr(aio_cfg, "use_gds", False):
            raise ValueError("aio.use_gds=true: GPUDirect Storage is not supported by shardspeed; set it to false")
        return cls(block_size=aio_cfg.block_size, queue_depth=aio_cfg.queue_depth,
                   thread_count=aio_cfg.intra_op_parallelism, single_submit=aio_cfg.single_submit,
                   overlap_events=aio_cfg.overlap_events)

    def pwrite(self, fd: int, tensor: torch.Tensor, offset: int, *, direct_fd: int | None = None,
               path: str | None = None) -> IORequest:
        """Start writing the tensor's bytes at byte `offset` of `fd`; see the module docstring for `direct_fd`."""
        return self._submit(True, fd, tensor, offset, direct_fd, path)

    def pread(self, fd: int, tensor: torch.Tensor, offset: int, *, direct_fd: int | None = None,
              path: str | None = None) -> IORequest:
        """Start filling the tensor's bytes from byte `offset` of `fd`."""
        return self._submit(False, fd, tensor, offset, direct_fd, path)

    def close(self) -> None:
        """Wait for all queued work, then stop the threads. Idempotent."""
        self._finalizer()

    def _submit(self, write: bool, fd: int, tensor: torch.Tensor, offset: int, direct_fd: int | None,
                path: str | None) -> IORequest:
        if self._pool.closed:
            raise RuntimeError("AsyncIO is closed")
        if offset < 0:
            raise ValueError(f"file offset must be >= 0, got {offset}")
        buf = tensor_buffer(tensor)
        n = len(buf)
        aligned_end = 0  # bytes [0, aligned_end) go through direct_fd
        if (direct_fd is not None and tensor.data_ptr() % DIRECT_ALIGNMENT == 0 and offset % DIRECT_ALIGNMENT == 0
                and self.block_size % DIRECT_ALIGNMENT == 0):
            aligned_end = n - n % DIRECT_ALIGNMENT
        bounds = [(s, min(s + self.block_size, aligned_end)) for s in range(0, aligned_end, self.block_size)]
        bounds += [(s, min(s + self.block_size, n)) for s in range(aligned_end, n, self.block_size)]
        req = IORequest("write" if write else "read", path or _fd_path(fd), offset, n, len(bounds), (tensor, buf))
        chunks = [_Chunk(req, direct_fd if e <= aligned_end and direct_fd is not None else fd, fd, write, buf[s:e],
                         offset + s) for s, e in bounds]
        if chunks:
            tasks = [chunks] if self.single_submit else [[c] for c in chunks]
            if self._pool.requests is not None:
                self._pool.requests.put(tasks)
            else:
                for task in tasks:
                    self._pool.tasks.put(task)
        return req
