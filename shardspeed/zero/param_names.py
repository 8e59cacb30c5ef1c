"""The names parameters carry in checkpoints and optimizer state.

A parameter's name is its module path, except for experts split over expert-parallel ranks: rank r
of an expert group of size ep holds experts r*L .. r*L+L-1 as local modules 0..L-1 (DeepSpeed's
`deepspeed_experts.<local>`), and a checkpoint names them by their global index, so that it loads
at any expert-parallel size. The MoE set-up marks each such parameter with `expert_index`
(local, global); nothing else here knows about MoE. Fused-experts weights (a Hugging Face block's
`gate_up_proj [E, 2I, H]`) split by rows are marked `expert_rows` (start, stop, E) instead and named
with their rows; `universal.reslice_rows` cuts whole or differently cut rows to what a model holds.
"""
from __future__ import annotations

import torch

_EXPERTS = "deepspeed_experts."


ROWS = "#rows"


def rows_name(name: str, start: int, stop: int, total: int) -> str:
    """The checkpoint name of rows start..stop of a fused-experts weight with `total` rows."""
    return name if (start, stop) == (0, total) else f"{name}{ROWS}{start}:{stop}/{total}"


def parse_rows(name: str) -> tuple[str, int, int, int] | None:
    """(base name, start, stop, total) of a `rows_name`, or None for a plain name."""
    base, sep, rows = name.partition(ROWS)
    if not sep:
        return None
    span, _, total = rows.partition("/")
    start, _, stop = span.partition(":")
    return base, int(start), int(stop), int(total)


def global_name(name: str, param: torch.Tensor) -> str:
    """`name` with a marked expert's local index replaced by its global one; a fused-experts slice
    (`expert_rows`) named with its rows."""
    rows = getattr(param, "expert_rows", None)
    if rows is not None:
        return rows_name(name, *rows)
    index = getattr(param, "expert_index", None)
    if index is None or index[0] == index[1]:
        return name
    local, glob = index
    head, sep, tail = name.rpartition(f"{_EXPERTS}{local}.")
    if not sep:
        raise ValueError(f"parameter `{name}` is marked as expert {local} but its name has no `{_EXPERTS}{local}.`")
    return f"{head}{_EXPERTS}{glob}.{tail}"


def checkpoint_names(module: torch.nn.Module) -> dict[torch.nn.Parameter, str]:
    """Each parameter of `module` (first name of a shared one) -> its checkpoint name."""
    return {p: global_name(n, p) for n, p in module.named_parameters()}


def local_to_global_keys(module: torch.nn.Module) -> dict[str, str]:
    """State-dict keys of expert parameters whose checkpoint name differs: local key -> global key."""
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        renamed = global_name(name, p)
        if renamed != name:
            out[name] = renamed
    return out


def is_expert(param: torch.Tensor) -> bool:
    """A parameter split over expert-parallel ranks (DeepSpeed marks them `allreduce = False`)."""
    return getattr(param, "allreduce", True) is False


def fused_expert_rows(module: torch.nn.Module) -> dict[str, tuple[str, int, int, int]]:
    """Checkpoint name -> (module name, start, stop, total rows) of every fused-experts slice `module` holds."""
    out = {}
    for name, p in module.named_parameters():
        rows = getattr(p, "expert_rows", None)
        if rows is not None:
            out[rows_name(name, *rows)] = (name, *rows)
    return out
