"""The MoE API surface DeepSpeed code relies on: signatures and defaults, state-dict keys (checkpoints
port), expert-parameter marks (the engine reduces experts over their own group), the param-group
helpers (ZeRO 1/2 need MoE groups), bad inputs that must fail naming the value, and dtypes.

Catches a renamed or re-defaulted argument, a key that no longer loads a DeepSpeed checkpoint, an
expert averaged like a dense weight (or a gate that is not), a helper that loses or duplicates a
parameter, and a silent fallback where DeepSpeed would stop.
"""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

from shardspeed.moe import sharded_moe, utils
from shardspeed.moe.experts import Experts
from shardspeed.moe.layer import MoE
from shardspeed.moe.sharded_moe import MOELayer, TopKGate

H = 8


def expert() -> nn.Module:
    return nn.Sequential(nn.Linear(H, 2 * H), nn.ReLU(), nn.Linear(2 * H, H))


def defaults(fn: object) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
            if p.kind is not inspect.Parameter.KEYWORD_ONLY]


def test_signatures_and_defaults_are_deepspeeds() -> None:
    """DeepSpeed 0.19.8's positional parameters and defaults (shardspeed's additions are keyword-only)."""
    e = inspect.Parameter.empty
    assert defaults(MoE.__init__) == [
        ("self", e), ("hidden_size", e), ("expert", e), ("num_experts", 1), ("ep_size", 1), ("k", 1),
        ("capacity_factor", 1.0), ("eval_capacity_factor", 1.0), ("min_capacity", 4), ("use_residual", False),
        ("noisy_gate_policy", None), ("drop_tokens", True), ("use_rts", True), ("use_tutel", False),
        ("enable_expert_tensor_parallelism", False), ("top2_2nd_expert_sampling", True)]
    assert defaults(TopKGate.__init__) == [
        ("self", e), ("model_dim", e), ("num_experts", e), ("k", 1), ("capacity_factor", 1.0),
        ("eval_capacity_factor", 1.0), ("min_capacity", 8), ("noisy_gate_policy", None), ("drop_tokens", True),
        ("use_rts", True), ("ep_group", None), ("top2_2nd_expert_sampling", True)]
    assert defaults(MOELayer.__init__) == [("self", e), ("gate", e), ("experts", e), ("ep_group_name", e),
                                           ("ep_size", e), ("num_local_experts", e), ("use_tutel", False)]
    assert defaults(Experts.__init__) == [("self", e), ("expert", e), ("num_local_experts", 1), ("expert_group_name", None)]
    assert [n for n, _ in defaults(sharded_moe.top1gating)] == [
        "logits", "capacity_factor", "min_capacity", "used_token", "noisy_gate_policy", "drop_tokens", "use_rts",
        "ep_group", "sparse_routes", "use_tutel"]
    assert [n for n, _ in defaults(sharded_moe.top2gating)] == [
        "logits", "capacity_factor", "min_capacity", "drop_tokens", "ep_group", "top2_2nd_expert_sampling", "sparse_routes"]
    assert defaults(sharded_moe.topkgating)[6:] == [("drop_policy", "probs"), ("sparse_routes", False)]
    assert defaults(utils.split_params_into_different_moe_groups_for_optimizer)[1] == ("max_group_size", 178956971)
    assert [n for n, _ in defaults(MoE.forward)] == ["self", "hidden_states", "used_token"]
    extra = {n for n, p in inspect.signature(MoE.__init__).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert extra == {"eval_2nd_expert_sampling", "first_come_without_rts"}


def test_state_dict_keys_and_attributes() -> None:
    moe = MoE(H, expert(), num_experts=4, ep_size=2, use_residual=True)
    assert (moe.ep_size, moe.num_experts, moe.num_local_experts, moe.expert_group_name) == (2, 4, 2, "ep_size_2")
    assert isinstance(moe.deepspeed_moe, MOELayer) and moe.use_residual
    assert isinstance(moe.coefficient, nn.Linear) and moe.coefficient.out_features == 2
    expected = {"deepspeed_moe.gate.wg.weight", "coefficient.weight", "coefficient.bias"}
    expected |= {f"deepspeed_moe.experts.deepspeed_experts.{i}.{j}.{w}" for i in range(2) for j in (0, 2) for w in ("weight", "bias")}
    expected |= {f"mlp.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
    assert set(moe.state_dict()) == expected
    assert moe.deepspeed_moe.gate.wg.bias is None


def test_expert_parameters_are_marked_and_dense_ones_are_not() -> None:
    moe = MoE(H, expert(), num_experts=4, use_residual=True)
    marked = {n for n, p in moe.named_parameters() if hasattr(p, "allreduce")}
    assert marked == {n for n, _ in moe.named_parameters() if n.startswith("deepspeed_moe.experts.")} and marked
    for name, p in moe.named_parameters():
        if name in marked:
            assert p.allreduce is False and p.group_name == "ep_size_1"  # type: ignore[attr-defined]
        assert utils.is_moe_param(p) == (name in marked)
    first, second = (dict(e.named_parameters())["0.weight"] for e in moe.deepspeed_moe.experts.deepspeed_experts[:2])
    assert first is not second and torch.equal(first, second), "experts are deep copies"
    assert not any(hasattr(p, "allreduce") for p in moe.mlp.parameters()), "the residual MLP is dense"


def test_param_split_helpers() -> None:
    moe = MoE(H, expert(), num_experts=2, use_residual=True)
    params = list(moe.parameters())
    shared, experts = utils.split_params_into_shared_and_expert_params(params)
    assert len(shared) + len(experts) == len(params) and len(experts) == 8 and all(map(utils.is_moe_param, experts))
    moe(torch.randn(6, H))[0].sum().backward()
    shared_g, expert_g = utils.split_params_grads_into_shared_and_expert_params(params)
    assert len(expert_g) == 8 and len(shared_g) == len([p for p in shared if p.grad is not None])
    assert utils.has_moe_layers(nn.Sequential(nn.Linear(H, H), moe)) == (True, 2)
    assert utils.has_moe_layers(nn.Linear(H, H)) == (False, 0)


def test_moe_param_groups_for_the_optimizer() -> None:
    """DeepSpeed's grouping: settings copied, 'moe': True, named by expert group, chunked by element count."""
    moe = MoE(H, expert(), num_experts=3)  # each expert: 128 + 16 + 128 + 8 elements
    expert_params = [p for p in moe.parameters() if utils.is_moe_param(p)]
    dense = moe.deepspeed_moe.gate.wg.weight
    groups = utils.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(moe.parameters()), "name": "main", "lr": 0.5}, max_group_size=300)
    assert groups[0] == {"params": [dense], "name": "main", "lr": 0.5}
    moe_groups = groups[1:]
    assert all(g["moe"] is True and g["name"] == "ep_size_1" and g["lr"] == 0.5 for g in moe_groups)
    sizes = [[p.numel() for p in g["params"]] for g in moe_groups]
    assert sizes == [[128, 16, 128, 8]] * 3 and [p for g in moe_groups for p in g["params"]] == expert_params
    big = torch.nn.Parameter(torch.zeros(500))
    setattr(big, "allreduce", False)
    setattr(big, "group_name", "ep_size_1")
    one = utils.split_params_into_different_moe_groups_for_optimizer([{"params": [big] + expert_params, "name": "g"}],
                                                                     max_group_size=300)
    assert [[p.numel() for p in g["params"]] for g in one] == [[], [500]] + [[128, 16, 128, 8]] * 3
    whole = utils.split_params_into_different_moe_groups_for_optimizer(
        ({"params": expert_params, "name": "a"}, {"params": [dense], "name": "b"}), max_group_size=None)
    assert [(g["name"], len(g["params"]), g.get("moe")) for g in whole] == [
        ("a", 0, None), ("b", 1, None), ("ep_size_1", 12, True), ("ep_size_1", 0, True)]

    conf = utils.configure_moe_param_groups(list(moe.parameters()))
    assert [(g["name"], g.get("moe", False)) for g in conf] == [("dense-params", False), ("ep_size_1", True)]
    assert all(utils.is_moe_param_group(g) == g.get("moe", False) for g in conf)
    ready = [{"params": [dense]}, {"params": expert_params, "moe": True, "name": "ep_size_1"}]
    assert utils.configure_moe_param_groups(ready) is ready
    with pytest.raises(TypeError, match="list"):
        utils.configure_moe_param_groups(tuple(moe.parameters()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown param group type"):
        utils.split_params_into_different_moe_groups_for_optimizer("params")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs,error,words", [
    ({"num_experts": 4, "ep_size": 3}, ValueError, ["Number of experts (4)", "expert parallel size (3)"]),
    ({"num_experts": 4, "noisy_gate_policy": "Gumbel"}, ValueError, ["noisy_gate_policy", "Gumbel"]),
    ({"num_experts": 4, "k": 5}, ValueError, ["k=5", "num_experts (4)"]),
    ({"num_experts": 4, "k": 0}, ValueError, ["k=0", "num_experts (4)"]),
    ({"num_experts": 2, "use_rts": True, "first_come_without_rts": True}, ValueError, ["use_rts=False"]),
    ({"num_experts": 2, "enable_expert_tensor_parallelism": True}, NotImplementedError, ["enable_expert_tensor_parallelism"]),
])
def test_bad_arguments_name_the_value(kwargs: dict, error: type, words: list[str]) -> None:
    with pytest.raises(error) as err:
        MoE(H, expert(), **kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_too_few_tokens_for_min_capacity_says_so_with_numbers() -> None:
    moe = MoE(H, expert(), num_experts=2, min_capacity=4)
    with pytest.raises(ValueError, match=r"greater than min_capacity.*tokens: 3, min_capacity: 4"):
        moe(torch.randn(3, H))
    moe(torch.randn(4, H))


def test_expert_parallel_forward_without_a_group_says_how_to_get_one() -> None:
    moe = MoE(H, expert(), num_experts=4, ep_size=2)
    with pytest.raises(RuntimeError, match="set_deepspeed_parallelism"):
        moe(torch.randn(8, H))


def test_use_tutel_warns_and_changes_nothing() -> None:
    torch.manual_seed(0)
    plain = MoE(H, expert(), num_experts=2)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="Tutel"):
        tutel = MoE(H, expert(), num_experts=2, use_tutel=True)
    x = torch.randn(16, H)
    torch.manual_seed(1)
    a = plain(x)[0]
    torch.manual_seed(1)
    assert torch.equal(a, tutel(x)[0])


def test_bf16_in_bf16_out_with_fp32_gating() -> None:
    """bf16 experts and tokens: the output is bf16, l_aux fp32 and the routing that of fp32 logits."""
    torch.manual_seed(0)
    moe = MoE(H, expert(), num_experts=4, k=2, top2_2nd_expert_sampling=False).bfloat16()
    x = torch.randn(2, 16, H).bfloat16()
    out, l_aux, counts = moe(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert l_aux.dtype == torch.float32 and counts.dtype == torch.int64
    logits32 = x.reshape(-1, H).float() @ moe.deepspeed_moe.gate.wg.weight.float().t()
    routing = moe.deepspeed_moe.gate.route(x.reshape(-1, H))
    expected = sharded_moe.route_top2(logits32, 1.0, 4, True, False)
    assert torch.equal(routing.experts, expected.experts) and torch.equal(routing.weights, expected.weights)
    assert routing.weights.dtype == torch.float32


def test_expert_returning_a_tuple_uses_its_first_element() -> None:
    class WithBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(H, H)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), self.fc.bias

    torch.manual_seed(0)
    moe = MoE(H, WithBias(), num_experts=2, use_residual=True)
    x = torch.randn(12, H)
    out, _, _ = moe(x)
    assert out.shape == x.shape


def test_gate_output_matches_deepspeeds_dense_and_sparse_forms() -> None:
    """TopKGate.forward returns DeepSpeed's tuples; the dense combine weights hold each kept route's weight
    at (token, expert, slot) and the sparse form names the same routes."""
    torch.manual_seed(0)
    gate = TopKGate(H, 4, k=2, min_capacity=2, top2_2nd_expert_sampling=False)
    x = torch.randn(20, H)
    l_aux, combine, dispatch, counts = gate(x)
    l_aux2, cap, num_experts, idx, loc, weights, counts2 = gate(x, None, True)
    assert num_experts == 4 and combine.shape == (20, 4, int(cap)) and torch.equal(dispatch, combine.bool())
    assert idx.dtype == loc.dtype == torch.int32 and idx.shape == weights.shape == (2, 20)
    for r in range(2):
        for s in range(20):
            if idx[r, s] >= 0:
                assert combine[s, idx[r, s], loc[r, s]] == weights[r, s]
    assert int(dispatch.sum()) == int((idx >= 0).sum()) and torch.equal(counts, counts2) and torch.equal(l_aux, l_aux2)
    assert torch.allclose(combine.sum(dim=(1, 2))[(idx >= 0).any(dim=0)], torch.ones(()))


def test_no_warning_or_process_group_needed_at_ep_size_1() -> None:
    """ep_size 1 runs without torch.distributed (no collective, no group lookup)."""
    assert not torch.distributed.is_initialized()
    moe = MoE(H, expert(), num_experts=4, k=2, drop_tokens=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _, _ = moe(torch.randn(3, 5, H))
    assert out.shape == (3, 5, H)
