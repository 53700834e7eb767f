"""Messages per second with ``twistd maitred --workers N`` (issue 13), driven by Postfix's
smtp-source.

    python benchmarks/workers.py [--quick] [--repeat N] [--workers 0,1,2]
                                 [--sessions 50] [--messages 10000] [--keep-open]

For each repetition and each worker count (0: one process, no supervisor), it starts
``twistd -n maitred --delivery discard`` on 127.0.0.1 with the given ``--workers``,
waits for the listener, runs smtp-source (``-s SESSIONS -m MESSAGES``, 1 KiB, one
message per connection unless ``--keep-open``), and reports messages/s and the CPU of
the supervisor and all its workers per message.  Checks are off (``--no-auth-checks``)
and the per-client connection limit too, since all load comes from one address.
Bounded: each run has a deadline; the server is stopped after it.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
from serverproc import CLK_TCK, TWISTD_BOOT, child_env, free_port  # noqa: E402


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* and of its living children (the workers)."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            raw = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def start(workers: int, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", TWISTD_BOOT, "-n", "--pidfile=",
            "--logger=twisted.logger.LogPublisher", "maitred",
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--delivery", "discard",
            "--no-auth-checks", "--domain", "localhost", "--hostname", "localhost",
            "--max-client-connections", "0"]
    if workers:
        argv += ["--workers", str(workers)]
    return subprocess.Popen(argv, cwd=workdir, env=child_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port: int, proc: subprocess.Popen[bytes], workers: int, timeout: float) -> None:
    """Until every worker greets (the supervisor's socket accepts connections before
    any worker has started)."""
    deadline = time.monotonic() + timeout
    ready = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            children = []
        if len(children) >= workers:
            result = loadgen.run_smtp_source(port, sessions=1, messages=1, size=100,
                                             keep_open=False, deadline=deadline)
            ready = result.ok
            if ready:
                time.sleep(1.0 if workers else 0.0)  # every worker past its startup
                return
        time.sleep(0.1)
    raise RuntimeError("server not ready")


def measure(workers: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    port = free_port()
    proc = start(workers, port, workdir)
    try:
        wait_ready(port, proc, workers, 60)
        before = tree_cpu_seconds(proc.pid)
        result = loadgen.run_smtp_source(
            port, sessions=args.sessions, messages=args.messages, size=1024,
            keep_open=args.keep_open, deadline=time.monotonic() + 300)
        cpu = tree_cpu_seconds(proc.pid) - before
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if result.session_errors or result.ok < args.messages:
        raise RuntimeError(f"--workers {workers}: {result.ok}/{args.messages} "
                           f"confirmed; {result.errors[:3]}")
    return {"msgs_per_s": result.ok / result.elapsed,
            "server_cpu_us_per_msg": cpu / max(result.ok, 1) * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--keep-open", action="store_true",
                        help="smtp-source -d: many messages per connection")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.sessions, args.messages = 1, 4, 40
    if loadgen.smtp_source_path() is None:
        print("smtp-source is not installed (Debian postfix)", file=sys.stderr)
        return 2
    counts = [int(w) for w in args.workers.split(",")]
    samples: dict[int, list[dict[str, float]]] = {w: [] for w in counts}
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    for rep in range(args.repeat):
        for w in counts[rep % len(counts):] + counts[: rep % len(counts)]:
            sample = measure(w, args, workdir)
            samples[w].append(sample)
            print(f"[{rep + 1}/{args.repeat}] --workers {w}: "
                  f"{sample['msgs_per_s']:.0f} msgs/s, "
                  f"{sample['server_cpu_us_per_msg']:.0f} us CPU/msg", file=sys.stderr)
    base = statistics.median(s["msgs_per_s"] for s in samples[counts[0]])
    mode = "kept open (-d)" if args.keep_open else "one message per connection"
    print(f"smtp-source -s {args.sessions} -m {args.messages} -l 1024, {mode}; "
          f"{os.cpu_count()} cores; median (min-max) of {args.repeat}\n")
    print("| --workers | msgs/s | ÷ first row | server CPU µs/msg (all processes) |")
    print("|---|---|---|---|")
    for w in counts:
        rates = [s["msgs_per_s"] for s in samples[w]]
        cpus = [s["server_cpu_us_per_msg"] for s in samples[w]]
        print(f"| {w} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) "
              f"| {statistics.median(rates) / base:.2f} | {statistics.median(cpus):.0f} "
              f"({min(cpus):.0f}-{max(cpus):.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
