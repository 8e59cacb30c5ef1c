"""`plan(...)`: every option's predicted memory per tier, whether it fits, and its predicted step time.

Step time is a deliberately simple model, stated so it can be argued with:
- compute: 6·Ψ·tokens FLOPs (8·Ψ·tokens with activation checkpointing, which runs the forward
  twice) over `Hardware.device_flops`;
- communication: per rank, the bytes ring collectives move, (N-1)/N of the 16-bit (or fp32) model
  per pass: 2 passes at stages 0-1 (all-reduce, or reduce-scatter + all-gather), 1 per micro step
  + 1 at stage 2, 3 per micro step at stage 3 (two gathers and a reduce-scatter), over the
  intra-node bandwidth on one node and the inter-node bandwidth on several;
- offload: gradients to the host and parameters back over PCIe, the CPU optimizer step at
  `host_adam_rate` elements per second, NVMe traffic (masters and states read and written every
  step; offloaded parameters read for each forward and backward) over the node's NVMe bandwidth
  shared by its ranks.
Nothing overlaps in this model, so it ranks options rather than promising a number.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...config.sections import ZeroConfig
from .activations import ActivationEstimate, Inputs, can_checkpoint, decoder_formula, trace_activations
from .hardware import Hardware
from .model import ModelShape, ModelSpec, PlannerError, meta_model
from .parts import Option, Part, options as all_options, tier_peak
from .states import StateContext, model_state_parts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepTime:
    compute: float  # seconds
    communication: float
    offload: float

    @property
    def total(self) -> float:
        return self.compute + self.communication + self.offload


@dataclass(frozen=True)
class Prediction:
    """One option's parts and peaks. Peaks per rank (`device`, `host`, `nvme`) and per node (`host_node`,
    `nvme_node`); on a CPU machine `host` is the whole of a rank's memory (its device tier included)."""

    option: Option
    parts: tuple[Part, ...]
    device: int
    host: int
    nvme: int
    host_node: int
    nvme_node: int
    over: tuple[str, ...]  # the budgets it exceeds, e.g. ("device",); empty: it fits
    step: StepTime

    @property
    def fits(self) -> bool:
        return not self.over

    def by_tier(self) -> dict[str, dict[str, int]]:
        """Bytes per rank, per tier and component (components of a tier summed over phases)."""
        out: dict[str, dict[str, int]] = {"device": {}, "host": {}, "nvme": {}}
        for part in self.parts:
            if part.nbytes:
                out[part.tier][part.name] = out[part.tier].get(part.name, 0) + part.nbytes
        return out

    def breakdown(self) -> dict[str, int]:
        """Bytes per component over every tier (the engine's `memory_breakdown()` names)."""
        out: dict[str, int] = {}
        for part in self.parts:
            out[part.name] = out.get(part.name, 0) + part.nbytes
        return out


@dataclass(frozen=True)
class Plan:
    model: str
    params: int  # trainable
    seq_len: int
    micro_batch: int
    precision: str
    hardware: Hardware
    predictions: tuple[Prediction, ...]
    activations: dict[bool, ActivationEstimate]  # by checkpointing

    def ranked(self) -> list[Prediction]:
        """Options that fit, fastest first (a tie: the lower stage, as "auto" takes it, then the smaller peak);
        then the others, smallest device peak first."""
        fit = sorted((p for p in self.predictions if p.fits), key=lambda p: (round(p.step.total, 9), p.option.stage, p.device))
        rest = sorted((p for p in self.predictions if not p.fits), key=lambda p: (p.device, p.host))
        return fit + rest

    def best(self) -> Prediction | None:
        ranked = self.ranked()
        return ranked[0] if ranked and ranked[0].fits else None

    def prediction(self, option: Option) -> Prediction:
        return next(p for p in self.predictions if p.option == option)


def plan(model: ModelSpec, seq_len: int, micro_batch: int = 1, precision: str = "bf16",
         hardware: Hardware | None = None, *, zero: ZeroConfig | dict[str, Any] | None = None,
         options: Sequence[Option] | None = None, gradient_accumulation_steps: int = 1,
         inputs: Inputs | None = None, activation_bytes: int | None = None) -> Plan:
    """Predict memory and step time of training `model` under each option.

    `model`: an `nn.Module` (best built on the meta device), a Hugging Face config, a config.json path
    or a model type. `zero`: the `zero_optimization` section whose bucket sizes and thresholds apply
    (DeepSpeed's defaults when omitted; its stage and offloads are what the options vary).
    `activation_bytes` replaces the traced activation peak (both with and without checkpointing).
    """
    if precision not in DTYPES:
        raise PlannerError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    hardware = hardware or Hardware()
    section = zero if isinstance(zero, ZeroConfig) else ZeroConfig.model_validate(zero or {})
    module = meta_model(model)
    shape = ModelShape.of(module)
    wanted = list(options) if options is not None else all_options(
        nvme=hardware.nvme_space > 0, checkpointing=(False, True) if can_checkpoint(module) else (False,))
    dtype = DTYPES[precision]
    acts = {ckpt: (ActivationEstimate(activation_bytes, "given") if activation_bytes is not None
                   else _activations(module, micro_batch, seq_len, dtype, ckpt, inputs, hardware.mmap_threshold))
            for ckpt in sorted({o.checkpointing for o in wanted})}
    ctx = StateContext(shape, section, hardware.world, dtype, hardware.accelerator)
    tokens = micro_batch * seq_len * gradient_accumulation_steps
    predictions = tuple(_predict(ctx, hardware, option, acts[option.checkpointing], tokens,
                                 gradient_accumulation_steps) for option in wanted)
    return Plan(shape.name, shape.numel, seq_len, micro_batch, precision, hardware, predictions, acts)


def _activations(module: torch.nn.Module, micro_batch: int, seq_len: int, dtype: torch.dtype, checkpointing: bool,
                 inputs: Inputs | None, small_block: int) -> ActivationEstimate:
    try:
        return trace_activations(module, micro_batch, seq_len, dtype, checkpointing, inputs, small_block)
    except PlannerError:
        raise
    except Exception as err:  # noqa: BLE001 - any model code may fail on the meta device; fall back, and say so
        config = getattr(module, "config", None)
        if config is None:
            raise PlannerError(f"the forward of {type(module).__name__} does not run on the meta device ({err}); "
                               "pass activation_bytes=") from err
        return ActivationEstimate(decoder_formula(config, micro_batch, seq_len, dtype, checkpointing),
                                  f"formula (meta trace failed: {type(err).__name__})")


def _predict(ctx: StateContext, hw: Hardware, option: Option, activations: ActivationEstimate, tokens: int,
             gas: int) -> Prediction:
    parts = model_state_parts(ctx, option)
    parts.append(Part("activations", "device", "backward", activations.peak))
    if hw.accelerator == "cpu":  # heap pages of the activations' small blocks stay resident (parts.py, Hardware)
        parts.append(Part("activations_retained", "device", "step", activations.small_peak))
    # Built whole in fp32 on every rank before initialize (not under zero.Init), on the host.
    parts.append(Part("model_load", "host", "init", 4 * ctx.shape.total_numel))
    device = tier_peak(parts, ["device"])
    host = tier_peak(parts, ["device", "host"] if hw.accelerator == "cpu" else ["host"])
    nvme = tier_peak(parts, ["nvme"])
    ranks = hw.gpus_per_node
    over = []
    if hw.accelerator == "cuda" and device > hw.device_budget:
        over.append("device")
    if host * ranks > hw.host_memory:
        over.append("host")
    if nvme and nvme * ranks > hw.nvme_space:
        over.append("nvme")
    return Prediction(option, tuple(parts), device, host, nvme, host * ranks, nvme * ranks, tuple(over),
                      step_time(ctx, hw, option, tokens, gas))


def step_time(ctx: StateContext, hw: Hardware, option: Option, tokens: int, gas: int) -> StepTime:
    """The module docstring's model of one optimizer step."""
    psi, k, n = ctx.shape.numel, ctx.k, hw.world
    compute = (8 if option.checkpointing else 6) * psi * tokens / hw.device_flops
    passes = {0: 2, 1: 2, 2: gas + 1, 3: 3 * gas}[option.stage]
    bandwidth = hw.inter_node_bandwidth if hw.nodes > 1 else hw.intra_node_bandwidth
    comm = passes * k * psi * (n - 1) / n / bandwidth if n > 1 else 0.0
    part = psi if option.stage == 0 else math.ceil(psi / n)
    offload = 0.0
    nvme_rate = hw.nvme_bandwidth / hw.gpus_per_node
    if option.offload_optimizer != "none":
        offload += 2 * k * part / hw.pcie_bandwidth + part / hw.host_adam_rate
        if option.offload_optimizer == "nvme":
            offload += 2 * (4 + ctx.state_bytes) * part / nvme_rate
    if option.offload_param != "none":
        offload += 2 * gas * k * part / hw.pcie_bandwidth
        if option.offload_param == "nvme":
            offload += (2 * gas + 1) * k * part / nvme_rate
    return StepTime(compute, comm, offload)
