"""How stage 3 cuts a model into units: what is gathered together, what stays whole, where shards live.

A unit is the parameters one module needs, of one group key (an optimizer param group, or frozen),
gathered and released together. Parameters of at most `stage3_param_persistence_threshold` elements (up to
`stage3_model_persistence_threshold` elements in all) are pooled into one persistent unit per key,
kept gathered. Leaf modules (`leaf_module`, `stage3_module_granularity_threshold`) are fetched whole,
with every submodule's parameters. Each key's resident shards lie end to end in one flat buffer, in
unit order, so an optimizer group steps one tensor and a run of units reduces into one slice.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..comm.collectives import CommPolicy
from ..comm.topology import AxisGroup
from ..config.sections import OffloadParamConfig
from .param_names import checkpoint_names
from .param_shards import Manager, Unit, is_partitioned, shard_numel

FROZEN = "frozen"  # the group key of parameters that never get gradients
GroupKey = int | str  # an optimizer param group's index, or FROZEN


class Home(NamedTuple):
    """Which flat buffer a unit's shards live in."""

    key: GroupKey
    device: torch.device
    dtype: torch.dtype


@dataclass
class UnitPlan:
    units: list[Unit]
    module_units: dict[torch.nn.Module, list[Unit]]  # what each module needs gathered while it runs
    # the resident shards of each home's units end to end (with offload_param the persistent units'
    # shards stay on the device while the others' go to host memory: two homes for one key)
    flat: dict[Home, torch.Tensor]

    def of_key(self, key: GroupKey) -> list[Unit]:
        return [u for u in self.units if u.group_key == key]


def plan_units(module: torch.nn.Module, group_of: dict[torch.nn.Parameter, int], axis_of: Callable[[GroupKey], AxisGroup],
               manager: Manager, *, persistence_threshold: int, model_persistence_threshold: int,
               leaf_spec: dict[str, Any], granularity_threshold: int, offload: OffloadParamConfig | None,
               policy: CommPolicy | None = None) -> UnitPlan:
    """Units of `module`'s parameters. `group_of`: trainable parameters' optimizer group (others are frozen)."""
    names = checkpoint_names(module)

    def key(p: torch.nn.Parameter) -> GroupKey:
        return group_of[p] if p in group_of and p.requires_grad else FROZEN

    leaves = leaf_modules(module, leaf_spec, granularity_threshold)
    inside_leaf = {d for leaf in leaves for d in leaf.modules() if d is not leaf}

    def own(mod: torch.nn.Module) -> list[torch.nn.Parameter]:
        if mod in inside_leaf:
            return []  # fetched with its leaf ancestor
        found = mod.parameters() if mod in leaves else mod._parameters.values()
        return [p for p in found if p is not None]

    budget = model_persistence_threshold
    persistent: dict[GroupKey, list[torch.nn.Parameter]] = {}
    per_module: list[dict[GroupKey, list[torch.nn.Parameter]]] = []
    seen: set[torch.nn.Parameter] = set()
    # Units follow module registration order; a parameter belongs to the first module holding it.
    for mod in module.modules():
        buckets: dict[GroupKey, list[torch.nn.Parameter]] = {}
        for p in own(mod):
            if p in seen:
                continue
            seen.add(p)
            numel = p.ds_numel if is_partitioned(p) else p.numel()
            if numel <= persistence_threshold and numel <= budget:  # DeepSpeed's rule: `ds_numel <= threshold`
                budget -= numel
                persistent.setdefault(key(p), []).append(p)
            else:
                buckets.setdefault(key(p), []).append(p)
        per_module.append(buckets)
    groups = [(k, ps, True) for k, ps in persistent.items()] + [(k, ps, False) for b in per_module for k, ps in b.items()]
    flat = _flat_storage(groups, axis_of, offload)
    at: dict[Home, int] = {}
    units = []
    for k, params, is_persistent in groups:
        where = Home(k, _storage_device(params[0], offload, is_persistent), params[0].dtype)
        unit = _make_unit(params, names, k, axis_of(k), manager, is_persistent, offload, policy, flat, where, at.get(where, 0))
        if unit.partition is not None:
            at[where] = at.get(where, 0) + unit.partition_size
        units.append(unit)
    assigned = {p: u for u in units for p in u.params}
    module_units: dict[torch.nn.Module, list[Unit]] = {}
    for mod in module.modules():
        needed: list[Unit] = []
        for p in own(mod):
            if not assigned[p].persistent and assigned[p] not in needed:
                needed.append(assigned[p])
        module_units[mod] = needed
    return UnitPlan(units, module_units, flat)


def _swapped(offload: OffloadParamConfig | None, persistent: bool) -> bool:
    return offload is not None and offload.device == "nvme" and not persistent


def _flat_storage(groups: list[tuple[GroupKey, list[torch.nn.Parameter], bool]], axis_of: Callable[[GroupKey], AxisGroup],
                  offload: OffloadParamConfig | None) -> dict[Home, torch.Tensor]:
    """Per home, one zeroed buffer for the shards of its resident units (swapped ones live on the drive)."""
    sizes: dict[Home, int] = {}
    for k, params, persistent in groups:
        if _swapped(offload, persistent):
            continue
        where = Home(k, _storage_device(params[0], offload, persistent), params[0].dtype)
        world = axis_of(k).size
        sizes[where] = sizes.get(where, 0) + sum(shard_numel(_numel(p), world) for p in params)
    flat = {}
    for where, n in sizes.items():
        buffer = torch.zeros(n, dtype=where.dtype, device=where.device)
        if offload is not None and offload.pin_memory and where.device.type == "cpu" and torch.cuda.is_available():
            buffer = buffer.pin_memory()  # offload_param: fast host-to-device copies of the shards
        flat[where] = buffer
    return flat


def _numel(p: torch.nn.Parameter) -> int:
    return p.ds_numel if is_partitioned(p) else p.numel()


def _compute_device(p: torch.nn.Parameter) -> torch.device:
    return p.ds_tensor.device if is_partitioned(p) else p.device


def _storage_device(p: torch.nn.Parameter, offload: OffloadParamConfig | None, persistent: bool) -> torch.device:
    # offload_param: shards in host memory, gathered onto the compute device (persistent ones stay there).
    return torch.device("cpu") if offload is not None and not persistent else _compute_device(p)


def _make_unit(params: list[torch.nn.Parameter], names: dict[torch.nn.Parameter, str], key: GroupKey, axis: AxisGroup,
               manager: Manager, persistent: bool, offload: OffloadParamConfig | None, policy: CommPolicy | None,
               flat: dict[Home, torch.Tensor], where: Home, at: int) -> Unit:
    dtype = params[0].dtype
    for p in params:
        if p.dtype != dtype:
            raise ValueError(f"parameter `{names[p]}` is {p.dtype} but others in its group are {dtype}; ZeRO needs one dtype per group")
    swapped = _swapped(offload, persistent)
    size = sum(shard_numel(_numel(p), axis.size) for p in params)
    storage = None if swapped else flat[where][at:at + size]
    unit = Unit(params, [names[p] for p in params], axis, manager, dtype, _storage_device(params[0], offload, persistent),
                persistent=persistent, compute_device=_compute_device(params[0]), resident=not swapped,
                storage=storage, policy=policy)
    unit.group_key = key
    unit.home = where
    return unit


def leaf_modules(root: torch.nn.Module, spec: dict[str, Any], granularity_threshold: int) -> set[torch.nn.Module]:
    """Modules fetched whole, with every submodule's parameters (DeepSpeed's "leaf modules").

    A module is a leaf when its class (name or dotted path) is in spec["classes"], its name is in
    spec["names"] or ends with one of spec["name_suffixes"], it was marked by `set_z3_leaf_modules`,
    or when its granularity (parameters in its subtree per module in it) is below
    `stage3_module_granularity_threshold`. Mixture-of-experts
    blocks are leaves by default: only some experts run each step, which would otherwise change the
    recorded fetch order every step.
    """
    classes = set(spec.get("classes", ()))
    names = set(spec.get("names", ()))
    suffixes = tuple(spec.get("name_suffixes", ()))
    leaves: set[torch.nn.Module] = set()
    covered: set[torch.nn.Module] = set()
    for name, mod in root.named_modules():
        if mod in covered:
            continue
        cls = type(mod)
        leaf = (cls.__name__ in classes or f"{cls.__module__}.{cls.__qualname__}" in classes
                or name in names or bool(suffixes and name.endswith(suffixes)) or z3_leaf_module(mod))
        if not leaf and granularity_threshold > 0 and mod is not root:
            subtree = list(mod.modules())
            numel = sum(_numel(p) for p in mod.parameters())
            leaf = numel > 0 and numel / len(subtree) < granularity_threshold
        if leaf:
            leaves.add(mod)
            covered.update(mod.modules())
    return leaves


# ---- DeepSpeed's `deepspeed.utils` leaf-module marks ------------------------------------------------
def _matches(module: torch.nn.Module, classes: list[Any]) -> bool:
    cls = type(module)
    return any(c is cls if isinstance(c, type) else c in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")
               for c in classes)


def set_z3_leaf_modules(model: torch.nn.Module, leaf_module_classes: list[Any]) -> list[torch.nn.Module]:
    """Mark every module of `model` whose class is in `leaf_module_classes` (classes or their names) as a
    stage-3 leaf: fetched whole with its submodules. Returns the marked modules; none is an error."""
    marked = [m for m in model.modules() if _matches(m, leaf_module_classes)]
    if not marked:
        raise ValueError(f"no module of {type(model).__name__} is of the leaf classes {leaf_module_classes}")
    for module in marked:
        module._z3_leaf = True  # type: ignore[assignment]  # DeepSpeed's attribute name
    return marked


def unset_z3_leaf_modules(model: torch.nn.Module, leaf_module_classes: list[Any]) -> list[torch.nn.Module]:
    """Undo `set_z3_leaf_modules` for those classes; returns the modules unmarked."""
    unmarked = [m for m in model.modules() if _matches(m, leaf_module_classes)]
    for module in unmarked:
        module._z3_leaf = False  # type: ignore[assignment]
    return unmarked


def z3_leaf_module(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_z3_leaf", False))


def get_z3_leaf_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if z3_leaf_module(m)]
