"""A real DNS server for tests: dnsmasq on 127.0.0.1 with a chosen set of records.

``run_dnsmasq(directory, records)`` starts it (``--no-daemon``, no upstream, every
configured name authoritative under ``local``), waits until it logs that it started, and
stops it afterwards; ``Dnsmasq`` tells its port, counts the queries it has logged and
makes ``TwistedResolver``s that ask it.  Used by tests/auth/test_dns.py and
tests/mta_sts/.  Records are dnsmasq options, e.g. ``--txt-record=NAME,TEXT`` (on the
command line dnsmasq takes TXT strings comma-separated, quotes literal).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from twisted.internet import reactor

from maitred_tx.auth.dns import TwistedResolver
from maitred_tx.auth.resolver import NXDomain

DNSMASQ = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
TTL = 300  # --local-ttl: the TTL dnsmasq gives its configured records

needs_dnsmasq = pytest.mark.skipif(
    DNSMASQ is None, reason="dnsmasq not installed (apt-get install dnsmasq-base)"
)


@dataclass
class Dnsmasq:
    port: int
    log: Path
    syncs: int = 0

    def queries(self, rtype: str, name: str) -> int:
        """How many times dnsmasq has been asked (its --log-queries lines)."""
        needle = f"query[{rtype}] {name} from"
        return self.log.read_text().count(needle) if self.log.exists() else 0

    async def count(self, rtype: str, name: str) -> int:
        """Queries seen so far.  dnsmasq writes its log from its event loop, in order: a
        fresh query for a unique name, once logged, means every earlier one is too."""
        self.syncs += 1
        sentinel = f"sync{self.syncs}.example.test"
        with pytest.raises(NXDomain):
            await self.resolver(cache_size=0).lookup(sentinel, "A")
        deadline = time.monotonic() + 5
        while not self.queries("A", sentinel) and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.queries(rtype, name)

    def resolver(self, **kw: object) -> TwistedResolver:
        return TwistedResolver(reactor, [("127.0.0.1", self.port)], **kw)  # type: ignore[arg-type]


def free_udp_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (dnsmasq listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port free for both UDP and TCP")


def run_dnsmasq(
    directory: Path,
    records: Sequence[str],
    *,
    local: Sequence[str] = ("example.test",),
    ttl: int = TTL,
) -> Iterator[Dnsmasq]:
    """Run dnsmasq answering ``records`` (dnsmasq options) for the duration of the
    generator (use it with ``yield from`` in a fixture); skip the test when dnsmasq is
    not installed, fail it when dnsmasq does not start within 10 s."""
    if DNSMASQ is None:
        pytest.skip("dnsmasq not installed (apt-get install dnsmasq-base)")
    for attempt in range(3):  # another process may take the port before dnsmasq does
        log = directory / f"queries{attempt}.log"
        started = _start(log, free_udp_port(), records, local, ttl)
        if started is not None:
            break
    else:
        pytest.fail("dnsmasq did not start: its port was taken three times")
    proc, server = started
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(
    log: Path, port: int, records: Sequence[str], local: Sequence[str], ttl: int
) -> tuple[subprocess.Popen[bytes], Dnsmasq] | None:
    """Start dnsmasq; None when its port was taken meanwhile."""
    assert DNSMASQ is not None
    args = [
        DNSMASQ,
        "--no-daemon",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        *(f"--local=/{domain}/" for domain in local),
        f"--local-ttl={ttl}",
        "--log-queries",
        f"--log-facility={log}",
        f"--user={pwd.getpwuid(os.getuid()).pw_name}",
        "--pid-file=",
        *records,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (log.exists() and "started" in log.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            message = err.decode(errors="replace")
            if "Address already in use" in message:
                return None
            pytest.fail(f"dnsmasq did not start: {message}")
        time.sleep(0.02)
    return proc, Dnsmasq(port, log)
