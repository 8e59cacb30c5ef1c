"""`MoE(ep_size=1)` against a per-token reference of DeepSpeed 0.19.8's routing rules.

The reference below is written from the rules (notes/moe-inference.md §A.2), not from the
implementation: loop over tokens, pick experts, compute the capacity, let each expert keep its
tokens by DeepSpeed's priority, combine the kept routes. It reads only the layer's weights.
Catches: a wrong capacity (factor, eval factor, k multiplier, min_capacity), the wrong tokens kept
(priority order, top-2's queue of first choices before second choices, top-k by probability),
unnormalised or wrongly normalised combine weights, a wrong l_aux or exp_counts, noise outside
training, random draws out of step with DeepSpeed's (the same seed must give the same routing), and
gradients that do not reach the gate or the experts as the reference's do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardspeed.moe.layer import MoE
from shardspeed.moe.sharded_moe import _capacity

H, E = 8, 4
SHAPE = (4, 12)  # 48 tokens: 12 per expert on average, so capacity factor 0.5 drops tokens
# Per-token expert calls and batched ones differ in fp32 summation order only (a few ulp).
TOL: dict[str, Any] = dict(rtol=1e-6, atol=1e-6)


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, 2 * H), nn.Linear(2 * H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@dataclass
class Noise:
    """The random numbers DeepSpeed's gate draws in one forward, in its order."""

    jitter: torch.Tensor | None = None  # [S, H], 'Jitter' in training
    gumbel: torch.Tensor | None = None  # [S, E], 'RSample' (top-1) or top-2's second-expert sampling
    priority: torch.Tensor | None = None  # [S, E], top-1 random token selection


@dataclass
class Result:
    out: torch.Tensor
    l_aux: torch.Tensor
    counts: torch.Tensor
    dropped: int
    kept: list[list[int]] = field(default_factory=list)  # per token, the experts that kept it


def draw_noise(seed: int, S: int, *, jitter: bool = False, gumbel: bool = False, priority: bool = False) -> Noise:
    torch.manual_seed(seed)
    noise = Noise()
    if jitter:
        noise.jitter = torch.distributions.Uniform(torch.tensor(0.99), torch.tensor(1.01)).rsample((S, H))
    if gumbel:
        noise.gumbel = torch.distributions.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample((S, E))
    if priority:
        noise.priority = torch.rand(S, E)
    return noise


def reference(moe: MoE, x: torch.Tensor, noise: Noise | None = None, used_token: torch.Tensor | None = None,
              survivors: dict[int, set[int]] | None = None, grad: bool = False) -> Result:
    """DeepSpeed's MoE forward, one token at a time. Without a random priority, top-1 keeps an expert's
    earliest tokens or, when given, the `survivors` per expert (torch.topk's tie order)."""
    with torch.set_grad_enabled(grad):
        return _reference(moe, x, noise or Noise(), used_token, survivors)


def _reference(moe: MoE, x: torch.Tensor, noise: Noise, used_token: torch.Tensor | None,
               survivors: dict[int, set[int]] | None) -> Result:
    gate = moe.deepspeed_moe.gate
    experts = list(moe.deepspeed_moe.experts.deepspeed_experts)
    k, training = gate.k, moe.training
    tokens = x.reshape(-1, H)
    S = tokens.shape[0]
    gate_in = tokens.float() * noise.jitter if noise.jitter is not None else tokens.float()
    logits = gate_in @ gate.wg.weight.float().t()
    probs = logits.softmax(dim=-1)

    choices: list[list[int]] = []
    for s in range(S):
        if k == 1:
            scores = logits[s] + noise.gumbel[s] if noise.gumbel is not None else probs[s]
            pick = [int(scores.argmax())]
            if used_token is not None and used_token[s] == 0:
                pick = []
        elif k == 2:
            first = int(probs[s].argmax())
            second_scores = (logits[s] + noise.gumbel[s] if noise.gumbel is not None else logits[s]).clone()
            second_scores[first] = -math.inf
            pick = [first, int(second_scores.argmax())]
        else:
            pick = [int(e) for e in probs[s].topk(k).indices]
        choices.append(pick)

    counts = torch.zeros(E, dtype=torch.int64)
    for pick in choices:
        for e in pick:
            counts[e] += 1
    first_counts = torch.tensor([sum(1 for p in choices if p and p[0] == e) for e in range(E)])
    me = probs.mean(dim=0)
    if k == 1:
        l_aux = E * (me * counts / S).sum()
    elif k == 2:  # only first choices count
        l_aux = E * (me * first_counts / S).sum()
    else:
        l_aux = E / k * (me * counts / S).sum()

    factor = gate.capacity_factor if training else gate.eval_capacity_factor
    capacity = max(math.ceil(S / E * factor * k), gate.min_capacity) if gate.drop_tokens else S * k
    keeps: dict[int, set[tuple[int, int]]] = {}  # expert -> kept (token, rank of the route)
    for e in range(E):
        if k == 1:
            queue = [(s, 0) for s in range(S) if choices[s] == [e]]
            if survivors is not None and gate.drop_tokens:
                keeps[e] = {(s, 0) for s, _ in queue if s in survivors[e]}
                continue
            priority = noise.priority
            if priority is not None:
                queue.sort(key=lambda sr: -float(priority[sr[0], e]))
        elif k == 2:  # every first choice queues before any second choice
            queue = [(s, 0) for s in range(S) if choices[s][0] == e] + [(s, 1) for s in range(S) if choices[s][1] == e]
        else:  # by gate probability
            queue = sorted([(s, choices[s].index(e)) for s in range(S) if e in choices[s]], key=lambda sr: -float(probs[sr[0], e].detach()))
        keeps[e] = set(queue[:capacity])

    rows, kept_experts, dropped = [], [], 0
    for s in range(S):
        kept = [e for r, e in enumerate(choices[s]) if (s, r) in keeps[e]]
        dropped += len(choices[s]) - len(kept)
        weights = {e: probs[s, e] for e in kept}
        if k > 1 and kept:
            total = torch.clamp(torch.stack(list(weights.values())).sum(), min=torch.finfo(torch.float32).eps)
            weights = {e: w / total for e, w in weights.items()}
        row = torch.zeros(H)
        for e in kept:
            row = row + weights[e] * experts[e](tokens[s:s + 1])[0].float()
        rows.append(row)
        kept_experts.append(kept)
    out = torch.stack(rows).to(x.dtype).reshape(x.shape)
    if moe.use_residual:
        coef = moe.coefficient(x).softmax(dim=-1)
        out = out * coef[..., 0:1] + moe.mlp(x) * coef[..., 1:]
    return Result(out, l_aux, counts, dropped, kept_experts)


def make(k: int = 1, seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    kw = {"capacity_factor": 0.5, "eval_capacity_factor": 0.5, "min_capacity": 2, **kw}
    return MoE(H, Expert(), num_experts=E, k=k, **kw)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(*SHAPE, H, generator=torch.Generator().manual_seed(seed))


def check(moe: MoE, x: torch.Tensor, ref: Result, seed: int = 5) -> None:
    torch.manual_seed(seed)
    out, l_aux, counts = moe(x)
    torch.testing.assert_close(out, ref.out, **TOL)
    torch.testing.assert_close(l_aux, ref.l_aux.to(l_aux.dtype), **TOL)
    assert torch.equal(counts, ref.counts)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("drop", [True, False], ids=["drop", "dropless"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_reference(k: int, drop: bool, residual: bool) -> None:
    """Top-1 (position order), top-2 (no sampling), top-3; dropping or dropless; with a residual MLP."""
    moe = make(k, drop_tokens=drop, use_residual=residual, use_rts=False, first_come_without_rts=k == 1,
               top2_2nd_expert_sampling=False)
    x = tokens()
    ref = reference(moe, x)
    check(moe, x, ref)
    if drop:
        assert ref.dropped > 0, "the case must drop tokens to test the capacity rule"
    else:
        assert ref.dropped == 0
        formula = math.ceil(x.numel() / H / E * 0.5 * k)
        assert int(ref.counts.max()) > formula, "DeepSpeed's capacity formula would have dropped here"


@pytest.mark.parametrize("drop", [True, False], ids=["drop", "dropless"])
def test_top1_random_token_selection_uses_deepspeeds_draw(drop: bool) -> None:
    """RTS: an expert over capacity keeps its tokens with the largest uniform draw, drawn as DeepSpeed does."""
    moe = make(1, drop_tokens=drop)
    x = tokens()
    ref = reference(moe, x, draw_noise(5, x.numel() // H, priority=True))
    check(moe, x, ref, seed=5)
    assert (ref.dropped > 0) == drop
    first_come = reference(moe, x)
    if drop:
        assert first_come.kept != ref.kept, "random selection should keep other tokens than first-come here"


def test_top1_without_rts_keeps_torch_topk_choice_by_default() -> None:
    """DeepSpeed's default without RTS: torch.topk over the 0/1 assignment picks the survivors among ties."""
    moe = make(1, use_rts=False)
    x = tokens()
    logits = x.reshape(-1, H) @ moe.deepspeed_moe.gate.wg.weight.t()
    assignment = F.one_hot(logits.argmax(dim=1), E)
    capacity = math.ceil(x.numel() / H / E * 0.5)
    chosen = torch.topk(assignment, k=capacity, dim=0).indices
    survivors = {e: {int(s) for s in chosen[:, e] if assignment[s, e]} for e in range(E)}
    ref = reference(moe, x, survivors=survivors)
    check(moe, x, ref)
    assert ref.dropped > 0
    kept_per_expert = [sum(e in kept for kept in ref.kept) for e in range(E)]
    assert kept_per_expert == [min(int(c), capacity) for c in ref.counts]


def test_first_come_flag_keeps_earliest_tokens() -> None:
    """`first_come_without_rts` keeps each expert's earliest tokens (DeepSpeed's tie order need not)."""
    moe = make(1, use_rts=False, first_come_without_rts=True)
    x = tokens()
    ref = reference(moe, x)
    check(moe, x, ref)
    for e in range(E):
        routed = [s for s, kept in enumerate(ref.kept) if e in kept]
        assert routed == sorted(routed)[:len(routed)]
    with pytest.raises(ValueError, match="use_rts=False"):
        make(1, first_come_without_rts=True)


def test_top2_second_expert_sampling() -> None:
    """With sampling on (DeepSpeed's default) the second expert is Gumbel-sampled, in eval too, so two
    eval forwards differ; `eval_2nd_expert_sampling=False` makes eval deterministic and equal to
    no sampling, while training still samples with DeepSpeed's draw."""
    x = tokens()
    S = x.numel() // H
    sampled = make(2).eval()
    a, b = sampled(x)[0], sampled(x)[0]
    assert not torch.equal(a, b), "DeepSpeed samples top-2's second expert in eval"

    fixed = make(2, eval_2nd_expert_sampling=False).eval()
    a, b = fixed(x)[0], fixed(x)[0]
    assert torch.equal(a, b)
    check(fixed, x, reference(fixed, x))

    fixed.train()
    ref = reference(fixed, x, draw_noise(3, S, gumbel=True))
    check(fixed, x, ref, seed=3)
    assert ref.dropped > 0


def test_noise_policies_apply_in_training_only() -> None:
    """'Jitter' scales the gate input, 'RSample' picks top-1 by Gumbel-max (weights stay un-noised);
    both only in training, with DeepSpeed's draws (jitter or Gumbel first, then the RTS draw)."""
    x = tokens()
    S = x.numel() // H
    plain = make(1).eval()
    torch.manual_seed(9)
    expected = plain(x)[0]
    for policy in ("Jitter", "RSample"):
        moe = make(1, noisy_gate_policy=policy).eval()
        torch.manual_seed(9)
        assert torch.equal(moe(x)[0], expected), f"{policy} changed an eval forward"
        moe.train()
        noise = draw_noise(4, S, jitter=policy == "Jitter", gumbel=policy == "RSample", priority=True)
        ref = reference(moe, x, noise)
        check(moe, x, ref, seed=4)
        unnoised = reference(moe, x, Noise(priority=noise.priority))
        assert not torch.allclose(ref.out, unnoised.out, rtol=0, atol=1e-5), f"{policy} changed nothing"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_capacity_formula(k: int) -> None:
    """Capacity = max(ceil(S / E * factor * k), min_capacity), with the eval factor in eval(): seen as the
    number of tokens a single overloaded expert keeps."""
    S = x_tokens = 40
    moe = make(k, capacity_factor=1.0, eval_capacity_factor=0.5, min_capacity=3, use_rts=False,
               first_come_without_rts=k == 1, top2_2nd_expert_sampling=False)
    with torch.no_grad():  # expert 0 wins every token by far; then 1, then 2
        moe.deepspeed_moe.gate.wg.weight.copy_(torch.tensor([[9.0] * H, [6.0] * H, [3.0] * H, [0.0] * H]))
    x = torch.rand(1, x_tokens, H) + 0.5
    for training, factor in ((True, 1.0), (False, 0.5)):
        moe.train(training)
        routing = moe.deepspeed_moe.gate.route(x.reshape(-1, H))
        kept0 = int((routing.experts == 0).sum())
        assert kept0 == max(math.ceil(S / E * factor * k), 3), f"training={training}"
    moe.deepspeed_moe.gate.min_capacity = 30
    assert int((moe.deepspeed_moe.gate.route(x.reshape(-1, H)).experts == 0).sum()) == min(30, S)


def test_capacity_is_rounded_in_fp32_as_deepspeed() -> None:
    """DeepSpeed multiplies S / E by the factor in fp32 before the ceil; float64 would differ here
    (values checked against DeepSpeed 0.19.8's `_capacity`)."""
    for S, E_, factor, expected in ((25, 2, 1.2, 16), (25, 1, 2.2, 55), (35, 6, 1.2, 8)):
        assert math.ceil(S / E_ * factor) != expected
        assert int(_capacity(S, E_, factor, 0)) == expected
    assert int(_capacity(48, 4, 0.5, 8)) == 8 and int(_capacity(48, 4, 0.5, 2)) == 6


def test_used_token_masks_top1_routes() -> None:
    """Masked tokens get no expert and no count, but still shape l_aux's gate mean, as in DeepSpeed."""
    moe = make(1, use_rts=False, first_come_without_rts=True, capacity_factor=2.0)
    x = tokens()
    used = (torch.arange(x.numel() // H) % 3 != 0).long()
    ref = reference(moe, x, used_token=used)
    out, l_aux, counts = moe(x, used)
    torch.testing.assert_close(out, ref.out, **TOL)
    torch.testing.assert_close(l_aux, ref.l_aux, **TOL)
    assert torch.equal(counts, ref.counts) and int(counts.sum()) == int(used.sum())
    assert torch.all(out.reshape(-1, H)[used == 0] == 0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradients_match_reference(k: int) -> None:
    """Backward through output and l_aux reaches the gate, the experts and the input as in the reference
    (dropped routes give nothing, kept weights carry the gate's gradient)."""
    moe = make(k, use_rts=False, first_come_without_rts=k == 1, top2_2nd_expert_sampling=False)
    probe = torch.randn(*SHAPE, H, generator=torch.Generator().manual_seed(7))
    x = tokens().requires_grad_()

    def grads(run: bool) -> list[torch.Tensor]:
        moe.zero_grad(set_to_none=True)
        x.grad = None
        if run:
            out, l_aux, _ = moe(x)
        else:
            ref = reference(moe, x, grad=True)
            out, l_aux = ref.out, ref.l_aux
            assert ref.dropped > 0
        ((out * probe).sum() + 10 * l_aux).backward()
        assert x.grad is not None
        return [x.grad.clone()] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in moe.parameters()]

    for got, want, name in zip(grads(True), grads(False), ["input"] + [n for n, _ in moe.named_parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert moe.deepspeed_moe.gate.wg.weight.grad is not None and moe.deepspeed_moe.gate.wg.weight.grad.abs().sum() > 0
