"""`shardspeed zero-to-fp32`: checkpoints of ZeRO stages 0-2 at world size 2, fp32 and bf16, turned
into one fp32 state dict that a bare model loads strictly, with tied weights, frozen parameters and
buffers; tag choice, frozen exclusion and damaged files."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import shardspeed
from shardspeed.checkpoint import (
    convert_zero_checkpoint_to_fp32_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
    load_state_dict_from_zero_checkpoint,
)
from shardspeed.launcher import cli
from shardspeed.runtime.checkpoint_io import CheckpointError
from tests.harness import run_distributed

VOCAB, DIM, SEQ, MICRO, STEPS, WORLD = 24, 16, 6, 2, 3, 2
STAGES = (0, 1, 2)
TRAINABLE = ("embed.weight", "hidden.weight", "hidden.bias", "out.weight")
FROZEN = ("frozen.weight", "frozen.bias")
BUFFERS = ("gain", "calls")
ALIASES = {"out.weight": "embed.weight"}


class TiedNet(nn.Module):
    """Input embedding tied to the output projection, a frozen layer, a float and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.frozen = nn.Linear(DIM, DIM)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(DIM, VOCAB, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("gain", torch.linspace(0.5, 1.5, DIM))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.embed(tokens) * self.gain
        h = torch.tanh(self.hidden(h))
        h = self.frozen(h) + h
        logits = self.out(h).float()
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def _config(stage: int, precision: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
    }


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, VOCAB, (MICRO * WORLD, SEQ), generator=g),
             torch.randint(0, VOCAB, (MICRO * WORLD, SEQ), generator=g)) for _ in range(STEPS)]


def _cpu_state(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def _fp32_masters(engine) -> dict[str, torch.Tensor]:
    """Full fp32 master weights by name, read from the live optimizer (gathered across ranks at stages
    1-2), independently of the checkpoint files."""
    strategy = engine.strategy
    if engine.zero_optimization_stage() == 0:
        return {strategy.names[p]: strategy.masters.get(p, p).detach().float().clone() for p in strategy.params}
    masters = {}
    for layout, master in zip(strategy.layouts, strategy.masters):
        own = master.detach().contiguous()
        parts = [torch.empty_like(own) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, own)
        flat = torch.cat(parts)
        for slot in layout.slots:
            masters[slot.name] = flat[slot.offset:slot.end].view(slot.shape).clone()
    return masters


def _train_and_save(root: str, precision: str) -> dict | None:
    """Per stage: train STEPS steps, save tag `early` after the first and the default tag at the end."""
    rank = dist.get_rank()
    results = {}
    for stage in STAGES:
        torch.manual_seed(0)
        engine, *_ = shardspeed.initialize(model=TiedNet(), config=_config(stage, precision))
        assert engine.module.out.weight is engine.module.embed.weight
        ckpt = f"{root}/stage{stage}"
        for step, (tokens, targets) in enumerate(_batches()):
            lo = rank * MICRO
            engine.backward(engine(tokens[lo:lo + MICRO], targets[lo:lo + MICRO]))
            engine.step()
            if step == 0:
                engine.save_checkpoint(ckpt, tag="early")
                early = _cpu_state(engine)
        engine.save_checkpoint(ckpt)
        masters = _fp32_masters(engine)  # a collective: every rank takes part
        results[stage] = {"dir": ckpt, "early": early, "final": _cpu_state(engine), "masters": masters}
        engine.destroy()
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """precision -> {stage: rank 0's result}; each precision trains once per module, on first use."""
    cache: dict[str, dict] = {}

    def get(precision: str) -> dict:
        if precision not in cache:
            root = tmp_path_factory.mktemp(f"ckpt_{precision}")
            cache[precision] = run_distributed(_train_and_save, WORLD, root / "run", str(root), precision)[0]
        return cache[precision]

    return get


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in a fresh interpreter (proves the subcommand is registered)."""
    return subprocess.run([sys.executable, "-m", "shardspeed.launcher.cli", "zero-to-fp32", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _convert(ckpt: str, out: Path, capsys, *flags: str, fresh_process: bool = False) -> dict[str, torch.Tensor]:
    if fresh_process:
        done = _cli(ckpt, out, *flags)
        assert done.returncode == 0, done.stderr
        printed = done.stdout
    else:  # same dispatch (cli.SUBCOMMANDS -> main(argv)) without paying a torch import per call
        assert cli.main(["zero-to-fp32", ckpt, str(out), *flags]) == 0
        printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and " tensors, " in printed and " bytes" in printed
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "output mode as a plain open() would give it"
    return _read(out)


def _check_converted(conv: dict, run: dict, precision: str, where: str) -> None:
    final, masters = run["final"], run["masters"]
    assert set(conv) == set(final), where
    for name in TRAINABLE:
        assert conv[name].dtype == torch.float32, (where, name)
        assert torch.equal(conv[name], masters[ALIASES.get(name, name)]), (where, name)
    for name in FROZEN:
        assert conv[name].dtype == torch.float32 and torch.equal(conv[name], final[name].float()), (where, name)
    for name in BUFFERS:
        assert torch.equal(conv[name].to(final[name].dtype), final[name]), (where, name)
    assert torch.equal(conv["out.weight"], conv["embed.weight"]), where
    if precision == "fp32":
        for name, value in final.items():
            assert torch.equal(conv[name], value), (where, name)
    else:
        for name in TRAINABLE:
            assert torch.equal(conv[name].to(torch.bfloat16), final[name]), (where, name)
        # Catches a converter that only upcasts the bf16 module weights instead of reading the masters.
        assert any(not torch.equal(conv[n], final[n].float()) for n in TRAINABLE), where
    model = TiedNet()
    model.load_state_dict(conv, strict=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, conv[name].to(value.dtype)), (where, name)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cli_writes_the_fp32_master_weights_of_every_stage(trained, tmp_path, capsys, precision):
    """Catches shards merged in the wrong order, 16-bit weights passed off as fp32 masters, a lost tied
    alias, frozen parameters or buffers left out, or output a bare model cannot load strictly."""
    runs = trained(precision)
    for stage in STAGES:
        run = runs[stage]
        for suffix in (".safetensors", ".bin"):
            out = tmp_path / f"stage{stage}" / f"model{suffix}"
            conv = _convert(run["dir"], out, capsys, fresh_process=(stage == 2 and suffix == ".safetensors"))
            _check_converted(conv, run, precision, f"stage {stage} {suffix}")


@pytest.mark.timeout(180)
def test_tag_selects_a_checkpoint_other_than_latest(trained, tmp_path, capsys):
    """Catches -t/--tag being ignored (always reading `latest`)."""
    run = trained("fp32")[1]
    early = _convert(run["dir"], tmp_path / "early.bin", capsys, "-t", "early")
    latest = _convert(run["dir"], tmp_path / "latest.bin", capsys)
    for name, value in run["early"].items():
        assert torch.equal(early[name], value), name
    assert not torch.equal(early["hidden.weight"], latest["hidden.weight"])
    assert torch.equal(latest["hidden.weight"], run["final"]["hidden.weight"])


@pytest.mark.timeout(180)
def test_exclude_frozen_parameters_drops_frozen_keys_only(trained, tmp_path, capsys):
    """Catches frozen parameters kept, or buffers/trainable parameters dropped, by --exclude_frozen_parameters;
    and buffers not kept as saved (bf16 here)."""
    run = trained("bf16")[2]
    model_state = torch.load(Path(run["dir"], "global_step3", "mp_rank_00_model_states.pt"), weights_only=False)
    assert "buffer_names" in model_state
    conv = _convert(run["dir"], tmp_path / "model.safetensors", capsys, "--exclude_frozen_parameters")
    assert set(conv) == set(run["final"]) - set(FROZEN)
    assert conv["gain"].dtype == torch.bfloat16 and torch.equal(conv["gain"], run["final"]["gain"])
    assert conv["calls"].dtype == torch.long and int(conv["calls"]) == STEPS
    assert all(conv[name].dtype == torch.float32 for name in TRAINABLE)


@pytest.mark.timeout(180)
def test_damaged_rank_file_is_named_and_nothing_is_written(trained, tmp_path):
    """Catches a corrupt shard converting silently, or a half-written output left behind."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained("fp32")[1]["dir"], ckpt)
    victim = ckpt / "global_step3" / "rank_1_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    out = tmp_path / "out" / "model.safetensors"
    done = _cli(ckpt, out)
    assert done.returncode != 0
    assert str(victim) in done.stderr and "corrupt" in done.stderr
    assert not out.exists() and not list(tmp_path.rglob(".model.safetensors.tmp*"))


@pytest.mark.timeout(180)
def test_python_api(trained, tmp_path):
    """Catches the Python API diverging from the command line: strict load into a bare model, tied
    aliases sharing one tensor, `.pt` output through torch.save."""
    run = trained("bf16")[1]
    model = TiedNet()
    assert load_state_dict_from_zero_checkpoint(model, run["dir"]) is model
    assert model.out.weight is model.embed.weight
    for name in TRAINABLE:
        assert torch.equal(model.state_dict()[name], run["masters"][ALIASES.get(name, name)]), name
    state = get_fp32_state_dict_from_zero_checkpoint(run["dir"])
    assert list(state) == list(run["final"]), "keys in the module's order"
    assert state["out.weight"] is state["embed.weight"]
    convert_zero_checkpoint_to_fp32_state_dict(run["dir"], tmp_path / "model.pt", tag="global_step3")
    saved = _read(tmp_path / "model.pt")
    assert all(torch.equal(saved[k], v) for k, v in state.items())


@pytest.mark.timeout(180)
def test_missing_paths_are_named(trained, tmp_path):
    """Catches a bad directory, a missing `latest` or an unknown tag failing with an unhelpful error."""
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=re.escape(f"`{missing}` does not exist")):
        get_fp32_state_dict_from_zero_checkpoint(missing)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained("fp32")[0]["dir"], ckpt)
    with pytest.raises(CheckpointError, match=r"global_step9.*does not exist.*tags in .*: early, global_step3"):
        get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="global_step9")
    (ckpt / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"no `latest` file in .*ckpt.*-t/--tag "
                                              r"\(tags there: early, global_step3\)"):
        get_fp32_state_dict_from_zero_checkpoint(ckpt)
    # The tag folder itself (a common slip) is read as that tag.
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt / "early")
    assert torch.equal(state["hidden.weight"], trained("fp32")[0]["early"]["hidden.weight"])
