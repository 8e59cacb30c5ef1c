"""DeepSpeed-Chat's model factories (`dschat/utils/model/model_utils.py`), from local Hugging Face folders.

`create_hf_model` loads `model_class.from_pretrained(path)` (or, with `rlhf_training`, only the
architecture, `from_config`), sets `config.end_token_id` / `pad_token_id` as DeepSpeed-Chat does and
rounds the vocabulary up to a multiple of 8 of `len(tokenizer)`. `create_critic_model` wraps an
`AutoModel` in a `RewardModel`; with `rlhf_training` (step 3) it loads step 2's weights from the folder's
`pytorch_model.bin` (or `model.safetensors`). Models are built whole: `initialize` partitions them
(DeepSpeed-Chat builds ZeRO-3 models under `HfDeepSpeedConfig` instead). Nothing is downloaded.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from .reward_model import RewardModel

DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout",  # DeepSpeed-Chat's
                "resid_pdrop", "embd_pdrop", "attn_pdrop")  # GPT-2's, which DeepSpeed-Chat leaves at 0.1


def configure_dropout(model_config: Any, dropout: float | None) -> None:
    """Set every dropout probability the config has to `dropout` (None: leave them)."""
    if dropout is None:
        return
    for key in DROPOUT_KEYS:
        if hasattr(model_config, key):
            setattr(model_config, key, dropout)


def _local_folder(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} is not a local folder; shardspeed.chat loads models from local "
                                "Hugging Face folders (config.json and weights) and downloads nothing")
    return path


def create_hf_model(model_class: Any, model_name_or_path: str, tokenizer: Any, ds_config: dict[str, Any] | None = None,
                    rlhf_training: bool = False, dropout: float | None = None) -> nn.Module:
    """A Hugging Face model from a local folder, set up as DeepSpeed-Chat sets it (see the module docstring).

    `ds_config` is accepted for DeepSpeed-Chat's signature; partitioning happens in `initialize`.
    """
    from transformers import AutoConfig

    _local_folder(model_name_or_path, "model_name_or_path")
    config = AutoConfig.from_pretrained(model_name_or_path)
    configure_dropout(config, dropout)
    if rlhf_training:  # the weights are loaded by create_critic_model
        model = model_class.from_config(config)
    else:
        model = model_class.from_pretrained(model_name_or_path, config=config)
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    return model


def load_critic_weights(model_name_or_path: str) -> dict[str, torch.Tensor]:
    """Step 2's reward-model weights from a folder: `pytorch_model.bin`, else `model.safetensors`."""
    folder = _local_folder(model_name_or_path, "critic_model_name_or_path")
    bin_path, safe_path = os.path.join(folder, "pytorch_model.bin"), os.path.join(folder, "model.safetensors")
    if os.path.exists(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    if os.path.exists(safe_path):
        from safetensors.torch import load_file

        return load_file(safe_path)
    raise FileNotFoundError(f"critic path {folder!r} has no pytorch_model.bin or model.safetensors: step 3 needs the "
                            "reward model trained in step 2 (its --output_dir)")


def create_critic_model(model_name_or_path: str, tokenizer: Any, ds_config: dict[str, Any] | None = None,
                        num_padding_at_beginning: int = 0, rlhf_training: bool = False, dropout: float | None = None,
                        zero_stage: int = 0, compute_fp32_loss: bool = False) -> RewardModel:
    """A `RewardModel` on an `AutoModel` from the folder; step 3 (`rlhf_training`) loads step 2's weights into it."""
    from transformers import AutoModel

    base = create_hf_model(AutoModel, model_name_or_path, tokenizer, ds_config, rlhf_training, dropout)
    critic = RewardModel(base, tokenizer, num_padding_at_beginning=num_padding_at_beginning,
                         compute_fp32_loss=compute_fp32_loss)
    if rlhf_training:
        state = load_critic_weights(model_name_or_path)
        missing, unexpected = critic.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{model_name_or_path!r} does not hold a reward model of its config.json's architecture: "
                             f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]} (expected step 2's "
                             "output: keys `v_head.weight` and `rwtransformer.*`)")
    return critic


__all__ = ["configure_dropout", "create_critic_model", "create_hf_model", "load_critic_weights"]
