"""LMTPDelivery against maitred_tx's own LMTP listener on 127.0.0.1 (a real server that
can be made to refuse, hang or drop): what reaches it, byte for byte and with which
parameters; each recipient's outcome; timeouts; the connection pool (reuse, a limit,
a stale connection retried once, never twice); RCPT-time verification; the mapping of
replies and client errors to outcomes; twistd's --delivery lmtp:ENDPOINT.

Dovecot itself is in tests/interop/test_lmtp_dovecot.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols import portforward

from maitred_tx.client import ExtensionUnsupported, MessageTooBig, ServerReply, Timeouts
from maitred_tx.client.errors import ConnectionLost, ResponseTimeout
from maitred_tx.client.extensions import NO_EXTENSIONS
from maitred_tx.delivery.lmtp import (
    LOST,
    NO_ANSWER,
    UNAVAILABLE,
    LMTPDelivery,
    _Probe,
    outcome_for_error,
    outcome_for_reply,
)
from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.outcomes import Accepted, PermanentFailure, TemporaryFailure
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.address import parse_forward_path, parse_reverse_path
from maitred_tx.smtp.config import Config, Mode
from maitred_tx.smtp.params import BodyType, MailParams, Notify, RcptParams, Ret

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: lmtp\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".a line that starts with a dot\r\n"
    b"bye\r\n"
)


# -- the LMTP server: maitred in Mode.LMTP ---------------------------------------------


class Downstream(MemoryDelivery):
    """Stores messages; "full" gets 452 4.2.2 after the body, "gone" 550 5.1.1 at RCPT,
    "slow" an answer that never comes."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpts: list[str] = []

    def rcpt_to(self, context: Any, envelope: Any, recipient: Any, params: Any) -> Any:
        self.rcpts.append(str(recipient))
        if recipient.local_part == "gone":
            return PermanentFailure("No such user here", 550, "5.1.1")
        return None

    def open_message(self, envelope: Envelope) -> Any:
        sink = super().open_message(envelope)
        close = sink.close

        def per_recipient() -> Any:
            close()
            if any(r.mailbox.local_part == "slow" for r in envelope.recipients):
                return Deferred()  # never answers
            full = TemporaryFailure("Mailbox full", 452, "4.2.2")
            return [full if r.mailbox.local_part == "full" else Accepted()
                    for r in envelope.recipients]

        sink.close = per_recipient  # type: ignore[method-assign]
        return sink


@dataclass
class Server:
    delivery: Downstream
    port: int
    factory: SMTPFactory

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}:timeout=5"


@pytest.fixture
def downstream() -> Iterator[Callable[[], Server]]:
    started: list[tuple[SMTPFactory, Any]] = []

    def start() -> Server:
        delivery = Downstream()
        factory = SMTPFactory(reactor, Config(hostname="lmtp.test", mode=Mode.LMTP,
                                              local_domains=frozenset({"localhost"})),
                              delivery)
        listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        started.append((factory, listener))
        return Server(delivery, listener.getHost().port, factory)

    yield start
    for factory, listener in started:
        factory.shutdown()
        pytest_twisted.blockon(listener.stopListening())


@pytest.fixture
def lmtp() -> Iterator[Callable[..., LMTPDelivery]]:
    made: list[LMTPDelivery] = []

    def make(endpoint: str, **kw: Any) -> LMTPDelivery:
        kw.setdefault("received", False)
        made.append(LMTPDelivery(reactor, endpoint, lhlo="mx.test", **kw))
        return made[-1]

    yield make
    for delivery in made:
        pytest_twisted.blockon(delivery.close())


def envelope(*recipients: str, sender: str | None = "<alice@example.org>",
             params: MailParams | None = None,
             rcpt_params: RcptParams | None = None) -> Envelope:
    context = SessionContext(session_id="s1", hostname="mx.test", peer_host="192.0.2.7",
                             peer_port=2525, helo="client.test", esmtp=True)
    return Envelope(
        session=context, message_id="Q1",
        sender=None if sender is None else parse_reverse_path(sender, smtputf8=True),
        params=params or MailParams(),
        recipients=tuple(Recipient(parse_forward_path(r, smtputf8=True),
                                   rcpt_params or RcptParams()) for r in recipients),
        received_at=1_700_000_000.0,
    )


async def deliver(delivery: LMTPDelivery, env: Envelope, *pieces: bytes) -> Any:
    sink = delivery.open_message(env)
    for piece in pieces or (MESSAGE,):
        sink.write(piece)
    return await sink.close()


def wait(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


# -- what reaches the LMTP server --------------------------------------------------------


@pytest.mark.parametrize("split", ["whole", "lines", "bytes"])
@pytest_twisted.ensureDeferred
async def test_the_same_bytes_arrive_however_they_were_written(downstream, lmtp,
                                                               split: str) -> None:
    server = downstream()
    pieces = {"whole": [MESSAGE], "lines": MESSAGE.splitlines(keepends=True),
              "bytes": [MESSAGE[i : i + 1] for i in range(len(MESSAGE))]}[split]
    outcomes = await deliver(lmtp(server.endpoint), envelope("<bob@localhost>"), *pieces)
    assert outcomes == [Accepted()]
    (stored,) = server.delivery.messages
    assert stored.body == MESSAGE
    assert str(stored.envelope.sender) == "alice@example.org"
    assert stored.envelope.session.helo == "mx.test"
    assert stored.envelope.params.body is None  # 7-bit text: no BODY= (split CRLFs too)


@pytest_twisted.ensureDeferred
async def test_received_field_comes_first(downstream, lmtp) -> None:
    server = downstream()
    await deliver(lmtp(server.endpoint, received=True), envelope("<bob@localhost>"))
    body = server.delivery.messages[0].body
    assert body.startswith(b"Received: from client.test ([192.0.2.7])\r\n"
                           b"\tby mx.test (maitred_tx) with ESMTP id Q1\r\n"
                           b"\tfor <bob@localhost>;\r\n")
    assert body.endswith(b"\r\n" + MESSAGE)


@pytest_twisted.ensureDeferred
async def test_body_type_follows_the_content(downstream, lmtp) -> None:
    server = downstream()
    delivery = lmtp(server.endpoint)
    eight = MESSAGE.replace(b"Hello", "Grüße".encode())
    binary = b"Subject: raw\r\n\r\nbare\nLF and a NUL \0\r\n"
    assert await deliver(delivery, envelope("<bob@localhost>"), eight) == [Accepted()]
    assert await deliver(delivery, envelope("<bob@localhost>"), binary) == [Accepted()]
    first, second = server.delivery.messages
    assert (first.body, first.envelope.params.body) == (eight, BodyType.EIGHT_BIT_MIME)
    # maitred offers BINARYMIME: the binary body goes by BDAT, octet for octet
    assert (second.body, second.envelope.params.body) == (binary, BodyType.BINARY_MIME)
    assert second.envelope.chunked


@pytest_twisted.ensureDeferred
async def test_dsn_parameters_and_null_sender_are_passed_on(downstream, lmtp) -> None:
    server = downstream()
    env = envelope("<bob@localhost>", sender=None,
                   params=MailParams(ret=Ret.HDRS, envid="QQ314159"),
                   rcpt_params=RcptParams(notify=frozenset({Notify.SUCCESS, Notify.FAILURE}),
                                          orcpt=("rfc822", "bob@example.org")))
    assert await deliver(lmtp(server.endpoint), env) == [Accepted()]
    stored = server.delivery.messages[0].envelope
    assert stored.sender is None
    assert (stored.params.ret, stored.params.envid) == (Ret.HDRS, "QQ314159")
    assert stored.recipients[0].params == RcptParams(
        notify=frozenset({Notify.SUCCESS, Notify.FAILURE}), orcpt=("rfc822", "bob@example.org"))


@pytest_twisted.ensureDeferred
async def test_smtputf8_is_asked_for_when_the_server_has_it(downstream, lmtp) -> None:
    server = downstream()
    env = envelope("<jörg@localhost>", params=MailParams(smtputf8=True))
    assert await deliver(lmtp(server.endpoint), env) == [Accepted()]
    stored = server.delivery.messages[0].envelope
    assert stored.params.smtputf8
    assert str(stored.recipients[0].mailbox) == "jörg@localhost"


# -- one outcome per recipient -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_each_recipient_gets_the_servers_answer(downstream, lmtp) -> None:
    server = downstream()
    outcomes = await deliver(lmtp(server.endpoint),
                             envelope("<bob@localhost>", "<gone@localhost>", "<full@localhost>"))
    assert outcomes == [
        Accepted(),
        PermanentFailure("No such user here", 550, "5.1.1"),  # its RCPT refusal
        TemporaryFailure("Mailbox full", 452, "4.2.2"),  # its reply after the body
    ]
    assert len(server.delivery.messages) == 1


@pytest_twisted.ensureDeferred
async def test_no_answer_after_the_body_is_451_and_the_connection_is_not_reused(
        downstream, lmtp) -> None:
    server = downstream()
    delivery = lmtp(server.endpoint, timeouts=Timeouts(data_done=0.3))
    with capturedLogs() as events:
        outcomes = await deliver(delivery, envelope("<slow@localhost>"))
    assert outcomes == [NO_ANSWER]
    assert (NO_ANSWER.code, NO_ANSWER.status) == (451, "4.4.2")
    logged = [formatEvent(e) for e in events if "-> 451" in formatEvent(e)]
    assert logged == [f"lmtp {server.endpoint}: Q1 -> 451 4.4.2"], logged
    assert await deliver(delivery, envelope("<bob@localhost>")) == [Accepted()]
    assert delivery.connections_made == 2


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_451_4_4_1(lmtp, tmp_path: Path) -> None:
    delivery = lmtp(f"unix:{tmp_path / 'nothing-here'}:timeout=2")
    with capturedLogs() as events:
        outcomes = await deliver(delivery, envelope("<bob@localhost>", "<carol@localhost>"))
    assert outcomes == [UNAVAILABLE, UNAVAILABLE]
    assert (UNAVAILABLE.code, UNAVAILABLE.status) == (451, "4.4.1")
    warned = [formatEvent(e) for e in events if "not done" in e.get("log_format", "")]
    assert len(warned) == 1 and "cannot connect" in warned[0], warned


@pytest_twisted.ensureDeferred
async def test_aborted_message_sends_nothing(downstream, lmtp) -> None:
    server = downstream()
    delivery = lmtp(server.endpoint)
    sink = delivery.open_message(envelope("<bob@localhost>"))
    sink.write(MESSAGE)
    sink.abort()
    sink.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        sink.close()
    assert delivery.connections_made == 0 and server.delivery.messages == []


# -- the connection pool --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_messages_share_the_connections_allowed(downstream, lmtp) -> None:
    server = downstream()
    delivery = lmtp(server.endpoint, max_connections=1)
    sinks = [delivery.open_message(envelope(f"<user{i}@localhost>")) for i in range(4)]
    for sink in sinks:
        sink.write(MESSAGE)
    results = await gatherResults([sink.close() for sink in sinks])
    assert results == [[Accepted()]] * 4
    assert delivery.connections_made == 1
    assert [str(m.envelope.recipients[0].mailbox) for m in server.delivery.messages] == [
        f"user{i}@localhost" for i in range(4)]
    two = lmtp(server.endpoint, max_connections=2)
    sinks = [two.open_message(envelope(f"<user{i}@localhost>")) for i in range(4)]
    for sink in sinks:
        sink.write(MESSAGE)
    assert await gatherResults([sink.close() for sink in sinks]) == [[Accepted()]] * 4
    assert two.connections_made == 2


@pytest_twisted.ensureDeferred
async def test_a_message_waiting_for_a_failed_connection_gets_its_own_try(
        lmtp, tmp_path: Path) -> None:
    # Review fix: the waiter was woken while the failed connection still held the only
    # slot, queued itself again, and nothing ever woke it: the message hung.
    delivery = lmtp(f"unix:{tmp_path / 'nothing-here'}:timeout=2", max_connections=1)
    sinks = [delivery.open_message(envelope(f"<user{i}@localhost>")) for i in range(3)]
    for sink in sinks:
        sink.write(MESSAGE)
    closing = gatherResults([sink.close() for sink in sinks])
    closing.addTimeout(5, reactor)
    assert await closing == [[UNAVAILABLE]] * 3


class Flaky(portforward.ProxyServer):
    """Forwards to the LMTP server; a connection in ``factory.doomed``, or any when
    ``factory.drop_mail`` is set, is cut (without a reply) when MAIL comes."""

    def connectionMade(self) -> None:
        self.factory.opened.append(self)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self in self.factory.doomed or (self.factory.drop_mail and b"MAIL FROM" in data):
            self.transport.abortConnection()
            if self.peer is not None:
                self.peer.transport.loseConnection()
            return
        super().dataReceived(data)


@dataclass
class Proxy:
    factory: Any
    port: int
    listener: Any = field(repr=False)

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}:timeout=5"


@pytest.fixture
def proxy() -> Iterator[Callable[[int], Proxy]]:
    listeners: list[Any] = []

    def start(port: int) -> Proxy:
        factory = portforward.ProxyFactory("127.0.0.1", port)
        factory.protocol = Flaky
        factory.opened, factory.doomed, factory.drop_mail = [], set(), False
        listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        listeners.append(listener)
        return Proxy(factory, listener.getHost().port, listener)

    yield start
    for listener in listeners:
        pytest_twisted.blockon(listener.stopListening())


@pytest_twisted.ensureDeferred
async def test_a_reused_connection_found_closed_is_retried_once(downstream, proxy,
                                                                lmtp) -> None:
    server = downstream()
    front = proxy(server.port)
    delivery = lmtp(front.endpoint, idle_timeout=30)
    assert await deliver(delivery, envelope("<bob@localhost>")) == [Accepted()]
    # The server "closes" the idle connection just as our MAIL goes out: a race no
    # check before sending can close.  Nothing reached it, so a new connection is safe.
    front.factory.doomed = set(front.factory.opened)
    with capturedLogs() as events:
        assert await deliver(delivery, envelope("<carol@localhost>")) == [Accepted()]
    assert [str(m.envelope.recipients[0].mailbox) for m in server.delivery.messages] == [
        "bob@localhost", "carol@localhost"]  # once each
    assert (len(front.factory.opened), delivery.connections_made) == (2, 2)
    assert any("retrying on a new connection" in formatEvent(e) for e in events)


@pytest_twisted.ensureDeferred
async def test_a_new_connection_that_fails_is_not_retried(downstream, proxy, lmtp) -> None:
    server = downstream()
    front = proxy(server.port)
    delivery = lmtp(front.endpoint, idle_timeout=30)
    assert await deliver(delivery, envelope("<bob@localhost>")) == [Accepted()]
    front.factory.drop_mail = True  # the reused connection and the new one fail alike
    assert await deliver(delivery, envelope("<carol@localhost>")) == [LOST]
    assert (LOST.code, LOST.status) == (451, "4.4.2")
    assert len(front.factory.opened) == 2  # one retry, not more
    assert len(server.delivery.messages) == 1


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed_after_idle_timeout(downstream, lmtp) -> None:
    server = downstream()
    delivery = lmtp(server.endpoint, idle_timeout=0.1)
    assert await deliver(delivery, envelope("<bob@localhost>")) == [Accepted()]
    assert len(server.factory.connections) == 1
    for _ in range(100):
        if not server.factory.connections:
            break
        await wait(0.02)
    assert not server.factory.connections  # we sent QUIT
    assert await deliver(delivery, envelope("<bob@localhost>")) == [Accepted()]
    assert delivery.connections_made == 2


# -- RCPT-time verification ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_verify_asks_the_server_about_each_recipient(downstream, lmtp) -> None:
    server = downstream()
    delivery = lmtp(server.endpoint, verify_recipients=True)
    context = envelope("<x@localhost>").session
    bob, gone = (parse_forward_path(a, smtputf8=True) for a in ("<bob@localhost>",
                                                                  "<gone@localhost>"))
    assert await delivery.rcpt_to(context, envelope(), bob, RcptParams()) is None
    assert await delivery.rcpt_to(context, envelope(), gone, RcptParams()) == PermanentFailure(
        "No such user here", 550, "5.1.1")
    assert server.delivery.rcpts == ["bob@localhost", "gone@localhost"]
    assert server.delivery.messages == [] and delivery.connections_made == 1
    # the probes' RSET left the connection clean for a message
    assert await deliver(delivery, envelope("<bob@localhost>")) == [Accepted()]
    assert delivery.connections_made == 1
    assert lmtp(server.endpoint).rcpt_to(context, envelope(), gone, RcptParams()) is None


@pytest_twisted.ensureDeferred
async def test_verify_retries_a_reused_connection_found_closed(downstream, proxy,
                                                               lmtp) -> None:
    server = downstream()
    front = proxy(server.port)
    delivery = lmtp(front.endpoint, verify_recipients=True, idle_timeout=30)
    bob = parse_forward_path("<bob@localhost>", smtputf8=True)
    assert await delivery.verify(bob) is None
    front.factory.doomed = set(front.factory.opened)
    assert await delivery.verify(bob) is None
    assert server.delivery.rcpts == ["bob@localhost", "bob@localhost"]
    assert len(front.factory.opened) == 2


@pytest_twisted.ensureDeferred
async def test_a_probe_that_fails_unexpectedly_gives_its_connection_back(
        downstream, lmtp, monkeypatch: pytest.MonkeyPatch) -> None:
    # Review fix: only SMTPClientError released the connection; any other error kept
    # its slot for ever, and with every slot gone every message waited for ever.
    server = downstream()
    delivery = lmtp(server.endpoint, verify_recipients=True, max_connections=1)
    bob = parse_forward_path("<bob@localhost>", smtputf8=True)

    def broken(self: Any) -> bytes:
        raise KeyError("a bug in the probe")

    with monkeypatch.context() as patch:
        patch.setattr(_Probe, "start", broken)
        with pytest.raises(KeyError):
            await delivery.verify(bob)
    verified: Deferred[Any] = Deferred.fromCoroutine(delivery.verify(bob))
    verified.addTimeout(5, reactor)
    assert await verified is None
    assert server.delivery.rcpts[-1] == "bob@localhost"


@pytest_twisted.ensureDeferred
async def test_verify_when_the_server_is_down_is_temporary(lmtp, tmp_path: Path) -> None:
    delivery = lmtp(f"unix:{tmp_path / 'nothing-here'}", verify_recipients=True)
    bob = parse_forward_path("<bob@localhost>", smtputf8=True)
    assert await delivery.verify(bob) == UNAVAILABLE


class FakeClient:
    """What _Probe reads of a client: the session's RSET need, PIPELINING."""

    def __init__(self, needs_rset: bool, pipelining: bool) -> None:
        self.session = type("S", (), {"needs_rset": needs_rset})()
        self.extensions = replace(NO_EXTENSIONS, pipelining=pipelining)


def reply(code: int, status: str | None = None, text: str = "x") -> ServerReply:
    return ServerReply(code, status, (text,))


def test_probe_without_pipelining_sends_one_command_per_reply() -> None:
    probe = _Probe("bob@localhost", FakeClient(needs_rset=True, pipelining=False))
    assert probe.start() == b"RSET\r\n"
    assert probe.on_reply(reply(250)) == b"MAIL FROM:<>\r\n"
    assert probe.on_reply(reply(250)) == b"RCPT TO:<bob@localhost>\r\n"
    assert probe.on_reply(reply(550, "5.1.1", "unknown")) == b"RSET\r\n"
    assert not probe.done
    assert probe.on_reply(reply(250)) == b"" and probe.done
    assert probe.outcome() == PermanentFailure("unknown", 550, "5.1.1")


def test_probe_pipelined_and_a_refused_null_sender() -> None:
    probe = _Probe("bob@localhost", FakeClient(needs_rset=False, pipelining=True))
    assert probe.start() == b"MAIL FROM:<>\r\nRCPT TO:<bob@localhost>\r\nRSET\r\n"
    for r in (reply(550, "5.7.1"), reply(503, "5.5.1"), reply(250)):
        assert probe.on_reply(r) == b""
    assert probe.done
    assert probe.outcome() is None  # cannot be asked: the message's own RCPT decides
    closing = _Probe("bob@localhost", FakeClient(needs_rset=False, pipelining=True))
    closing.start()
    with pytest.raises(ConnectionLost):
        closing.on_reply(reply(421, "4.3.2"))


# -- replies and errors as outcomes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (reply(250, "2.0.0", "<bob@x> Saved"), Accepted()),
        (reply(550, "5.1.1", "User doesn't exist"),
         PermanentFailure("User doesn't exist", 550, "5.1.1")),
        (reply(552, "5.2.2", "Quota exceeded"), PermanentFailure("Quota exceeded", 552, "5.2.2")),
        (reply(554, None, "no"), PermanentFailure("no", 554, "5.0.0")),
        (reply(501, "5.5.4", "bad"), PermanentFailure("bad", 550, "5.5.4")),  # 55x only
        (reply(452, "4.2.2", "full"), TemporaryFailure("full", 452, "4.2.2")),
        (reply(421, "4.3.2", "bye"), TemporaryFailure("bye", 451, "4.3.2")),  # not ours
        (reply(451, None, ""), TemporaryFailure("LMTP server: try again later", 451, "4.0.0")),
        (ServerReply(550, "5.1.1", ("line one", "line two\x1b[31m\r250 2.0.0 forged")),
         PermanentFailure("line one line two?[31m?250 2.0.0 forged", 550, "5.1.1")),
        (reply(550, "5.1.1", "é" * 500), PermanentFailure("?" * 400, 550, "5.1.1")),
        (None, LOST),
    ],
)
def test_outcome_for_reply(answer: ServerReply | None, outcome: Any) -> None:
    assert outcome_for_reply(answer) == outcome


def test_outcome_for_errors() -> None:
    assert outcome_for_reply(None, ResponseTimeout("slow")) == NO_ANSWER
    assert outcome_for_error(MessageTooBig("big")) == PermanentFailure(
        "Message too big for the LMTP server", 552, "5.3.4")
    assert outcome_for_error(ExtensionUnsupported("SMTPUTF8", "x")).status == "5.6.7"
    assert outcome_for_error(ExtensionUnsupported("BINARYMIME", "x")) == PermanentFailure(
        "The LMTP server does not support BINARYMIME, which this message needs", 554, "5.6.3")
    assert outcome_for_error(ConnectionLost("gone")) == LOST
    assert outcome_for_error(ResponseTimeout("slow")) == NO_ANSWER


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="bad LMTP endpoint 'bogus:x'"):
        LMTPDelivery(reactor, "bogus:x")
    with pytest.raises(ValueError, match=r"bad LMTP endpoint 'tcp:127\.0\.0\.1'"):
        LMTPDelivery(reactor, "tcp:127.0.0.1")
    with pytest.raises(ValueError, match="not supported"):
        LMTPDelivery(reactor, "tls:127.0.0.1:24")
    with pytest.raises(ValueError, match="max_connections"):
        LMTPDelivery(reactor, "tcp:127.0.0.1:24", max_connections=0)


def test_twistd_delivery_lmtp() -> None:
    from twisted.python.usage import UsageError

    from maitred_tx.tap import Options, load_delivery

    options = Options()
    options.parseOptions(["--delivery", "lmtp:unix:/run/dovecot/lmtp", "--hostname",
                          "mx.example.com"])
    delivery = load_delivery(options, reactor)
    assert isinstance(delivery, LMTPDelivery)
    assert (delivery.endpoint, delivery.lhlo) == ("unix:/run/dovecot/lmtp", "mx.example.com")
    options = Options()
    options.parseOptions(["--delivery", "lmtp:tcp:127.0.0.1"])
    with pytest.raises(UsageError, match=r"--delivery lmtp:tcp:127\.0\.0\.1: bad LMTP endpoint"):
        load_delivery(options, reactor)
    with pytest.raises(UsageError, match="or lmtp:ENDPOINT"):
        Options().parseOptions(["--delivery", "lmpt:unix:/x"])
