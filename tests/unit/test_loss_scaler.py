"""DeepSpeed parity for fp16 loss scaling: the scale (and hysteresis) after every update.

DS_SEQUENCES below was produced by DeepSpeed 0.19.8 (`deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler`,
the scaler ZeRO stages 1-3 build through `CreateLossScaler`; torch CPU, DS_ACCELERATOR=cpu) and is
pasted verbatim. The tests never import deepspeed. To regenerate, in a venv with deepspeed==0.19.8 run
`DS_ACCELERATOR=cpu python ds_ref.py 2>/dev/null | grep -v '^\\[20'` on:

    import types, deepspeed.runtime.fp16.loss_scaler as ls
    ls.dist = types.SimpleNamespace(get_rank=lambda: 0)  # the scaler asks for the rank only to log
    T, F = True, False
    SCENARIOS = {...}  # name: (kwargs, overflow pattern): the first two items of each DS_SEQUENCES entry
    for name, (kw, pattern) in SCENARIOS.items():
        s, seq, err = ls.DynamicLossScaler(**kw), [], None
        for i, ov in enumerate(pattern):
            try:
                s.update_scale(ov)
            except Exception as e:  # DeepSpeed raises a bare Exception at the minimum scale
                err = i
                break
            seq.append((s.cur_scale, s.cur_hysteresis))
        print(name, seq, err)

DeepSpeed 0.19.8 doubles the scale only when
`stable_interval = cur_iter - last_overflow_iter - 1` is positive and a multiple of the window, i.e.
the first doubling comes after window + 1 overflow-free steps (and never on the very first step).
Our scaler follows the same rule; these sequences pin it.
"""
from __future__ import annotations

import copy

import pytest

from shardspeed.config.sections import FP16Config
from shardspeed.optim.loss_scaler import (
    DynamicLossScaler,
    LossScaleAtMinimumError,
    LossScaler,
    make_loss_scaler,
)

T, F = True, False

# name: (DynamicLossScaler kwargs, overflow per step, [(cur_scale, cur_hysteresis) after each update],
#        index of the update that raises at the minimum scale, or None)
DS_SEQUENCES = {
    "h1_window3": (
        dict(init_scale=2**4, scale_window=3, min_scale=1, delayed_shift=1, consecutive_hysteresis=False),
        [F, F, F, T, F, F, F, F, F, F, T, T, F, F, F, F],
        [(16, 1), (16, 1), (16, 1), (8.0, 1), (8.0, 1), (8.0, 1), (8.0, 1), (16.0, 1), (16.0, 1), (16.0, 1),
         (8.0, 1), (4.0, 1), (4.0, 1), (4.0, 1), (4.0, 1), (8.0, 1)],
        None,
    ),
    "h2_window3": (
        dict(init_scale=2**4, scale_window=3, min_scale=1, delayed_shift=2, consecutive_hysteresis=False),
        [T, F, T, T, F, F, F, F, T, T, T, F, F, F, F, F, F],
        [(16, 1), (16, 1), (8.0, 1), (4.0, 1), (4.0, 1), (4.0, 1), (4.0, 1), (8.0, 2), (8.0, 1), (4.0, 1),
         (2.0, 1), (2.0, 1), (2.0, 1), (2.0, 1), (4.0, 2), (4.0, 2), (4.0, 2)],
        None,
    ),
    "h2_consecutive_window3": (
        dict(init_scale=2**4, scale_window=3, min_scale=1, delayed_shift=2, consecutive_hysteresis=True),
        [T, F, T, F, T, T, F, F, F, F, T, F, F, F],
        [(16, 1), (16, 2), (16, 1), (16, 2), (16, 1), (8.0, 1), (8.0, 2), (8.0, 2), (8.0, 2), (16.0, 2),
         (16.0, 1), (16.0, 2), (16.0, 2), (16.0, 2)],
        None,
    ),
    "h3_window1": (
        dict(init_scale=2**4, scale_window=1, min_scale=1, delayed_shift=3, consecutive_hysteresis=False),
        [T, T, F, T, T, T, F, F, T, T, F],
        [(16, 2), (16, 1), (16, 1), (8.0, 1), (4.0, 1), (2.0, 1), (2.0, 1), (4.0, 3), (4.0, 2), (4.0, 1),
         (4.0, 1)],
        None,
    ),
    "h3_consecutive_window1": (
        dict(init_scale=2**4, scale_window=1, min_scale=1, delayed_shift=3, consecutive_hysteresis=True),
        [T, T, F, T, T, T, T, F, F, T],
        [(16, 2), (16, 1), (16, 3), (16, 2), (16, 1), (8.0, 1), (4.0, 1), (4.0, 3), (8.0, 3), (8.0, 2)],
        None,
    ),
    "h1_window1": (
        dict(init_scale=2**4, scale_window=1, min_scale=1, delayed_shift=1, consecutive_hysteresis=False),
        [F, F, T, F, F, T, T, F],
        [(16, 1), (32.0, 1), (16.0, 1), (16.0, 1), (32.0, 1), (16.0, 1), (8.0, 1), (8.0, 1)],
        None,
    ),
    "h3_consecutive_window1000_pow16": (
        dict(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=3, consecutive_hysteresis=True),
        [T, T, F, T, T, T, T, F, T, T, T],
        [(65536, 2), (65536, 1), (65536, 3), (65536, 2), (65536, 1), (32768.0, 1), (16384.0, 1), (16384.0, 3),
         (16384.0, 2), (16384.0, 1), (8192.0, 1)],
        None,
    ),
    "h2_window1000_pow16": (
        dict(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False),
        [T, T, T, F, T, T, F, F],
        [(65536, 1), (32768.0, 1), (16384.0, 1), (16384.0, 1), (8192.0, 1), (4096.0, 1), (4096.0, 1),
         (4096.0, 1)],
        None,
    ),
    "min_scale_clamped_3": (
        dict(init_scale=2**4, scale_window=3, min_scale=3, delayed_shift=1, consecutive_hysteresis=False),
        [T, T, T, F, F, F, F, T, T, T],
        [(8.0, 1), (4.0, 1), (3, 1), (3, 1), (3, 1), (3, 1), (6.0, 1), (3.0, 1)],
        8,
    ),
    "h2_at_min_scale": (
        dict(init_scale=2**2, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False),
        [T, T, T, T, T],
        [(4, 1), (2.0, 1), (1.0, 1)],
        3,
    ),
    "min_scale_no_raise": (
        dict(init_scale=2**2, scale_window=1000, min_scale=1, delayed_shift=1, consecutive_hysteresis=False,
             raise_error_at_min_scale=False),
        [T, T, T, T, F],
        [(2.0, 1), (1.0, 1), (1, 1), (1, 1), (1, 1)],
        None,
    ),
}

# The scenarios whose recorded sequence contains a doubling; the others never double and match.
_DOUBLING = {"h1_window3", "h2_window3", "h2_consecutive_window3", "h3_window1", "h3_consecutive_window1",
             "h1_window1", "min_scale_clamped_3"}


def _run(scaler: DynamicLossScaler, pattern: list[bool]) -> tuple[list[tuple[float, int]], int | None]:
    seq: list[tuple[float, int]] = []
    for i, overflow in enumerate(pattern):
        try:
            scaler.update_scale(overflow)
        except LossScaleAtMinimumError:
            return seq, i
        seq.append((scaler.cur_scale, scaler.cur_hysteresis))
    return seq, None


@pytest.mark.parametrize(
    "name", list(DS_SEQUENCES)
)
def test_dynamic_scaler_matches_deepspeed(name: str) -> None:
    """Catches any drift from DeepSpeed's halving, hysteresis, refill, doubling or min-scale rules."""
    kwargs, pattern, expected, raises_at = DS_SEQUENCES[name]
    seq, raised = _run(DynamicLossScaler(**kwargs), pattern)
    assert seq == expected
    assert raised == raises_at


def test_recorded_scenarios_that_never_double_match() -> None:
    """The non-xfail guard: hysteresis, halving and min-scale handling agree with DeepSpeed today."""
    for name in sorted(set(DS_SEQUENCES) - _DOUBLING):
        kwargs, pattern, expected, raises_at = DS_SEQUENCES[name]
        assert _run(DynamicLossScaler(**kwargs), pattern) == (expected, raises_at), name


def test_at_minimum_raises_named_error_and_keeps_state() -> None:
    """DeepSpeed's ZeRO scaler raises by default (raise_error_at_min_scale=True) when an overflow would
    lower a scale already at min_scale; ours raises LossScaleAtMinimumError (a RuntimeError, so code
    catching DeepSpeed's bare Exception still catches it) naming the config key."""
    s = DynamicLossScaler(init_scale=4.0, min_scale=2.0, delayed_shift=1)
    s.update_scale(True)
    assert s.cur_scale == 2.0
    with pytest.raises(LossScaleAtMinimumError, match="min_loss_scale"):
        s.update_scale(True)
    assert isinstance(LossScaleAtMinimumError(), RuntimeError)
    assert s.cur_scale == 2.0


def test_at_minimum_hysteresis_is_spent_before_raising() -> None:
    """An overflow at the minimum only raises once hysteresis is used up, as in DeepSpeed."""
    s = DynamicLossScaler(init_scale=1.0, min_scale=1.0, delayed_shift=2)
    s.update_scale(True)
    assert (s.cur_scale, s.cur_hysteresis) == (1.0, 1)
    with pytest.raises(LossScaleAtMinimumError):
        s.update_scale(True)


def test_at_minimum_without_raising_stays_at_minimum() -> None:
    s = DynamicLossScaler(init_scale=2.0, min_scale=1.0, delayed_shift=1, raise_error_at_min_scale=False)
    for _ in range(4):
        s.update_scale(True)
    assert s.cur_scale == 1.0


@pytest.mark.parametrize("split", range(1, 17))
def test_state_dict_round_trip_mid_sequence(split: int) -> None:
    """A scaler restored at any step continues exactly as the uninterrupted one: catches a state dict
    that drops cur_iter, last_overflow_iter or cur_hysteresis (the doubling and hysteresis clocks)."""
    kwargs, pattern, _, _ = DS_SEQUENCES["h2_window3"]
    whole, _ = _run(DynamicLossScaler(**kwargs), pattern)
    first = DynamicLossScaler(**kwargs)
    head, _ = _run(first, pattern[:split])
    state = copy.deepcopy(first.state_dict())
    resumed = DynamicLossScaler(**kwargs)
    resumed.load_state_dict(state)
    tail, _ = _run(resumed, pattern[split:])
    assert head + tail == whole


def test_state_dict_has_the_clocks() -> None:
    s = DynamicLossScaler(init_scale=8.0, delayed_shift=3)
    s.update_scale(True)
    s.update_scale(False)
    assert s.state_dict() == {"cur_scale": 8.0, "cur_iter": 2, "last_overflow_iter": 0, "cur_hysteresis": 2}


def test_static_scale_never_changes() -> None:
    s = LossScaler(128.0)
    assert not s.dynamic
    for overflow in [T, T, F, T, F, F] * 50:
        s.update_scale(overflow)
        assert s.loss_scale == 128.0
    restored = LossScaler()
    restored.load_state_dict(s.state_dict())
    assert restored.loss_scale == 128.0


def test_unit_scale_by_default() -> None:
    assert LossScaler().loss_scale == 1.0


# DeepSpeed 0.19.8 `DeepSpeedFP16Config(**section).dynamic_loss_scale_args()` for the same sections.
DS_DEFAULT_ARGS = {"init_scale": 65536, "scale_window": 1000, "delayed_shift": 2, "consecutive_hysteresis": False,
                   "min_scale": 1}
DS_CUSTOM_ARGS = {"init_scale": 4096, "scale_window": 50, "delayed_shift": 3, "consecutive_hysteresis": True,
                  "min_scale": 2}
CUSTOM_SECTION = dict(enabled=True, initial_scale_power=12, loss_scale_window=50, hysteresis=3,
                      consecutive_hysteresis=True, min_loss_scale=2)


def _args(s: LossScaler) -> dict:
    assert isinstance(s, DynamicLossScaler)
    return {"init_scale": s.cur_scale, "scale_window": s.scale_window, "delayed_shift": s.delayed_shift,
            "consecutive_hysteresis": s.consecutive_hysteresis, "min_scale": s.min_scale}


@pytest.mark.parametrize("section,expected", [({"enabled": True}, DS_DEFAULT_ARGS), (CUSTOM_SECTION, DS_CUSTOM_ARGS)])
def test_make_loss_scaler_dynamic_maps_fp16_section(section: dict, expected: dict) -> None:
    """loss_scale 0 selects the dynamic scaler with the section's knobs, as DeepSpeed's ZeRO does."""
    s = make_loss_scaler(FP16Config(**section))
    assert s.dynamic
    assert _args(s) == expected
    assert s.cur_hysteresis == expected["delayed_shift"]
    assert s.scale_factor == 2.0
    assert s.raise_error_at_min_scale  # DeepSpeed's CreateLossScaler leaves its default, True


def test_make_loss_scaler_static_and_disabled() -> None:
    static = make_loss_scaler(FP16Config(enabled=True, loss_scale=256, initial_scale_power=4))
    assert not static.dynamic and static.loss_scale == 256.0
    off = make_loss_scaler(FP16Config(enabled=False, loss_scale=0))
    assert not off.dynamic and off.loss_scale == 1.0


def test_make_loss_scaler_respects_a_min_scale_that_is_not_a_power_of_two() -> None:
    s = make_loss_scaler(FP16Config(enabled=True, initial_scale_power=3, hysteresis=1, min_loss_scale=3))
    for _ in range(2):
        s.update_scale(True)
    assert s.loss_scale == 3.0
    with pytest.raises(LossScaleAtMinimumError):
        s.update_scale(True)


def test_zero_window_is_rejected_like_deepspeed() -> None:
    with pytest.raises(ValueError, match="loss_scale_window"):
        make_loss_scaler(FP16Config(enabled=True, loss_scale=0, loss_scale_window=0))


@pytest.mark.parametrize("section", [dict(min_loss_scale=0), dict(loss_scale=-1)])
def test_nonpositive_scales_are_rejected_like_deepspeed(section: dict) -> None:
    with pytest.raises(ValueError):
        make_loss_scaler(FP16Config(enabled=True, **section))
