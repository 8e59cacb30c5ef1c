"""`shardspeed plan`: which ZeRO stage, offload and checkpointing fit a model on a machine, fastest first.

    shardspeed plan --model llama --model-arg hidden_size=4096 --model-arg num_hidden_layers=32 \\
        --seq-len 4096 --micro-batch 1 --gpus-per-node 8 --gpu-memory 80GB --host-memory 1TB
    shardspeed plan --model-config config.json --seq-len 2048 --json
    shardspeed plan --model gpt2 --seq-len 1024 --this-machine --plot plan.png

Sizes take units (`80GB` = 80e9 bytes, `80GiB` = 80 * 2^30), bandwidths the same with `/s`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

def build_parser() -> argparse.ArgumentParser:
    from shardspeed.profiling.planner import Hardware

    hw = Hardware()
    parser = argparse.ArgumentParser(prog="shardspeed plan", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-config", metavar="PATH", help="a Hugging Face config.json")
    model.add_argument("--model", metavar="TYPE", help="a Hugging Face model type (llama, gpt2, mistral, qwen2, ...)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value for --model / over --model-config (repeatable), e.g. num_hidden_layers=32")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sample")
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per rank per micro step")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--ds-config", metavar="PATH", help="take bucket sizes and thresholds from this config's zero_optimization")
    _hardware_flags(parser, hw)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes per rank per tier and component)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw per-tier bars of every option (needs matplotlib)")
    parser.add_argument("--no-breakdown", action="store_true", help="print the ranked table only")
    return parser


def _hardware_flags(parser: argparse.ArgumentParser, hw: Any) -> None:
    group = parser.add_argument_group("hardware (defaults: a node of 8 x 80 GB GPUs)")
    group.add_argument("--this-machine", action="store_true",
                       help="this machine's GPUs (or --gpus-per-node CPU ranks) and available host memory")
    group.add_argument("--cpu", action="store_true", help="ranks are CPU processes (device memory is host memory)")
    group.add_argument("--gpus-per-node", type=int, default=None, help=f"ranks per node (default {hw.gpus_per_node})")
    group.add_argument("--nodes", type=int, default=hw.nodes)
    group.add_argument("--gpu-memory", default=None, help="memory per GPU (default 80GiB)")
    group.add_argument("--host-memory", default=None, help="host memory per node (default 1TiB)")
    group.add_argument("--nvme-space", default=None, help="NVMe space per node for offload (default none)")
    group.add_argument("--nvme-path", default=None, help="with --this-machine: the free space there is --nvme-space")
    group.add_argument("--nvme-bandwidth", default=None, help="NVMe read/write bandwidth per node (default 3GB/s)")
    group.add_argument("--pcie-bandwidth", default=None, help="host-device bandwidth per GPU (default 25GB/s)")
    group.add_argument("--intra-node-bandwidth", default=None, help="collective bus bandwidth per GPU in a node (default 150GB/s)")
    group.add_argument("--inter-node-bandwidth", default=None, help="collective bus bandwidth per GPU across nodes (default 25GB/s)")
    group.add_argument("--device-tflops", type=float, default=None, help="achieved TFLOP/s per GPU (default 400)")


def hardware_from(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from shardspeed.profiling.planner import Hardware, parse_bytes

    if args.this_machine:
        hw = Hardware.this_machine(ranks_per_node=args.gpus_per_node, nodes=args.nodes, nvme_path=args.nvme_path)
    else:
        hw = Hardware(gpus_per_node=args.gpus_per_node or Hardware.gpus_per_node, nodes=args.nodes)
    if args.cpu:  # speeds of CPU ranks, as Hardware.this_machine() assumes them; flags below still win
        hw = replace(hw, accelerator="cpu", device_reserved=0, pcie_bandwidth=float("inf"), device_flops=2e10,
                     intra_node_bandwidth=5e9)
    sizes = {"gpu_memory": args.gpu_memory, "host_memory": args.host_memory, "nvme_space": args.nvme_space}
    rates = {"nvme_bandwidth": args.nvme_bandwidth, "pcie_bandwidth": args.pcie_bandwidth,
             "intra_node_bandwidth": args.intra_node_bandwidth, "inter_node_bandwidth": args.inter_node_bandwidth}
    changes: dict[str, Any] = {k: parse_bytes(v) for k, v in sizes.items() if v is not None}
    changes.update({k: float(parse_bytes(v)) for k, v in rates.items() if v is not None})
    if args.device_tflops is not None:
        changes["device_flops"] = args.device_tflops * 1e12
    return replace(hw, **changes)


def _model_args(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--model-arg {pair!r}: write KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _zero_section(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from shardspeed.config import lift_autos, read_config

    raw = read_config(path).get("zero_optimization", {})
    lift_autos(raw)  # "auto" keys keep their defaults here
    return {k: v for k, v in raw.items() if k not in ("stage", "offload_optimizer", "offload_param")}


def main(argv: list[str] | None = None) -> int:
    from shardspeed.profiling.planner import PlannerError, hf_config, plan
    from shardspeed.profiling.planner.report import plan_dict, plan_text, plot_plan

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = hf_config(args.model_config or args.model, **_model_args(args.model_arg))
        result = plan(config, args.seq_len, args.micro_batch, args.precision, hardware_from(args),
                      zero=_zero_section(args.ds_config), gradient_accumulation_steps=args.gradient_accumulation_steps)
        if args.plot:
            plot_plan(result, args.plot)
    except (PlannerError, ValueError, ImportError) as err:
        print(f"shardspeed plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan_dict(result), indent=1) if args.json else plan_text(result, not args.no_breakdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
