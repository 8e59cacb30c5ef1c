"""The Hugging Face Trainer on shardspeed through the `deepspeed` alias: ZeRO-2 and ZeRO-3 at world 1 and 2
give the Trainer's plain (DDP) losses, with the Trainer's optimizer and with the config's; resume is
bit-identical; save_model output loads into plain transformers; ZeRO-3 partitions at from_pretrained;
evaluate() works before train().

Every run is a real `torchrun` of tests/hf/scripts/trainer_run.py (the Trainer's own launch path), from
the same saved random Llama; runs shared by several tests are made once per module.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hf.launch import SCRIPTS, require_alias, run, run_failing, save_tiny_llama, torchrun, write_config

pytestmark = [pytest.mark.hf, pytest.mark.timeout(600)]

TOL = 1e-5
LR = 1e-2
BATCH = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "train_batch_size": "auto", "steps_per_print": float("inf")}
ZERO = {2: {"stage": 2, "reduce_bucket_size": 5000},
        3: {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto", "stage3_gather_16bit_weights_on_model_save": True}}
# The config's optimizer and a constant schedule (warmup_min_lr = the Trainer's lr), against the Trainer's
# own run with lr_scheduler_type="constant" and no weight decay: the config's AdamW decays every parameter,
# the Trainer's only the non-norm, non-bias ones.
CONFIG_OPTIMIZER = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                               "weight_decay": "auto"}},
                    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": LR, "warmup_max_lr": "auto",
                                                                 "warmup_num_steps": "auto"}}}
OPTIMIZER_ARGS = {"trainer": ["--wd", "0.01", "--sched", "linear"], "config": ["--wd", "0.0", "--sched", "constant"]}


class Runs:
    """Trainer runs of one module, each made once, from one saved random model."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, dict[str, Any]] = {}
        self.pretrained = save_tiny_llama(root / "pretrained")

    def config(self, stage: int, optimizer: str) -> str:
        config = {**BATCH, "zero_optimization": ZERO[stage], **(CONFIG_OPTIMIZER if optimizer == "config" else {})}
        return write_config(self.root / f"z{stage}_{optimizer}.json", config)

    def trainer(self, name: str, world: int, *args: str, out: Path | None = None) -> dict[str, Any]:
        if name not in self.done:
            out = out or self.root / name
            out.mkdir(parents=True, exist_ok=True)
            self.done[name] = run([*torchrun(world), str(SCRIPTS / "trainer_run.py"), "--out", str(out),
                                   "--from_pretrained", str(self.pretrained), *args], cwd=out)
            self.done[name]["out"] = str(out)
        return self.done[name]

    def ddp(self, world: int, optimizer: str) -> dict[str, Any]:
        # No evaluate() first here: at world 2 the plain Trainer then trains without averaging gradients
        # across ranks (transformers 5.25 on CPU/gloo), which is not the reference we want.
        return self.trainer(f"ddp_w{world}_{optimizer}", world, *OPTIMIZER_ARGS[optimizer])

    def eval_loss(self) -> float:
        """The Trainer's eval_loss of the untrained model, computed here: the mean of its batches' mean losses."""
        from tests.hf.scripts.trainer_run import Tokens
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(self.pretrained).eval()
        ids = Tokens(8, 2).ids
        with torch.no_grad():
            return torch.stack([model(input_ids=b, labels=b).loss for b in ids.split(2)]).mean().item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    require_alias()
    return Runs(tmp_path_factory.mktemp("trainer"))


@pytest.mark.parametrize("optimizer", ["trainer", "config"])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_matches_plain_ddp(runs: Runs, stage: int, world: int, optimizer: str) -> None:
    ref = runs.ddp(world, optimizer)
    got = runs.trainer(f"z{stage}_w{world}_{optimizer}", world, "--ds", runs.config(stage, optimizer),
                       *OPTIMIZER_ARGS[optimizer])
    assert got["world"] == world and got["steps"] == ref["steps"] == 3
    assert len(got["losses"]) == 3
    assert got["losses"] == pytest.approx(ref["losses"], abs=TOL)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], abs=TOL)
    assert ref["losses"][0] != pytest.approx(ref["losses"][-1], abs=1e-3)  # it trained
    # ZeRO-3: the Trainer's arguments switch on zero.Init, so from_pretrained loads straight into shards.
    assert got["partitioned_at_load"] is (stage == 3)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_checkpoint_is_bit_identical_and_save_model_loads_into_transformers(runs: Runs, stage: int) -> None:
    ds = runs.config(stage, "trainer")
    first = runs.trainer(f"z{stage}_resume_first", 2, "--ds", ds, "--steps", "4", "--save_steps", "2", "--save_model")
    resumed_out = runs.root / f"z{stage}_resume_second"
    resumed_out.mkdir()
    shutil.copytree(Path(first["out"]) / "checkpoint-2", resumed_out / "checkpoint-2")
    resumed = runs.trainer(f"z{stage}_resume_second", 2, "--ds", ds, "--steps", "4", "--resume", out=resumed_out)
    assert resumed["steps"] == first["steps"] == 4
    assert resumed["losses"] == first["losses"]  # exact: steps 3 and 4 replayed from the step-2 checkpoint
    assert resumed["grad_norms"] == first["grad_norms"]

    from tests.hf.scripts.trainer_run import probe_ids
    from transformers import LlamaForCausalLM

    final = Path(first["out"]) / "final"
    plain = LlamaForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        logits = plain(input_ids=probe_ids()).logits
    trained = torch.load(Path(first["out"]) / "logits.pt")
    torch.testing.assert_close(logits, trained, atol=TOL, rtol=0)
    untrained = LlamaForCausalLM.from_pretrained(runs.pretrained).eval()
    with torch.no_grad():
        assert not torch.allclose(untrained(input_ids=probe_ids()).logits, trained, atol=1e-3)


def test_zero3_evaluate_before_training(runs: Runs) -> None:
    """evaluate() first builds an engine without an optimizer, which ignores the config's optimizer and
    scheduler sections, on weights partitioned at load."""
    got = runs.trainer("z3_eval_only", 2, "--eval_first", "--ds", runs.config(3, "config"))
    assert got["partitioned_at_load"] is True
    assert got["eval_before"] == pytest.approx(runs.eval_loss(), abs=TOL)


def test_zero3_train_after_evaluate_on_one_trainer_says_what_to_do(runs: Runs) -> None:
    """transformers 5.25 then trains through the evaluation engine that its own train() destroyed (with real
    DeepSpeed 0.19.8 it fails too, in accelerate's backward); shardspeed says so instead of a gather error."""
    out = runs.root / "z3_eval_then_train"
    out.mkdir()
    output = run_failing([*torchrun(1), str(SCRIPTS / "trainer_run.py"), "--out", str(out), "--from_pretrained",
                          str(runs.pretrained), "--eval_first", "--then_train", "--ds", runs.config(3, "trainer")], cwd=out)
    assert "engine.forward(): this engine was destroyed" in output
    assert "train first (evaluate() after train() works)" in output
