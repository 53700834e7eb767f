"""twisted.mail deliveries through SMTPFactory, on StringTransport and task.Clock.

The delivery under test is Twisted's own documentation example
(docs/mail/examples/emailserver.tac), unchanged but for two things: eomReceived stores
the lines in a list instead of printing them, and ``user.dest.local`` is compared with
``b"console"`` (the example compares it with a str, which never matches on Python 3 —
twisted.mail hands it bytes too).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDeliveryFactory
from zope.interface import implementer

from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.config import Config
from maitred_tx.testing import FakeConnection

CONFIG = Config(hostname="mx.test", local_domains=frozenset({"example.org", "example.net"}))


# --- Twisted's documentation example, as written there --------------------------------

received: list[list[bytes]] = []  # what eomReceived got, in order
created: list[Any] = []  # every ConsoleMessage, to see connectionLost


@implementer(smtp.IMessageDelivery)
class ConsoleMessageDelivery:
    def receivedHeader(self, helo, origin, recipients):  # type: ignore[no-untyped-def]
        return "Received: ConsoleMessageDelivery"

    def validateFrom(self, helo, origin):  # type: ignore[no-untyped-def]
        # All addresses are accepted
        return origin

    def validateTo(self, user):  # type: ignore[no-untyped-def]
        # Only messages directed to the "console" user are accepted.
        if user.dest.local == b"console":
            return lambda: ConsoleMessage()
        raise smtp.SMTPBadRcpt(user)


@implementer(smtp.IMessage)
class ConsoleMessage:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.lines = []
        created.append(self)

    def lineReceived(self, line):  # type: ignore[no-untyped-def]
        self.lines.append(line)

    def eomReceived(self):  # type: ignore[no-untyped-def]
        received.append(self.lines)
        self.lines = None
        return defer.succeed(None)

    def connectionLost(self):  # type: ignore[no-untyped-def]
        # There was an error, throw away the stored lines
        self.lines = None


@pytest.fixture(autouse=True)
def _fresh_lists() -> Iterator[None]:
    received.clear()
    created.clear()
    yield


# --- the wire -------------------------------------------------------------------------


class Wire(FakeConnection):
    def __init__(self, delivery: Any, clock: Clock | None = None,
                 factory: SMTPFactory | None = None) -> None:
        super().__init__(delivery, CONFIG, clock=clock, factory=factory)
        assert self.send(b"EHLO client.test\r\n") == [
            (220, None, "mx.test ESMTP maitred_tx"), (250, None, "DSN")]

    def send(self, data: bytes, mode: str = "whole") -> list[Any]:  # type: ignore[override]
        return [(r.code, r.status, r.text) for r in super().send(data, mode)]


ENVELOPE = b"MAIL FROM:<someone@sender.test>\r\nRCPT TO:<console@example.org>\r\nDATA\r\n"
BODY = b"Subject: hi\r\nFrom: someone@sender.test\r\n\r\nline one\r\n..dotted\r\n\r\nend\r\n"
LINES = [b"Subject: hi", b"From: someone@sender.test", b"", b"line one", b".dotted", b"",
         b"end"]
OK = [(250, "2.1.0"), (250, "2.1.5"), (354, None), (250, "2.0.0")]


@pytest.mark.parametrize("mode", ["whole", "lines", "bytes"])
def test_the_documentation_example_receives_lines(mode: str) -> None:
    wire = Wire(ConsoleMessageDelivery())
    data = ENVELOPE + BODY + b".\r\nQUIT\r\n"
    if mode == "whole":
        pieces = [data]
    elif mode == "lines":
        pieces = data.splitlines(keepends=True)
    else:
        pieces = [data[i : i + 1] for i in range(len(data))]
    replies = []
    for piece in pieces:
        replies += wire.send(piece)
    assert replies == [
        (250, "2.1.0", "Sender OK"), (250, "2.1.5", "Recipient OK"),
        (354, None, "End data with <CR><LF>.<CR><LF>"), (250, "2.0.0", "Delivery in progress"),
        (221, "2.0.0", "Bye")]
    # The Received: header first, then each line without CRLF, dot-unstuffed.
    assert received == [[b"Received: ConsoleMessageDelivery", *LINES]]


def test_one_imessage_per_recipient_each_with_every_line() -> None:
    wire = Wire(ConsoleMessageDelivery())
    assert wire.codes(b"MAIL FROM:<someone@sender.test>\r\nRCPT TO:<console@example.org>\r\n"
                      b"RCPT TO:<console@example.net>\r\nDATA\r\n" + BODY + b".\r\n") == [
        (250, "2.1.0"), (250, "2.1.5"), (250, "2.1.5"), (354, None), (250, "2.0.0")]
    assert len(created) == 2
    assert received == [[b"Received: ConsoleMessageDelivery", *LINES]] * 2


def test_bad_recipient_is_550_and_the_session_goes_on() -> None:
    wire = Wire(ConsoleMessageDelivery())
    assert wire.send(b"MAIL FROM:<someone@sender.test>\r\nRCPT TO:<nobody@example.org>\r\n"
                     b"DATA\r\n") == [
        (250, "2.1.0", "Sender OK"),
        (550, "5.1.1", "Cannot receive for specified address"),
        (503, "5.5.1", "Need RCPT command first")]
    assert wire.codes(b"RSET\r\n" + ENVELOPE + BODY + b".\r\n") == [(250, "2.0.0"), *OK]
    assert len(received) == 1


def test_bad_sender_is_550() -> None:
    class Picky(ConsoleMessageDelivery):
        def validateFrom(self, helo, origin):  # type: ignore[no-untyped-def]
            if origin.local == b"spammer":
                raise smtp.SMTPBadSender(origin)
            return origin

    wire = Wire(Picky())
    assert wire.send(b"MAIL FROM:<spammer@sender.test>\r\n") == [
        (550, "5.7.1",
         "Cannot receive from specified address <spammer@sender.test>: Sender not acceptable")]
    assert wire.codes(ENVELOPE + BODY + b".\r\n") == OK


def test_other_exceptions_from_validation_are_451() -> None:
    class Broken(ConsoleMessageDelivery):
        def validateTo(self, user):  # type: ignore[no-untyped-def]
            raise RuntimeError("database down")

    wire = Wire(Broken())
    with capturedLogs():
        assert wire.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<console@example.org>\r\n") \
            == [(250, "2.1.0"), (451, "4.3.0")]


@pytest.mark.parametrize("how", ["raises", "failed-deferred"])
def test_eom_received_failing_is_451_not_550(how: str) -> None:
    class Failing(ConsoleMessage):
        def eomReceived(self):  # type: ignore[no-untyped-def]
            if how == "raises":
                raise OSError("disk full")
            return defer.fail(OSError("disk full"))

    class Delivery(ConsoleMessageDelivery):
        def validateTo(self, user):  # type: ignore[no-untyped-def]
            return Failing

    wire = Wire(Delivery())
    with capturedLogs():
        assert wire.codes(ENVELOPE + BODY + b".\r\n") == [*OK[:3], (451, "4.3.0")]
    assert wire.codes(b"NOOP\r\n") == [(250, "2.0.0")]


def test_eom_received_smtp_error_keeps_its_code() -> None:
    class Full(ConsoleMessage):
        def eomReceived(self):  # type: ignore[no-untyped-def]
            return defer.fail(smtp.SMTPServerError(552, "Mailbox full"))

    class Delivery(ConsoleMessageDelivery):
        def validateTo(self, user):  # type: ignore[no-untyped-def]
            return Full

    wire = Wire(Delivery())
    assert wire.send(ENVELOPE + BODY + b".\r\n")[-1] == (552, "5.3.0", "Mailbox full")


def test_deferred_validate_to_pauses_until_it_fires() -> None:
    clock = Clock()

    class Slow(ConsoleMessageDelivery):
        def validateTo(self, user):  # type: ignore[no-untyped-def]
            return deferLater(clock, 5, ConsoleMessageDelivery.validateTo, self, user)

    wire = Wire(Slow(), clock=clock)
    assert wire.codes(ENVELOPE + BODY + b".\r\n") == [(250, "2.1.0")]
    assert wire.transport.producerState == "paused"
    clock.advance(5)
    assert wire.codes(b"") == OK[1:]
    assert wire.transport.producerState == "producing"
    assert received == [[b"Received: ConsoleMessageDelivery", *LINES]]


def test_received_header_gets_twisted_mail_arguments() -> None:
    seen: list[tuple[Any, ...]] = []

    class Dated(ConsoleMessageDelivery):
        def receivedHeader(self, helo, origin, recipients):  # type: ignore[no-untyped-def]
            seen.append((helo, origin, recipients))
            return b"Received: from " + helo[0] + b" by mx.test; " + smtp.rfc822date()

    wire = Wire(Dated())
    assert wire.codes(ENVELOPE + BODY + b".\r\n") == OK
    [(helo, origin, [user])] = seen
    assert helo == (b"client.test", b"192.0.2.7")
    assert isinstance(origin, smtp.Address) and str(origin) == "someone@sender.test"
    assert isinstance(user, smtp.User) and str(user) == "console@example.org"
    assert str(user.orig) == "someone@sender.test"
    header = received[0][0]
    assert header.startswith(b"Received: from client.test by mx.test; ")
    assert received[0][1:] == LINES


def test_a_body_without_header_gets_an_empty_line_first() -> None:
    """twisted.mail's quirk, kept: the Received: header is then followed by a blank."""
    wire = Wire(ConsoleMessageDelivery())
    assert wire.codes(ENVELOPE + b"just text\r\nmore text\r\n.\r\n") == OK
    assert received == [[b"Received: ConsoleMessageDelivery", b"", b"just text",
                         b"more text"]]


def test_imessages_are_created_at_data_and_dropped_on_rset_after_bdat() -> None:
    wire = Wire(ConsoleMessageDelivery())
    assert wire.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<console@example.org>\r\n") == [
        (250, "2.1.0"), (250, "2.1.5")]
    assert created == []
    assert wire.codes(b"BDAT 14\r\nSubject: x\r\n\r\n") == [(250, "2.0.0")]
    [message] = created
    assert message.lines == [b"Received: ConsoleMessageDelivery", b"Subject: x", b""]
    assert wire.codes(b"RSET\r\n") == [(250, "2.0.0")]
    assert message.lines is None  # connectionLost
    assert received == []


def test_connection_lost_mid_data_calls_connection_lost() -> None:
    wire = Wire(ConsoleMessageDelivery())
    wire.codes(ENVELOPE + b"Subject: x\r\n\r\nhalf")
    [message] = created
    assert message.lines == [b"Received: ConsoleMessageDelivery", b"Subject: x", b""]
    wire.transport.loseConnection()
    assert message.lines is None
    assert received == []


def test_bdat_body_is_split_into_lines_like_data() -> None:
    wire = Wire(ConsoleMessageDelivery())
    body = BODY.replace(b"..dotted", b".dotted")  # BDAT is never dot-stuffed
    wire.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<console@example.org>\r\n")
    half = len(body) // 2
    assert wire.codes(b"BDAT %d\r\n" % half + body[:half]) == [(250, "2.0.0")]
    assert wire.codes(b"BDAT %d LAST\r\n" % (len(body) - half) + body[half:]) == [
        (250, "2.0.0")]
    assert received == [[b"Received: ConsoleMessageDelivery", *LINES]]


def test_line_received_smtp_error_answers_its_code_after_the_body() -> None:
    class Picky(ConsoleMessage):
        def lineReceived(self, line):  # type: ignore[no-untyped-def]
            if line.startswith(b"X-Virus"):
                raise smtp.SMTPServerError(554, "Virus found")
            super().lineReceived(line)

    class Delivery(ConsoleMessageDelivery):
        def validateTo(self, user):  # type: ignore[no-untyped-def]
            return Picky

    wire = Wire(Delivery())
    assert wire.send(ENVELOPE + b"X-Virus: yes\r\n\r\nbody\r\n.\r\n")[-1] == (
        554, "5.6.0", "Virus found")
    [message] = created
    assert message.lines is None  # connectionLost, as twisted.mail does
    assert received == []


# --- IMessageDeliveryFactory ------------------------------------------------------------


@implementer(IMessageDeliveryFactory)
class PerMessage:
    def __init__(self) -> None:
        self.made: list[ConsoleMessageDelivery] = []

    def getMessageDelivery(self) -> ConsoleMessageDelivery:
        delivery = ConsoleMessageDelivery()
        self.made.append(delivery)
        return delivery


def test_delivery_factory_is_asked_once_per_message() -> None:
    """IMessageDeliveryFactory.getMessageDelivery: "This will be called once per
    message" — twisted.mail calls it from validateFrom, at each MAIL FROM."""
    factory = PerMessage()
    wire = Wire(factory)
    assert factory.made == []
    msg = ENVELOPE + BODY + b".\r\n"
    assert wire.codes(msg + msg) == OK + OK
    assert len(factory.made) == 2
    assert len(received) == 2
    other = Wire(factory, factory=wire.factory)
    assert other.codes(msg) == OK
    assert len(factory.made) == 3


def test_delivery_factory_messages_do_not_share_their_delivery() -> None:
    seen: list[Any] = []

    class Tracking(ConsoleMessageDelivery):
        def receivedHeader(self, helo, origin, recipients):  # type: ignore[no-untyped-def]
            seen.append(self)
            return "Received: ConsoleMessageDelivery"

    @implementer(IMessageDeliveryFactory)
    class Factory:
        def getMessageDelivery(self) -> Tracking:
            return Tracking()

    wire = Wire(Factory())
    msg = ENVELOPE + BODY + b".\r\n"
    assert wire.codes(msg + msg) == OK + OK
    first, second = seen
    assert first is not second


def test_an_object_that_is_no_delivery_is_refused() -> None:
    with pytest.raises(TypeError):
        SMTPFactory(Clock(), CONFIG, object())
