"""The outbound queue with many messages in it: enqueueing, loading, and a server
starting on it.  (Not named queue.py: in this directory, on sys.path[0] of every
benchmark script, that would shadow the stdlib's queue module, which Twisted imports.)

    python benchmarks/outbound_queue.py [--quick] [--messages N] [--size OCTETS]
                                        [--no-sync] [--spool DIR]

1. enqueue N messages (default 10,000 of 2 KiB) through ``SpoolStore.add``, durably
   (four fsyncs each: body, msg/, envelope, env/), one after the other; ``--no-sync``
   skips the fsyncs, to fill a large spool fast when only steps 2-3 are of interest;
2. load the index in a fresh process (``SpoolStore.recover()``, as a server does at
   start): its time and the resident memory it adds (VmRSS, /proc/self/status);
3. start ``twistd -n maitred --delivery queue`` on that spool and on an empty one:
   the time until it accepts connections, and its VmRSS then, then send one message
   through it with smtplib (it must get its 250 and be in the spool).

Every step is checked (the count loaded, the message queued); a failure is exit
status 1.  Timings vary with the machine's other work; no test asserts them.  The
files are in the page cache when they are loaded (just written): a cold start after
a reboot reads them from the disk too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadgen import build_message
from serverproc import TWISTD_BOOT, child_env, free_port

from maitred_tx.queue.spool import SpoolStore
from maitred_tx.queue.store import QueuedRecipient, QueueEnvelope

# Run in a fresh interpreter: the memory the index adds is measured from a baseline
# taken after the imports.
_LOAD = r"""
import json, sys, time
from maitred_tx.queue.spool import SpoolStore

def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

store = SpoolStore(sys.argv[1])
before = rss_kb()
started = time.perf_counter()
report = store.recover()
seconds = time.perf_counter() - started
after = rss_kb()
due = len(store.due(time.time() + 10**9))
print(json.dumps({"loaded": report.loaded, "due": due, "seconds": seconds,
                  "rss_kb": after - before}))
"""


class CheckError(Exception):
    """A step did not do what it must."""


def enqueue(spool: Path, count: int, size: int, sync: bool) -> float:
    """Add *count* messages (durably if *sync*); the seconds it took."""
    store = SpoolStore(spool, sync=sync)
    store.prepare()
    body = build_message(size, "queue")
    envelope = QueueEnvelope("sender@origin.test", (QueuedRecipient("rcpt@example.com"),))
    started = time.perf_counter()
    for _ in range(count):
        store.add(envelope, [body])
    return time.perf_counter() - started


def load(spool: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _LOAD, str(spool)], env=child_env(),
                         capture_output=True, text=True, timeout=600, check=True)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise CheckError(f"no VmRSS for {pid}")


def serve(spool: Path, workdir: Path) -> tuple[float, int]:
    """Start twistd on *spool*: seconds until it accepts, its VmRSS (kB) then; one
    message through it must be queued."""
    port = free_port()
    before = len(list((spool / "env").iterdir())) if (spool / "env").is_dir() else 0
    command = [sys.executable, "-c", TWISTD_BOOT, "-n", "--pidfile=", "--logfile",
               str(workdir / "twistd.log"), "maitred", "--listen",
               f"tcp:{port}:interface=127.0.0.1", "--delivery", "queue", "--spool", str(spool),
               "--domain", "example.com", "--no-auth-checks", "--hostname", "mx.bench"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=workdir, env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = started + 120
        while True:
            if process.poll() is not None or time.perf_counter() > deadline:
                raise CheckError(f"twistd did not start: {(workdir / 'twistd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.01)
        seconds = time.perf_counter() - started
        rss = _rss_kb(process.pid)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("sender@origin.test", ["rcpt@example.com"],
                            build_message(2048, "served"))
    finally:
        process.terminate()
        process.wait(30)
    after = len(list((spool / "env").iterdir()))
    if after != before + 1:
        raise CheckError(f"the message sent through twistd is not queued ({before}->{after})")
    return seconds, rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 messages: a smoke run")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=2048, help="octets per message")
    parser.add_argument("--no-sync", action="store_true", help="enqueue without fsync")
    parser.add_argument("--spool", type=Path, help="where (default: a temporary directory)")
    args = parser.parse_args(argv)
    count = 100 if args.quick else args.messages
    workdir = Path(tempfile.mkdtemp(prefix="maitred-queue-bench-"))
    spool = args.spool or workdir / "spool"
    try:
        empty_start, empty_rss = serve(workdir / "empty", workdir)
        seconds = enqueue(spool, count, args.size, not args.no_sync)
        loaded = load(spool)
        if loaded["loaded"] != count or loaded["due"] != count:
            raise CheckError(f"loaded {loaded}, expected {count} messages all due")
        full_start, full_rss = serve(spool, workdir)
    except (CheckError, subprocess.CalledProcessError, OSError, smtplib.SMTPException) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if args.spool is None:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = [
        ("messages queued", f"{count}", f"of {args.size} octets"),
        ("enqueue (no fsync)" if args.no_sync else "enqueue (durable, serial)",
         f"{count / seconds:,.0f} msg/s",
         f"{seconds * 1e3 / count:.2f} ms each"),
        ("load the index (recover)", f"{loaded['seconds']:.3f} s",
         f"{loaded['seconds'] * 1e6 / count:.0f} µs per message"),
        ("memory the index adds", f"{loaded['rss_kb'] / 1024:.1f} MiB",
         f"{loaded['rss_kb'] * 1024 / count:.0f} B per message (VmRSS)"),
        ("twistd start, empty spool", f"{empty_start:.2f} s", f"VmRSS {empty_rss / 1024:.1f} MiB"),
        (f"twistd start, {count} queued", f"{full_start:.2f} s",
         f"VmRSS {full_rss / 1024:.1f} MiB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'queue benchmark':<{width}}  {'value':>14}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
