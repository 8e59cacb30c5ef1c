"""The NVMe offload I/O layer: AsyncIO thread pool and SwapSpace files (no processes but one)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from shardspeed.offload import aio as aio_mod
from shardspeed.offload import swap_space as swap_mod
from shardspeed.offload.aio import AsyncIO, SwapIOError
from shardspeed.offload.swap_space import SWAP_FOLDER, NvmeSwapError, SwapSpace, aligned_empty

ODD_BYTES = [1, 4095, 4096, 4097, 3 * 2**20 + 5]
KEY = "zero_optimization.offload_optimizer.nvme_path"


def _random(nbytes: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A tensor of `dtype` spanning exactly `nbytes` (bytes not divisible by the dtype use uint8)."""
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    size = torch.tensor([], dtype=dtype).element_size()
    return data.view(dtype) if nbytes % size == 0 else data


@pytest.fixture
def pool():
    pools: list[AsyncIO] = []

    def make(**kw) -> AsyncIO:
        pools.append(AsyncIO(**kw))
        return pools[-1]
    yield make
    for p in pools:
        p.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("block", [4096, 1 << 20])
@pytest.mark.parametrize("o_direct", [True, False])
def test_round_trip_odd_sizes(tmp_path, pool, threads, block, o_direct):
    """Catches lost/duplicated chunks, a wrong tail block and direct/buffered mix-ups, for every dtype."""
    gen = torch.Generator().manual_seed(threads * block)
    cases = [(n, dt) for n in ODD_BYTES for dt in (torch.float32, torch.bfloat16, torch.uint8)]
    space = SwapSpace(str(tmp_path), "optimizer", 0, {i: n for i, (n, _) in enumerate(cases)},
                      pool(block_size=block, thread_count=threads), o_direct=o_direct)
    assert (space._state.direct_fd is not None) == o_direct  # ext4/xfs accept O_DIRECT; tmpfs would not
    src = [_random(n, dt, gen) for n, dt in cases]
    reqs = [space.write(i, t) for i, t in enumerate(src)]
    for r in reqs:
        r.wait()
    out = [torch.empty_like(t) for t in src]
    for r in [space.read(i, t) for i, t in enumerate(out)]:
        r.wait()
    for a, b in zip(src, out):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    space.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("single_submit", [False, True])
@pytest.mark.parametrize("overlap_events", [True, False])
def test_unaligned_tensors_and_mixed_paths(tmp_path, pool, single_submit, overlap_events):
    """A slice at byte 1 cannot use O_DIRECT: it must still round-trip, also read back via the direct path."""
    space = SwapSpace(str(tmp_path), "param", 1, {"a": 3 * 2**20 + 7, "b": 9000},
                      pool(block_size=4096, thread_count=2, single_submit=single_submit, overlap_events=overlap_events))
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 256, (3 * 2**20 + 8,), dtype=torch.uint8, generator=gen)
    src = base[1:]
    assert src.data_ptr() % 2 == 1  # torch allocations are at least 64-byte aligned
    space.write("a", src).wait()
    aligned = aligned_empty(src.numel())  # aligned: whole blocks come back through O_DIRECT
    space.read("a", aligned).wait()
    assert torch.equal(aligned, src)
    unaligned = torch.empty(src.numel() + 1, dtype=torch.uint8)[1:]
    space.read("a", unaligned).wait()
    assert torch.equal(unaligned, src)
    # and the other way round: written direct, read buffered
    small = torch.randint(0, 256, (9000,), dtype=torch.uint8, generator=gen)
    space.write("b", aligned_empty(9000).copy_(small)).wait()
    back = torch.empty(9001, dtype=torch.uint8)[1:]
    space.read("b", back).wait()
    assert torch.equal(back, small)
    space.close()


@pytest.mark.timeout(60)
def test_many_requests_waited_out_of_order(tmp_path, pool):
    """Catches requests completing each other's events or a deadlock when far more than queue_depth are in flight."""
    n = 48
    space = SwapSpace(str(tmp_path), "optimizer", 0, {i: 20_000 + i for i in range(n)},
                      pool(block_size=4096, queue_depth=2, thread_count=3))
    gen = torch.Generator().manual_seed(2)
    src = [torch.randint(0, 256, (20_000 + i,), dtype=torch.uint8, generator=gen) for i in range(n)]
    reqs = [space.write(i, t) for i, t in enumerate(src)]
    for r in reversed(reqs):
        r.wait()
    assert all(r.done() for r in reqs)
    out = [torch.empty_like(t) for t in src]
    reads = [space.read(i, t) for i, t in enumerate(out)]
    for i in list(range(1, n, 2)) + list(range(0, n, 2)):
        reads[i].wait()
    assert all(torch.equal(a, b) for a, b in zip(src, out))
    space.close()


@pytest.mark.timeout(60)
def test_same_region_requests_are_ordered(tmp_path, pool):
    """A read issued right after a write to the same region must see the write (SwapSpace orders them)."""
    space = SwapSpace(str(tmp_path), "optimizer", 0, {0: 1 << 22}, pool(block_size=4096, thread_count=3))
    first, second = torch.ones(1 << 20), torch.full((1 << 20,), 2.0)
    space.write(0, first)
    space.write(0, second)
    out = torch.empty(1 << 20)
    space.read(0, out).wait()
    assert torch.equal(out, second)
    space.close()


@pytest.mark.timeout(60)
def test_aligned_empty():
    for n in (0, 1, 4095, 4097, 1 << 20):
        for align in (64, 4096, 1 << 16):
            t = aligned_empty(n, align)
            assert t.dtype == torch.uint8 and t.numel() == n and t.data_ptr() % align == 0
    assert aligned_empty(10, pin=True).numel() == 10  # no CUDA here: ordinary memory, no error
    with pytest.raises(ValueError):
        aligned_empty(10, 3000)


@pytest.mark.timeout(60)
def test_file_is_unlinked_while_open_and_close_is_idempotent(tmp_path, pool):
    """Catches a swap file whose name outlives its process: it is unlinked as soon as it is open."""
    aio = pool()
    space = SwapSpace(str(tmp_path), "optimizer", 3, {"x": 100}, aio, fast_init=True)
    assert space.path.parent == tmp_path / SWAP_FOLDER
    assert space.path.name.startswith(f"optimizer_rank3_pid{os.getpid()}_") and space.path.suffix == ".swp"
    assert not space.path.exists()  # no name while open ...
    assert os.fstat(space._state.fd).st_size == space.nbytes == 4096 == space.region_bytes("x")  # ... yet reserved
    other = SwapSpace(str(tmp_path), "param", 3, {"x": 100}, aio)
    space.write("x", torch.ones(25)).wait()
    back = torch.zeros(25)
    space.read("x", back).wait()
    assert torch.equal(back, torch.ones(25))
    space.close()
    space.close()
    with pytest.raises(RuntimeError):
        space.write("x", torch.ones(1))
    other.close()
    assert not (tmp_path / SWAP_FOLDER).exists() or not list((tmp_path / SWAP_FOLDER).iterdir())
    aio.close()
    aio.close()


@pytest.mark.timeout(60)
def test_stale_files_of_dead_processes_are_removed_at_start(tmp_path, pool):
    """Catches gigabytes left on the drive by a run killed before it could unlink its file."""
    folder = tmp_path / SWAP_FOLDER
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f"optimizer_rank0_pid{int(dead.stdout)}_0123abcd.swp"
    live = folder / f"param_rank1_pid{os.getpid()}_89abcdef.swp"
    other = folder / "notes.txt"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    space = SwapSpace(str(tmp_path), "optimizer", 0, {0: 4096}, pool())
    assert not stale.exists() and live.exists() and other.exists()
    space.close()


@pytest.mark.timeout(60)
def test_unclosed_space_removed_at_exit(tmp_path):
    """Catches a leaked swap file (gigabytes on a user's NVMe) when the program never calls close()."""
    code = textwrap.dedent(f"""
        import torch
        from shardspeed.offload.aio import AsyncIO
        from shardspeed.offload.swap_space import SwapSpace
        space = SwapSpace({str(tmp_path)!r}, "optimizer", 0, {{0: 1 << 20}}, AsyncIO(thread_count=2))
        space.write(0, torch.ones(1 << 18))  # still in flight, perhaps, at exit
        print(space.path.exists())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    assert not (tmp_path / SWAP_FOLDER).exists() or not list((tmp_path / SWAP_FOLDER).iterdir())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["os._exit", "SIGKILL"])
def test_no_file_left_when_the_process_ends_without_cleanup(tmp_path, how):
    """Catches swap files left by launchers, test harnesses and forked workers, which end with
    os._exit (no interpreter shutdown, no finalizers), or by a killed run."""
    code = textwrap.dedent(f"""
        import os, signal, torch
        from shardspeed.offload.aio import AsyncIO
        from shardspeed.offload.swap_space import SwapSpace
        space = SwapSpace({str(tmp_path)!r}, "optimizer", 0, {{0: 1 << 20}}, AsyncIO(thread_count=2))
        space.write(0, torch.ones(1 << 18)).wait()
        if {how!r} == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert not (tmp_path / SWAP_FOLDER).exists() or not list((tmp_path / SWAP_FOLDER).iterdir())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["none", "empty", "file"])
def test_bad_path_names_key_and_path(tmp_path, pool, bad):
    path = {"none": None, "empty": "", "file": str(tmp_path / "a_file")}[bad]
    if bad == "file":
        (tmp_path / "a_file").write_text("x")
    with pytest.raises(NvmeSwapError) as info:
        SwapSpace(path, "param", 0, {0: 10}, pool(), config_key="zero_optimization.offload_param.nvme_path")
    assert "zero_optimization.offload_param.nvme_path" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_folder(tmp_path, pool):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(NvmeSwapError) as info:
            SwapSpace(str(ro), "optimizer", 0, {0: 10}, pool())
        assert KEY in str(info.value) and str(ro) in str(info.value)
    finally:
        ro.chmod(0o700)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["access", "create"])
def test_unwritable_folder_even_as_root(tmp_path, pool, monkeypatch, how):
    """The permission checks, simulated so they also run as root (which ignores permission bits)."""
    if how == "access":
        monkeypatch.setattr(swap_mod.os, "access", lambda p, m: False)
    else:
        real_open = os.open

        def deny(path, flags, *a):
            if flags & os.O_EXCL:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real_open(path, flags, *a)
        monkeypatch.setattr(swap_mod.os, "open", deny)
    with pytest.raises(NvmeSwapError) as info:
        SwapSpace(str(tmp_path), "optimizer", 0, {0: 10}, pool())
    assert KEY in str(info.value) and str(tmp_path) in str(info.value) and "writable" in str(info.value)


@pytest.mark.timeout(60)
def test_not_enough_free_space(tmp_path, pool, monkeypatch):
    """Fails before writing anything, with needed vs free in GiB, and leaves no file behind."""
    monkeypatch.setattr(swap_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    with pytest.raises(NvmeSwapError) as info:
        SwapSpace(str(tmp_path), "optimizer", 0, {0: 1 << 30, 1: 1 << 29}, pool())
    msg = str(info.value)
    assert KEY in msg and str(tmp_path) in msg and "1.50 GiB" in msg and "0.00 GiB" in msg
    assert not list((tmp_path / SWAP_FOLDER).iterdir())


@pytest.mark.timeout(60)
def test_fallocate_enospc_removes_partial_file(tmp_path, pool, monkeypatch):
    def full(fd, off, n):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(swap_mod.os, "posix_fallocate", full)
    with pytest.raises(NvmeSwapError) as info:
        SwapSpace(str(tmp_path), "optimizer", 0, {0: 1 << 20}, pool())
    assert KEY in str(info.value) and str(tmp_path) in str(info.value)
    assert not (tmp_path / SWAP_FOLDER).exists()


@pytest.mark.timeout(60)
def test_region_too_small_and_unknown_key(tmp_path, pool):
    space = SwapSpace(str(tmp_path), "optimizer", 0, {"exp_avg": 4096}, pool())
    with pytest.raises(ValueError, match="exp_avg"):
        space.write("exp_avg", torch.zeros(1025))
    with pytest.raises(KeyError, match="nope"):
        space.read("nope", torch.zeros(1))
    space.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threads", [1, 3])
def test_write_error_surfaces_on_wait(tmp_path, pool, monkeypatch, threads):
    """Catches a worker error that is swallowed or that leaves wait() blocked forever."""
    space = SwapSpace(str(tmp_path), "optimizer", 0, {0: 1 << 20}, pool(block_size=4096, thread_count=threads))
    real = os.pwrite
    calls = []

    def flaky(fd, buf, off):
        calls.append(off)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buf, off)
    monkeypatch.setattr(aio_mod.os, "pwrite", flaky)
    req = space.write(0, torch.ones(1 << 18))
    with pytest.raises(SwapIOError) as info:
        req.wait()
    assert req.done() and info.value.errno == errno.ENOSPC
    msg = str(info.value)
    assert str(space.path) in msg and "offset 0" in msg and str(1 << 20) in msg
    monkeypatch.setattr(aio_mod.os, "pwrite", real)
    space.write(0, torch.ones(10)).wait()  # the pool survives a failed request
    space.close()


@pytest.mark.timeout(60)
def test_closed_fd_and_short_transfers(tmp_path, pool, monkeypatch):
    """A bad fd fails the request (EBADF) instead of hanging; short writes/reads are completed by looping."""
    aio = pool(block_size=1 << 16)
    with pytest.raises(SwapIOError) as info:
        aio.pwrite(987654, torch.ones(100), 0).wait()
    assert info.value.errno == errno.EBADF
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    real_w, real_r = os.pwrite, os.preadv
    monkeypatch.setattr(aio_mod.os, "pwrite", lambda f, b, o: real_w(f, b[:1000], o))
    monkeypatch.setattr(aio_mod.os, "preadv", lambda f, bs, o: real_r(f, [bs[0][:777]], o))
    src = torch.randint(0, 256, (200_001,), dtype=torch.uint8)
    aio.pwrite(fd, src, 5).wait()
    out = torch.empty_like(src)
    aio.pread(fd, out, 5).wait()
    assert torch.equal(out, src)
    with pytest.raises(SwapIOError, match="end of file"):
        aio.pread(fd, torch.empty(10, dtype=torch.uint8), 200_001).wait()
    os.close(fd)


@pytest.mark.timeout(60)
def test_from_config():
    from shardspeed.config.sections import AioConfig
    aio = AsyncIO.from_config(AioConfig(block_size=8192, queue_depth=4, thread_count=2, single_submit=True))
    assert (aio.block_size, aio.queue_depth, aio.thread_count, aio.single_submit) == (8192, 4, 2, True)
    aio.close()
    with pytest.raises(ValueError, match="use_gds"):
        AsyncIO.from_config(AioConfig(use_gds=True))
    with pytest.raises(ValueError, match="queue_depth"):
        AsyncIO(queue_depth=0)


@pytest.mark.timeout(60)
def test_forked_child_keeps_parent_file(tmp_path, pool):
    """Catches a fork (e.g. a DataLoader worker) whose exit deletes the parent's live swap file."""
    space = SwapSpace(str(tmp_path), "optimizer", 0, {0: 4096}, pool())
    pid = os.fork()
    if pid == 0:  # child: close and leave without running the parent's test machinery
        try:
            space.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    space.write(0, torch.ones(8)).wait()  # the child closed its copies of the descriptors only
    back = torch.zeros(8)
    space.read(0, back).wait()
    assert torch.equal(back, torch.ones(8))
    space.close()


@pytest.mark.timeout(60)
def test_cleanup_on_io_thread_is_deferred(tmp_path, pool):
    """A finalizer run by the GC on a worker thread must not wait for that worker (deadlock)."""
    import threading
    space = SwapSpace(str(tmp_path), "optimizer", 0, {0: 1 << 20}, pool(thread_count=1))
    space.write(0, torch.ones(1 << 18))

    def as_worker() -> None:
        aio_mod._THREAD.aio = True
        space.close()
    t = threading.Thread(target=as_worker)
    t.start()
    t.join(10)
    assert not t.is_alive()
    for _ in range(500):
        if space._state.closed:
            break
        threading.Event().wait(0.01)
    assert space._state.closed
