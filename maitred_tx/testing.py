"""Helpers for testing code that plugs into maitred_tx — yours and ours.

``FakeConnection`` runs one SMTP session against your delivery with no sockets and no
global reactor: bytes go in through the real protocol, replies come back parsed, and
timers run on a ``twisted.internet.task.Clock``::

    conn = FakeConnection(MyDelivery(), Config(local_domains=frozenset({"example.com"})))
    assert conn.send(b"EHLO client.test\\r\\n")[-1].code == 250
    replies = conn.send(b"MAIL FROM:<a@b.org>\\r\\nRCPT TO:<x@example.com>\\r\\n")
    assert [(r.code, r.status) for r in replies] == [(250, "2.1.0"), (250, "2.1.5")]
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from maitred_tx.server.factory import SMTPFactory
from maitred_tx.server.protocol import SMTPServerProtocol
from maitred_tx.smtp.config import Config

__all__ = ["FakeConnection", "ReplyLine", "TestTransport", "parse_replies", "pieces"]

_LINE: Final = re.compile(rb"^(\d{3})([ -])(?:([245]\.\d{1,3}\.\d{1,3}) )?(.*)$")


@dataclass(frozen=True, slots=True)
class ReplyLine:
    """One complete reply as a client sees it: the enhanced code is None when absent."""

    code: int
    status: str | None
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.lines[-1]


def parse_replies(data: bytes) -> list[ReplyLine]:
    """Parse complete replies; raises ValueError on anything that is not one."""
    if data and not data.endswith(b"\r\n"):
        raise ValueError(f"incomplete reply data: {data[-80:]!r}")
    replies, lines = [], []
    for raw in data.split(b"\r\n")[:-1]:
        m = _LINE.match(raw)
        if m is None:
            raise ValueError(f"not a reply line: {raw!r}")
        lines.append(m.group(4).decode("utf-8", "replace"))
        if m.group(2) == b" ":
            status = m.group(3).decode() if m.group(3) else None
            replies.append(ReplyLine(int(m.group(1)), status, tuple(lines)))
            lines = []
    return replies


def pieces(data: bytes, mode: str) -> Iterator[bytes]:
    """*data* whole, line by line, or byte by byte: one transcript, three chunkings."""
    if mode == "whole":
        yield data
    elif mode == "lines":
        yield from data.splitlines(keepends=True)
    elif mode == "bytes":
        for i in range(len(data)):
            yield data[i : i + 1]
    else:
        raise ValueError(f"unknown mode {mode!r}")


class TestTransport(StringTransportWithDisconnection):
    """A StringTransport that also counts writes and records TCP_NODELAY."""

    __test__ = False  # not a pytest test class

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.writes: list[bytes] = []
        self.nodelay: bool | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


class FakeConnection:
    """One session through the real protocol, factory and delivery, without sockets."""

    def __init__(
        self,
        delivery: Any = None,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        factory: SMTPFactory | None = None,
        peer: tuple[str, int] = ("192.0.2.7", 40000),
    ) -> None:
        self.clock = clock or Clock()
        self.factory = factory or SMTPFactory(self.clock, config or Config(), delivery)
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
        self.protocol: SMTPServerProtocol = protocol
        self.transport = TestTransport(IPv4Address("TCP", *peer))
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        self._seen = 0

    def send(self, data: bytes, mode: str = "whole") -> list[ReplyLine]:
        """Feed *data* (whole, by lines or by bytes); return the replies it produced."""
        self._feed(data, mode)
        return self._take()

    def replies(self) -> list[ReplyLine]:
        """The complete replies written since the last call."""
        return self._take()

    def codes(self, data: bytes, mode: str = "whole") -> list[tuple[int, str | None]]:
        """Like send(), as (code, enhanced status) pairs."""
        self._feed(data, mode)
        return [(r.code, r.status) for r in self._take()]

    def _feed(self, data: bytes, mode: str) -> None:
        for piece in pieces(data, mode):
            self.protocol.dataReceived(piece)

    def _take(self) -> list[ReplyLine]:
        out = self.transport.value()
        new, self._seen = out[self._seen :], len(out)
        return parse_replies(new)

    @property
    def connected(self) -> bool:
        return bool(self.transport.connected)

    @property
    def reading(self) -> bool:
        """False while the server has paused reading (a decision or a sink is pending)."""
        return self.transport.producerState != "paused"
