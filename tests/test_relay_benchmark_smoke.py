"""Keeps benchmarks/relay.py from rotting: its --quick mode relays 40 messages from
smtp-source through ``twistd maitred --delivery queue --relay-host`` to smtp-sink, once
in one process and once with ``--workers 2``.  The script checks every step (each
message confirmed, each probe at the sink exactly once, the spool empty) and exits 1
if one fails.  No timing is asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "interop"))

from maitred_interop import require  # noqa: E402


def test_relay_benchmark_quick() -> None:
    require("smtp-source")
    require("smtp-sink")
    proc = subprocess.run(
        [sys.executable, "benchmarks/relay.py", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "smtp-source -s 4 -m 40 -l 1024 -d" in out, out
    number = r"[0-9]+(?: \([0-9]+-[0-9]+\))?"
    for workers in (0, 2):
        row = rf"^\| {workers} \|" + rf" {number} \|" * 6 + "$"
        assert re.search(row, out, re.MULTILINE), (workers, out)

