"""The Twisted glue without sockets: a StringTransport for the wire and a task.Clock
for time.  Timeouts per RFC 5321 4.5.3.2 phase, back-pressure (the body is read no
further while the transport is full), unsolicited replies, TCP_NODELAY."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from maitred_tx.client import (
    ConnectionLost,
    InvalidBody,
    Outcome,
    ProtocolViolation,
    ResponseTimeout,
    SMTPClient,
    TLSMode,
)
from maitred_tx.client.protocol import ClientProtocol
from maitred_tx.client.session import ClientSession
from maitred_tx.client.source import BodySource
from maitred_tx.client.timeouts import Timeouts
from maitred_tx.testing import TestTransport

EHLO = b"250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"


class Transport(TestTransport):
    __test__ = False

    def abortConnection(self) -> None:
        if self.connected:
            self.connected = False
            self.protocol.connectionLost(Failure(ConnectionAborted()))


class Wire:
    """A client on a fake transport; ``server()`` feeds its replies."""

    def __init__(self, timeouts: Timeouts | None = None, chunk_size: int = 65536) -> None:
        self.clock = Clock()
        session = ClientSession(host="mx.test", helo="client.test")
        self.protocol = ClientProtocol(session, self.clock, timeouts or Timeouts())
        self.transport = Transport(IPv4Address("TCP", "192.0.2.1", 25))
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.client = SMTPClient(self.protocol, chunk_size=chunk_size)
        self._seen = 0

    def server(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def written(self) -> bytes:
        value = self.transport.value()
        new, self._seen = value[self._seen :], len(value)
        return new

    def open(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.client._open(TLSMode.NONE))

    def ready(self) -> Wire:
        opened = self.open()
        self.server(b"220 mx.test ESMTP\r\n" + EHLO)
        assert opened.called and self.written() == b"EHLO client.test\r\n"
        return self

    def send(self, body=b"Subject: x\r\n\r\nhi\r\n", rcpts=("x@example.com",)) -> Deferred:
        return Deferred.fromCoroutine(self.client.send("a@b.org", list(rcpts), body))


def failure_of(d: Deferred) -> BaseException:
    caught: list[Failure] = []
    d.addErrback(caught.append)
    assert caught, "the Deferred has not failed"
    return caught[0].value


def test_a_file_body_declares_the_size_left_from_its_position(tmp_path):
    path = tmp_path / "message.eml"
    path.write_bytes(b"X-Skip: 1\r\nSubject: file\r\n\r\n" + b"x" * 100 + b"\r\n")
    wire = Wire()
    opened = wire.open()
    wire.server(b"220 mx.test ESMTP\r\n250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
    assert opened.called
    wire.written()
    with path.open("rb") as file:
        file.readline()  # the caller already read a line: SIZE counts the rest
        sent = wire.send(file)
        assert wire.written().startswith(b"MAIL FROM:<a@b.org> SIZE=119\r\n")  # RFC 1870
        wire.server(b"250 OK\r\n250 OK\r\n354 go\r\n")
        assert wire.written() == path.read_bytes()[11:] + b".\r\n"
        wire.server(b"250 OK\r\n")
    assert sent.result.all_delivered


def test_an_iterable_body_is_regrouped_into_chunks_of_chunk_size():
    source = BodySource(iter([b"ab"] * 7), chunk_size=5)
    chunks: list[tuple[bytes, bool]] = []
    while not chunks or not chunks[-1][1]:
        chunks.append(Deferred.fromCoroutine(source.next()).result)
    assert chunks == [(b"ababa", False), (b"babab", False), (b"abab", True)]


def test_a_421_in_a_transaction_closes_our_side_too():
    wire = Wire().ready()
    sent = wire.send(rcpts=("x@example.com", "y@example.com"))
    wire.server(b"250 2.1.0 OK\r\n421 4.3.2 Shutting down\r\n")
    assert [r.outcome for r in sent.result.recipients] == [Outcome.TEMPORARY] * 2
    assert not wire.transport.connected  # RFC 5321 3.8: not left to the server alone


def test_tcp_nodelay_is_set():
    assert Wire().transport.nodelay is True


def test_greeting_timeout():
    wire = Wire()
    opened = wire.open()
    wire.clock.advance(299)
    assert not opened.called
    wire.clock.advance(1)
    error = failure_of(opened)
    assert isinstance(error, ResponseTimeout) and error.temporary
    assert "mx.test did not answer within 300s (greeting)" in str(error)
    assert not wire.transport.connected


def test_a_greeting_that_came_first_is_kept_for_the_operation():
    wire = Wire()
    wire.server(b"220 mx.test ESMTP\r\n")  # before anyone waits for it
    opened = wire.open()
    wire.server(EHLO)
    assert opened.called and wire.client.greeting.lines == ("mx.test ESMTP",)


@pytest.mark.parametrize(("replies", "waited", "phase"), [
    (b"", 300, "mail"),
    (b"250 2.1.0 OK\r\n", 300, "rcpt"),
    (b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n", 120, "data_init"),
    (b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go\r\n", 600, "data_done"),
])
def test_transaction_timeouts_per_phase(replies, waited, phase):
    wire = Wire().ready()
    sent = wire.send()
    wire.server(replies)
    wire.clock.advance(waited - 1)
    assert not sent.called and wire.transport.connected
    wire.clock.advance(1)
    result = sent.result
    assert isinstance(result.error, ResponseTimeout)
    assert f"({phase})" in str(result.error)
    assert [r.outcome for r in result.recipients] == [Outcome.TEMPORARY]


def test_custom_timeouts_apply():
    wire = Wire(Timeouts(mail=5)).ready()
    sent = wire.send()
    wire.clock.advance(5)
    assert "within 5s (mail)" in str(sent.result.error)


def test_back_pressure_stops_reading_the_body_and_data_block_times_out():
    wire = Wire(chunk_size=10).ready()
    pulled = []

    def body():
        for i in range(100):
            pulled.append(i)
            yield b"01234567\r\n"

    sent = wire.send(body())
    assert wire.transport.producer is wire.protocol  # registered while the body streams
    wire.server(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    wire.protocol.pauseProducing()  # the transport's buffer is full
    wire.server(b"354 go\r\n")
    before = len(pulled)
    wire.clock.advance(100)
    assert len(pulled) == before and before < 10  # nothing more is read while paused
    wire.protocol.resumeProducing()
    assert len(pulled) == 100  # (the fake transport never fills up again)
    wire.server(b"250 2.0.0 OK\r\n")
    assert sent.result.all_delivered
    assert wire.transport.producer is None  # unregistered after the message

    second = wire.send(body())
    wire.server(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    wire.protocol.pauseProducing()
    wire.server(b"354 go\r\n")
    wire.clock.advance(179)
    assert wire.transport.connected
    wire.clock.advance(1)
    assert "read none of our data for 180s (data block)" in str(second.result.error)


def test_an_unasked_reply_when_idle_is_a_protocol_violation():
    wire = Wire().ready()
    wire.server(b"250 2.0.0 surprise\r\n")
    assert not wire.transport.connected
    assert isinstance(wire.protocol.lost, ProtocolViolation)
    with pytest.raises(ProtocolViolation):
        wire.protocol.run(wire.client.session.command("NOOP"))


def test_a_421_while_idle_makes_the_next_send_fail_with_it():
    wire = Wire().ready()
    wire.server(b"421 4.4.2 mx.test Timeout, closing connection\r\n")
    error = failure_of(wire.send())
    assert isinstance(error, ConnectionLost) and error.temporary
    assert error.reply.code == 421 and "Timeout, closing" in str(error)
    assert wire.written() == b""  # nothing was sent to a server that is leaving


def test_garbage_from_the_server_ends_the_connection():
    wire = Wire().ready()
    sent = wire.send()
    wire.server(b"HTTP/1.1 400 Bad Request\r\n")
    assert isinstance(sent.result.error, ProtocolViolation)
    assert "not an SMTP reply line" in str(sent.result.error)


CHUNKING_EHLO = (b"250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
                 b"250 ENHANCEDSTATUSCODES\r\n")


def failing_body(bad: bytes | None = None):
    """Three chunks of text, then *bad* (if given) or an OSError from the source."""
    for _ in range(3):
        yield b"line of text\r\n"
    if bad is None:
        raise OSError("disk on fire")
    yield bad
    yield b"more\r\n"


@pytest.mark.parametrize("bad", [None, b"bare\nLF\r\n"])
def test_a_data_body_that_fails_midway_drops_the_connection(bad):
    wire = Wire(chunk_size=14).ready()
    sent = wire.send(failing_body(bad))
    wire.server(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go\r\n")
    error = failure_of(sent)
    assert isinstance(error, OSError if bad is None else InvalidBody)
    assert not wire.transport.connected  # DATA has no cancel: the stream is dropped
    assert b"bare" not in wire.written()  # the bad chunk never reached the wire


@pytest.mark.parametrize("bad", [None, b"bare\nLF\r\n"])
def test_a_bdat_body_that_fails_midway_keeps_the_connection(bad):
    wire = Wire(chunk_size=14)
    opened = wire.open()
    wire.server(b"220 mx.test ESMTP\r\n" + CHUNKING_EHLO)
    assert opened.called
    wire.written()
    sent = wire.send(failing_body(bad))
    wire.server(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")  # the body flows, then fails
    assert not sent.called  # the chunks in flight are still to be answered
    # In flight: the chunks before the failure (the source is read one chunk ahead, so
    # its error shows one chunk earlier than a bad chunk does).
    wire.server(b"250 2.0.0 14 octets\r\n" * (2 if bad is None else 3))
    error = failure_of(sent)
    assert isinstance(error, OSError if bad is None else InvalidBody)
    assert wire.transport.connected and b"bare" not in wire.written()
    again = wire.send()
    assert wire.written().startswith(b"RSET\r\nMAIL FROM:<a@b.org>")  # RFC 3030 2
    wire.server(b"250 2.0.0 Reset\r\n250 2.1.0 OK\r\n250 2.1.5 OK\r\n"
                b"250 2.0.0 14 octets\r\n250 2.0.0 Queued\r\n")  # 18 octets: 2 chunks
    assert again.result.all_delivered
