"""Pipeline partitioning, schedules, message headers and the clip threshold: pure functions, no processes."""
from __future__ import annotations

import random

import pytest
import torch

from shardspeed.pipe.p2p import decode_header, encode_header
from shardspeed.pipe.partition import partition, partition_balanced, partition_uniform, stage_of, type_weights
from shardspeed.pipe.schedule import BACKWARD, FORWARD, Step, gpipe, one_f_one_b, peak_live_activations, simulate


# ---- partitioning --------------------------------------------------------------------------------------
@pytest.mark.parametrize("items,parts,expected", [
    (10, 4, [0, 3, 6, 8, 10]),  # DeepSpeed's partition_uniform: the first items % parts stages get one more
    (8, 2, [0, 4, 8]),
    (5, 5, [0, 1, 2, 3, 4, 5]),
    (7, 1, [0, 7]),
])
def test_uniform_matches_deepspeed(items: int, parts: int, expected: list[int]) -> None:
    assert partition_uniform(items, parts) == expected


# (weights, stages, parts) from DeepSpeed 0.19.8's `deepspeed.runtime.utils.partition_balanced` (torch CPU,
# DS_ACCELERATOR=cpu), pasted verbatim; the tests never import deepspeed.
DS_BALANCED = [
    ([1000, 300, 300, 300, 300, 0, 200], 2, [0, 2, 7]),
    ([1000, 300, 300, 300, 300, 0, 200], 3, [0, 1, 3, 7]),
    ([0, 1, 1, 1, 1, 1, 1, 0, 0], 2, [0, 4, 9]),
    ([0, 1, 1, 1, 1, 1, 1, 0, 0], 4, [0, 3, 5, 6, 9]),
    ([1, 1, 1, 1], 2, [0, 2, 4]),
    ([0, 0, 0, 5, 0, 0], 3, [0, 4, 5, 6]),
    ([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 10], 4, [0, 1, 6, 10, 11]),
    ([5, 5, 5], 3, [0, 1, 2, 3]),
    ([0, 0, 0, 0], 2, [0, 3, 4]),
    ([120, 3, 120, 120, 120, 50, 0, 8, 1, 120, 0, 1], 3, [0, 3, 5, 12]),
    ([8, 1, 8, 50], 3, [0, 2, 3, 4]),
    ([1, 0, 120, 1], 4, [0, 1, 2, 3, 4]),
    ([1, 8, 1, 0, 1, 50, 50, 8, 1], 3, [0, 5, 6, 9]),
    ([0, 1, 1, 1, 1], 2, [0, 3, 5]),
    ([1, 50, 120, 120, 1, 1, 120], 3, [0, 3, 5, 7]),
    ([3, 0, 3, 8, 1, 1], 3, [0, 3, 4, 6]),
    ([3, 3, 50, 50, 0, 50, 120], 2, [0, 6, 7]),
    ([3, 3, 3, 8, 120, 3, 1, 8], 2, [0, 4, 8]),
    ([1, 0, 3, 0, 120, 3, 8, 0, 50, 8], 4, [0, 5, 8, 9, 10]),
    ([50, 0, 8, 0, 120, 1, 50, 1], 3, [0, 4, 5, 8]),
    ([8, 3, 50, 3], 2, [0, 2, 4]),
]


@pytest.mark.parametrize("weights,stages,parts", DS_BALANCED)
def test_balanced_matches_deepspeed(weights: list[int], stages: int, parts: list[int]) -> None:
    """Catches a partition that differs from DeepSpeed's: the same model would get other stages than there."""
    assert partition_balanced(weights, stages) == parts


def test_balanced_parts_are_contiguous_and_never_empty() -> None:
    """Catches an empty stage (a rank with nothing to run) or layers lost between parts."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 10)
        p = rng.randint(1, n)
        parts = partition_balanced([rng.choice([0, 0, 1, 5, 17, 100]) for _ in range(n)], p)
        assert len(parts) == p + 1 and parts[0] == 0 and parts[-1] == n
        assert all(a < b for a, b in zip(parts, parts[1:])), parts


def test_balanced_by_parameters_puts_heavy_layers_apart() -> None:
    # embedding 1000, four blocks of 300, a parameter-free pooling function, head 200
    weights = [1000, 300, 300, 300, 300, 0, 200]
    assert partition("parameters", ["Embedding"] + ["Block"] * 4 + [None, "Linear"], weights, 2) == [0, 2, 7]
    assert partition("PARAMETERS", ["x"] * 7, weights, 3) == [0, 1, 3, 7]


def test_type_regex_balances_matching_layers() -> None:
    names = ["Embedding", "TransformerBlock", "TransformerBlock", "TransformerBlock", "TransformerBlock", None, "Linear"]
    assert type_weights(names, "block") == [0, 1, 1, 1, 1, 0, 0]  # case-insensitive search, like DeepSpeed
    parts = partition("type:transformerblock", names, [], 2)
    assert [sum(type_weights(names, "block")[a:b]) for a, b in zip(parts, parts[1:])] == [2, 2]
    with pytest.raises(ValueError, match="matches no layer"):
        partition("type:Attention", names, [], 2)


def test_bad_partitions_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown partition_method 'profile'"):
        partition("profile", ["a", "b"], [1, 1], 2)
    with pytest.raises(ValueError, match="3 layers cannot fill 4 pipeline stages"):
        partition_uniform(3, 4)
    assert stage_of([0, 3, 5, 9], 4) == 1 and stage_of([0, 3, 5, 9], 8) == 2
    with pytest.raises(ValueError):
        stage_of([0, 3, 5, 9], 9)


# ---- schedules -------------------------------------------------------------------------------------------
def _steps(text: str) -> list[Step]:
    return [Step(FORWARD if s[0] == "F" else BACKWARD, int(s[1:])) for s in text.split()]


def test_1f1b_order() -> None:
    """Warm-up forwards (num_stages - stage - 1), then one forward one backward, then cool-down backwards."""
    assert one_f_one_b(0, 4, 6) == _steps("F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5")
    assert one_f_one_b(1, 4, 6) == _steps("F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5")
    assert one_f_one_b(3, 4, 6) == _steps("F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5")
    assert one_f_one_b(0, 4, 2) == _steps("F0 F1 B0 B1")  # fewer micro batches than stages
    assert gpipe(1, 2, 3) == _steps("F0 F1 F2 B0 B1 B2")


@pytest.mark.parametrize("num_stages,micro", [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 8, 16)])
def test_schedules_finish_and_bound_live_activations(num_stages: int, micro: int) -> None:
    """Catches a schedule that deadlocks with blocking receives, or keeps more activations than 1F1B promises."""
    for make in (one_f_one_b, gpipe):
        steps = [make(s, num_stages, micro) for s in range(num_stages)]
        order = simulate(steps)
        assert len(order) == 2 * num_stages * micro
        for s, stage_steps in enumerate(steps):
            assert sorted(stage_steps, key=repr) == sorted(_steps(" ".join(f"F{i} B{i}" for i in range(micro))), key=repr)
            backwards = [st.micro_batch for st in stage_steps if st.kind == BACKWARD]
            assert backwards == list(range(micro)), "gradients must accumulate in micro-batch order"
            peak = peak_live_activations(stage_steps)
            assert peak == (min(num_stages - s, micro) if make is one_f_one_b else micro)


def test_simulate_detects_deadlock() -> None:
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate([_steps("F0 B0 F1 B1"), _steps("F0 F1 B1 B0")])
    with pytest.raises(RuntimeError, match="before its forward"):
        simulate([_steps("B0 F0")])


# ---- messages -------------------------------------------------------------------------------------------
def test_activation_header_roundtrip() -> None:
    value = (torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.int64), torch.zeros((), dtype=torch.bool))
    is_tuple, specs = decode_header(encode_header(value))
    assert is_tuple and specs == [(torch.bfloat16, [2, 3]), (torch.int64, [4]), (torch.bool, [])]
    assert decode_header(encode_header(torch.zeros(5, 1))) == (False, [(torch.float32, [5, 1])])
    with pytest.raises(TypeError, match="tensor or a tuple of tensors"):
        encode_header((torch.zeros(1), 3))
    with pytest.raises(ValueError, match="header slots"):
        encode_header(tuple(torch.zeros(1, 1, 1, 1, 1) for _ in range(10)))
