#!/usr/bin/env bash
# Set up a virtual environment in .venv with torch (CPU 2.13.0 unless one is already there),
# shardspeed itself (editable), the test/monitoring extras and the `deepspeed` alias. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
# The opt-in `deepspeed` name for shardspeed, which the Hugging Face Trainer / Accelerate / PEFT tests run
# on (integrations/deepspeed-alias); it refuses to replace a real DeepSpeed in this environment.
.venv/bin/shardspeed install-deepspeed-alias
.venv/bin/python -c "import shardspeed, torch; print(f'shardspeed {shardspeed.__version__} with torch {torch.__version__} in .venv')"
