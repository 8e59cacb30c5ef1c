"""`PipelineEngine`: runs a pipeline schedule over micro batches, then the engine's usual step.

One `train_batch()`:
  1. the schedule (1F1B by default, GPipe on request): forwards and backwards of
     `gradient_accumulation_steps` micro batches, activations and their gradients sent between
     neighbouring stages with point-to-point messages; no data-parallel communication yet;
  2. tied weights' gradients summed over the stages that hold them;
  3. gradients reduced over the data-parallel axis by the engine's ZeRO strategy (stage 0 or 1);
  4. unscale, overflow check and clipping on the norm of the whole pipeline (the strategy's
     NormScope adds the stages' squares, a tied weight counted once), optimizer step, LR step.
What each rank holds: its stage's layers, their gradients and (ZeRO-1: its data-parallel share
of) their optimizer states. Every stage must call `train_batch`; only the first stage reads the
inputs and only the last the labels, but both pull one item per micro batch from their iterator.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..comm.topology import Topology
from ..config.errors import ConfigError
from ..config.schema import ShardspeedConfig
from ..runtime.engine import BACKWARD, FORWARD, STEP, ShardspeedEngine
from ..optim.loss_scaler import LossScaler
from . import checkpoint as pipe_checkpoint
from .module import PipelineError, PipelineModule
from .p2p import Activation, StageChannel, floating, make_p2p_groups
from .schedule import FORWARD as FWD, SCHEDULES, Step, inference


@dataclass
class PipeStats:
    """Seconds of the last batch: its schedule (forwards, backwards, messages) and the part spent waiting to receive."""

    schedule_s: float = 0.0
    recv_wait_s: float = 0.0

    @property
    def idle_fraction(self) -> float:
        return self.recv_wait_s / self.schedule_s if self.schedule_s > 0 else 0.0


@dataclass
class _Micro:
    inputs: Any = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    labels: Any = None
    grads: Any = None  # the posted receive of the outputs' gradients


@dataclass
class _Run:
    micro: dict[int, _Micro] = field(default_factory=dict)
    forwards_left: int = 0
    results: list[Any] = field(default_factory=list)  # last stage: per micro batch loss (or output)
    last_output: Any = None


class PipelineEngine(ShardspeedEngine):
    """Built by `shardspeed.initialize(model=PipelineModule(...))`; use `train_batch` / `eval_batch`."""

    _is_pipeline = True
    module: PipelineModule  # set by ShardspeedEngine.__init__ to the module checked below

    def __init__(self, module: PipelineModule, config: ShardspeedConfig, topology: Topology,
                 optimizer: torch.optim.Optimizer | None, lr_scheduler: Any, loss_scaler: LossScaler,
                 training_dataloader: Any = None, config_as_written: dict[str, Any] | None = None) -> None:
        if not isinstance(module, PipelineModule):
            raise TypeError(f"PipelineEngine needs a PipelineModule, got {type(module).__name__}")
        _check_config(config, module)
        super().__init__(module, config, topology, optimizer, lr_scheduler, loss_scaler, training_dataloader,
                         config_as_written)
        self.stage_id, self.num_stages = module.stage_id, module.num_stages
        self.micro_batches = self.gradient_accumulation_steps()
        self.pipe = topology.axis("pipe")
        prev_rank = self.pipe.ranks[self.stage_id - 1] if self.stage_id > 0 else None
        next_rank = self.pipe.ranks[self.stage_id + 1] if self.stage_id < self.num_stages - 1 else None
        groups = make_p2p_groups(module.topology().get_axis_comm_lists("pipe"), self.global_rank)
        self.channel = StageChannel(prev_rank, next_rank, self.device, groups)
        self.pipeline_schedule: str = config.pipeline.schedule  # a key of SCHEDULES (set_pipeline_schedule)
        self.pipe_stats = PipeStats()
        self.data_iterator: Iterator[Any] | None = None
        self.batch_fn: Any = None
        if config.pipeline.activation_checkpoint_interval > 0:
            module.activation_checkpoint_interval = config.pipeline.activation_checkpoint_interval
        if training_dataloader is not None and self._reads_data():
            self.data_iterator = _repeat(training_dataloader)

    def _counted_elsewhere(self) -> set[torch.Tensor]:
        """Besides tensor-parallel replicas: a tied weight's copies on later stages (the first stage counts it)."""
        return super()._counted_elsewhere() | self.module.duplicate_parameters()

    # ---- DeepSpeed's pipeline accessors ----------------------------------------------------------
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def get_pipeline_parallel_rank(self) -> int:
        return self.stage_id

    @property
    def is_pipe_parallel(self) -> bool:
        return self.num_stages > 1

    def set_dataiterator(self, iterator: Iterator[Any] | None) -> None:
        """Where the first and last stages pull micro batches from (other stages ignore it)."""
        if self._reads_data():
            self.data_iterator = iterator

    def set_dataloader(self, loader: Iterable[Any]) -> None:
        if self._reads_data():
            self.data_iterator = _repeat(loader)

    def set_batch_fn(self, fn: Any) -> None:
        """Post-process every item pulled from the data iterator."""
        self.batch_fn = fn

    def set_pipeline_schedule(self, name: str) -> None:
        """'1f1b' (default: at most `num_stages - stage` micro batches of activations live) or 'gpipe'."""
        if name not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {sorted(SCHEDULES)}")
        self.pipeline_schedule = name

    def _reads_data(self) -> bool:
        return self.is_first_stage() or self.is_last_stage()

    # ---- what a pipeline does not do -------------------------------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise PipelineError("Only train_batch() is accessible in pipeline mode.")

    # ---- training --------------------------------------------------------------------------------
    def train_batch(self, data_iter: Iterator[Any] | None = None) -> torch.Tensor:
        """One optimizer step over `gradient_accumulation_steps` micro batches; returns their mean loss.

        The loss is averaged over micro batches and data-parallel replicas, and every stage
        returns it (as DeepSpeed does).
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled. Use eval_batch() instead.")
        self._require_optimizer("train_batch")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        steps = SCHEDULES[self.pipeline_schedule](self.stage_id, self.num_stages, self.micro_batches)
        run = self._execute(steps, train=True, compute_loss=True)
        self.module.allreduce_tied_weight_gradients()
        self._reduce_data_parallel()
        loss = self._broadcast_loss(self._mean_over_data_parallel(run.results) if self.is_last_stage() else None)
        self.timers(STEP).start()
        result = self.strategy.step(self._config.gradient_clipping)  # clipped on the whole pipeline's norm (NormScope)
        self.strategy.zero_grad()
        self.timers(STEP).stop()
        self.micro_steps += self.micro_batches
        self._window_losses = [loss]
        self._after_model_step(result, None)
        return loss

    def eval_batch(self, data_iter: Iterator[Any] | None, return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: str | None = "avg", bcast_loss: bool = True,
                   num_micro_batches: int | None = None) -> Any:
        """Forward `num_micro_batches` (default: gradient_accumulation_steps) micro batches without gradients.

        With reduce_output='avg' the result is averaged over micro batches and data-parallel
        replicas; with compute_loss and bcast_loss every stage returns it, otherwise only the
        last stage (others: None). return_logits adds the last micro batch's output (last stage).
        """
        if reduce_output not in ("avg", None):
            raise NotImplementedError(f"reduction type {reduce_output} not supported.")
        training_iterator = self.data_iterator
        self.set_dataiterator(data_iter)
        self.module.eval()
        try:
            with torch.no_grad():
                run = self._execute(inference(self.stage_id, self.num_stages, num_micro_batches or self.micro_batches),
                                    train=False, compute_loss=compute_loss, keep_output=return_logits)
        finally:
            self.data_iterator = training_iterator
        output: Any = None
        if self.is_last_stage():
            output = run.results if reduce_output is None else self._mean_over_data_parallel(run.results)
        if compute_loss and bcast_loss and reduce_output is not None:
            output = self._broadcast_loss(output)
        return (output, run.last_output) if return_logits else output

    # ---- the schedule ----------------------------------------------------------------------------
    def _execute(self, steps: list[Step], train: bool, compute_loss: bool, keep_output: bool = False) -> _Run:
        run = _Run(forwards_left=sum(1 for step in steps if step.kind == FWD))
        waited, start = self.channel.wait_seconds, time.perf_counter()
        for step in steps:
            if step.kind == FWD:
                self._forward_micro(run, step.micro_batch, train, compute_loss, keep_output)
            else:
                self._backward_micro(run, step.micro_batch)
        self.channel.flush()
        self.pipe_stats = PipeStats(time.perf_counter() - start, self.channel.wait_seconds - waited)
        return run

    def _forward_micro(self, run: _Run, mb: int, train: bool, compute_loss: bool, keep_output: bool) -> None:
        micro = run.micro.setdefault(mb, _Micro())
        run.forwards_left -= 1
        if self._reads_data():
            batch = self._next_batch()
            if self.is_last_stage():
                micro.labels = _to_device(batch[1], self.device)
        micro.inputs = (self._first_stage_inputs(batch) if self.is_first_stage()
                        else self.channel.recv_activation(train, prefetch_next=run.forwards_left > 0))
        self.timers(FORWARD).start()
        micro.outputs = self.module(micro.inputs)
        self.timers(FORWARD).stop()
        if not self.is_last_stage():
            self.channel.send_activation(micro.outputs)
            if train:
                micro.grads = self.channel.post_grad_recv(floating(micro.outputs))
            else:
                del run.micro[mb]
            return
        loss_fn = self.module.loss_fn
        result = loss_fn(micro.outputs, micro.labels) if compute_loss and loss_fn is not None else micro.outputs
        micro.loss = result
        run.results.append(result.detach() if isinstance(result, torch.Tensor) else result)
        if keep_output:
            run.last_output = micro.outputs
        if not train:
            del run.micro[mb]

    def _backward_micro(self, run: _Run, mb: int) -> None:
        micro = run.micro.pop(mb)
        self.timers(BACKWARD).start()
        self.strategy.prepare_backward(False)  # data-parallel reduction waits for the whole batch
        if self.is_last_stage():
            assert micro.loss is not None  # set by this micro batch's forward on the last stage
            gas = self.micro_batches
            self.strategy.backward(micro.loss / gas if gas > 1 else micro.loss)
        else:
            outputs = floating(micro.outputs)
            grads = self.channel.wait_grads(micro.grads)
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], grad_tensors=[g for _, g in pairs])
        self.timers(BACKWARD).stop()
        if not self.is_first_stage():
            self.channel.send_grads([t.grad if t.grad is not None else torch.zeros_like(t) for t in floating(micro.inputs)])

    def _next_batch(self) -> Any:
        if self.data_iterator is None:
            raise RuntimeError(f"stage {self.stage_id} reads data but has none: pass data_iter= to train_batch/eval_batch "
                               "(on every stage) or training_data= to initialize")
        batch = next(self.data_iterator)
        return self.batch_fn(batch) if self.batch_fn else batch

    def _first_stage_inputs(self, batch: Any) -> Activation:
        inputs = _to_device(batch[0], self.device)
        if self._config.fp16.enabled and self._config.fp16.auto_cast:
            inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs) if isinstance(inputs, tuple) else (
                inputs.half() if inputs.is_floating_point() else inputs)
        return inputs

    # ---- after the schedule ----------------------------------------------------------------------
    def _reduce_data_parallel(self) -> None:
        """Let the ZeRO strategy reduce the accumulated gradients: a boundary backward that adds zeros."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            return
        self.strategy.prepare_backward(True)
        self.strategy.backward(_TouchGradients.apply(*params))

    def _mean_over_data_parallel(self, results: list[Any]) -> torch.Tensor:
        mean = torch.stack([r.float() for r in results]).mean(0)
        dp = self.topology.axis("data")
        if dp.size > 1:
            dist.all_reduce(mean, group=dp.group)
            mean /= dp.size
        return mean

    def _broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The last stage's scalar loss, on every stage of this replica."""
        value = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.is_last_stage():
            assert loss is not None  # the last stage always passes its loss
            value.copy_(loss.reshape(()) if loss.numel() == 1 else torch.tensor(float("nan")))
        if self.num_stages > 1:
            dist.broadcast(value, src=self.pipe.ranks[-1], group=self.pipe.group)
        if self.is_last_stage() and loss is not None and loss.numel() != 1:
            raise ValueError(f"the pipeline's loss must be a scalar, got shape {tuple(loss.shape)}")
        return value

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """Every rank must call this. One file per layer (`layer_XX-model_states.pt`), loadable at any stage count."""
        return pipe_checkpoint.save(self, save_dir, tag, client_state or {}, save_latest, exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[str | None, dict | None]:
        return pipe_checkpoint.load(self, load_dir, tag, load_module_strict, load_optimizer_states,
                                    load_lr_scheduler_states, load_module_only)

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        self._require_one_stage("save_16bit_model")
        return super().save_16bit_model(save_dir, save_filename, exclude_frozen_parameters)

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor] | None:
        self._require_one_stage("_zero3_consolidated_16bit_state_dict")
        return super()._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters)

    def _require_one_stage(self, what: str) -> None:
        if self.num_stages > 1:
            raise PipelineError(f"{what} needs the whole model on one rank, but each of the {self.num_stages} pipeline "
                                "stages holds its own layers; use save_checkpoint and shardspeed.pipe.load_layer_states")


class _TouchGradients(torch.autograd.Function):
    """Forward: a zero scalar from the parameters; backward: a zero gradient for each (runs their gradient hooks)."""

    @staticmethod
    def forward(ctx: Any, *params: torch.Tensor) -> torch.Tensor:
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return torch.zeros((), dtype=torch.float32, device=params[0].device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros((), dtype=dtype, device=device).expand(shape) for shape, dtype, device in ctx.specs)


def _check_config(config: ShardspeedConfig, module: PipelineModule) -> None:
    stages = config.pipeline.stages
    if isinstance(stages, int) and stages != module.num_stages:
        raise ConfigError(f"`pipeline.stages` is {stages} but the PipelineModule has {module.num_stages} stages; "
                          "remove the key or make them agree")


def _repeat(loader: Iterable[Any]) -> Iterator[Any]:
    """Restart the loader at its end (DeepSpeed's RepeatingLoader)."""
    while True:
        yield from loader


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return tuple(_to_device(v, device) for v in value)
    return value
