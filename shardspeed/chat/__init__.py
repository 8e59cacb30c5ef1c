"""DeepSpeed-Chat's library (`dschat` in DeepSpeedExamples) on shardspeed engines.

| module | what | DeepSpeed-Chat's path |
| --- | --- | --- |
| `reward_model` | `RewardModel` (pairwise span loss, end scores, `forward_value`), `ScoringRewardModel` | `dschat/utils/model/reward_model.py` |
| `ppo_trainer` | `DeepSpeedPPOTrainer`, `DeepSpeedPPOTrainerUnsupervised` | `dschat/rlhf/ppo_trainer.py` |
| `ppo_formulas` | the PPO trainer's formulas as pure functions | (methods of the trainer) |
| `rlhf_engine` | `DeepSpeedRLHFEngine`: actor, reference, critic, reward (and EMA) engines | `dschat/rlhf/rlhf_engine.py` |
| `model_utils`, `ds_utils` | `create_hf_model`, `create_critic_model`; `get_train_ds_config`, `get_eval_ds_config` | `dschat/utils/model/model_utils.py`, `dschat/utils/ds_utils.py` |
| `lora` | DeepSpeed-Chat's own LoRA (not peft's), fused without touching the trained weights | `dschat/utils/module/lora.py` |
| `dpo`, `grpo` | DPO (DeepSpeed-Chat's step-2 alternative) and GRPO (TRL's formulas) with small trainers | `training/step2_dpo_finetuning/main.py`; (TRL) |
| `utils` | `moving_average` (the EMA actor), generation through an engine | `dschat/utils/utils.py` |
| `rewards` | Python reward functions; `CallableReward`, one in the reward model's place | — |
| `step1_sft`, `step2_reward`, `step3_ppo` | the three steps as command lines (`python -m shardspeed.chat.step1_sft ...`) | `training/step{1,2,3}_*/main.py` |
| `data`, `cli` | local prompt/chosen/rejected JSON, `--data_split` phases, collators; the steps' shared arguments and saving | `dschat/utils/data/data_utils.py`, `dschat/utils/utils.py` |
| `arguments` | step 3's argument defaults (`STEP3_DEFAULTS`), read when `args` lacks an attribute | `training/step3_rlhf_finetuning/main.py` |

Nothing is imported here: `from shardspeed.chat.ppo_trainer import DeepSpeedPPOTrainer` loads what it needs.
"""
