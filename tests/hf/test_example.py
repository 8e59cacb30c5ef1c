"""The guide's §12.1 example as shipped in examples/hf (Trainer + LoRA + ZeRO-2 with CPU optimizer offload,
its ds_zero2_config.json as written), launched as the guide launches it: the `deepspeed` command (the
alias's, i.e. shardspeed's launcher) with two processes, and `shardspeed` itself."""
from __future__ import annotations

import re

import pytest

from tests.hf.launch import BIN, REPO, require_alias, run_output

pytestmark = [pytest.mark.hf, pytest.mark.timeout(600)]

EXAMPLE = REPO / "examples" / "hf"


@pytest.mark.parametrize("launcher", ["deepspeed", "shardspeed"])
def test_guide_fine_tuning_example_runs_at_world_2(tmp_path, launcher: str) -> None:
    require_alias()
    out = tmp_path / "run"
    output = run_output([str(BIN / launcher), "--num_gpus", "2", str(EXAMPLE / "train_llama_lora.py"),
                         "--deepspeed", str(EXAMPLE / "ds_zero2_config.json"), "--output_dir", str(out),
                         "--max_steps", "2", "--examples", "128", "--max_length", "64"], cwd=tmp_path)
    assert "trainable params: 65,536" in output  # LoRA r=16 on q/k/v/o of the 4-layer model
    done = re.search(r"trained (\d+) steps in [\d.]+ s \((\d+) tokens/s\), final loss ([\d.]+)", output)
    assert done, output[-3000:]
    assert int(done.group(1)) == 2 and 0 < float(done.group(3)) < 20
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
