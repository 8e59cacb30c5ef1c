"""DeepSpeed parity for the LR schedules, plus resume, construction-time and config-factory behaviour.

EXPECTED below was produced by DeepSpeed 0.19.8 (torch 2.13.0, CPU) and is pasted verbatim: every
lr and momentum (`betas` for Adam-like optimizers, `momentum` for SGD) after construction and after
chosen steps. The tests never import deepspeed. To regenerate, in a venv with deepspeed==0.19.8
(DS_BUILD_OPS=0 at install), save the script below as ds_ref.py and run
`python ds_ref.py 2>/dev/null | grep -v '^\\[20'` (the grep drops DeepSpeed's log lines):

    import torch, deepspeed.runtime.lr_schedules as S
    CASES = [  # (name, class, optimizer (type, group lrs), kwargs, steps)
        ("rt_cont", "LRRangeTest", ("SGD", [0.5]), dict(lr_range_test_min_lr=1e-3, lr_range_test_step_size=10, lr_range_test_step_rate=2.0), [0, 1, 2, 5, 9, 10, 11, 25, 100]),
        ("rt_stair", "LRRangeTest", ("Adam", [0.5, 0.5]), dict(lr_range_test_min_lr=[1e-3, 2e-4], lr_range_test_step_size=10, lr_range_test_step_rate=2.0, lr_range_test_staircase=True), [0, 1, 8, 9, 10, 19, 20, 100]),
        ("rt_default", "LRRangeTest", ("SGD", [0.5]), dict(), [0, 1, 1998, 1999, 2000, 5000]),
        ("oc_sym", "OneCycle", ("Adam", [0.5]), dict(cycle_min_lr=1e-4, cycle_max_lr=1e-2, cycle_first_step_size=10, cycle_min_mom=0.85, cycle_max_mom=0.95), [0, 1, 2, 5, 8, 9, 10, 11, 15, 18, 19, 20, 25, 40]),
        ("oc_asym_decay", "OneCycle", ("AdamW", [0.5]), dict(cycle_min_lr=1e-4, cycle_max_lr=1e-2, decay_lr_rate=0.5, cycle_first_step_size=10, cycle_second_step_size=6, decay_step_size=4, decay_mom_rate=0.1), [0, 1, 5, 9, 10, 11, 13, 14, 15, 16, 17, 19, 20, 30, 60]),
        ("oc_stair", "OneCycle", ("Adam", [0.5, 0.5]), dict(cycle_min_lr=[1e-4, 1e-3], cycle_max_lr=[1e-2, 5e-2], decay_lr_rate=0.2, cycle_first_step_size=10, cycle_second_step_size=6, cycle_first_stair_count=5, cycle_second_stair_count=3, decay_step_size=2, cycle_min_mom=[0.8, 0.7], cycle_max_mom=[0.9, 0.95]), [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 20]),
        ("oc_stair_same", "OneCycle", ("Adam", [0.5]), dict(cycle_min_lr=1e-4, cycle_max_lr=1e-2, cycle_first_step_size=8, cycle_first_stair_count=4, cycle_momentum=False), [0, 1, 2, 6, 7, 8, 9, 12, 15, 16, 30]),
        ("oc_sgd", "OneCycle", ("SGD", [0.5]), dict(cycle_min_lr=1e-3, cycle_max_lr=1e-1, decay_lr_rate=1.0, cycle_first_step_size=4, decay_step_size=1, decay_mom_rate=0.5), [0, 1, 3, 4, 7, 8, 9, 12]),
        ("wu_log", "WarmupLR", ("Adam", [0.5]), dict(warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=10), [0, 1, 2, 5, 9, 10, 11, 50]),
        ("wu_linear", "WarmupLR", ("SGD", [0.5, 0.5]), dict(warmup_min_lr=[1e-5, 0.0], warmup_max_lr=[1e-3, 2e-3], warmup_num_steps=10, warmup_type="linear"), [0, 1, 2, 5, 9, 10, 11, 50]),
        ("wu_one_step", "WarmupLR", ("SGD", [0.5]), dict(warmup_min_lr=1e-4, warmup_max_lr=1e-3, warmup_num_steps=1), [0, 1, 2, 3]),
        ("wu_max_from_opt", "WarmupLR", ("SGD", [0.05, 0.2]), dict(warmup_num_steps=4, warmup_type="linear"), [0, 1, 3, 4, 9]),
        ("wu_default", "WarmupLR", ("Adam", [0.5]), dict(warmup_max_lr=1e-3), [0, 1, 2, 500, 998, 999, 1000, 2000]),
        ("wd_log", "WarmupDecayLR", ("Adam", [0.5]), dict(total_num_steps=30, warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=10), [0, 1, 2, 5, 9, 10, 11, 20, 29, 30, 31, 40]),
        ("wd_linear", "WarmupDecayLR", ("SGD", [0.5, 0.5]), dict(total_num_steps=30, warmup_min_lr=[1e-5, 0.0], warmup_max_lr=[1e-3, 3e-3], warmup_num_steps=10, warmup_type="linear"), [0, 1, 2, 5, 9, 10, 11, 20, 29, 30, 31]),
        ("wd_short", "WarmupDecayLR", ("SGD", [0.5]), dict(total_num_steps=5, warmup_num_steps=10), [0, 4, 5, 9, 10, 11, 20]),
        ("wd_default", "WarmupDecayLR", ("Adam", [0.5]), dict(total_num_steps=3000), [0, 1, 999, 1000, 1001, 2000, 2999, 3000, 3500]),
        ("cos_log", "WarmupCosineLR", ("Adam", [0.1]), dict(total_num_steps=30, warmup_num_steps=10), [0, 1, 2, 5, 9, 10, 11, 20, 29, 30, 31, 40]),
        ("cos_linear", "WarmupCosineLR", ("SGD", [0.1, 0.02]), dict(total_num_steps=30, warmup_min_ratio=0.1, warmup_num_steps=10, cos_min_ratio=0.05, warmup_type="linear"), [0, 1, 2, 5, 9, 10, 11, 19, 20, 29, 30, 31]),
        ("cos_short", "WarmupCosineLR", ("SGD", [0.1]), dict(total_num_steps=5, warmup_num_steps=10, warmup_type="linear"), [0, 4, 9, 10, 11, 20]),
        ("cos_default", "WarmupCosineLR", ("AdamW", [3e-4]), dict(total_num_steps=3000), [0, 1, 999, 1000, 1001, 2000, 2999, 3000]),
    ]
    def make_opt(kind, lrs):
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
        return torch.optim.SGD(groups, momentum=0.9) if kind == "SGD" else getattr(torch.optim, kind)(groups)
    def moms(opt):
        return [tuple(g["betas"]) if "betas" in g else g["momentum"] for g in opt.param_groups]
    print("EXPECTED = [")
    for name, cls, (kind, lrs), kwargs, steps in CASES:
        opt = make_opt(kind, lrs)
        sched = getattr(S, cls)(opt, **kwargs)
        print(f"    ({name!r}, {cls!r}, ({kind!r}, {lrs!r}), {kwargs!r}, {{")
        print(f"        'init': ({[g['lr'] for g in opt.param_groups]!r}, {moms(opt)!r}, {sched.get_lr()!r}),")
        for it in range(max(steps) + 1):
            sched.step()
            if it in steps:
                print(f"        {it}: ({[g['lr'] for g in opt.param_groups]!r}, {moms(opt)!r}),")
        print("    }),")
    print("]")

Each EXPECTED entry: (name, class, (optimizer, group lrs), kwargs, {'init': (optimizer lrs,
momenta, get_lr()) right after construction, t: (optimizer lrs, momenta) after t + 1 step() calls}).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch

from shardspeed.config.errors import ConfigError
from shardspeed.runtime import lr_schedules
from shardspeed.runtime.lr_schedules import (
    VALID_SCHEDULERS,
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_lr_scheduler,
)

# fmt: off
EXPECTED = [
    ('rt_cont', 'LRRangeTest', ('SGD', [0.5]), {'lr_range_test_min_lr': 0.001, 'lr_range_test_step_size': 10, 'lr_range_test_step_rate': 2.0}, {
        'init': ([0.001], [0.9], [0.001]),
        0: ([0.0012], [0.9]),
        1: ([0.0014], [0.9]),
        2: ([0.0016], [0.9]),
        5: ([0.0022], [0.9]),
        9: ([0.003], [0.9]),
        10: ([0.0032], [0.9]),
        11: ([0.0034], [0.9]),
        25: ([0.006200000000000001], [0.9]),
        100: ([0.0212], [0.9]),
    }),
    ('rt_stair', 'LRRangeTest', ('Adam', [0.5, 0.5]), {'lr_range_test_min_lr': [0.001, 0.0002], 'lr_range_test_step_size': 10, 'lr_range_test_step_rate': 2.0, 'lr_range_test_staircase': True}, {
        'init': ([0.001, 0.0002], [(0.9, 0.999), (0.9, 0.999)], [0.001, 0.0002]),
        0: ([0.001, 0.0002], [(0.9, 0.999), (0.9, 0.999)]),
        1: ([0.001, 0.0002], [(0.9, 0.999), (0.9, 0.999)]),
        8: ([0.001, 0.0002], [(0.9, 0.999), (0.9, 0.999)]),
        9: ([0.003, 0.0006000000000000001], [(0.9, 0.999), (0.9, 0.999)]),
        10: ([0.003, 0.0006000000000000001], [(0.9, 0.999), (0.9, 0.999)]),
        19: ([0.005, 0.001], [(0.9, 0.999), (0.9, 0.999)]),
        20: ([0.005, 0.001], [(0.9, 0.999), (0.9, 0.999)]),
        100: ([0.021, 0.004200000000000001], [(0.9, 0.999), (0.9, 0.999)]),
    }),
    ('rt_default', 'LRRangeTest', ('SGD', [0.5]), {}, {
        'init': ([0.001], [0.9], [0.001]),
        0: ([0.0010004999999999999], [0.9]),
        1: ([0.001001], [0.9]),
        1998: ([0.0019995], [0.9]),
        1999: ([0.002], [0.9]),
        2000: ([0.0020004999999999997], [0.9]),
        5000: ([0.0035005], [0.9]),
    }),
    ('oc_sym', 'OneCycle', ('Adam', [0.5]), {'cycle_min_lr': 0.0001, 'cycle_max_lr': 0.01, 'cycle_first_step_size': 10, 'cycle_min_mom': 0.85, 'cycle_max_mom': 0.95}, {
        'init': ([0.0001], [(0.85, 0.99)], [0.0001]),
        0: ([0.001090000000000001], [(0.94, 0.99)]),
        1: ([0.0020800000000000016], [(0.9299999999999999, 0.99)]),
        2: ([0.0030699999999999985], [(0.9199999999999999, 0.99)]),
        5: ([0.006040000000000002], [(0.8899999999999999, 0.99)]),
        8: ([0.009009999999999999], [(0.86, 0.99)]),
        9: ([0.01], [(0.85, 0.99)]),
        10: ([0.009009999999999999], [(0.86, 0.99)]),
        11: ([0.008019999999999998], [(0.87, 0.99)]),
        15: ([0.004059999999999999], [(0.9099999999999999, 0.99)]),
        18: ([0.001090000000000001], [(0.94, 0.99)]),
        19: ([0.0001], [(0.95, 0.99)]),
        20: ([0.0001], [(0.95, 0.99)]),
        25: ([0.0001], [(0.95, 0.99)]),
        40: ([0.0001], [(0.95, 0.99)]),
    }),
    ('oc_asym_decay', 'OneCycle', ('AdamW', [0.5]), {'cycle_min_lr': 0.0001, 'cycle_max_lr': 0.01, 'decay_lr_rate': 0.5, 'cycle_first_step_size': 10, 'cycle_second_step_size': 6, 'decay_step_size': 4, 'decay_mom_rate': 0.1}, {
        'init': ([0.0001], [(0.8, 0.99)], [0.0001]),
        0: ([0.0010900000000000003], [(0.89, 0.99)]),
        1: ([0.0020800000000000003], [(0.88, 0.99)]),
        5: ([0.00604], [(0.8400000000000001, 0.99)]),
        9: ([0.01], [(0.8, 0.99)]),
        10: ([0.00835], [(0.8166666666666667, 0.99)]),
        11: ([0.0067], [(0.8333333333333334, 0.99)]),
        13: ([0.0034], [(0.8666666666666667, 0.99)]),
        14: ([0.00175], [(0.8833333333333333, 0.99)]),
        15: ([0.0001], [(0.9, 0.99)]),
        16: ([8.888888888888889e-05], [(0.9225, 0.99)]),
        17: ([8e-05], [(0.9450000000000001, 0.99)]),
        19: ([6.666666666666667e-05], [(0.9900000000000001, 0.99)]),
        20: ([6.153846153846154e-05], [(1.0125, 0.99)]),
        30: ([3.478260869565218e-05], [(1.2375, 0.99)]),
        60: ([1.5094339622641511e-05], [(1.9125, 0.99)]),
    }),
    ('oc_stair', 'OneCycle', ('Adam', [0.5, 0.5]), {'cycle_min_lr': [0.0001, 0.001], 'cycle_max_lr': [0.01, 0.05], 'decay_lr_rate': 0.2, 'cycle_first_step_size': 10, 'cycle_second_step_size': 6, 'cycle_first_stair_count': 5, 'cycle_second_stair_count': 3, 'decay_step_size': 2, 'cycle_min_mom': [0.8, 0.7], 'cycle_max_mom': [0.9, 0.95]}, {
        'init': ([0.0001, 0.001], [(0.8, 0.99), (0.7, 0.99)], [0.0001, 0.001]),
        0: ([0.0001, 0.001], [(0.9, 0.99), (0.95, 0.99)]),
        1: ([0.0020800000000000003, 0.0108], [(0.88, 0.99), (0.8999999999999999, 0.99)]),
        2: ([0.0020800000000000003, 0.0108], [(0.88, 0.99), (0.8999999999999999, 0.99)]),
        3: ([0.004060000000000001, 0.020600000000000004], [(0.86, 0.99), (0.85, 0.99)]),
        4: ([0.004060000000000001, 0.020600000000000004], [(0.86, 0.99), (0.85, 0.99)]),
        8: ([0.008020000000000001, 0.04020000000000001], [(0.8200000000000001, 0.99), (0.75, 0.99)]),
        9: ([0.01, 0.05], [(0.8, 0.99), (0.7, 0.99)]),
        10: ([0.0067, 0.033666666666666664], [(0.8333333333333334, 0.99), (0.7833333333333333, 0.99)]),
        11: ([0.0067, 0.033666666666666664], [(0.8333333333333334, 0.99), (0.7833333333333333, 0.99)]),
        12: ([0.0034, 0.017333333333333333], [(0.8666666666666667, 0.99), (0.8666666666666666, 0.99)]),
        13: ([0.0034, 0.017333333333333333], [(0.8666666666666667, 0.99), (0.8666666666666666, 0.99)]),
        14: ([0.0001, 0.001], [(0.9, 0.99), (0.95, 0.99)]),
        15: ([0.0001, 0.001], [(0.9, 0.99), (0.95, 0.99)]),
        16: ([9.09090909090909e-05, 0.0009090909090909091], [(0.9, 0.99), (0.95, 0.99)]),
        17: ([8.333333333333334e-05, 0.0008333333333333334], [(0.9, 0.99), (0.95, 0.99)]),
        20: ([6.666666666666667e-05, 0.0006666666666666666], [(0.9, 0.99), (0.95, 0.99)]),
    }),
    ('oc_stair_same', 'OneCycle', ('Adam', [0.5]), {'cycle_min_lr': 0.0001, 'cycle_max_lr': 0.01, 'cycle_first_step_size': 8, 'cycle_first_stair_count': 4, 'cycle_momentum': False}, {
        'init': ([0.0001], [(0.9, 0.999)], [0.0001]),
        0: ([0.0001], [(0.9, 0.999)]),
        1: ([0.002575], [(0.9, 0.999)]),
        2: ([0.002575], [(0.9, 0.999)]),
        6: ([0.007525000000000001], [(0.9, 0.999)]),
        7: ([0.01], [(0.9, 0.999)]),
        8: ([0.007525000000000001], [(0.9, 0.999)]),
        9: ([0.007525000000000001], [(0.9, 0.999)]),
        12: ([0.002575], [(0.9, 0.999)]),
        15: ([0.0001], [(0.9, 0.999)]),
        16: ([0.0001], [(0.9, 0.999)]),
        30: ([0.0001], [(0.9, 0.999)]),
    }),
    ('oc_sgd', 'OneCycle', ('SGD', [0.5]), {'cycle_min_lr': 0.001, 'cycle_max_lr': 0.1, 'decay_lr_rate': 1.0, 'cycle_first_step_size': 4, 'decay_step_size': 1, 'decay_mom_rate': 0.5}, {
        'init': ([0.001], [0.9], [0.001]),
        0: ([0.025750000000000002], [0.9]),
        1: ([0.0505], [0.9]),
        3: ([0.1], [0.9]),
        4: ([0.07525000000000001], [0.9]),
        7: ([0.001], [0.9]),
        8: ([0.0005], [0.9]),
        9: ([0.0003333333333333333], [0.9]),
        12: ([0.00016666666666666666], [0.9]),
    }),
    ('wu_log', 'WarmupLR', ('Adam', [0.5]), {'warmup_min_lr': 0.0, 'warmup_max_lr': 0.001, 'warmup_num_steps': 10}, {
        'init': ([0.0], [(0.9, 0.999)], [0.0]),
        0: ([0.0], [(0.9, 0.999)]),
        1: ([0.00030102999566398113], [(0.9, 0.999)]),
        2: ([0.0004771212547196624], [(0.9, 0.999)]),
        5: ([0.0007781512503836435], [(0.9, 0.999)]),
        9: ([0.0009999999999999998], [(0.9, 0.999)]),
        10: ([0.001], [(0.9, 0.999)]),
        11: ([0.001], [(0.9, 0.999)]),
        50: ([0.001], [(0.9, 0.999)]),
    }),
    ('wu_linear', 'WarmupLR', ('SGD', [0.5, 0.5]), {'warmup_min_lr': [1e-05, 0.0], 'warmup_max_lr': [0.001, 0.002], 'warmup_num_steps': 10, 'warmup_type': 'linear'}, {
        'init': ([1e-05, 0.0], [0.9, 0.9], [1e-05, 0.0]),
        0: ([1e-05, 0.0], [0.9, 0.9]),
        1: ([0.000109, 0.0002], [0.9, 0.9]),
        2: ([0.00020800000000000001, 0.0004], [0.9, 0.9]),
        5: ([0.000505, 0.001], [0.9, 0.9]),
        9: ([0.000901, 0.0018000000000000002], [0.9, 0.9]),
        10: ([0.001, 0.002], [0.9, 0.9]),
        11: ([0.001, 0.002], [0.9, 0.9]),
        50: ([0.001, 0.002], [0.9, 0.9]),
    }),
    ('wu_one_step', 'WarmupLR', ('SGD', [0.5]), {'warmup_min_lr': 0.0001, 'warmup_max_lr': 0.001, 'warmup_num_steps': 1}, {
        'init': ([0.0001], [0.9], [0.0001]),
        0: ([0.0001], [0.9]),
        1: ([0.001], [0.9]),
        2: ([0.001], [0.9]),
        3: ([0.001], [0.9]),
    }),
    ('wu_max_from_opt', 'WarmupLR', ('SGD', [0.05, 0.2]), {'warmup_num_steps': 4, 'warmup_type': 'linear'}, {
        'init': ([0.0, 0.0], [0.9, 0.9], [0.0, 0.0]),
        0: ([0.0, 0.0], [0.9, 0.9]),
        1: ([0.0125, 0.05], [0.9, 0.9]),
        3: ([0.037500000000000006, 0.15000000000000002], [0.9, 0.9]),
        4: ([0.05, 0.2], [0.9, 0.9]),
        9: ([0.05, 0.2], [0.9, 0.9]),
    }),
    ('wu_default', 'WarmupLR', ('Adam', [0.5]), {'warmup_max_lr': 0.001}, {
        'init': ([0.0], [(0.9, 0.999)], [0.0]),
        0: ([0.0], [(0.9, 0.999)]),
        1: ([0.00010034333188799373], [(0.9, 0.999)]),
        2: ([0.0001590404182398875], [(0.9, 0.999)]),
        500: ([0.0008999459086224152], [(0.9, 0.999)]),
        998: ([0.0009998551627419942], [(0.9, 0.999)]),
        999: ([0.001], [(0.9, 0.999)]),
        1000: ([0.001], [(0.9, 0.999)]),
        2000: ([0.001], [(0.9, 0.999)]),
    }),
    ('wd_log', 'WarmupDecayLR', ('Adam', [0.5]), {'total_num_steps': 30, 'warmup_min_lr': 0.0, 'warmup_max_lr': 0.001, 'warmup_num_steps': 10}, {
        'init': ([0.0], [(0.9, 0.999)], [0.0]),
        0: ([0.0], [(0.9, 0.999)]),
        1: ([0.00030102999566398113], [(0.9, 0.999)]),
        2: ([0.0004771212547196624], [(0.9, 0.999)]),
        5: ([0.0007781512503836435], [(0.9, 0.999)]),
        9: ([0.0009999999999999998], [(0.9, 0.999)]),
        10: ([0.001], [(0.9, 0.999)]),
        11: ([0.00095], [(0.9, 0.999)]),
        20: ([0.0005], [(0.9, 0.999)]),
        29: ([5e-05], [(0.9, 0.999)]),
        30: ([0.0], [(0.9, 0.999)]),
        31: ([0.0], [(0.9, 0.999)]),
        40: ([0.0], [(0.9, 0.999)]),
    }),
    ('wd_linear', 'WarmupDecayLR', ('SGD', [0.5, 0.5]), {'total_num_steps': 30, 'warmup_min_lr': [1e-05, 0.0], 'warmup_max_lr': [0.001, 0.003], 'warmup_num_steps': 10, 'warmup_type': 'linear'}, {
        'init': ([1e-05, 0.0], [0.9, 0.9], [1e-05, 0.0]),
        0: ([1e-05, 0.0], [0.9, 0.9]),
        1: ([0.000109, 0.00030000000000000003], [0.9, 0.9]),
        2: ([0.00020800000000000001, 0.0006000000000000001], [0.9, 0.9]),
        5: ([0.000505, 0.0015], [0.9, 0.9]),
        9: ([0.000901, 0.0027], [0.9, 0.9]),
        10: ([0.001, 0.003], [0.9, 0.9]),
        11: ([0.0009505, 0.00285], [0.9, 0.9]),
        20: ([0.000505, 0.0015], [0.9, 0.9]),
        29: ([5.95e-05, 0.00015000000000000001], [0.9, 0.9]),
        30: ([1e-05, 0.0], [0.9, 0.9]),
        31: ([1e-05, 0.0], [0.9, 0.9]),
    }),
    ('wd_short', 'WarmupDecayLR', ('SGD', [0.5]), {'total_num_steps': 5, 'warmup_num_steps': 10}, {
        'init': ([0.0], [0.9], [0.0]),
        0: ([0.0], [0.9]),
        4: ([0.0006989700043360187], [0.9]),
        5: ([0.0007781512503836435], [0.9]),
        9: ([0.0009999999999999998], [0.9]),
        10: ([0.0], [0.9]),
        11: ([0.0], [0.9]),
        20: ([0.0], [0.9]),
    }),
    ('wd_default', 'WarmupDecayLR', ('Adam', [0.5]), {'total_num_steps': 3000}, {
        'init': ([0.0], [(0.9, 0.999)], [0.0]),
        0: ([0.0], [(0.9, 0.999)]),
        1: ([0.00010034333188799373], [(0.9, 0.999)]),
        999: ([0.001], [(0.9, 0.999)]),
        1000: ([0.001], [(0.9, 0.999)]),
        1001: ([0.0009995000000000002], [(0.9, 0.999)]),
        2000: ([0.0005], [(0.9, 0.999)]),
        2999: ([5e-07], [(0.9, 0.999)]),
        3000: ([0.0], [(0.9, 0.999)]),
        3500: ([0.0], [(0.9, 0.999)]),
    }),
    ('cos_log', 'WarmupCosineLR', ('Adam', [0.1]), {'total_num_steps': 30, 'warmup_num_steps': 10}, {
        'init': ([0.0], [(0.9, 0.999)], [0.0]),
        0: ([0.0], [(0.9, 0.999)]),
        1: ([0.030102999566398114], [(0.9, 0.999)]),
        2: ([0.04771212547196624], [(0.9, 0.999)]),
        5: ([0.07781512503836435], [(0.9, 0.999)]),
        9: ([0.09999999999999999], [(0.9, 0.999)]),
        10: ([0.09938447858805392], [(0.9, 0.999)]),
        11: ([0.09755307053217621], [(0.9, 0.999)]),
        20: ([0.042184058920313655], [(0.9, 0.999)]),
        29: ([1e-05], [(0.9, 0.999)]),
        30: ([1e-05], [(0.9, 0.999)]),
        31: ([1e-05], [(0.9, 0.999)]),
        40: ([1e-05], [(0.9, 0.999)]),
    }),
    ('cos_linear', 'WarmupCosineLR', ('SGD', [0.1, 0.02]), {'total_num_steps': 30, 'warmup_min_ratio': 0.1, 'warmup_num_steps': 10, 'cos_min_ratio': 0.05, 'warmup_type': 'linear'}, {
        'init': ([0.0, 0.0], [0.9, 0.9], [0.0, 0.0]),
        0: ([0.010000000000000002, 0.002], [0.9, 0.9]),
        1: ([0.019000000000000003, 0.0038], [0.9, 0.9]),
        2: ([0.028000000000000004, 0.005600000000000001], [0.9, 0.9]),
        5: ([0.05500000000000001, 0.011000000000000001], [0.9, 0.9]),
        9: ([0.09100000000000001, 0.0182], [0.9, 0.9]),
        10: ([0.09941519617826905, 0.01988303923565381], [0.9, 0.9]),
        11: ([0.0976751845240198, 0.01953503690480396], [0.9, 0.9]),
        19: ([0.052500000000000005, 0.0105], [0.9, 0.9]),
        20: ([0.04506936291058902, 0.009013872582117805], [0.9, 0.9]),
        29: ([0.005000000000000001, 0.001], [0.9, 0.9]),
        30: ([0.005000000000000001, 0.001], [0.9, 0.9]),
        31: ([0.005000000000000001, 0.001], [0.9, 0.9]),
    }),
    ('cos_short', 'WarmupCosineLR', ('SGD', [0.1]), {'total_num_steps': 5, 'warmup_num_steps': 10, 'warmup_type': 'linear'}, {
        'init': ([0.0], [0.9], [0.0]),
        0: ([0.0], [0.9]),
        4: ([0.04000000000000001], [0.9]),
        9: ([0.09000000000000001], [0.9]),
        10: ([1e-05], [0.9]),
        11: ([1e-05], [0.9]),
        20: ([1e-05], [0.9]),
    }),
    ('cos_default', 'WarmupCosineLR', ('AdamW', [0.0003]), {'total_num_steps': 3000}, {
        'init': ([0.0], [(0.9, 0.999)], [0.0]),
        0: ([0.0], [(0.9, 0.999)]),
        1: ([3.0102999566398115e-05], [(0.9, 0.999)]),
        999: ([0.0003], [(0.9, 0.999)]),
        1000: ([0.000299999814963461], [(0.9, 0.999)]),
        1001: ([0.0002999992598543007], [(0.9, 0.999)]),
        2000: ([0.0001497794042098106], [(0.9, 0.999)]),
        2999: ([3e-08], [(0.9, 0.999)]),
        3000: ([3e-08], [(0.9, 0.999)]),
    }),
]
# fmt: on


def _close(actual: Any, expected: Any) -> bool:
    """Equal to 1e-12 relative: the formulas are DeepSpeed's, but evaluated in our own order of
    float operations, so a few ulps of difference are expected and nothing more."""
    if isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(_close(a, e) for a, e in zip(actual, expected))
    return math.isclose(float(actual), expected, rel_tol=1e-12, abs_tol=1e-300)


def _optimizer(kind: str, lrs: list[float]) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    if kind == "SGD":
        return torch.optim.SGD(groups, momentum=0.9)
    return getattr(torch.optim, kind)(groups)


def _state(opt: torch.optim.Optimizer) -> tuple[list[float], list[Any]]:
    moms = [tuple(g["betas"]) if "betas" in g else g["momentum"] for g in opt.param_groups]
    return [g["lr"] for g in opt.param_groups], moms


def _build(case: tuple) -> tuple[torch.optim.Optimizer, Any]:
    _, cls, (kind, lrs), kwargs, _ = case
    opt = _optimizer(kind, lrs)
    return opt, getattr(lr_schedules, cls)(opt, **kwargs)


CASE_IDS = [case[0] for case in EXPECTED]


@pytest.mark.parametrize("case", EXPECTED, ids=CASE_IDS)
def test_construction_matches_deepspeed(case: tuple) -> None:
    """Catches a wrong lr/momentum written at construction or a wrong pre-step get_lr()
    (WarmupCosineLR writes 0, OneCycle writes cycle_min_mom as beta1 and pins beta2 to 0.99)."""
    opt, sched = _build(case)
    lrs, moms, get_lr = case[4]["init"]
    assert _state(opt) == (lrs, moms)
    assert _close(sched.get_lr(), get_lr)


@pytest.mark.parametrize("case", EXPECTED, ids=CASE_IDS)
def test_steps_match_deepspeed(case: tuple) -> None:
    """Catches any formula, boundary (warmup end, half-cycle, stair, total steps) or clamping
    difference from DeepSpeed when stepping one batch at a time."""
    opt, sched = _build(case)
    recorded = {t: v for t, v in case[4].items() if t != "init"}
    for t in range(max(recorded) + 1):
        sched.step()
        if t in recorded:
            lrs, moms = _state(opt)
            assert _close(lrs, recorded[t][0]), (t, lrs, recorded[t][0])
            assert _close(moms, recorded[t][1]), (t, moms, recorded[t][1])
            assert _close(sched.get_last_lr(), recorded[t][0])


@pytest.mark.parametrize("case", EXPECTED, ids=CASE_IDS)
def test_step_to_explicit_iteration_matches_deepspeed(case: tuple) -> None:
    """Catches a schedule that depends on its history instead of on last_batch_iteration alone:
    jumping with step(t), out of order, must give the lr of t."""
    opt, sched = _build(case)
    recorded = {t: v for t, v in case[4].items() if t != "init"}
    for t in sorted(recorded, reverse=True):
        sched.step(t)
        assert _close(_state(opt)[0], recorded[t][0]), t
        assert _close(_state(opt)[1], recorded[t][1]), t
        assert sched.last_batch_iteration == t


@pytest.mark.parametrize("case", EXPECTED, ids=CASE_IDS)
def test_state_dict_resume_gives_identical_next_lrs(case: tuple) -> None:
    """Catches a resume that restarts the schedule or drifts: a fresh schedule loaded from a
    mid-schedule state_dict produces bit-identical lrs and momenta from then on."""
    opt, sched = _build(case)
    horizon = max(t for t in case[4] if t != "init") + 3
    for _ in range(horizon // 2):
        sched.step()
    sd = sched.state_dict()
    assert sd == {"last_batch_iteration": horizon // 2 - 1}
    resumed_opt, resumed = _build(case)
    resumed.load_state_dict(sd)
    for _ in range(horizon - horizon // 2):
        sched.step()
        resumed.step()
        assert _state(resumed_opt) == _state(opt)


def test_step_keyword_names_match_deepspeed() -> None:
    """Catches renaming step()'s argument: DeepSpeed users pass it by keyword through
    `engine.step(lr_kwargs=...)`, as `batch_iteration` for LRRangeTest/OneCycle and
    `last_batch_iteration` for the warmup schedules."""
    opt = _optimizer("Adam", [0.5])
    OneCycle(opt, 0.0, 1.0, cycle_first_step_size=4).step(batch_iteration=1)
    assert opt.param_groups[0]["lr"] == 0.5
    LRRangeTest(opt, lr_range_test_step_size=1).step(batch_iteration=1)
    assert opt.param_groups[0]["lr"] == 3e-3
    for sched in (WarmupLR(opt, 0.0, 1.0, 4, "linear"), WarmupDecayLR(opt, 8, 0.0, 1.0, 4, "linear"),
                  WarmupCosineLR(opt, 8, warmup_num_steps=4, warmup_type="linear")):
        sched.step(last_batch_iteration=2)
        assert sched.last_batch_iteration == 2


def test_get_last_lr_before_first_step() -> None:
    """Catches drift from DeepSpeed: OneCycle has no last lr until step(); the others report
    the lr they wrote at construction."""
    with pytest.raises(RuntimeError, match="step"):
        OneCycle(_optimizer("Adam", [0.5]), 1e-4, 1e-2).get_last_lr()
    assert WarmupLR(_optimizer("SGD", [0.5]), warmup_max_lr=0.1).get_last_lr() == [0.0]
    assert WarmupCosineLR(_optimizer("SGD", [0.5]), total_num_steps=10).get_last_lr() == [0.0]
    assert LRRangeTest(_optimizer("SGD", [0.5])).get_last_lr() == [1e-3]


def test_resume_construction_leaves_optimizer_alone() -> None:
    """Catches a schedule built with last_batch_iteration >= 0 overwriting the resumed lr."""
    opt = _optimizer("Adam", [0.123])
    for sched in (WarmupLR(opt, warmup_max_lr=1.0, last_batch_iteration=5),
                  WarmupDecayLR(opt, 100, last_batch_iteration=5),
                  LRRangeTest(opt, last_batch_iteration=5),
                  OneCycle(opt, 1e-4, 1e-2, last_batch_iteration=5)):
        assert opt.param_groups[0]["lr"] == 0.123
        assert opt.param_groups[0]["betas"] == (0.9, 0.999)
        with pytest.raises(RuntimeError):
            sched.get_last_lr()


def test_warmup_defaults_match_deepspeed() -> None:
    """Catches default drift: WarmupLR's max lr is the optimizer's lr, WarmupDecayLR's is 0.001."""
    sched = WarmupLR(_optimizer("SGD", [0.05]), warmup_num_steps=4, warmup_type="linear")
    sched.step(10)
    assert sched.get_last_lr() == [0.05]
    decay = WarmupDecayLR(_optimizer("SGD", [0.05]), total_num_steps=100, warmup_num_steps=4)
    decay.step(4)
    assert decay.get_last_lr() == [0.001]


def test_unknown_warmup_type_warns_and_uses_log(caplog: pytest.LogCaptureFixture) -> None:
    """Catches a silent fallback (no warning) or a fallback to anything but DeepSpeed's log warmup."""
    with caplog.at_level(logging.WARNING, logger="shardspeed"):
        odd = WarmupLR(_optimizer("SGD", [0.5]), warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type="cosine")
    assert "cosine" in caplog.text
    log = WarmupLR(_optimizer("SGD", [0.5]), warmup_max_lr=1e-3, warmup_num_steps=10)
    odd.step(4)
    log.step(4)
    assert odd.get_last_lr() == log.get_last_lr()


def test_warnings_for_odd_but_accepted_settings(caplog: pytest.LogCaptureFixture) -> None:
    """Catches missing warnings that DeepSpeed gives: momentum not cycled for SGD, total steps
    shorter than warmup, get_lr() asked before the schedule started."""
    with caplog.at_level(logging.WARNING, logger="shardspeed"):
        opt = _optimizer("SGD", [0.5])
        OneCycle(opt, 1e-4, 1e-2).step()
        assert opt.param_groups[0]["momentum"] == 0.9 and "betas" not in opt.param_groups[0]
        assert "cycle_momentum" in caplog.text
        WarmupDecayLR(_optimizer("SGD", [0.5]), total_num_steps=5, warmup_num_steps=10)
        assert "less than warmup_num_steps" in caplog.text
        caplog.clear()
        assert WarmupLR(_optimizer("SGD", [0.5]), warmup_min_lr=1e-5).get_lr() == [1e-5]
        assert "before" in caplog.text


@pytest.mark.parametrize("build", [
    lambda opt: WarmupLR(opt, warmup_num_steps=0),
    lambda opt: WarmupLR(opt, warmup_num_steps=10.0),
    lambda opt: WarmupCosineLR(opt, 100, warmup_num_steps=-1),
    lambda opt: LRRangeTest(opt, lr_range_test_step_size=0),
    lambda opt: OneCycle(opt, 1e-4, 1e-2, cycle_first_step_size=0),
    lambda opt: OneCycle(opt, 1e-4, 1e-2, cycle_second_step_size=-1),
    lambda opt: WarmupLR(opt, warmup_min_lr=[0.0, 0.0, 0.0]),
    lambda opt: OneCycle(opt, [1e-4], 1e-2),
], ids=["warmup0", "warmup_float", "cos_negative", "range_step0", "first0", "second_neg", "list3", "list1"])
def test_invalid_arguments_raise_value_error(build: Any) -> None:
    """Catches bad step counts or per-group lists of the wrong length slipping through (DeepSpeed
    raises ValueError for each)."""
    with pytest.raises(ValueError):
        build(_optimizer("Adam", [0.5, 0.5]))


def test_one_cycle_zero_second_half_holds_peak_then_min() -> None:
    """Catches a division by zero when cycle_second_step_size is 0 (allowed by DeepSpeed)."""
    sched = OneCycle(_optimizer("Adam", [0.5]), 0.0, 1.0, cycle_first_step_size=4, cycle_second_step_size=0)
    lrs = []
    for _ in range(6):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == [0.25, 0.5, 0.75, 0.0, 0.0, 0.0]


def test_tensor_lr_is_filled_in_place() -> None:
    """Catches replacing a tensor lr (capturable/compiled optimizers hold it in a tensor) with a
    float, which would detach the optimizer from the schedule."""
    lr = torch.tensor(0.1)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr, foreach=False)
    sched = WarmupCosineLR(opt, total_num_steps=30, warmup_num_steps=10, warmup_type="linear")
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.0
    sched.step(4)
    assert opt.param_groups[0]["lr"] is lr
    assert math.isclose(lr.item(), 0.1 * 0.4, rel_tol=1e-6)  # fp32 tensor: 1e-6, not 1e-12


def test_accepts_wrapped_optimizer_and_rejects_others() -> None:
    """Catches losing DeepSpeed's support for wrappers that expose the torch optimizer as `.optimizer`."""
    class Wrapper:
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    opt = _optimizer("SGD", [0.5])
    WarmupLR(Wrapper(opt), warmup_min_lr=0.01)
    assert opt.param_groups[0]["lr"] == 0.01
    with pytest.raises(TypeError):
        WarmupLR(object())


# ---------------------------------------------------------------------------------------------
# The ds_config factory


def test_valid_schedulers_are_deepspeeds_five() -> None:
    """Freezes the accepted `scheduler.type` set; adding one is a deliberate diff."""
    assert VALID_SCHEDULERS == ("LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


@pytest.mark.parametrize("case", EXPECTED, ids=CASE_IDS)
def test_factory_builds_the_same_schedule(case: tuple) -> None:
    """Catches the factory dropping or renaming a parameter on its way to the class."""
    _, cls, (kind, lrs), kwargs, recorded = case
    opt = _optimizer(kind, lrs)
    sched = build_lr_scheduler(cls, dict(kwargs), opt)
    assert type(sched).__name__ == cls
    t = max(k for k in recorded if k != "init")
    sched.step(t)
    assert _close(_state(opt)[0], recorded[t][0])


def test_factory_accepts_integral_floats_for_step_counts() -> None:
    """Catches rejecting `1e3` (JSON has no integer exponent form) for integer params."""
    sched = build_lr_scheduler("WarmupDecayLR", {"total_num_steps": 3e3, "warmup_num_steps": 1e3,
                                                 "warmup_max_lr": 1e-3}, _optimizer("SGD", [0.5]))
    assert sched.warmup_num_steps == 1000 and isinstance(sched.warmup_num_steps, int)
    assert sched.total_num_steps == 3000 and isinstance(sched.total_num_steps, int)
    with pytest.raises(ConfigError, match=r"scheduler\.params\.warmup_num_steps"):
        build_lr_scheduler("WarmupLR", {"warmup_num_steps": 10.5}, _optimizer("SGD", [0.5]))


def test_factory_accepts_no_params() -> None:
    """Catches requiring a `params` section when the schedule's defaults suffice."""
    assert isinstance(build_lr_scheduler("WarmupLR", None, _optimizer("SGD", [0.5])), WarmupLR)


@pytest.mark.parametrize("type_name, guess", [("WarmupLr", "WarmupLR"), ("warmupcosinelr", "WarmupCosineLR"),
                                              ("OneCylce", "OneCycle"), ("StepLR", None)])
def test_factory_unknown_type(type_name: str, guess: str | None) -> None:
    """Catches an unknown `scheduler.type` failing without the key, the valid types or the likely fix."""
    with pytest.raises(ConfigError) as err:
        build_lr_scheduler(type_name, {}, _optimizer("SGD", [0.5]))
    message = str(err.value)
    assert "scheduler.type" in message and type_name in message
    assert all(name in message for name in VALID_SCHEDULERS)
    if guess:
        assert f"did you mean `{guess}`" in message
    else:
        assert "did you mean" not in message


def test_factory_unknown_param_names_key_and_closest() -> None:
    """Catches a misspelt parameter being ignored or reported without the dotted key and the fix."""
    with pytest.raises(ConfigError) as err:
        build_lr_scheduler("WarmupLR", {"warmup_num_step": 10}, _optimizer("SGD", [0.5]))
    assert "scheduler.params.warmup_num_step`" in str(err.value)
    assert "did you mean `scheduler.params.warmup_num_steps`" in str(err.value)
    with pytest.raises(ConfigError, match=r"scheduler\.params\.warmup_min_lr"):
        # WarmupCosineLR scales the optimizer's lr; it takes ratios, not lrs.
        build_lr_scheduler("WarmupCosineLR", {"total_num_steps": 10, "warmup_min_lr": 0.0}, _optimizer("SGD", [0.5]))


def test_factory_missing_required_param() -> None:
    """Catches a missing total_num_steps surfacing as a bare TypeError from the constructor."""
    with pytest.raises(ConfigError, match=r"scheduler\.params\.total_num_steps"):
        build_lr_scheduler("WarmupDecayLR", {"warmup_num_steps": 10}, _optimizer("SGD", [0.5]))
    with pytest.raises(ConfigError, match=r"scheduler\.params\.cycle_min_lr"):
        build_lr_scheduler("OneCycle", {}, _optimizer("SGD", [0.5]))


@pytest.mark.parametrize("params, key", [
    ({"warmup_type": "linaer"}, "warmup_type"),
    ({"warmup_max_lr": "auto"}, "warmup_max_lr"),
    ({"warmup_num_steps": "many"}, "warmup_num_steps"),
])
def test_factory_bad_values_name_the_key(params: dict, key: str) -> None:
    """Catches a config typo in a value (which the Python API only warns about) or an unresolved
    "auto" reaching the schedule."""
    with pytest.raises(ConfigError, match=rf"scheduler\.params\.{key}"):
        build_lr_scheduler("WarmupLR", params, _optimizer("SGD", [0.5]))


def test_factory_wraps_schedule_value_errors() -> None:
    """Catches a value the schedule rejects escaping as a plain ValueError without the config section."""
    with pytest.raises(ConfigError, match="warmup_num_steps.*scheduler.params"):
        build_lr_scheduler("WarmupLR", {"warmup_num_steps": 0}, _optimizer("SGD", [0.5]))
