"""`PipelineModule`: a model written as a list of layers, of which each rank builds only its stage's.

DeepSpeed's contract: the forward pass is `for layer in layers: x = layer(x)`, where `x` is a
tensor or a tuple of tensors handed to each layer as one argument. Layers are given as
`LayerSpec`s (built lazily, only on the stage that owns them), `nn.Module`s, or plain callables
(`lambda x: x.mean(1)`, no parameters). A `TiedLayerSpec` key names one module used at several
places: within a stage it is one module; across stages each holder builds a copy, and the copies
of its `tied_weight_attr` tensors are kept identical (broadcast from the first holder at start,
gradients all-reduced over the holders before each step, by `PipelineEngine`).

Parameter names are partition-independent: layer i's parameters are `"{i}.{name}"` (as in an
`nn.Sequential` of the same layers), a tied module's are `"tied_modules.{key}.{name}"`.
"""
from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..comm.init import init_distributed
from ..comm.groups import groups_for
from ..comm.topology import PipeDataParallelTopology, ProcessTopology, Topology
from .partition import partition, stage_of

logger = logging.getLogger("shardspeed")


class PipelineError(Exception):
    """A pipeline is used in a way it does not support (DeepSpeed's name)."""


class LayerSpec:
    """A layer's class and constructor arguments; `build()` makes it (only on the stage that owns it)."""

    def __init__(self, typename: type[nn.Module], *module_args: Any, **module_kwargs: Any) -> None:
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise RuntimeError("LayerSpec only supports torch.nn.Module types.")
        self.typename, self.module_args, self.module_kwargs = typename, module_args, module_kwargs

    def build(self, log: bool = False) -> nn.Module:
        if log:
            logger.info("building %r", self)
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        args = [repr(a) for a in self.module_args] + [f"{k}={v!r}" for k, v in self.module_kwargs.items()]
        return f"{self.typename.__name__}({', '.join(args)})"


class TiedLayerSpec(LayerSpec):
    """A layer whose module is shared by every layer with the same `key`.

    `forward_fn(module, x)` replaces `module(x)` where given (e.g. an embedding used as the output
    head); `tied_weight_attr` names the tensors kept identical across stages (dotted paths allowed).
    """

    def __init__(self, key: str, typename: type[nn.Module], *module_args: Any,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                 tied_weight_attr: str | list[str] = "weight", **module_kwargs: Any) -> None:
        super().__init__(typename, *module_args, **module_kwargs)
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)


@dataclass(frozen=True)
class TieGroup:
    """The ranks (one per holding stage, in this data-parallel replica) whose copies of `key` stay identical."""

    key: str
    attrs: tuple[str, ...]
    ranks: tuple[int, ...]
    group: Any

    @property
    def owner(self) -> int:
        return self.ranks[0]


class PipelineModule(nn.Module):
    """The layers of one pipeline stage, and the layout of the whole pipeline.

    Building it is collective: every rank constructs it, in the same order (it creates the
    pipeline's process groups). torch.distributed is initialised from the launcher's environment
    if it is not yet. See docs/pipeline.md.
    """

    def __init__(
        self,
        layers: Iterable[Any],
        num_stages: int | None = None,
        topology: ProcessTopology | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        seed_layers: bool = False,
        seed_fn: Callable[[int], None] | None = None,
        base_seed: int = 1234,
        partition_method: str = "parameters",
        activation_checkpoint_interval: int = 0,
        activation_checkpoint_func: Callable[..., Any] | None = None,
        checkpointable_layers: list[str] | None = None,
        dynamic_shape: bool = True,
    ) -> None:
        super().__init__()
        init_distributed(verbose=False)
        self._topo = _pipeline_grid(num_stages, topology)
        self.num_stages = self._topo.get_dim("pipe")
        self.global_rank = dist.get_rank()
        self.stage_id = self._topo.get_coord(self.global_rank).pipe
        self.comm_topology = Topology(self._topo)  # the groups of every axis (collective)
        self.loss_fn = loss_fn
        self.seed_layers, self.seed_fn, self.base_seed = seed_layers, seed_fn, base_seed
        if activation_checkpoint_interval < 0:
            raise ValueError(f"activation_checkpoint_interval must be >= 0, got {activation_checkpoint_interval}")
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func or functools.partial(checkpoint, use_reentrant=False)
        self.checkpointable_layers = checkpointable_layers
        self.dynamic_shape = dynamic_shape  # accepted for DeepSpeed; shapes travel with every message anyway

        self._layer_specs = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
        self._num_layers = len(self._layer_specs)
        counts = _count_params(self._layer_specs) if partition_method.lower() == "parameters" else []
        self.parts = partition(partition_method, [_class_name(s) for s in self._layer_specs], counts, self.num_stages)
        self._local_start, self._local_stop = self.parts[self.stage_id], self.parts[self.stage_id + 1]
        self.forward_funcs: list[Callable[[Any], Any]] = []
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict[str, list[str]] = {}
        self._layer_modules: dict[int, nn.Module] = {}  # global layer index -> module holding its state
        self._build()
        self.tie_groups = self._index_tied_modules()
        self.synchronize_tied_weights()
        if self.global_rank == 0:
            logger.info("[rank 0 | %s] pipeline partition (%s): stage s owns layers [parts[s], parts[s+1]) of %s",
                        self.comm_topology.describe(), partition_method, self.parts)

    # ---- building --------------------------------------------------------------------------------
    def _build(self) -> None:
        for idx in range(self._local_start, self._local_stop):
            spec = self._layer_specs[idx]
            if self.seed_layers:
                (self.seed_fn or _seed_everything)(self.base_seed + idx)
            if isinstance(spec, PipelineModule):
                raise NotImplementedError("a PipelineModule cannot be a layer of another PipelineModule")
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                    self.tied_weight_attrs[spec.key] = spec.tied_weight_attr
                module = self.tied_modules[spec.key]
                self._layer_modules[idx] = module
                self.forward_funcs.append(module if spec.forward_fn is None else functools.partial(spec.forward_fn, module))
            elif isinstance(spec, (LayerSpec, nn.Module)):
                module = spec.build() if isinstance(spec, LayerSpec) else spec
                self.add_module(str(idx), module)
                self._layer_modules[idx] = module
                self.forward_funcs.append(module)
            elif callable(spec):
                self.forward_funcs.append(spec)
            else:
                raise TypeError(f"layer {idx} is a {type(spec).__name__}: use a LayerSpec, an nn.Module or a callable")

    def _index_tied_modules(self) -> dict[str, TieGroup]:
        """One group per tie key and data-parallel replica over the stages holding it (collective)."""
        mine: dict[str, TieGroup] = {}
        keys = sorted({s.key for s in self._layer_specs if isinstance(s, TiedLayerSpec)})
        others = [a for a in self._topo.get_axis_names() if a != "pipe"]
        me = self._topo.get_coord(self.global_rank)
        for key in keys:
            stages = sorted({stage_of(self.parts, i) for i, s in enumerate(self._layer_specs)
                             if isinstance(s, TiedLayerSpec) and s.key == key})
            if len(stages) < 2:
                continue
            holders = [tuple(self._topo.get_rank(pipe=s, **fiber) for s in stages) for fiber in _fibers(self._topo, others)]
            made = groups_for(holders, tag="pipe-ties")  # every rank asks for every group, in the same order
            for fiber, ranks in zip(_fibers(self._topo, others), holders):
                if all(getattr(me, a) == v for a, v in fiber.items()) and self.stage_id in stages:
                    mine[key] = TieGroup(key, tuple(self.tied_weight_attrs[key]), ranks, made[ranks])
        return mine

    # ---- tied weights ----------------------------------------------------------------------------
    def tied_weights(self) -> list[tuple[TieGroup, torch.Tensor]]:
        return [(tie, _getattr_path(self.tied_modules[key], attr)) for key, tie in self.tie_groups.items() for attr in tie.attrs]

    def synchronize_tied_weights(self) -> None:
        """Copy the first holder's tied tensors to the other holders (collective over each tie group)."""
        with torch.no_grad():
            for tie, weight in self.tied_weights():
                dist.broadcast(weight.data, src=tie.owner, group=tie.group)

    def allreduce_tied_weight_gradients(self) -> None:
        """Sum the tied tensors' gradients over their holders, so every copy takes the same step."""
        for tie, weight in self.tied_weights():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            dist.all_reduce(weight.grad, group=tie.group)

    def duplicate_parameters(self) -> set[torch.Tensor]:
        """Tied parameters that another stage holds the first copy of (counted once in the gradient norm)."""
        return {w for tie, w in self.tied_weights() if tie.owner != self.global_rank}

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, forward_input: Any) -> Any:
        """Run this stage's layers; with an interval, every `interval` layers are one checkpoint."""
        funcs = self.forward_funcs
        interval = self.activation_checkpoint_interval
        if interval == 0:
            return _run(funcs, forward_input)
        x = forward_input
        for start in range(0, len(funcs), interval):
            chunk = funcs[start:start + interval]
            args = x if isinstance(x, tuple) else (x,)
            if self._is_checkpointable(chunk):
                x = self.activation_checkpoint_func(_RunChunk(chunk), *args)
            else:
                x = _RunChunk(chunk)(*args)
        return x

    def _is_checkpointable(self, funcs: list[Callable[[Any], Any]]) -> bool:
        if self.checkpointable_layers is not None:
            return all(type(f).__name__ in self.checkpointable_layers for f in funcs)
        return any(any(True for _ in f.parameters()) for f in funcs if isinstance(f, nn.Module))

    # ---- DeepSpeed's accessors -------------------------------------------------------------------
    def topology(self) -> ProcessTopology:
        return self._topo

    def mpu(self) -> "PipelineGrid":
        return PipelineGrid(self._topo, self.comm_topology)

    def num_pipeline_stages(self) -> int:
        return self.num_stages

    def partitions(self) -> list[int]:
        return list(self.parts)

    def stage_owner(self, layer_idx: int) -> int:
        return stage_of(self.parts, layer_idx)

    def local_layers(self) -> dict[int, nn.Module]:
        """Global layer index -> module, for this stage's layers that hold state (tied layers included)."""
        return dict(self._layer_modules)

    def set_checkpoint_interval(self, interval: int) -> None:
        self.activation_checkpoint_interval = interval


class _RunChunk:
    def __init__(self, funcs: list[Callable[[Any], Any]]) -> None:
        self.funcs = funcs

    def __call__(self, *inputs: Any) -> Any:
        return _run(self.funcs, inputs[0] if len(inputs) == 1 else inputs)


def _run(funcs: list[Callable[[Any], Any]], x: Any) -> Any:
    for f in funcs:
        x = f(x)
    return x


class PipelineGrid:
    """DeepSpeed's `mpu` view of a pipeline layout (tensor parallelism is 1 here)."""

    def __init__(self, grid: ProcessTopology, groups: Topology) -> None:
        self._topo, self._groups = grid, groups
        self.global_rank = dist.get_rank()

    def get_global_rank(self) -> int:
        return self.global_rank

    def get_stage_id(self) -> int:
        return self._groups.axis("pipe").rank

    def get_pipe_parallel_rank(self) -> int:
        return self._groups.axis("pipe").rank

    def get_pipe_parallel_world_size(self) -> int:
        return self._groups.axis("pipe").size

    def get_pipe_parallel_group(self) -> Any:
        return self._groups.axis("pipe").group

    def get_data_parallel_rank(self) -> int:
        return self._groups.axis("data").rank

    def get_data_parallel_world_size(self) -> int:
        return self._groups.axis("data").size

    def get_data_parallel_group(self) -> Any:
        return self._groups.axis("data").group

    def get_model_parallel_rank(self) -> int:
        return self.get_pipe_parallel_rank()  # pipe x tensor, with tensor size 1

    def get_model_parallel_world_size(self) -> int:
        return self.get_pipe_parallel_world_size()

    def get_model_parallel_group(self) -> Any:
        return self.get_pipe_parallel_group()

    def get_slice_parallel_rank(self) -> int:
        return 0

    def get_slice_parallel_world_size(self) -> int:
        return 1

    def stage_to_global(self, stage_id: int, **kwargs: int) -> int:
        me = self._topo.get_coord(self.global_rank)._asdict()
        return self._topo.get_rank(**{**me, **kwargs, "pipe": stage_id})


def _pipeline_grid(num_stages: int | None, topology: ProcessTopology | None) -> ProcessTopology:
    world = dist.get_world_size()
    if topology is None:
        if num_stages is None:
            raise RuntimeError("PipelineModule needs num_stages= or topology=")
        if num_stages < 1 or world % num_stages:
            raise RuntimeError(f"num_stages ({num_stages}) must divide the distributed world size ({world})")
        return PipeDataParallelTopology(num_pp=num_stages, num_dp=world // num_stages)
    if num_stages is not None and num_stages != topology.get_dim("pipe"):
        raise RuntimeError(f"num_stages={num_stages} disagrees with the topology's pipe size {topology.get_dim('pipe')}")
    if "pipe" not in topology.get_axis_names():
        raise RuntimeError(f"the pipeline topology needs a `pipe` axis, got axes {topology.get_axis_names()}")
    if topology.get_dim("model") > 1:
        raise NotImplementedError("tensor parallelism (a `model` axis larger than 1) inside a pipeline is not supported yet "
                                  "by shardspeed")
    return topology


def _fibers(topo: ProcessTopology, axes: list[str]) -> list[dict[str, int]]:
    """Every combination of coordinates on `axes` (the other axes of one pipeline)."""
    combos: list[dict[str, int]] = [{}]
    for axis in axes:
        combos = [{**c, axis: i} for c in combos for i in range(topo.get_dim(axis))]
    return combos


def _class_name(spec: Any) -> str | None:
    if isinstance(spec, LayerSpec):
        return spec.typename.__name__
    if isinstance(spec, nn.Module):
        return type(spec).__name__
    return getattr(spec, "__name__", None)


def _count_params(specs: list[Any]) -> list[int]:
    """Trainable parameters per layer. LayerSpecs are built on the CPU one at a time, and freed, as
    DeepSpeed does, without touching the RNG (layers with equal specs are built once)."""
    counts, seen = [], {}
    with torch.random.fork_rng(devices=[]):
        for spec in specs:
            if isinstance(spec, LayerSpec):
                key = repr(spec)
                if key not in seen:
                    seen[key] = sum(p.numel() for p in spec.build().parameters() if p.requires_grad)
                counts.append(seen[key])
            elif isinstance(spec, nn.Module):
                counts.append(sum(p.numel() for p in spec.parameters() if p.requires_grad))
            else:
                counts.append(0)
    return counts


def _getattr_path(module: nn.Module, path: str) -> torch.Tensor:
    value: Any = module
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional
        pass
