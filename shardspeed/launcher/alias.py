"""`shardspeed install-deepspeed-alias`: install the opt-in `deepspeed` distribution that maps the
`deepspeed` import name onto shardspeed (integrations/deepspeed-alias in the source tree).

Hugging Face transformers and accelerate check that a distribution named `deepspeed` is installed
and import it by that name, so `import shardspeed as deepspeed` cannot reach them. pip treats the
alias and a real DeepSpeed as the same project, so installing one replaces the other: this command
refuses when a real DeepSpeed is installed. `pip uninstall deepspeed` removes the alias again.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ALIAS_MARK = "+shardspeed."  # the alias's local version label; a real DeepSpeed has none


def alias_source() -> Path:
    """integrations/deepspeed-alias of the source tree shardspeed is installed from."""
    import shardspeed

    return Path(shardspeed.__file__).resolve().parents[1] / "integrations" / "deepspeed-alias"


def installed_deepspeed() -> str | None:
    """The version of the distribution named `deepspeed` in this environment, or None."""
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardspeed install-deepspeed-alias", description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="say what would be done, change nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    found = installed_deepspeed()
    if found is not None and ALIAS_MARK not in found:
        print(f"shardspeed install-deepspeed-alias: error: DeepSpeed {found} is installed in this environment "
              f"({sys.prefix}); the alias would replace it (pip treats them as one project). Use a separate "
              "environment for shardspeed, or `pip uninstall deepspeed` first if you mean to replace it.",
              file=sys.stderr)
        return 1
    source = alias_source()
    if not (source / "pyproject.toml").is_file():
        print(f"shardspeed install-deepspeed-alias: error: {source} not found: the alias is built from a shardspeed "
              "source checkout (pip install -e <checkout>), where it lives in integrations/deepspeed-alias",
              file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(source)]
    if args.dry_run:
        print("would run: " + " ".join(command))
        return 0
    done = subprocess.run(command)
    if done.returncode == 0:
        print(f"installed deepspeed {installed_deepspeed()} -> shardspeed ({source}); `pip uninstall deepspeed` removes it")
    return done.returncode
