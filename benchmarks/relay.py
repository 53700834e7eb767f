"""Messages per second relayed end to end (issue 15): Postfix's smtp-source submits to
``twistd maitred --delivery queue``, which queues each message durably and relays it
with its queue runner to Postfix's smtp-sink (``--relay-host [127.0.0.1]:SINK``).

    python benchmarks/relay.py [--quick] [--repeat N] [--workers 0,2] [--sessions 20]
                               [--messages 5000] [--size 1024]

For each repetition and each ``--workers`` value (0: one process; N: N workers accept
and queue, the supervisor runs the queue), in a fresh temporary directory:

1. ``smtp-sink`` on 127.0.0.1 dumps every message it accepts to its own file (``-d``),
   so that the messages it saw are counted and timed (each file's mtime);
2. ``twistd -n maitred --delivery queue --spool TMP --relay-host [127.0.0.1]:SINK
   --relay --no-auth-checks`` (with ``--logger=twisted.logger.LogPublisher``: events
   built, nothing formatted or written, as ``maitred-nolog`` in benchmarks/run.py);
3. ``smtp-source -s SESSIONS -m MESSAGES -l SIZE -d`` (connections kept open) submits;
   meanwhile a probe client (smtplib) sends a numbered message every 50 ms and notes
   when it got its 250, and the spool's env/ is counted every 50 ms (queue length);
4. the run ends when the spool is empty and the sink has every message.

Reported: messages/s accepted (smtp-source's count over its time), messages/s relayed
end to end (smtp-source's messages and the probes, from the start of the submission to
the sink's last file), the queue residence of the probes (their 250 from maitred to
their file at the sink: queue wait plus the relay's transaction; when the relay falls
behind the submission, this is mostly the backlog ahead of them), the longest queue,
and the CPU of the relay process and its workers per message (receiving, queueing and
relaying; /proc utime+stime).  The spool is fsync'd as in production (twistd has no
option to turn that off; ``SpoolStore(sync=False)`` is for tests).  Every step is
checked - each message confirmed by smtp-source, the sink holding exactly as many
messages as were sent and each probe once, the spool empty at the end - else exit
status 1.  Bounded: every run has a deadline, every process is stopped after it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
from serverproc import TWISTD_BOOT, child_env, free_port  # noqa: E402
from workers import tree_cpu_seconds, wait_ready  # noqa: E402

PROBE_INTERVAL = 0.05  # seconds between probe messages while smtp-source runs
MAX_PROBES = 400  # bounds the probe thread whatever the load's length
POLL = 0.05  # how often the spool is counted
_PROBE = re.compile(rb"^X-Probe: (\d+)\r?$", re.MULTILINE)


def smtp_sink_path() -> str | None:
    found = shutil.which("smtp-sink")
    if found is None and os.access("/usr/sbin/smtp-sink", os.X_OK):
        found = "/usr/sbin/smtp-sink"
    return found


@dataclass(slots=True)
class Sink:
    port: int
    dump: Path
    process: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return list(self.dump.iterdir())


@contextlib.contextmanager
def sink(workdir: Path) -> Iterator[Sink]:
    """smtp-sink on 127.0.0.1, dumping each message to DUMP/HHMMSS.<random>; stopped."""
    binary = smtp_sink_path()
    assert binary is not None
    dump = workdir / "sink"
    dump.mkdir()
    user: list[str] = []
    if os.geteuid() == 0:  # smtp-sink refuses to run as root; nobody writes the dumps
        user = ["-u", "nobody"]
        workdir.chmod(0o711)  # a TemporaryDirectory is 0o700: nobody could not enter
        dump.chmod(0o777)
    port = free_port()
    argv = [binary, *user, "-d", f"{dump}/%H%M%S.", f"127.0.0.1:{port}", "1000"]
    process = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, process, 20)
        yield Sink(port, dump, process)
    finally:
        _stop(process)


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def start_relay(workers: int, port: int, sink_port: int, workdir: Path,
                destination_concurrency: int = 1) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", TWISTD_BOOT, "-n", "--pidfile=",
            "--logger=twisted.logger.LogPublisher", "maitred",
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--delivery", "queue",
            "--spool", str(workdir / "spool"), "--relay-host", f"[127.0.0.1]:{sink_port}",
            "--relay", "--no-auth-checks", "--hostname", "relay.localhost",
            "--max-client-connections", "0",
            "--destination-concurrency", str(destination_concurrency)]
    if workers:
        argv += ["--workers", str(workers)]
    return subprocess.Popen(argv, cwd=workdir, env=child_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def queued(spool: Path) -> int:
    """Messages in the spool now (committed envelopes)."""
    try:
        return len(os.listdir(spool / "env"))
    except FileNotFoundError:
        return 0


@dataclass(slots=True)
class Probes:
    """Numbered messages sent while the load runs, each with the time of its 250."""

    port: int
    acked: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
                client.ehlo("probe.localhost")
                for n in range(MAX_PROBES):
                    if self.stop.wait(PROBE_INTERVAL):
                        return
                    client.sendmail("probe@loadgen.localhost", ["probe@sink.localhost"],
                                    b"Subject: probe\r\nX-Probe: %d\r\n\r\nprobe\r\n" % n)
                    self.acked[n] = time.time()
        except (OSError, smtplib.SMTPException) as e:
            self.errors.append(f"probe: {e!r}")


def drain(spool: Path, sink: Sink, expected: int, deadline: float,
          peak: list[int]) -> None:
    """Until the spool is empty and the sink holds *expected* files (or the deadline)."""
    while time.monotonic() < deadline:
        length = queued(spool)
        peak[0] = max(peak[0], length)
        if length == 0 and len(sink.files()) >= expected:
            return
        time.sleep(POLL)
    raise RuntimeError(f"not drained: {queued(spool)} queued, {len(sink.files())} of "
                       f"{expected} at the sink")


def residences(sink: Sink, probes: Probes, baseline: set[Path]) -> list[float]:
    """Seconds from each probe's 250 to its file at the sink; each probe exactly once."""
    seen: dict[int, float] = {}
    for path in sink.files():
        if path in baseline:
            continue
        match = _PROBE.search(path.read_bytes())
        if match is None:
            continue
        n = int(match.group(1))
        if n in seen:
            raise RuntimeError(f"probe {n} reached the sink twice")
        seen[n] = path.stat().st_mtime
    if set(seen) != set(probes.acked):
        raise RuntimeError(f"probes acknowledged {sorted(probes.acked)[:10]}..., "
                           f"at the sink {sorted(seen)[:10]}...")
    return [seen[n] - probes.acked[n] for n in sorted(seen)]


def measure(workers: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        workdir = Path(tmp)
        with sink(workdir) as s:
            port = free_port()
            relay = start_relay(workers, port, s.port, workdir,
                                args.destination_concurrency)
            try:
                return _measure(relay, port, s, workers, workdir / "spool", args)
            finally:
                _stop(relay)


def _measure(relay: subprocess.Popen[bytes], port: int, s: Sink, workers: int,
             spool: Path, args: argparse.Namespace) -> dict[str, float]:
    deadline = time.monotonic() + args.timeout
    wait_ready(port, relay, workers, 60)  # one message through smtp-source
    drain(spool, s, 1, deadline, [0])
    baseline = set(s.files())
    probes = Probes(port)
    prober = threading.Thread(target=probes.run, daemon=True)
    cpu0 = tree_cpu_seconds(relay.pid)
    started = time.time()
    result: list[loadgen.LoadResult] = []
    load = threading.Thread(target=lambda: result.append(loadgen.run_smtp_source(
        port, sessions=args.sessions, messages=args.messages, size=args.size,
        keep_open=True, deadline=deadline)))
    load.start()
    prober.start()
    peak = [0]
    while load.is_alive() and time.monotonic() < deadline:
        peak[0] = max(peak[0], queued(spool))
        load.join(POLL)
    probes.stop.set()
    prober.join(60)
    load.join(max(deadline - time.monotonic(), 1))
    if not result:
        raise RuntimeError("smtp-source did not finish")
    [submitted] = result
    if submitted.session_errors or submitted.ok != args.messages or probes.errors:
        raise RuntimeError(f"--workers {workers}: {submitted.ok}/{args.messages} "
                           f"confirmed; {submitted.errors[:3]} {probes.errors[:3]}")
    drain(spool, s, len(baseline) + args.messages + len(probes.acked), deadline, peak)
    cpu = tree_cpu_seconds(relay.pid) - cpu0
    arrived = [p for p in s.files() if p not in baseline]
    if len(arrived) != args.messages + len(probes.acked):
        raise RuntimeError(f"the sink has {len(arrived)} messages, not "
                           f"{args.messages} + {len(probes.acked)} probes (duplicates?)")
    last = max(p.stat().st_mtime for p in arrived)
    waits = residences(s, probes, baseline)
    total = args.messages + len(probes.acked)
    return {
        "accepted_per_s": submitted.ok / submitted.elapsed,
        "relayed_per_s": total / (last - started),
        "residence_median_ms": statistics.median(waits) * 1000 if waits else 0.0,
        "residence_max_ms": max(waits) * 1000 if waits else 0.0,
        "peak_queue": float(peak[0]),
        "cpu_us_per_msg": cpu / total * 1e6,
        "probes": float(len(waits)),
    }


def _range(values: list[float], fmt: str = ".0f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return (f"{format(statistics.median(values), fmt)} "
            f"({format(min(values), fmt)}-{format(max(values), fmt)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 messages")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline per run")
    parser.add_argument("--destination-concurrency", type=int, default=1,
                        help="the relay's connections at once to the sink")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.sessions, args.messages, args.timeout = 1, 4, 40, 120.0
    missing = [n for n, p in (("smtp-source", loadgen.smtp_source_path()),
                              ("smtp-sink", smtp_sink_path())) if p is None]
    if missing:
        print(f"{' and '.join(missing)} not installed (Debian postfix)", file=sys.stderr)
        return 2
    counts = [int(w) for w in args.workers.split(",")]
    samples: dict[int, list[dict[str, float]]] = {w: [] for w in counts}
    try:
        for rep in range(args.repeat):
            for w in counts[rep % len(counts):] + counts[: rep % len(counts)]:
                sample = measure(w, args)
                samples[w].append(sample)
                print(f"[{rep + 1}/{args.repeat}] --workers {w}: "
                      f"{sample['accepted_per_s']:.0f} accepted/s, "
                      f"{sample['relayed_per_s']:.0f} relayed/s, residence median "
                      f"{sample['residence_median_ms']:.0f} ms, peak queue "
                      f"{sample['peak_queue']:.0f}, {sample['cpu_us_per_msg']:.0f} us "
                      f"CPU/msg", file=sys.stderr)
    except RuntimeError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(f"smtp-source -s {args.sessions} -m {args.messages} -l {args.size} -d -> "
          f"twistd maitred --delivery queue --relay-host --destination-concurrency "
          f"{args.destination_concurrency} -> smtp-sink; "
          f"{os.cpu_count()} cores; median (min-max) of {args.repeat}\n")
    print("| --workers | accepted msgs/s | relayed end to end msgs/s | queue residence "
          "median ms | residence max ms | longest queue | relay CPU µs/msg |")
    print("|---|---|---|---|---|---|---|")
    for w in counts:
        column = {k: [s[k] for s in samples[w]] for k in samples[w][0]}
        print(f"| {w} | {_range(column['accepted_per_s'])} | "
              f"{_range(column['relayed_per_s'])} | "
              f"{_range(column['residence_median_ms'])} | "
              f"{_range(column['residence_max_ms'])} | {_range(column['peak_queue'])} | "
              f"{_range(column['cpu_us_per_msg'])} |")
    probes = [s["probes"] for w in counts for s in samples[w]]
    print(f"\nprobes per run: {min(probes):.0f}-{max(probes):.0f} (one every "
          f"{PROBE_INTERVAL * 1000:.0f} ms while smtp-source runs; counted as relayed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
