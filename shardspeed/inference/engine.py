"""DeepSpeed's `InferenceEngine`: a model made ready for generation, alone or over a tensor group.

Construction, in DeepSpeed's order: cast to the config's dtype -> the tensor group (given, from an
mpu, or made: adjacent ranks, world = tp_size x replicas, each replica serving its own prompts) ->
the tensor-parallel shard (AutoTP or an injection policy) -> the fast decode path when
`replace_with_kernel_inject` -> the device -> the tensor group's first rank's RNG state on every
rank of it, so sampling picks the same token everywhere.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..accelerator import get_accelerator
from ..comm.shm_allreduce import ShmAllReduce
from ..comm.topology import AxisGroup, Topology, axis_of_group
from ..config.errors import ConfigError
from .auto_tp import shard_for_inference, use_reduction
from .checkpoint_loading import load_whole_weights, refuse_without_weights
from .config import DeepSpeedInferenceConfig

logger = logging.getLogger("shardspeed")

_MAX_TOKENS_MESSAGE = ("Input with size {size} exceeds maximum length of {limit}. Please increase max_tokens in the "
                       "DeepSpeed Inference Config.")


class InferenceEngine(nn.Module):
    """`module` ready for inference: `engine(...)` is its forward, `engine.generate(...)` its generate."""

    inference_mp_group: Any = None  # DeepSpeed's class attribute: the last tensor group made

    def __init__(self, model: nn.Module, config: DeepSpeedInferenceConfig, zero_engine: Any = None,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
        """`weights`: the state dict `config.checkpoint` names (read by `init_inference`), put into `model`."""
        """`zero_engine`: the ZeRO-3 engine `model` already belongs to (ZeRO-Inference): it is placed, cast
        and partitioned, so nothing here touches its weights."""
        super().__init__()
        object.__setattr__(self, "zero_engine", zero_engine)  # kept alive (its hooks gather the weights), not a child
        self._config = config
        self.module = model
        self.config = config.config if config.config is not None else getattr(model, "config", None)
        self._check(config)
        self.tp = self._tensor_group(config)
        self.mp_group = self.tp.group
        self.mpu = config.tensor_parallel.mpu
        self.injection_dict = config.injection_policy
        self._model_times: list[float] = []
        self._timing = False
        self._compiled = False
        self._shm: ShmAllReduce | None = None
        if zero_engine is None:
            if weights is not None:
                load_whole_weights(model, weights)
            refuse_without_weights(model)
            if config.dtype is not None and config.dtype != torch.int8:
                model.to(config.dtype)
            if self.tp.size > 1:
                _make_identical(model, self.tp)
                shard_for_inference(model, self.tp, config.injection_policy)
            if not config.keep_module_on_host:
                model.to(get_accelerator().device(int(os.environ.get("LOCAL_RANK", "0"))))
            if self.tp.size > 1 and dist.get_backend(self.tp.group) == "gloo":
                # CPU ranks on one host: decode's small all-reduces through shared memory, not gloo's ~300 µs TCP round trip.
                shm = ShmAllReduce(self.tp)
                if shm.active:
                    self._shm = shm
                    use_reduction(model, shm)
        if config.replace_with_kernel_inject:
            from .fast_decode import build_fast_model

            self.module = build_fast_model(model, config.max_out_tokens, self.tp if self.tp.size > 1 else None, reduce=self._shm)
        if self.tp.size > 1:
            _share_rng_state(self.tp)
        model.eval()
        self.module.eval()
        if hasattr(self.module, "generate"):
            self.generate = self._generate

    # ---- set-up ----------------------------------------------------------------------------------
    @staticmethod
    def _check(config: DeepSpeedInferenceConfig) -> None:
        if config.dtype == torch.int8 or config.quant.weight.quantized_initialization or config.quant.weight.post_init_quant:
            raise ConfigError("int8 / quantized inference (`dtype` int8, `quant`) is not supported yet by shardspeed; use "
                              "fp32, fp16 or bf16")
        if config.use_triton:
            raise ConfigError("`use_triton`: DeepSpeed's Triton kernels are not part of shardspeed; remove the key "
                              "(`replace_with_kernel_inject` selects shardspeed's fast decode path)")
        moe = config.moe_config
        if moe.ep_size > 1:
            raise ConfigError(f"`moe.ep_size` {moe.ep_size}: expert-parallel inference is not supported yet by "
                              "shardspeed; tensor parallelism splits MoE experts instead (`tensor_parallel.tp_size`)")
        if config.enable_cuda_graph and config.tensor_parallel.tp_size > 1:
            raise ConfigError("Cuda graph is not supported for model parallelism (`enable_cuda_graph` with "
                              f"`tensor_parallel.tp_size` {config.tensor_parallel.tp_size})")
        if config.enable_cuda_graph and not torch.cuda.is_available():
            logger.warning("`enable_cuda_graph` needs CUDA; running without CUDA graphs")

    def _tensor_group(self, config: DeepSpeedInferenceConfig) -> AxisGroup:
        section = config.tensor_parallel
        size = section.tp_size if section.enabled else 1
        if section.tp_group is not None:
            axis = axis_of_group(section.tp_group)
        elif section.mpu is not None:
            get = getattr(section.mpu, "get_tensor_model_parallel_group", None) or getattr(section.mpu, "get_model_parallel_group")
            axis = axis_of_group(get())
        elif size == 1:
            return AxisGroup(None, (dist.get_rank() if dist.is_initialized() else 0,), 0)
        else:
            from ..comm.init import init_distributed

            init_distributed()
            world = dist.get_world_size()
            if size > world or world % size:
                raise ConfigError(f"`tensor_parallel.tp_size` {size} must divide the world size {world} (each replica "
                                  "of tp_size ranks serves its own prompts)")
            axis = Topology.build(tensor=size).axis("tensor")
        if size > 1 and axis.size != size:
            raise ConfigError(f"`tensor_parallel.tp_size` is {size} but the given tensor group has {axis.size} ranks")
        InferenceEngine.inference_mp_group = axis.group
        return axis

    # ---- use -------------------------------------------------------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if not self._timing:
            return self.module(*inputs, **kwargs)
        start = time.perf_counter()
        out = self.module(*inputs, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._model_times.append(time.perf_counter() - start)
        return out

    def _generate(self, *inputs: Any, **kwargs: Any) -> Any:
        module: Any = self.module
        if hasattr(module, "reset_cache"):
            module.reset_cache()
        input_ids = kwargs.get("input_ids", inputs[0] if inputs and torch.is_tensor(inputs[0]) else None)
        if torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape[-1] > self._config.max_out_tokens:
            raise RuntimeError(_MAX_TOKENS_MESSAGE.format(size=input_ids.shape[-1], limit=self._config.max_out_tokens))
        return module.generate(*inputs, **kwargs)

    def profile_model_time(self, use_cuda_events: bool = True) -> None:
        """Time every forward from now on (`model_times()` returns and clears them)."""
        self._timing = True

    def model_times(self) -> list[float]:
        times, self._model_times = self._model_times, []
        return times

    def compile(self, backend: str = "inductor", compile_kwargs: dict[str, Any] | None = None) -> None:
        """torch.compile the module's forward (DeepSpeed's signature)."""
        if self._compiled:
            return
        setattr(self.module, "forward", torch.compile(self.module.forward, backend=backend, **(compile_kwargs or {})))
        self._compiled = True

    @property
    def is_compiled(self) -> bool:
        return self._compiled

    def destroy(self) -> None:
        """Forget the module (DeepSpeed frees its kernels' workspace here); the shared-memory all-reduce's
        mapping is closed (a later call all-reduces over the group instead)."""
        self._model_times = []
        if self._shm is not None:
            self._shm.close()


def _make_identical(model: nn.Module, tp: AxisGroup) -> None:
    """The tensor group's first rank's weights on all of its ranks, so every rank shards the same model."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=tp.ranks[0], group=tp.group)


def _share_rng_state(tp: AxisGroup) -> None:
    """DeepSpeed broadcasts rank 0's accelerator RNG state at start: sampling then draws the same token on
    every tensor-parallel rank (their logits are equal after the all-reduces)."""
    state = torch.get_rng_state()
    dist.broadcast(state, src=tp.ranks[0], group=tp.group)
    torch.set_rng_state(state)
    if torch.cuda.is_available() and dist.get_backend(tp.group) == "nccl":
        cuda_state = torch.cuda.get_rng_state().cuda()
        dist.broadcast(cuda_state, src=tp.ranks[0], group=tp.group)
        torch.cuda.set_rng_state(cuda_state.cpu())


__all__ = ["InferenceEngine"]
