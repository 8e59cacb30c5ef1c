"""Process-group set-up from whatever launched us: torchrun, SLURM, Open MPI, or nothing at all."""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger("shardspeed")

DEFAULT_TIMEOUT = timedelta(minutes=30)

Launcher = Literal["torchrun", "slurm", "openmpi", "none"]


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as its launcher described it."""

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def detect_launch_env(env: Mapping[str, str] | None = None, default_port: int = 29500) -> LaunchEnv:
    """Read rank, world size and rendezvous address from torchrun, SLURM or Open MPI variables.

    torchrun's variables win when present (torchrun may itself run inside a SLURM allocation).
    With none set, this is a single process.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            "torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", "0"),
            env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", str(default_port)),
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv(
            "openmpi", _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", str(default_port)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return LaunchEnv(
            "slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", "0"),
            env.get("MASTER_ADDR") or first_slurm_host(nodelist), _int(env, "MASTER_PORT", str(default_port)),
        )
    return LaunchEnv("none", 0, 1, 0, "127.0.0.1", default_port)


def _int(env: Mapping[str, str], key: str, default: str | None = None) -> int:
    value = env.get(key, default)
    if value is not None:  # unset without a default is reported like a bad value
        try:
            return int(value)
        except ValueError:
            pass
    raise ValueError(f"environment variable {key}={value!r} is not an integer")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as `gpu[003-005,009],cpu01`."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _tell_accelerate_the_cpu_backend() -> None:
    """Let Hugging Face accelerate (1.x) count the processes of a DeepSpeed run on a CPU-only host.

    With DeepSpeed on (`ACCELERATE_USE_DEEPSPEED`), accelerate's PartialState asks the device for a
    backend, finds none on a CPU host (its CPU path, `use_cpu`, switches DeepSpeed off), calls this
    function with `dist_backend=None`, and afterwards, still seeing no backend, declares a world of
    one on every rank. Its state is one dict shared by every PartialState (`_shared_state`): naming
    gloo there, while it waits for this call, makes it read the world size from torch.distributed as
    it does on GPUs. Nothing changes outside that exact situation.
    """
    state_module = sys.modules.get("accelerate.state")
    if state_module is None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    shared = getattr(getattr(state_module, "PartialState", None), "_shared_state", None)
    if isinstance(shared, dict) and shared.get("backend") is None and "LOCAL_RANK" in os.environ:
        shared["backend"] = "gloo"


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    distributed_port: int = 29500,
    verbose: bool = True,
    timeout: timedelta = DEFAULT_TIMEOUT,
    init_method: str | None = None,
    dist_init_required: bool | None = None,
    config: object | None = None,
    rank: int = -1,
    world_size: int = -1,
) -> None:
    """Initialise torch.distributed once, from the launcher's environment (DeepSpeed's signature).

    A process with no launcher variables becomes a world of one, so single-process scripts work
    unchanged. The backend is nccl on CUDA and gloo on CPU unless `dist_backend` says otherwise.
    """
    if dist.is_initialized():
        return
    if dist_init_required is False:
        return
    if dist_backend is None and not torch.cuda.is_available():
        _tell_accelerate_the_cpu_backend()
    launch = detect_launch_env(default_port=distributed_port)
    if not auto_mpi_discovery and launch.launcher == "openmpi":
        launch = LaunchEnv("none", 0, 1, 0, "127.0.0.1", distributed_port)
    rank = launch.rank if rank < 0 else rank
    world_size = launch.world_size if world_size < 0 else world_size
    backend = dist_backend or default_backend()
    # Later code (and user code) reads these, as it would under torchrun.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    if verbose:
        logger.info("[rank %d] init_distributed: backend=%s world_size=%d launcher=%s", rank, backend, world_size, launch.launcher)
    if world_size == 1 and init_method is None and launch.launcher == "none":
        # A private in-memory store: no port to collide with other single-process jobs.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                                timeout=timeout)
    if backend == "gloo":
        atexit.register(release_gloo_at_clean_exit)


def release_gloo_at_clean_exit() -> None:
    """Destroy the gloo process group this module created, at exit, unless the script is failing.

    A gloo group still alive when the interpreter tears down aborts the process more often than not
    under torch 2.13 ("terminate called without an active exception", exit -6, after the script has
    finished: pytorch/pytorch#190489), and DeepSpeed-style scripts (the Hugging Face Trainer's among
    them) never call destroy_process_group. Destroying a gloo group is local to this process. After an
    uncaught exception (`sys.last_value` is set) it is skipped: a peer may still be inside a collective
    with us, and the failing exit code is what matters then.
    """
    if hasattr(sys, "last_value") or hasattr(sys, "last_exc"):
        return
    if dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()
