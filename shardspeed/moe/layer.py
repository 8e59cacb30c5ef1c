"""DeepSpeed's `deepspeed.moe.layer.MoE`: a mixture-of-experts layer with expert parallelism."""
from __future__ import annotations

import warnings
import torch.nn.functional as F
from torch import Tensor, nn

from ..comm import expert_groups
from .experts import Experts
from .sharded_moe import MOELayer, TopKGate, check_gate_arguments


class MoE(nn.Module):
    """A mixture-of-experts layer, DeepSpeed's signature, state-dict keys and routing.

    `num_experts` copies of `expert` are split over `ep_size` ranks (`num_local_experts` each; local i
    of expert-parallel rank r is global expert `r * num_local_experts + i`). Each token goes to its top
    `k` experts by a fp32 gate, subject to capacity `max(ceil(S / E * factor * k'), min_capacity)`
    with S this rank's tokens, k' = 1, 2 or k, factor `capacity_factor` in training and
    `eval_capacity_factor` in eval; `drop_tokens=False` drops nothing. With `use_residual`, the output
    mixes the MoE output with a dense `mlp` (the `expert` itself) by a softmax over `coefficient(x)`.

    `forward(hidden_states, used_token=None) -> (output, l_aux, exp_counts)`: output like the input,
    `l_aux` the 0-d fp32 load-balancing loss, `exp_counts` [E] tokens per expert before dropping (this
    rank's). `used_token` [S] masks tokens out of top-1 routing (ignored for k > 1, as in DeepSpeed).

    Unlike DeepSpeed, ranks may feed different token counts (each computes its capacity from its own
    count), and tokens move without padding to capacity (see `dispatch.py`); outputs are the same.

    `use_tutel=True` warns and is ignored (Tutel changes speed, not results).
    `enable_expert_tensor_parallelism=True` raises NotImplementedError.

    Keyword-only additions, defaults keep DeepSpeed's behaviour:
    - `eval_2nd_expert_sampling=False`: no Gumbel sampling of top-2's second expert in eval() (DeepSpeed
      samples it in eval too, so two eval forwards of one input differ).
    - `first_come_without_rts=True` (needs `use_rts=False`): top-1 keeps each expert's earliest tokens
      when over capacity, instead of torch.topk's order among tied scores (not first-come on CPU).
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: str | None = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, *, eval_2nd_expert_sampling: bool = True,
                 first_come_without_rts: bool = False) -> None:
        super().__init__()
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"Number of experts ({num_experts}) should be divisible by expert parallel size ({ep_size})")
        check_gate_arguments(num_experts, k, noisy_gate_policy, use_rts, first_come_without_rts)
        if enable_expert_tensor_parallelism:
            raise NotImplementedError("MoE(enable_expert_tensor_parallelism=True): tensor-parallel experts are not "
                                      "supported yet by shardspeed")
        if use_tutel:
            warnings.warn("MoE(use_tutel=True): Tutel is not used by shardspeed; ignored (results are the same)",
                          stacklevel=2)
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        # Built in DeepSpeed's order (experts, gate, coefficient) so a seed gives DeepSpeed's initial weights.
        experts = Experts(expert, self.num_local_experts, self.expert_group_name)
        gate = TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                        noisy_gate_policy, drop_tokens, use_rts, None, top2_2nd_expert_sampling,
                        eval_2nd_expert_sampling=eval_2nd_expert_sampling, first_come_without_rts=first_come_without_rts)
        self.deepspeed_moe = MOELayer(gate, experts, self.expert_group_name, ep_size, self.num_local_experts)
        if use_residual:
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Create (once per process) the expert and expert-data parallel groups named `expert_group_name`
        and hand this layer its expert-parallel group. Collective: every rank calls it. The engine calls
        it for every module that has it."""
        name = expert_groups.create(self.ep_size, data_before_expert=use_data_before_expert_parallel_)
        self.deepspeed_moe._set_ep_group(expert_groups.expert_parallel(name).group)

    def forward(self, hidden_states: Tensor, used_token: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        output = self.deepspeed_moe(hidden_states, used_token)
        if self.use_residual:
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]  # (output, bias) experts: DeepSpeed keeps element 0
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        l_aux, exp_counts = self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts
        assert l_aux is not None and exp_counts is not None  # set by the forward just above
        return output, l_aux, exp_counts

