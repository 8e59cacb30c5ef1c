"""The training engine: owns the order of a step and delegates partitioning to a ZeRO strategy.

A step, as DeepSpeed users know it:
    loss = engine(batch)        # forward (inputs cast for fp16 auto_cast)
    engine.backward(loss)       # loss / gradient_accumulation_steps, scaled for fp16; gradients
                                # are all-reduced during this backward only on a boundary
    engine.step()               # at the boundary: unscale, overflow check, clip, optimizer step,
                                # LR step; otherwise only counts the micro step
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ..accelerator import get_accelerator
from ..comm.dist_api import configure as configure_comms_logger
from ..comm.topology import Axis, Topology
from ..config.schema import ShardspeedConfig
from ..config.unbuilt import NotBuiltError
from ..monitor import MonitorMaster, WallClockTimers
from ..offload.optimizer_offload import TIMER_NAMES as OFFLOAD_TIMERS
from ..optim.loss_scaler import LossScaler
from ..optim.precision import Precision
from ..profiling.flops_profiler.step_profile import StepProfile
from ..tensor_parallel.consolidate import full_state_dict
from ..tensor_parallel.layers import is_tensor_parallel
from ..zero import StepResult, ZeroStrategy, build_zero_strategy
from ..zero.base import NormScope
from ..zero.module_only import drop_frozen
from . import model_checkpoint as checkpointing

logger = logging.getLogger("shardspeed")

FORWARD, BACKWARD, STEP = "forward", "backward", "step"


class ShardspeedEngine(torch.nn.Module):
    """Wraps the user's module; built by `shardspeed.initialize`, not directly."""

    def __init__(
        self,
        module: torch.nn.Module,
        config: ShardspeedConfig,
        topology: Topology,
        optimizer: torch.optim.Optimizer | None,
        lr_scheduler: Any,
        loss_scaler: LossScaler,
        training_dataloader: Any = None,
        config_as_written: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self._config = config  # typed; `config` is the dict the user wrote, as DeepSpeed's engine.config is
        self._config_as_written = config_as_written
        self._compiled = False  # engine.compile() was called
        self._destroyed = False  # engine.destroy() was called: hooks are off the module
        self.topology = topology
        self.accelerator = get_accelerator()
        self.lr_scheduler = lr_scheduler
        self.loss_scaler = loss_scaler
        self.training_dataloader = training_dataloader
        self.timers = WallClockTimers(enabled=config.wall_clock_breakdown, rank=self.global_rank)
        configure_comms_logger(config)  # an enabled `comms_logger` section times every collective from here on
        # Stage 3 partitions parameters even without an optimizer (inference, frozen reference models).
        self.strategy: ZeroStrategy = build_zero_strategy(
            config, module, optimizer, topology, Precision.from_config(config, loss_scaler), self.timers,
            self._norm_scope(), pipeline=self._is_pipeline)
        self.optimizer = optimizer
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self._boundary_override: bool | None = None
        self._step_applied = False
        self._global_grad_norm: float | None = None
        self._window_losses: list[torch.Tensor] = []
        self._last_print = (time.perf_counter(), 0)
        self.monitor = MonitorMaster(config.tensorboard, config.csv_monitor, config.wandb, rank=self.global_rank)
        self._flops_step = StepProfile(self, config.flops_profiler)  # the `flops_profiler` section (inert when off)

    _is_pipeline = False  # PipelineEngine: the module is one pipeline stage

    def _norm_scope(self) -> NormScope:
        """The gradient norm spans this rank's model replica (pipeline stages, tensor shards)."""
        replica = self.topology.axis(Axis.MODEL_PARALLEL)
        return NormScope(replica.group if replica.size > 1 else None, frozenset(self._counted_elsewhere()))

    def _counted_elsewhere(self) -> set[torch.Tensor]:
        """Parameters whose gradient another rank of the replica counts: tensor-parallel rank 0 counts the replicated ones."""
        if self.topology.axis(Axis.TENSOR).rank == 0:
            return set()
        return {p for p in self.module.parameters() if not is_tensor_parallel(p)}

    # ---- DeepSpeed-named accessors, read from the typed config ------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The ds_config as the user wrote it (DeepSpeed's `engine.config`, which Hugging Face's Trainer
        reads with `.get(...)`); the parsed, typed config is `engine._config`."""
        if self._config_as_written is not None:
            return self._config_as_written
        return self._config.model_dump(exclude_unset=True)

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        return self._config.zero_optimization.gather_16bit_weights_on_model_save

    def compile(self, backend: str = "inductor", compile_kwargs: dict[str, Any] | None = None,
                schedule: Any = None) -> None:
        """DeepSpeed's `engine.compile(backend, compile_kwargs)`: torch.compile the wrapped module in place.
        Stage 3's gather hooks stay eager, between compiled graphs."""
        if schedule is not None:
            raise NotBuiltError("engine.compile(schedule=...): DeepCompile's schedules are not supported yet by shardspeed")
        self.module.compile(backend=backend, **(compile_kwargs or {}))
        self._compiled = True

    @property
    def is_compiled(self) -> bool:
        return self._compiled

    # The three batch sizes are optional in a ds_config; load_config fills in the missing ones.
    def train_batch_size(self) -> int:
        assert self._config.train_batch_size is not None
        return self._config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        assert self._config.train_micro_batch_size_per_gpu is not None
        return self._config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        assert self._config.gradient_accumulation_steps is not None
        return self._config.gradient_accumulation_steps

    def zero_optimization_stage(self) -> int:
        return self._config.zero_stage

    def gradient_clipping(self) -> float:
        return self._config.gradient_clipping

    def fp16_enabled(self) -> bool:
        return self._config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        return self._config.bf16.enabled

    def steps_per_print(self) -> int | None:
        return self._config.steps_per_print

    @property
    def device(self) -> torch.device:
        return self.accelerator.device(self.local_rank)

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def global_rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def dp_world_size(self) -> int:
        return self.topology.axis(Axis.DATA).size

    def get_data_parallel_rank(self) -> int:
        return self.topology.axis(Axis.DATA).rank

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups] if self.optimizer else []

    def get_global_grad_norm(self) -> float | None:
        return self._global_grad_norm

    def was_step_applied(self) -> bool:
        return self._step_applied

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary_override is not None:
            return self._boundary_override
        if not self._config.managed_gradient_accumulation:
            return True
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Override the boundary for the next backward/step (DeepSpeed's manual accumulation hook)."""
        self._boundary_override = is_boundary

    # ---- the step ------------------------------------------------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        self._require_alive("forward")
        if self._config.fp16.enabled and self._config.fp16.auto_cast:
            inputs, kwargs = _cast_floats((inputs, kwargs), torch.float16)
        self.timers(FORWARD).start()
        with self._flops_step.forward():
            out = self.module(*inputs, **kwargs)
        self.timers(FORWARD).stop()
        return out

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backward of `loss` / gradient_accumulation_steps; returns the loss it was given."""
        self._require_alive("backward")
        self._require_optimizer("backward")
        if not loss.requires_grad:
            raise RuntimeError("engine.backward: the loss does not require grad (was it computed under torch.no_grad()?)")
        self._window_losses.append(loss.detach())
        gas = self.gradient_accumulation_steps()
        scaled = loss / gas if scale_wrt_gas and gas > 1 else loss
        self.timers(BACKWARD).start()
        self.strategy.prepare_backward(self.is_gradient_accumulation_boundary())
        self.strategy.backward(scaled, retain_graph=retain_graph)
        self.timers(BACKWARD).stop()
        return loss

    def step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        """Count the micro step; at an accumulation boundary, take the optimizer step."""
        self._require_alive("step")
        self._require_optimizer("step")
        if self.is_gradient_accumulation_boundary():
            self.timers(STEP).start()
            result = self.strategy.step(self._config.gradient_clipping)
            self.strategy.zero_grad()
            self.timers(STEP).stop()
            self._after_model_step(result, lr_kwargs)
            self._flops_step.after_model_step()
        self.micro_steps += 1
        self._boundary_override = None

    def _after_model_step(self, result: StepResult, lr_kwargs: dict[str, Any] | None) -> None:
        self._step_applied = result.applied
        # DeepSpeed's optimizers carry `overflow`; accelerate reads it to see fp16 steps skipped.
        setattr(self.optimizer, "overflow", result.overflow)
        self._global_grad_norm = result.grad_norm
        if result.applied:
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))
        else:
            self.skipped_steps += 1
            logger.info("[rank %d] fp16 overflow: step %d skipped, loss scale now %s", self.global_rank, self.global_steps, self.loss_scaler.loss_scale)
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        window_loss = torch.stack(self._window_losses).float().mean().item() if self._window_losses else float("nan")
        self._window_losses.clear()
        self._report(window_loss)

    def _report(self, loss: float) -> None:
        if self.monitor.enabled:
            self.monitor.write_events([
                ("Train/Samples/train_loss", loss, self.global_samples),
                ("Train/Samples/lr", self.get_lr()[0], self.global_samples),
                ("Train/Samples/loss_scale", self.loss_scaler.loss_scale, self.global_samples),
            ])
        every = self._config.steps_per_print
        if every and self.global_steps % every == 0:
            now = time.perf_counter()
            then, steps = self._last_print
            rate = (self.global_steps - steps) * self.train_batch_size() / max(now - then, 1e-9)
            self._last_print = (now, self.global_steps)
            if self.global_rank == 0:
                logger.info(
                    "[rank 0 | %s] step=%d skipped=%d loss=%.4f lr=%s loss_scale=%s samples/s=%.1f",
                    self.topology.describe(), self.global_steps, self.skipped_steps, loss,
                    [f"{lr:.3e}" for lr in self.get_lr()], self.loss_scaler.loss_scale, rate,
                )
            if self._config.wall_clock_breakdown:
                self.timers.log([FORWARD, BACKWARD, STEP, *OFFLOAD_TIMERS], normalizer=every)
        if self._config.memory_breakdown and every and self.global_steps % every == 0 and self.global_rank == 0:
            logger.info("[rank 0] memory breakdown (bytes): %s", self.memory_breakdown())

    def restart_throughput_clock(self) -> None:
        """Samples/s at the next print counts from now (after a checkpoint load moved the step counter)."""
        self._last_print = (time.perf_counter(), self.global_steps)

    def zero_grad(self) -> None:  # type: ignore[override]  # DeepSpeed's engine.zero_grad() takes no set_to_none
        self.strategy.zero_grad()

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients, master weights and optimizer states."""
        return self.strategy.memory_breakdown()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate without communicating, whatever the boundary says."""
        previous = self._boundary_override
        self._boundary_override = False
        try:
            yield
        finally:
            self._boundary_override = previous

    def _require_alive(self, what: str) -> None:
        if self._destroyed:
            raise RuntimeError(
                f"engine.{what}(): this engine was destroyed by engine.destroy() (accelerate's free_memory() calls it, "
                "and the Hugging Face Trainer's train() calls that) and its hooks are off the model; build a new engine "
                "with shardspeed.initialize. With the Trainer, evaluate() and then train() on one Trainer ends here "
                "(with real DeepSpeed it fails too): train first (evaluate() after train() works), or evaluate in a "
                "separate run")

    def _require_optimizer(self, what: str) -> None:
        if self.optimizer is None:
            raise RuntimeError(
                f"engine.{what}() needs an optimizer: pass optimizer= to initialize or add an `optimizer` section to the config"
            )

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """Every rank must call this. Atomic: a crash mid-save leaves the previous checkpoint loadable."""
        return checkpointing.save(self, save_dir, tag, client_state or {}, save_latest, exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[str | None, dict | None]:
        return checkpointing.load(self, load_dir, tag, load_module_strict, load_optimizer_states,
                                  load_lr_scheduler_states, load_module_only)

    def module_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
        """The module's state dict. At stage 3 every rank must call it and only rank 0 gets the whole (others {})."""
        return self.strategy.module_state_dict(exclude_frozen_parameters)

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        return checkpointing.save_16bit_model(self, save_dir, save_filename, exclude_frozen_parameters)

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor] | None:
        """The full state dict on rank 0, None elsewhere. At stage 3 and under tensor parallelism every
        rank must call it (it gathers)."""
        if self.strategy.partitions_parameters:
            state = self.strategy.module_state_dict(exclude_frozen_parameters)
            return state if self.global_rank == 0 else None
        state = self.whole_module_state_dict(exclude_frozen_parameters)
        return {k: v.detach().clone() for k, v in state.items()} if self.global_rank == 0 else None

    def whole_module_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
        """Whole weights, as the unsharded model names and shapes them: tensor-parallel shards are
        gathered (every rank must call it; all get the whole), stage 3 as `module_state_dict`."""
        tp = self.topology.axis(Axis.TENSOR)
        if tp.size == 1:
            return self.module_state_dict(exclude_frozen_parameters)
        return drop_frozen(self.module, full_state_dict(self.module, tp), exclude_frozen_parameters)

    def load_module_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load whole weights into the module (at stage 3: into every rank's shards)."""
        self.strategy.load_module_state_dict(state_dict, strict)

    def destroy(self) -> None:
        """Remove the engine's hooks from the module and free what it holds (optimizer-side memory,
        swap files). Dropping the last reference to an engine does the same."""
        self._destroyed = True
        self.monitor.close()
        self.strategy.close()


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


DeepSpeedEngine = ShardspeedEngine  # DeepSpeed's name (`deepspeed.runtime.engine.DeepSpeedEngine`), for isinstance checks
