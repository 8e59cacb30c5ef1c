"""A plan as text (`shardspeed plan`), as JSON (`--json`), and as per-tier bars (`--plot`, matplotlib)."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from .hardware import format_bytes
from .parts import TIERS, Part, tier_peak
from .predict import Plan, Prediction

_COLUMNS = ("#", "option", "fits", "device/rank", "host/rank", "host/node", "NVMe/node", "step (s)")


def plan_text(plan: Plan, breakdown: bool = True) -> str:
    """The ranked table, then each option's bytes per tier and component."""
    lines = _header(plan)
    rows = [_row(i + 1, p) for i, p in enumerate(plan.ranked())]
    widths = [max(len(r[c]) for r in [_COLUMNS, *rows]) for c in range(len(_COLUMNS))]
    for row in [_COLUMNS, *rows]:
        lines.append("  ".join(cell.rjust(w) if c not in (1, 2) else cell.ljust(w) for c, (cell, w) in
                               enumerate(zip(row, widths))).rstrip())
    best = plan.best()
    lines.append("")
    if best is None:
        lines.append("nothing fits: see the breakdown for what overflows, and lower the micro batch or add nodes")
    else:
        lines.append(f"fastest that fits: {best.option.label}; ds_config: \"zero_optimization\": "
                     f"{json.dumps(best.option.zero_section())}" + (" with activation checkpointing on "
                                                                     "(model.gradient_checkpointing_enable())"
                                                                     if best.option.checkpointing else ""))
    if breakdown:
        lines += ["", "per rank, by tier and component (phase other than steady in brackets):"]
        for i, p in enumerate(plan.ranked()):
            lines.append(f"{i + 1:>3}  {p.option.label}")
            lines += [f"       {tier:<6} {format_bytes(total):>10} = {parts}" for tier, total, parts in _tier_lines(p)]
    return "\n".join(lines)


def _header(plan: Plan) -> list[str]:
    acts = ", ".join(f"{'with' if ckpt else 'without'} checkpointing {format_bytes(a.peak)} ({a.method})"
                     for ckpt, a in sorted(plan.activations.items()))
    hw = plan.hardware
    budget = (f"budget per rank {format_bytes(hw.device_budget)} of host memory" if hw.accelerator == "cpu" else
              f"budget per GPU {format_bytes(hw.device_budget)} ({format_bytes(hw.device_reserved)} reserved)")
    return [f"shardspeed plan: {plan.model}, {plan.params / 1e6:.1f} M trainable parameters, sequence {plan.seq_len} x "
            f"micro batch {plan.micro_batch}, {plan.precision}",
            f"hardware: {hw.describe()}; {budget}",
            f"activations per micro batch: {acts}", ""]


def _row(rank: int, p: Prediction) -> tuple[str, ...]:
    fits = "yes" if p.fits else "no: " + ", ".join(p.over)
    nvme = format_bytes(p.nvme_node) if p.nvme_node else "-"
    return (str(rank), p.option.label, fits, format_bytes(p.device), format_bytes(p.host), format_bytes(p.host_node),
            nvme, f"{p.step.total:.3g}")


def _tier_lines(p: Prediction) -> list[tuple[str, int, str]]:
    """Per tier: its peak alone, the parts that make it up, and (apart) what is held only while loading."""
    out: list[tuple[str, int, str]] = []
    for tier in TIERS:
        running = [part for part in p.parts if part.tier == tier and part.phase != "init" and part.nbytes]
        loading = [part for part in p.parts if part.tier == tier and part.phase == "init" and part.nbytes]
        if not running and not loading:
            continue
        text = " + ".join(f"{part.name} {format_bytes(part.nbytes)}" + ("" if part.phase == "steady" else f" [{part.phase}]")
                          for part in running) or "nothing while training"
        if loading:
            text += " | while loading: " + " + ".join(f"{part.name} {format_bytes(part.nbytes)}" for part in loading)
        out.append((tier, tier_peak(p.parts, [tier]), text))
    return out


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data: per option, bytes per rank per tier and component, peaks, step time."""
    return {
        "model": plan.model, "trainable_parameters": plan.params, "seq_len": plan.seq_len, "micro_batch": plan.micro_batch,
        "precision": plan.precision,
        "hardware": {k: (None if isinstance(v, float) and math.isinf(v) else v)
                     for k, v in dataclasses.asdict(plan.hardware).items()},
        "activations": {("with" if ckpt else "without") + "_checkpointing": {"bytes": a.peak, "method": a.method}
                        for ckpt, a in plan.activations.items()},
        "options": [_option_dict(i + 1, p) for i, p in enumerate(plan.ranked())],
    }


def _option_dict(rank: int, p: Prediction) -> dict[str, Any]:
    return {
        "rank": rank, "label": p.option.label, "option": dataclasses.asdict(p.option), "fits": p.fits, "over": list(p.over),
        "peak_bytes": {"device_per_rank": p.device, "host_per_rank": p.host, "host_per_node": p.host_node,
                       "nvme_per_rank": p.nvme, "nvme_per_node": p.nvme_node},
        "bytes_per_rank": p.by_tier(),
        "phases": {part.name: part.phase for part in p.parts},
        "step_seconds": {"compute": p.step.compute, "communication": p.step.communication, "offload": p.step.offload,
                         "total": p.step.total},
        "zero_optimization": p.option.zero_section(),
    }


def plot_plan(plan: Plan, path: str) -> None:
    """Per-tier stacked bars (device per rank, host per node, NVMe per node) for every option, budgets as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("--plot draws with matplotlib, which is not installed: pip install matplotlib") from err
    ranked = plan.ranked()
    hw = plan.hardware
    tiers = [("device", "device per rank", 1, hw.device_budget), ("host", "host per node", hw.gpus_per_node, hw.host_memory)]
    if any(p.nvme for p in ranked):
        tiers.append(("nvme", "NVMe per node", hw.gpus_per_node, hw.nvme_space))
    fig, axes = plt.subplots(1, len(tiers), figsize=(6 * len(tiers), 0.4 * len(ranked) + 3), sharey=True, squeeze=False)
    labels = [f"{i + 1}. {p.option.label}" + ("" if p.fits else " (no)") for i, p in enumerate(ranked)]
    names = sorted({part.name for p in ranked for part in p.parts if part.nbytes})
    palette = [*getattr(plt.get_cmap("tab20"), "colors"), *getattr(plt.get_cmap("tab20b"), "colors")]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    for ax, (tier, title, scale, budget) in zip(axes[0], tiers):
        left = [0.0] * len(ranked)
        shown = [_peak_parts(p.parts, tier) for p in ranked]
        for name in names:
            widths = [sum(part.nbytes for part in parts if part.name == name) * scale / 2 ** 30 for parts in shown]
            if any(widths):
                ax.barh(labels, widths, left=left, color=colors[name], label=name)
                left = [a + b for a, b in zip(left, widths)]
        ax.axvline(budget / 2 ** 30, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{title} (GiB; dashed: budget)")
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=3, frameon=False)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{plan.model}, {plan.params / 1e6:.1f} M parameters, seq {plan.seq_len} x {plan.micro_batch}, "
                 f"{plan.precision} on {hw.describe()}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _peak_parts(parts: tuple[Part, ...], tier: str) -> list[Part]:
    """The parts that make a tier's peak (`tier_peak`): those held throughout plus the larger of the backward
    and step transients, or those held while loading if that is more."""
    on_tier = [part for part in parts if part.tier == tier]
    by_phase = {phase: [part for part in on_tier if part.phase == phase] for phase in ("steady", "backward", "step", "init")}
    size = {phase: sum(part.nbytes for part in found) for phase, found in by_phase.items()}
    training = by_phase["steady"] + by_phase["backward" if size["backward"] >= size["step"] else "step"]
    return by_phase["init"] if size["init"] > sum(part.nbytes for part in training) else training
