"""NVMe swap throughput: shardspeed's SwapSpace/AsyncIO against raw sequential file I/O.

    .venv/bin/python benchmarks/bench_nvme_swap.py [--path DIR] [--gib 1.0] [--rounds 3] [--regions 8]

Every system moves the same `--gib` bytes from/to one page-aligned buffer, to a fresh preallocated
file in a temporary folder under `--path` (so the disk you point at is the one measured):

- raw direct: one thread, 1 MiB `os.pwrite`/`os.preadv` with O_DIRECT. The yardstick.
- raw buffered: the same through the page cache.
- swap direct/buffered, 1 and 2 threads: `SwapSpace` with `--regions` equal regions (as the
  optimizer swapper lays out sub-groups), all region writes issued then waited, then all reads,
  through `AsyncIO` at the default config (block 1 MiB, queue depth 8) with `o_direct` on or off.

Writes are timed up to a completed `fsync`, so buffered writes cannot report RAM speed. Before the
reads each file's cached pages are dropped (`posix_fadvise(DONTNEED)` after the fsync; no root
needed), so buffered reads come from the disk too. GB/s = 1e9 bytes/s, median of `--rounds`;
systems are interleaved within each round. Target: swap direct at 1 thread >= 0.70x raw direct
for both write and read. Swap data is checked byte for byte in the first round (outside timing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from shardspeed.offload.aio import AsyncIO, tensor_buffer
from shardspeed.offload.swap_space import SwapSpace, aligned_empty

MIB = 1 << 20
TARGET = 0.70


def drop_cache(path: str) -> None:
    """Flush and evict the file's pages so the next read comes from the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw(folder: str, src: torch.Tensor, dst: torch.Tensor, direct: bool) -> tuple[float, float]:
    """One thread, 1 MiB sequential pwrite + fsync, then preadv: seconds for (write, read)."""
    path = os.path.join(folder, "raw.bin")
    flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o600)
    n = src.numel()
    os.posix_fallocate(fd, 0, n)  # like SwapSpace: both write into freshly reserved extents
    sbuf, dbuf = tensor_buffer(src), tensor_buffer(dst)
    try:
        t0 = time.perf_counter()
        for off in range(0, n, MIB):
            os.pwrite(fd, sbuf[off:off + MIB], off)  # full transfers on a local fs; not worth a loop here
        os.fsync(fd)
        t1 = time.perf_counter()
        drop_cache(path)
        t2 = time.perf_counter()
        for off in range(0, n, MIB):
            os.preadv(fd, [dbuf[off:off + MIB]], off)
        t3 = time.perf_counter()
    finally:
        os.close(fd)
        os.unlink(path)
    return t1 - t0, t3 - t2


def swap(folder: str, src: torch.Tensor, dst: torch.Tensor, direct: bool, threads: int, regions: int,
         check: bool) -> tuple[float, float]:
    """SwapSpace write of all regions (+ fsync), cache drop, read of all regions: seconds for (write, read)."""
    per = src.numel() // regions
    aio = AsyncIO(thread_count=threads)
    space = SwapSpace(folder, "bench", 0, {i: per for i in range(regions)}, aio, o_direct=direct)
    try:
        t0 = time.perf_counter()
        for req in [space.write(i, src[i * per:(i + 1) * per]) for i in range(regions)]:
            req.wait()
        fd = os.open(space.path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        t1 = time.perf_counter()
        drop_cache(str(space.path))
        t2 = time.perf_counter()
        for req in [space.read(i, dst[i * per:(i + 1) * per]) for i in range(regions)]:
            req.wait()
        t3 = time.perf_counter()
        if check and not torch.equal(src[:per * regions], dst[:per * regions]):
            raise RuntimeError(f"swap direct={direct} threads={threads}: data read back differs")
    finally:
        space.close()
        aio.close()
    return t1 - t0, t3 - t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=tempfile.gettempdir(), help="folder on the drive to measure")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--regions", type=int, default=8)
    args = ap.parse_args()
    nbytes = int(args.gib * (1 << 30)) // (args.regions * 4096) * (args.regions * 4096)
    src, dst = aligned_empty(nbytes), aligned_empty(nbytes)
    block = torch.randint(0, 256, (MIB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    full = nbytes // MIB * MIB  # a repeated random MiB: no disk here compresses or dedups it, and it is cheap
    src[:full].view(-1, MIB)[:] = block
    src[full:] = block[:nbytes - full]
    dst.fill_(1)  # fault the pages in now, or the first system's read pays for it
    folder = tempfile.mkdtemp(prefix="bench_nvme_swap_", dir=args.path)
    systems: dict[str, Callable[[bool], tuple[float, float]]] = {
        "raw direct": lambda c: raw(folder, src, dst, True),
        "raw buffered": lambda c: raw(folder, src, dst, False),
        "swap direct 1t": lambda c: swap(folder, src, dst, True, 1, args.regions, c),
        "swap direct 2t": lambda c: swap(folder, src, dst, True, 2, args.regions, c),
        "swap buffered 1t": lambda c: swap(folder, src, dst, False, 1, args.regions, c),
        "swap buffered 2t": lambda c: swap(folder, src, dst, False, 2, args.regions, c),
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in systems}
    try:
        for r in range(args.rounds):
            for name, fn in systems.items():
                w, rd = fn(r == 0)
                times[name].append((w, rd))
                print(f"  round {r + 1} {name:<17} write {nbytes / w / 1e9:6.2f} GB/s  read {nbytes / rd / 1e9:6.2f} GB/s",
                      flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report(times, nbytes, args)


def report(times: dict[str, list[tuple[float, float]]], nbytes: int, args: argparse.Namespace) -> None:
    gbs = {k: (nbytes / statistics.median(w for w, _ in v) / 1e9, nbytes / statistics.median(r for _, r in v) / 1e9)
           for k, v in times.items()}
    base_w, base_r = gbs["raw direct"]
    print(f"\n{nbytes / (1 << 30):.2f} GiB, {args.regions} regions, median of {args.rounds} rounds, under {args.path}")
    print(f"{'system':<18} {'write GB/s':>10} {'x raw':>6} {'read GB/s':>10} {'x raw':>6}")
    for k, (w, r) in gbs.items():
        print(f"{k:<18} {w:10.2f} {w / base_w:6.2f} {r:10.2f} {r / base_r:6.2f}")
    w1, r1 = gbs["swap direct 1t"]
    ok = w1 / base_w >= TARGET and r1 / base_r >= TARGET
    print(f"target swap direct 1t >= {TARGET:.2f}x raw direct: {'met' if ok else 'NOT met'}")
    print(json.dumps({"bench": "nvme_swap", "bytes": nbytes, "regions": args.regions, "rounds": args.rounds,
                      "path": args.path, "target_met": ok,
                      "gbs": {k: {"write": round(w, 3), "read": round(r, 3), "write_x_raw": round(w / base_w, 3),
                                  "read_x_raw": round(r / base_r, 3)} for k, (w, r) in gbs.items()}}))


if __name__ == "__main__":
    main()
