"""DeepSpeed-Chat's RLHF formulas (reward model, PPO, DPO) and GRPO's, on hand-made tensors, against the
per-sample, per-token loops of tests/chat_reference.py.

The cases are the ones that break vectorised code: left-padded prompts, EOS in mid-answer with pad == eos,
answers filling the maximum length, answers of one token, identical chosen/rejected pairs, OPT's leading pad
(num_padding_at_beginning 1), zero-variance GRPO groups. Tolerances: the references compute in float64 and
the code in float32 on values of magnitude <= 10, so 1e-6 absolute / relative covers float32 rounding.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from shardspeed.chat import dpo, grpo, ppo_formulas as F
from shardspeed.chat.ppo_trainer import DeepSpeedPPOTrainer
from shardspeed.chat.reward_model import RewardModel, ScoringRewardModel, pairwise_span_loss
from tests import chat_reference as ref

TOL = dict(rtol=1e-6, atol=1e-6)
PAD = 0


def close(actual: torch.Tensor, expected: object) -> None:
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), **TOL)


# ---- PPO -----------------------------------------------------------------------------------------------
# P = 4 prompt columns (left-padded), 4 answer columns; pad == eos == 0.
SEQ = torch.tensor([
    [0, 0, 5, 6, 7, 8, 0, 0],        # left padding; EOS (= pad) after two answer tokens
    [3, 4, 5, 6, 7, 8, 9, 10],       # full prompt; answer fills the maximum length
    [0, 5, 6, 7, 9, 0, 0, 0],        # one answer token
    [0, 0, 0, 5, 11, 12, 13, 0],     # three answer tokens, EOS on the last column
])
P = 4
MASK = (SEQ != PAD).long()
ACTION_MASK = MASK[:, 1:]
START = P - 1
gen = torch.Generator().manual_seed(0)
LOGP = -torch.rand(4, 7, generator=gen) * 3
REF_LOGP = LOGP + torch.randn(4, 7, generator=gen) * 0.3
NEW_LOGP = LOGP + torch.randn(4, 7, generator=gen) * 0.4  # ratios inside and outside 1 -+ 0.2
VALUES = torch.randn(4, 7, generator=gen)
NEW_VALUES = VALUES + torch.randn(4, 7, generator=gen) * 0.4
SCORES = torch.tensor([7.3, -2.0, 0.5, -9.0])  # two beyond the clip of 5


def _trainer(**args: object) -> DeepSpeedPPOTrainer:
    """A trainer whose engines are never used: only its formulas and hyper-parameters are."""
    engine = types.SimpleNamespace(actor=None, critic=None, ref=None, reward=None,
                                   tokenizer=types.SimpleNamespace(pad_token_id=PAD))
    return DeepSpeedPPOTrainer(engine, types.SimpleNamespace(**args))


@pytest.mark.parametrize("kl_ctl,clip", [(0.1, 5.0), (0.05, 3.0)])
def test_compute_rewards(kl_ctl: float, clip: float) -> None:
    """Catches the end reward on the wrong action (off by one, or not clamped to the last action when the answer
    fills the length), a missing clip, the KL sign, and a trainer ignoring args.kl_ctl / args.clip_reward_value."""
    expected = ref.compute_rewards(P, LOGP, REF_LOGP, SCORES, ACTION_MASK, kl_ctl, clip)
    close(F.compute_rewards(START, LOGP, REF_LOGP, SCORES, ACTION_MASK, kl_ctl, clip), expected)
    trainer = _trainer(kl_ctl=kl_ctl, clip_reward_value=clip)
    close(trainer.compute_rewards(SEQ[:, :P], LOGP, REF_LOGP, SCORES, ACTION_MASK), expected)


def test_ppo_defaults_are_deepspeed_chats() -> None:
    t = _trainer()
    assert (t.kl_ctl, t.clip_reward_value, t.cliprange, t.cliprange_value, t.gamma, t.lam) == (0.1, 5, 0.2, 0.2, 1.0, 0.95)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_advantages_and_returns(gamma: float, lam: float) -> None:
    """Catches GAE off by one at the last action, a wrong bootstrap, values/rewards not zeroed after the end,
    and a trainer ignoring args.gamma / args.lam."""
    rewards = F.compute_rewards(START, LOGP, REF_LOGP, SCORES, ACTION_MASK, 0.1, 5.0)
    zeroed_r, zeroed_v = F.zero_after_end(rewards, VALUES, START, ACTION_MASK)
    exp_r, exp_v = ref.zero_after_end(rewards, VALUES, P, ACTION_MASK)
    close(zeroed_r, exp_r)
    close(zeroed_v, exp_v)
    exp_adv, exp_ret = ref.gae(exp_v, exp_r, START, gamma, lam)
    adv, ret = _trainer(gamma=gamma, lam=lam).get_advantages_and_returns(zeroed_v, zeroed_r, START)
    close(adv, exp_adv)
    close(ret, exp_ret)
    assert not adv.requires_grad


@pytest.mark.parametrize("cliprange", [0.2, 0.05])
def test_actor_loss(cliprange: float) -> None:
    """Catches an unmasked ratio (the log-ratio at a pad is huge: exp overflows unless masked first), min instead
    of max, or clipping on the wrong side."""
    adv = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    mask = ACTION_MASK[:, START:]
    new = NEW_LOGP[:, START:] + 200.0 * (1 - mask)
    expected = ref.actor_loss(new, LOGP[:, START:], adv, mask, cliprange)
    close(_trainer(cliprange=cliprange).actor_loss_fn(new, LOGP[:, START:], adv, mask), expected)


@pytest.mark.parametrize("cliprange_value", [0.2, 0.05])
def test_critic_loss(cliprange_value: float) -> None:
    """Catches a missing 0.5, clipping around the new instead of the old values, or max/min swapped."""
    returns = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    mask = ACTION_MASK[:, START:]
    expected = ref.critic_loss(NEW_VALUES[:, START:], VALUES[:, START:], returns, mask, cliprange_value)
    trainer = _trainer(cliprange_value=cliprange_value)
    close(trainer.critic_loss_fn(NEW_VALUES[:, START:], VALUES[:, START:], returns, mask), expected)


def test_gather_log_probs() -> None:
    logits = torch.randn(4, 8, 14, generator=torch.Generator().manual_seed(3))
    close(F.gather_log_probs(logits[:, :-1], SEQ[:, 1:]), ref.log_probs(logits, SEQ))


# ---- reward model ------------------------------------------------------------------------------------
# chosen rows 0-3 then rejected rows 4-7, right-padded with pad == eos == 0
PAIRS = torch.tensor([
    [4, 5, 6, 7, 0, 0, 0, 0],   # chosen ends at 4, rejected at 6: span 2..6
    [4, 5, 6, 7, 8, 9, 10, 11],  # chosen fills the length, rejected shorter: span 1..8
    [4, 5, 6, 0, 0, 0, 0, 0],   # identical to its rejected row: the last position only
    [4, 5, 6, 7, 8, 0, 0, 0],   # differs only after the chosen row's end
    [4, 5, 9, 9, 9, 9, 0, 0],
    [4, 6, 6, 7, 8, 0, 0, 0],
    [4, 5, 6, 0, 0, 0, 0, 0],
    [4, 5, 6, 7, 8, 3, 3, 0],
])
# OPT: every row starts with the pad token; num_padding_at_beginning = 1 skips it
OPT_PAIRS = torch.cat([torch.zeros(8, 1, dtype=torch.long), PAIRS[:, :-1]], dim=1)
RHO = torch.randn(8, 8, generator=torch.Generator().manual_seed(4)) * 2


@pytest.mark.parametrize("ids,k", [(PAIRS, 0), (OPT_PAIRS, 1)])
def test_reward_model_span_loss_and_end_scores(ids: torch.Tensor, k: int) -> None:
    """Catches the loss over the wrong span (from 0, to the earlier end, the first pad instead of the k-th),
    identical pairs mishandled, and end scores read at the end instead of the last non-pad token."""
    loss, chosen, rejected = ref.reward_model_forward(ids, RHO, PAD, k)
    out = pairwise_span_loss(ids, RHO, PAD, k)
    close(out["loss"], loss)
    close(out["chosen_mean_scores"], chosen)
    close(out["rejected_mean_scores"], rejected)


def test_reward_model_pair_differing_at_the_first_token_is_an_error() -> None:
    ids = torch.tensor([[4, 5, 0], [5, 5, 0]])
    with pytest.raises(ValueError, match="differ at their first token"):
        pairwise_span_loss(ids, torch.zeros(2, 3), PAD)


class _Backbone(nn.Module):
    """A 'transformer' whose last hidden state is a fixed tensor [B, L, 1], so rewards = that x v_head."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=1, model_type="stub")
        self.hidden = hidden

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor]:
        return (self.hidden[: input_ids.shape[0], :, None],)


def test_reward_model_module_reads() -> None:
    """Catches RewardModel.forward / forward_value / score / ScoringRewardModel disagreeing with the formulas."""
    tokenizer = types.SimpleNamespace(pad_token_id=PAD)
    model = RewardModel(_Backbone(RHO), tokenizer)
    nn.init.ones_(model.v_head.weight)
    out = model(PAIRS, attention_mask=(PAIRS != PAD).long())
    loss, chosen, rejected = ref.reward_model_forward(PAIRS, RHO, PAD, 0)
    close(out["loss"], loss)
    close(out["chosen_mean_scores"], chosen)
    left_padded = torch.cat([SEQ, SEQ])  # 8 rows, prompts left-padded to P
    value = model.forward_value(left_padded, (left_padded != PAD).long(), prompt_length=P)
    close(value["chosen_end_scores"], ref.forward_value_end_scores(left_padded, RHO, PAD, P))
    close(model.forward_value(PAIRS, return_value_only=True), RHO)
    scorer = ScoringRewardModel(_Backbone(RHO), tokenizer)
    scorer.load_state_dict(model.state_dict())
    close(scorer(PAIRS), chosen + rejected)
    close(model.score(PAIRS), chosen + rejected)
    close(scorer.pair_loss(PAIRS)["loss"], loss)
    with pytest.raises(ValueError, match="prompt_length must be greater than 1"):
        model.forward_value(PAIRS)


def test_reward_model_needs_a_pad_token() -> None:
    with pytest.raises(ValueError, match="no pad token"):
        RewardModel(_Backbone(RHO), types.SimpleNamespace(pad_token_id=None))


# ---- DPO -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.1)])
def test_dpo_loss(beta: float, eps: float) -> None:
    """Catches the shared prompt counted, pads (= EOS) counted, identical pairs mishandled, a missing label
    smoothing term, and log-probs shifted by one."""
    g = torch.Generator().manual_seed(5)
    logits, ref_logits = torch.randn(8, 8, 14, generator=g), torch.randn(8, 8, 14, generator=g)
    mask = dpo.dpo_label_mask(PAIRS, PAD)
    out = dpo.dpo_loss(dpo.batch_logps(logits, PAIRS, mask), dpo.batch_logps(ref_logits, PAIRS, mask), beta, eps)
    loss, chosen, rejected = ref.dpo(PAIRS, logits, ref_logits, PAD, beta, eps)
    close(out["loss"], loss)
    close(out["chosen_rewards"], chosen)
    close(out["rejected_rewards"], rejected)


# ---- GRPO ----------------------------------------------------------------------------------------------
GROUP_REWARDS = [1.0, 0.0, 0.5, 0.25,   # an ordinary group
                 2.0, 2.0, 2.0, 2.0,    # zero variance: advantage 0, no NaN
                 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_group_advantages(scale: bool) -> None:
    """Catches population instead of Bessel std, groups taken across prompts, and NaN on zero-variance groups."""
    adv = grpo.group_advantages(torch.tensor(GROUP_REWARDS), 4, scale)
    close(adv, ref.grpo_advantages(GROUP_REWARDS, 4, scale))
    assert torch.equal(adv[4:8], torch.zeros(4))


@pytest.mark.parametrize("loss_type,beta,eps_high", [("grpo", 0.0, None), ("dapo", 0.04, 0.28), ("dr_grpo", 0.1, None)])
def test_grpo_loss(loss_type: grpo.LossType, beta: float, eps_high: float | None) -> None:
    """Catches a wrong aggregation, the KL estimator's sign, and the upper clip ignored."""
    g = torch.Generator().manual_seed(6)
    old = -torch.rand(12, 5, generator=g) * 3
    new = old + torch.randn(12, 5, generator=g) * 0.4
    ref_lp = old + torch.randn(12, 5, generator=g) * 0.3
    answers = torch.randint(1, 9, (12, 5), generator=g)
    answers[0, 2], answers[3, 0], answers[7, 4] = 0, 0, 0  # EOS in mid-answer, first, last
    mask = grpo.completion_mask(answers, eos_token_id=0)
    assert mask[0].tolist() == [1, 1, 1, 0, 0] and mask[3].tolist() == [1, 0, 0, 0, 0] and mask[1].sum() == 5
    adv = ref.grpo_advantages(GROUP_REWARDS, 4)
    loss = grpo.grpo_loss(new, old, torch.tensor(adv), mask, 0.2, eps_high, beta, ref_lp, loss_type, 5)
    expected = ref.grpo_loss(new, old, adv, mask, 0.2, eps_high if eps_high is not None else 0.2, beta, ref_lp, loss_type, 5)
    close(loss, expected)


def test_grpo_config_refuses_groups_of_one() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        grpo.GRPOConfig(num_generations=1)
