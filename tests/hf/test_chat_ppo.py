"""DeepSpeed-Chat's step 3 on shardspeed engines, over gloo, with tiny GPT-2 / Llama models built from configs.

- One PPO iteration (generate_experience + train_rlhf) at world 2 and ZeRO 0, 2 and 3 (hybrid engine on and off)
  equals a single-process plain-PyTorch reference of the same iteration (DeepSpeed-Chat's formulas transcribed in
  tests/chat_reference.py): same rollouts (greedy), losses, and actor / critic parameters afterwards. One DPO step
  at ZeRO-3 likewise.
- Learning, not just running: on a programmatic reward (5 x the share of one token in the answer, 5 being
  DeepSpeed-Chat's reward clip) PPO and GRPO raise the mean reward at least 5x within 100 steps.
- The DeepSpeed guide's section 11.3 and 11.4 snippets run with their import line changed; the RLHF engine
  builds from local Hugging Face folders with DeepSpeed-Chat's stage rules; an actor that emits nothing is a
  clear error.
"""
from __future__ import annotations

import copy
import time
import types
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from shardspeed.chat.reward_model import RewardModel
from tests import chat_reference as ref
from tests.harness import ScenarioRuns, run_named

pytestmark = pytest.mark.hf

# pad == eos, as DeepSpeed-Chat sets it for every model but LLaMA. Sizes: DeepSpeed-Chat's configs keep parameters
# under 1e4 elements whole at ZeRO-3 (stage3_param_persistence_threshold), so hidden 64 and a vocabulary of 160 give
# partitioned embeddings, MLPs and (GPT-2) attention projections next to whole small ones.
VOCAB, PAD, HIDDEN = 160, 0, 64
B, P, A = 2, 5, 6   # per-rank rows, prompt columns (left-padded), answer tokens
LR = 1e-2           # large enough that one Adam step moves every parameter far beyond rounding
# Adam's eps for the equivalence tests. At DeepSpeed-Chat's 1e-8 the first Adam step is lr * g / (|g| + 1e-8), about
# lr * sign(g): blind to the gradient's scale (a sum instead of a mean over ranks, clipping) and decided by rounding
# where g is ~0 (attention key biases). With eps = 1 it is about lr * g: smooth, and it sees the scale.
EPS = 1.0
DEADLINE = 420


class Tokenizer:
    """What DeepSpeed-Chat's library reads from a tokenizer."""

    pad_token_id = eos_token_id = PAD

    def __len__(self) -> int:
        return VOCAB


def _backbone(kind: str, seed: int, causal: bool, vocab: int = VOCAB, hidden: int = HIDDEN) -> Any:
    import transformers as tf

    torch.manual_seed(seed)
    ids = dict(eos_token_id=PAD, pad_token_id=PAD, bos_token_id=PAD)
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        return tf.GPT2LMHeadModel(config) if causal else tf.GPT2Model(config)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **ids)
    return tf.LlamaForCausalLM(config) if causal else tf.LlamaModel(config)


def _models(kind: str) -> tuple[Any, RewardModel]:
    actor = _backbone(kind, 0, causal=True)
    critic = RewardModel(_backbone(kind, 1, causal=False), Tokenizer())  # v_head drawn right after, from seed 1's stream
    return actor, critic


def _prompts(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (B, P), generator=torch.Generator().manual_seed(10 + rank))
    ids[0, :2] = PAD  # a left-padded prompt
    return ids, (ids != PAD).long()


def _args(**overrides: Any) -> types.SimpleNamespace:
    args = dict(actor_zero_stage=0, critic_zero_stage=0, enable_hybrid_engine=False, dtype="fp32",
                per_device_training_batch_size=B, per_device_generation_batch_size=B, max_prompt_seq_len=P,
                max_answer_seq_len=A, actor_learning_rate=LR, critic_learning_rate=LR, num_warmup_steps=0,
                actor_dropout=0.0, critic_dropout=0.0)
    args.update(overrides)
    return types.SimpleNamespace(**args)


def _set_eps(*engines: Any) -> None:
    for engine in engines:
        for group in engine.optimizer.param_groups:
            group["eps"] = EPS


def _whole(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's whole parameters (every rank must call; at ZeRO-3 only rank 0 gets them)."""
    return {k: v.detach().clone() for k, v in engine.module_state_dict().items()}


# ---- one PPO iteration against the plain-PyTorch reference ---------------------------------------------
def _ppo_iteration(kind: str, stage: int, hybrid: bool) -> dict[str, Any]:
    from shardspeed.chat.ppo_trainer import DeepSpeedPPOTrainer
    from shardspeed.chat.rlhf_engine import DeepSpeedRLHFEngine
    from shardspeed.zero.param_shards import is_partitioned

    actor, critic = _models(kind)
    args = _args(actor_zero_stage=stage, critic_zero_stage=stage, enable_hybrid_engine=hybrid)
    # a reference model other than the actor's copy, so that the KL term of the rewards is not zero
    engine = DeepSpeedRLHFEngine.from_models(actor, critic, None, Tokenizer(), args, num_total_iters=10,
                                             ref=_backbone(kind, 2, causal=True))
    _set_eps(engine.actor, engine.critic)
    trainer = DeepSpeedPPOTrainer(engine, args)
    exp = trainer.generate_experience(*_prompts(dist.get_rank()), step=0)
    actor_loss, critic_loss = trainer.train_rlhf(exp)
    out = {"seq": exp["input_ids"], "logprobs": exp["logprobs"], "value": exp["value"], "rewards": exp["rewards"],
           "actor_loss": actor_loss.item(), "critic_loss": critic_loss.item(), "actor": _whole(engine.actor),
           "critic": _whole(engine.critic), "he": type(engine.actor).__name__,
           "stages": [e.zero_optimization_stage() for e in (engine.actor, engine.ref, engine.critic, engine.reward)],
           "partitioned": [sum(is_partitioned(p) for p in e.module.parameters()) for e in (engine.actor, engine.critic)]}
    for e in (engine.actor, engine.ref, engine.critic, engine.reward):
        e.destroy()
    return out


def _ema_and_ptx(stage: int) -> dict[str, Any]:
    """A PPO iteration, a PTX step and the EMA update, as DeepSpeed-Chat's loop runs them."""
    from shardspeed.chat.ppo_trainer import DeepSpeedPPOTrainerUnsupervised
    from shardspeed.chat.rlhf_engine import DeepSpeedRLHFEngine
    from shardspeed.zero.param_shards import is_partitioned

    actor, critic = _models("gpt2")
    initial = {k: v.detach().clone() for k, v in actor.state_dict().items()}
    args = _args(actor_zero_stage=stage, critic_zero_stage=stage, enable_hybrid_engine=True, enable_ema=True,
                 unsupervised_dataset_name="local", unsupervised_dataset_config_name="text")
    engine = DeepSpeedRLHFEngine.from_models(actor, critic, None, Tokenizer(), args)
    trainer = DeepSpeedPPOTrainerUnsupervised(engine, args)
    trainer.train_rlhf(trainer.generate_experience(*_prompts(dist.get_rank())))
    steps = [engine.actor.global_steps]  # PTX doubles the actor's accumulation steps: no step yet
    ids = torch.randint(1, VOCAB, (B, P + A), generator=torch.Generator().manual_seed(30 + dist.get_rank()))
    trainer.train_unsupervised({"input_ids": ids, "labels": ids}, unsup_coef=27.8)
    steps.append(engine.actor.global_steps)
    trainer.update_ema()
    assert engine.actor_ema is not None
    partitioned = sum(is_partitioned(p) for p in engine.actor_ema.module.parameters())
    return {"steps": steps, "actor": _whole(engine.actor), "ema": _whole(engine.actor_ema), "initial": initial,
            "partitioned": partitioned}


def _values(critic: RewardModel, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The critic's per-token values from its parts (not RewardModel's methods)."""
    return critic.v_head(critic.rwtransformer(seq, attention_mask=mask)[0]).squeeze(-1)


def _reference_iteration(kind: str, world: int) -> dict[str, Any]:
    """DeepSpeed-Chat's iteration in one process: each rank's rollout and loss; gradients averaged over ranks."""
    actor, critic = _models(kind)
    ref_actor, reward = _backbone(kind, 2, causal=True), copy.deepcopy(critic)
    exps = []
    for rank in range(world):
        prompts, mask = _prompts(rank)
        actor.eval()
        with torch.no_grad():
            seq = actor.generate(prompts, attention_mask=mask, max_length=P + A, pad_token_id=PAD, do_sample=False)
        seq = seq[(seq[:, P:] != PAD).sum(1) > 1]
        actor.train()
        am = (seq != PAD).long()
        with torch.no_grad():
            logp = ref.log_probs(actor(seq, attention_mask=am).logits, seq)
            ref_logp = ref.log_probs(ref_actor(seq, attention_mask=am).logits, seq)
            score = torch.tensor(ref.forward_value_end_scores(seq, _values(reward, seq, am), PAD, P))
            values = _values(critic, seq, am)[:, :-1]
        rewards = ref.compute_rewards(P, logp, ref_logp, score, am[:, 1:], 0.1, 5.0)
        rewards, zeroed = ref.zero_after_end(rewards, values, P, am[:, 1:])
        adv, returns = ref.gae(zeroed, rewards, P - 1, 1.0, 0.95)
        exps.append(dict(seq=seq, am=am, logp=logp, values=values, zeroed=zeroed, adv=adv, returns=returns, score=score))
    out: dict[str, Any] = {"exps": exps}
    for name, model, loss_of in (("actor", actor, _actor_loss), ("critic", critic, _critic_loss)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.0)
        losses = [loss_of(model, e) for e in exps]
        (sum(losses) / world).backward()  # the engine averages gradients over the data-parallel ranks
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # DeepSpeed-Chat's gradient_clipping
        optimizer.step()
        out[f"{name}_losses"] = [loss.item() for loss in losses]
        out[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def _actor_loss(actor: Any, e: dict[str, Any]) -> torch.Tensor:
    new = ref.log_probs(actor(e["seq"], attention_mask=e["am"], use_cache=False).logits, e["seq"])
    mask = e["am"][:, 1:][:, P - 1:]
    return ref.actor_loss(new[:, P - 1:], e["logp"][:, P - 1:], e["adv"], mask, 0.2)


def _critic_loss(critic: RewardModel, e: dict[str, Any]) -> torch.Tensor:
    new = _values(critic, e["seq"], e["am"])[:, :-1]
    mask = e["am"][:, 1:][:, P - 1:]
    return ref.critic_loss(new[:, P - 1:], e["zeroed"][:, P - 1:], e["returns"], mask, 0.2)


# ---- one DPO step at ZeRO-3 ------------------------------------------------------------------------------
def _dpo_pairs(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(20 + rank)
    chosen = torch.randint(1, VOCAB, (B, 8), generator=g)
    rejected = chosen.clone()
    rejected[:, 4:] = torch.randint(1, VOCAB, (B, 4), generator=g)
    chosen[0, 6:] = PAD  # right padding
    return torch.cat([chosen, rejected])


def _dpo_step(stage: int) -> dict[str, Any]:
    import shardspeed
    from shardspeed.chat.dpo import DPOTrainer
    from shardspeed.chat.ds_utils import get_eval_ds_config, get_train_ds_config

    policy, frozen = _backbone("llama", 0, causal=True), _backbone("llama", 0, causal=True)
    config = get_train_ds_config(offload=False, dtype="fp32", stage=stage)
    config.update(train_micro_batch_size_per_gpu=2 * B, train_batch_size=2 * B * dist.get_world_size())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.0)
    engine, *_ = shardspeed.initialize(model=policy, optimizer=optimizer, config=config)
    eval_config = get_eval_ds_config(offload=False, dtype="fp32", stage=stage)
    eval_config.update(train_micro_batch_size_per_gpu=2 * B, train_batch_size=2 * B * dist.get_world_size())
    ref_engine, *_ = shardspeed.initialize(model=frozen, config=eval_config)
    ids = _dpo_pairs(dist.get_rank())
    out = DPOTrainer(engine, ref_engine, PAD, beta=0.5, label_smoothing=0.1).step(
        {"input_ids": ids, "attention_mask": (ids != PAD).long()})
    result = {"loss": out["loss"].item(), "params": _whole(engine)}
    engine.destroy()
    ref_engine.destroy()
    return result


def _reference_dpo(world: int) -> dict[str, Any]:
    policy, frozen = _backbone("llama", 0, causal=True), _backbone("llama", 0, causal=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.0)
    losses = []
    for rank in range(world):
        ids = _dpo_pairs(rank)
        mask = (ids != PAD).long()
        with torch.no_grad():
            ref_logits = frozen(ids, attention_mask=mask).logits
        losses.append(ref.dpo(ids, policy(ids, attention_mask=mask).logits, ref_logits, PAD, 0.5, 0.1)[0])
    (sum(losses) / world).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    return {"losses": [loss.item() for loss in losses], "params": {k: v.detach() for k, v in policy.state_dict().items()}}


# ---- learning ---------------------------------------------------------------------------------------------
TARGET, LEARN_VOCAB, LEARN_ANSWER = 7, 16, 8


def _share_reward(scale: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def reward(prompt_ids: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        return scale * ((answer_ids == TARGET) & (answer_mask > 0)).sum(1).float() / LEARN_ANSWER
    return reward


def _learns(step: Callable[[int], float], max_steps: int = 100) -> dict[str, Any]:
    """Run up to max_steps; stop once the mean reward of the last 10 steps is >= 5x that of the first 10."""
    rewards, start = [], time.perf_counter()
    for i in range(max_steps):
        rewards.append(step(i))
        if len(rewards) >= 20 and sum(rewards[-10:]) >= 5 * sum(rewards[:10]):
            break
    return {"first": sum(rewards[:10]) / 10, "last": sum(rewards[-10:]) / 10, "steps": len(rewards),
            "seconds": time.perf_counter() - start}


def _learning_prompts(i: int, rows: int) -> torch.Tensor:
    return torch.randint(1, LEARN_VOCAB, (rows, 4), generator=torch.Generator().manual_seed(100 + i))


def _ppo_learns() -> dict[str, Any]:
    from shardspeed.chat.ppo_trainer import DeepSpeedPPOTrainer
    from shardspeed.chat.rewards import CallableReward
    from shardspeed.chat.rlhf_engine import DeepSpeedRLHFEngine

    actor = _backbone("gpt2", 0, causal=True, vocab=LEARN_VOCAB, hidden=64)
    critic = RewardModel(_backbone("gpt2", 1, causal=False, vocab=LEARN_VOCAB, hidden=64), Tokenizer())
    args = _args(per_device_training_batch_size=16, max_prompt_seq_len=4, max_answer_seq_len=LEARN_ANSWER,
                 actor_learning_rate=1e-3, critic_learning_rate=1e-3, lr_scheduler_type="constant", do_sample=True,
                 top_k=0)
    torch.manual_seed(0)
    engine = DeepSpeedRLHFEngine.from_models(actor, critic, CallableReward(_share_reward(5.0), PAD), Tokenizer(), args)
    trainer = DeepSpeedPPOTrainer(engine, args)

    def step(i: int) -> float:
        exp = trainer.generate_experience(_learning_prompts(i, 16), step=i)
        trainer.train_rlhf(exp)
        return exp["rewards"].mean().item()

    return _learns(step)


def _grpo_learns() -> dict[str, Any]:
    import shardspeed
    from shardspeed.chat.ds_utils import get_train_ds_config
    from shardspeed.chat.grpo import GRPOConfig, GRPOTrainer

    actor = _backbone("gpt2", 0, causal=True, vocab=LEARN_VOCAB, hidden=64)
    config = get_train_ds_config(offload=False, dtype="fp32", stage=0)
    config.update(train_micro_batch_size_per_gpu=16, train_batch_size=16)
    optimizer = torch.optim.AdamW(actor.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    engine, *_ = shardspeed.initialize(model=actor, optimizer=optimizer, config=config)
    trainer = GRPOTrainer(engine, _share_reward(1.0), GRPOConfig(num_generations=4, max_new_tokens=LEARN_ANSWER),
                          pad_token_id=PAD)
    torch.manual_seed(0)
    return _learns(lambda i: trainer.step(_learning_prompts(i, 4))["reward_mean"])


# ---- the guide's section 11.4, the RLHF engine from folders, bad inputs ----------------------------------
GUIDE_11_4 = '''\
from deepspeed_chat.ppo_trainer import DeepSpeedPPOTrainer

trainer = DeepSpeedPPOTrainer(
    rlhf_engine=rlhf_engine,
    args=args
)

for epoch in range(args.num_train_epochs):
    for step, batch in enumerate(prompt_dataloader):
        out = trainer.generate_experience(batch["input_ids"])
        # Update Actor/Critic models
        actor_loss, critic_loss = trainer.train_rlhf(out)
'''
GUIDE_IMPORT_CHANGES = {  # the one line each snippet changes (documented in docs/rlhf.md)
    "from deepspeed_chat.ppo_trainer import DeepSpeedPPOTrainer": "from shardspeed.chat.ppo_trainer import DeepSpeedPPOTrainer",
    "from deepspeed_chat.reward_model import RewardModel":
        "from shardspeed.chat.reward_model import ScoringRewardModel as RewardModel",
}


def adapt(snippet: str) -> str:
    """The snippet with its import line changed, and nothing else."""
    lines = snippet.splitlines()
    changed = [GUIDE_IMPORT_CHANGES.get(line, line) for line in lines]
    assert sum(a != b for a, b in zip(lines, changed)) == 1
    return "\n".join(changed)


def _guide_11_4() -> dict[str, Any]:
    from shardspeed.chat.rlhf_engine import DeepSpeedRLHFEngine

    actor, critic = _models("gpt2")
    args = _args(num_train_epochs=2)
    rlhf_engine = DeepSpeedRLHFEngine.from_models(actor, critic, None, Tokenizer(), args)
    prompt_dataloader = [{"input_ids": torch.randint(1, VOCAB, (B, P), generator=torch.Generator().manual_seed(s))}
                         for s in range(2)]
    namespace = {"rlhf_engine": rlhf_engine, "args": args, "prompt_dataloader": prompt_dataloader}
    exec(adapt(GUIDE_11_4), namespace)
    return {"losses": [namespace["actor_loss"].item(), namespace["critic_loss"].item()],
            "steps": rlhf_engine.actor.global_steps}


def _from_folders(tmp: Path) -> dict[str, Any]:
    from shardspeed.chat.model_utils import create_critic_model
    from shardspeed.chat.rlhf_engine import DeepSpeedRLHFEngine

    actor, critic = _models("gpt2")
    actor.save_pretrained(tmp / "actor")
    critic.config.save_pretrained(tmp / "critic")
    torch.save(critic.state_dict(), tmp / "critic" / "pytorch_model.bin")  # step 2's output
    args = _args(actor_zero_stage=3, critic_zero_stage=2, enable_hybrid_engine=True, enable_ema=True)
    engine = DeepSpeedRLHFEngine(str(tmp / "actor"), str(tmp / "critic"), Tokenizer(), args, num_total_iters=4)
    stages = {name: getattr(engine, name).zero_optimization_stage() for name in ("actor", "ref", "actor_ema", "critic", "reward")}
    loaded = all(torch.equal(v, engine.reward.module.state_dict()[k]) for k, v in critic.state_dict().items())
    (tmp / "empty").mkdir()
    critic.config.save_pretrained(tmp / "empty")
    try:
        create_critic_model(str(tmp / "empty"), Tokenizer(), rlhf_training=True)
        missing = "no error"
    except FileNotFoundError as error:
        missing = str(error)
    return {"stages": stages, "hybrid": type(engine.actor).__name__, "loaded": loaded, "missing": missing}


def _lora_ppo() -> dict[str, Any]:
    """A PPO iteration with DeepSpeed-Chat's LoRA on actor and critic, only LoRA (and v_head) trained, ZeRO-3 + HE."""
    from shardspeed.chat.ppo_trainer import DeepSpeedPPOTrainer
    from shardspeed.chat.rlhf_engine import DeepSpeedRLHFEngine

    lora = dict(actor_lora_dim=4, actor_lora_module_name="layers.", critic_lora_dim=4, critic_lora_module_name="layers.",
                only_optimize_lora=True)
    try:
        DeepSpeedRLHFEngine.from_models(*_models("llama"), None, Tokenizer(), _args(**{**lora, "actor_lora_module_name": "decoder."}))
        unmatched = "no error"
    except ValueError as error:
        unmatched = str(error)
    actor, critic = _models("llama")
    args = _args(actor_zero_stage=3, critic_zero_stage=3, enable_hybrid_engine=True, **lora)
    engine = DeepSpeedRLHFEngine.from_models(actor, critic, None, Tokenizer(), args)
    before = {role: _whole(getattr(engine, role)) for role in ("actor", "critic")}
    trainer = DeepSpeedPPOTrainer(engine, args)
    trainer.train_rlhf(trainer.generate_experience(*_prompts(0)))
    changed = {}
    for role in ("actor", "critic"):
        after = _whole(getattr(engine, role))
        moved = [k for k, v in after.items() if not torch.equal(v, before[role][k])]
        changed[role] = sorted({k.split(".")[-1] if "lora" in k else k for k in moved})
    return {"unmatched": unmatched, "changed": changed}


def _emits_nothing() -> str:
    """An actor whose every answer is the pad (= EOS) token at once."""
    from shardspeed.chat.ppo_trainer import DeepSpeedPPOTrainer
    from shardspeed.chat.rlhf_engine import DeepSpeedRLHFEngine

    actor, critic = _models("gpt2")
    with torch.no_grad():
        actor.lm_head.weight.zero_()
        actor.lm_head.weight[PAD] = 1.0  # tied to the embeddings: logits favour the pad token
        actor.transformer.ln_f.bias.fill_(1.0)
        actor.transformer.ln_f.weight.zero_()
    args = _args()
    trainer = DeepSpeedPPOTrainer(DeepSpeedRLHFEngine.from_models(actor, critic, None, Tokenizer(), args), args)
    try:
        trainer.generate_experience(*_prompts(0))
    except RuntimeError as error:
        return str(error)
    return "no error"


def _scenarios(tmp: Path) -> dict[str, Callable[[], Any]]:
    return {
        "ppo-z0-gpt2": lambda: _ppo_iteration("gpt2", 0, False),
        "ppo-z2-llama-he": lambda: _ppo_iteration("llama", 2, True),
        "ppo-z3-gpt2-he": lambda: _ppo_iteration("gpt2", 3, True),
        "ppo-z3-llama": lambda: _ppo_iteration("llama", 3, False),
        "dpo-z3": lambda: _dpo_step(3),
        "ema-ptx-z3": lambda: _ema_and_ptx(3),
        "ppo-learns": _ppo_learns,
        "grpo-learns": _grpo_learns,
        "guide-11.4": _guide_11_4,
        "from-folders": lambda: _from_folders(tmp),
        "emits-nothing": _emits_nothing,
        "lora-z3": _lora_ppo,
    }


JOBS = {2: ["ppo-z0-gpt2", "ppo-z2-llama-he", "ppo-z3-gpt2-he", "ppo-z3-llama", "dpo-z3", "ema-ptx-z3"],
        1: ["ppo-learns", "grpo-learns", "guide-11.4", "from-folders", "emits-nothing", "lora-z3"]}


def _run(tmp: str, world: int) -> dict[str, tuple[str, Any]]:
    return run_named(_scenarios(Path(tmp)), JOBS[world])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRuns:
    return ScenarioRuns(tmp_path_factory, "chat", _run, lambda world, tmp: (str(tmp), world), DEADLINE)


# fp32: the engines sum gradients over ranks and compute the norm in another order than the reference (~1e-7)
RTOL, ATOL = 1e-5, 1e-7


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["ppo-z0-gpt2", "ppo-z2-llama-he", "ppo-z3-gpt2-he", "ppo-z3-llama"])
def test_ppo_iteration_equals_plain_pytorch(runs: ScenarioRuns, name: str) -> None:
    """Catches a rollout that differs from the unsharded model's, wrong experience (log-probs of the wrong tokens,
    scores at the wrong position), the PPO formulas or their order mis-wired in the trainer, gradients not averaged
    over ranks, and the stage rules (reference / reward at 3 only when actor / critic are at 3)."""
    results = runs(2, name)
    kind, stage = name.split("-")[2], int(name.split("-")[1][1])
    expected = _reference_iteration(kind, 2)
    for rank, r in enumerate(results):
        e = expected["exps"][rank]
        assert torch.equal(r["seq"], e["seq"]), f"rank {rank}: rollout differs"
        torch.testing.assert_close(r["logprobs"], e["logp"].float(), rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(r["value"], e["values"], rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(r["rewards"], e["score"].float(), rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(r["actor_loss"], expected["actor_losses"][rank], rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(r["critic_loss"], expected["critic_losses"][rank], rtol=RTOL, atol=1e-6)
        assert r["stages"] == [stage, stage if stage == 3 else 0, stage, stage if stage == 3 else 0]
        assert (min(r["partitioned"]) > 0) == (stage == 3), r["partitioned"]
    assert results[0]["he"] == ("DeepSpeedHybridEngine" if name.endswith("-he") else "ShardspeedEngine")
    for model in ("actor", "critic"):
        before = _models(kind)[0 if model == "actor" else 1].state_dict()
        for key, value in expected[model].items():
            assert not torch.equal(value, before[key]) or "bias" in key or "norm" in key or "ln" in key
            torch.testing.assert_close(results[0][model][key], value, rtol=RTOL, atol=ATOL, msg=f"{model}: {key}")


@pytest.mark.timeout(600)
def test_dpo_step_at_zero3_equals_plain_pytorch(runs: ScenarioRuns) -> None:
    """Catches DPOTrainer's mask, log-probs or loss mis-wired on an engine, and gradients not averaged over ranks."""
    results = runs(2, "dpo-z3")
    expected = _reference_dpo(2)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["loss"], expected["losses"][rank], rtol=RTOL, atol=1e-6)
    for key, value in expected["params"].items():
        torch.testing.assert_close(results[0]["params"][key], value, rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.timeout(600)
def test_ema_and_ptx_at_zero3(runs: ScenarioRuns) -> None:
    """Catches the EMA update lost at ZeRO-3 (DeepSpeed-Chat gathers without a modifier rank, so DeepSpeed drops
    it), beta on the wrong side, and PTX not doubling the actor's accumulation steps (one step per rollout + PTX)."""
    r = runs(2, "ema-ptx-z3")[0]
    assert r["steps"] == [0, 1] and r["partitioned"] > 0, r["steps"]
    for key, theta in r["actor"].items():
        assert not torch.equal(theta, r["initial"][key]) or "bias" in key
        torch.testing.assert_close(r["ema"][key], 0.992 * r["initial"][key] + 0.008 * theta, rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["ppo-learns", "grpo-learns"])
def test_reward_rises_at_least_5x_within_100_steps(runs: ScenarioRuns, name: str) -> None:
    """Catches a trainer that runs but does not learn: a sign error, advantages not reaching the loss, the reward
    at the wrong token, the optimizer not stepping. Reward: the share of one token in the answer (x 5 for PPO,
    DeepSpeed-Chat's reward clip, so that the KL penalty does not dominate)."""
    r = runs(1, name)[0]
    assert r["steps"] <= 100 and r["last"] >= 5 * r["first"], r


@pytest.mark.timeout(600)
def test_guide_section_11_4_runs_with_its_import_changed(runs: ScenarioRuns) -> None:
    r = runs(1, "guide-11.4")[0]
    assert r["steps"] == 4 and all(torch.isfinite(torch.tensor(r["losses"]))), r  # 2 epochs x 2 batches


@pytest.mark.timeout(600)
def test_rlhf_engine_from_local_folders(runs: ScenarioRuns) -> None:
    """Catches DeepSpeed-Chat's stage rules broken (reference and EMA at 3 with a ZeRO-3 actor, reward at 0 with a
    ZeRO-2 critic), the hybrid engine not used, step 2's weights not loaded, and a silent critic without weights."""
    r = runs(1, "from-folders")[0]
    assert r["stages"] == {"actor": 3, "ref": 3, "actor_ema": 3, "critic": 2, "reward": 0}, r
    assert r["hybrid"] == "DeepSpeedHybridEngine" and r["loaded"], r
    assert "has no pytorch_model.bin or model.safetensors" in r["missing"], r


@pytest.mark.timeout(600)
def test_lora_trains_only_the_adapters(runs: ScenarioRuns) -> None:
    """Catches LoRA not applied by the RLHF engine, base weights trained despite only_optimize_lora (or moved by
    generation), v_head frozen, and a LoRA module name matching nothing passing silently."""
    r = runs(1, "lora-z3")[0]
    # R gets no gradient at the first step: L starts at zero (DeepSpeed-Chat's initialisation)
    assert r["changed"] == {"actor": ["lora_left_weight"], "critic": ["lora_left_weight", "v_head.weight"]}, r["changed"]
    assert "no nn.Linear of the actor has 'decoder.' in its name" in r["unmatched"], r["unmatched"]


@pytest.mark.timeout(600)
def test_an_actor_that_emits_nothing_is_a_clear_error(runs: ScenarioRuns) -> None:
    message = runs(1, "emits-nothing")[0]
    assert "the actor emits nothing" in message and "supervised fine-tuning (step 1)" in message, message


GUIDE_11_3 = '''\
from deepspeed_chat.reward_model import RewardModel

# Reward model = SFT model + linear head
reward_model = RewardModel(
    base_model=sft_model,
    tokenizer=tokenizer,
    num_padding_at_beginning=0
)

# Train on preference pairs (chosen, rejected)
def compute_reward_loss(reward_model, chosen_ids, rejected_ids):
    chosen_reward = reward_model(chosen_ids)
    rejected_reward = reward_model(rejected_ids)
    # Preferred responses should have higher reward
    loss = -torch.mean(torch.log(torch.sigmoid(chosen_reward - rejected_reward)))
    return loss
'''


def test_guide_section_11_3_runs_with_its_import_changed() -> None:
    """Catches a scoring path that does not give one score per row at the last non-pad token (the guide's
    `reward_model(chosen_ids)`), or a loss that does not train the reward model."""
    namespace: dict[str, Any] = {"torch": torch, "sft_model": _backbone("gpt2", 0, causal=True), "tokenizer": Tokenizer()}
    exec(adapt(GUIDE_11_3), namespace)
    model = namespace["reward_model"]
    ids = _dpo_pairs(0)
    chosen, rejected = ids[:B], ids[B:]
    loss = namespace["compute_reward_loss"](model, chosen, rejected)
    with torch.no_grad():
        rho = model.forward_value(ids, return_value_only=True)
    ends = [6, 8, 8, 8]  # chosen row 0 is padded from column 6
    scores = torch.stack([rho[i, ends[i] - 1] for i in range(2 * B)])
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(scores[:B] - scores[B:])).mean())
    loss.backward()
    assert model.v_head.weight.grad is not None and model.v_head.weight.grad.abs().sum() > 0
