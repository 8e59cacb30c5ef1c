"""Pipeline checkpoints: one file per layer, so a checkpoint loads at any number of stages.

    save_dir/
      latest                          the newest complete tag (replaced last, atomically)
      <tag>/manifest.json             SHA-256 of every file; the saved layout (stages, parts)
      <tag>/mp_rank_00_model_states.pt   counters, LR schedule, client state (rank 0; module: None)
      <tag>/layer_XX-model_states.pt  layer XX's state dict, written by data-parallel rank 0 of its stage
                                      (a tied module is written under every layer index that uses it)
      <tag>/rank_<r>_states.pt        rank r's optimizer shard (ZeRO-1: every rank; stage 0: data-parallel
                                      rank 0 of each stage), RNG states and dataloader position

Optimizer states are kept per parameter name, and names are `"{layer}.{name}"` whatever the
partition, so a rank loading layers [a, b) merges the shards of the saved stages that held them.
Writes are crash-safe like the engine's (`runtime.model_checkpoint`): a partial folder renamed once
every rank has written.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..runtime.checkpoint_io import CheckpointError, load_verified, read_manifest, save_torch, write_manifest
from ..runtime.model_checkpoint import MODEL_FILE, begin_save, commit_tag, resolve_tag, restore_counters, training_state
from ..zero.universal import merge_shards
from .partition import stage_of

if TYPE_CHECKING:
    from .engine import PipelineEngine


def layer_file(idx: int) -> str:
    return f"layer_{idx:02d}-model_states.pt"


def _rank_file(rank: int) -> str:
    return f"rank_{rank}_states.pt"


def save(engine: "PipelineEngine", save_dir: str, tag: str | None, client_state: dict[str, Any],
         save_latest: bool, exclude_frozen: bool) -> bool:
    tag, root, partial = begin_save(engine, save_dir, tag)
    rank = engine.global_rank
    dp_rank = engine.topology.axis("data").rank
    digests: dict[str, str] = {}
    if dp_rank == 0:
        for idx, module in engine.module.local_layers().items():
            digests[layer_file(idx)] = save_torch(_layer_state(module, exclude_frozen), partial / layer_file(idx))
    digests[_rank_file(rank)] = save_torch(_rank_state(engine, dp_rank), partial / _rank_file(rank))
    if rank == 0:
        digests[MODEL_FILE] = save_torch(_model_state(engine, client_state), partial / MODEL_FILE)
    gathered: list[dict[str, str]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, digests)
    if rank == 0:
        grid = engine.module.topology()
        layout = {"num_stages": engine.num_stages, "parts": list(engine.module.parts),
                  "stage_of_rank": [grid.get_coord(r).pipe for r in range(dist.get_world_size())]}
        write_manifest(partial, {k: v for d in gathered for k, v in d.items()},
                       {"tag": tag, "world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage(),
                        "pipeline": layout})
        commit_tag(root, partial, tag, save_latest)
    dist.barrier()
    return True


def _layer_state(module: torch.nn.Module, exclude_frozen: bool) -> dict[str, torch.Tensor]:
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad} if exclude_frozen else set()
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k not in frozen}


def _model_state(engine: "PipelineEngine", client_state: dict[str, Any]) -> dict[str, Any]:
    return {"module": None, **training_state(engine, client_state)}  # weights: per layer files, as DeepSpeed's


def _rank_state(engine: "PipelineEngine", dp_rank: int) -> dict[str, Any]:
    strategy = engine.strategy
    keep = engine.optimizer is not None and (not strategy.replicated or dp_rank == 0)
    rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {
        "stage": engine.stage_id,
        "optimizer": strategy.state_dict() if keep else None,
        "rng": rng,
        "dataloader": engine.training_dataloader.state_dict() if engine.training_dataloader is not None else None,
    }


def load(engine: "PipelineEngine", load_dir: str, tag: str | None, strict: bool, load_optimizer_states: bool,
         load_lr_scheduler_states: bool, load_module_only: bool) -> tuple[str | None, dict[str, Any] | None]:
    root = Path(load_dir)
    tag = resolve_tag(root, tag)
    if tag is None:
        return None, None
    folder = root / tag
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder `{folder}` does not exist (tag {tag!r})")
    manifest = read_manifest(folder)
    layout = manifest.get("pipeline")
    if layout is None:
        raise CheckpointError(f"`{folder}` was not saved by a pipeline engine (no per-layer files); load it into a "
                              "plain module with engine.load_checkpoint on a non-pipeline engine")
    model_state = load_verified(folder, MODEL_FILE, manifest)
    layers = engine.module.local_layers()
    for idx, module in layers.items():
        module.load_state_dict(load_verified(folder, layer_file(idx), manifest), strict=strict)
    engine.module.synchronize_tied_weights()
    if engine.strategy is not None:
        engine.strategy.sync_masters_from_model()
    if load_module_only:
        return str(folder), model_state["client_state"]
    if load_optimizer_states and engine.optimizer is not None:
        engine.strategy.load_universal(_merge_stage_shards(folder, manifest, layout, set(layers)))
    if load_lr_scheduler_states and engine.lr_scheduler is not None and model_state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(model_state["lr_scheduler"])
    restore_counters(engine, model_state)
    if manifest.get("world_size") == dist.get_world_size():
        rank_state = load_verified(folder, _rank_file(engine.global_rank), manifest)
        _restore_rng(rank_state["rng"])
        if rank_state.get("dataloader") is not None and engine.training_dataloader is not None:
            engine.training_dataloader.load_state_dict(rank_state["dataloader"])
    return str(folder), model_state["client_state"]


def _merge_stage_shards(folder: Path, manifest: dict[str, Any], layout: dict[str, Any], layers: set[int]) -> dict[str, Any]:
    """Per-parameter optimizer state of every saved stage that held one of `layers`."""
    saved_stages = sorted({stage_of(layout["parts"], idx) for idx in layers})
    merged: dict[str, Any] = {"params": {}}
    for stage in saved_stages:
        ranks = [r for r, s in enumerate(layout["stage_of_rank"]) if s == stage]
        shards = [load_verified(folder, _rank_file(r), manifest)["optimizer"] for r in ranks]
        stage_state = merge_shards(shards)
        merged["params"].update(stage_state["params"])
        merged.setdefault("hyperparams", stage_state["hyperparams"])
        merged.setdefault("loss_scaler", stage_state["loss_scaler"])
    return merged


def load_layer_states(load_dir: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of a pipeline checkpoint as one state dict keyed `"{layer}.{name}"` (no processes needed).

    The keys are those of an `nn.Sequential` of the same layers (a tied module appears under each
    of its layer indices), so a plain, unpipelined model of the same layers can load it.
    """
    root = Path(load_dir)
    tag = resolve_tag(root, tag)
    if tag is None:
        raise CheckpointError(f"no `latest` file in {root} and no tag given")
    folder = root / tag
    manifest = read_manifest(folder)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(manifest["files"]):
        if name.startswith("layer_") and name.endswith("-model_states.pt"):
            idx = int(name[len("layer_"):].split("-", 1)[0])
            for key, value in load_verified(folder, name, manifest).items():
                state[f"{idx}.{key}"] = value
    return state


def _restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
