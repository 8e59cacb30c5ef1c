"""The `tensorboard`, `csv_monitor` and `wandb` writers: files on disk, ranks, missing packages."""
from __future__ import annotations

import glob
import json
import os
import struct
import time
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shardspeed.config.errors import ConfigError
from shardspeed.monitor import MonitorMaster, MonitorUnavailableError, csv_file_name

LOSS, LR = "Train/Samples/train_loss", "Train/Samples/lr"


def log_dir(tmp_path: Path, enabled: bool = True, job: str = "job") -> SimpleNamespace:
    return SimpleNamespace(enabled=enabled, output_path=str(tmp_path), job_name=job)


def wandb_section(enabled: bool = True) -> SimpleNamespace:
    return SimpleNamespace(enabled=enabled, group="g", team="t", project="p")


OFF = SimpleNamespace(enabled=False, output_path="", job_name="DeepSpeedJobName")
WANDB_OFF = wandb_section(False)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class FakeWandb(types.ModuleType):
    """Stands in for `wandb`: records init kwargs, logged rows and finish()."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, row, step=None):
                fake.logged.append((dict(row), step))

            def finish(self):
                fake.finished += 1

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    module = FakeWandb()
    module.__spec__ = importlib_spec("wandb")
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def importlib_spec(name: str):
    import importlib.machinery

    return importlib.machinery.ModuleSpec(name, loader=None)


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_events_read_back(tmp_path: Path) -> None:
    """Catches scalars that never reach the event file (wrong tag, step or missing flush)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = MonitorMaster(log_dir(tmp_path), OFF, WANDB_OFF, rank=0)
    assert monitor.enabled and monitor.writes
    for step in (1, 2, 3):
        monitor.write_events([(LOSS, 1.0 / step, step), (LR, 0.001 * step, step)])
    monitor.close()

    acc = EventAccumulator(str(tmp_path / "job"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {LOSS, LR}
    loss = acc.Scalars(LOSS)
    assert [e.step for e in loss] == [1, 2, 3]
    # event files store float32: compare at float32 precision
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1.0 / 3], rel=1e-6)
    assert [e.value for e in acc.Scalars(LR)] == pytest.approx([0.001, 0.002, 0.003], rel=1e-6)


def test_tensorboard_flushes_every_call(tmp_path: Path) -> None:
    """Catches events held in memory until close(): a crashed run would lose them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = MonitorMaster(log_dir(tmp_path), OFF, WANDB_OFF, rank=0)
    monitor.write_events([(LOSS, 2.5, 7)])
    acc = EventAccumulator(str(tmp_path / "job"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars(LOSS)] == [(7, 2.5)]
    monitor.close()


def test_tensorboard_default_dir_is_job_name_in_launch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's default output_path "" puts `DeepSpeedJobName/` in the launch directory."""
    monkeypatch.chdir(tmp_path)
    section = SimpleNamespace(enabled=True, output_path="", job_name="DeepSpeedJobName")
    monitor = MonitorMaster(section, OFF, WANDB_OFF, rank=0)
    monitor.write_events([(LOSS, 1.0, 1)])
    monitor.close()
    assert os.listdir(tmp_path) == ["DeepSpeedJobName"]
    assert glob.glob(str(tmp_path / "DeepSpeedJobName" / "events.out.tfevents.*"))


def test_accepts_the_parsed_config_sections(tmp_path: Path) -> None:
    """Catches a mismatch between the writers and the pydantic sections the engine passes."""
    from shardspeed.config.sections import CSVMonitorConfig, TensorBoardConfig, WandbConfig

    tb = TensorBoardConfig(enabled=True, output_path=str(tmp_path / "tb"), job_name="j")
    csv_cfg = CSVMonitorConfig(enabled=True, output_path=str(tmp_path / "csv"), job_name="j")
    monitor = MonitorMaster(tb, csv_cfg, WandbConfig(), rank=0)
    monitor.write_events([(LOSS, 0.5, 1)])
    monitor.close()
    assert glob.glob(str(tmp_path / "tb" / "j" / "events.out.tfevents.*"))
    assert (tmp_path / "csv" / "j" / "Train_Samples_train_loss.csv").exists()


# ---------------------------------------------------------------- CSV


def test_csv_contents_exact(tmp_path: Path) -> None:
    """Catches a changed file name, header or row format (scripts parse these files)."""
    monitor = MonitorMaster(OFF, log_dir(tmp_path), WANDB_OFF, rank=0)
    monitor.write_events([(LOSS, 0.5, 1), (LR, 0.001, 1)])
    monitor.write_events([(LOSS, 0.25, 2), (LR, 0.002, 2), ("Train/Samples/loss_scale", 65536, 2)])
    monitor.close()

    job = tmp_path / "job"
    assert sorted(os.listdir(job)) == [
        "Train_Samples_loss_scale.csv",
        "Train_Samples_lr.csv",
        "Train_Samples_train_loss.csv",
    ]
    # csv.writer ends rows with \r\n, as DeepSpeed's files do
    assert (job / "Train_Samples_train_loss.csv").read_bytes() == b"step,train_loss\r\n1,0.5\r\n2,0.25\r\n"
    assert (job / "Train_Samples_lr.csv").read_bytes() == b"step,lr\r\n1,0.001\r\n2,0.002\r\n"
    assert (job / "Train_Samples_loss_scale.csv").read_bytes() == b"step,loss_scale\r\n2,65536\r\n"


def test_csv_file_names_are_safe() -> None:
    """Catches a name that escapes the job folder or is invalid on some file system."""
    assert csv_file_name("Train/Samples/tokens_per_second") == "Train_Samples_tokens_per_second.csv"
    assert csv_file_name("eval loss") == "eval_loss.csv"
    assert csv_file_name("../a\\b:c*d?e") == ".._a_b_c_d_e.csv"
    assert csv_file_name("loss") == "loss.csv"
    with pytest.raises(ValueError, match="non-empty"):
        csv_file_name("")


def test_csv_plain_name_and_tensor_value(tmp_path: Path) -> None:
    """Catches `tensor(0.2500)` written instead of the number, and headers for slash-free names."""
    monitor = MonitorMaster(OFF, log_dir(tmp_path), WANDB_OFF, rank=0)
    monitor.write_events([("loss", torch.tensor(0.25), 3)])
    monitor.close()
    assert (tmp_path / "job" / "loss.csv").read_bytes() == b"step,loss\r\n3,0.25\r\n"


def test_csv_resumed_run_gets_no_second_header(tmp_path: Path) -> None:
    """Catches a header row in the middle of the file after a restart."""
    for step in (1, 2):
        monitor = MonitorMaster(OFF, log_dir(tmp_path), WANDB_OFF, rank=0)
        monitor.write_events([(LOSS, float(step), step)])
        monitor.close()
    assert (tmp_path / "job" / "Train_Samples_train_loss.csv").read_bytes() == b"step,train_loss\r\n1,1.0\r\n2,2.0\r\n"


def test_csv_names_sharing_a_file_raise(tmp_path: Path) -> None:
    """Catches two metrics silently interleaved in one file."""
    monitor = MonitorMaster(OFF, log_dir(tmp_path), WANDB_OFF, rank=0)
    monitor.write_events([("a/b", 1.0, 1)])
    with pytest.raises(ValueError, match="`a/b` and `a b`"):
        monitor.write_events([("a b", 2.0, 1)])
    monitor.close()


# ---------------------------------------------------------------- ranks, disabled sections


def test_rank_nonzero_writes_nothing(tmp_path: Path, fake_wandb: FakeWandb) -> None:
    """Catches every rank writing its own copy of the metrics."""
    monitor = MonitorMaster(log_dir(tmp_path), log_dir(tmp_path), wandb_section(), rank=1)
    assert monitor.enabled  # same answer on every rank, so it can gate collective work
    assert not monitor.writes
    monitor.write_events([(LOSS, 1.0, 1)])
    monitor.close()
    assert all_files(tmp_path) == []
    assert fake_wandb.inits == [] and fake_wandb.logged == []


def test_disabled_backends_create_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wandb: FakeWandb) -> None:
    """Catches folders or runs created for sections that are off."""
    monkeypatch.chdir(tmp_path)
    monitor = MonitorMaster(OFF, OFF, WANDB_OFF, rank=0)
    assert not monitor.enabled and not monitor.writes
    monitor.write_events([(LOSS, 1.0, 1)])
    monitor.close()
    none = MonitorMaster(None, None, None, rank=0)
    assert not none.enabled
    assert all_files(tmp_path) == []
    assert fake_wandb.inits == []


def test_only_the_enabled_backend_writes(tmp_path: Path) -> None:
    """Catches a CSV-only config also producing TensorBoard event files."""
    monitor = MonitorMaster(log_dir(tmp_path, enabled=False), log_dir(tmp_path), WANDB_OFF, rank=0)
    monitor.write_events([(LOSS, 1.0, 1)])
    monitor.close()
    monitor.close()  # a second close is harmless
    assert all_files(tmp_path) == ["job", "job/Train_Samples_train_loss.csv"]


# ---------------------------------------------------------------- missing packages


@pytest.mark.parametrize("rank", [0, 1])
def test_missing_tensorboard_names_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rank: int) -> None:
    """Catches a bare ImportError (or a hang: only rank 0 failing) when tensorboard is absent."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MonitorUnavailableError, match=r"`tensorboard.enabled`.*pip install tensorboard") as info:
        MonitorMaster(log_dir(tmp_path), OFF, WANDB_OFF, rank=rank)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ImportError)
    assert all_files(tmp_path) == []


@pytest.mark.parametrize("rank", [0, 1])
def test_missing_wandb_names_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rank: int) -> None:
    """Catches a bare ImportError when `wandb.enabled` is set and wandb is not installed."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MonitorUnavailableError, match=r"`wandb.enabled`.*pip install wandb"):
        MonitorMaster(OFF, log_dir(tmp_path), wandb_section(), rank=rank)
    assert all_files(tmp_path) == []  # checked before any writer opens: no CSV folder either


def test_missing_packages_do_not_matter_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches an import of tensorboard or wandb for sections that are off."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    MonitorMaster(OFF, OFF, WANDB_OFF, rank=0).close()


# ---------------------------------------------------------------- W&B


def test_wandb_init_and_log_calls(fake_wandb: FakeWandb) -> None:
    """Catches wrong init arguments (team must be the entity) or rows logged at the wrong step."""
    monitor = MonitorMaster(OFF, OFF, wandb_section(), rank=0)
    monitor.write_events([(LOSS, 0.5, 1), (LR, 0.1, 1)])
    monitor.write_events([(LOSS, torch.tensor(0.25), 2)])
    monitor.close()
    assert fake_wandb.inits == [{"project": "p", "group": "g", "entity": "t"}]
    assert fake_wandb.logged == [({LOSS: 0.5, LR: 0.1}, 1), ({LOSS: 0.25}, 2)]
    assert fake_wandb.finished == 1


def _wandb_history(run_file: str) -> dict[int, dict[str, object]]:
    """Rows logged to an offline `.wandb` file, by step.

    The file is a LevelDB-style log (7-byte header, 32 KiB blocks, records split into
    first/middle/last chunks with a 7-byte chunk header) of `wandb_internal_pb2.Record`s. This is
    wandb's internal format: if a wandb release changes it, fix this reader, not the writer.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full record, or the last chunk of one
            records.append(chunk)
            chunk = b""
    rows: dict[int, dict[str, object]] = {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            rows[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


def test_wandb_offline_run_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a writer that never starts a real run or loses rows (real wandb, offline)."""
    pytest.importorskip("wandb")
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(var, value)
    monitor = MonitorMaster(OFF, OFF, wandb_section(), rank=0)
    monitor.write_events([(LOSS, 0.5, 1), (LR, 0.125, 1)])
    monitor.write_events([(LOSS, 0.25, 2), (LR, 0.25, 2)])
    monitor.close()

    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    # wandb's service process may still be flushing the file on a loaded machine: give it time.
    expected = {1: {LOSS: 0.5, LR: 0.125}, 2: {LOSS: 0.25, LR: 0.25}}
    deadline = time.monotonic() + 30
    while _wandb_history(runs[0]) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _wandb_history(runs[0]) == expected
