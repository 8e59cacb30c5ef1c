"""mypy over the package with the project's configuration (pyproject.toml [tool.mypy]): the
annotations are part of the contract, so a change that makes one untrue fails here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_mypy_passes() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
