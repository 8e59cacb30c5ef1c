"""The commands the launcher runs: one `torch.distributed.run` per node, started over ssh for remote
nodes and through `bash -c` for nodes that are this machine, plus the environment they export.

Every node runs the same shell line, `cd CWD && export K=V ... && exec PYTHON -u -m
torch.distributed.run --nnodes=M --node_rank=i --nproc_per_node=S --master_addr=A --master_port=P
-m shardspeed.launcher.rank_entry [entry flags] -- SCRIPT ARGS`, so what `--dry_run` prints is
exactly what runs. `pdsh` and `ssh` both mean this built-in ssh fan-out: one ssh client per node,
each exit status watched, so a failed node fails the run (pdsh -S can hide it, DeepSpeed #1722).
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shardspeed.launcher.hostfile import LauncherError, Resources

logger = logging.getLogger("shardspeed.launcher")

ENTRY_MODULE = "shardspeed.launcher.rank_entry"
ENV_FILE_NAMES = (".deepspeed_env", ".shardspeed_env")
"""Read in this order from the home directory, then from the working directory; later wins."""
ENV_FILE_OVERRIDES = ("SHARDSPEED_ENV_FILE", "DS_ENV_FILE")
"""Environment variables naming one env file to read instead of the defaults."""
EXPORT_PREFIXES = ("NCCL_", "PYTHON", "UCX_", "MV2_", "GLOO_", "TORCH_")
"""Variables of the launching shell that follow the run to remote nodes."""
SSH_LAUNCHERS = ("pdsh", "ssh")
KNOWN_LAUNCHERS = ("pdsh", "ssh", "openmpi", "mpich", "impi", "slurm", "mvapich")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})


@dataclass(frozen=True)
class LaunchSpec:
    """What every rank runs and where the ranks meet; the same on every node."""

    user_script: str
    user_args: tuple[str, ...] = ()
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    bind_cores: bool = False
    core_list: str | None = None
    log_dir: str | None = None
    python: str = field(default_factory=lambda: sys.executable)


@dataclass(frozen=True)
class NodeCommand:
    """One node's command line; `local` nodes run through bash on this machine, others via ssh."""

    host: str
    node_rank: int
    local: bool
    argv: tuple[str, ...]


def is_local_host(host: str) -> bool:
    """Whether `host` names this machine (loopback names or this machine's own hostname)."""
    return host in _LOCAL_NAMES or host in {socket.gethostname(), socket.getfqdn()}


# ---------------------------------------------------------------- environment files


def parse_env_file(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines (blank lines and `#` comments skipped); a bad line raises naming file:line."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not _ENV_KEY.match(key):
            raise LauncherError(f"{path}:{number}: expected `NAME=VALUE`, got `{line}`")
        env[key] = _unquote(value.strip())
    return env


def _unquote(value: str) -> str:
    """`"a b"` or `'a b'` -> `a b`, as a shell would read it; anything else is kept as written."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def env_file_paths(cwd: Path, home: Path, environ: Mapping[str, str]) -> list[Path]:
    """The env files to read, in order (later files override earlier ones)."""
    for name in ENV_FILE_OVERRIDES:
        if environ.get(name):
            path = Path(environ[name])
            if not path.is_file():
                raise LauncherError(f"${name} names {path}, which is not a file")
            return [path]
    folders = [home] if home.resolve() == cwd.resolve() else [home, cwd]
    return [folder / name for folder in folders for name in ENV_FILE_NAMES if (folder / name).is_file()]


def load_env_files(cwd: Path, home: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """Merge `.deepspeed_env` / `.shardspeed_env` from home then cwd, as DeepSpeed's launcher does."""
    merged: dict[str, str] = {}
    for path in env_file_paths(cwd, home, environ):
        merged.update(parse_env_file(path))
    return merged


def exported_env(environ: Mapping[str, str], env_file_vars: Mapping[str, str]) -> dict[str, str]:
    """What a remote node must export: the launching shell's NCCL_/PYTHON.../... variables, then
    the env files (which win)."""
    picked = {key: value for key, value in environ.items() if key.startswith(EXPORT_PREFIXES)}
    return {**picked, **env_file_vars}


def visible_devices_env(slots: Sequence[int]) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a node whose slots are not simply 0..n-1 (an --include/--exclude pick).

    With slots 0..n-1 local rank i already uses device i, so nothing is set and a user's own
    CUDA_VISIBLE_DEVICES is left alone.
    """
    if list(slots) == list(range(len(slots))):
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(slot) for slot in slots)}


# ---------------------------------------------------------------- command building


def entry_argv(spec: LaunchSpec) -> list[str]:
    """The part after torchrun's own flags: the per-rank entry module, its flags, the user target."""
    flags = []
    if spec.module:
        flags.append("--module")
    if spec.no_python:
        flags.append("--no_python")
    if spec.no_local_rank:
        flags.append("--no_local_rank")
    if spec.bind_cores:
        flags.append("--bind_cores")
    if spec.core_list:
        flags.append(f"--core_list={spec.core_list}")
    return ["-m", ENTRY_MODULE, *flags, "--", spec.user_script, *spec.user_args]


def torchrun_flags(spec: LaunchSpec, nnodes: int, node_rank: int, nproc: int) -> list[str]:
    """`torch.distributed.run` flags for one node, entry and user target included."""
    flags = [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc}",
             f"--master_addr={spec.master_addr}", f"--master_port={spec.master_port}"]
    if spec.log_dir:
        # Each rank's stdout and stderr go to <log_dir>/<run>/attempt_0/<local_rank>/.
        flags += [f"--log_dir={spec.log_dir}", "--redirects=3"]
    return flags + entry_argv(spec)


def torchrun_command(spec: LaunchSpec, nnodes: int, node_rank: int, nproc: int) -> list[str]:
    """The full `python -u -m torch.distributed.run ...` argv for one node."""
    return [spec.python, "-u", "-m", "torch.distributed.run",
            *torchrun_flags(spec, nnodes, node_rank, nproc)]


def shell_line(argv: Sequence[str], env: Mapping[str, str], cwd: str,
               venv_script: str | None = None) -> str:
    """`cd CWD && [source VENV &&] export K=V ... && exec ARGV`, quoted for a remote shell."""
    parts = [f"cd {shlex.quote(cwd)}"]
    if venv_script:
        parts.append(f"source {shlex.quote(venv_script)}")
    if env:
        parts.append("export " + " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items()))
    parts.append("exec " + shlex.join(argv))
    return " && ".join(parts)


def ssh_prefix(host: str, ssh_port: int | None, launcher_args: str) -> list[str]:
    """`ssh [-p PORT] [--launcher_args ...] HOST`."""
    port = ["-p", str(ssh_port)] if ssh_port is not None else []
    return ["ssh", *port, *shlex.split(launcher_args), host]


def default_master_addr(hosts: Sequence[str], is_local: Callable[[str], bool] = is_local_host) -> str:
    """The first node; loopback when every node is this machine, this machine's name when the first
    node is local but others are not (they could not reach "localhost")."""
    first = hosts[0]
    if not is_local(first):
        return first
    return "127.0.0.1" if all(is_local(host) for host in hosts) else socket.gethostname()


def build_node_commands(resources: Resources, spec: LaunchSpec, env: Mapping[str, str], cwd: str,
                        ssh_port: int | None = None, launcher_args: str = "",
                        venv_script: str | None = None,
                        is_local: Callable[[str], bool] = is_local_host) -> list[NodeCommand]:
    """One command per node, node rank = position in `resources` (hostfile order)."""
    commands = []
    for node_rank, (host, slots) in enumerate(resources.items()):
        argv = torchrun_command(spec, len(resources), node_rank, len(slots))
        line = shell_line(argv, {**env, **visible_devices_env(slots)}, cwd, venv_script)
        local = is_local(host)
        full = ["bash", "-c", line] if local else [*ssh_prefix(host, ssh_port, launcher_args), line]
        commands.append(NodeCommand(host, node_rank, local, tuple(full)))
    return commands


def check_launcher(name: str) -> None:
    """Raise for the launchers we know of but do not implement yet."""
    if name not in SSH_LAUNCHERS:
        raise LauncherError(f"--launcher {name} is not supported yet; use --launcher ssh (or pdsh, "
                            f"the same built-in ssh fan-out), or run with --no_ssh --node_rank=i "
                            f"on each node")


# ---------------------------------------------------------------- running


def check_passwordless_ssh(hosts: Iterable[str], ssh_port: int | None, launcher_args: str,
                           run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Raise naming every host that cannot be reached by ssh without a password."""
    failed = []
    for host in hosts:
        prefix = ssh_prefix(host, ssh_port, launcher_args)
        argv = [prefix[0], "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *prefix[1:], "true"]
        result = run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            failed.append(f"{host} ({(result.stderr or '').strip() or f'exit {result.returncode}'})")
    if failed:
        raise LauncherError("passwordless ssh failed for: " + "; ".join(failed)
                            + ". Set up ssh keys, or pass --no_ssh_check if ssh works another way")


def exit_status(returncode: int) -> int:
    """A shell-style exit status: a death by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def run_node_commands(commands: Sequence[NodeCommand], poll_s: float = 0.1, grace_s: float = 15.0) -> int:
    """Start every node's command, wait, and on the first failure stop the others.

    Returns 0 when every node exits 0, otherwise the failing node's status (logged with its host).
    SIGTERM and Ctrl-C stop all nodes' process groups and return 128 + signal.
    """
    procs = [(command, subprocess.Popen(list(command.argv), start_new_session=True)) for command in commands]
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _watch(procs, poll_s, grace_s)
    except KeyboardInterrupt:
        logger.error("interrupted; stopping all nodes")
        _stop([proc for _, proc in procs], grace_s)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _watch(procs: list[tuple[NodeCommand, subprocess.Popen]], poll_s: float, grace_s: float) -> int:
    while True:
        codes = [proc.poll() for _, proc in procs]
        for (command, proc), code in zip(procs, codes):
            if code not in (None, 0):
                logger.error("node %d (%s) failed: %s; stopping the other nodes (the ranks that failed "
                             "are named in its output above)", command.node_rank, command.host,
                             describe_exit(code))
                _stop([other for _, other in procs if other is not proc], grace_s)
                return exit_status(code)
        if all(code == 0 for code in codes):
            return 0
        time.sleep(poll_s)


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each still-running process group, then SIGKILL what is left after `grace_s`."""
    live = [proc for proc in procs if proc.poll() is None]
    for proc in live:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in live:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
