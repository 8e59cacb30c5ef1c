"""Per-rank entry point: torchrun starts one of these per rank, and it runs the user's target.

    python -m shardspeed.launcher.rank_entry [--module | --no_python] [--no_local_rank]
        [--bind_cores] [--core_list=0-3,8] -- TARGET [ARGS...]

Like DeepSpeed's launcher, the target sees `--local_rank=<LOCAL_RANK>` right after its name and
before its own arguments (unless `--no_local_rank`). A script runs as `python script.py` would:
`__name__ == "__main__"`, `sys.argv[0]` the script path as given, the script's folder first on
`sys.path`. `--module` runs it like `python -m`; `--no_python` replaces this process with the
program. The environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) is
torchrun's, untouched. This module itself needs only the standard library.

torchrun's own argument parser drops the first `--` after the entry module, so the entry's flags
end at `--` when it is there, else at the first word that is not one of them.
"""
from __future__ import annotations

import os
import runpy
import sys
from dataclasses import dataclass
from typing import Literal

Mode = Literal["script", "module", "program"]
USAGE = ("usage: python -m shardspeed.launcher.rank_entry [--module | --no_python] [--no_local_rank] "
         "[--bind_cores] [--core_list=LIST] -- TARGET [ARGS...]")


class EntryError(ValueError):
    """The entry was started with bad flags or environment (a launcher bug or a hand-made call)."""


@dataclass(frozen=True)
class EntryOptions:
    target: str
    args: tuple[str, ...] = ()
    mode: Mode = "script"
    local_rank_flag: bool = True
    bind_cores: bool = False
    core_list: str | None = None


def parse_entry_args(argv: list[str]) -> EntryOptions:
    """Read the entry's own flags up to `--` (or the first non-flag), then the target and its args."""
    flags: dict[str, object] = {"mode": "script"}
    index = 0
    while index < len(argv) and argv[index].startswith("--"):
        flag = argv[index]
        index += 1
        if flag == "--":
            break
        _apply_flag(flag, flags)
    if index >= len(argv):
        raise EntryError(f"no target to run; {USAGE}")
    return EntryOptions(target=argv[index], args=tuple(argv[index + 1:]), **flags)  # type: ignore[arg-type]


def _apply_flag(flag: str, flags: dict[str, object]) -> None:
    name, _, value = flag.partition("=")
    if name in ("--module", "--no_python"):
        mode = "module" if name == "--module" else "program"
        if flags["mode"] != "script":
            raise EntryError("--module and --no_python cannot be used together")
        flags["mode"] = mode
    elif name == "--no_local_rank":
        flags["local_rank_flag"] = False
    elif name == "--bind_cores":
        flags["bind_cores"] = True
    elif name == "--core_list" and value:
        flags["core_list"] = value
    else:
        raise EntryError(f"unknown entry flag {flag!r}; {USAGE}")


def env_int(name: str) -> int:
    """An integer torchrun sets for every rank; raise if it is missing (not started by torchrun)."""
    value = os.environ.get(name)
    if value is None or not value.lstrip("-").isdigit():
        raise EntryError(f"${name} is {value!r}; rank_entry must be started by torch.distributed.run")
    return int(value)


def target_argv(options: EntryOptions, local_rank: int) -> list[str]:
    """`[target, --local_rank=N, *args]`: DeepSpeed's placement of the flag (before the user args)."""
    flag = [f"--local_rank={local_rank}"] if options.local_rank_flag else []
    return [options.target, *flag, *options.args]


def parse_core_list(text: str) -> list[int]:
    """`0-3,8,10-11` -> [0, 1, 2, 3, 8, 10, 11]; raise naming --bind_core_list on a bad item."""
    cores: list[int] = []
    for item in text.split(","):
        low, sep, high = item.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise EntryError(f"--bind_core_list {text!r}: bad item {item!r}; expected e.g. `0-3,8`")
        cores.extend(range(int(low), int(high) + 1) if sep else [int(low)])
    return sorted(set(cores))


def cores_for_rank(cores: list[int], local_rank: int, local_world_size: int) -> list[int]:
    """An equal, contiguous share of `cores` for one local rank (leftover cores stay unused)."""
    share = len(cores) // local_world_size
    if share == 0:
        raise EntryError(f"--bind_cores_to_rank: {len(cores)} core(s) for {local_world_size} ranks "
                         f"on this node; use fewer ranks or a longer --bind_core_list")
    return cores[local_rank * share:(local_rank + 1) * share]


def bind_cores(options: EntryOptions, local_rank: int, local_world_size: int) -> None:
    """Pin this rank to its share of cores and size OpenMP to it (Linux only)."""
    if not hasattr(os, "sched_setaffinity"):
        raise EntryError("--bind_cores_to_rank needs os.sched_setaffinity (Linux)")
    available = parse_core_list(options.core_list) if options.core_list else sorted(os.sched_getaffinity(0))
    mine = cores_for_rank(available, local_rank, local_world_size)
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))


def run_target(options: EntryOptions, argv: list[str]) -> None:
    """Run the target in this process (script, module) or replace this process with it (program)."""
    if options.mode == "program":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(argv[0], argv)
    sys.argv = list(argv)
    if options.mode == "module":
        runpy.run_module(options.target, run_name="__main__", alter_sys=True)
        return
    # `python script.py` puts the script's folder, not the working directory, first on sys.path.
    sys.path[0] = os.path.dirname(os.path.abspath(options.target))
    runpy.run_path(options.target, run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    options = parse_entry_args(sys.argv[1:] if argv is None else argv)
    local_rank = env_int("LOCAL_RANK")
    if options.bind_cores:
        bind_cores(options, local_rank, env_int("LOCAL_WORLD_SIZE"))
    try:
        run_target(options, target_argv(options, local_rank))
    except SystemExit as exc:
        if exc.code not in (None, 0):
            _note_failure(f"exit status {exc.code}")
        raise
    except BaseException as exc:
        _note_failure(f"{type(exc).__name__}: {exc}")
        raise
    return 0


def _note_failure(what: str) -> None:
    """One line naming this rank, so a failure is easy to find among N ranks' output."""
    rank, local = os.environ.get("RANK", "?"), os.environ.get("LOCAL_RANK", "?")
    print(f"[shardspeed] rank {rank} (local_rank {local}) failed: {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
