"""ZeRO stage 3 from the user's side: `zero.Init` builds exactly the parameters of a whole build while
no rank ever holds the whole model, `GatheredParameters`, consolidated 16-bit weights and
`save_16bit_model`, checkpoints that resume bit for bit and load across stages and world sizes,
`zero-to-fp32` of a stage-3 checkpoint, and the 16Ψ/N model-state promise."""
from __future__ import annotations

import gc
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import shardspeed
from shardspeed.checkpoint import get_fp32_state_dict_from_zero_checkpoint
from shardspeed.zero import GatheredParameters, ParameterNotGatheredError
from shardspeed.zero.param_shards import shard_of
from tests.memory import current_rss, fixed_mmap_threshold, peak_rss
from tests.harness import run_distributed
from tests.models import Deep, TinyNet, make_batches, rank_slice

THRESHOLD = 40  # parameters below 40 elements stay whole (persistent); everything else is partitioned
VOCAB, DIM, SEQ, MICRO, STEPS = 24, 16, 6, 2, 3


def _config(precision: str = "fp32", stage: int = 3, threshold: int = THRESHOLD, **zero: object) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": threshold, **zero},
        "bf16": {"enabled": precision == "bf16"},
    }


class Tied(nn.Module):
    """Embedding tied to the output projection, persistent (small) and partitioned parameters, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.out = nn.Linear(DIM, VOCAB, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("gain", torch.linspace(0.5, 1.5, DIM))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(tokens) * self.gain
        h = self.norm(torch.tanh(self.hidden(h)))
        logits = self.out(h).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


# ---- the spawned runs ----------------------------------------------------------------------------
# Starting a rank costs seconds (torch, torch._dynamo for the optimizer, gloo), so the checks share
# three runs: world 4, and two at world 2. Each run executes named jobs in order; a job that raises is
# returned as its traceback and fails only the tests that read it. The RSS job runs first in its
# process, because the peak RSS of a process never goes down.
def _jobs(jobs: list[tuple[str, object, tuple]]) -> dict:
    out = {}
    for name, fn, args in jobs:
        try:
            out[name] = fn(*args)
        except Exception:
            out[name] = traceback.format_exc()
        gc.collect()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(name)` -> per-rank {job: result}; each run happens once per module, on first use."""
    root = tmp_path_factory.mktemp("zero3")
    ckpt = {k: str(root / k) for k in ("w4_stage3", "w2_stage1", "w2_stage3", "save16", "inference")}
    cache: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in cache:
            if name == "w4":
                jobs = [("memory", _memory_run, ()), ("original", _original, (ckpt["w4_stage3"],))]
                cache[name] = run_distributed(_jobs, 4, root / name, jobs, deadline=240)
            elif name == "w2_models":
                jobs = [*((kind, _init_checks, (kind,)) for kind in MODELS), ("save16", _save16_checks, (ckpt["save16"],)),
                        ("gathered", _gathered_checks, ()), ("inference", _inference_checks, (ckpt["inference"],))]
                cache[name] = run_distributed(_jobs, 2, root / name, jobs, deadline=240)
            elif name == "w2_rest":
                get("w4")  # writes the world-4 checkpoint
                jobs = [("memory", _memory_run, ()),
                        ("checkpoints", _at_world2, (ckpt["w4_stage3"], ckpt["w2_stage1"], ckpt["w2_stage3"]))]
                cache[name] = run_distributed(_jobs, 2, root / name, jobs, deadline=240)
        return cache[name]

    get.ckpt = ckpt
    return get


def _job(per_rank: list[dict], job: str) -> list:
    """Each rank's result of `job`; a rank on which it raised fails the test with its traceback."""
    for rank, results in enumerate(per_rank):
        if isinstance(results[job], str):
            pytest.fail(f"{job} raised on rank {rank}:\n{results[job]}")
    return [results[job] for results in per_rank]


# ---- the models of the zero.Init equivalence test --------------------------------------------------
MODELS = ("tied", "gpt2", "example_gpt")


def _build(kind: str) -> nn.Module:
    if kind == "tied":
        return Tied()
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=DIM, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    from examples.gpt import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, num_layers=2, hidden_size=DIM, num_heads=2))


def _loss(kind: str, model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if kind == "gpt2":
        return model(input_ids=tokens, labels=tokens).loss
    return model(tokens, targets)


def _logits(kind: str, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=tokens) if kind == "gpt2" else model(tokens)
    return (out.logits if kind == "gpt2" else out).detach().float().clone()


def _token_batches(steps: int, world: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (MICRO * world, SEQ), generator=g),
             torch.randint(0, VOCAB, (MICRO * world, SEQ), generator=g)) for _ in range(steps)]


def _train_lm(kind: str, engine, batches) -> list[float]:
    rank = dist.get_rank()
    losses = []
    for tokens, targets in batches:
        lo = rank * MICRO
        loss = _loss(kind, engine, tokens[lo:lo + MICRO], targets[lo:lo + MICRO])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _init_checks(kind: str) -> dict:
    """Build `kind` whole and under zero.Init with the same seed; compare shards, consolidated weights,
    a bare model loaded from them, and training."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = _config()
    torch.manual_seed(0)
    whole = _build(kind)
    whole_state = {k: v.detach().clone() for k, v in whole.state_dict().items()}
    torch.manual_seed(0)
    with shardspeed.zero.Init(config_dict_or_path=cfg):
        model = _build(kind)
    shards = {}
    for name, p in model.named_parameters():
        ref = whole.get_parameter(name).detach().reshape(-1)
        shard = p.ds_tensor.numel()
        shards[name] = {"empty": p.data.numel() == 0, "ds_shape": tuple(p.ds_shape) == tuple(whole.get_parameter(name).shape),
                        "ds_numel": p.ds_numel == ref.numel(), "mine": torch.equal(p.ds_tensor, shard_of(ref, shard, rank))}
    try:
        next(model.parameters()).sum()
        touched_raises = False
    except ParameterNotGatheredError:
        touched_raises = True

    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    consolidated = engine._zero3_consolidated_16bit_state_dict()
    tokens = _token_batches(1, 1, seed=3)[0][0]
    with torch.no_grad():
        engine_logits = _logits(kind, engine, tokens)
    bare_logits, load_error = None, None
    if rank == 0:
        bare = _build(kind)
        try:
            bare.load_state_dict(consolidated, strict=True)
            with torch.no_grad():
                bare_logits = _logits(kind, bare, tokens)
        except Exception:  # reported by the test, with the whole traceback
            load_error = traceback.format_exc()

    reference, *_ = shardspeed.initialize(model=whole, model_parameters=whole.parameters(), config=cfg)
    batches = _token_batches(STEPS, world)
    torch.manual_seed(1)
    from_init = _train_lm(kind, engine, batches)
    torch.manual_seed(1)
    from_whole = _train_lm(kind, reference, batches)
    final_init = engine._zero3_consolidated_16bit_state_dict()
    final_whole = reference._zero3_consolidated_16bit_state_dict()
    return {
        "shards": shards, "touched_raises": touched_raises, "consolidated": consolidated, "whole": whole_state,
        "engine_logits": engine_logits, "bare_logits": bare_logits, "load_error": load_error,
        "from_init": from_init, "from_whole": from_whole, "final_init": final_init, "final_whole": final_whole,
    }


def _stage3_masters(engine) -> dict[str, torch.Tensor]:
    """Full fp32 master weights by name, gathered from the live optimizer (a collective)."""
    world = dist.get_world_size()
    masters = {}
    for unit in engine.strategy.state_dict()["units"]:
        own = unit["master"].detach().contiguous()
        parts = [torch.empty_like(own) for _ in range(world)]
        dist.all_gather(parts, own)
        for name, numel, shape, offset, shard in unit["slots"]:
            whole = torch.cat([part[offset:offset + shard] for part in parts])
            masters[name] = whole[:numel].view(shape).clone()
    return masters


def _save16_checks(root: str) -> dict:
    """bf16 at stage 3: consolidated weights, save_16bit_model with and without the gather flag, and a
    checkpoint for zero-to-fp32."""
    world = dist.get_world_size()
    cfg = _config("bf16", stage3_gather_16bit_weights_on_model_save=True)
    torch.manual_seed(0)
    with shardspeed.zero.Init(config_dict_or_path=cfg):
        model = Tied()
    init_dtypes = sorted({str(p.ds_tensor.dtype) for p in model.parameters()} | {str(model.gain.dtype)})
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    _train_lm("tied", engine, _token_batches(2, world))
    consolidated = engine._zero3_consolidated_16bit_state_dict()
    tokens = _token_batches(1, 1, seed=3)[0][0]
    with torch.no_grad():
        engine_logits = _logits("tied", engine, tokens)
    wrote = engine.save_16bit_model(f"{root}/with_flag", "model.bin")
    masters = _stage3_masters(engine)
    engine.save_checkpoint(f"{root}/ckpt")

    plain = _config("bf16")
    torch.manual_seed(0)
    with shardspeed.zero.Init(config_dict_or_path=plain):
        other = Tied()
    engine2, *_ = shardspeed.initialize(model=other, model_parameters=other.parameters(), config=plain)
    wrote_without_flag = engine2.save_16bit_model(f"{root}/without_flag", "model.bin")
    dist.barrier()
    files_without_flag = sorted(str(p) for p in Path(root, "without_flag").rglob("*")) if Path(root, "without_flag").exists() else []
    return {"init_dtypes": init_dtypes, "consolidated": consolidated, "engine_logits": engine_logits, "wrote": wrote, "masters": masters,
            "wrote_without_flag": wrote_without_flag, "files_without_flag": files_without_flag}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", MODELS)
def test_zero_init_builds_the_whole_models_parameters_and_trains_the_same(runs, kind):
    """Catches zero.Init changing initialisation (another order of random numbers, a child re-initialised
    after partitioning and lost, rank-dependent values), shards cut wrongly, parameters left whole, an
    untouchable parameter being readable, or a zero.Init model training differently from a whole one."""
    per_rank = _job(runs("w2_models"), kind)
    for rank, r in enumerate(per_rank):
        for name, checks in r["shards"].items():
            assert all(checks.values()), (rank, name, checks)
        assert r["touched_raises"], "reading a partitioned parameter outside forward must raise ParameterNotGatheredError"
        # Same engine arithmetic on the same weights: bit for bit.
        assert r["from_init"] == r["from_whole"], (rank, r["from_init"], r["from_whole"])
    r = per_rank[0]
    assert per_rank[1]["consolidated"] is None, "only rank 0 receives the consolidated state dict"
    assert list(r["consolidated"]) == list(r["whole"]), "same keys in the module's order"
    for name, value in r["whole"].items():
        assert torch.equal(r["consolidated"][name], value), name
    for name, value in r["final_whole"].items():
        assert torch.equal(r["final_init"][name], value), name


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", MODELS)
def test_consolidated_state_dict_loads_strictly_into_a_bare_model_with_the_same_outputs(runs, kind):
    """Catches a consolidated state dict with missing/extra keys, wrong shapes (padded or flat shards),
    or values that make a bare model compute something else than the engine."""
    r = _job(runs("w2_models"), kind)[0]
    assert r["load_error"] is None, r["load_error"]
    torch.testing.assert_close(r["bare_logits"], r["engine_logits"], rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(240)
def test_save_16bit_model_needs_the_gather_flag_and_loads_into_a_bare_model(runs):
    """Catches save_16bit_model writing partial (shard) weights, writing without
    stage3_gather_16bit_weights_on_model_save, or a bf16 state dict a bare model cannot load; and
    zero.Init ignoring the config's bf16 section."""
    per_rank = _job(runs("w2_models"), "save16")
    root = Path(runs.ckpt["save16"])
    r0 = per_rank[0]
    for rank, r in enumerate(per_rank):
        assert r["init_dtypes"] == ["torch.bfloat16"], "zero.Init takes the dtype from the config's bf16 section"
        assert r["wrote"] is True, rank
        assert r["wrote_without_flag"] is False, rank
        assert r["files_without_flag"] == [], (rank, r["files_without_flag"])
    assert per_rank[1]["consolidated"] is None
    consolidated = r0["consolidated"]
    assert consolidated["hidden.weight"].dtype == torch.bfloat16
    assert torch.equal(consolidated["out.weight"], consolidated["embed.weight"])
    bare = Tied().to(torch.bfloat16)
    bare.load_state_dict(consolidated, strict=True)
    with torch.no_grad():
        logits = _logits("tied", bare, _token_batches(1, 1, seed=3)[0][0])
    torch.testing.assert_close(logits, r0["engine_logits"], rtol=0, atol=0)
    saved = torch.load(root / "with_flag" / "model.bin", map_location="cpu", weights_only=True)
    assert set(saved) == set(consolidated)
    for name, value in consolidated.items():
        assert saved[name].dtype == value.dtype and torch.equal(saved[name], value), name
    fresh = Tied().to(torch.bfloat16)
    fresh.load_state_dict(saved, strict=True)


@pytest.mark.timeout(240)
def test_zero_to_fp32_of_a_bf16_stage3_checkpoint_gives_the_fp32_masters(runs):
    """Catches stage-3 shards merged in the wrong order or with padding, or 16-bit weights passed off as
    the fp32 masters, by the zero-to-fp32 consolidation."""
    r0 = _job(runs("w2_models"), "save16")[0]
    conv = get_fp32_state_dict_from_zero_checkpoint(Path(runs.ckpt["save16"], "ckpt"))
    assert set(conv) == set(r0["consolidated"])
    for name, master in r0["masters"].items():
        assert conv[name].dtype == torch.float32 and torch.equal(conv[name], master), name
        assert torch.equal(conv[name].to(torch.bfloat16), r0["consolidated"][name]), name
    assert torch.equal(conv["out.weight"], conv["embed.weight"])
    assert any(not torch.equal(conv[n], r0["consolidated"][n].float()) for n in r0["masters"])
    model = Tied()
    model.load_state_dict(conv, strict=True)


# ---- zero.Init memory bound ------------------------------------------------------------------------
LAYERS, WIDTH = 8, 2048
MB = 2 ** 20


def _stack() -> nn.Module:
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def _construction_memory() -> dict | None:
    if not fixed_mmap_threshold():
        return None  # not glibc: the measure would be the allocator's, not zero.Init's
    cfg = _config()
    torch.manual_seed(0)
    # Warm-up: code paths and the buffers of a first broadcast, small enough not to raise the peak.
    with shardspeed.zero.Init(config_dict_or_path=cfg):
        warm = nn.Linear(256, 256)
    del warm
    gc.collect()
    before = peak_rss()
    with shardspeed.zero.Init(config_dict_or_path=cfg):
        partitioned = _stack()
    init_peak_growth = peak_rss() - before
    shard_bytes = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in partitioned.parameters())
    held = current_rss()
    whole = _stack()  # the partitioned model stays alive, so little freed memory is there to reuse
    whole_growth = current_rss() - held
    whole_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
    return {"init_peak_growth": init_peak_growth, "whole_growth": whole_growth, "shard_bytes": shard_bytes,
            "whole_bytes": whole_bytes, "layer_bytes": whole_bytes // LAYERS}


def _breakdown(precision: str) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "bf16": {"enabled": precision == "bf16"}}
    torch.manual_seed(0)
    with shardspeed.zero.Init(config_dict_or_path=cfg):
        model = Deep()
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    engine.backward(engine(torch.randn(4, 64).to(dtype)))
    engine.step()
    return {"breakdown": engine.memory_breakdown(), "psi": sum(p.ds_numel for p in model.parameters())}


def _memory_run() -> dict:
    out: dict = {}
    try:
        out["construction"] = _construction_memory()
    except Exception:
        out["construction"] = traceback.format_exc()
    gc.collect()
    out["breakdown"] = {precision: _breakdown(precision) for precision in ("bf16", "fp32")}
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_zero_init_never_holds_the_whole_model(runs, world):
    """Catches zero.Init partitioning only after the whole model was built (or not at all), or keeping
    gathered copies: the peak RSS growth while building under zero.Init must stay near Ψ/N plus one
    layer, while the same build done whole grows by the whole model in the same kind of process."""
    for rank, r in enumerate(_job(runs("w4" if world == 4 else "w2_rest"), "memory")):
        if isinstance(r["construction"], str):
            pytest.fail(f"rank {rank}:\n{r['construction']}")
        m = r["construction"]
        if m is None:
            pytest.skip("needs glibc's mallopt to make RSS follow the live tensors")
        whole, layer = m["whole_bytes"], m["layer_bytes"]
        assert m["shard_bytes"] <= whole / world * 1.01, m
        # The measure itself sees a whole build.
        assert m["whole_growth"] >= 0.8 * whole, (rank, {k: v / MB for k, v in m.items()})
        # This rank's shards, one whole layer being initialised, and a little slack (gloo, allocator).
        bound = whole / world + 1.25 * layer + 6 * MB
        assert m["init_peak_growth"] <= bound, (rank, bound / MB, {k: v / MB for k, v in m.items()})
        assert m["init_peak_growth"] <= 0.75 * m["whole_growth"], (rank, {k: v / MB for k, v in m.items()})


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_stage3_model_states_are_16_psi_over_n(runs, world, precision):
    """Catches replicated (or doubled) parameters, gradients, masters or optimizer states at stage 3:
    parameters + gradients + master weights + optimizer states = 16Ψ/N bytes per rank with AdamW, for bf16
    (2 + 2 + 4 + 8) and for fp32 (4 + 4 + 0 + 8: the fp32 partitions are the masters)."""
    for rank, r in enumerate(_job(runs("w4" if world == 4 else "w2_rest"), "memory")):
        b, psi = r["breakdown"][precision]["breakdown"], r["breakdown"][precision]["psi"]
        expected = 16 * psi / world
        total = b["parameters"] + b["gradients"] + b["master_weights"] + b["optimizer_states"]
        assert abs(total - expected) <= 0.05 * expected, (rank, b, expected)
        assert b["persistent_parameters"] == 0, b
        k = 2 if precision == "bf16" else 4
        assert abs(b["parameters"] - k * psi / world) <= 0.05 * k * psi / world, b
        assert abs(b["gradients"] - k * psi / world) <= 0.05 * k * psi / world, b
        if precision == "fp32":
            assert b["master_weights"] == 0, b
        else:
            assert abs(b["master_weights"] - 4 * psi / world) <= 0.05 * 4 * psi / world, b
        assert abs(b["optimizer_states"] - 8 * psi / world) <= 0.05 * 8 * psi / world, b


# ---- GatheredParameters ----------------------------------------------------------------------------
def test_gathered_parameters_on_unpartitioned_parameters_is_a_noop():
    """Catches GatheredParameters needing a process group, copying, or changing parameters that ZeRO-3
    does not partition (plain module, no engine)."""
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptr = model.fc1.weight.data_ptr()
    with GatheredParameters(model.fc1.weight):
        assert model.fc1.weight.shape == (32, 16) and model.fc1.weight.data_ptr() == ptr
    with GatheredParameters(model.parameters()):
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with GatheredParameters(list(model.parameters()), modifier_rank=0):
        with torch.no_grad():
            model.fc1.weight[0].fill_(1.5)
    assert model.fc1.weight.data_ptr() == ptr and type(model.fc1.weight) is nn.Parameter
    assert torch.equal(model.fc1.weight[0], torch.full((16,), 1.5))
    assert torch.equal(model.fc1.weight[1:], before["fc1.weight"][1:])
    for name, value in before.items():
        if name != "fc1.weight":
            assert torch.equal(model.state_dict()[name], value), name


def _gathered_engine(precision: str, seed: int = 0):
    cfg = _config(precision)
    torch.manual_seed(seed)
    with shardspeed.zero.Init(config_dict_or_path=cfg):
        model = TinyNet()
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _train_tiny(engine, batches) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    dtype = next(engine.module.parameters()).dtype
    for batch in batches:
        x, y = rank_slice(batch, rank, world, MICRO, 1, 0)
        loss = engine(x.to(dtype), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _gathered_checks() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {}
    torch.manual_seed(0)
    whole = TinyNet()
    engine = _gathered_engine("fp32")
    m = engine.module
    w, b = m.fc1.weight, m.fc1.bias  # 512 elements (partitioned) and 32 (persistent)
    out["outside"] = (tuple(w.shape), tuple(w.ds_shape), w.data.numel())

    def raises() -> bool:
        try:
            w.sum()
        except ParameterNotGatheredError:
            return True
        return False

    out["raises_before"] = raises()
    with GatheredParameters(w):
        out["single"] = (tuple(w.shape), torch.equal(w.data, whole.fc1.weight.data))
    out["raises_after_single"] = raises()
    with GatheredParameters(list(m.parameters())):
        out["list"] = {n: (tuple(p.shape), torch.equal(p.data, whole.get_parameter(n).data)) for n, p in m.named_parameters()}
    out["raises_after_list"] = raises()

    # Without modifier_rank, edits do not reach the shards.
    with GatheredParameters([w, m.fc2.weight]):
        with torch.no_grad():
            w.fill_(9.0)
            m.fc2.weight[0].fill_(9.0)
    with GatheredParameters([w, m.fc2.weight]):
        out["discarded"] = (torch.equal(w.data, whole.fc1.weight.data), torch.equal(m.fc2.weight.data, whole.fc2.weight.data))

    # With modifier_rank=0, rank 0's edits reach every rank (other ranks' edits are overwritten).
    with GatheredParameters([w, b], modifier_rank=0):
        with torch.no_grad():
            w[3].fill_(0.5 if rank == 0 else -7.0)
            b[5] = 0.25 if rank == 0 else -3.0
    with GatheredParameters(w):
        out["kept_row"] = w[3].detach().clone()
    out["kept_bias"] = b[5].item()  # persistent: readable outside
    out["after_edit"] = engine._zero3_consolidated_16bit_state_dict()

    # The edit survives training: same losses and weights as a stage-0 run that started from the edited model.
    with torch.no_grad():
        whole.fc1.weight[3].fill_(0.5)
        whole.fc1.bias[5] = 0.25
    reference, *_ = shardspeed.initialize(model=whole, config=_config(stage=0))
    batches = make_batches(2, MICRO * world)
    out["losses"] = _train_tiny(engine, batches)
    out["reference_losses"] = _train_tiny(reference, batches)
    out["trained"] = engine._zero3_consolidated_16bit_state_dict()
    out["reference_trained"] = {k: v.detach().clone() for k, v in reference.module.state_dict().items()}

    # bf16: the fp32 masters must take the edit too, or the next step overwrites it.
    engine16 = _gathered_engine("bf16")
    w16, b16 = engine16.module.fc1.weight, engine16.module.fc1.bias
    with GatheredParameters([w16, b16], modifier_rank=0):
        with torch.no_grad():
            w16[3].fill_(0.5 if rank == 0 else -7.0)
            b16[5] = 0.25 if rank == 0 else -3.0
    _train_tiny(engine16, batches[:1])
    out["bf16_trained"] = engine16._zero3_consolidated_16bit_state_dict()
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [1, 2])
def test_gathered_parameters(runs, tmp_path, world):
    """Catches GatheredParameters not giving whole parameters (shape or values), not releasing them again,
    keeping edits made without modifier_rank, losing (or not broadcasting) the modifier rank's edits, edits
    of persistent parameters not reaching their shards, and edits that the next step overwrites because
    the optimizer's masters were not refreshed (bf16)."""
    per_rank = _job(runs("w2_models"), "gathered") if world == 2 else run_distributed(_gathered_checks, 1, tmp_path, deadline=90)
    for rank, r in enumerate(per_rank):
        assert r["outside"] == ((0,), (32, 16), 0), r["outside"]
        assert r["raises_before"] and r["raises_after_single"] and r["raises_after_list"]
        assert r["single"] == ((32, 16), True)
        for name, (shape, equal) in r["list"].items():
            assert equal and shape == tuple(TinyNet().get_parameter(name).shape), name
        assert r["discarded"] == (True, True), "edits without modifier_rank must be discarded"
        assert torch.equal(r["kept_row"], torch.full((16,), 0.5)), (rank, r["kept_row"])
        assert r["kept_bias"] == 0.25, rank
        assert r["losses"] == pytest.approx(r["reference_losses"], rel=1e-5), (r["losses"], r["reference_losses"])
        if rank == 0:
            assert torch.equal(r["after_edit"]["fc1.weight"][3], torch.full((16,), 0.5))
            assert r["after_edit"]["fc1.bias"][5].item() == 0.25
            for name, value in r["reference_trained"].items():
                torch.testing.assert_close(r["trained"][name], value, rtol=1e-5, atol=1e-6, msg=name)
            # One AdamW step moves a weight by about lr = 1e-2; the initial values are within ±0.25.
            row = r["bf16_trained"]["fc1.weight"][3].float()
            assert ((row - 0.5).abs() < 0.05).all(), row
            assert abs(r["bf16_trained"]["fc1.bias"][5].float().item() - 0.25) < 0.05


def _inference_checks(root: str) -> dict:
    """Stage 3 with no optimizer (inference), on a model built by zero.Init over an explicit process group."""
    cfg = {k: v for k, v in _config().items() if k != "optimizer"}
    torch.manual_seed(0)
    whole = TinyNet()
    torch.manual_seed(0)
    with shardspeed.zero.Init(config_dict_or_path=cfg, data_parallel_group=dist.new_group(list(range(dist.get_world_size())))):
        model = TinyNet()
    partitioned = all(p.numel() == 0 for p in model.parameters() if p.ds_numel >= THRESHOLD)
    engine, optimizer, _, _ = shardspeed.initialize(model=model, config=cfg)
    x, y = make_batches(1, 8)[0]
    with torch.no_grad():
        loss, expected = engine(x, y).item(), whole(x, y).item()
    try:
        engine.backward(engine(x, y))
        backward_error = ""
    except RuntimeError as err:
        backward_error = str(err)
    engine.save_checkpoint(root, tag="t")
    torch.manual_seed(1)
    other, *_ = shardspeed.initialize(model=TinyNet(), config=cfg)
    other.load_checkpoint(root, tag="t")
    restored = other._zero3_consolidated_16bit_state_dict()
    return {"partitioned": partitioned, "optimizer": optimizer, "loss": loss, "expected": expected,
            "backward_error": backward_error, "memory": engine.memory_breakdown(), "restored": restored,
            "whole": {k: v.detach().clone() for k, v in whole.state_dict().items()}}


@pytest.mark.timeout(240)
def test_stage3_without_an_optimizer_serves_inference_and_checkpoints(runs):
    """Catches stage 3 needing an optimizer to partition (inference, reference models), zero.Init refusing an
    explicit data_parallel_group, or checkpoints of such an engine failing to save or load."""
    for rank, r in enumerate(_job(runs("w2_models"), "inference")):
        assert r["partitioned"] and r["optimizer"] is None
        assert r["loss"] == pytest.approx(r["expected"], rel=1e-6)
        assert "needs an optimizer" in r["backward_error"]
        assert r["memory"]["optimizer_states"] == 0 and r["memory"]["gradients"] == 0
        if rank == 0:
            for name, value in r["whole"].items():
                assert torch.equal(r["restored"][name], value), name


# ---- checkpoints: same-layout resume, any layout, zero-to-fp32 ------------------------------------
GLOBAL, GAS = 16, 2


def _ckpt_engine(seed: int, stage: int):
    cfg = {
        "train_batch_size": GLOBAL, "gradient_accumulation_steps": GAS, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 20, "warmup_num_steps": 4, "warmup_max_lr": 1e-2}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": THRESHOLD,
                              "reduce_bucket_size": 300, "allgather_bucket_size": 500},
    }
    torch.manual_seed(seed)
    if stage == 3:
        with shardspeed.zero.Init(config_dict_or_path=cfg):
            model = TinyNet()
    else:
        model = TinyNet()
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _global_losses(engine, batches, noise: bool = False) -> list[float]:
    """Mean loss of each global batch; with `noise` the torch RNG (restored by a resume) perturbs the inputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = GLOBAL // (GAS * world)
    out = []
    for batch in batches:
        total = torch.zeros(())
        for m in range(GAS):
            x, y = rank_slice(batch, rank, world, micro, GAS, m)
            if noise:
                x = x + 0.1 * torch.randn_like(x)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        out.append(total.item() / (GAS * world))
    return out


BATCHES = 8


def _original(ckpt: str) -> list[float]:
    """World 4, stage 3: two steps, save, three more."""
    batches = make_batches(BATCHES, GLOBAL)
    engine = _ckpt_engine(0, 3)
    _global_losses(engine, batches[:2])
    engine.save_checkpoint(ckpt)
    return _global_losses(engine, batches[2:5])


def _at_world2(ckpt: str, via_stage1: str, via_stage3: str) -> dict:
    """World 2: stage 1 loads the world-4 stage-3 checkpoint and saves it again; stage 3 loads that,
    trains, saves and trains on (noisy inputs); a fresh stage-3 engine resumes from that save."""
    batches = make_batches(BATCHES, GLOBAL)
    stage1 = _ckpt_engine(99, 1)
    stage1.load_checkpoint(ckpt)
    stage1.save_checkpoint(via_stage1)
    stage1_losses = _global_losses(stage1, batches[2:5])

    stage3 = _ckpt_engine(7, 3)
    stage3.load_checkpoint(via_stage1)
    stage3_losses = _global_losses(stage3, batches[2:5])
    stage3.save_checkpoint(via_stage3, client_state={"epoch": 3})
    at_save = stage3._zero3_consolidated_16bit_state_dict()
    continued = _global_losses(stage3, batches[5:], noise=True)
    final = stage3._zero3_consolidated_16bit_state_dict()

    fresh = _ckpt_engine(123, 3)  # other initial weights: everything must come from the checkpoint
    _, client = fresh.load_checkpoint(via_stage3)
    resumed = _global_losses(fresh, batches[5:], noise=True)
    return {
        "via_stage1": stage1_losses, "via_stage3": stage3_losses, "at_save": at_save, "continued": continued,
        "final": final, "state": (stage3.global_steps, stage3.global_samples, stage3.micro_steps, stage3.get_lr()),
        "client": client, "resumed": resumed, "resumed_final": fresh._zero3_consolidated_16bit_state_dict(),
        "resumed_state": (fresh.global_steps, fresh.global_samples, fresh.micro_steps, fresh.get_lr()),
    }


@pytest.mark.timeout(300)
def test_stage3_checkpoints_load_across_stages_and_world_sizes(runs):
    """Catches stage-3 shards (weights or optimizer states) mis-assembled when the layout changes, in
    either direction: stage 3 at world 4 -> stage 1 at world 2 -> stage 3 at world 2."""
    original = torch.tensor(_job(runs("w4"), "original")[0])
    r = _job(runs("w2_rest"), "checkpoints")[0]
    # Same weights and states; only the order of fp32 sums differs between layouts.
    torch.testing.assert_close(torch.tensor(r["via_stage1"]), original, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(r["via_stage3"]), original, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(300)
def test_stage3_resume_at_the_same_layout_is_bit_exact(runs):
    """Catches stage-3 partitions, optimizer states, LR schedule, counters or RNG saved or restored
    inexactly, or a fresh engine's own initial weights leaking into the resumed run."""
    per_rank = _job(runs("w2_rest"), "checkpoints")
    for rank, r in enumerate(per_rank):
        assert r["client"] == {"epoch": 3}, rank
        assert r["resumed"] == r["continued"], (rank, r["resumed"], r["continued"])
        assert r["resumed_state"] == r["state"], rank
    r = per_rank[0]
    for name, value in r["final"].items():
        assert torch.equal(r["resumed_final"][name], value), name


@pytest.mark.timeout(300)
def test_zero_to_fp32_of_a_stage3_checkpoint_equals_the_consolidated_weights(runs):
    """Catches zero-to-fp32 mis-merging stage-3 shards (order, padding) or dropping buffers."""
    at_save = _job(runs("w2_rest"), "checkpoints")[0]["at_save"]
    conv = get_fp32_state_dict_from_zero_checkpoint(runs.ckpt["w2_stage3"])
    assert list(conv) == list(at_save)
    for name, value in at_save.items():
        assert conv[name].dtype == torch.float32 and torch.equal(conv[name], value), name
    model = TinyNet()
    model.load_state_dict(conv, strict=True)
