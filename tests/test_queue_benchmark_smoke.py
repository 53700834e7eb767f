"""Keeps benchmarks/outbound_queue.py from rotting: its --quick mode enqueues 100
messages durably, loads them in a fresh process, starts twistd on the spool and sends
one message through it; every step is checked by the script (exit status 1 if not).
No timing is asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_queue_benchmark_quick() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/outbound_queue.py", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^messages queued\s+100\b", out, re.MULTILINE), out
    assert re.search(r"^load the index \(recover\)\s+[0-9.]+ s\b", out, re.MULTILINE), out
    assert re.search(r"^twistd start, 100 queued\s+[0-9.]+ s\s+VmRSS", out, re.MULTILINE), out


def test_no_benchmark_shadows_a_stdlib_module() -> None:
    """Scripts run with benchmarks/ as sys.path[0]: a queue.py there would replace the
    stdlib's queue for every benchmark (Twisted's thread pool imports it)."""
    names = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    assert names & set(sys.stdlib_module_names) == set()
