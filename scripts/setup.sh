#!/usr/bin/env bash
# Set up a virtual environment in .venv with torch (CPU 2.13.0 unless one is already there),
# shardspeed itself (editable) and the test/monitoring extras. Safe to run again.
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
.venv/bin/python -c "import shardspeed, torch; print(f'shardspeed {shardspeed.__version__} with torch {torch.__version__} in .venv')"
