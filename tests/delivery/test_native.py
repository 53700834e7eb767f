"""The README's native delivery (Tickets), end to end through SMTPFactory on a
StringTransport: refusals, one sink for all recipients, chunks in order, binary-safe."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from maitred_tx.delivery.base import Delivery, MessageSink
from maitred_tx.envelope import Envelope
from maitred_tx.outcomes import Accepted, PermanentFailure, TemporaryFailure
from maitred_tx.smtp.config import Config
from maitred_tx.testing import FakeConnection

CONFIG = Config(hostname="mx.test", local_domains=frozenset({"example.com", "example.net"}))

# --- the README example, with store_ticket keeping tickets in a list ------------------

tickets: list[tuple[Envelope, bytes]] = []
sinks: list[TicketSink] = []
store_broken = False


def store_ticket(envelope: Envelope, body: bytes) -> None:
    if store_broken:
        raise OSError("ticket store unavailable")
    tickets.append((envelope, body))


class Tickets(Delivery):
    async def rcpt_to(self, context: Any, envelope: Any, recipient: Any, params: Any) -> Any:
        if recipient.local_part.lower() != "support":
            return PermanentFailure("No such user", 550, "5.1.1")
        return None  # None or Accepted() accepts

    def open_message(self, envelope: Envelope) -> TicketSink:
        return TicketSink(envelope)


class TicketSink(MessageSink):
    def __init__(self, envelope: Envelope) -> None:
        super().__init__(envelope)
        self.chunks: list[bytes] = []
        sinks.append(self)  # (test hook: see every sink)

    def write(self, data: bytes) -> None:  # bytes, in order; return a Deferred to pause
        self.chunks.append(data)

    def close(self) -> Accepted | TemporaryFailure:  # only Accepted once stored durably
        try:
            store_ticket(self.envelope, b"".join(self.chunks))
        except OSError:
            return TemporaryFailure("Ticket store unavailable", 451, "4.3.0")
        return Accepted()

    def abort(self) -> None:  # RSET, limit exceeded, connection lost
        self.chunks.clear()


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    global store_broken
    tickets.clear()
    sinks.clear()
    store_broken = False
    yield
    store_broken = False


# --- the wire -------------------------------------------------------------------------


class Wire(FakeConnection):
    def __init__(self, config: Config = CONFIG) -> None:
        super().__init__(Tickets(), config)

    def feed(self, data: bytes, mode: str = "whole") -> list[tuple[int, str | None, str]]:
        return [(r.code, r.status, r.text) for r in self.send(data, mode)]


MODES = ["whole", "lines", "bytes"]
TRANSCRIPT = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<customer@client.test>\r\n"
    b"RCPT TO:<support@example.com>\r\n"
    b"RCPT TO:<sales@example.com>\r\n"
    b"RCPT TO:<SUPPORT@example.net>\r\n"
    b"DATA\r\n"
    b"Subject: printer on fire\r\n\r\nIt is.\r\n..and the dot line\r\n.\r\n"
    b"QUIT\r\n"
)


@pytest.mark.parametrize("mode", MODES)
def test_readme_delivery_end_to_end(mode: str) -> None:
    wire = Wire()
    assert wire.feed(TRANSCRIPT, mode) == [
        (220, None, "mx.test ESMTP maitred_tx"),
        (250, None, "DSN"),
        (250, "2.1.0", "Sender OK"),
        (250, "2.1.5", "Recipient OK"),
        (550, "5.1.1", "No such user"),
        (250, "2.1.5", "Recipient OK"),
        (354, None, "End data with <CR><LF>.<CR><LF>"),
        (250, "2.0.0", "OK: message accepted"),
        (221, "2.0.0", "Bye"),
    ]
    [(envelope, body)] = tickets
    assert body == b"Subject: printer on fire\r\n\r\nIt is.\r\n.and the dot line\r\n"
    assert str(envelope.sender) == "customer@client.test"
    # One sink, one copy of the body, for all (accepted) recipients.
    assert len(sinks) == 1
    assert [str(r.mailbox) for r in envelope.recipients] == [
        "support@example.com", "SUPPORT@example.net"]
    assert not wire.transport.connected


@pytest.mark.parametrize("mode", MODES)
def test_chunks_arrive_in_order_and_binary_safe(mode: str) -> None:
    wire = Wire()
    body = bytes(range(256)) * 3 + b"\r\n.\r\n" + b"\x00\r\r\n\n.." + bytes(range(255, -1, -1))
    first, second = body[:300], body[300:]
    data = (
        b"EHLO client.test\r\n"
        b"MAIL FROM:<customer@client.test> BODY=BINARYMIME\r\n"
        b"RCPT TO:<support@example.com>\r\n"
        + b"BDAT %d\r\n" % len(first) + first
        + b"BDAT %d LAST\r\n" % len(second) + second
    )
    assert [(c, s) for c, s, _ in wire.feed(data, mode)] == [
        (220, None), (250, None), (250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0"),
        (250, "2.0.0")]
    [sink] = sinks
    assert b"".join(sink.chunks) == body
    assert all(sink.chunks)  # no empty writes
    [(_, stored)] = tickets
    assert stored == body
    if mode == "whole":
        assert sink.chunks == [first, second]


def test_eight_bit_data_body_is_passed_through_unchanged() -> None:
    wire = Wire()
    body = "Subject: café\r\n\r\nnaïve résumé ✓\r\n".encode()
    assert [(c, s) for c, s, _ in wire.feed(
        b"EHLO client.test\r\nMAIL FROM:<a@client.test> BODY=8BITMIME\r\n"
        b"RCPT TO:<support@example.com>\r\nDATA\r\n" + body + b".\r\n", "lines")][-1] == (
        250, "2.0.0")
    assert tickets[0][1] == body


def test_a_broken_store_answers_451_and_the_session_goes_on() -> None:
    global store_broken
    wire = Wire()
    wire.feed(b"EHLO client.test\r\n")
    store_broken = True
    assert wire.feed(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<support@example.com>\r\n"
                     b"DATA\r\nhi\r\n.\r\n")[-1] == (451, "4.3.0", "Ticket store unavailable")
    store_broken = False
    assert wire.feed(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<support@example.com>\r\n"
                     b"DATA\r\nhi\r\n.\r\n")[-1] == (250, "2.0.0", "OK: message accepted")
    assert [body for _, body in tickets] == [b"hi\r\n"]


def test_rset_after_a_bdat_chunk_aborts_the_sink() -> None:
    wire = Wire()
    assert [(c, s) for c, s, _ in wire.feed(
        b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<support@example.com>\r\n"
        b"BDAT 5\r\nhello" b"RSET\r\n")][-2:] == [(250, "2.0.0"), (250, "2.0.0")]
    [sink] = sinks
    assert sink.chunks == []  # abort() cleared them
    assert tickets == []


def test_only_refused_recipients_means_no_sink() -> None:
    wire = Wire()
    assert [(c, s) for c, s, _ in wire.feed(
        b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<sales@example.com>\r\n"
        b"DATA\r\nhi\r\n.\r\n")][2:4] == [(250, "2.1.0"), (550, "5.1.1")]
    assert sinks == [] and tickets == []
