"""The listen queue (issue 13): a production default instead of Twisted's 50, and the
endpoint string's own ``backlog=`` honoured.

The burst tests stop the server process (SIGSTOP) so that nothing is accepted, open
many connections at once, and count the handshakes the kernel completes: those fit in
the listen queue; the others' SYNs are dropped and would wait a second to be retried.
"""

from __future__ import annotations

import select
import signal
import socket
import time

import pytest
from maitred_interop import LOCALHOST, Client, free_port

from maitred_tx.service import DEFAULT_BACKLOG, default_backlog, with_backlog

BURST = 300


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1:backlog=N"),
        ("tcp:2525", "tcp:2525:backlog=N"),
        ("tcp:2525:backlog=7", "tcp:2525:backlog=7"),
        ("tcp:2525:BACKLOG=7", "tcp:2525:BACKLOG=7"),
        ("tcp:2525:127.0.0.1:20", "tcp:2525:127.0.0.1:20"),  # port, interface, backlog
        ("tcp:2525:127.0.0.1", "tcp:2525:127.0.0.1:backlog=N"),
        ("tcp6:25:9", "tcp6:25:9"),  # tcp6 takes port, backlog, interface
        ("tcp6:25", "tcp6:25:backlog=N"),
        ("tcp:25:interface=\\:\\:1", "tcp:25:interface=\\:\\:1:backlog=N"),
        ("ssl:465:privateKey=k.pem", "ssl:465:privateKey=k.pem:backlog=N"),
        ("ssl:465:k.pem:c.pem:m:i:9", "ssl:465:k.pem:c.pem:m:i:9"),
        ("unix:/run/lmtp.sock", "unix:/run/lmtp.sock:backlog=N"),
        ("unix:/run/lmtp.sock:600:9", "unix:/run/lmtp.sock:600:9"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # adopted: as is
    ],
)
def test_with_backlog(description: str, expected: str) -> None:
    assert with_backlog(description, 999) == expected.replace("=N", "=999")


def test_default_is_the_system_maximum_and_at_least_1024() -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    assert default_backlog() == max(DEFAULT_BACKLOG, somaxconn) >= 1024


def handshakes_while_stopped(pid: int, port: int, count: int) -> int:
    """Open *count* connections to a stopped server at once; how many complete their
    handshake within half a second (those the listen queue holds)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((LOCALHOST, port))
            socks.append(s)
        pending = set(socks)
        deadline = time.monotonic() + 0.5
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.05)
            pending -= set(writable)
        return sum(
            1 for s in socks if s not in pending and not s.getsockopt(
                socket.SOL_SOCKET, socket.SO_ERROR)
        )
    finally:
        for s in socks:
            s.close()


def greeted(port: int, timeout: float = 10.0) -> bool:
    """The server greets a new client with 220 once the burst has drained (until
    then the burst's connections may still count against --max-client-connections)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Client(port) as c:
            if c.reply().code == 220:
                return True
        time.sleep(0.1)
    return False


def burst(twistd, listen: str = "") -> tuple[int, bool]:
    """(handshakes completed while stopped, served afterwards) on the port that
    twistd fixture listens on by default, or on *listen* ("tcp:PORT:...")."""
    args = ("--listen", listen) if listen else ()
    with twistd("--delivery", "discard", *args) as server:
        port = int(listen.split(":")[1]) if listen else server.port
        server.process.send_signal(signal.SIGSTOP)
        try:
            done = handshakes_while_stopped(server.process.pid, port, BURST)
        finally:
            server.process.send_signal(signal.SIGCONT)
        return done, greeted(port)


def test_a_burst_of_connections_fits_the_default_listen_queue(twistd):
    done, served = burst(twistd)
    assert done == BURST and served


def test_the_endpoint_strings_backlog_is_honoured(twistd):
    # Linux holds backlog + 1 completed connections.
    done, served = burst(twistd, f"tcp:{free_port()}:interface={LOCALHOST}:backlog=20")
    assert 20 <= done <= 22 and served
