"""`shardspeed report`: the environment report to attach to a bug report (like `ds_report`).

Prints which shardspeed features exist yet, the versions and install paths of shardspeed, torch,
pydantic and python, what CUDA torch sees, which torch.distributed backends are built in, and
warnings about the environment. Nothing is compiled or imported beyond torch and pydantic.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

AVAILABLE = "available"
NOT_YET = "not yet"

FEATURES: dict[str, str] = {
    "config": AVAILABLE,
    "engine stage 0": AVAILABLE,
    "fp16/bf16": AVAILABLE,
    "launcher": AVAILABLE,
    "ZeRO stage 1/2": AVAILABLE,
    "ZeRO stage 3": AVAILABLE,
    "CPU offload": AVAILABLE,
    "NVMe offload": AVAILABLE,
    "pipeline parallel": AVAILABLE,
    "tensor parallel": AVAILABLE,
    "MoE": NOT_YET,
    "inference engine": NOT_YET,
}
"""Feature -> AVAILABLE or NOT_YET; flip an entry in the change that lands the feature."""

BACKENDS = ("gloo", "nccl", "mpi")
SHM_WARN_BYTES = 512 * 2**20  # NCCL's shared-memory transport fails in small /dev/shm (docker's 64 MB).
WIDTH = 28

Rows = list[tuple[str, str]]


def feature_rows(features: dict[str, str] | None = None) -> Rows:
    marks = {AVAILABLE: "[OKAY]", NOT_YET: "[NO]  "}
    return [(name, f"{marks.get(status, '[??]  ')} {status}") for name, status in (features or FEATURES).items()]


def package_rows(names: tuple[str, ...] = ("shardspeed", "torch", "pydantic")) -> Rows:
    rows: Rows = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            rows.append((f"{name} version", f"not importable ({err})"))
            continue
        rows.append((f"{name} version", str(getattr(module, "__version__", "unknown"))))
        rows.append((f"{name} install path", str(Path(module.__file__ or "?").parent)))
    rows.append(("python version", sys.version.split()[0]))
    rows.append(("python executable", sys.executable))
    return rows


def cuda_rows() -> Rows:
    import torch

    available = torch.cuda.is_available()
    names = [f"{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())] if available else []
    return [
        ("torch CUDA version", str(torch.version.cuda)),
        ("torch HIP version", str(getattr(torch.version, "hip", None))),
        ("CUDA available", str(available)),
        ("CUDA devices", "; ".join(names) or "none"),
        ("nvcc version", nvcc_version()),
    ]


def nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "nvcc not found (not needed: shardspeed compiles no ops)"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{nvcc}: {err}"
    release = [line for line in out.splitlines() if "release" in line]
    return release[-1].strip() if release else out.strip() or "unknown"


def backend_status() -> dict[str, bool]:
    import torch.distributed as dist

    if not dist.is_available():
        return {name: False for name in BACKENDS}
    checks = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available, "mpi": dist.is_mpi_available}
    return {name: bool(checks[name]()) for name in BACKENDS}


def shm_bytes() -> int | None:
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stat.f_frsize * stat.f_blocks


def environment_warnings(backends: dict[str, bool], cuda_available: bool, shm: int | None) -> list[str]:
    """Problems in this environment that a bug report should mention."""
    found = []
    if not backends.get("gloo"):
        found.append("torch.distributed has no gloo backend: CPU runs and tests cannot start")
    if cuda_available and not backends.get("nccl"):
        found.append("CUDA is available but NCCL is not: GPU runs fall back to gloo (slow)")
    if not cuda_available:
        found.append("no CUDA device: runs use the CPU and gloo (fp16 and bf16 train there too; CUDA-only paths "
                     "such as pinned memory and streams are skipped)")
    if shm is not None and shm < SHM_WARN_BYTES:
        found.append(f"/dev/shm is {shm / 2**20:.0f} MB; NCCL may fail (docker: --shm-size=1g or larger)")
    return found


def render(title: str, rows: Rows) -> str:
    lines = [title, "-" * len(title)]
    lines += [f"{name} {'.' * max(2, WIDTH - len(name))} {value}" for name, value in rows]
    return "\n".join(lines)


def build_report(hide_operator_status: bool = False, hide_errors_and_warnings: bool = False) -> str:
    import torch

    backends = backend_status()
    sections = []
    if not hide_operator_status:
        sections.append(render("shardspeed features", feature_rows()))
    shm = shm_bytes()
    shm_text = "unknown" if shm is None else f"{shm / 2**20:.0f} MB"
    sections.append(render("environment", package_rows() + cuda_rows() + [("/dev/shm size", shm_text)]))
    sections.append(render("torch.distributed backends",
                           [(name, "yes" if ok else "no") for name, ok in backends.items()]))
    if not hide_errors_and_warnings:
        warnings = environment_warnings(backends, torch.cuda.is_available(), shm)
        sections.append("warnings\n--------\n" + ("\n".join(f"- {w}" for w in warnings) or "none"))
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardspeed report", description=__doc__.splitlines()[0])
    parser.add_argument("--hide_operator_status", action="store_true", help="omit the feature table")
    parser.add_argument("--hide_errors_and_warnings", action="store_true", help="omit the warnings")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(build_report(args.hide_operator_status, args.hide_errors_and_warnings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
