"""_write: replies go straight to a plain TCP socket with nothing queued, and Twisted's
queue takes whatever the socket does not (partial sends, errors, TLS, a backlog)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import main, tcp

from maitred_tx.server.protocol_base import _write


class _Transport:
    """Records what would have gone to the socket and to Twisted's write queue."""

    def __init__(self, accept: Any) -> None:
        self.server: Any = tcp.Server.__new__(tcp.Server)  # no socket, no reactor
        self.sent: list[bytes] = []
        self.queued: list[bytes] = []
        s = self.server
        s.TLS, s.connected, s.disconnecting, s._writeDisconnected = False, 1, False, False
        s.dataBuffer, s._tempDataLen = b"", 0

        def write_some(data: bytes) -> Any:
            n = accept(data)
            if isinstance(n, int) and n > 0:
                self.sent.append(bytes(data[:n]))
            return n

        s.writeSomeData = write_some
        s.write = self.queued.append


def test_sent_at_once() -> None:
    t = _Transport(len)
    _write(t.server, b"250 ok\r\n")
    assert (t.sent, t.queued) == ([b"250 ok\r\n"], [])


@pytest.mark.parametrize(("accept", "queued"), [
    (lambda d: 3, b" ok\r\n"),  # partial send: the rest is queued, in order
    (lambda d: 0, b"250 ok\r\n"),  # EWOULDBLOCK
    (lambda d: main.CONNECTION_LOST, b"250 ok\r\n"),  # the reactor reports the loss
])
def test_the_rest_is_queued(accept: Any, queued: bytes) -> None:
    t = _Transport(accept)
    _write(t.server, b"250 ok\r\n")
    assert t.queued == [queued]
    assert b"".join(t.sent) + queued == b"250 ok\r\n"


@pytest.mark.parametrize("attribute", [
    ("TLS", True), ("connected", 0), ("disconnecting", True), ("_writeDisconnected", True),
    ("dataBuffer", b"earlier"), ("_tempDataLen", 7),
])
def test_queued_when_not_plain_and_idle(attribute: tuple[str, Any]) -> None:
    t = _Transport(len)
    setattr(t.server, *attribute)
    _write(t.server, b"250 ok\r\n")
    assert (t.sent, t.queued) == ([], [b"250 ok\r\n"])


def test_other_transports_use_write() -> None:
    written: list[bytes] = []

    class Other:
        write = staticmethod(written.append)

    _write(Other(), b"250 ok\r\n")
    assert written == [b"250 ok\r\n"]


@pytest.mark.parametrize("missing", ["TLS", "_writeDisconnected", "dataBuffer", "_tempDataLen"])
def test_a_twisted_without_one_of_the_internals_falls_back(
    missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if a Twisted upgrade renamed it: queued, never an AttributeError."""
    t = _Transport(len)
    delattr(t.server, missing)
    for cls in type(t.server).__mro__:
        if missing in vars(cls):  # a class default too (restored after the test)
            monkeypatch.delattr(cls, missing)
    assert not hasattr(t.server, missing)
    _write(t.server, b"250 ok\r\n")
    assert (t.sent, t.queued) == ([], [b"250 ok\r\n"])
