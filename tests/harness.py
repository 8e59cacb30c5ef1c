"""Run a function on N real processes over gloo, with a deadline, and collect what each returns.

One spawned process per rank (spawn, not fork), rendezvous through a file store in the test's
temp dir (no port races), one thread per process, gloo with a short timeout. A rank that raises
fails the test with its rank and traceback; the others are terminated. A hang fails at the deadline.
"""
from __future__ import annotations

import os
import pickle
import sys
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
        # Skip the interpreter's teardown: under torch 2.13 gloo's destructors there sometimes abort a process
        # that has finished (pytorch/pytorch#190489), which would fail a test whose result is already in.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
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
        return f"rank {rank} returned its result but exited with code {code} (an abort while shutting down)"
    return f"rank {rank} exited with code {code} and no traceback (killed?)"


# ---- many scenarios in one spawned job ------------------------------------------------------------
# Spawning processes dominates the cost of a small distributed test on this machine, so tests of one
# feature run all their scenarios of a world size in one job, each caught separately so one failure
# does not hide the others; the tests only read that job's results (cached per world size).

def run_named(scenarios: dict[str, Callable[[], Any]], names: list[str]) -> dict[str, tuple[str, Any]]:
    """On every rank: each named scenario's ("ok", result) or ("error", traceback).

    A scenario that fails on some ranks only stops the later ones (the ranks may be out of step).
    """
    import torch
    import torch.distributed as dist

    out: dict[str, tuple[str, Any]] = {}
    for name in names:
        try:
            out[name] = ("ok", scenarios[name]())
        except Exception:  # noqa: BLE001 - reported to the test that reads this scenario
            out[name] = ("error", traceback.format_exc())
        failed = torch.tensor([int(out[name][0] == "error")])
        dist.all_reduce(failed)
        if 0 < failed.item() < dist.get_world_size():
            for later in names[names.index(name) + 1:]:
                out[later] = ("error", f"not run: scenario {name!r} failed on {failed.item()} of {dist.get_world_size()} ranks")
            break
    return out


class ScenarioRuns:
    """One spawned job per world size: `job(*args(world, tmp))` on every rank returns `run_named`'s dict."""

    def __init__(self, factory: Any, label: str, job: Callable[..., dict], args: Callable[[int, Path], tuple],
                 deadline: float) -> None:
        self.factory, self.label, self.job, self.args, self.deadline = factory, label, job, args, deadline
        self.done: dict[int, Any] = {}

    def __call__(self, world: int, name: str) -> list[Any]:
        import pytest

        if world not in self.done:
            tmp = self.factory.mktemp(f"{self.label}_world{world}")
            try:
                self.done[world] = run_distributed(self.job, world, tmp, *self.args(world, tmp), deadline=self.deadline)
            except RankFailed as e:
                self.done[world] = e
        if isinstance(self.done[world], RankFailed):
            raise self.done[world]
        per_rank = [r[name] for r in self.done[world]]
        for rank, (status, payload) in enumerate(per_rank):
            if status != "ok":
                pytest.fail(f"scenario {name!r} failed on rank {rank} (world {world}):\n{payload}", pytrace=False)
        return [payload for _, payload in per_rank]
