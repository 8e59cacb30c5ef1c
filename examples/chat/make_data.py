"""Write the synthetic preference task `sorted_numbers` in DeepSpeed-Chat's local JSON form (deterministic).

Each row: prompt " Human: sort 7 3 9 1 Assistant:", chosen " 1 3 7 9" (the numbers sorted); rejected is, in
`1 - DEGENERATE_SHARE` of the rows, the same numbers in a shuffled, unsorted order, otherwise a degenerate answer
(prompt words repeated, a truncated sorted answer) so that the reward model also scores such answers low and PPO
cannot win by emitting them. Files: OUT/train.json and OUT/eval.json (JSON lines), the
layout `--data_path OUT` (and DeepSpeed-Chat's `local/jsonfile`) reads.

    python examples/chat/make_data.py [--out examples/chat/data/sorted_numbers] [--train 1000] [--eval 200]
"""
from __future__ import annotations

import argparse
import json
import os
import random

ITEMS = 4
DIGITS = range(10)
DEGENERATE_SHARE = 0.3


def row(rng: random.Random) -> dict[str, str]:
    numbers = rng.sample(DIGITS, ITEMS)
    shuffled = list(numbers)
    while shuffled == sorted(shuffled):
        rng.shuffle(shuffled)
    words = lambda xs: " ".join(str(x) for x in xs)  # noqa: E731
    prompt = f" Human: sort {words(numbers)} Assistant:"
    rejected = words(shuffled)
    if rng.random() < DEGENERATE_SHARE:
        rejected = rng.choice([" ".join(rng.choices(prompt.split(), k=ITEMS)),
                               words(sorted(numbers)[:rng.randint(1, ITEMS - 1)])])
    return {"prompt": prompt, "chosen": " " + words(sorted(numbers)), "rejected": " " + rejected}


def write(path: str, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data", "sorted_numbers"))
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "train.json"), [row(rng) for _ in range(args.train)])
    write(os.path.join(args.out, "eval.json"), [row(rng) for _ in range(args.eval)])
    print(f"wrote {args.train} train and {args.eval} eval rows to {args.out}")


if __name__ == "__main__":
    main()
