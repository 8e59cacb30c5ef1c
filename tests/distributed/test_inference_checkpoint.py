"""`init_inference(checkpoint=...)`: a model built on the meta device or under zero.Init gets its weights from a
shardspeed training checkpoint (ZeRO-3, data parallel 2), served at tensor-parallel size 2 and 1 and with
ZeRO-Inference from NVMe; logits equal the trained model's. DeepSpeed's descriptor (several state-dict files,
`base_dir`) and the errors a wrong checkpoint gets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardspeed
from shardspeed.config.errors import ConfigError
from tests.harness import run_distributed

pytestmark = pytest.mark.hf


def _config() -> Any:
    import transformers as tf

    return tf.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def _llama() -> Any:
    import transformers as tf

    return tf.LlamaForCausalLM(_config())


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(7))


def _train_and_save(ckpt: str) -> torch.Tensor:
    """Two ZeRO-3 steps at data parallel 2, saved; the trained model's logits on `_ids()`."""
    torch.manual_seed(0)
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = shardspeed.initialize(model=_llama(), model_parameters=None, config=cfg)
    data = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(dist.get_rank()))
    for _ in range(2):
        loss = engine(input_ids=data, labels=data).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(ckpt)
    engine.module.eval()
    with torch.no_grad():
        logits = engine.module(_ids()).logits
    engine.destroy()
    return logits


def _serve(ckpt: str, nvme: str) -> dict[str, float]:
    trained = _train_and_save(ckpt)
    out = {}
    ids = _ids()
    with shardspeed.OnDevice(device="meta"):
        meta_model = _llama()
    for tp in (2, 1):
        with shardspeed.OnDevice(device="meta"):
            model = _llama()
        engine = shardspeed.init_inference(model, dtype=torch.float32, tensor_parallel={"tp_size": tp}, checkpoint=ckpt)
        with torch.no_grad():
            out[f"meta tp{tp}"] = (engine(ids).logits - trained).abs().max().item()
    with shardspeed.zero.Init():
        model = _llama()
    engine = shardspeed.init_inference(model, dtype=torch.float32, tensor_parallel={"tp_size": 2}, checkpoint=ckpt,
                                       replace_with_kernel_inject=True, max_out_tokens=32)
    with torch.no_grad():
        out["zero.Init tp2 fast path"] = (engine(ids).logits - trained).abs().max().item()
    with shardspeed.zero.Init():
        model = _llama()
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,
            "offload_param": {"device": "nvme", "nvme_path": nvme, "buffer_count": 4, "buffer_size": 10_000}}
    engine = shardspeed.init_inference(model, dtype=torch.float32, checkpoint=ckpt, zero=zero)
    with torch.no_grad():
        out["zero.Init ZeRO-Inference nvme"] = (engine.module(ids).logits - trained).abs().max().item()
    engine = shardspeed.init_inference(meta_model, dtype=torch.float32, checkpoint=ckpt, zero={"stage": 3})
    with torch.no_grad():
        out["meta ZeRO-Inference"] = (engine.module(ids).logits - trained).abs().max().item()
    return out


@pytest.mark.timeout(300)
def test_models_without_weights_load_a_training_checkpoint_at_any_tp_size(tmp_path: Path) -> None:
    (tmp_path / "nvme").mkdir()
    for rank, result in enumerate(run_distributed(_serve, 2, tmp_path, str(tmp_path / "ckpt"), str(tmp_path / "nvme"),
                                                  deadline=280)):
        assert all(v < 1e-5 for v in result.values()), (rank, result)


# ---- DeepSpeed's descriptor and bad checkpoints (one process) -----------------------------------------------


def _split_into_files(folder: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = _llama().eval()
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    names = sorted(state)
    save_file({k: state[k] for k in names[:len(names) // 2]}, str(folder / "part-1.safetensors"))
    torch.save({k: state[k] for k in names[len(names) // 2:]}, folder / "part-2.bin")
    return model, state


def test_descriptor_with_several_files_and_base_dir(tmp_path: Path) -> None:
    reference, _ = _split_into_files(tmp_path)
    (tmp_path / "ckpt.json").write_text(json.dumps({"type": "ds_model", "version": 1.0,
                                                    "checkpoints": ["part-1.safetensors", "part-2.bin"]}))
    with shardspeed.OnDevice(device="meta"):
        model = _llama()
    engine = shardspeed.init_inference(model, dtype=torch.float32, checkpoint=str(tmp_path / "ckpt.json"))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(engine(ids).logits, reference(ids).logits)
    assert engine.module.lm_head.weight is engine.module.model.embed_tokens.weight  # still tied
    with shardspeed.OnDevice(device="meta"):
        model = _llama()
    engine = shardspeed.init_inference(model, dtype=torch.float32, base_dir=str(tmp_path),
                                       checkpoint={"type": "ds_model", "checkpoints": ["part-1.safetensors", "part-2.bin"]})
    with torch.no_grad():
        assert torch.equal(engine(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("megatron", "type 'Megatron' is not supported"),
    ("tp_split", "already split for tensor parallelism"),
    ("missing_weights", "lacks"),
    ("no_checkpoint", "is on the meta device"),
    ("not_a_state_dict", "could not be read as a state dict"),
])
def test_bad_checkpoints_name_the_problem(tmp_path: Path, case: str, expected: str) -> None:
    _split_into_files(tmp_path)
    spec: Any = None
    if case == "missing":
        spec = str(tmp_path / "nowhere")
    elif case == "megatron":
        spec = {"type": "Megatron", "checkpoints": ["part-1.safetensors"]}
    elif case == "tp_split":
        spec = {"type": "ds_model", "checkpoints": ["part-1.safetensors"], "mp_size": 2}
    elif case == "missing_weights":
        spec = str(tmp_path / "part-1.safetensors")
    elif case == "not_a_state_dict":
        (tmp_path / "junk.pt").write_bytes(b"not a pickle")
        spec = str(tmp_path / "junk.pt")
    with shardspeed.OnDevice(device="meta"):
        model = _llama()
    kwargs: dict[str, Any] = {"checkpoint": spec, "base_dir": str(tmp_path)} if spec is not None else {}
    with pytest.raises(ConfigError, match=expected):
        shardspeed.init_inference(model, dtype=torch.float32, **kwargs)


def _partitioned_without_checkpoint() -> str:
    with shardspeed.zero.Init():
        model = _llama()
    try:
        shardspeed.init_inference(model, dtype=torch.float32)
    except ConfigError as err:
        return str(err)
    return "no error"


@pytest.mark.timeout(120)
def test_a_zero_init_model_without_checkpoint_is_refused(tmp_path: Path) -> None:
    """In a process of its own: zero.Init sets up torch.distributed."""
    message = run_distributed(_partitioned_without_checkpoint, 1, tmp_path, deadline=90)[0]
    assert "is partitioned" in message and "checkpoint=" in message, message
