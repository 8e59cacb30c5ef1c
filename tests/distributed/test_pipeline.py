"""Pipeline parallelism equals the unpipelined model trained by the plain engine, step for step.

Every scenario builds a `PipelineModule` and, on the same ranks, the same layers as one plain module
trained by the plain engine (data parallel over every rank) on the same global batches. Layers are
built with `seed_layers`, so both start from the same weights. All scenarios of a world size run in
one spawned job (spawning dominates on this machine).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import shardspeed
from shardspeed.config import ConfigError
from shardspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec, load_layer_states
from shardspeed.pipe.partition import partition_balanced
from tests.harness import ScenarioRuns, run_named

V, H, C, T = 16, 16, 4, 5  # vocabulary, width, classes, tokens per sample
BLOCKS = 6
MICRO, GAS, STEPS = 2, 4, 3
CLIP = 0.5  # small enough that clipping is active on every step (checked)
SEED = 1234
DEADLINE = 150.0


# ---- the models ---------------------------------------------------------------------------------------
class EmbedTuple(nn.Module):
    """Token ids -> (hidden, gate, ids): a tuple with two floating tensors and an integer one."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, H)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.emb(ids)
        return h, torch.ones_like(h), ids


class TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(H, H)
        self.gate = nn.Parameter(torch.zeros(H))

    def forward(self, x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, g, ids = x
        return h + torch.tanh(self.lin(h)) * g, g * torch.sigmoid(self.gate) * 2, ids


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.lin(h))


def _pool(x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    h, g, ids = x
    mask = (ids % 2 == 0).unsqueeze(-1).to(h.dtype)  # the integer tensor crossed the stages too
    return (h * g * mask).sum(1) / mask.sum(1).clamp(min=1)


def _as_head(embedding: nn.Embedding, h: torch.Tensor) -> torch.Tensor:
    return h @ embedding.weight.t()


def _class_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), y)


def _token_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float().reshape(-1, V), y.reshape(-1))


def _specs(kind: str) -> list[Any]:
    if kind == "tuple":  # tuples between stages; the pooling layer is a plain function
        return [LayerSpec(EmbedTuple), *[LayerSpec(TupleBlock) for _ in range(BLOCKS)], _pool, LayerSpec(nn.Linear, H, C)]
    return [TiedLayerSpec("embed", nn.Embedding, V, H), *[LayerSpec(Block) for _ in range(BLOCKS)],
            TiedLayerSpec("embed", nn.Embedding, V, H, forward_fn=_as_head)]


LOSS = {"tuple": _class_loss, "tied": _token_loss}


class Fn(nn.Module):
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Any) -> Any:
        return self.fn(x)


class Plain(nn.Module):
    """The same layers as one module, built with the same per-layer seeds; forward(x, y) -> loss."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        layers, tied = [], {}
        for idx, spec in enumerate(_specs(kind)):
            torch.manual_seed(SEED + idx)
            if isinstance(spec, TiedLayerSpec):
                module = tied.setdefault(spec.key, spec.build())
                layers.append(module if spec.forward_fn is None else Fn(functools.partial(spec.forward_fn, module)))
            else:
                layers.append(spec.build() if isinstance(spec, LayerSpec) else Fn(spec))
        self.layers = nn.ModuleList(layers)
        self.loss_fn = LOSS[kind]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.loss_fn(x, y)


def _plain_name(kind: str, name: str) -> str:
    """A pipeline parameter's name in `Plain` ("3.lin.weight" -> "layers.3.lin.weight")."""
    return "layers.0.weight" if name == "tied_modules.embed.weight" else f"layers.{name}"


# ---- data and configs -------------------------------------------------------------------------------
def _batches(kind: str, steps: int, size: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    labels = (size,) if kind == "tuple" else (size, T)
    return [(torch.randint(0, V, (size, T), generator=g), torch.randint(0, C if kind == "tuple" else V, labels, generator=g))
            for _ in range(steps)]


def _micro(batch: tuple[torch.Tensor, torch.Tensor], replica: int, gas: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = (replica * gas + m) * MICRO
    return batch[0][start:start + MICRO], batch[1][start:start + MICRO]


def _config(gas: int, stage: int = 0, precision: dict | None = None, clip: float = CLIP) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 500}, **(precision or {})}


def _pipeline(kind: str, stages: int, gas: int, stage: int = 0, precision: dict | None = None, seed: int = SEED,
              schedule: str = "1f1b", clip: float = CLIP):
    net = PipelineModule(_specs(kind), loss_fn=LOSS[kind], num_stages=stages, seed_layers=True, base_seed=seed,
                         partition_method="uniform" if kind == "tied" else "type:block")
    engine, _, _, _ = shardspeed.initialize(model=net, model_parameters=[p for p in net.parameters() if p.requires_grad],
                                            config={**_config(gas, stage, precision, clip), "pipeline": {
                                                **(precision or {}).get("pipeline", {}), "schedule": schedule}})
    assert engine.pipeline_schedule == schedule
    return engine


def _data_iter(engine, batches: list, gas: int):
    replica = engine.get_data_parallel_rank()
    return iter([_micro(b, replica, gas, m) for b in batches for m in range(gas)])


def _named(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def _train_pipeline(engine, batches: list, gas: int) -> tuple[list[float], list[float]]:
    it = _data_iter(engine, batches, gas)
    losses, norms = [], []
    for _ in batches:
        losses.append(engine.train_batch(it).item())
        norms.append(engine.get_global_grad_norm())
    return losses, norms


def _train_plain(kind: str, batches: list, precision: dict | None = None, stage: int = 0) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    gas = len(batches[0][0]) // (MICRO * world)
    engine, _, _, _ = shardspeed.initialize(model=Plain(kind), config=_config(gas, stage, precision))
    losses, norms = [], []
    for batch in batches:
        step = 0.0
        for m in range(gas):
            x, y = _micro(batch, rank, gas, m)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            step += loss.item() / gas
        total = torch.tensor(step)
        dist.all_reduce(total)
        losses.append(total.item() / world)
        norms.append(engine.get_global_grad_norm())
    return {"losses": losses, "norms": norms, "params": {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}}


# ---- scenarios ---------------------------------------------------------------------------------------
def _equivalence(kind: str, stages: int, stage: int = 0, precision: dict | None = None, reduce_scatter: bool = False) -> dict:
    """Pipeline and plain engine on the same global batches."""
    dp = dist.get_world_size() // stages
    batches = _batches(kind, STEPS, MICRO * GAS * dp)
    engine = _pipeline(kind, stages, GAS, stage, precision)
    if reduce_scatter:
        from shardspeed.comm.collectives import CommPolicy

        engine.strategy.reducer.policy = CommPolicy.native()  # NCCL's reduce-scatter (only the owned partition is reduced), on gloo
    losses, norms = _train_pipeline(engine, batches, GAS)
    tied = [w.detach().float().clone() for _, w in engine.module.tied_weights()]
    return {"losses": losses, "norms": norms, "params": {_plain_name(kind, n): v for n, v in _named(engine).items()},
            "stage": engine.stage_id, "tied": tied, "plain": _train_plain(kind, batches, precision, stage),
            "parts": engine.module.parts}


def _schedules() -> dict:
    """1F1B, GPipe and 1F1B with activation checkpointing on the same data: bitwise equal.

    Backwards run in the same micro-batch order in every schedule, and recomputing a checkpointed
    forward without dropout gives the same values.
    """
    batches = _batches("tuple", 2, MICRO * GAS)
    out = {}
    for schedule, precision in (("1f1b", None), ("gpipe", None), ("1f1b", {"pipeline": {"activation_checkpoint_interval": 2}})):
        engine = _pipeline("tuple", 2, GAS, schedule=schedule, precision=precision)
        calls = [0]
        for module in engine.module.modules():
            if isinstance(module, TupleBlock):
                module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        losses, _ = _train_pipeline(engine, batches, GAS)
        key = schedule if precision is None else "checkpointed"
        out[key] = (losses, _named(engine), calls[0], engine.module.activation_checkpoint_interval)
    return out


def _eval() -> dict:
    """eval_batch = the plain model's loss under no_grad; it changes nothing and training goes on after it."""
    batches = _batches("tuple", 2, MICRO * GAS)
    engine = _pipeline("tuple", 2, GAS)
    before = _named(engine)
    loss, logits = engine.eval_batch(iter([_micro(batches[0], 0, GAS, m) for m in range(GAS)]), return_logits=True)
    unchanged = all(torch.equal(before[n], v) for n, v in _named(engine).items())
    plain = Plain("tuple")
    with torch.no_grad():
        expected = plain(*batches[0]).item()
    per_micro = engine.eval_batch(iter([_micro(batches[0], 0, GAS, m) for m in range(GAS)]), reduce_output=None)
    train_loss = engine.train_batch(iter([_micro(batches[1], 0, GAS, m) for m in range(GAS)])).item()
    return {"loss": loss.item(), "expected": expected, "unchanged": unchanged, "train_loss": train_loss,
            "logits": None if logits is None else tuple(logits.shape), "per_micro": None if per_micro is None else len(per_micro),
            "last": engine.is_last_stage()}


def _training_data() -> dict:
    """initialize(training_data=...): the first and last stages read the loader, restarting it at its end."""
    x, y = _batches("tuple", 1, MICRO * GAS * 3 // 2)[0]  # one and a half batches: the second wraps around
    net = PipelineModule(_specs("tuple"), loss_fn=_class_loss, num_stages=2, partition_method="uniform")
    engine, _, loader, _ = shardspeed.initialize(model=net, training_data=torch.utils.data.TensorDataset(x, y),
                                                 config=_config(GAS))
    losses = [engine.train_batch().item() for _ in range(2)]
    return {"losses": losses, "epoch": loader.epoch, "position": loader.position, "reads": engine._reads_data()}


def _overflow() -> dict:
    """fp16: an inf gradient on stage 0 only; both stages skip the step and lower the loss scale together."""
    batches = _batches("tuple", 2, MICRO * GAS)
    engine = _pipeline("tuple", 2, GAS, precision={"fp16": {"enabled": True, "initial_scale_power": 8, "hysteresis": 1}})
    poisoned = {"on": True}
    if engine.stage_id == 0:
        first = next(p for p in engine.module.parameters())
        first.register_hook(lambda g: g * float("inf") if poisoned["on"] else g)
    it = _data_iter(engine, batches, GAS)
    before = _named(engine)
    engine.train_batch(it)
    skipped = (engine.skipped_steps, engine.loss_scaler.loss_scale, all(torch.equal(before[n], v) for n, v in _named(engine).items()))
    poisoned["on"] = False
    engine.train_batch(it)
    return {"first": skipped, "second": (engine.skipped_steps, engine.was_step_applied(), engine.global_steps)}


def _checkpoint(tmp: str, kind: str, saved: tuple[int, int, int], loaded: tuple[int, int, int]) -> dict:
    """Save at `saved` (stages, gas, zero stage), go on one step; a fresh engine at `loaded` resumes to the same step."""
    world = dist.get_world_size()
    (s_stages, s_gas, s_zero), (l_stages, l_gas, l_zero) = saved, loaded
    batches = _batches(kind, 3, MICRO * s_gas * world // s_stages)
    assert len(batches[0][0]) == MICRO * l_gas * world // l_stages, "both layouts must see the same global batch"
    engine = _pipeline(kind, s_stages, s_gas, s_zero)
    it = _data_iter(engine, batches, s_gas)
    engine.train_batch(it)
    engine.train_batch(it)
    engine.save_checkpoint(tmp, client_state={"note": 5})
    at_save = {_plain_name(kind, n): v for n, v in _named(engine).items()}
    continued = engine.train_batch(it).item()
    after = {_plain_name(kind, n): v for n, v in _named(engine).items()}

    fresh = _pipeline(kind, l_stages, l_gas, l_zero, seed=99)  # other weights: everything must come from the checkpoint
    path, client = fresh.load_checkpoint(tmp)
    resumed = fresh.train_batch(iter([_micro(batches[2], fresh.get_data_parallel_rank(), l_gas, m) for m in range(l_gas)])).item()
    out = {"continued": continued, "resumed": resumed, "client": client, "steps": fresh.global_steps,
           "after": after, "fresh_after": {_plain_name(kind, n): v for n, v in _named(fresh).items()}, "at_save": at_save}
    dist.barrier()
    if dist.get_rank() == 0:  # the plain, unpipelined model takes the per-layer files directly
        plain = Plain(kind)
        state = {f"layers.{k}": v for k, v in load_layer_states(tmp).items()}
        missing, unexpected = plain.load_state_dict(state, strict=False)
        out["plain"] = ({n: p.detach().clone() for n, p in plain.named_parameters()}, missing, unexpected)
    return out


def _refusals() -> dict:
    """ZeRO-2/3 are refused naming the key; forward/backward/step point to train_batch."""
    net = PipelineModule(_specs("tuple"), loss_fn=_class_loss, num_stages=2)  # partition_method="parameters"
    messages: dict[Any, Any] = {"parts": net.parts}
    for stage in (2, 3):
        try:
            shardspeed.initialize(model=net, config=_config(GAS, stage))
        except ConfigError as err:
            messages[stage] = str(err)
    engine, _, _, _ = shardspeed.initialize(model=net, config=_config(GAS))
    try:
        engine(torch.zeros(1))
    except Exception as err:  # noqa: BLE001 - the type is checked by the test
        messages["forward"] = type(err).__name__ + ": " + str(err)
    return messages


def _scenarios(tmp: Path) -> dict[str, Callable[[], Any]]:
    return {
        "pp2": lambda: _equivalence("tuple", 2),
        "pp2-bf16": lambda: _equivalence("tuple", 2, precision={"bf16": {"enabled": True}}),
        "pp2-tied": lambda: _equivalence("tied", 2),
        "schedules": _schedules,
        "eval": _eval,
        "overflow": _overflow,
        "training-data": _training_data,
        "ckpt-2-to-1": lambda: _checkpoint(str(tmp / "ckpt21"), "tuple", (2, GAS, 0), (1, GAS // 2, 0)),
        "refusals": _refusals,
        "pp4": lambda: _equivalence("tuple", 4),
        "pp2dp2": lambda: _equivalence("tuple", 2),
        "pp2dp2-zero1-tied": lambda: _equivalence("tied", 2, stage=1, reduce_scatter=True),
        "ckpt-2-to-4": lambda: _checkpoint(str(tmp / "ckpt24"), "tied", (2, GAS, 1), (4, 2 * GAS, 1)),
    }


WORLD2 = ["pp2", "pp2-bf16", "pp2-tied", "schedules", "eval", "overflow", "training-data", "ckpt-2-to-1", "refusals"]
WORLD4 = ["pp4", "pp2dp2", "pp2dp2-zero1-tied", "ckpt-2-to-4"]


def _run(tmp: str, names: list[str]) -> dict[str, tuple[str, Any]]:
    return run_named(_scenarios(Path(tmp)), names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRuns:
    return ScenarioRuns(tmp_path_factory, "pipeline", _run, lambda world, tmp: (str(tmp), WORLD2 if world == 2 else WORLD4),
                        DEADLINE)


# ---- checks --------------------------------------------------------------------------------------------
def _check_equivalence(results: list[dict], rtol: float, atol: float, clipped: bool = True) -> None:
    plain = results[0]["plain"]
    for rank, r in enumerate(results):
        # fp32: the pipeline sums gradients and norms in another order than the plain engine (~1e-7 relative).
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(plain["losses"]), rtol=rtol, atol=atol,
                                   msg=f"rank {rank} losses")
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(plain["norms"]), rtol=rtol, atol=atol,
                                   msg=f"rank {rank} global gradient norm")
    if clipped:
        assert min(plain["norms"]) > CLIP, "clipping must be active for the test to check the pipeline-wide norm"
    covered = set()
    for rank, r in enumerate(results):
        for name, value in r["params"].items():
            torch.testing.assert_close(value, plain["params"][name], rtol=rtol, atol=atol, msg=f"rank {rank}: {name}")
            covered.add(name)
    assert covered == set(plain["params"]), f"parameters no stage holds: {set(plain['params']) - covered}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,name", [(2, "pp2"), (4, "pp4"), (4, "pp2dp2")])
def test_pipeline_equals_plain_engine(runs: ScenarioRuns, world: int, name: str) -> None:
    """Catches a wrong schedule, lost or doubled micro-batch gradients, a norm missing a stage, a bad dp reduction."""
    results = runs(world, name)
    _check_equivalence(results, rtol=1e-5, atol=1e-6)
    stages = len({r["stage"] for r in results})
    assert stages == int(name[2]), results[0]["parts"]
    for r in results[1:]:  # data-parallel replicas of a stage are bitwise equal
        if r["stage"] == results[0]["stage"]:
            assert all(torch.equal(v, results[0]["params"][n]) for n, v in r["params"].items())


@pytest.mark.timeout(300)
def test_pipeline_bf16_close_to_plain_engine(runs: ScenarioRuns) -> None:
    """Catches bf16 gradients or fp32 masters mishandled across stages."""
    # bf16 accumulates micro-batch gradients in bf16 (8 significant bits) in a different grouping than the
    # plain engine's data-parallel sum, so individual weights may differ by a few bf16 ulps after 3 steps.
    _check_equivalence(runs(2, "pp2-bf16"), rtol=2e-2, atol=2e-2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,name", [(2, "pp2-tied"), (4, "pp2dp2-zero1-tied")])
def test_tied_embedding_stays_identical_and_equals_plain(runs: ScenarioRuns, world: int, name: str) -> None:
    """Catches tied gradients not summed across stages, copies drifting apart, or a tie counted twice in the norm."""
    results = runs(world, name)
    _check_equivalence(results, rtol=1e-5, atol=1e-6)
    tied = [r["tied"][0] for r in results]
    assert all(len(r["tied"]) == 1 for r in results), "every stage holds the tied embedding"
    assert all(torch.equal(t, tied[0]) for t in tied), "tied copies differ between stages"


@pytest.mark.timeout(300)
def test_gpipe_and_checkpointing_equal_1f1b_bitwise(runs: ScenarioRuns) -> None:
    """Catches a schedule that runs a micro batch twice, skips one, or pairs a gradient with the wrong activation;
    and checkpointing that loses gradients or is not applied."""
    for r in runs(2, "schedules"):
        (l1, p1, calls, _), (l2, p2, _, _), (l3, p3, recomputed, interval) = r["1f1b"], r["gpipe"], r["checkpointed"]
        assert l1 == l2 == l3
        assert all(torch.equal(p1[n], p2[n]) and torch.equal(p1[n], p3[n]) for n in p1)
        assert interval == 2 and calls > 0 and recomputed == 2 * calls, "checkpointed blocks run forward twice"


@pytest.mark.timeout(300)
def test_eval_batch(runs: ScenarioRuns) -> None:
    """Catches eval that trains, a loss not broadcast to every stage, or a lost training iterator."""
    for r in runs(2, "eval"):
        assert math.isclose(r["loss"], r["expected"], rel_tol=1e-5)
        assert r["unchanged"] and math.isfinite(r["train_loss"])
        assert r["logits"] == ((MICRO, C) if r["last"] else None)
        assert r["per_micro"] == (GAS if r["last"] else None)


@pytest.mark.timeout(300)
def test_overflow_on_one_stage_skips_every_stage(runs: ScenarioRuns) -> None:
    """Catches stages disagreeing on an fp16 overflow (one steps, one skips: weights and loss scales diverge)."""
    for r in runs(2, "overflow"):
        assert r["first"] == (1, 128.0, True)
        assert r["second"] == (1, True, 2)


@pytest.mark.timeout(300)
def test_training_data_is_read_by_first_and_last_stage(runs: ScenarioRuns) -> None:
    """Catches train_batch() without data_iter failing, or the loader not restarted at its end."""
    first, last = runs(2, "training-data")
    assert first["losses"] == last["losses"] and all(math.isfinite(v) for v in first["losses"])
    for r in (first, last):  # 12 samples = 6 micro batches; 8 read: one epoch, then 2 into the next
        assert r["reads"] and (r["epoch"], r["position"]) == (1, 2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,name", [(2, "ckpt-2-to-1"), (4, "ckpt-2-to-4")])
def test_checkpoint_reloads_at_other_stage_counts(runs: ScenarioRuns, world: int, name: str) -> None:
    """Catches per-layer files or optimizer states that only load into the layout that saved them."""
    results = runs(world, name)
    for rank, r in enumerate(results):
        # Another layout sums gradients in another order: the resumed step agrees to ~1e-6 relative.
        assert math.isclose(r["resumed"], r["continued"], rel_tol=1e-5), rank
        assert r["client"] == {"note": 5} and r["steps"] == 3
    after = {n: v for r in results for n, v in r["after"].items()}
    fresh = {n: v for r in results for n, v in r["fresh_after"].items()}
    assert set(after) == set(fresh)
    for n in after:
        torch.testing.assert_close(fresh[n], after[n], rtol=1e-5, atol=1e-6, msg=n)
    plain, missing, unexpected = results[0]["plain"]
    at_save = {n: v for r in results for n, v in r["at_save"].items()}
    # The tied head's layer file repeats the embedding; the plain model holds it once, under layer 0.
    assert not missing and set(unexpected) <= {f"layers.{len(_specs('tied')) - 1}.weight"}
    for n, v in plain.items():
        assert torch.equal(v, at_save[n]), n


@pytest.mark.timeout(300)
def test_refusals(runs: ScenarioRuns) -> None:
    """Catches ZeRO-2/3 silently accepted under a pipeline, or engine(...) running outside the schedule."""
    for r in runs(2, "refusals"):
        assert "`zero_optimization.stage` is 2" in r[2] and "`zero_optimization.stage` is 3" in r[3]
        assert r["forward"] == "PipelineError: Only train_batch() is accessible in pipeline mode."
        block = H * H + 2 * H
        assert r["parts"] == partition_balanced([V * H, *[block] * BLOCKS, 0, H * C + C], 2)  # 'parameters'
