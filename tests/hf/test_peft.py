"""PEFT LoRA under the Hugging Face Trainer on shardspeed: ZeRO-1, 2 (with and without CPU optimizer
offload) and 3 at world 2 give the same losses as the same LoRA run under plain DDP; the frozen base
weights take no gradient or optimizer memory (memory_breakdown()); the adapter save_model writes loads
back with PEFT into the saved base model and reproduces the trained logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hf.launch import SCRIPTS, require_alias, run, save_tiny_llama, torchrun, write_config

pytestmark = [pytest.mark.hf, pytest.mark.timeout(600)]

TOL = 1e-5
WORLD = 2
SLACK_BYTES = 256  # partition padding (multiples of 4 elements per rank) and Adam's step counters
BATCH = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "train_batch_size": "auto"}
ZERO = {"z1": {"stage": 1}, "z2": {"stage": 2}, "z2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "z3": {"stage": 3, "stage3_param_persistence_threshold": "auto", "stage3_gather_16bit_weights_on_model_save": True}}


class LoraRuns:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, dict[str, Any]] = {}
        self.pretrained = save_tiny_llama(root / "pretrained")

    def get(self, name: str) -> dict[str, Any]:
        if name not in self.done:
            out = self.root / name
            out.mkdir()
            ds = [] if name == "ddp" else ["--ds", write_config(self.root / f"{name}.json",
                                                              {**BATCH, "zero_optimization": ZERO[name]})]
            self.done[name] = run([*torchrun(WORLD), str(SCRIPTS / "trainer_run.py"), "--out", str(out), "--lora",
                                   "--save_model", "--from_pretrained", str(self.pretrained), *ds], cwd=out)
            self.done[name]["out"] = out
        return self.done[name]


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> LoraRuns:
    require_alias()
    return LoraRuns(tmp_path_factory.mktemp("lora"))


@pytest.mark.parametrize("name", ["z1", "z2", "z2_offload", "z3"])
def test_lora_matches_ddp_and_frozen_base_takes_no_gradient_or_optimizer_memory(lora: LoraRuns, name: str) -> None:
    ref, got = lora.get("ddp"), lora.get(name)
    assert got["losses"] == pytest.approx(ref["losses"], abs=TOL)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], abs=TOL)
    assert ref["losses"][0] != pytest.approx(ref["losses"][-1], abs=1e-4)  # the adapters trained
    assert got["partitioned_at_load"] is (name == "z3")

    trainable_bytes = 4 * got["trainable"]
    memory = got["memory"]
    base_bytes = memory["parameters"] * (WORLD if name == "z3" else 1)
    assert trainable_bytes * 10 < base_bytes  # LoRA: the adapters are a small part of the model
    grads_expected = trainable_bytes if name == "z1" else trainable_bytes // WORLD  # stage 1 keeps whole gradients
    assert memory["gradients"] <= grads_expected + SLACK_BYTES
    optimizer = memory["optimizer_states"] + memory.get("cpu_optimizer_states", 0)
    assert 2 * trainable_bytes // WORLD <= optimizer <= 2 * trainable_bytes // WORLD + SLACK_BYTES  # Adam: 2 per element
    if name == "z2_offload":
        assert memory["optimizer_states"] == 0 and memory["cpu_optimizer_states"] > 0


@pytest.mark.parametrize("name", ["z2", "z3"])
def test_lora_adapter_saves_and_reloads_the_way_peft_expects(lora: LoraRuns, name: str) -> None:
    from peft import PeftModel
    from tests.hf.scripts.trainer_run import probe_ids
    from transformers import LlamaForCausalLM

    out = lora.get(name)["out"]
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter only, as PEFT saves it
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora.pretrained), final).eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids()).logits
    torch.testing.assert_close(logits, torch.load(out / "logits.pt"), atol=TOL, rtol=0)
