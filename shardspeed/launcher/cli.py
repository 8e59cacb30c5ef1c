"""The `shardspeed` command: `shardspeed [launcher flags] script.py [script args]`, or a subcommand.

Flags follow DeepSpeed's `deepspeed` launcher. One node (no hostfile, or a hostfile that leaves one
node) runs PyTorch's elastic launcher in this process; several nodes get one
`python -m torch.distributed.run` each, over ssh (see `multinode`). Every rank starts in
`shardspeed.launcher.rank_entry`, which adds `--local_rank=N` and runs the script.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from shardspeed.launcher import hostfile as hf
from shardspeed.launcher import multinode as mn
from shardspeed.launcher.hostfile import LauncherError, Resources

logger = logging.getLogger("shardspeed.launcher")

DEFAULT_HOSTFILE = "/job/hostfile"
DEFAULT_MASTER_PORT = 29500
LOCAL_MASTER_ADDR = "127.0.0.1"

SUBCOMMANDS: dict[str, str] = {
    "report": "shardspeed.launcher.report:main",
    "zero-to-fp32": "shardspeed.checkpoint.zero_to_fp32:main",
    "install-deepspeed-alias": "shardspeed.launcher.alias:main",
    "plan": "shardspeed.launcher.plan:main",
}
"""`shardspeed NAME args...` -> the `main(argv) -> int` at "module:function" (imported on use).
Register a new subcommand here, e.g. "zero-to-fp32": "shardspeed.checkpoint.zero_to_fp32:main"."""

UNSUPPORTED_FLAGS = ("autotuning", "elastic_training", "min_elastic_nodes", "max_elastic_nodes")


def main(argv: list[str] | None = None) -> int:
    """Entry of the console script: dispatch a subcommand, else launch a user script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return load_subcommand(argv[0])(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.quiet)
    try:
        return launch(args)
    except LauncherError as err:
        print(f"shardspeed: error: {err}", file=sys.stderr)
        return 2


def load_subcommand(name: str) -> Callable[[list[str]], int]:
    module_name, _, function = SUBCOMMANDS[name].partition(":")
    return getattr(importlib.import_module(module_name), function)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if "required: user_script" in message:
            # argparse would call the script's (optional) arguments required too; say what is missing.
            message = ("give the training script to run (shardspeed [flags] script.py [its args]), or a subcommand: "
                       + ", ".join(SUBCOMMANDS))
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shardspeed", allow_abbrev=False,
        description="Launch a training script on one or more nodes (DeepSpeed launcher flags).",
        epilog="subcommands: " + ", ".join(f"shardspeed {name} ..." for name in SUBCOMMANDS))
    _add_resource_flags(parser)
    _add_launch_flags(parser)
    _add_rank_flags(parser)
    _add_output_flags(parser)
    for flag in UNSUPPORTED_FLAGS:
        parser.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)
    parser.add_argument("user_script", help="the training script (or module / program) to run")
    parser.add_argument("user_args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def _add_resource_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-H", "--hostfile", default=None,
                        help=f"MPI-style hostfile, `HOST slots=N` per line (default {DEFAULT_HOSTFILE}; "
                             "without one, this machine only)")
    parser.add_argument("-i", "--include", default=None, help="use only these, e.g. `host1:0,1@host2`")
    parser.add_argument("-e", "--exclude", default=None, help="skip these, e.g. `host1:0@host2`")
    parser.add_argument("--num_nodes", type=int, default=None, help="use the first N hosts")
    parser.add_argument("--num_gpus", "--num_accelerators", dest="num_gpus", type=int, default=None,
                        help="processes per node (on a CPU machine: how many processes)")


def _add_launch_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--master_addr", default=None,
                        help="rendezvous address (default 127.0.0.1, or the first host of several)")
    parser.add_argument("--master_port", type=int, default=DEFAULT_MASTER_PORT)
    parser.add_argument("--node_rank", type=int, default=None,
                        help="this node's rank, with --no_ssh on a multi-node hostfile")
    parser.add_argument("--launcher", default="pdsh", type=str.lower, choices=mn.KNOWN_LAUNCHERS,
                        help="multi-node launcher; pdsh and ssh use the built-in ssh fan-out")
    parser.add_argument("--launcher_args", default="", help="extra arguments for ssh, one string")
    parser.add_argument("--no_ssh", action="store_true",
                        help="run only this node's part (needs --node_rank); start it on each node")
    parser.add_argument("--no_ssh_check", action="store_true", help="skip the passwordless-ssh check")
    parser.add_argument("--force_multi", action="store_true",
                        help="use the multi-node path even for one node")
    parser.add_argument("--ssh_port", type=int, default=None)
    parser.add_argument("--venv_script", default=None, help="a script each node sources first")


def _add_rank_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--module", action="store_true", help="user_script is a module (python -m)")
    parser.add_argument("--no_python", action="store_true", help="user_script is a program; run it directly")
    parser.add_argument("--no_local_rank", action="store_true", help="do not pass --local_rank=N")
    parser.add_argument("--bind_cores_to_rank", action="store_true",
                        help="give each rank an equal share of the node's cores")
    parser.add_argument("--bind_core_list", default=None, help="cores to share, e.g. `0-3,8-11`")


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enable_each_rank_log", default=None, metavar="DIR",
                        help="write each rank's stdout/stderr to files under DIR")
    parser.add_argument("--save_pid", action="store_true",
                        help=f"write this launcher's pid to {tempfile.gettempdir()}/<pid>.shardspeed")
    parser.add_argument("--log_level", default="info", type=str.lower,
                        choices=("debug", "info", "warning", "error", "critical"))
    parser.add_argument("-q", "--quiet", action="store_true", help="launcher logs errors only")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")


def setup_logging(level_name: str, quiet: bool) -> None:
    level = logging.ERROR if quiet else getattr(logging, level_name.upper())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[shardspeed launcher] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


# ---------------------------------------------------------------- the launch


def launch(args: argparse.Namespace) -> int:
    """Resolve the nodes and slots, then run locally or on every node; returns the exit status."""
    validate(args)
    resources, source = resolve_resources(args)
    env = mn.load_env_files(Path.cwd(), Path.home(), os.environ)
    with pid_file(args.save_pid and not args.dry_run):
        if len(resources) == 1 and not args.force_multi:
            _warn_if_remote(resources, source)
            return run_this_node(args, resources, 0, env, args.master_addr or LOCAL_MASTER_ADDR)
        master = args.master_addr or mn.default_master_addr(list(resources))
        if args.no_ssh:
            return run_this_node(args, resources, _node_rank(args, resources), env, master)
        return run_all_nodes(args, resources, env, master)


def validate(args: argparse.Namespace) -> None:
    """Reject flags we accept for DeepSpeed compatibility but do not implement, and bad combinations."""
    for flag in UNSUPPORTED_FLAGS:
        if getattr(args, flag) is not None:
            raise LauncherError(f"--{flag} is not supported yet")
    if args.module and args.no_python:
        raise LauncherError("--module and --no_python cannot be used together")
    # DeepSpeed's default of -1 means "all"; accept it as such.
    for name in ("num_nodes", "num_gpus"):
        if getattr(args, name) == -1:
            setattr(args, name, None)
    if not (args.module or args.no_python or args.dry_run) and not Path(args.user_script).is_file():
        raise LauncherError(f"user script {args.user_script!r} not found (cwd {Path.cwd()}); "
                            "pass --module for a module or --no_python for a program")


def resolve_resources(args: argparse.Namespace,
                      device_count: Callable[[], int] | None = None) -> tuple[Resources, str]:
    """The hostfile's (or this machine's) slots after --include/--exclude/--num_nodes/--num_gpus."""
    path = Path(args.hostfile or DEFAULT_HOSTFILE)
    if path.is_file():
        pool, source = hf.parse_hostfile(path), f"hostfile {path}"
    elif args.hostfile is not None:
        raise LauncherError(f"-H/--hostfile {path}: no such file")
    else:
        pool, source = local_pool(args.num_gpus, (device_count or cuda_device_count)()), "this machine"
    return hf.select(pool, args.include, args.exclude, args.num_nodes, args.num_gpus, source), source


def local_pool(num_gpus: int | None, devices: int) -> Resources:
    """This machine's slots: its CUDA devices, or on a CPU machine `--num_gpus` processes (default 1)."""
    if devices > 0:
        return {"localhost": list(range(devices))}
    return {"localhost": list(range(num_gpus if num_gpus and num_gpus > 0 else 1))}


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_spec(args: argparse.Namespace, master_addr: str) -> mn.LaunchSpec:
    return mn.LaunchSpec(
        user_script=args.user_script, user_args=tuple(args.user_args), master_addr=master_addr,
        master_port=args.master_port, module=args.module, no_python=args.no_python,
        no_local_rank=args.no_local_rank, bind_cores=args.bind_cores_to_rank or bool(args.bind_core_list),
        core_list=args.bind_core_list, log_dir=args.enable_each_rank_log)


def _node_rank(args: argparse.Namespace, resources: Resources) -> int:
    if args.node_rank is None or not 0 <= args.node_rank < len(resources):
        raise LauncherError(f"--no_ssh with {len(resources)} nodes needs --node_rank in "
                            f"[0, {len(resources) - 1}], got {args.node_rank}")
    return args.node_rank


def _warn_if_remote(resources: Resources, source: str) -> None:
    host = next(iter(resources))
    if not mn.is_local_host(host):
        logger.warning("%s leaves one node, %s; running on this machine as DeepSpeed does "
                       "(pass --force_multi to ssh to it)", source, host)


# ---------------------------------------------------------------- one node, in this process


def run_this_node(args: argparse.Namespace, resources: Resources, node_rank: int,
                  env: dict[str, str], master_addr: str) -> int:
    """Run node `node_rank`'s ranks through torch.distributed.run inside this process."""
    slots = list(resources.values())[node_rank]
    spec = launch_spec(args, master_addr)
    flags = mn.torchrun_flags(spec, len(resources), node_rank, len(slots))
    env = {**env, **mn.visible_devices_env(slots)}
    command = [f"{key}={value}" for key, value in env.items()]
    command += mn.torchrun_command(spec, len(resources), node_rank, len(slots))
    if args.dry_run:
        print(shlex.join(command))
        return 0
    logger.info("starting %d rank(s) on this node: %s", len(slots), shlex.join(command))
    os.environ.update(env)
    return run_torchrun(flags, torch_log_level(logger.getEffectiveLevel()))


def torch_log_level(launcher_level: int) -> int:
    """torchrun's agent logs INFO about every rendezvous: it gets warnings, unless debugging or -q."""
    return launcher_level if launcher_level <= logging.DEBUG else max(launcher_level, logging.WARNING)


def run_torchrun(flags: list[str], log_level: int = logging.WARNING) -> int:
    """`torch.distributed.run` in this process; a failed rank is named with its exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torch gives each of these loggers its own level, so the parent's level would not reach them.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(log_level)
    try:
        run(get_args_parser().parse_args(flags))
    except ChildFailedError as err:
        return report_failures(err.failures)
    except SignalException as err:
        logger.error("launcher got %s; ranks stopped", err.sigval.name)
        return 128 + int(err.sigval)
    except KeyboardInterrupt:
        return 130
    return 0


STOP_SIGNALS = (-signal.SIGTERM, -signal.SIGKILL)
"""How torchrun ends the healthy ranks once one failed: those are not the cause."""


def report_failures(failures: dict) -> int:
    """Log one line per failed rank (global rank, local rank, how it ended) and return the exit
    status of the cause: the earliest failure that is not torchrun stopping the other ranks."""
    cause = min(failures, key=lambda rank: (failures[rank].exitcode in STOP_SIGNALS,
                                            failures[rank].timestamp, rank))
    for rank, failure in sorted(failures.items()):
        note = " (first failure)" if rank == cause and len(failures) > 1 else ""
        logger.error("rank %d (local_rank %d, pid %d) failed: %s%s", rank, failure.local_rank,
                     failure.pid, mn.describe_exit(failure.exitcode), note)
    status = mn.exit_status(failures[cause].exitcode)
    return status if status != 0 else 1


# ---------------------------------------------------------------- several nodes


def run_all_nodes(args: argparse.Namespace, resources: Resources, env: dict[str, str],
                  master_addr: str) -> int:
    """One torch.distributed.run per node: over ssh, or through bash for this machine's nodes."""
    mn.check_launcher(args.launcher)
    exported = mn.exported_env(os.environ, env)
    commands = mn.build_node_commands(resources, launch_spec(args, master_addr), exported,
                                      str(Path.cwd()), args.ssh_port, args.launcher_args,
                                      args.venv_script)
    if args.dry_run:
        for command in commands:
            print(shlex.join(command.argv))
        return 0
    remote = [command.host for command in commands if not command.local]
    if remote and not args.no_ssh_check:
        mn.check_passwordless_ssh(remote, args.ssh_port, args.launcher_args)
    for command in commands:
        logger.info("node %d (%s): %s", command.node_rank, command.host, shlex.join(command.argv))
    return mn.run_node_commands(commands)


@contextmanager
def pid_file(enabled: bool) -> Iterator[Path | None]:
    """With --save_pid, `<tmp>/<pid>.shardspeed` holds this launcher's pid while it runs."""
    if not enabled:
        yield None
        return
    path = Path(tempfile.gettempdir()) / f"{os.getpid()}.shardspeed"
    path.write_text(f"{os.getpid()}\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
