"""Reading the launcher's environment (torchrun, SLURM, Open MPI, none) and initialising a world of one.

The `detect_launch_env` tests pass an explicit mapping and start nothing. The last two tests each run
`shardspeed.init_distributed()` in a fresh interpreter (a process group cannot be torn down and re-made
reliably inside the test process) with every launcher variable removed from its environment.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from shardspeed.comm.init import LaunchEnv, detect_launch_env, first_slurm_host

SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "gpu[003-005,009],cpu01"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "1234"}
OMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}


def test_empty_environment_is_a_world_of_one() -> None:
    assert detect_launch_env({}) == LaunchEnv("none", 0, 1, 0, "127.0.0.1", 29500)
    assert detect_launch_env({}, default_port=4321).master_port == 4321


def test_torchrun() -> None:
    assert detect_launch_env(TORCHRUN) == LaunchEnv("torchrun", 3, 4, 1, "10.0.0.7", 1234)


def test_torchrun_defaults_for_optional_variables() -> None:
    env = detect_launch_env({"RANK": "0", "WORLD_SIZE": "2"}, default_port=29600)
    assert env == LaunchEnv("torchrun", 0, 2, 0, "127.0.0.1", 29600)


def test_rank_without_world_size_is_not_torchrun() -> None:
    """torchrun always sets both; a stray RANK alone must not make a job of unknown size."""
    assert detect_launch_env({"RANK": "1"}).launcher == "none"


def test_slurm_takes_rank_size_and_first_host() -> None:
    assert detect_launch_env(SLURM) == LaunchEnv("slurm", 5, 8, 1, "gpu003", 29500)


def test_slurm_master_addr_and_port_override() -> None:
    env = detect_launch_env({**SLURM, "MASTER_ADDR": "login2", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("login2", 4000)


def test_slurm_nodelist_fallbacks() -> None:
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert detect_launch_env({**base, "SLURM_NODELIST": "a[1-2]"}).master_addr == "a1"
    assert detect_launch_env(base).master_addr == "127.0.0.1"
    assert detect_launch_env({**base, "SLURM_JOB_NODELIST": "", "SLURM_NODELIST": "node1"}).master_addr == "node1"


def test_torchrun_wins_over_slurm() -> None:
    """torchrun started inside a SLURM allocation: its per-process RANK, not the SLURM task id, counts."""
    env = detect_launch_env({**SLURM, **TORCHRUN})
    assert env == LaunchEnv("torchrun", 3, 4, 1, "10.0.0.7", 1234)


def test_open_mpi() -> None:
    assert detect_launch_env(OMPI) == LaunchEnv("openmpi", 2, 6, 0, "127.0.0.1", 29500)
    env = detect_launch_env({**OMPI, "MASTER_ADDR": "head", "MASTER_PORT": "2222"})
    assert (env.master_addr, env.master_port) == ("head", 2222)


def test_open_mpi_inside_slurm_is_open_mpi() -> None:
    """mpirun inside a SLURM allocation: OMPI_COMM_WORLD_* describe the processes mpirun started."""
    assert detect_launch_env({**SLURM, **OMPI}).launcher == "openmpi"


@pytest.mark.parametrize(
    "env,key",
    [
        ({**TORCHRUN, "RANK": "zero"}, "RANK"),
        ({**TORCHRUN, "WORLD_SIZE": "4.0"}, "WORLD_SIZE"),
        ({**SLURM, "SLURM_PROCID": "x"}, "SLURM_PROCID"),
        ({**SLURM, "SLURM_NTASKS": ""}, "SLURM_NTASKS"),
        ({**OMPI, "OMPI_COMM_WORLD_RANK": "r2"}, "OMPI_COMM_WORLD_RANK"),
        ({**OMPI, "OMPI_COMM_WORLD_SIZE": "six"}, "OMPI_COMM_WORLD_SIZE"),
    ],
)
def test_non_integer_rank_variables_name_the_variable(env: dict[str, str], key: str) -> None:
    with pytest.raises(ValueError, match=key) as err:
        detect_launch_env(env)
    assert repr(env[key]) in str(err.value)


@pytest.mark.parametrize(
    "env,key",
    [
        ({**TORCHRUN, "LOCAL_RANK": "x"}, "LOCAL_RANK"),
        ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT"),
        ({**SLURM, "SLURM_LOCALID": "x"}, "SLURM_LOCALID"),
    ],
)
def test_other_non_integer_variables_name_the_variable(env: dict[str, str], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        detect_launch_env(env)


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("gpu[003-005,009],cpu01", "gpu003"),
        ("gpu[009,003-005]", "gpu009"),  # SLURM's order, not sorted
        ("node1", "node1"),
        ("a[1-2]", "a1"),
        ("node1,node2", "node1"),
        ("cpu01,gpu[1-2]", "cpu01"),
        ("  n7 ", "n7"),
        ("dgx-a100-[07-08]", "dgx-a100-07"),
    ],
)
def test_first_slurm_host(nodelist: str, host: str) -> None:
    assert first_slurm_host(nodelist) == host


def test_first_slurm_host_rejects_an_empty_list() -> None:
    with pytest.raises(ValueError, match="node list"):
        first_slurm_host("")


# --- real processes --------------------------------------------------------------------------------

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")

_PROBE = """
import json, os
import torch, torch.distributed as dist
import shardspeed
torch.set_num_threads(1)
shardspeed.init_distributed()
t = torch.ones(1)
dist.all_reduce(t)
print(json.dumps({"backend": dist.get_backend(), "rank": dist.get_rank(), "world": dist.get_world_size(),
                  "sum": t.item(), "RANK": os.environ.get("RANK"), "WORLD_SIZE": os.environ.get("WORLD_SIZE")}))
dist.destroy_process_group()
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)  # CPU: gloo even on a GPU host
    return env


def _probe(env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_init_distributed_without_launcher_is_a_gloo_world_of_one() -> None:
    """Catches a plain script (no torchrun) failing for want of RANK/MASTER_ADDR, or waiting on a port."""
    out = _probe(_clean_env())
    assert out == {"backend": "gloo", "rank": 0, "world": 1, "sum": 1.0, "RANK": "0", "WORLD_SIZE": "1"}


@pytest.mark.timeout(120)
def test_init_distributed_under_open_mpi_world_of_one() -> None:
    """mpirun -np 1: rank and size from OMPI_COMM_WORLD_*, rendezvous over env:// at MASTER_PORT."""
    env = _clean_env(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="1", MASTER_PORT=str(_free_port()))
    out = _probe(env)
    assert out == {"backend": "gloo", "rank": 0, "world": 1, "sum": 1.0, "RANK": "0", "WORLD_SIZE": "1"}
