"""Launcher e2e helper: init gloo from torchrun's env, all-reduce the rank ids, write what it saw.

Writes <--out>/rank<RANK>.json with the env, its argv, the all-reduce result and __name__.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("--some_arg", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ranks = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(ranks)
    record = {
        "rank": dist.get_rank(), "world_size": dist.get_world_size(),
        "env": {key: os.environ.get(key) for key in
                ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SHARDSPEED_TEST_VAR")},
        "local_rank_arg": args.local_rank, "some_arg": args.some_arg, "argv": sys.argv,
        "sum": ranks.item(), "name": __name__, "path0": sys.path[0],
    }
    dist.destroy_process_group()
    Path(args.out, f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
