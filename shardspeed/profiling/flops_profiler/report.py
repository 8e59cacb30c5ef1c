"""The profile as a tree of modules, and how it prints (DeepSpeed's number formats and layout).

Each line of the detailed tree carries the module's totals (its own ops plus its submodules'):
parameters, MACs, FLOPs, forward latency (each with its share of the model's) and FLOP rate. Where a
module runs ops of its own besides its submodules (attention's `scaled_dot_product_attention` in an
attention block, a residual add), a line `(own ops)` shows them, so that every module's children sum
to it exactly.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .counting import ModuleStats, param_count

DEFAULT_PRECISION = 2
_MAGNITUDES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1.0), ("m", 1e-3), ("u", 1e-6))


def number_to_string(num: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """`num` scaled to a unit prefix, DeepSpeed's way: "7.13 M", "0 ", "246.17 m"."""
    if units is None:
        units = next((u for u, m in _MAGNITUDES if num >= m), "u")
        if num == 0:
            units = ""
    magnitude = dict(_MAGNITUDES).get(units, 1.0)
    return f"{round(num / magnitude, precision):g} {units}"


def macs_to_string(macs: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    return f"{number_to_string(macs, units=units, precision=precision)}MACs"


def flops_to_string(flops: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """A FLOP rate (DeepSpeed's "FLOPS")."""
    return f"{number_to_string(flops, units=units, precision=precision)}FLOPS"


def bytes_to_string(b: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    return f"{number_to_string(b, units=units, precision=precision)}B"


def params_to_string(params_num: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """A parameter count: "124.44 M", "1.5 B" (billions)."""
    units = units.replace("B", "G") if units else units
    return number_to_string(params_num, units=units, precision=precision).replace("G", "B").strip()


def duration_to_string(duration: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    return f"{number_to_string(duration, units=units, precision=precision)}s"


def _flop_count_to_string(flops: float) -> str:
    return f"{number_to_string(flops)}FLOPs"


@dataclass
class ModuleProfile:
    """A module's totals over the profiled forward passes (its submodules included)."""

    name: str
    kind: str  # the class name
    extra: str  # the module's own extra_repr
    params: int
    flops: int
    macs: int
    duration: float
    own_flops: int  # run by the module itself, not by a submodule
    own_macs: int
    children: list[ModuleProfile] = field(default_factory=list)

    def walk(self, depth: int = 0) -> Iterator[tuple[ModuleProfile, int]]:
        yield self, depth
        for child in self.children:
            yield from child.walk(depth + 1)


def build_tree(model: torch.nn.Module, stats: dict[torch.nn.Module, ModuleStats]) -> ModuleProfile:
    """The module tree with totals: FLOPs and MACs summed over each module's distinct submodules (a
    shared module counts once), latency as measured at its forward (a container never called: the sum of its children's)."""
    def totals(module: torch.nn.Module) -> tuple[int, int]:
        found = [stats[m] for m in module.modules() if m in stats]
        return sum(s.flops for s in found), sum(s.macs for s in found)

    def node(name: str, module: torch.nn.Module) -> ModuleProfile:
        mine = stats.get(module) or ModuleStats(param_count(module))  # a module added after profiling started
        flops, macs = totals(module)
        children = [node(n, c) for n, c in module.named_children()]
        duration = mine.duration if mine.calls else sum(c.duration for c in children)
        return ModuleProfile(name, type(module).__name__, module.extra_repr(), mine.params, flops, macs, duration,
                             mine.flops, mine.macs, children)
    return node("", model)


def _share(part: float, whole: float) -> str:
    return f"{round(100 * part / whole, DEFAULT_PRECISION) if whole else 0:g}%"


def _items(p: ModuleProfile, root: ModuleProfile) -> str:
    rate = round(p.flops / p.duration, DEFAULT_PRECISION) if p.duration else 0
    return ", ".join([
        f"{params_to_string(p.params)} = {_share(p.params, root.params)} Params",
        f"{macs_to_string(p.macs)} = {_share(p.macs, root.macs)} MACs",
        f"{_flop_count_to_string(p.flops)} = {_share(p.flops, root.flops)} FLOPs",
        f"{duration_to_string(p.duration)} = {_share(p.duration, root.duration)} latency",
        flops_to_string(rate),
    ])


def tree_lines(root: ModuleProfile) -> list[str]:
    """The detailed profile, laid out as PyTorch prints a module."""
    lines: list[str] = []

    def emit(p: ModuleProfile, indent: str) -> None:
        head = f"{indent}({p.name}): " if p.name else indent
        items = _items(p, root)
        if not p.children:
            lines.append(f"{head}{p.kind}({items}{', ' + p.extra if p.extra else ''})")
            return
        lines.append(f"{head}{p.kind}(")
        lines.append(f"{indent}  {items}{', ' + p.extra if p.extra else ''}")
        for child in p.children:
            emit(child, indent + "  ")
        if p.own_flops or p.own_macs:
            lines.append(f"{indent}  (own ops): {macs_to_string(p.own_macs)} = {_share(p.own_macs, root.macs)} MACs, "
                         f"{_flop_count_to_string(p.own_flops)} = {_share(p.own_flops, root.flops)} FLOPs")
        lines.append(f"{indent})")
    emit(root, "")
    return lines


def aggregated_lines(root: ModuleProfile, module_depth: int = -1, top_modules: int = 1) -> list[str]:
    """Per depth of the tree, the `top_modules` module classes with the most parameters, MACs and latency
    (summed over the modules of that class at that depth). Depth -1: every depth, the deepest included."""
    per_depth: dict[int, dict[str, list[float]]] = {}
    for p, depth in root.walk():
        agg = per_depth.setdefault(depth, {}).setdefault(p.kind, [0, 0, 0.0])
        agg[0] += p.macs
        agg[1] += p.params
        agg[2] += p.duration
    last = max(per_depth) if module_depth < 0 else min(module_depth, max(per_depth))
    lines = [f"Top {top_modules} modules in terms of params, MACs or fwd latency at different model depths:"]
    for depth in range(last + 1):
        kinds = per_depth[depth]

        def top(index: int, fmt: object) -> dict[str, str]:
            ranked = sorted(kinds.items(), key=lambda kv: kv[1][index], reverse=True)[:top_modules]
            return {k: fmt(v[index]) for k, v in ranked}  # type: ignore[operator]
        lines += [f"depth {depth}:", f"    params      - {top(1, params_to_string)}",
                  f"    MACs        - {top(0, macs_to_string)}", f"    fwd latency - {top(2, duration_to_string)}"]
    return lines
