"""Starting, watching and stopping the servers under test, each in its own process.

Each server listens on 127.0.0.1 only.  The process started is the one that serves (no
shell, no wrapper), so /proc/PID/stat's utime+stime is the server's CPU time and
/proc/PID/status's VmRSS/VmHWM its memory.  maitred_tx runs through its twistd plugin
(``twistd -n maitred ...``, the twistd process serves); the peers are the small scripts
in ``servers/`` that print READY and report their message count at SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import loadgen

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
SERVERS_DIR = BENCH_DIR / "servers"
MAX_SIZE = 64 * 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Run twistd from this very interpreter so that the PID we watch is the server itself.
TWISTD_BOOT = (
    f"import sys; sys.path.insert(0, {str(SERVERS_DIR)!r}); sys.argv[0] = 'twistd'; "
    "from twisted.scripts.twistd import run; run()"
)


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to start one server under test."""

    name: str
    description: str
    argv: Callable[[int, Path], list[str]]
    prints_ready: bool
    is_maitred: bool = False
    maildir: bool = False
    # TXT records for a dnsmasq on a free UDP port of 127.0.0.1, started and stopped
    # with the server; "{dnsport}" in argv becomes its port (maitred's auth checks).
    dns: tuple[tuple[str, str], ...] = ()
    dns_ttl: int = 0
    # A zone dnsmasq serves authoritatively: a name in it without records gets NXDOMAIN
    # with the zone's SOA (TTL 1 h), as a recursive resolver passes a real zone's on
    # (RFC 2308 3).  Names outside every zone are REFUSED (no upstream servers).
    dns_zone: str | None = None


def _script(name: str) -> Callable[[int, Path], list[str]]:
    def argv(port: int, workdir: Path) -> list[str]:
        script = str(SERVERS_DIR / name)
        stats = str(workdir / "stats.json")
        return [sys.executable, script, "--port", str(port), "--stats", stats]

    return argv


# twistd's default log observer writes every event as a line of text to stdout (the
# peers log nothing per message).  This factory is a LogPublisher with no observers:
# maitred_tx still builds and emits its events, and nothing formats or writes them.
NULL_LOGGER = "--logger=twisted.logger.LogPublisher"
# The SPF and DMARC records of the load generator's sender, From: and HELO domain,
# loadgen.localhost (loadgen.py): SPF passes for 127.0.0.1 (HELO and MAIL FROM), and
# DMARC passes on it (p=none), a full evaluation of both.  Any other name is REFUSED.
AUTH_ZONE = (
    ("loadgen.localhost", "v=spf1 ip4:127.0.0.1 -all"),
    ("_dmarc.loadgen.localhost", "v=DMARC1; p=none"),
)
NO_CHECKS = "--no-auth-checks"  # the SMTP path alone: the peers check nothing either


def _maitred(*delivery: str, twistd: tuple[str, ...] = ()) -> Callable[[int, Path], list[str]]:
    def argv(port: int, workdir: Path) -> list[str]:
        extra = [a.replace("{workdir}", str(workdir)) for a in delivery]
        return [
            sys.executable,
            "-c",
            TWISTD_BOOT,
            "-n",
            "--pidfile=",
            *twistd,
            "maitred",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
            "--max-size",
            str(MAX_SIZE),
            "--domain",
            "localhost",
            "--hostname",
            "localhost",
            # The load comes from one address: the per-client limit (default 50
            # sessions) would refuse scenario (d)'s 2000 idle connections.
            "--max-client-connections",
            "0",
        ]

    return argv


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            "aiosmtpd",
            "aiosmtpd SMTP(handler) counting bytes, discarding",
            _script("aiosmtpd_server.py"),
            prints_ready=True,
        ),
        ServerSpec(
            "twisted-mail",
            "twisted.mail.smtp ESMTP + accept-all IMessageDelivery, discarding",
            _script("twisted_mail_server.py"),
            prints_ready=True,
        ),
        ServerSpec(
            "twisted-floor",
            "reference, not a peer: a Twisted protocol that parses only verbs and the end "
            "of data (the least a Twisted server spends)",
            _script("twisted_floor_server.py"),
            prints_ready=True,
        ),
        ServerSpec(
            "twisted-fused",
            "reference, not a peer: maitred_tx's hot-path checks fused into one Twisted "
            "protocol, without an application interface or logging (what the SMTP work "
            "costs at least)",
            _script("twisted_fused_server.py"),
            prints_ready=True,
        ),
        ServerSpec(
            "maitred",
            "maitred_tx via twistd, --delivery discard",
            _maitred("--delivery", "discard", NO_CHECKS),
            prints_ready=False,
            is_maitred=True,
        ),
        ServerSpec(
            "maitred-nolog",
            "maitred_tx via twistd, --delivery discard, log events dropped",
            _maitred("--delivery", "discard", NO_CHECKS, twistd=(NULL_LOGGER,)),
            prints_ready=False,
            is_maitred=True,
        ),
        ServerSpec(
            "maitred-metrics",
            "maitred-nolog with --metrics: every counter counts (the endpoint listens on "
            "a UNIX socket and is not scraped while measured)",
            _maitred("--delivery", "discard", NO_CHECKS, "--metrics",
                     "unix:{workdir}/metrics.sock", twistd=(NULL_LOGGER,)),
            prints_ready=False,
            is_maitred=True,
        ),
        ServerSpec(
            "maitred-maildir",
            "maitred_tx via twistd, --delivery maildir",
            _maitred("--delivery", "maildir", "--maildir", "{workdir}/Maildir", NO_CHECKS),
            prints_ready=False,
            is_maitred=True,
            maildir=True,
        ),
        ServerSpec(
            "maitred-hop",
            "maitred_tx, checks off, every message answered from a thread-pool thread "
            "(servers/hop_delivery.py): the yardstick for the checks' reactor-thread cost",
            _maitred("--delivery", "python:hop_delivery.HopDelivery", NO_CHECKS),
            prints_ready=False,
            is_maitred=True,
        ),
        ServerSpec(
            "maitred-auth",
            "maitred_tx, --delivery discard, SPF/DKIM/ARC/DMARC checks against a local "
            "dnsmasq, answers cached (TTL 1 h)",
            _maitred("--delivery", "discard", "--dns-server", "127.0.0.1:{dnsport}"),
            prints_ready=False,
            is_maitred=True,
            dns=AUTH_ZONE,
            dns_ttl=3600,
        ),
        ServerSpec(
            "maitred-checks",
            "maitred_tx with its default checks on, --delivery discard; the sender's "
            "domain has no records (dnsmasq answers NXDOMAIN), as most senders' "
            "domains in a load test and many in real traffic",
            _maitred("--delivery", "discard", "--dns-server", "127.0.0.1:{dnsport}"),
            prints_ready=False,
            is_maitred=True,
            dns_zone="localhost",
        ),
        ServerSpec(
            "maitred-auth-nocache",
            "maitred-auth with TTL 0: every lookup goes to dnsmasq over UDP",
            _maitred("--delivery", "discard", "--dns-server", "127.0.0.1:{dnsport}"),
            prints_ready=False,
            is_maitred=True,
            dns=AUTH_ZONE,
        ),
    )
}
PEERS = ("aiosmtpd", "twisted-mail")
# Measured for comparison, judged by no target: see servers/twisted_floor_server.py and
# servers/twisted_fused_server.py.  The floor comes first (report.floor_lines).
REFERENCES = ("twisted-floor", "twisted-fused")


def child_env() -> dict[str, str]:
    """The environment for servers: the repository on PYTHONPATH (for maitred_tx)."""
    env = dict(os.environ)
    paths = [str(REPO_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def maitred_unavailable(workdir: Path) -> str | None:
    """Why maitred_tx cannot be benchmarked here, or None if it can."""
    env = child_env()
    probe = subprocess.run(
        [sys.executable, "-c", "import maitred_tx"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        return f"`import maitred_tx` fails: {probe.stderr.strip().splitlines()[-1:]}"
    helped = subprocess.run(
        [sys.executable, "-c", TWISTD_BOOT, "--help"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if not re.search(r"^\s+maitred\b", helped.stdout, re.MULTILINE):
        return "the twistd plugin `maitred` is missing (`twistd --help` does not list it)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_udp_port() -> int:
    """A port free for UDP *and* TCP on 127.0.0.1: dnsmasq binds both, and after (e)
    many TCP ports are in TIME_WAIT while their UDP twins look free."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                    tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServerError("no port free for both UDP and TCP on 127.0.0.1")


def start_dnsmasq(port: int, records: tuple[tuple[str, str], ...], ttl: int,
                  zone: str | None = None) -> subprocess.Popen[bytes]:
    """dnsmasq (Debian dnsmasq-base) answering *records* on 127.0.0.1:*port*."""
    program = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not os.path.exists(program):
        raise ServerError("dnsmasq is not installed (Debian dnsmasq-base)")
    argv = [program, "--no-daemon", "--keep-in-foreground", f"--port={port}",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", "--pid-file=", "--user=", f"--local-ttl={ttl}",
            *(f"--txt-record={name},{text}" for name, text in records),
            *(() if zone is None else (
                f"--auth-server=ns.{zone},127.0.0.1", f"--auth-zone={zone}", "--auth-ttl=3600",
                f"--auth-soa=1,hostmaster.{zone},1200,120,604800"))]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(0.2)  # binds at once; the server's first lookups come much later
    if proc.poll() is not None:
        raise ServerError(f"dnsmasq exited with {proc.returncode}")
    return proc


def _stat_cpu_seconds(stat: Path) -> float:
    """utime + stime from a /proc stat file, in seconds."""
    raw = stat.read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class ServerError(Exception):
    """A server did not start, or died while being measured."""


class RunningServer:
    """One started server process and what /proc says about it."""

    def __init__(self, spec: ServerSpec, workdir: Path) -> None:
        self.spec = spec
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "server.log"
        self.extensions: dict[str, str] = {}
        if spec.maildir:
            (workdir / "Maildir").mkdir()
        self.dns: subprocess.Popen[bytes] | None = None
        argv = spec.argv(self.port, workdir)
        if spec.dns or spec.dns_zone:
            for attempt in range(5):  # a port can still be taken between check and bind
                dns_port = free_udp_port()
                try:
                    self.dns = start_dnsmasq(dns_port, spec.dns, spec.dns_ttl, spec.dns_zone)
                    break
                except ServerError:
                    if attempt == 4:
                        raise
            argv = [a.replace("{dnsport}", str(dns_port)) for a in argv]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=child_env(),
            )
        self.pid = self.proc.pid

    # ------------------------------------------------------------------ lifecycle

    def wait_ready(self, timeout: float) -> None:
        """Wait for READY (peers) and then for a greeting + EHLO on the port (all)."""
        deadline = time.monotonic() + timeout
        while self.spec.prints_ready and b"READY" not in self.log_path.read_bytes():
            self._check_alive()
            if time.monotonic() >= deadline:
                raise ServerError(f"{self.spec.name}: no READY within {timeout:.0f}s")
            time.sleep(0.02)
        while True:
            self._check_alive()
            try:
                self.extensions = asyncio.run(self._probe(deadline))
                return
            except (OSError, loadgen.SMTPReplyError, TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise ServerError(f"{self.spec.name}: not answering: {exc}") from exc
                time.sleep(0.05)

    async def _probe(self, deadline: float) -> dict[str, str]:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
            session = await loadgen.Session.open(loadgen.HOST, self.port)
            await session.quit()
            return session.extensions

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ServerError(
                f"{self.spec.name} exited with {self.proc.returncode}: {self.log_tail()}"
            )

    def log_tail(self, chars: int = 600) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.dns is not None and self.dns.poll() is None:
            self.dns.terminate()
            self.dns.wait(timeout)

    def message_count(self) -> int | None:
        """Messages the server says it received (peers' stats, maildir files) or None."""
        stats = self.workdir / "stats.json"
        if stats.exists():
            count: int = json.loads(stats.read_text())["messages"]
            return count
        if self.spec.maildir:
            root = self.workdir / "Maildir"
            return sum(
                1 for p in root.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")
            )
        return None

    # ------------------------------------------------------------------ /proc

    def cpu_seconds(self) -> float:
        """utime + stime of the server process (all its threads), in seconds."""
        return _stat_cpu_seconds(Path(f"/proc/{self.pid}/stat"))

    def main_thread_cpu_seconds(self) -> float:
        """utime + stime of the server's main thread alone (its TID is the PID): the
        event loop's thread, so the work other threads (maitred's checks) take off it
        shows as the difference from ``cpu_seconds``."""
        return _stat_cpu_seconds(Path(f"/proc/{self.pid}/task/{self.pid}/stat"))

    def status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise ServerError(f"no {key} in /proc/{self.pid}/status")

    def rss_kib(self) -> int:
        return self.status_kib("VmRSS")

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0, needs to own the process)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True
