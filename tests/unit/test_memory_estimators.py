"""DeepSpeed's ZeRO-2/3 memory estimators under DeepSpeed's paths: the same numbers and tables.

Every expected value below was copied from DeepSpeed 0.19.8's output for the same inputs (run on this
machine with DS_ACCELERATOR=cpu). DeepSpeed prints its offload device as `f"{OffloadDeviceEnum.cpu:4}"`,
which Python 3.11 renders as "OffloadDeviceEnum.cpu"; shardspeed prints the "cpu " that the padding was
meant to give (what DeepSpeed prints on older Pythons). That label is the one difference, and
`_deepspeed` below applies it to DeepSpeed's text.
"""
from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from shardspeed.runtime.zero import stage3 as z3
from shardspeed.runtime.zero import stage_1_and_2 as z2

# (total params, largest layer params, GPUs per node, nodes, additional_buffer_factor)
LAYOUTS = [(1_300_000_000, 51_000_000, 8, 1, 1.5), (6_738_415_616, 131_072_000, 8, 4, 1.2),
           (70_553_706_496, 1_052_770_304, 8, 16, 1.0)]

# DeepSpeed 0.19.8: estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload, factor) for
# cpu_offload True, False.
ZERO2 = [[(62400000000, 2600000000), (62400000000, 5525000000)],
         [(1035020638617, 13476831232), (258755159654, 17267190016)],
         [(36123497725952, 141107412992), (2257718607872, 151029027968)]]
# DeepSpeed 0.19.8: estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload,
# cpu_offload_params, zero_init, factor) for (offload, offload_params, zero_init) in
# (T,T,T) (T,T,F) (T,F,T) (T,F,F) (F,*,T) (F,*,F).
ZERO3 = [[(35100000000, 204000000, 204000000), (62400000000, 204000000, 204000000),
          (31200000000, 529000000, 204000000), (62400000000, 529000000, 204000000),
          (2448000000, 3129000000, 204000000), (62400000000, 3129000000, 204000000)],
         [(36387444326, 524288000, 524288000), (258755159654, 524288000, 524288000),
          (32344394956, 945438976, 524288000), (258755159654, 945438976, 524288000),
          (5033164800, 4314646784, 524288000), (258755159654, 4314646784, 524288000)],
         [(79372919808, 4211081216, 4211081216), (2257718607872, 4211081216, 4211081216),
          (70553706496, 5313482880, 4211081216), (2257718607872, 5313482880, 4211081216),
          (33688649728, 14132696192, 4211081216), (2257718607872, 14132696192, 4211081216)]]


def _deepspeed(text: str) -> str:
    return text.replace("OffloadDeviceEnum.cpu", "cpu ")


def _printed(fn, *args, **kwargs) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert fn(*args, **kwargs) is None  # DeepSpeed's print the table and return nothing
    return out.getvalue()


@pytest.mark.parametrize("layout,expected2,expected3", list(zip(LAYOUTS, ZERO2, ZERO3)))
def test_numbers_equal_deepspeeds(layout, expected2, expected3) -> None:
    """Catches any drift in the per-option byte counts (offload, parameter offload, zero.Init, nodes)."""
    total, largest, gpus, nodes, factor = layout
    assert [z2.estimate_zero2_model_states_mem_needs(total, gpus, nodes, off, factor) for off in (True, False)] == expected2
    got3 = [z3.estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, off, off_params, init, factor)
            for off, off_params in ((True, True), (True, False), (False, False)) for init in (True, False)]
    assert got3 == expected3


def test_cold_tables_equal_deepspeeds() -> None:
    """Catches a changed layout, rounding or option label in the printed tables (16 nodes: the widest numbers)."""
    total, largest, gpus, nodes, factor = LAYOUTS[2]
    assert _printed(z2.estimate_zero2_model_states_mem_needs_all_cold, total, num_gpus_per_node=gpus, num_nodes=nodes,
                    additional_buffer_factor=factor) == _deepspeed("""\
Estimated memory needed for params, optim states and gradients for a:
HW: Setup with 16 nodes, 8 GPUs per node.
SW: Model with 70553M total params.
  per CPU  |  per GPU |   Options
 33642.63GB | 131.42GB | offload_optimizer=OffloadDeviceEnum.cpu
 2102.66GB | 140.66GB | offload_optimizer=none
""")
    assert _printed(z3.estimate_zero3_model_states_mem_needs_all_cold, total, largest, num_gpus_per_node=gpus,
                    num_nodes=nodes, additional_buffer_factor=factor) == _deepspeed("""\
Estimated memory needed for params, optim states and gradients for a:
HW: Setup with 16 nodes, 8 GPUs per node.
SW: Model with 70553M total params, 1052M largest layer params.
  per CPU  |  per GPU |   Options
   73.92GB |   3.92GB | offload_param=OffloadDeviceEnum.cpu, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=1
 2102.66GB |   3.92GB | offload_param=OffloadDeviceEnum.cpu, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=0
   65.71GB |   4.95GB | offload_param=none, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=1
 2102.66GB |   4.95GB | offload_param=none, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=0
   31.38GB |  13.16GB | offload_param=none, offload_optimizer=none, zero_init=1
 2102.66GB |  13.16GB | offload_param=none, offload_optimizer=none, zero_init=0
""")


class _Tied(nn.Module):
    """45.7M parameters; the output head shares the embedding (counted once), the embedding is the largest layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50257, 768)
        self.blocks = nn.Sequential(*[nn.Linear(768, 3072) for _ in range(3)])
        self.head = nn.Linear(768, 50257, bias=False)
        self.head.weight = self.emb.weight


def test_live_model_tables_equal_deepspeeds() -> None:
    """Catches tied weights counted twice, the largest layer taken with its children's parameters, or
    singular/plural labels (1 node, 1 GPU) wrong."""
    model = _Tied()
    assert z2.model_to_params(model) == 45684480 and z3.model_to_params(model) == (45684480, 38597376)
    assert _printed(z2.estimate_zero2_model_states_mem_needs_all_live, model) == _deepspeed("""\
Estimated memory needed for params, optim states and gradients for a:
HW: Setup with 1 node, 1 GPU per node.
SW: Model with 45M total params.
  per CPU  |  per GPU |   Options
    1.02GB |   0.09GB | offload_optimizer=OffloadDeviceEnum.cpu
    0.26GB |   0.85GB | offload_optimizer=none
""")
    assert _printed(z3.estimate_zero3_model_states_mem_needs_all_live, model, num_gpus_per_node=4, num_nodes=2) == _deepspeed("""\
Estimated memory needed for params, optim states and gradients for a:
HW: Setup with 2 nodes, 4 GPUs per node.
SW: Model with 45M total params, 38M largest layer params.
  per CPU  |  per GPU |   Options
    0.57GB |   0.14GB | offload_param=OffloadDeviceEnum.cpu, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=1
    1.02GB |   0.14GB | offload_param=OffloadDeviceEnum.cpu, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=0
    0.51GB |   0.15GB | offload_param=none, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=1
    1.02GB |   0.15GB | offload_param=none, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=0
    0.86GB |   0.24GB | offload_param=none, offload_optimizer=none, zero_init=1
    1.02GB |   0.24GB | offload_param=none, offload_optimizer=none, zero_init=0
""")


def test_meta_and_partitioned_parameters_count_whole() -> None:
    """Catches a model built on the meta device counted as one parameter (DeepSpeed's data_ptr() is 0
    for all of them) or a ZeRO-3 partitioned parameter counted by its empty local tensor."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 30))
    assert z3.model_to_params(model) == (10 * 20 + 20 + 20 * 30 + 30, 20 * 30 + 30)
    shard = nn.Linear(10, 20)
    shard.weight.data = torch.empty(0)
    shard.weight.ds_numel = 200  # what a stage-3 partitioned parameter carries
    assert z2.model_to_params(shard) == 220
