"""Consolidate a shardspeed checkpoint into one fp32 state dict, as DeepSpeed's `zero_to_fp32.py` does.

Before: `save_dir/<tag>/` holds the module state dict in the training dtype (rank 0's
`mp_rank_00_model_states.pt`) and the fp32 master weights, whole (stage 0: rank 0's
`rank_0_states.pt`) or as flat partitions, one per saved rank (stages 1-2: `rank_<r>_states.pt`).
After: one dict with every key of the saved module state dict, in its order, on the CPU:
- trainable parameters: their fp32 master weights; a tied alias is the same tensor as its canonical
  name (both keys present, as in `module.state_dict()`);
- frozen parameters: the saved values cast to fp32 (dropped with `exclude_frozen_parameters`);
- buffers: as saved (dtype included), when the checkpoint records which entries are buffers
  (`buffer_names`); a checkpoint that does not is read with every non-trainable entry treated as a
  frozen parameter.

Every file is checked against the tag's manifest first (`checkpoint_io.load_verified`), so a damaged
checkpoint fails with the file's name instead of converting garbage. Optimizer moments are dropped as
each rank's file is read and the shards are freed once merged: host memory peaks at about three times
the fp32 weights (while `merge_shards` concatenates and slices them), or, while a file is read, twice
its size (its bytes, for the digest, and its tensors) over what is already held.

Command line: `shardspeed zero-to-fp32 CHECKPOINT_DIR OUTPUT [-t TAG] [--exclude_frozen_parameters]`, or the
`zero_to_fp32.py` that `save_checkpoint` leaves in every checkpoint folder (`model_checkpoint.RECOVERY_SCRIPT`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runtime.checkpoint_io import MANIFEST, CheckpointError, fsync_dir, load_verified, read_manifest
from ..runtime.model_checkpoint import LATEST, MODEL_FILE, resolve_tag
from ..zero.universal import merge_shards

logger = logging.getLogger("shardspeed")

SAFETENSORS_SUFFIX = ".safetensors"

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Consolidated:
    """A converted checkpoint: the state dict and what the command line reports about it."""

    state_dict: dict[str, torch.Tensor]
    folder: Path
    parameters: int  # elements of the unique parameters (and of buffers the checkpoint does not name)


# ---------------------------------------------------------------- the Python API (DeepSpeed's names)


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir: PathLike, tag: str | None = None,
                                             exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the checkpoint in `checkpoint_dir` (the folder holding `latest`),
    at `tag` (default: the tag named in `latest`), on the CPU. See the module docstring for what each
    entry holds. Raises `CheckpointError` naming the path when the folder, the tag or a file is
    missing or damaged."""
    return consolidate(checkpoint_dir, tag, exclude_frozen_parameters).state_dict


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir: PathLike, output_file: PathLike, tag: str | None = None,
                                               exclude_frozen_parameters: bool = False) -> Consolidated:
    """Write the fp32 state dict to `output_file`: safetensors when it ends in `.safetensors`, else
    `torch.save` (`.bin`, `.pt`, `.pth`). The file appears whole or not at all (temp name, fsync,
    rename). Tied aliases are written as separate copies in safetensors (which cannot store tensors
    that share memory) and once, shared, by `torch.save`."""
    output = Path(output_file)
    if output.is_dir():
        raise ValueError(f"output `{output}` is a directory; give a file name ending in "
                         f"{SAFETENSORS_SUFFIX}, .bin, .pt or .pth")
    result = consolidate(checkpoint_dir, tag, exclude_frozen_parameters)
    safe = output.name.endswith(SAFETENSORS_SUFFIX)
    tensors = standalone_tensors(result.state_dict, share_aliases=not safe)
    output.parent.mkdir(parents=True, exist_ok=True)
    if safe:
        from safetensors.torch import save_file

        _atomic_write(output, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    else:
        _atomic_write(output, lambda tmp: torch.save(tensors, tmp))
    return result


def load_state_dict_from_zero_checkpoint(model: torch.nn.Module, checkpoint_dir: PathLike,
                                         tag: str | None = None) -> torch.nn.Module:
    """Load the checkpoint's fp32 weights into `model` (a plain module, not an engine) with
    `strict=True`, and return it. Values are copied into the model's own parameters, so they take its
    device and dtype. Unlike DeepSpeed, the model is not moved to the CPU and loading is strict."""
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag), strict=True)
    return model


# ---------------------------------------------------------------- reading the checkpoint


def consolidate(checkpoint_dir: PathLike, tag: str | None = None,
                exclude_frozen_parameters: bool = False) -> Consolidated:
    """`get_fp32_state_dict_from_zero_checkpoint`, with the folder it read and a parameter count."""
    folder = checkpoint_folder(Path(checkpoint_dir), tag)
    manifest = read_manifest(folder)
    if int(manifest.get("tensor_parallel", 1)) > 1:
        raise CheckpointError(f"checkpoint `{folder}` holds tensor-parallel shards (size {manifest['tensor_parallel']}); "
                              "zero-to-fp32 cannot merge them without the model (it says how each tensor was cut): load the "
                              "checkpoint into an engine at tensor-parallel size 1, or use engine.save_16bit_model (it gathers the shards)")
    # Masters first: their shards are freed before the module state dict is read.
    masters = read_fp32_masters(folder, manifest)
    model_state = load_verified(folder, MODEL_FILE, manifest)
    module: dict[str, torch.Tensor] = model_state["module"]
    aliases: dict[str, str] = model_state.get("param_aliases") or {}
    buffer_names = model_state.get("buffer_names")
    del model_state  # LR schedule and client state are not needed
    state, parameters = assemble(module, aliases, masters, buffer_names, exclude_frozen_parameters, folder)
    return Consolidated(state, folder, parameters)


def checkpoint_folder(root: Path, tag: str | None) -> Path:
    """`root/<tag>`, the tag defaulting to `root/latest`; a tag folder itself is accepted too."""
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory `{root}` does not exist")
    resolved = resolve_tag(root, tag)
    if resolved is None:
        if (root / MANIFEST).is_file():  # given the tag folder itself, e.g. `ckpt/global_step100`
            return root
        raise CheckpointError(f"no `{LATEST}` file in `{root}` and no tag given: pass -t/--tag "
                              f"(tags there: {', '.join(_tags(root)) or 'none'})")
    if not resolved:
        raise CheckpointError(f"`{root / LATEST}` is empty: pass -t/--tag "
                              f"(tags there: {', '.join(_tags(root)) or 'none'})")
    folder = root / resolved
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder `{folder}` does not exist (tag {resolved!r}; "
                              f"tags in `{root}`: {', '.join(_tags(root)) or 'none'})")
    return folder


def _tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def read_fp32_masters(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{canonical parameter name: fp32 master weight} from every saved rank's optimizer shard.

    Each rank file is verified, then stripped of optimizer moments (2x the weights for Adam) and RNG
    state before the next one is read; the shards are merged (`universal.merge_shards`) and dropped.
    """
    world = int(manifest.get("world_size", 1))
    shards = []
    for rank in range(world):
        shard = load_verified(folder, f"rank_{rank}_states.pt", manifest)["optimizer"]
        shards.append(_without_optimizer_moments(shard))
    if all(shard is None for shard in shards):
        logger.warning("checkpoint `%s` has no optimizer state (saved without an optimizer): "
                       "parameters come from the module weights, cast to fp32", folder)
        return {}
    merged = merge_shards(shards)
    del shards
    return {name: entry["fp32"] for name, entry in merged["params"].items()}


def _without_optimizer_moments(shard: dict[str, Any] | None) -> dict[str, Any] | None:
    """Drop per-parameter optimizer state from a shard (formats of `universal`); only masters are used."""
    if shard is None:
        return None
    if shard.get("format") == "replicated":
        for entry in shard["params"].values():
            entry["state"] = {}
    elif shard.get("format") == "partitioned":
        for group in shard["groups"]:
            group["state"] = {}
    elif shard.get("format") == "param_shards":
        for unit in shard["units"]:
            unit["state"] = {}
    return shard


def assemble(module: dict[str, torch.Tensor], aliases: dict[str, str], masters: dict[str, torch.Tensor],
             buffer_names: list[str] | None, exclude_frozen: bool, folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The output state dict in the module's key order, and the number of parameter elements."""
    if exclude_frozen and buffer_names is None:
        raise CheckpointError(
            f"checkpoint `{folder}` does not record which entries are buffers (no `buffer_names` in "
            f"{MODEL_FILE}), so frozen parameters cannot be told apart from buffers; convert without "
            "--exclude_frozen_parameters")
    buffers = set(buffer_names or ())
    state: dict[str, torch.Tensor] = {}
    converted: dict[str, torch.Tensor] = {}  # canonical name -> output tensor, shared by its aliases
    parameters = 0
    for name, saved in module.items():
        canonical = aliases.get(name, name)
        if name in buffers:
            state[name] = saved
            continue
        if canonical not in masters and exclude_frozen:
            continue
        if canonical not in converted:
            converted[canonical] = _fp32_value(canonical, saved, masters, folder)
            parameters += converted[canonical].numel()
        state[name] = converted[canonical]
    return state, parameters


def _fp32_value(name: str, saved: torch.Tensor, masters: dict[str, torch.Tensor], folder: Path) -> torch.Tensor:
    master = masters.get(name)
    if master is None:  # frozen: only the module holds it
        return saved.float() if saved.is_floating_point() else saved
    if master.shape != saved.shape:
        raise CheckpointError(f"checkpoint `{folder}`: master weight of `{name}` has shape {tuple(master.shape)} "
                              f"but {MODEL_FILE} holds {tuple(saved.shape)}; the files come from different saves")
    return master


# ---------------------------------------------------------------- writing


def standalone_tensors(state: dict[str, torch.Tensor], share_aliases: bool) -> dict[str, torch.Tensor]:
    """Contiguous tensors that own exactly their storage (a view of a bigger buffer would write the
    whole buffer); with `share_aliases`, an entry that is the same tensor as an earlier one stays shared."""
    out: dict[str, torch.Tensor] = {}
    by_id: dict[int, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        if share_aliases and id(tensor) in by_id:
            out[name] = by_id[id(tensor)]
            continue
        t = tensor.detach()
        storage = t.untyped_storage()
        if (not t.is_contiguous() or storage.nbytes() != t.numel() * t.element_size()
                or (t.numel() and storage.data_ptr() in storages)):
            t = t.contiguous().clone()
        if t.numel():
            storages.add(t.untyped_storage().data_ptr())
        by_id[id(tensor)] = out[name] = t
    return out


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a file beside `path`, fsync it and rename it over `path`; nothing is left on failure."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        # safetensors creates its file 0600; give the output the usual mode, as open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _umask() -> int:
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardspeed zero-to-fp32",
        description="Consolidate a shardspeed checkpoint (ZeRO stage 0-3, any world size) into one fp32 state dict file. "
                    "DeepSpeed's zero_to_fp32.py arguments are accepted too (an output folder, --safe_serialization).")
    parser.add_argument("checkpoint_dir", help="the folder passed to save_checkpoint (holds `latest` and the tags)")
    parser.add_argument("output", help="file to write: *.safetensors for safetensors, else torch.save (e.g. "
                                       "pytorch_model.bin); or an existing folder, as DeepSpeed takes it: "
                                       "pytorch_model.bin (model.safetensors with --safe_serialization) is written there")
    parser.add_argument("-t", "--tag", default=None, help="checkpoint tag, e.g. global_step100 (default: `latest`)")
    parser.add_argument("--exclude_frozen_parameters", action="store_true", help="leave out frozen parameters")
    parser.add_argument("--safe_serialization", action="store_true", help="with an output folder: write safetensors")
    parser.add_argument("--max_shard_size", default=None,
                        help="accepted for DeepSpeed's command line; shardspeed writes one file whatever its size")
    parser.add_argument("-d", "--debug", action="store_true", help="log what is read")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG)
    output = Path(args.output)
    if output.is_dir():
        output = output / ("model.safetensors" if args.safe_serialization else "pytorch_model.bin")
    try:
        result = convert_zero_checkpoint_to_fp32_state_dict(args.checkpoint_dir, output, args.tag,
                                                            args.exclude_frozen_parameters)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"shardspeed zero-to-fp32: error: {err}", file=sys.stderr)
        return 1
    size = output.stat().st_size
    print(f"wrote {output}: {len(result.state_dict)} tensors, {result.parameters:,} parameters, "
          f"{size:,} bytes (fp32, from {result.folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
