"""Keeps benchmarks/ from rotting: the quick mode runs every scenario for a few seconds
and fails if any transaction did not get its 250.  No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_quick() -> None:
    pytest.importorskip("aiosmtpd")
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "maitred" in proc.stdout
