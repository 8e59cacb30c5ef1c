"""Accelerate on shardspeed through the `deepspeed` alias: the documented loop (prepare, accumulate,
backward, clip_grad_norm_, step) with DummyOptim + DummyScheduler and with a torch optimizer, with CPU
offload, launched by torchrun with a DeepSpeedPlugin and by `accelerate launch` (a DEEPSPEED config
file, and the --use_deepspeed flags), at world 2, gives the losses, gradient norms and final weights
(get_state_dict) of one plain process over the same batches; save_state / load_state replay the last
steps bit-identically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hf.launch import BIN, SCRIPTS, free_port, require_alias, run, torchrun, write_config

pytestmark = [pytest.mark.hf, pytest.mark.timeout(600)]

TOL = 1e-5
GAS, WORLD = 2, 2
SCRIPT = str(SCRIPTS / "accel_run.py")
BATCH = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "train_batch_size": "auto"}
# The config's optimizer with a constant schedule, as the reference's AdamW + constant LambdaLR.
CONFIG_OPTIMIZER = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": [0.9, 0.999],
                                                               "eps": 1e-8}},
                    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.01, "warmup_max_lr": "auto",
                                                                 "warmup_num_steps": "auto"}}}
ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {ds}
  zero3_init_flag: true
num_processes: {world}
num_machines: 1
machine_rank: 0
"""


class Loops:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, dict[str, Any]] = {}

    def get(self, name: str, command: list[str]) -> dict[str, Any]:
        if name not in self.done:
            out = self.root / name
            out.mkdir()
            self.done[name] = run([*command, "--out", str(out)], cwd=out)
            self.done[name]["final"] = torch.load(out / "final.pt")
        return self.done[name]

    def reference(self) -> dict[str, Any]:
        # One process accumulating GAS * WORLD micro-batches sees every rank's batches of a step.
        import sys

        return self.get("plain", [sys.executable, SCRIPT, "--plain", "--gas", str(GAS * WORLD)])

    def config(self, name: str, zero: dict[str, Any], dummy: bool) -> str:
        return write_config(self.root / f"{name}.json",
                            {**BATCH, "zero_optimization": zero, **(CONFIG_OPTIMIZER if dummy else {})})


@pytest.fixture(scope="module")
def loops(tmp_path_factory: pytest.TempPathFactory) -> Loops:
    require_alias()
    return Loops(tmp_path_factory.mktemp("accelerate"))


def check_against_reference(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert got["deepspeed"] is True and got["world"] == WORLD and ref["world"] == 1
    assert got["losses"] == pytest.approx(ref["losses"], abs=TOL)
    assert got["norms"] == pytest.approx(ref["norms"], abs=TOL)  # clip_grad_norm_ reports the engine's norm
    assert got["lr"] == pytest.approx(ref["lr"])
    half = len(got["losses"]) // 2
    assert got["replay_losses"] == got["losses"][half:]  # load_state: bit-identical replay
    assert got["replay_norms"] == got["norms"][half:]
    assert got["replay_final_identical"] is True
    assert got["final"].keys() == ref["final"].keys()
    for key, value in ref["final"].items():
        torch.testing.assert_close(got["final"][key], value, atol=TOL, rtol=0, msg=f"get_state_dict()[{key!r}]")
    initial = initial_weights()
    assert any(not torch.allclose(initial[k], v, atol=1e-3) for k, v in ref["final"].items())  # it trained


def initial_weights() -> dict[str, torch.Tensor]:
    """The script's model before training (accelerate's set_seed(0), then the tiny Llama)."""
    from accelerate.utils import set_seed
    from tests.hf.scripts.trainer_run import model_config
    from transformers import LlamaForCausalLM

    set_seed(0)
    return LlamaForCausalLM(model_config()).state_dict()


def test_plugin_dummy_optimizer_and_scheduler_zero2_cpu_offload(loops: Loops) -> None:
    ds = loops.config("z2_offload_dummy", {"stage": 2, "offload_optimizer": {"device": "cpu"}}, dummy=True)
    got = loops.get("z2_offload_dummy", [*torchrun(WORLD), SCRIPT, "--ds", ds, "--dummy"])
    check_against_reference(got, loops.reference())


def test_plugin_torch_optimizer_zero3(loops: Loops) -> None:
    ds = loops.config("z3_torch", {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}, dummy=False)
    got = loops.get("z3_torch", [*torchrun(WORLD), SCRIPT, "--ds", ds])
    check_against_reference(got, loops.reference())


def test_accelerate_launch_with_a_deepspeed_config_file_zero3_offload(loops: Loops) -> None:
    ds = loops.config("launch_z3_offload", {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                            "offload_param": {"device": "cpu"},
                                            "stage3_gather_16bit_weights_on_model_save": True}, dummy=True)
    config = loops.root / "accelerate_deepspeed.yaml"
    config.write_text(ACCELERATE_CONFIG.format(ds=ds, world=WORLD))
    got = loops.get("launch_z3_offload", [str(BIN / "accelerate"), "launch", "--config_file", str(config),
                                          "--main_process_port", str(free_port()), SCRIPT, "--dummy"])
    check_against_reference(got, loops.reference())


def test_accelerate_launch_use_deepspeed_flags_torch_optimizer_cpu_offload(loops: Loops) -> None:
    # accelerate swaps the torch AdamW for DeepSpeedCPUAdam under offload (shardspeed's, through the alias).
    got = loops.get("launch_flags_z2_offload", [
        str(BIN / "accelerate"), "launch", "--use_deepspeed", "--num_processes", str(WORLD), "--zero_stage", "2",
        "--offload_optimizer_device", "cpu", "--gradient_accumulation_steps", str(GAS), "--gradient_clipping", "1.0",
        "--main_process_port", str(free_port()), SCRIPT])
    check_against_reference(got, loops.reference())
