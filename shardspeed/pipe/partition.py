"""Cutting a list of layers into contiguous pipeline stages (pure functions, no processes).

`parts` is DeepSpeed's representation: stage s owns layers [parts[s], parts[s + 1]).
"""
from __future__ import annotations

import re
from collections.abc import Sequence


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Equal counts; the first `num_items % num_parts` parts get one more (DeepSpeed's rule)."""
    _check(num_items, num_parts)
    chunk, extra = divmod(num_items, num_parts)
    parts = [0]
    for p in range(num_parts):
        parts.append(parts[-1] + chunk + (1 if p < extra else 0))
    return parts


def partition_balanced(weights: Sequence[int], num_parts: int) -> list[int]:
    """Contiguous, non-empty parts whose heaviest and lightest differ as little as DeepSpeed's search finds.

    DeepSpeed 0.19's dynamic programme, so a model gets the same stages under both: for each
    prefix of i layers cut into j parts it keeps the one cut (its heaviest and lightest part)
    with the smallest spread, the last such cut on ties, and extends it. Weights are
    non-negative integers (parameter counts, or 0/1 for `type:` matching).
    """
    _check(len(weights), num_parts)
    if any(w < 0 for w in weights):
        raise ValueError(f"layer weights must be non-negative, got {list(weights)}")
    n, inf = len(weights), float("inf")
    if n == num_parts:
        return list(range(n + 1))
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    # best[j][i] = (spread, heaviest, lightest, where the last part starts) for i layers in j parts
    best = [[(inf, inf, inf, 0)] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = (0, 0, inf, 0)
    for i in range(1, n + 1):
        for j in range(1, min(i, num_parts) + 1):
            for k in range(j - 1, i):
                _, heaviest, lightest, _ = best[j - 1][k]
                if heaviest == inf:
                    continue
                part = prefix[i] - prefix[k]
                top, bottom = max(heaviest, part), min(lightest, part)
                if top - bottom <= best[j][i][0]:
                    best[j][i] = (top - bottom, top, bottom, k)
    parts = [n]
    for j in range(num_parts, 0, -1):
        parts.append(best[j][parts[-1]][3])
    return parts[::-1]


def type_weights(class_names: Sequence[str | None], pattern: str) -> list[int]:
    """1 for layers whose class name matches `pattern` (regex, case-insensitive, `re.search`), else 0."""
    regex = re.compile(pattern, re.IGNORECASE)
    weights = [1 if name is not None and regex.search(name) else 0 for name in class_names]
    if not any(weights):
        raise ValueError(f"partition_method 'type:{pattern}' matches no layer; layer classes are "
                         f"{sorted({n for n in class_names if n})}")
    return weights


def partition(method: str, class_names: Sequence[str | None], param_counts: Sequence[int], num_parts: int) -> list[int]:
    """DeepSpeed's `partition_method`: 'parameters', 'uniform' or 'type:REGEX' (any case)."""
    lowered = method.lower()
    if lowered == "uniform":
        return partition_uniform(len(class_names), num_parts)
    if lowered == "parameters":
        return partition_balanced(param_counts, num_parts)
    if lowered.startswith("type:"):
        return partition_balanced(type_weights(class_names, method.split(":", 1)[1]), num_parts)
    raise ValueError(f"unknown partition_method {method!r}: use 'parameters', 'uniform' or 'type:REGEX' "
                     "('profile' is not implemented, as in DeepSpeed)")


def stage_of(parts: Sequence[int], layer: int) -> int:
    for stage in range(len(parts) - 1):
        if parts[stage] <= layer < parts[stage + 1]:
            return stage
    raise ValueError(f"layer {layer} lies outside the partition {list(parts)}")


def _check(num_items: int, num_parts: int) -> None:
    if num_parts < 1:
        raise ValueError(f"the pipeline needs at least one stage, got {num_parts}")
    if num_items < num_parts:
        raise ValueError(f"{num_items} layers cannot fill {num_parts} pipeline stages (each stage needs a layer)")
