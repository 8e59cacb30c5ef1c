"""DeepSpeed-Chat's data pipeline (`dschat/utils/data/data_utils.py`) for local `prompt` / `chosen` /
`rejected` JSON data.

`--data_path` accepts (nothing is downloaded):
- `local/jsonfile`: DeepSpeed-Chat's name; reads `data/train.json` and `data/eval.json` under the working
  directory (DeepSpeed-Chat hard-codes `applications/DeepSpeed-Chat/data/`);
- a folder holding `train.json` and `eval.json` (or `train.jsonl` and `eval.jsonl`);
- one `.json` / `.jsonl` file: the seeded shuffle holds out `EVAL_SHARE` of its rows as the eval set.
A file is JSON lines or one JSON array of objects, each with `prompt`, `chosen` and `rejected` strings.

`--data_split 2,4,4`: train and eval rows are each shuffled with the seed and cut into three disjoint
shares in those proportions, one per phase (1 SFT, 2 reward model, 3 PPO), as DeepSpeed-Chat does.

Phases, as DeepSpeed-Chat tokenizes them (pad = eos for every model but LLaMA):
1. `prompt + chosen (+ eot)`, right-padded to `max_seq_len`; labels are the ids, -100 on padding (the
   prompt is trained on).
2. `(prompt + chosen, prompt + rejected)` each right-padded to `max_seq_len`; a batch holds the chosen
   rows then the rejected rows (`collate_pairs`).
3. the prompt alone, left-padded to `max_prompt_seq_len`; longer prompts are dropped and counted.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

EVAL_SHARE = 0.1
KEYS = ("prompt", "chosen", "rejected")
HUB_DATASETS = ("Dahoas/rm-static", "Dahoas/full-hh-rlhf", "Dahoas/synthetic-instruct-gptj-pairwise",
                "yitingxie/rlhf-reward-datasets", "openai/webgpt_comparisons", "stanfordnlp/SHP")


def parse_data_split(data_split: str) -> list[float]:
    """`"2,4,4"` -> the three phases' shares [0.2, 0.4, 0.4]; a clear error for anything else."""
    parts = data_split.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 or v != v for v in values) or sum(values) <= 0:
        raise ValueError(f"--data_split {data_split!r}: expected three non-negative numbers separated by commas, "
                         "one share per phase (SFT, reward model, PPO), e.g. '2,4,4' or '10,0,0'")
    total = sum(values)
    return [v / total for v in values]


def phase_indices(n: int, data_split: str, phase: int, seed: int) -> list[int]:
    """The rows of phase `phase` (1-3) among `n`: DeepSpeed-Chat's seeded shuffle cut at the cumulative shares."""
    shares = parse_data_split(data_split)
    if shares[phase - 1] == 0:
        raise ValueError(f"--data_split {data_split!r} gives phase {phase} no share of the data; give it a non-zero "
                         f"share (position {phase})")
    order = np.random.RandomState(seed=seed).permutation(n)
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + int(round(share * n)))
    bounds[-1] = n
    return [int(i) for i in order[bounds[phase - 1]:bounds[phase]]]


def read_rows(path: str) -> list[dict[str, str]]:
    """The objects of a JSON-lines file or a JSON array file, each checked for `prompt`, `chosen`, `rejected`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    rows = json.loads(stripped) if stripped.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    for i, row in enumerate(rows):
        missing = [k for k in KEYS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}: row {i} lacks the string field(s) {missing}; DeepSpeed-Chat's local data has "
                             "'prompt', 'chosen' and 'rejected'")
    return rows


def _pick(folder: str, stem: str) -> str | None:
    for ext in (".json", ".jsonl"):
        if os.path.isfile(os.path.join(folder, stem + ext)):
            return os.path.join(folder, stem + ext)
    return None


def load_train_eval(data_path: str, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, eval rows) of one `--data_path` entry (see the module docstring)."""
    folder = "data" if data_path == "local/jsonfile" else data_path
    if os.path.isdir(folder):
        train, evaluation = _pick(folder, "train"), _pick(folder, "eval")
        if train is None or evaluation is None:
            raise FileNotFoundError(f"--data_path {data_path}: the folder {os.path.abspath(folder)} needs train.json and "
                                    "eval.json (JSON lines or a JSON array with prompt/chosen/rejected)")
        return read_rows(train), read_rows(evaluation)
    if os.path.isfile(data_path):
        rows = read_rows(data_path)
        order = np.random.RandomState(seed=seed).permutation(len(rows))
        held = max(1, int(round(EVAL_SHARE * len(rows))))
        return [rows[i] for i in order[held:]], [rows[i] for i in order[:held]]
    known = ", ".join(("local/jsonfile", "<folder with train.json and eval.json>", "<file.json or file.jsonl>"))
    hub = ", ".join(HUB_DATASETS)
    raise ValueError(f"--data_path {data_path!r}: unknown dataset. Known here: {known}. DeepSpeed-Chat's Hub "
                     f"datasets ({hub}) need a download, which shardspeed.chat does not do: export one to JSON lines "
                     "with prompt/chosen/rejected fields and pass its path")


def phase_rows(data_paths: list[str], data_split: str, phase: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Every dataset's phase-`phase` share of its train and eval rows, concatenated."""
    parse_data_split(data_split)
    train_all: list[dict[str, str]] = []
    eval_all: list[dict[str, str]] = []
    for path in data_paths:
        train, evaluation = load_train_eval(path, seed)
        train_all += [train[i] for i in phase_indices(len(train), data_split, phase, seed)]
        eval_all += [evaluation[i] for i in phase_indices(len(evaluation), data_split, phase, seed)]
    return train_all, eval_all


def _encode(tokenizer: Any, text: str, max_len: int) -> tuple[Tensor, Tensor]:
    out = tokenizer(text, max_length=max_len, padding="max_length", truncation=True, return_tensors="pt")
    return out["input_ids"][0], out["attention_mask"][0]


def sft_dataset(rows: list[dict[str, str]], tokenizer: Any, max_seq_len: int, eot: str = "") -> list[dict[str, Tensor]]:
    """Phase 1: `prompt + chosen (+ eot)` padded to `max_seq_len`; labels -100 on padding."""
    samples = []
    for row in rows:
        ids, mask = _encode(tokenizer, row["prompt"] + row["chosen"] + eot, max_seq_len)
        samples.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return samples


def pair_dataset(rows: list[dict[str, str]], tokenizer: Any, max_seq_len: int, eot: str = "") -> list[tuple[Tensor, ...]]:
    """Phase 2: (chosen ids, chosen mask, rejected ids, rejected mask), each padded to `max_seq_len`."""
    return [(*_encode(tokenizer, r["prompt"] + r["chosen"] + eot, max_seq_len),
             *_encode(tokenizer, r["prompt"] + r["rejected"] + eot, max_seq_len)) for r in rows]


def collate_pairs(batch: list[tuple[Tensor, ...]]) -> dict[str, Tensor]:
    """DeepSpeed-Chat's `DataCollatorReward`: all chosen rows, then all rejected rows."""
    return {"input_ids": torch.stack([b[0] for b in batch] + [b[2] for b in batch]),
            "attention_mask": torch.stack([b[1] for b in batch] + [b[3] for b in batch])}


def prompt_dataset(rows: list[dict[str, str]], tokenizer: Any, max_prompt_seq_len: int) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """Phase 3: each prompt left-padded to `max_prompt_seq_len` (ids, mask); prompts longer are dropped and counted."""
    pad = tokenizer.pad_token_id
    samples, filtered = [], 0
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"][0]
        if len(ids) > max_prompt_seq_len:
            filtered += 1
            continue
        fill = max_prompt_seq_len - len(ids)
        samples.append((torch.cat([torch.full((fill,), pad, dtype=ids.dtype), ids]),
                        torch.cat([torch.zeros(fill, dtype=torch.long), torch.ones(len(ids), dtype=torch.long)])))
    if not samples:
        raise ValueError(f"every one of the {filtered} phase-3 prompts is longer than --max_prompt_seq_len "
                         f"{max_prompt_seq_len} tokens; raise it")
    return samples, filtered


def collate_prompts(batch: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """DeepSpeed-Chat's `DataCollatorRLHF` output: `prompt`, `prompt_att_mask` (left-padded, one length)."""
    return {"prompt": torch.stack([b[0] for b in batch]), "prompt_att_mask": torch.stack([b[1] for b in batch])}


__all__ = ["collate_pairs", "collate_prompts", "load_train_eval", "pair_dataset", "parse_data_split", "phase_indices",
           "phase_rows", "prompt_dataset", "read_rows", "sft_dataset"]
