"""DeepSpeed-Chat's three steps from the command line (`python -m shardspeed.chat.step{1_sft,2_reward,3_ppo}`) on
the shipped synthetic task (examples/chat/data/sorted_numbers: chosen = the prompt's numbers sorted, rejected =
shuffled), from a tiny GPT-2 written by examples/chat/init_model.py, each step reading the previous one's output.

What would fail: a step that does not learn (SFT perplexity not falling, reward-model accuracy < 0.9, PPO not
raising the reward model's score), outputs that the next step or `transformers` cannot load, a launch at world 2
that hangs, and each bad input of issue 16 item 4 without a clear message.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.hf.launch import BIN, REPO, run, run_failing, run_output

pytestmark = [pytest.mark.hf, pytest.mark.timeout(300)]

DATA = REPO / "examples" / "chat" / "data" / "sorted_numbers"
PY = [sys.executable, "-m"]
COMMON = ["--data_path", str(DATA), "--data_split", "2,4,4", "--dtype", "fp32", "--seed", "1234"]
STEP3 = ["--per_device_generation_batch_size", "16", "--per_device_training_batch_size", "16", "--max_prompt_seq_len",
         "8", "--max_answer_seq_len", "5", "--actor_learning_rate", "1e-3", "--critic_learning_rate", "1e-3",
         "--num_warmup_steps", "0", "--num_padding_at_beginning", "0", "--do_sample", "--enable_test_mode"]
DEADLINE_S = 150  # each step takes 15-45 s alone on the shared 2-core CPU; a hang fails here


def step1(tmp: Path, init: Path) -> dict[str, Any]:
    return run(PY + ["shardspeed.chat.step1_sft", *COMMON, "--model_name_or_path", str(init), "--output_dir",
                     str(tmp / "actor"), "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "40",
                     "--max_seq_len", "16", "--learning_rate", "3e-3", "--num_train_epochs", "8", "--add_eot_token"],
               cwd=tmp, deadline=DEADLINE_S)


def step2(tmp: Path) -> dict[str, Any]:
    return run(PY + ["shardspeed.chat.step2_reward", *COMMON, "--model_name_or_path", str(tmp / "actor"),
                     "--output_dir", str(tmp / "critic"), "--per_device_train_batch_size", "16",
                     "--per_device_eval_batch_size", "40", "--max_seq_len", "16", "--learning_rate", "3e-3",
                     "--num_train_epochs", "6", "--add_eot_token", "--num_padding_at_beginning", "0"],
               cwd=tmp, deadline=DEADLINE_S)


def step3(tmp: Path, launcher: list[str], out: str, steps: int, extra: list[str] = ()) -> dict[str, Any]:
    return run(launcher + ["shardspeed.chat.step3_ppo", *COMMON, "--actor_model_name_or_path", str(tmp / "actor"),
                           "--critic_model_name_or_path", str(tmp / "critic"), "--output_dir", str(tmp / out), *STEP3,
                           "--test_stop_step", str(steps), *extra], cwd=tmp, deadline=DEADLINE_S)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("chat")
    init = tmp / "init"
    run_output([sys.executable, str(REPO / "examples" / "chat" / "init_model.py"), "--data", str(DATA), "--out",
                str(init)], cwd=tmp, deadline=60)
    results = {"step1": step1(tmp, init), "step2": step2(tmp), "step3": step3(tmp, PY, "ppo", 15)}
    (tmp / "results.json").write_text(json.dumps(results))  # the measured numbers, for reading after a run
    return {"tmp": tmp, **results}


def _loads_causal_lm(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(" Human: sort 3 1 2 0 Assistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_step1_sft_lowers_perplexity_and_saves_hf(pipeline) -> None:
    r = pipeline["step1"]
    assert r["ppl_after"] < 0.5 * r["ppl_before"], r  # measured 17.2 -> 3.1 (random prompt digits keep it above 1)
    _loads_causal_lm(pipeline["tmp"] / "actor")


def test_step2_reward_model_reaches_accuracy_0_9(pipeline) -> None:
    r = pipeline["step2"]
    assert r["acc"] >= 0.9, r
    assert r["chosen_score"] > r["rejected_score"], r
    assert (pipeline["tmp"] / "critic" / "pytorch_model.bin").is_file()


def test_step3_ppo_raises_the_reward_score_and_saves_hf(pipeline) -> None:
    scores = pipeline["step3"]["scores"]
    assert len(scores) == 15 and pipeline["step3"]["ppo_updates"] == 15
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 1.0, scores  # measured -8.1 -> -5.3; rollouts are sampled, so compare 5-step means
    _loads_causal_lm(pipeline["tmp"] / "ppo" / "actor")
    assert (pipeline["tmp"] / "ppo" / "critic" / "pytorch_model.bin").is_file()


def test_step3_at_world_2_with_the_shardspeed_launcher(pipeline) -> None:
    """ZeRO-3 actor with the hybrid engine, ZeRO-2 critic, two processes: runs, all ranks agree, output loads."""
    launcher = [str(BIN / "shardspeed"), "--num_gpus", "2", "--module"]
    r = step3(pipeline["tmp"], launcher, "ppo_w2", 3, ["--actor_zero_stage", "3", "--critic_zero_stage", "2",
                                                       "--enable_hybrid_engine", "--per_device_generation_batch_size",
                                                       "8", "--per_device_training_batch_size", "8"])
    assert len(r["scores"]) == 3 and r["ppo_updates"] == 3
    _loads_causal_lm(pipeline["tmp"] / "ppo_w2" / "actor")


# ---- bad inputs (issue 16, item 4) -----------------------------------------------------------------------------
def test_malformed_data_split_is_an_error() -> None:
    from shardspeed.chat.data import parse_data_split, phase_indices

    for bad in ("2,4", "2,4,x", "1,-1,2", "0,0,0", ""):
        with pytest.raises(ValueError, match="--data_split .*three non-negative numbers"):
            parse_data_split(bad)
    with pytest.raises(ValueError, match="phase 3 no share"):
        phase_indices(10, "5,5,0", 3, seed=0)
    assert parse_data_split("2,4,4") == [0.2, 0.4, 0.4]


def test_unknown_dataset_name_lists_the_known_ones(tmp_path) -> None:
    from shardspeed.chat.data import load_train_eval

    with pytest.raises(ValueError, match="unknown dataset.*local/jsonfile.*Dahoas/rm-static"):
        load_train_eval("Dahoas/no-such-set", seed=0)
    (tmp_path / "train.json").write_text("")
    with pytest.raises(FileNotFoundError, match="train.json and eval.json"):
        load_train_eval(str(tmp_path), seed=0)


def test_local_json_forms_and_phase_shares(tmp_path) -> None:
    """JSON lines and JSON arrays both read; the three phases are disjoint and cover the rows."""
    from shardspeed.chat.data import load_train_eval, phase_indices, read_rows

    rows = [{"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(50)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert read_rows(str(tmp_path / "rows.json")) == rows
    train, evaluation = load_train_eval(str(tmp_path / "rows.json"), seed=0)
    assert len(train) == 45 and len(evaluation) == 5
    phases = [phase_indices(50, "2,4,4", p, seed=1) for p in (1, 2, 3)]
    assert [len(p) for p in phases] == [10, 20, 20] and sorted(sum(phases, [])) == list(range(50))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ValueError, match="rejected"):
        read_rows(str(tmp_path / "bad.jsonl"))


def test_tokenizer_without_pad_token(tmp_path) -> None:
    """DeepSpeed-Chat's rule (pad = eos) when there is an eos; a clear error when there is neither."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from shardspeed.chat.cli import load_tokenizer

    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "a": 2}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>").save_pretrained(tmp_path / "none")
    with pytest.raises(ValueError, match="neither a pad token nor an eos token.*pad_token"):
        load_tokenizer(str(tmp_path / "none"))
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        tmp_path / "eos")
    assert load_tokenizer(str(tmp_path / "eos")).pad_token == "<eos>"


def test_generation_batch_not_a_multiple_of_training_batch() -> None:
    from shardspeed.chat.step3_ppo import parse_args

    argv = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--output_dir", "o"]
    with pytest.raises(ValueError, match="--per_device_generation_batch_size 12 must be a positive multiple of "
                                         "--per_device_training_batch_size 8"):
        parse_args(argv + ["--per_device_generation_batch_size", "12", "--per_device_training_batch_size", "8"])
    args = parse_args(argv)
    assert isinstance(args, argparse.Namespace)
    assert (args.data_split, args.per_device_generation_batch_size, args.max_answer_seq_len, args.kl_ctl,
            args.actor_learning_rate, args.tensorboard_path) == ("2,4,4", 16, 256, 0.1, 9.65e-6, "step3_tensorboard")


def test_a_bad_input_fails_the_command_with_its_message(tmp_path) -> None:
    """The CLI exits non-zero and prints the message (not a bare traceback from deep inside)."""
    out = run_failing(PY + ["shardspeed.chat.step1_sft", "--data_path", str(DATA), "--data_split", "2,4",
                            "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "o")],
                      cwd=tmp_path, deadline=60)
    assert "--data_split '2,4': expected three non-negative numbers" in out
