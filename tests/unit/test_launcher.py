"""The `shardspeed` command line without starting processes: hostfiles, filters, the commands
built for one and several nodes, env files, the per-rank entry, subcommands and the report."""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from shardspeed.launcher import cli, hostfile as hf, multinode as mn, rank_entry, report
from shardspeed.launcher.hostfile import LauncherError

PY = sys.executable
ENTRY = "-m shardspeed.launcher.rank_entry"


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = HOME = an empty folder, no env-file overrides, no exported prefixes, no /job/hostfile,
    no CUDA devices: the launcher sees only what a test gives it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in list(os.environ):
        if key.startswith(mn.EXPORT_PREFIXES) or key in mn.ENV_FILE_OVERRIDES:
            monkeypatch.delenv(key)
    monkeypatch.setattr(cli, "DEFAULT_HOSTFILE", str(tmp_path / "no-such-hostfile"))
    monkeypatch.setattr(cli, "cuda_device_count", lambda: 0)
    return tmp_path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- hostfiles


def test_hostfile_comments_blank_lines_and_order() -> None:
    text = "# cluster\nworker-2 slots=4\n\n  worker-1 slots=2   # trailing comment\n"
    assert hf.parse_hostfile_text(text) == {"worker-2": [0, 1, 2, 3], "worker-1": [0, 1]}
    assert list(hf.parse_hostfile_text(text)) == ["worker-2", "worker-1"]  # node rank = file order


def test_hostfile_duplicate_host_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("a slots=1\nb slots=1\na slots=2\n")
    with pytest.raises(LauncherError, match=rf"{path}:3: host `a` is listed twice"):
        hf.parse_hostfile(path)


@pytest.mark.parametrize("line", ["worker-1", "worker-1 slots=two", "worker-1 slots=0",
                                  "worker-1 slots=-1", "worker-1 slots=2 max_slots=4", "slots=2"])
def test_hostfile_bad_line_names_file_and_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "hosts"
    path.write_text(f"ok slots=1\n{line}\n")
    with pytest.raises(LauncherError, match=rf"{path}:2: "):
        hf.parse_hostfile(path)


def test_hostfile_empty_or_missing(tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="names no hosts"):
        hf.parse_hostfile_text("# nothing\n\n", source="hosts")
    with pytest.raises(LauncherError, match="cannot read hostfile"):
        hf.parse_hostfile(tmp_path / "absent")


# ---------------------------------------------------------------- filters

POOL = {"host1": [0, 1, 2, 3], "host2": [0, 1, 2, 3], "host3": [0, 1]}


def test_include_picks_hosts_and_slots_in_hostfile_order() -> None:
    assert hf.include(POOL, "host2@host1:0,1") == {"host1": [0, 1], "host2": [0, 1, 2, 3]}
    assert hf.include(POOL, "host1:3@host1:1") == {"host1": [1, 3]}


def test_exclude_drops_slots_and_empty_hosts() -> None:
    assert hf.exclude(POOL, "host1:0@host3") == {"host1": [1, 2, 3], "host2": [0, 1, 2, 3]}
    assert hf.exclude(POOL, "host3:0,1") == {"host1": [0, 1, 2, 3], "host2": [0, 1, 2, 3]}


@pytest.mark.parametrize("spec, message", [
    ("host9", r"--include 'host9': host `host9` is not in the hostfile"),
    ("host3:2", r"host `host3` has slots \[0, 1\], not \[2\]"),
    ("host1:", "bad entry"),
    ("host1:a,b", "slots must be integers"),
    ("@host1", "bad entry"),
])
def test_include_errors_name_the_flag(spec: str, message: str) -> None:
    with pytest.raises(LauncherError, match=message):
        hf.include(POOL, spec)


def test_filters_are_exclusive_and_limits_checked() -> None:
    with pytest.raises(LauncherError, match="--include and --exclude cannot be used together"):
        hf.select(POOL, "host1", "host2", None, None)
    with pytest.raises(LauncherError, match="--include cannot be combined with --num_nodes/--num_gpus"):
        hf.select(POOL, "host1", None, None, 2)
    with pytest.raises(LauncherError, match="no slots left"):
        hf.select({"a": [0]}, None, "a", None, None)


def test_num_nodes_and_num_gpus_limits() -> None:
    assert hf.select(POOL, None, None, 2, 3) == {"host1": [0, 1, 2], "host2": [0, 1, 2]}
    with pytest.raises(LauncherError, match=r"--num_nodes 4: the hostfile has 3 host\(s\)"):
        hf.limit(POOL, 4, None)
    with pytest.raises(LauncherError, match=r"--num_gpus 3: .* host `host3` only 2 slot\(s\)"):
        hf.limit(POOL, None, 3)


# ---------------------------------------------------------------- resources and flags


def args_for(argv: list[str]) -> argparse.Namespace:
    args = cli.build_parser().parse_args(argv)
    cli.validate(args)
    return args


def test_local_pool_cpu_counts_processes_gpu_counts_devices(clean_env: Path) -> None:
    assert cli.resolve_resources(args_for(["--num_gpus", "3", "--dry_run", "t.py"]))[0] == {"localhost": [0, 1, 2]}
    assert cli.resolve_resources(args_for(["--dry_run", "t.py"]))[0] == {"localhost": [0]}
    gpus = cli.resolve_resources(args_for(["--num_gpus", "2", "--dry_run", "t.py"]), device_count=lambda: 4)
    assert gpus[0] == {"localhost": [0, 1]}
    with pytest.raises(LauncherError, match="--num_gpus 8: this machine gives host `localhost` only 4"):
        cli.resolve_resources(args_for(["--num_gpus", "8", "--dry_run", "t.py"]), device_count=lambda: 4)


def test_explicit_missing_hostfile_is_an_error(clean_env: Path) -> None:
    with pytest.raises(LauncherError, match="-H/--hostfile .*absent: no such file"):
        cli.resolve_resources(args_for(["-H", str(clean_env / "absent"), "--dry_run", "t.py"]))


def test_script_flags_after_the_script_belong_to_the_script() -> None:
    args = args_for(["--num_accelerators", "2", "--dry_run", "t.py", "--num_gpus", "5", "-H", "x"])
    assert (args.num_gpus, args.hostfile, args.user_script) == (2, None, "t.py")
    assert args.user_args == ["--num_gpus", "5", "-H", "x"]


def test_deepspeed_minus_one_means_all() -> None:
    args = args_for(["--num_gpus", "-1", "--num_nodes", "-1", "--dry_run", "t.py"])
    assert (args.num_gpus, args.num_nodes) == (None, None)


@pytest.mark.parametrize("argv, message", [
    (["--module", "--no_python", "t.py"], "--module and --no_python cannot be used together"),
    (["--elastic_training", "1", "t.py"], "--elastic_training is not supported yet"),
    (["--autotuning", "tune", "t.py"], "--autotuning is not supported yet"),
    (["missing.py"], "user script 'missing.py' not found"),
])
def test_bad_flags_exit_2_with_message(clean_env: Path, capsys: pytest.CaptureFixture[str],
                                       argv: list[str], message: str) -> None:
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and message in err


# ---------------------------------------------------------------- commands built


def test_dry_run_single_node_prints_the_torchrun_command(clean_env: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--dry_run", "--num_gpus", "2", "--master_port", "1234",
                            "train.py", "--some_arg", "x"], capsys)
    assert code == 0
    assert out.strip() == (f"{shlex.quote(PY)} -u -m torch.distributed.run --nnodes=1 --node_rank=0 "
                           f"--nproc_per_node=2 --master_addr=127.0.0.1 --master_port=1234 {ENTRY} "
                           f"-- train.py --some_arg x")


def test_dry_run_rank_flags_and_each_rank_log(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--dry_run", "--module", "--no_local_rank", "--bind_core_list", "0-3",
                            "--enable_each_rank_log", "logs", "pkg.train", "--lr", "1"], capsys)
    assert code == 0
    assert out.split(" -u -m torch.distributed.run ")[1].strip() == (
        "--nnodes=1 --node_rank=0 --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=29500 "
        f"--log_dir=logs --redirects=3 {ENTRY} --module --no_local_rank --bind_cores --core_list=0-3 "
        "-- pkg.train --lr 1")


def test_dry_run_include_sets_visible_devices(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (clean_env / "hosts").write_text("localhost slots=4\n")
    code, out, _ = run_cli(["-H", "hosts", "-i", "localhost:1,3", "--dry_run", "t.py"], capsys)
    assert code == 0 and out.startswith("CUDA_VISIBLE_DEVICES=1,3 ") and "--nproc_per_node=2" in out


def test_dry_run_multi_node_ssh_commands(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (clean_env / "hosts").write_text("worker-1 slots=2\nworker-2 slots=4\nworker-3 slots=4\n")
    (clean_env / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\n")
    code, out, _ = run_cli(["-H", "hosts", "--num_nodes", "2", "--ssh_port", "2222",
                            "--launcher_args", "-o StrictHostKeyChecking=no", "--master_port", "6000",
                            "--dry_run", "train.py", "--x", "a b"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for node_rank, (line, host, nproc) in enumerate(zip(lines, ["worker-1", "worker-2"], [2, 4])):
        argv = shlex.split(line)
        assert argv[:6] == ["ssh", "-p", "2222", "-o", "StrictHostKeyChecking=no", host]
        assert argv[6] == (
            f"cd {shlex.quote(str(clean_env))} && export NCCL_DEBUG=INFO && exec {shlex.quote(PY)} -u -m "
            f"torch.distributed.run --nnodes=2 --node_rank={node_rank} --nproc_per_node={nproc} "
            f"--master_addr=worker-1 --master_port=6000 {ENTRY} -- train.py --x 'a b'")


def test_build_node_commands_local_nodes_use_bash(tmp_path: Path) -> None:
    spec = mn.LaunchSpec("s.py", ("--a",), master_addr="127.0.0.1", master_port=7, python="py")
    commands = mn.build_node_commands({"localhost": [0], "far": [0, 1]}, spec, {"K": "v w"}, "/w d",
                                      is_local=lambda host: host == "localhost")
    line = ("cd '/w d' && export K='v w' && exec py -u -m torch.distributed.run --nnodes=2 "
            "--node_rank={r} --nproc_per_node={n} --master_addr=127.0.0.1 --master_port=7 "
            f"{ENTRY} -- s.py --a")
    assert commands[0] == mn.NodeCommand("localhost", 0, True, ("bash", "-c", line.format(r=0, n=1)))
    assert commands[1] == mn.NodeCommand("far", 1, False, ("ssh", "far", line.format(r=1, n=2)))


def test_shell_line_survives_quoting(tmp_path: Path) -> None:
    """A value with quotes and spaces reaches the remote process unchanged."""
    value = "it's \"quoted\" $HOME"
    line = mn.shell_line(["printf", "%s|%s", "$K", "x y"], {"K": value}, str(tmp_path))
    words = shlex.split(line)
    assert words[:4] == ["cd", str(tmp_path), "&&", "export"] and words[4] == f"K={value}"


def test_no_ssh_runs_one_node(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (clean_env / "hosts").write_text("worker-1 slots=2\nworker-2 slots=3\n")
    code, _, err = run_cli(["-H", "hosts", "--no_ssh", "--dry_run", "t.py"], capsys)
    assert code == 2 and "--no_ssh with 2 nodes needs --node_rank in [0, 1], got None" in err
    code, out, _ = run_cli(["-H", "hosts", "--no_ssh", "--node_rank", "1", "--dry_run", "t.py"], capsys)
    assert code == 0 and "--nnodes=2 --node_rank=1 --nproc_per_node=3 --master_addr=worker-1 " in out
    assert not out.startswith("ssh")


def test_unsupported_launcher_is_named(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (clean_env / "hosts").write_text("worker-1 slots=2\nworker-2 slots=2\n")
    code, _, err = run_cli(["-H", "hosts", "--launcher", "openmpi", "--dry_run", "t.py"], capsys)
    assert code == 2 and "--launcher openmpi is not supported yet" in err


def test_single_localhost_hostfile_runs_locally_unless_forced(clean_env: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (clean_env / "hosts").write_text("localhost slots=2\n")
    _, out, _ = run_cli(["-H", "hosts", "--dry_run", "t.py"], capsys)
    assert out.startswith(shlex.quote(PY))
    _, out, _ = run_cli(["-H", "hosts", "--force_multi", "--dry_run", "t.py"], capsys)
    assert out.startswith("bash -c ") and "--nnodes=1 --node_rank=0 --nproc_per_node=2" in out


def test_default_master_addr() -> None:
    assert mn.default_master_addr(["w1", "w2"]) == "w1"
    assert mn.default_master_addr(["localhost", "127.0.0.1"]) == "127.0.0.1"
    assert mn.default_master_addr(["localhost", "w2"]) not in ("localhost", "127.0.0.1")


def test_passwordless_ssh_check_names_failing_hosts() -> None:
    calls = []

    def fake_run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(argv)
        failed = argv[-2] == "w2"
        return subprocess.CompletedProcess(argv, 255 if failed else 0, "", "Permission denied" if failed else "")

    with pytest.raises(LauncherError, match=r"passwordless ssh failed for: w2 \(Permission denied\)"):
        mn.check_passwordless_ssh(["w1", "w2"], 22, "", run=fake_run)
    assert calls[0] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", "22", "w1", "true"]


def test_report_failures_names_the_rank(caplog: pytest.LogCaptureFixture) -> None:
    """The cause is rank 1, even though torchrun's SIGTERM to rank 0 has the same timestamp."""
    failures = {0: SimpleNamespace(local_rank=0, pid=41, exitcode=-15, timestamp=5),
                1: SimpleNamespace(local_rank=1, pid=42, exitcode=3, timestamp=5),
                2: SimpleNamespace(local_rank=0, pid=43, exitcode=-11, timestamp=6)}
    with caplog.at_level("ERROR", logger="shardspeed.launcher"):
        assert cli.report_failures(failures) == 3
    assert "rank 0 (local_rank 0, pid 41) failed: killed by signal SIGTERM\n" in caplog.text
    assert "rank 1 (local_rank 1, pid 42) failed: exit code 3 (first failure)" in caplog.text
    assert "rank 2 (local_rank 0, pid 43) failed: killed by signal SIGSEGV" in caplog.text
    assert cli.report_failures({2: failures[2]}) == 128 + 11


# ---------------------------------------------------------------- env files


def test_env_files_home_then_cwd_shardspeed_wins(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (cwd / ".deepspeed_env").write_text("# comment\n\nB=cwd-ds\nC='x y'\n")
    (cwd / ".shardspeed_env").write_text("export C=\"q\"\n")
    assert mn.load_env_files(cwd, home, {}) == {"A": "home", "B": "cwd-ds", "C": "q"}
    override = tmp_path / "only"
    override.write_text("Z=1\n")
    assert mn.load_env_files(cwd, home, {"DS_ENV_FILE": str(override)}) == {"Z": "1"}
    with pytest.raises(LauncherError, match=r"\$SHARDSPEED_ENV_FILE names .*absent"):
        mn.load_env_files(cwd, home, {"SHARDSPEED_ENV_FILE": str(tmp_path / "absent")})


def test_env_file_bad_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / ".shardspeed_env").write_text("A=1\nnot a pair\n")
    with pytest.raises(LauncherError, match=r"\.shardspeed_env:2: expected `NAME=VALUE`"):
        mn.load_env_files(tmp_path, tmp_path, {})


def test_exported_env_and_visible_devices() -> None:
    environ = {"NCCL_IB_HCA": "mlx5", "PYTHONPATH": "/p", "HOME": "/h", "CUDA_VISIBLE_DEVICES": "0"}
    assert mn.exported_env(environ, {"PYTHONPATH": "/q"}) == {"NCCL_IB_HCA": "mlx5", "PYTHONPATH": "/q"}
    assert mn.visible_devices_env([0, 1]) == {}
    assert mn.visible_devices_env([2, 3]) == {"CUDA_VISIBLE_DEVICES": "2,3"}


# ---------------------------------------------------------------- per-rank entry


def test_entry_args_and_local_rank_placement() -> None:
    options = rank_entry.parse_entry_args(["--no_local_rank", "--", "--odd.py", "--x"])
    assert options == rank_entry.EntryOptions("--odd.py", ("--x",), "script", False)
    options = rank_entry.parse_entry_args(["--module", "--core_list=0-1", "pkg.mod", "a"])
    assert (options.mode, options.core_list, options.bind_cores) == ("module", "0-1", False)
    plain = rank_entry.parse_entry_args(["--", "t.py", "--some_arg", "x"])
    assert rank_entry.target_argv(plain, 3) == ["t.py", "--local_rank=3", "--some_arg", "x"]
    with pytest.raises(rank_entry.EntryError, match="cannot be used together"):
        rank_entry.parse_entry_args(["--module", "--no_python", "--", "x"])
    with pytest.raises(rank_entry.EntryError, match="unknown entry flag '--bogus'"):
        rank_entry.parse_entry_args(["--bogus", "--", "x"])
    with pytest.raises(rank_entry.EntryError, match="no target"):
        rank_entry.parse_entry_args(["--"])


def test_entry_parses_what_torchrun_hands_it() -> None:
    """torchrun's parser eats the first `--` after the entry module; the entry must still find the
    target, its flags and the user's own `--`."""
    from torch.distributed.run import get_args_parser

    spec = mn.LaunchSpec("t.py", ("--", "--x", "1"), no_local_rank=True)
    parsed = get_args_parser().parse_args(mn.torchrun_flags(spec, 1, 0, 2))
    assert (parsed.module, parsed.training_script) == (True, mn.ENTRY_MODULE)
    options = rank_entry.parse_entry_args(parsed.training_script_args)
    assert (options.target, options.args, options.local_rank_flag) == ("t.py", ("--", "--x", "1"), False)


def test_core_binding_shares() -> None:
    assert rank_entry.parse_core_list("0-3,8, 10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert rank_entry.cores_for_rank(list(range(8)), 1, 3) == [2, 3]
    with pytest.raises(rank_entry.EntryError, match="--bind_core_list '0-x'"):
        rank_entry.parse_core_list("0-x")
    with pytest.raises(rank_entry.EntryError, match="2 core\\(s\\) for 4 ranks"):
        rank_entry.cores_for_rank([0, 1], 0, 4)


@pytest.fixture
def rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """As torchrun would set it for rank 1; sys.argv / sys.path restored after the test."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_entry_runs_script_as_main(tmp_path: Path, rank_env: None) -> None:
    script = tmp_path / "sub" / "probe.py"
    script.parent.mkdir()
    out = tmp_path / "seen.txt"
    script.write_text(f"import sys\nopen({str(out)!r}, 'w').write(repr((__name__, sys.argv, sys.path[0])))\n")
    assert rank_entry.main(["--", str(script), "--a", "b"]) == 0
    assert out.read_text() == repr(("__main__", [str(script), "--local_rank=1", "--a", "b"], str(script.parent)))


def test_entry_runs_module_and_names_failing_rank(tmp_path: Path, rank_env: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "probe_mod_launcher.py").write_text(
        "import sys\nprint(__name__, sys.argv[1:])\nraise SystemExit(4)\n")
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        rank_entry.main(["--module", "--no_local_rank", "--", "probe_mod_launcher", "z"])
    out, err = capsys.readouterr()
    assert exc.value.code == 4 and out.strip() == "__main__ ['z']"
    assert "[shardspeed] rank 1 (local_rank 1) failed: exit status 4" in err


def test_entry_requires_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(rank_entry.EntryError, match=r"\$LOCAL_RANK is None"):
        rank_entry.main(["--", "x.py"])


# ---------------------------------------------------------------- subcommands and report


def test_subcommands_dispatch_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setitem(cli.SUBCOMMANDS, "zero-to-fp32", "unused:main")
    monkeypatch.setattr(cli, "load_subcommand", lambda name: lambda argv: seen.append([name, *argv]) or 7)
    assert cli.main(["zero-to-fp32", "ckpt", "out"]) == 7
    assert seen == [["zero-to-fp32", "ckpt", "out"]]
    assert cli.SUBCOMMANDS["report"] == "shardspeed.launcher.report:main"


def test_load_subcommand_report() -> None:
    assert cli.load_subcommand("report") is report.main


def test_feature_table_is_frozen() -> None:
    """Flipping a feature's status is a deliberate diff to this table."""
    available = {"config", "engine stage 0", "fp16/bf16", "launcher", "ZeRO stage 1/2", "ZeRO stage 3", "CPU offload",
                 "NVMe offload", "pipeline parallel", "tensor parallel"}
    not_yet = {"MoE", "inference engine"}
    assert report.FEATURES == {**{k: report.AVAILABLE for k in available}, **{k: report.NOT_YET for k in not_yet}}


def test_report_sections_and_hide_flags(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(report, "nvcc_version", lambda: "nvcc not found")
    assert report.main([]) == 0
    text = capsys.readouterr().out
    for needle in ("shardspeed features", "ZeRO stage 3 ", "[NO]   not yet", "launcher ", "[OKAY] available",
                   "torch version", "pydantic install path", "python version", "CUDA available",
                   "CUDA devices", "gloo ", "nccl ", "mpi ", "warnings"):
        assert needle in text, needle
    assert report.main(["--hide_operator_status", "--hide_errors_and_warnings"]) == 0
    text = capsys.readouterr().out
    assert "shardspeed features" not in text and "warnings" not in text and "torch version" in text


def test_environment_warnings() -> None:
    assert report.environment_warnings({"gloo": True, "nccl": True}, True, 2**30) == []
    found = report.environment_warnings({"gloo": True, "nccl": False}, True, 64 * 2**20)
    assert any("NCCL is not" in w for w in found) and any("/dev/shm is 64 MB" in w for w in found)


def test_wording_a_new_user_meets(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches messages that misstate what shardspeed does: a bare `shardspeed` demanding `user_args`,
    the report calling fp16 unavailable on CPU, zero-to-fp32 claiming ZeRO 0-2 only."""
    with pytest.raises(SystemExit):
        cli.main([])
    err = capsys.readouterr().err
    assert "give the training script to run" in err and "user_args" not in err and "report" in err
    assert not any("fp16 and GPU-only paths are skipped" in w for w in report.environment_warnings({"gloo": True}, False, 2**30))
    assert any("fp16 and bf16 train there too" in w for w in report.environment_warnings({"gloo": True}, False, 2**30))
    from shardspeed.checkpoint.zero_to_fp32 import build_parser

    help_text = build_parser().format_help()
    assert "ZeRO stage 0-3" in help_text and "ZeRO 0-2" not in help_text
