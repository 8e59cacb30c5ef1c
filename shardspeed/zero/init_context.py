"""`shardspeed.zero.Init` and `shardspeed.zero.GatheredParameters`, as DeepSpeed users write them.

    with shardspeed.zero.Init(config_dict_or_path=ds_config):
        model = MyModel()          # each module's parameters are partitioned as soon as the
                                   # module's __init__ returns: no rank ever holds the whole model
    with shardspeed.zero.GatheredParameters(model.embed.weight, modifier_rank=0):
        model.embed.weight[0] = 0  # whole here; rank 0's edit reaches every rank's shard on exit

Partitioning after each module's own `__init__` keeps initialisation identical to building the
model whole: every `reset_parameters` runs on the whole tensor, in the same order, with the same
random numbers. Models that re-initialise their children afterwards (Hugging Face `post_init`
calling `_init_weights(module)`) get each module's parameters gathered around that call.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..accelerator import get_accelerator
from ..comm.topology import AxisGroup, Topology
from .param_shards import ParameterNotGatheredError, ReleasedParameter, Unit, is_partitioned, not_gathered_error

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _StandaloneManager:
    """Manages parameters partitioned by zero.Init until an engine adopts them.

    Inside the Init context a touched parameter is gathered, so in-place initialisation after
    partitioning (a parent re-initialising its children's weights, nanoGPT's scaled init, `.data`
    edits) sees and draws exactly what it would on the whole model. Inside a `_GatherOnTouch`
    scope (`apply`, Hugging Face's `_init_weights`) the scope keeps what it gathered until it ends;
    elsewhere the last few touched units stay gathered (so one initialisation of a parameter,
    or an expression over several, gathers each once) until a module's construction ends or they
    fall out of the window. Settling a unit keeps rank 0's values (as `initialize` would after
    building the model whole) and releases it. Outside the context, touching one is an error.
    """

    WINDOW = 8  # units kept gathered by loose touches at once

    def __init__(self) -> None:
        self.scopes: list[_GatherOnTouch] = []
        self.active = False  # inside the Init context
        self.window: dict[Unit, None] = {}  # gathered by touches outside any scope, oldest first

    def touched(self, param: ReleasedParameter) -> None:
        unit = param.ds_unit
        if self.scopes:
            self.scopes[-1].add(unit)
        elif self.active:
            if unit in self.window:
                self.window[unit] = self.window.pop(unit)  # most recent last
                return
            unit.gather()
            self.window[unit] = None
            while len(self.window) > self.WINDOW:
                self._settle(next(iter(self.window)))
        else:
            raise not_gathered_error(param)

    def touched_data(self, param: ReleasedParameter) -> None:
        if self.scopes or self.active:
            self.touched(param)

    def settle(self) -> None:
        """Make every unit gathered by a loose touch every rank's shards (rank 0's values) and release it."""
        for unit in list(self.window):
            self._settle(unit)

    def _settle(self, unit: Unit) -> None:
        del self.window[unit]
        if unit.full is not None:
            unit.keep_values_of(0)
            unit.release()

    def refresh_masters(self, unit: Unit) -> None:
        pass

    def release_unit(self, unit: Unit) -> None:
        unit.release()


class _GatherOnTouch:
    """Gathers every partitioned parameter touched inside it; on exit rank 0's values are kept."""

    def __init__(self, manager: _StandaloneManager) -> None:
        self.manager = manager
        self.units: dict[Unit, None] = {}

    def add(self, unit: Unit) -> None:
        unit.gather()
        self.units[unit] = None

    def __enter__(self) -> None:
        self.manager.settle()  # the scope may touch the unit a loose touch left gathered
        self.manager.scopes.append(self)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.manager.scopes.pop()
        for unit in self.units:
            if exc_type is None:
                unit.keep_values_of(0)
            unit.release()


def _all_subclasses(cls: type[torch.nn.Module]) -> list[type[torch.nn.Module]]:
    out: list[type[torch.nn.Module]] = []
    todo = [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.append(sub)
                todo.append(sub)
    return out


class Init:
    """Partition parameters as modules are constructed (ZeRO stage 3)."""

    def __init__(self, module: torch.nn.Module | None = None, data_parallel_group: Any = None,
                 mem_efficient_linear: bool = True, remote_device: str | None = None, pin_memory: bool = False,
                 config_dict_or_path: Any = None, config: Any = None, enabled: bool = True,
                 dtype: torch.dtype | None = None, mpu: Any = None, **unsupported: Any) -> None:
        on = {k: v for k, v in unsupported.items() if v not in (None, False)}
        if on:
            raise NotImplementedError(f"zero.Init({', '.join(on)}=...) is not supported yet by shardspeed")
        if remote_device not in (None, "cpu", "none") or (remote_device == "cpu" and torch.cuda.is_available()):
            raise NotImplementedError(f"zero.Init(remote_device={remote_device!r}) is not supported yet by shardspeed (offload arrives with ZeRO-Offload)")
        if mpu is not None:
            raise NotImplementedError("zero.Init(mpu=...) is not supported yet by shardspeed")
        self.enabled = enabled
        if not enabled:
            return
        from ..comm.init import init_distributed

        init_distributed()
        self.dp = self._dp_axis(data_parallel_group)
        self.dtype = self._dtype(config_dict_or_path if config_dict_or_path is not None else config, dtype)
        self.device = get_accelerator().device(int(os.environ.get("LOCAL_RANK", "0")))
        self._depth: dict[int, int] = {}
        self.manager = _StandaloneManager()
        self._patched: list[tuple[type, str, Any]] = []
        if module is not None:
            for mod in module.modules():
                self._partition_module(mod)

    @staticmethod
    def _dp_axis(group: Any) -> AxisGroup:
        if group is None:
            return Topology.data_parallel().axis("data")
        ranks = dist.get_process_group_ranks(group)
        return AxisGroup(group, tuple(ranks), dist.get_rank(group))

    @staticmethod
    def _dtype(config: Any, dtype: torch.dtype | None) -> torch.dtype:
        if config is not None:
            from ..config.loader import read_config

            raw = read_config(config)
            for key, value in _DTYPES.items():
                if isinstance(raw.get(key), dict) and raw[key].get("enabled") in (True, "true"):
                    return value
        return dtype or torch.get_default_dtype()

    # ---- the context ------------------------------------------------------------------------------
    def __enter__(self) -> "Init":
        if not self.enabled:
            return self
        self.manager.active = True
        # Tensors are created where they will live, so every initialiser draws from that device's
        # generator: the same numbers as building the model whole there.
        self._device_mode = torch.device(self.device) if self.device.type != "cpu" else None
        if self._device_mode is not None:
            self._device_mode.__enter__()
        classes: list[type[torch.nn.Module]] = [torch.nn.Module, *_all_subclasses(torch.nn.Module)]
        for cls in classes:
            self._patch_class(cls)
        original_subclass_hook = torch.nn.Module.__dict__.get("__init_subclass__")
        ctx = self

        def __init_subclass__(cls: type[torch.nn.Module], **kwargs: Any) -> None:  # classes defined inside the block
            super(torch.nn.Module, cls).__init_subclass__(**kwargs)
            ctx._patch_class(cls)

        self._patched.append((torch.nn.Module, "__init_subclass__", original_subclass_hook))
        # Patched (and restored in __exit__) by name: these are torch's class attributes, replaced for the block.
        setattr(torch.nn.Module, "__init_subclass__", classmethod(__init_subclass__))
        self._patched.append((torch.nn.Module, "apply", torch.nn.Module.__dict__["apply"]))
        setattr(torch.nn.Module, "apply", self._wrap_apply(torch.nn.Module.__dict__["apply"], self.manager))
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        if exc[0] is None:
            self.manager.settle()
        self.manager.active = False
        for cls, attr, original in reversed(self._patched):
            if original is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, original)
        self._patched.clear()
        if self._device_mode is not None:
            self._device_mode.__exit__(*exc)

    def _patch_class(self, cls: type) -> None:
        if cls is not torch.nn.Module and "__init__" in cls.__dict__:
            original = cls.__dict__["__init__"]
            self._patched.append((cls, "__init__", original))
            setattr(cls, "__init__", self._wrap_init(original))
        if "_init_weights" in cls.__dict__ and callable(cls.__dict__["_init_weights"]):
            original = cls.__dict__["_init_weights"]
            self._patched.append((cls, "_init_weights", original))
            setattr(cls, "_init_weights", self._wrap_init_weights(original, self.manager))

    def _wrap_init(self, original: Any) -> Any:
        ctx = self

        @functools.wraps(original)
        def __init__(module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            key = id(module)
            ctx._depth[key] = ctx._depth.get(key, 0) + 1
            try:
                original(module, *args, **kwargs)
            finally:
                ctx._depth[key] -= 1
                outermost = ctx._depth[key] == 0
                if outermost:
                    del ctx._depth[key]
            if outermost:
                ctx.manager.settle()  # in-place initialisation of children ends with their parent's __init__
                ctx._partition_module(module)

        return __init__

    @staticmethod
    def _wrap_apply(original: Any, manager: _StandaloneManager) -> Any:
        # `model.apply(init_fn)` at the end of a constructor re-initialises children that are
        # already partitioned: each call of init_fn gathers what it touches (DeepSpeed's
        # `override_module_apply`).
        @functools.wraps(original)
        def apply(module: torch.nn.Module, fn: Any) -> torch.nn.Module:
            if getattr(fn, "_gathers_on_touch", False):
                return original(module, fn)

            def gathering(m: torch.nn.Module) -> Any:
                with _GatherOnTouch(manager):
                    return fn(m)

            setattr(gathering, "_gathers_on_touch", True)  # a mark on the function, read back with getattr
            return original(module, gathering)

        return apply

    @staticmethod
    def _wrap_init_weights(original: Any, manager: _StandaloneManager) -> Any:
        # Hugging Face's `_init_weights(module)` may reach into the module's children (GPT-2's
        # scaled c_proj init): gather whatever it touches, not the whole subtree.
        @functools.wraps(original)
        def _init_weights(self: torch.nn.Module, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            with _GatherOnTouch(manager):
                return original(self, module, *args, **kwargs)

        return _init_weights

    def _partition_module(self, module: torch.nn.Module) -> None:
        """Partition the module's own parameters that are still whole; move its buffers to the device."""
        fresh = [(n, p) for n, p in module._parameters.items() if p is not None and not is_partitioned(p)]
        with torch.no_grad():
            for name, buf in module._buffers.items():
                if buf is not None:
                    moved = buf.to(self.device)
                    module._buffers[name] = moved.to(self.dtype) if moved.is_floating_point() else moved
            for name, p in fresh:
                p.data = p.data.to(device=self.device, dtype=self.dtype if p.is_floating_point() else p.dtype)
                if self.dp.size > 1:  # every rank starts from rank 0's values, as after initialize()
                    dist.broadcast(p.data, src=self.dp.ranks[0], group=self.dp.group)
                unit = Unit([p], [f"{type(module).__name__}.{name}"], self.dp, self.manager, p.dtype, self.device)
                unit.adopt()


class OnDevice:
    """DeepSpeed's `deepspeed.OnDevice`: modules built inside are created on `device` ("meta": shapes
    only, no memory; fill them later, e.g. from a checkpoint) with floating-point tensors of `dtype`."""

    def __init__(self, dtype: torch.dtype | None = None, device: str | torch.device = "meta", enabled: bool = True) -> None:
        self.dtype, self.device, self.enabled = dtype, torch.device(device), enabled
        self._saved_dtype: torch.dtype | None = None

    def __enter__(self) -> "OnDevice":
        if self.enabled:
            self.device.__enter__()  # torch's default-device context
            if self.dtype is not None:
                self._saved_dtype = torch.get_default_dtype()
                torch.set_default_dtype(self.dtype)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            if self._saved_dtype is not None:
                torch.set_default_dtype(self._saved_dtype)
                self._saved_dtype = None
            self.device.__exit__(*exc)


class GatheredParameters:
    """Whole parameters inside the block; with `modifier_rank`, that rank's changes are kept on exit.

    Every rank of the data-parallel group must enter the block (gathering is collective). Works on
    one parameter, any iterable of them, and on parameters that are not partitioned (a no-op).
    """

    def __init__(self, params: torch.Tensor | Iterable[torch.Tensor], modifier_rank: int | None = None,
                 fwd_module: Any = None, enabled: bool = True) -> None:
        if isinstance(params, torch.Tensor):
            params = [params]
        self.params = list(params) if enabled else []
        self.modifier_rank = modifier_rank
        self.units: list[Unit] = []
        for p in self.params:
            if is_partitioned(p) and not any(p.ds_unit is u for u in self.units):
                self.units.append(p.ds_unit)
        self._was_gathered: list[bool] = []

    def __enter__(self) -> None:
        for unit in self.units:
            self._was_gathered.append(unit.full is not None)
            unit.gather()
            unit.users += 1

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None and self.modifier_rank is not None:
            for unit in self.units:
                unit.keep_values_of(self.modifier_rank)
                unit.manager.refresh_masters(unit)
        for unit, was in zip(self.units, self._was_gathered):
            unit.users -= 1
            if not was and unit.users == 0:
                unit.manager.release_unit(unit)


def register_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter) -> None:
    """DeepSpeed's way to say `module` uses `parameter` of another module in its forward.

    shardspeed notices such uses by itself (the first forward that touches the parameter adds it
    to the module), so this only has to exist for code written for DeepSpeed.
    """


def unregister_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter) -> None:
    """Counterpart of `register_external_parameter`; nothing to undo."""


__all__ = ["GatheredParameters", "Init", "OnDevice", "ParameterNotGatheredError", "register_external_parameter", "unregister_external_parameter"]
