"""Run a function on N real processes over gloo, with a deadline, and collect what each returns.

One spawned process per rank (spawn, not fork), rendezvous through a file store in the test's
temp dir (no port races), one thread per process, gloo with a short timeout. A rank that raises
fails the test with its rank and traceback; the others are terminated. A hang fails at the deadline.
"""
from __future__ import annotations

import os
import pickle
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

GLOO_TIMEOUT = timedelta(seconds=60)


class RankFailed(AssertionError):
    pass


def _entry(fn: Callable[..., Any], rank: int, world_size: int, workdir: str, args: tuple, kwargs: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1"})
    out = Path(workdir) / f"rank{rank}.pkl"
    try:
        store = dist.FileStore(str(Path(workdir) / "store"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=GLOO_TIMEOUT)
        result = fn(*args, **kwargs)
        out.write_bytes(pickle.dumps(("ok", result)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report every failure, including SystemExit from user code
        out.write_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise


def run_distributed(fn: Callable[..., Any], world_size: int, workdir: Path, *args: Any,
                    deadline: float = 120.0, **kwargs: Any) -> list[Any]:
    """`fn(*args, **kwargs)` on ranks 0..world_size-1; returns each rank's result, in rank order."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, str(workdir), args, kwargs), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline
    try:
        while any(p.is_alive() for p in procs):
            for rank, p in enumerate(procs):
                if not p.is_alive() and p.exitcode != 0:
                    raise RankFailed(_failure(workdir, rank, p.exitcode))
            if time.monotonic() > end:
                alive = [r for r, p in enumerate(procs) if p.is_alive()]
                raise RankFailed(f"deadline of {deadline:.0f}s passed; ranks {alive} still running (hang?)")
            time.sleep(0.05)
        for rank, p in enumerate(procs):
            if p.exitcode != 0:
                raise RankFailed(_failure(workdir, rank, p.exitcode))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
    return [pickle.loads((workdir / f"rank{r}.pkl").read_bytes())[1] for r in range(world_size)]


def _failure(workdir: Path, rank: int, code: int | None) -> str:
    path = workdir / f"rank{rank}.pkl"
    if path.exists():
        status, payload = pickle.loads(path.read_bytes())
        if status == "error":
            return f"rank {rank} failed (exit {code}):\n{payload}"
    return f"rank {rank} exited with code {code} and no traceback (killed?)"
