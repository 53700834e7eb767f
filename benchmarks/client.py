"""Client benchmark: 1,000 messages of 1 KiB over one connection to a sink on loopback,
sent by maitred_tx.client, by Twisted's twisted.mail.smtp.ESMTPSender and by
aiosmtplib (when importable), in the same run.

Each client runs in its own subprocess (``--worker NAME``) so that its CPU time
(``resource.getrusage``: user + system, from connect to QUIT) is its own; the sink is
Postfix's ``smtp-sink`` (C, PIPELINING and 8BITMIME, no CHUNKING) or, with
``--server maitred`` or when smtp-sink is missing, ``twistd maitred --delivery
discard`` (which offers CHUNKING, so maitred_tx.client sends BDAT).  The clients run
in turns, ``--repeat`` times, and the table shows medians: messages per second and
client CPU microseconds per message, with ratios against ESMTPSender.

Every run is bounded: a worker that takes longer than --timeout seconds is killed and
the benchmark fails; a client whose messages were not all accepted fails it too.

    python benchmarks/client.py                 # 1000 messages x 3 repetitions
    python benchmarks/client.py --quick         # 20 messages, once (the smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SENDER, RECIPIENT = "bench@client.test", "sink@localhost"
CLIENTS = ("maitred_tx", "twisted.mail", "aiosmtplib")


def message(size: int, newline: bytes = b"\r\n") -> bytes:
    """A text message of exactly *size* octets with *newline* line ends."""
    head = newline.join([b"From: " + SENDER.encode(), b"To: " + RECIPIENT.encode(),
                         b"Subject: benchmark", b"", b""])
    line = b"x" * 70 + newline
    body = head + line * ((size - len(head)) // len(line))
    return body + b"y" * (size - len(body) - len(newline)) + newline


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- workers: each sends N messages over one connection and prints one JSON line ----
def worker_twisted(port: int, count: int, size: int) -> tuple[int, float, float]:
    from twisted.internet import defer, protocol, reactor
    from twisted.mail import smtp

    # ESMTPSender converts "\n" to CRLF itself (transformChunk): give it LF lines.
    data = message(size, b"\n")
    done: defer.Deferred[int] = defer.Deferred()

    class Many(smtp.ESMTPSender):
        """ESMTPSender sending *count* messages over its one connection."""

        requireAuthentication = False
        requireTransportSecurity = False

        def __init__(self) -> None:
            super().__init__(None, None, None, identity="bench.test")
            self.remaining, self.ok = count, 0

        def getMailFrom(self) -> str | None:
            if self.remaining <= 0:
                return None
            self.remaining -= 1
            return SENDER

        def getMailTo(self) -> list[str]:
            return [RECIPIENT]

        def getMailData(self) -> io.BytesIO:
            return io.BytesIO(data)

        def sentMail(self, code, resp, numOk, addresses, log) -> None:
            self.ok += int(code) == 250 and numOk == 1

        def sendError(self, exc: Exception) -> None:
            if not done.called:
                done.errback(exc)
            self.transport.loseConnection()

        def connectionLost(self, reason: object = None) -> None:
            super().connectionLost(reason)
            if not done.called:
                done.callback(self.ok)

    result: list[tuple[int, float, float]] = []
    cpu, start = _cpu(), time.perf_counter()

    def finished(ok: int) -> None:
        result.append((ok, time.perf_counter() - start, _cpu() - cpu))
        reactor.stop()

    done.addCallbacks(finished, lambda f: (print(f, file=sys.stderr), reactor.stop()))
    factory = protocol.ClientFactory.forProtocol(Many)
    reactor.connectTCP("127.0.0.1", port, factory)
    reactor.run()
    if not result:
        raise SystemExit("twisted.mail worker failed")
    return result[0]


def worker_aiosmtplib(port: int, count: int, size: int) -> tuple[int, float, float]:
    import aiosmtplib

    data = message(size)

    async def run() -> tuple[int, float, float]:
        cpu, start = _cpu(), time.perf_counter()
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=False,
                                 start_tls=False, local_hostname="bench.test")
        await client.connect()
        ok = 0
        for _ in range(count):
            refused, _response = await client.sendmail(SENDER, [RECIPIENT], data)
            ok += not refused
        await client.quit()
        return ok, time.perf_counter() - start, _cpu() - cpu

    return asyncio.run(run())


def worker_maitred(port: int, count: int, size: int) -> tuple[int, float, float]:
    from twisted.internet import defer, reactor

    from maitred_tx.client import SMTPClient, TLSMode

    data = message(size)
    out: list[tuple[int, float, float]] = []

    async def run() -> None:
        cpu, start = _cpu(), time.perf_counter()
        client = await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{port}",
                                          tls=TLSMode.NONE, helo="bench.test")
        ok = 0
        for _ in range(count):
            result = await client.send(SENDER, [RECIPIENT], data)
            ok += result.all_delivered
        await client.quit()
        out.append((ok, time.perf_counter() - start, _cpu() - cpu))

    d = defer.Deferred.fromCoroutine(run())
    d.addErrback(lambda f: print(f.getTraceback(), file=sys.stderr))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    if not out:
        raise SystemExit("maitred_tx worker failed")
    return out[0]


WORKERS = {"maitred_tx": worker_maitred, "twisted.mail": worker_twisted,
           "aiosmtplib": worker_aiosmtplib}


def run_worker(name: str, port: int, count: int, size: int) -> None:
    """Worker entry point: run one client, print its figures as one JSON line."""
    ok, elapsed, cpu = WORKERS[name](port, count, size)
    print(json.dumps({"client": name, "ok": ok, "elapsed": elapsed, "cpu": cpu}), flush=True)


# --- the driver ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the sink exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


@contextlib.contextmanager
def sink(kind: str, workdir: Path) -> Iterator[tuple[int, str]]:
    """A sink server on 127.0.0.1: yields (port, description); always stopped."""
    port = free_port()
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if kind == "smtp-sink" and Path(binary).exists():
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        argv = [binary, *user, f"127.0.0.1:{port}", "1000"]
        description = "Postfix smtp-sink (PIPELINING, 8BITMIME; DATA)"
    else:
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logger=twisted.logger.LogPublisher", "maitred",
                "--delivery", "discard",
                "--no-auth-checks", "--listen", f"tcp:{port}:interface=127.0.0.1"]
        description = "twistd maitred --delivery discard (PIPELINING, CHUNKING; BDAT)"
    process = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield port, description
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def measure(name: str, port: int, count: int, size: int, timeout: float) -> dict[str, float]:
    """Run one worker subprocess; its figures."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
            "--port", str(port), "--messages", str(count), "--size", str(size)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{name}: no result within {timeout}s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    figures = json.loads(lines[-1])
    if figures["ok"] != count:
        raise SystemExit(f"{name}: only {figures['ok']} of {count} messages accepted")
    return figures


def available() -> list[str]:
    names = ["maitred_tx", "twisted.mail"]
    try:
        import aiosmtplib  # noqa: F401
    except ImportError:
        print("aiosmtplib is not installed: skipped", file=sys.stderr)
    else:
        names.append("aiosmtplib")
    return names


def table(results: dict[str, list[dict[str, float]]], count: int) -> str:
    rows = []
    medians = {}
    for name, runs in results.items():
        rate = statistics.median(count / r["elapsed"] for r in runs)
        cpu = statistics.median(r["cpu"] / count * 1e6 for r in runs)
        medians[name] = (rate, cpu)
    base = medians.get("twisted.mail")
    header = (f"{'client':<14} {'msgs/s':>9} {'CPU us/msg':>11} "
              f"{'msgs/s vs ESMTPSender':>22} {'CPU vs ESMTPSender':>19}")
    rows.append(header)
    rows.append("-" * len(header))
    for name, (rate, cpu) in medians.items():
        ratio_rate = f"{rate / base[0]:.2f}x" if base else "-"
        ratio_cpu = f"{cpu / base[1]:.2f}x" if base else "-"
        rows.append(f"{name:<14} {rate:>9.0f} {cpu:>11.0f} {ratio_rate:>22} {ratio_cpu:>19}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--server", choices=["smtp-sink", "maitred"], default="smtp-sink")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--quick", action="store_true", help="20 messages, once")
    parser.add_argument("--worker", choices=CLIENTS)
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.port, args.messages, args.size)
        return
    if args.quick:
        args.messages, args.repeat, args.timeout = 20, 1, 60.0
    names = available()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    with sink(args.server, workdir) as (port, description):
        print(f"sink: {description}; {args.messages} messages of {args.size} octets, "
              f"one connection per client, {args.repeat} repetition(s)")
        for _ in range(args.repeat):
            for name in names:
                results[name].append(measure(name, port, args.messages, args.size,
                                             args.timeout))
    print(table(results, args.messages))


if __name__ == "__main__":
    main()
