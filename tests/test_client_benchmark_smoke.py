"""Keeps benchmarks/client.py from rotting: its quick mode sends 20 messages with each
client (maitred_tx.client, twisted.mail's ESMTPSender, aiosmtplib if installed) to a
sink on loopback and fails unless every message got its 250.  No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("server", ["smtp-sink", "maitred"])
def test_client_benchmark_quick(server: str) -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/client.py", "--quick", "--server", server],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[3:] if line.strip()}
    assert {"maitred_tx", "twisted.mail"} <= set(rows), proc.stdout
    assert "20 messages of 1024 octets" in proc.stdout
