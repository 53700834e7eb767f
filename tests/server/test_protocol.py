"""SMTPServerProtocol + Policy + SMTPFactory on StringTransport and task.Clock.

No sockets and no global reactor: the Clock is the reactor handed to SMTPFactory, so
every timer is driven by ``clock.advance``.  Every reply is checked for its basic code
and its enhanced code (None where the peer has not negotiated ENHANCEDSTATUSCODES).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogEvent, Logger, capturedLogs, formatEvent
from zope.interface import implementer

from maitred_tx.delivery.base import Delivery, MessageSink
from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.envelope import Envelope
from maitred_tx.interfaces import IMessageSink
from maitred_tx.outcomes import Accepted, Outcome, PermanentFailure, TemporaryFailure
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.config import Config, Limits, Mode
from maitred_tx.testing import FakeConnection

CONFIG = Config(hostname="mx.test", local_domains=frozenset({"example.org"}))
LMTP = Config(hostname="mx.test", local_domains=frozenset({"example.org"}), mode=Mode.LMTP)

Code = tuple[int, str | None]


class Wire(FakeConnection):
    """One connection: bytes in, parsed replies out as (code, enhanced, last line)."""

    def __init__(
        self, delivery: Any, config: Config = CONFIG, clock: Clock | None = None,
        factory: SMTPFactory | None = None,
    ) -> None:
        super().__init__(delivery, config, clock=clock, factory=factory)

    def send(self, data: bytes, mode: str = "whole") -> list[Any]:  # type: ignore[override]
        return [(r.code, r.status, r.text) for r in super().send(data, mode)]

    def replies(self) -> list[Any]:  # type: ignore[override]
        return [(r.code, r.status, r.text) for r in super().replies()]

    def codes(self, data: bytes, mode: str = "whole") -> list[Code]:
        return [(c, s) for c, s, _ in self.send(data, mode)]

    @property
    def state(self) -> str:
        return str(self.transport.producerState)


def greeted(delivery: Any, config: Config = CONFIG, **kw: Any) -> Wire:
    wire = Wire(delivery, config, **kw)
    assert wire.replies() == [(220, None, "mx.test LMTP maitred_tx" if config.lmtp
                               else "mx.test ESMTP maitred_tx")]
    hello = b"LHLO client.test\r\n" if config.lmtp else b"EHLO client.test\r\n"
    assert wire.codes(hello) == [(250, None)]
    return wire


def split(data: bytes, mode: str) -> Iterator[bytes]:
    if mode == "whole":
        yield data
    elif mode == "lines":
        yield from data.splitlines(keepends=True)
    else:
        for i in range(len(data)):
            yield data[i : i + 1]


MESSAGE = (
    b"MAIL FROM:<alice@sender.test>\r\n"
    b"RCPT TO:<bob@example.org>\r\n"
    b"RCPT TO:<carol@example.org>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n\r\nHello\r\n..dot\r\n.\r\n"
)
MESSAGE_CODES = [(250, "2.1.0"), (250, "2.1.5"), (250, "2.1.5"), (354, None), (250, "2.0.0")]


class Sink(MessageSink):
    """Records everything; write() may be given Deferreds to return."""

    def __init__(self, envelope: Envelope, outcome: Any = None) -> None:
        super().__init__(envelope)
        self.chunks: list[bytes] = []
        self.aborted = False
        self.closed = False
        self.write_results: list[Any] = []
        self.outcome = Accepted() if outcome is None else outcome

    def write(self, data: bytes) -> Any:
        self.chunks.append(data)
        return self.write_results.pop(0) if self.write_results else None

    def close(self) -> Any:
        self.closed = True
        return self.outcome() if callable(self.outcome) else self.outcome

    def abort(self) -> None:
        self.aborted = True


class Recording(Delivery):
    """Answers each hook from a table; keeps the sinks it opened."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[str] = []
        self.sinks: list[Sink] = []
        self.outcome: Any = None

    def _answer(self, name: str, *args: Any) -> Any:
        self.calls.append(name)
        answer = self.answers.get(name)
        return answer(*args) if callable(answer) else answer

    def hello(self, context: Any) -> Any:
        return self._answer("hello", context)

    def mail_from(self, context: Any, sender: Any, params: Any) -> Any:
        return self._answer("mail_from", sender)

    def rcpt_to(self, context: Any, envelope: Any, recipient: Any, params: Any) -> Any:
        return self._answer("rcpt_to", str(recipient))

    def open_message(self, envelope: Envelope) -> Any:
        if "open_message" in self.answers:
            return self._answer("open_message", envelope)
        sink = Sink(envelope, self.outcome)
        self.sinks.append(sink)
        return sink


# --- connection, greeting, a whole transaction ---------------------------------------


def test_greeting_and_tcp_nodelay() -> None:
    wire = Wire(MemoryDelivery())
    assert wire.replies() == [(220, None, "mx.test ESMTP maitred_tx")]
    assert wire.transport.nodelay is True
    assert wire.state == "producing"


@pytest.mark.parametrize("mode", ["whole", "lines", "bytes"])
def test_full_transaction_with_memory_delivery(mode: str) -> None:
    delivery = MemoryDelivery()
    wire = greeted(delivery)
    codes: list[Code] = []
    for piece in split(MESSAGE + b"QUIT\r\n", mode):
        codes += wire.codes(piece)
    assert codes == [*MESSAGE_CODES, (221, "2.0.0")]
    assert not wire.connected
    [stored] = delivery.messages
    assert stored.body == b"Subject: hi\r\n\r\nHello\r\n.dot\r\n"
    assert str(stored.envelope.sender) == "alice@sender.test"
    assert [str(r.mailbox) for r in stored.envelope.recipients] == [
        "bob@example.org", "carol@example.org"]
    assert stored.envelope.session.helo == "client.test"
    assert stored.envelope.session.peer_host == "192.0.2.7"
    assert stored.envelope.session.esmtp is True
    assert wire.factory.connections == set()


def test_ehlo_capabilities_and_helo_without_enhanced_codes() -> None:
    wire = Wire(MemoryDelivery())
    wire.replies()
    wire.protocol.dataReceived(b"EHLO client.test\r\n")
    ehlo = wire.transport.value().split(b"\r\n")
    assert ehlo[1] == b"250-mx.test" and b"250-PIPELINING" in ehlo
    assert wire.replies() == [(250, None, "DSN")]
    assert wire.codes(b"HELO client.test\r\nMAIL FROM:<a@sender.test>\r\n") == [
        (250, None), (250, None)]


# --- pipelining: order, pause, one write ------------------------------------------------


def test_pipelined_replies_stay_in_order_when_decisions_fire_in_reverse() -> None:
    """twisted/twisted#8126: late answers, fired 3rd first, still reply in order."""
    pending = {f"{u}@example.org": Deferred() for u in ("a", "b", "c")}
    delivery = Recording(rcpt_to=lambda rcpt: pending[rcpt])
    wire = greeted(delivery)
    writes = len(wire.transport.writes)
    batch = (b"MAIL FROM:<s@sender.test>\r\n" + b"".join(
        b"RCPT TO:<%s>\r\n" % r.encode() for r in pending) + b"DATA\r\n")
    assert wire.codes(batch) == [(250, "2.1.0")]
    assert wire.state == "paused"
    pending["c@example.org"].callback(None)
    assert (wire.replies(), wire.state) == ([], "paused")
    pending["b@example.org"].callback(PermanentFailure("No such user", 550, "5.1.1"))
    assert (wire.replies(), wire.state) == ([], "paused")
    pending["a@example.org"].callback(Accepted("Hello a"))
    assert wire.replies() == [
        (250, "2.1.5", "Hello a"),
        (550, "5.1.1", "No such user"),
        (250, "2.1.5", "Recipient OK"),
        (354, None, "End data with <CR><LF>.<CR><LF>"),
    ]
    assert wire.state == "producing"
    assert delivery.calls.count("rcpt_to") == 3
    assert len(wire.transport.writes) == writes + 2  # MAIL's, then the rest at once
    assert wire.codes(b"body\r\n.\r\n") == [(250, "2.0.0")]
    assert [str(r.mailbox) for r in delivery.sinks[0].envelope.recipients] == [
        "a@example.org", "c@example.org"]


def test_pipelined_decisions_answered_by_timers_keep_command_order() -> None:
    clock = Clock()
    delays = {"a@example.org": 3, "b@example.org": 2, "c@example.org": 1}
    delivery = Recording(rcpt_to=lambda rcpt: deferLater(
        clock, delays[rcpt], lambda: None if rcpt != "b@example.org"
        else TemporaryFailure("Greylisted", 450, "4.7.1")))
    wire = greeted(delivery, clock=clock)
    batch = b"MAIL FROM:<s@sender.test>\r\n" + b"".join(
        b"RCPT TO:<%s>\r\n" % r.encode() for r in delays) + b"NOOP\r\n"
    assert wire.codes(batch) == [(250, "2.1.0")]
    clock.advance(2.9)
    assert (wire.replies(), wire.state) == ([], "paused")
    clock.advance(0.1)
    assert wire.codes(b"") == [(250, "2.1.5")]
    assert wire.state == "paused"
    clock.advance(2)  # b was only asked once a was answered
    assert wire.replies() == [(450, "4.7.1", "Greylisted")]
    assert wire.state == "paused"
    clock.advance(1)
    assert wire.replies() == [(250, "2.1.5", "Recipient OK"), (250, "2.0.0", "OK")]
    assert wire.state == "producing"


def test_a_pipelined_batch_answered_synchronously_is_one_write() -> None:
    wire = Wire(MemoryDelivery())
    wire.replies()
    before = len(wire.transport.writes)
    wire.protocol.dataReceived(b"EHLO client.test\r\n" + MESSAGE + b"NOOP\r\nQUIT\r\n")
    assert len(wire.transport.writes) == before + 1
    assert [(c, s) for c, s, _ in wire.replies()] == [
        (250, None), *MESSAGE_CODES, (250, "2.0.0"), (221, "2.0.0")]


def test_reading_is_paused_while_a_decision_is_pending() -> None:
    pending: Deferred[Any] = Deferred()
    wire = greeted(Recording(mail_from=lambda sender: pending))
    assert wire.codes(b"MAIL FROM:<s@sender.test>\r\n") == []
    assert wire.state == "paused"
    # A sender that pipelines anyway: buffered, not answered before MAIL's reply.
    assert wire.codes(b"NOOP\r\n") == []
    pending.callback(None)
    assert wire.replies() == [(250, "2.1.0", "Sender OK"), (250, "2.0.0", "OK")]
    assert wire.state == "producing"


# --- back-pressure from the sink --------------------------------------------------------


def test_a_slow_sink_write_pauses_reading_until_it_fires() -> None:
    delivery = Recording()
    wire = greeted(delivery)
    slow: Deferred[None] = Deferred()
    wire.codes(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\n")

    def open_slow(envelope: Envelope) -> Sink:
        sink = Sink(envelope)
        sink.write_results = [slow]
        delivery.sinks.append(sink)
        return sink

    delivery.answers["open_message"] = open_slow
    assert wire.codes(b"DATA\r\nSubject: x\r\n\r\nfirst part\r\n") == [(354, None)]
    [sink] = delivery.sinks
    assert wire.state == "paused"
    written = list(sink.chunks)
    assert written
    assert wire.codes(b"second part\r\n.\r\nNOOP\r\n") == []
    assert sink.chunks == written and not sink.closed
    slow.callback(None)
    assert wire.replies() == [(250, "2.0.0", "OK: message accepted"), (250, "2.0.0", "OK")]
    assert b"".join(sink.chunks) == b"Subject: x\r\n\r\nfirst part\r\nsecond part\r\n"
    assert sink.closed and wire.state == "producing"


# --- timers ---------------------------------------------------------------------------


def test_idle_timeout_answers_421_and_closes() -> None:
    wire = greeted(MemoryDelivery())
    [timer] = wire.clock.getDelayedCalls()
    due = timer.getTime()
    wire.clock.advance(299)
    assert wire.codes(b"NOOP\r\n") == [(250, "2.0.0")]
    # A read only notes its time: the timer is neither replaced nor moved (a reset()
    # per read cost more than a small command's handling).
    assert wire.clock.getDelayedCalls() == [timer] and timer.getTime() == due
    wire.clock.advance(299)  # the NOOP restarted the idle count: the timer slept on
    assert wire.replies() == [] and wire.connected
    # One timer for the idle timeout and the session deadline, however busy.
    assert len(wire.clock.getDelayedCalls()) == 1
    wire.clock.advance(1)
    assert wire.replies() == [(421, "4.4.2", "mx.test Timeout, closing connection")]
    assert not wire.connected
    assert wire.clock.getDelayedCalls() == []
    assert wire.factory.connections == set()


def test_data_timeout_aborts_the_sink() -> None:
    config = Config(hostname="mx.test", local_domains=frozenset({"example.org"}),
                    limits=Limits(command_timeout=300, data_timeout=60))
    delivery = MemoryDelivery()
    wire = greeted(delivery, config)
    assert wire.codes(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\n"
                      b"DATA\r\npartial\r\n") == [(250, "2.1.0"), (250, "2.1.5"), (354, None)]
    wire.clock.advance(60)
    assert wire.codes(b"") == [(421, "4.4.2")]
    assert not wire.connected
    assert delivery.aborted == 1 and delivery.messages == []


# A DATA timeout longer than the command timeout: once a message is answered or
# aborted, the shorter one counts again, from then.
LONG_DATA_TIMEOUT = Config(hostname="mx.test", local_domains=frozenset({"example.org"}),
                           limits=Limits(command_timeout=60, data_timeout=600))


def envelope_then(wire: Wire, command: bytes, reply: Code) -> None:
    assert wire.codes(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\n"
                      + command) == [(250, "2.1.0"), (250, "2.1.5"), reply]


def assert_times_out_after(wire: Wire, seconds: float) -> None:
    wire.clock.advance(seconds - 1)
    assert wire.connected
    wire.clock.advance(1)
    assert wire.replies() == [(421, "4.4.2", "mx.test Timeout, closing connection")]
    assert not wire.connected


@pytest.mark.parametrize("answer", ["at once", "later"])
def test_the_command_timeout_applies_again_after_the_message(answer: str) -> None:
    delivery = Recording()
    later: Deferred[Any] = Deferred()
    if answer == "later":
        delivery.outcome = lambda: later
    wire = greeted(delivery, LONG_DATA_TIMEOUT)
    envelope_then(wire, b"DATA\r\n", (354, None))
    wire.clock.advance(300)  # within the DATA timeout
    replies = wire.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    if answer == "later":
        assert replies == []
        wire.clock.advance(30)  # the delivery takes its time; reading is paused
        later.callback(Accepted())
        replies = wire.replies()
    assert replies == [(250, "2.0.0", "OK: message accepted")]
    assert_times_out_after(wire, 60)


def test_the_command_timeout_applies_again_after_an_aborted_message() -> None:
    delivery = Recording()
    wire = greeted(delivery, LONG_DATA_TIMEOUT)
    envelope_then(wire, b"BDAT 4\r\nabcd", (250, "2.0.0"))
    wire.clock.advance(300)  # a sink is open between chunks: the DATA timeout applies
    assert wire.codes(b"RSET\r\n") == [(250, "2.0.0")]
    assert delivery.sinks[0].aborted
    assert_times_out_after(wire, 60)


def test_session_deadline_closes_even_a_busy_session() -> None:
    wire = greeted(MemoryDelivery())
    for _ in range(8):
        wire.clock.advance(200)
        assert wire.codes(b"NOOP\r\n") == [(250, "2.0.0")]
    wire.clock.advance(199)
    assert wire.connected
    wire.clock.advance(1)  # 1800 s after connecting
    assert wire.replies() == [(421, "4.4.2", "mx.test Session too long, closing")]
    assert not wire.connected
    assert wire.clock.getDelayedCalls() == []


def test_a_hook_that_never_answers_is_closed_by_the_timeout() -> None:
    late: Deferred[Any] = Deferred()
    wire = greeted(Recording(rcpt_to=lambda rcpt: late))
    assert wire.codes(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\n") == [
        (250, "2.1.0")]
    wire.clock.advance(300)
    assert wire.replies() == [(421, "4.4.2", "mx.test Timeout, closing connection")]
    assert not wire.connected


def test_an_answer_after_the_timeout_writes_nothing_and_resumes_nothing() -> None:
    late: Deferred[Any] = Deferred()
    wire = greeted(Recording(rcpt_to=lambda rcpt: late))
    wire.codes(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\n")
    wire.clock.advance(300)
    assert wire.replies() == [(421, "4.4.2", "mx.test Timeout, closing connection")]
    writes = len(wire.transport.writes)
    # A plain StringTransport refuses resumeProducing after loseConnection, as a
    # producer must not be resumed once the connection is going away.
    wire.transport.disconnecting = True
    with capturedLogs() as events:
        late.callback(None)
    assert len(wire.transport.writes) == writes
    assert wire.state == "paused"
    assert [e for e in events if e.get("log_level").name in ("error", "critical")] == []


# --- shutdown and lost connections -------------------------------------------------------


def test_factory_shutdown_sends_421_432_to_every_session() -> None:
    clock = Clock()
    delivery = MemoryDelivery()
    factory = SMTPFactory(clock, CONFIG, delivery)
    idle = greeted(delivery, factory=factory, clock=clock)
    busy = greeted(delivery, factory=factory, clock=clock)
    busy.codes(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\nDATA\r\npart")
    assert len(factory.connections) == 2
    factory.shutdown()
    for wire in (idle, busy):
        assert wire.replies() == [(421, "4.3.2", "mx.test Service shutting down")]
        assert not wire.connected
    assert delivery.aborted == 1 and delivery.messages == []
    assert factory.connections == set()
    assert clock.getDelayedCalls() == []


def test_connection_lost_mid_data_aborts_the_sink() -> None:
    delivery = Recording()
    wire = greeted(delivery)
    wire.codes(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\nDATA\r\nhalf a bo")
    [sink] = delivery.sinks
    wire.transport.loseConnection()
    assert sink.aborted and not sink.closed
    assert wire.clock.getDelayedCalls() == []


def test_connection_lost_while_the_sink_is_opening_aborts_it_when_it_arrives() -> None:
    opening: Deferred[Any] = Deferred()
    delivery = Recording(open_message=lambda envelope: opening)
    wire = greeted(delivery)
    wire.codes(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\nDATA\r\nhalf")
    wire.transport.loseConnection()
    sink = Sink(None)  # type: ignore[arg-type]
    opening.callback(sink)
    assert wire.transport.value().endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert sink.aborted and not sink.closed


def test_connection_lost_while_a_sink_write_is_pending_aborts_it() -> None:
    delivery = Recording()
    slow: Deferred[None] = Deferred()

    def open_slow(envelope: Envelope) -> Sink:
        sink = Sink(envelope)
        sink.write_results = [slow]
        delivery.sinks.append(sink)
        return sink

    delivery.answers["open_message"] = open_slow
    wire = greeted(delivery)
    wire.codes(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\nDATA\r\nabc\r\n")
    wire.transport.loseConnection()
    [sink] = delivery.sinks
    assert sink.aborted
    slow.callback(None)
    assert not sink.closed


# --- the application fails: 451 4.3.0, never 550, and the session goes on ------------


class Boom(Exception):
    pass


def _raise(*args: Any) -> Any:
    raise Boom("bug in the delivery")


def _failed(*args: Any) -> Any:
    return fail(Boom("bug in the delivery"))


async def _async_raise(*args: Any) -> Any:
    raise Boom("bug in the delivery")


def _later_failed(*args: Any) -> Any:
    d: Deferred[Any] = Deferred()
    _LATER.append(lambda: d.errback(Boom("bug in the delivery")))
    return d


_LATER: list[Callable[[], None]] = []
FAILURES = {"raises": _raise, "failed": _failed, "coroutine": _async_raise,
            "fails-later": _later_failed}


def once(failure: Callable[..., Any], then: Any = None) -> Callable[..., Any]:
    """Fail on the first call, then answer *then* (the sender's retry works)."""
    calls = []

    def hook(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            return failure(*args)
        return then(*args) if callable(then) else then

    return hook


def _run_later() -> None:
    while _LATER:
        _LATER.pop(0)()


@pytest.fixture(autouse=True)
def _no_leftover_later() -> Iterator[None]:
    _LATER.clear()
    yield
    _LATER.clear()


@pytest.mark.parametrize("how", FAILURES)
def test_hello_failure_is_451(how: str) -> None:
    wire = Wire(Recording(hello=once(FAILURES[how])))
    wire.replies()
    with capturedLogs():
        wire.protocol.dataReceived(b"EHLO client.test\r\n")
        _run_later()
    # ENHANCEDSTATUSCODES is only in force once an EHLO succeeded (RFC 2034 3).
    assert wire.replies() == [(451, None, "Local error in processing, try again later")]
    assert wire.codes(b"EHLO client.test\r\n") == [(250, None)]
    assert wire.codes(b"NOOP\r\n") == [(250, "2.0.0")]


@pytest.mark.parametrize("how", FAILURES)
def test_mail_from_failure_is_451(how: str) -> None:
    delivery = MemoryDelivery()
    delivery.mail_from = once(FAILURES[how])  # type: ignore[method-assign]
    wire = greeted(delivery)
    with capturedLogs():
        wire.protocol.dataReceived(b"MAIL FROM:<s@sender.test>\r\n")
        _run_later()
    assert wire.replies() == [(451, "4.3.0", "Local error in processing, try again later")]
    assert wire.codes(MESSAGE) == MESSAGE_CODES
    assert len(delivery.messages) == 1


@pytest.mark.parametrize("how", FAILURES)
def test_rcpt_to_failure_is_451_for_that_recipient_only(how: str) -> None:
    delivery = MemoryDelivery()
    delivery.rcpt_to = once(FAILURES[how])  # type: ignore[method-assign]
    wire = greeted(delivery)
    with capturedLogs():
        wire.protocol.dataReceived(MESSAGE)
        _run_later()
    assert [(c, s) for c, s, _ in wire.replies()] == [
        (250, "2.1.0"), (451, "4.3.0"), (250, "2.1.5"), (354, None), (250, "2.0.0")]
    [stored] = delivery.messages
    assert [str(r.mailbox) for r in stored.envelope.recipients] == ["carol@example.org"]


@pytest.mark.parametrize("how", FAILURES)
def test_open_message_failure_is_451_after_the_body(how: str) -> None:
    delivery = MemoryDelivery()
    delivery.open_message = once(  # type: ignore[method-assign]
        FAILURES[how], MemoryDelivery.open_message.__get__(delivery))
    wire = greeted(delivery)
    with capturedLogs():
        wire.protocol.dataReceived(MESSAGE)
        _run_later()
    assert [(c, s) for c, s, _ in wire.replies()] == [*MESSAGE_CODES[:4], (451, "4.3.0")]
    assert delivery.messages == []
    assert wire.codes(MESSAGE) == MESSAGE_CODES
    assert len(delivery.messages) == 1


@pytest.mark.parametrize("how", FAILURES)
def test_close_failure_is_451(how: str) -> None:
    delivery = Recording()
    delivery.outcome = once(FAILURES[how], Accepted())
    wire = greeted(delivery)
    with capturedLogs():
        wire.protocol.dataReceived(MESSAGE)
        _run_later()
    assert [(c, s) for c, s, _ in wire.replies()] == [*MESSAGE_CODES[:4], (451, "4.3.0")]
    assert wire.codes(MESSAGE) == MESSAGE_CODES
    assert [s.closed for s in delivery.sinks] == [True, True]


@pytest.mark.parametrize(
    "answer",
    [None, "a string", object()],
    ids=["None", "str", "object"],
)
def test_open_message_returning_no_sink_is_451(answer: Any) -> None:
    wire = greeted(Recording(open_message=lambda envelope: answer))
    with capturedLogs():
        codes = wire.codes(MESSAGE)
    assert codes == [*MESSAGE_CODES[:4], (451, "4.3.0")]
    assert wire.connected
    assert wire.codes(b"NOOP\r\n") == [(250, "2.0.0")]


def test_open_message_answer_is_adapted_to_a_sink() -> None:
    """What open_message returns is IMessageSink(answer): an object that conforms (or
    has an adapter registered) delivers through the sink it adapts to."""
    sinks: list[Sink] = []

    class Conforming:
        def __init__(self, envelope: Envelope) -> None:
            self.envelope = envelope

        def __conform__(self, interface: Any) -> Sink | None:
            if interface is IMessageSink:
                sinks.append(Sink(self.envelope))
                return sinks[-1]
            return None

    wire = greeted(Recording(open_message=Conforming))
    assert wire.codes(MESSAGE) == MESSAGE_CODES
    [sink] = sinks
    assert sink.closed and b"".join(sink.chunks) == b"Subject: hi\r\n\r\nHello\r\n.dot\r\n"


@pytest.mark.parametrize("answer", [None, "yes", 42], ids=["None", "str", "int"])
def test_close_returning_no_outcome_is_451(answer: Any) -> None:
    delivery = Recording()
    delivery.outcome = answer
    wire = greeted(delivery)
    delivery.answers["open_message"] = lambda envelope: _sink_returning(envelope, answer)
    with capturedLogs():
        codes = wire.codes(MESSAGE)
    assert codes == [*MESSAGE_CODES[:4], (451, "4.3.0")]
    assert wire.connected
    assert wire.codes(b"NOOP\r\n") == [(250, "2.0.0")]


def _sink_returning(envelope: Envelope, answer: Any) -> Sink:
    sink = Sink(envelope)
    sink.close = lambda: answer  # type: ignore[method-assign]
    return sink


@pytest.mark.parametrize("how", ["raises", "fails-later", "failed"])
def test_sink_write_failure_is_451_and_aborts_the_sink(how: str) -> None:
    delivery = Recording()

    def open_failing(envelope: Envelope) -> Sink:
        sink = Sink(envelope)
        delivery.sinks.append(sink)
        if how == "raises":
            sink.write = _raise  # type: ignore[method-assign]
        else:
            sink.write_results = [FAILURES[how]()]
        return sink

    delivery.answers["open_message"] = open_failing
    wire = greeted(delivery)
    with capturedLogs():
        wire.protocol.dataReceived(MESSAGE)
        _run_later()
    assert [(c, s) for c, s, _ in wire.replies()] == [*MESSAGE_CODES[:4], (451, "4.3.0")]
    [sink] = delivery.sinks
    assert sink.aborted and not sink.closed
    assert wire.connected and wire.state == "producing"
    del delivery.answers["open_message"]
    assert wire.codes(MESSAGE) == MESSAGE_CODES


def test_hello_accepted_still_lists_the_capabilities() -> None:
    wire = Wire(Recording(hello=Accepted()))
    wire.replies()
    wire.protocol.dataReceived(b"EHLO client.test\r\n")
    assert b"250-PIPELINING\r\n" in wire.transport.value()
    assert wire.replies() == [(250, None, "DSN")]
    assert wire.codes(b"MAIL FROM:<s@sender.test>\r\n") == [(250, "2.1.0")]


def test_hello_refused_with_an_outcome() -> None:
    wire = Wire(Recording(hello=PermanentFailure("Go away", 554, "5.7.1")))
    wire.replies()
    assert wire.send(b"EHLO client.test\r\n") == [(554, None, "Go away")]
    assert wire.codes(b"MAIL FROM:<s@sender.test>\r\n") == [(503, None)]


# --- coroutines ---------------------------------------------------------------------


def test_coroutine_hooks() -> None:
    clock = Clock()

    class Async(Delivery):
        def __init__(self) -> None:
            self.bodies: list[bytes] = []

        async def hello(self, context: Any) -> None:
            await deferLater(clock, 1, lambda: None)

        async def mail_from(self, context: Any, sender: Any, params: Any) -> Outcome | None:
            return None

        async def rcpt_to(self, context: Any, envelope: Any, rcpt: Any, params: Any) -> Any:
            await deferLater(clock, 1, lambda: None)
            if rcpt.local_part == "bob":
                return PermanentFailure("No such user", 550, "5.1.1")
            return None

        async def open_message(self, envelope: Envelope) -> Any:
            owner = self

            @implementer(IMessageSink)
            class AsyncSink(MessageSink):
                async def close(self) -> Outcome:
                    await deferLater(clock, 1, lambda: None)
                    owner.bodies.append(b"done")
                    return Accepted("Stored")

            return AsyncSink(envelope)

    wire = Wire(Async(), clock=clock)
    wire.replies()
    assert wire.codes(b"EHLO client.test\r\n") == []
    assert wire.state == "paused"
    clock.advance(1)
    assert wire.codes(b"") == [(250, None)]
    wire.protocol.dataReceived(MESSAGE)
    for _ in range(3):
        clock.advance(1)
    assert wire.replies() == [
        (250, "2.1.0", "Sender OK"), (550, "5.1.1", "No such user"),
        (250, "2.1.5", "Recipient OK"), (354, None, "End data with <CR><LF>.<CR><LF>"),
        (250, "2.0.0", "Stored")]


# --- outcomes per recipient -------------------------------------------------------------


def test_smtp_one_reply_first_temporary_failure_wins() -> None:
    delivery = Recording()
    delivery.outcome = [Accepted(), TemporaryFailure("Mailbox busy", 452, "4.2.2")]
    wire = greeted(delivery)
    wire.protocol.dataReceived(MESSAGE)
    assert wire.replies()[-1] == (452, "4.2.2", "Mailbox busy")


def test_smtp_one_reply_permanent_failure_when_nothing_is_temporary() -> None:
    delivery = Recording()
    delivery.outcome = [Accepted(), PermanentFailure("Over quota", 552, "5.2.2")]
    wire = greeted(delivery)
    wire.protocol.dataReceived(MESSAGE)
    assert wire.replies()[-1] == (552, "5.2.2", "Over quota")


def test_lmtp_one_reply_per_recipient() -> None:
    delivery = Recording()
    delivery.outcome = [Accepted("Saved for bob"), TemporaryFailure("Over quota", 452, "4.2.2")]
    wire = greeted(delivery, LMTP)
    assert wire.send(MESSAGE + b"QUIT\r\n") == [
        (250, "2.1.0", "Sender OK"), (250, "2.1.5", "Recipient OK"),
        (250, "2.1.5", "Recipient OK"), (354, None, "End data with <CR><LF>.<CR><LF>"),
        (250, "2.0.0", "Saved for bob"), (452, "4.2.2", "Over quota"), (221, "2.0.0", "Bye")]


def test_lmtp_one_outcome_for_all_is_repeated() -> None:
    delivery = Recording()
    delivery.outcome = PermanentFailure("Spam", 550, "5.7.1")
    wire = greeted(delivery, LMTP)
    assert wire.send(MESSAGE)[-2:] == [(550, "5.7.1", "Spam")] * 2


def test_lmtp_wrong_number_of_outcomes_is_451_each() -> None:
    delivery = Recording()
    delivery.outcome = [Accepted()]
    wire = greeted(delivery, LMTP)
    with capturedLogs():
        replies = wire.send(MESSAGE)
    assert [(c, s) for c, s, _ in replies[-2:]] == [(451, "4.3.0")] * 2


@pytest.mark.parametrize(
    ("hook", "outcome", "expected"),
    [
        ("mail_from", PermanentFailure("Sender blocked", 553, "5.7.1"),
         (553, "5.7.1", "Sender blocked")),
        ("mail_from", TemporaryFailure("Try later", 451, "4.7.1"),
         (451, "4.7.1", "Try later")),
        ("mail_from", Accepted("Hi there"), (250, "2.1.0", "Hi there")),
        ("rcpt_to", TemporaryFailure("Greylisted", 450, "4.7.1"),
         (450, "4.7.1", "Greylisted")),
        ("rcpt_to", PermanentFailure("No such user", 550, "5.1.1"),
         (550, "5.1.1", "No such user")),
        ("rcpt_to", Accepted("Sure"), (250, "2.1.5", "Sure")),
        ("close", PermanentFailure("Content rejected", 554, "5.7.1"),
         (554, "5.7.1", "Content rejected")),
        ("close", TemporaryFailure("Disk full", 452, "4.3.1"), (452, "4.3.1", "Disk full")),
        ("close", Accepted("Queued as Q42"), (250, "2.0.0", "Queued as Q42")),
    ],
)
def test_outcomes_map_to_exactly_their_reply(
    hook: str, outcome: Outcome, expected: tuple[int, str, str]
) -> None:
    delivery = Recording(**({} if hook == "close" else {hook: outcome}))
    delivery.outcome = outcome
    wire = greeted(delivery)
    replies = wire.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@example.org>\r\n"
                        b"DATA\r\nbody\r\n.\r\n")
    position = {"mail_from": 0, "rcpt_to": 1, "close": -1}[hook]
    assert replies[position] == expected


# --- logging ------------------------------------------------------------------------------

MARKER = b"ZQX-body-marker-7731"


def _messages(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if "message_id" in e and "recipients" in e]


def _ends(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if "messages" in e and "duration" in e]


def test_one_log_event_per_transaction_and_per_session_without_body() -> None:
    delivery = Recording()
    with capturedLogs() as events:
        wire = greeted(delivery)
        body = b"Subject: " + MARKER + b"\r\n\r\n" + MARKER + b"\r\n.\r\n"
        wire.send(b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.org>\r\n"
                  b"RCPT TO:<carol@example.org>\r\nDATA\r\n" + body)
        delivery.outcome = PermanentFailure("Spam", 554, "5.7.1")
        wire.send(b"MAIL FROM:<>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" + body)
        wire.send(b"QUIT\r\n")
    first, second = _messages(list(events))
    assert first["peer"] == "192.0.2.7" and second["peer"] == "192.0.2.7"
    assert first["sender"] == "alice@sender.test" and second["sender"] == ""
    assert first["recipients"] == ["bob@example.org", "carol@example.org"]
    assert first["size"] == len(body) - 3 and second["size"] == len(body) - 3
    assert (first["code"], first["status"]) == (250, "2.0.0")
    assert (second["code"], second["status"]) == (554, "5.7.1")
    assert first["message_id"] and first["message_id"] != second["message_id"]
    assert first["message_id"] == delivery.sinks[0].envelope.message_id
    [end] = _ends(list(events))
    assert end["peer"] == "192.0.2.7" and end["messages"] == 2
    assert end["session_id"] == first["session_id"]
    for event in events:
        assert MARKER.decode() not in formatEvent(event)
        assert MARKER.decode() not in repr(event)


def _assert_like_logger_info(event: LogEvent, events: list[LogEvent]) -> None:
    """*event* has the keys and level/namespace/source that Logger.info gave the
    "reference" event among *events*."""
    [reference] = [e for e in events if e.get("log_format") == "reference"]
    assert {k for k in event if k.startswith("log_")} == {
        k for k in reference if k.startswith("log_")}
    for key in ("log_level", "log_namespace", "log_source"):
        assert event[key] == reference[key]


def test_message_event_is_a_regular_info_event_with_its_text() -> None:
    """The per-message event is emitted without Logger.info: it must look the same."""
    delivery = Recording()
    with capturedLogs() as events:
        wire = greeted(delivery)
        wire.send(MESSAGE)
        Logger(namespace="maitred_tx.server.protocol").info("reference")
    [event] = _messages(list(events))
    _assert_like_logger_info(event, list(events))
    assert formatEvent(event) == (
        f"192.0.2.7 message {event['message_id']} from <alice@sender.test> to "
        "['bob@example.org', 'carol@example.org']: 250 2.0.0")


def test_no_body_bytes_in_logs_when_things_fail() -> None:
    delivery = Recording()
    body = b"Subject: x\r\n\r\n" + MARKER + b"\r\n.\r\n"
    with capturedLogs() as events:
        wire = greeted(delivery)
        delivery.answers["open_message"] = _raise
        wire.send(MESSAGE[:MESSAGE.index(b"DATA")] + b"DATA\r\n" + body)
        wire.transport.loseConnection()
    assert len(_ends(list(events))) == 1
    for event in events:
        assert MARKER.decode() not in formatEvent(event)
        assert MARKER.decode() not in repr(event)


def test_session_end_is_logged_once_on_timeout() -> None:
    with capturedLogs() as events:
        wire = greeted(MemoryDelivery())
        wire.clock.advance(300)
    [end] = _ends(list(events))
    assert end["messages"] == 0 and end["helo"] == "client.test"


def test_immediate_answers_still_use_deferreds_safely() -> None:
    """A delivery returning already-fired Deferreds behaves like a synchronous one."""
    delivery = Recording(mail_from=lambda sender: succeed(None),
                         rcpt_to=lambda rcpt: succeed(None))
    wire = greeted(delivery)
    assert wire.codes(MESSAGE) == MESSAGE_CODES


def test_refused_recipients_are_logged_once_each() -> None:
    """Refusals by policy (relay) and by the delivery both leave one log event."""

    class NoBob(Delivery):
        def rcpt_to(self, context: Any, envelope: Any, recipient: Any, params: Any) -> Any:
            return PermanentFailure("No such user", 550, "5.1.1")

    wire = greeted(NoBob())
    with capturedLogs() as events:
        codes = wire.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@example.org>\r\n"
                           b"RCPT TO:<x@elsewhere.test>\r\n")
    assert codes == [(250, "2.1.0"), (550, "5.1.1"), (550, "5.7.1")]
    refused = [e for e in events if e.get("verb") == "RCPT"]
    assert [(e["address"], e["code"], e["status"]) for e in refused] == [
        ("bob@example.org", 550, "5.1.1"), ("x@elsewhere.test", 550, "5.7.1")]
    assert all(e["peer"] == "192.0.2.7" for e in refused)


def test_session_end_event_is_a_regular_info_event_with_its_text() -> None:
    """Emitted like the per-message event (no Logger.info): same keys, same text."""
    with capturedLogs() as events:
        wire = greeted(Recording())
        wire.send(b"QUIT\r\n")
        Logger(namespace="maitred_tx.server.protocol").info("reference")
    [event] = _ends(list(events))
    _assert_like_logger_info(event, list(events))
    assert (event["messages"], event["errors"], event["helo"]) == (0, 0, "client.test")
    assert formatEvent(event) == (
        f"192.0.2.7 session {event['session_id']} ended after {event['duration']:.3f}s: "
        "0 messages, 0 errors")


@pytest.mark.parametrize("which", ["protocol", "session"])
def test_with_hello_is_replace_field_by_field(which: str) -> None:
    """protocol._with_hello (SessionContext) and session._info_with_hello (SessionInfo)
    name every field: a field added later and not copied there would be lost at EHLO,
    so each gets a value of its own here."""
    import dataclasses

    from maitred_tx.envelope import SessionContext
    from maitred_tx.server.protocol import _with_hello
    from maitred_tx.smtp.events import SessionInfo
    from maitred_tx.smtp.session import _info_with_hello

    cls, with_hello = {
        "protocol": (SessionContext, _with_hello),
        "session": (SessionInfo, _info_with_hello),
    }[which]
    values: dict[str, Any] = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        values[f.name] = i if f.type in ("int", int) else (
            True if f.type in ("bool", bool) else f"value-{i}")
    before = cls(**values)
    assert with_hello(before, "mx.example", esmtp=False) == dataclasses.replace(
        before, helo="mx.example", esmtp=False)
    assert with_hello(before, "mx.example", esmtp=True).esmtp is True
