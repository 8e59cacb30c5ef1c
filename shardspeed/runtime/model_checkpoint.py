"""Engine checkpoints with DeepSpeed's layout and semantics, written so a crash never loses one.

    save_dir/
      latest                      the newest complete tag (replaced last, atomically)
      <tag>/manifest.json         SHA-256 of every file below
      <tag>/mp_rank_00_model_states.pt   module, counters, LR schedule, client state (rank 0)
      <tag>/mp_rank_<t>_model_states.pt  the same for tensor-parallel shard t (its data-parallel rank 0)
      <tag>/rank_<r>_states.pt    this rank's optimizer-side state and RNG states

A checkpoint loads at any data-parallel size and any tensor-parallel size (the shards are merged and
cut again by the loading model's partition marks).

A save goes to `save_dir/.<tag>.partial`, which rank 0 renames to `<tag>` once every rank has
written and the manifest is complete; only then is `latest` replaced.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..comm.topology import Axis
from ..tensor_parallel.reshard import partition_marks, reshard_tensors, reshard_universal
from ..zero.param_names import checkpoint_names, fused_expert_rows, is_expert
from ..zero.universal import merge_shards, reslice_rows
from .expert_states import to_local_experts, with_all_experts
from .checkpoint_io import CheckpointError, atomic_write_bytes, fsync_dir, load_verified, read_manifest, save_torch, write_manifest

if TYPE_CHECKING:
    from .engine import ShardspeedEngine

MODEL_FILE = "mp_rank_00_model_states.pt"
LATEST = "latest"


def model_file(tp_rank: int) -> str:
    """DeepSpeed's name for the module file of tensor-parallel shard `tp_rank`."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def _rank_file(rank: int) -> str:
    return f"rank_{rank}_states.pt"


def save(engine: "ShardspeedEngine", save_dir: str, tag: str | None, client_state: dict[str, Any],
         save_latest: bool, exclude_frozen: bool) -> bool:
    tag, root, partial = begin_save(engine, save_dir, tag)
    rank = engine.global_rank
    tp = engine.topology.axis(Axis.TENSOR)
    module_state = engine.module_state_dict(exclude_frozen)  # collective at stage 3 (gathers the weights)
    module_state = with_all_experts(engine.module, module_state)  # collective over expert groups, if any
    digests = {_rank_file(rank): save_torch(_rank_state(engine), partial / _rank_file(rank))}
    if engine.topology.axis(Axis.DATA).rank == 0:  # one module file per tensor-parallel shard
        digests[model_file(tp.rank)] = save_torch(_model_state(engine, module_state, client_state), partial / model_file(tp.rank))
    gathered: list[tuple[dict[str, str], int]] = [({}, 0) for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, (digests, tp.rank))
    if rank == 0:
        write_manifest(partial, {k: v for d, _ in gathered for k, v in d.items()},
                       {"tag": tag, "world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage(),
                        "tensor_parallel": tp.size, "tp_ranks": [t for _, t in gathered]})
        commit_tag(root, partial, tag, save_latest)
    dist.barrier()
    return True


def begin_save(engine: Any, save_dir: str, tag: str | None) -> tuple[str, Path, Path]:
    """(tag, checkpoint root, empty hidden folder the save is written into); collective."""
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    root = Path(save_dir)
    partial = root / f".{tag}.partial"
    if engine.global_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier crashed save
        partial.mkdir()
    dist.barrier()
    return tag, root, partial


RECOVERY_SCRIPT_NAME = "zero_to_fp32.py"
# The copy every checkpoint folder carries, as DeepSpeed's do (`cd save_dir && python zero_to_fp32.py . out.bin`).
RECOVERY_SCRIPT = '''#!/usr/bin/env python
"""Consolidate the shardspeed checkpoint in this folder into one fp32 state dict, as DeepSpeed's
zero_to_fp32.py does:

    python zero_to_fp32.py . pytorch_model.bin        # or an output folder, or *.safetensors

It calls shardspeed's converter (`shardspeed zero-to-fp32 --help` lists the options).
"""
import sys

from shardspeed.checkpoint.zero_to_fp32 import main

if __name__ == "__main__":
    sys.exit(main())
'''


def commit_tag(root: Path, partial: Path, tag: str, save_latest: bool) -> None:
    """Make the fully written `partial` folder the checkpoint `tag` (replacing an old one), then `latest`."""
    final = root / tag
    if final.exists():
        stale = root / f".{tag}.old"
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        partial.rename(final)
    fsync_dir(root)
    atomic_write_bytes(root / RECOVERY_SCRIPT_NAME, RECOVERY_SCRIPT.encode())
    if save_latest:
        atomic_write_bytes(root / LATEST, tag.encode())


def _model_state(engine: "ShardspeedEngine", module_state: dict[str, Any], client_state: dict[str, Any]) -> dict[str, Any]:
    return {
        "module": module_state,
        # Tied weights appear under several names; optimizer state is kept under the first one.
        "param_aliases": _aliases(engine.module),
        "buffer_names": [n for n, _ in engine.module.named_buffers(remove_duplicate=False)],
        "tp_partitions": partition_marks(engine.module),  # how tensor-parallel shards merge (resharding loads)
        **training_state(engine, client_state),
    }


def training_state(engine: Any, client_state: dict[str, Any]) -> dict[str, Any]:
    """The schedule, counters and client state a checkpoint's model file carries besides weights."""
    scheduler = engine.lr_scheduler
    return {
        "lr_scheduler": scheduler.state_dict() if scheduler is not None and hasattr(scheduler, "state_dict") else None,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "micro_steps": engine.micro_steps,
        "skipped_steps": engine.skipped_steps,
        "dp_world_size": engine.dp_world_size,
        "zero_stage": engine.zero_optimization_stage(),
        "client_state": client_state,
    }


def restore_counters(engine: Any, model_state: dict[str, Any]) -> None:
    """The step counters `training_state` saved; samples/s at the next print counts from here, not
    from the engine's start (the counters just jumped)."""
    for key in ("global_steps", "global_samples", "micro_steps", "skipped_steps"):
        setattr(engine, key, model_state[key])
    engine.restart_throughput_clock()


def _aliases(module: torch.nn.Module) -> dict[str, str]:
    first: dict[torch.nn.Parameter, str] = {}
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p in first:
            aliases[name] = first[p]
        else:
            first[p] = name
    return aliases


def _rank_state(engine: "ShardspeedEngine") -> dict[str, Any]:
    state: dict[str, Any] = {
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        # A replicated state is the same on every data-parallel rank: its rank 0 (per tensor shard) saves it.
        # Experts split over expert-parallel ranks are saved by the first rank of each expert-data group.
        "optimizer": engine.strategy.state_dict() if engine.optimizer is not None and (
            not engine.strategy.replicated or engine.topology.axis(Axis.DATA).rank == 0
            or any(is_expert(p) for p in engine.module.parameters())) else None,
        "dataloader": engine.training_dataloader.state_dict() if engine.training_dataloader is not None else None,
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["rng"]["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional
        pass
    return state


def resolve_tag(root: Path, tag: str | None) -> str | None:
    if tag is not None:
        return str(tag)
    latest = root / LATEST
    if not latest.is_file():
        return None
    return latest.read_text().strip()


def load(engine: "ShardspeedEngine", load_dir: str, tag: str | None, strict: bool, load_optimizer_states: bool,
         load_lr_scheduler_states: bool, load_module_only: bool) -> tuple[str | None, dict[str, Any] | None]:
    root = Path(load_dir)
    tag = resolve_tag(root, tag)
    if tag is None:
        if engine.global_rank == 0:
            import logging

            logging.getLogger("shardspeed").warning("no `latest` file in %s and no tag given: nothing loaded", root)
        return None, None
    folder = root / tag
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder `{folder}` does not exist (tag {tag!r})")
    manifest = read_manifest(folder)
    tp = engine.topology.axis(Axis.TENSOR)
    saved_tp = int(manifest.get("tensor_parallel", 1))
    # Another tensor-parallel size: every old shard is read, merged and cut as this run cuts it.
    resharding = saved_tp != tp.size
    if resharding:
        model_files = [load_verified(folder, model_file(t), manifest) for t in range(saved_tp)]
        cut = (model_files[0].get("tp_partitions", {}), partition_marks(engine.module), tp)
        model_state = {**model_files[0], "module": reshard_tensors([f["module"] for f in model_files], *cut)}
        del model_files
    else:
        model_state = load_verified(folder, model_file(tp.rank), manifest)
    engine.load_module_state_dict(to_local_experts(engine.module, model_state["module"]), strict=strict)
    engine.strategy.sync_masters_from_model()
    if load_module_only:
        return str(folder), model_state["client_state"]
    saved_world = int(manifest.get("world_size", 1))
    tp_ranks = manifest.get("tp_ranks") or [0] * saved_world  # each saved rank's tensor shard
    # The saved ranks that held this rank's tensor shard; with another size, any rank (RNG state only).
    peers = [r for r in range(saved_world) if resharding or tp_ranks[r] == tp.rank]
    own = engine.global_rank if engine.global_rank in peers else peers[0]
    if load_optimizer_states and engine.optimizer is not None:
        # Any saved data-parallel layout: merge each tensor shard's data-parallel pieces per parameter,
        # then (another tensor-parallel size) merge the shards and keep this rank's slice.
        states = {r: load_verified(folder, _rank_file(r), manifest) for r in peers}
        rank_state = states[own]
        if resharding:
            per_shard = [merge_shards([s["optimizer"] for r, s in states.items() if tp_ranks[r] == t]) for t in range(saved_tp)]
            universal = reshard_universal(per_shard, *cut)
        else:
            universal = merge_shards([s["optimizer"] for s in states.values()])
        del states
        # Fused-experts weights saved at another expert-parallel size: cut to the rows this rank holds.
        wanted: dict[str, tuple[str, int, int, int] | None] = {name: None for name in checkpoint_names(engine.module).values()}
        universal["params"] = reslice_rows(universal["params"], {**wanted, **fused_expert_rows(engine.module)})
        engine.strategy.load_universal(universal)
    else:
        rank_state = load_verified(folder, _rank_file(own), manifest)
    if load_lr_scheduler_states and engine.lr_scheduler is not None and model_state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(model_state["lr_scheduler"])
    restore_counters(engine, model_state)
    _restore_rng(rank_state["rng"])
    if (rank_state.get("dataloader") is not None and engine.training_dataloader is not None
            and saved_world == dist.get_world_size() and not resharding):  # the same data-parallel layout
        engine.training_dataloader.load_state_dict(rank_state["dataloader"])
    return str(folder), model_state["client_state"]


def _restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if "numpy" in rng:
        import numpy as np

        np.random.set_state(rng["numpy"])


def save_16bit_model(engine: "ShardspeedEngine", save_dir: str, filename: str, exclude_frozen: bool) -> bool:
    """The module's weights in their training dtype, as one torch file written by rank 0
    (tensor-parallel shards gathered: the file loads into the unsharded model).

    At stage 3 the weights are gathered only when `stage3_gather_16bit_weights_on_model_save` is
    set; otherwise nothing is written and False is returned, as DeepSpeed does.
    """
    if engine.strategy.partitions_parameters and not engine.zero_gather_16bit_weights_on_model_save():
        if engine.global_rank == 0:
            import logging

            logging.getLogger("shardspeed").warning(
                "did not save the model %s: set zero_optimization.stage3_gather_16bit_weights_on_model_save to true "
                "to gather stage-3 weights on save (or use save_checkpoint and `shardspeed zero-to-fp32`)",
                Path(save_dir) / filename)
        return False
    whole = engine.whole_module_state_dict(exclude_frozen)  # collective at stage 3 and under tensor parallelism
    whole = with_all_experts(engine.module, whole)  # every expert, under its global index
    if engine.global_rank == 0:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in whole.items()}
        save_torch(state, Path(save_dir) / filename)
    dist.barrier()
    return True


__all__ = ["CheckpointError", "load", "save", "save_16bit_model"]
