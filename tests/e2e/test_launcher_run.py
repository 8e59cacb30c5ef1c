"""Real launcher runs on this machine: 2 ranks over gloo through torchrun, a failing rank, a
localhost hostfile, two "nodes" that are both this machine (the multi-node path without ssh), the
node watcher, and `shardspeed report`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardspeed.launcher import multinode as mn

SCRIPTS = Path(__file__).parent / "scripts"
ALLREDUCE = str(SCRIPTS / "allreduce.py")
CLI = [sys.executable, "-m", "shardspeed.launcher.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shardspeed(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 90) -> subprocess.CompletedProcess:
    """Run the CLI with HOME=cwd (so no real ~/.deepspeed_env leaks in) and no /job/hostfile effect."""
    base = {key: value for key, value in os.environ.items() if key not in mn.ENV_FILE_OVERRIDES}
    base.update(HOME=str(cwd), **(env or {}))
    return subprocess.run([*CLI, *argv], cwd=cwd, env=base, capture_output=True, text=True, timeout=timeout)


def results(out: Path, world_size: int) -> list[dict]:
    records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world_size"] == world_size
        assert record["sum"] == sum(range(world_size)), "all-reduce of the rank ids"
        assert record["name"] == "__main__"
        assert record["env"]["MASTER_ADDR"] == "127.0.0.1"
    return records


@pytest.mark.timeout(120)
def test_two_ranks_get_torchrun_env_and_local_rank(tmp_path: Path) -> None:
    """Catches a launcher that loses the script's args, the --local_rank flag or torchrun's env."""
    port = free_port()
    proc = shardspeed(["--num_gpus", "2", "--master_port", str(port), ALLREDUCE,
                       "--some_arg", "x", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for rank, record in enumerate(results(tmp_path, 2)):
        assert record["env"]["LOCAL_RANK"] == str(rank) and record["env"]["WORLD_SIZE"] == "2"
        assert record["env"]["MASTER_PORT"] == str(port)
        assert record["local_rank_arg"] == rank and record["some_arg"] == "x"
        assert record["argv"] == [ALLREDUCE, f"--local_rank={rank}", "--some_arg", "x", "--out", str(tmp_path)]
        assert record["path0"] == str(SCRIPTS)


@pytest.mark.timeout(120)
def test_failing_rank_fails_the_run_and_is_named(tmp_path: Path) -> None:
    proc = shardspeed(["--num_gpus", "2", "--master_port", str(free_port()),
                       str(SCRIPTS / "fail_rank.py")], tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "rank 1 (local_rank 1, pid" in proc.stderr and "failed: exit code 3" in proc.stderr


@pytest.mark.timeout(120)
def test_localhost_hostfile_no_local_rank_and_env_file(tmp_path: Path) -> None:
    """A hostfile naming only localhost runs here without ssh; .shardspeed_env reaches the ranks."""
    (tmp_path / "hostfile").write_text("# one node\nlocalhost slots=2\n")
    (tmp_path / ".shardspeed_env").write_text("SHARDSPEED_TEST_VAR='from env file'\n")
    proc = shardspeed(["-H", "hostfile", "--no_local_rank", "--master_port", str(free_port()),
                       ALLREDUCE, "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for record in results(tmp_path, 2):
        assert record["local_rank_arg"] is None and "--local_rank" not in " ".join(record["argv"])
        assert record["env"]["SHARDSPEED_TEST_VAR"] == "from env file"


@pytest.mark.timeout(120)
def test_two_local_nodes_take_the_multi_node_path(tmp_path: Path) -> None:
    """`localhost` and `127.0.0.1` are two nodes that are both this machine: each gets its own
    `bash -c` torchrun with --nnodes=2 and its node rank, exactly the line ssh would carry."""
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    (tmp_path / ".deepspeed_env").write_text("SHARDSPEED_TEST_VAR=ds\n")
    proc = shardspeed(["-H", "hostfile", "--master_port", str(free_port()), ALLREDUCE,
                       "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "node 1 (127.0.0.1): bash -c" in proc.stderr
    for record in results(tmp_path, 2):
        assert record["env"]["LOCAL_RANK"] == "0" and record["local_rank_arg"] == 0
        assert record["env"]["SHARDSPEED_TEST_VAR"] == "ds"


@pytest.mark.timeout(60)
def test_node_watcher_stops_the_others_on_a_failure() -> None:
    """Catches pdsh's old behaviour (DeepSpeed #1722): a failed node must fail the run, promptly."""
    commands = [mn.NodeCommand("a", 0, True, ("bash", "-c", "sleep 30")),
                mn.NodeCommand("b", 1, True, ("bash", "-c", "sleep 0.2; exit 5"))]
    start = time.monotonic()
    assert mn.run_node_commands(commands, grace_s=5) == 5
    assert time.monotonic() - start < 10
    killed = [mn.NodeCommand("c", 0, True, ("bash", "-c", f"kill -{int(signal.SIGKILL)} $$"))]
    assert mn.run_node_commands(killed) == 128 + int(signal.SIGKILL)


@pytest.mark.timeout(120)
def test_report_runs() -> None:
    """Through the console script when it is installed beside this python (else `-m`)."""
    script = Path(sys.executable).parent / "shardspeed"
    command = [str(script)] if script.exists() else CLI
    proc = subprocess.run([*command, "report"], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "ZeRO stage 3" in proc.stdout and "torch version" in proc.stdout and "gloo" in proc.stdout

