"""The opt-in `deepspeed` distribution (integrations/deepspeed-alias): a pure mapping of deepspeed.* onto
shardspeed.*, a version that claims only the DeepSpeed API mirrored, console commands that are
shardspeed's, and an installer that will not replace a real DeepSpeed."""
from __future__ import annotations

import importlib
import importlib.metadata

import pytest

import shardspeed
from shardspeed.launcher import alias
from tests.hf.launch import require_alias

pytestmark = pytest.mark.hf


@pytest.fixture(autouse=True)
def _alias_installed() -> None:
    require_alias()


@pytest.mark.parametrize("name", ["runtime.lr_schedules", "comm", "utils", "runtime.zero.partition_parameters",
                                  "checkpoint.utils", "launcher.runner", "accelerator", "ops.adam", "zero"])
def test_every_deepspeed_module_is_the_shardspeed_module(name: str) -> None:
    assert importlib.import_module(f"deepspeed.{name}") is importlib.import_module(f"shardspeed.{name}")


def test_top_level_names_and_version() -> None:
    import deepspeed

    assert deepspeed.initialize is shardspeed.initialize and deepspeed.zero.Init is shardspeed.zero.Init
    assert deepspeed.__version__ == importlib.metadata.version("deepspeed") == "0.19.8+shardspeed." + shardspeed.__version__
    with pytest.raises(ModuleNotFoundError, match="deepspeed.no_such_module"):
        importlib.import_module("deepspeed.no_such_module")


def test_hugging_face_libraries_see_deepspeed() -> None:
    from accelerate.utils import is_deepspeed_available as accelerate_sees
    from transformers.integrations.deepspeed import is_deepspeed_available as transformers_sees

    assert transformers_sees() and accelerate_sees()


def test_console_commands_are_shardspeeds() -> None:
    scripts = {e.name: e.value for e in importlib.metadata.distribution("deepspeed").entry_points
               if e.group == "console_scripts"}
    assert scripts == {"deepspeed": "shardspeed.launcher.cli:main", "ds": "shardspeed.launcher.cli:main",
                       "ds_report": "shardspeed.launcher.report:main"}


def test_installer_refuses_to_replace_a_real_deepspeed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(alias, "installed_deepspeed", lambda: "0.19.8")
    assert alias.main([]) == 1
    err = capsys.readouterr().err
    assert "DeepSpeed 0.19.8 is installed" in err and "separate environment" in err and "pip uninstall deepspeed" in err


def test_installer_reinstalls_over_its_own_alias(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(alias, "installed_deepspeed", lambda: "0.19.8+shardspeed.0.0.9")
    assert alias.main(["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "would run:" in out and str(alias.alias_source()) in out and "--no-deps" in out
