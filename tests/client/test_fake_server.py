"""The client against a scripted fake server on loopback: a small Twisted protocol
that answers each verb from a script, so every failure can be placed exactly — 4xx
and 5xx at the greeting, EHLO (then HELO), MAIL, one RCPT, DATA and after the body;
multi-line replies written one byte per read; the connection closed mid-body;
STARTTLS missing or refused; and timeouts on a task.Clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater

from maitred_tx.client import (
    ConnectionLost,
    Outcome,
    ProtocolViolation,
    ResponseTimeout,
    ServerRefused,
    SMTPClient,
    Timeouts,
    TLSMode,
    TLSUnavailable,
)

EHLO = (b"250-fake.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
        b"250 ENHANCEDSTATUSCODES\r\n")
EHLO_TLS = (b"250-fake.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n"
            b"250 ENHANCEDSTATUSCODES\r\n")
SILENT = b""  # a script entry that answers nothing
CLOSE = object()  # a script entry that closes the connection


@dataclass
class Script:
    """Replies per verb ("." is the end of the body); each list is used in order and
    its last entry repeats.  ``split`` writes every reply one byte per read."""

    replies: dict[str, list[Any]]
    greeting: Any = b"220 fake.test ESMTP\r\n"
    split: bool = False
    close_after_body_bytes: int | None = None
    received: list[bytes] = field(default_factory=list)

    def reply(self, verb: str) -> Any:
        default = b"354 go\r\n" if verb == "DATA" else b"250 2.0.0 OK\r\n"
        queue = self.replies.get(verb, [default])
        return queue.pop(0) if len(queue) > 1 else queue[0]


class Scripted(Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.buffer = b""
        self.in_body = False
        self.body_bytes = 0
        self.drip: list[bytes] = []  # split mode: bytes still to write, one per turn

    def connectionMade(self) -> None:
        self.send(self.script.greeting)

    def send(self, what: Any) -> None:
        if what is CLOSE:
            self.transport.loseConnection()
        elif self.script.split and what:
            if not self.drip:
                reactor.callLater(0, self.drip_one)
            self.drip += [what[i : i + 1] for i in range(len(what))]
        elif what:
            self.transport.write(what)

    def drip_one(self) -> None:
        """Write one byte, and the next one a reactor turn later (one per read)."""
        if self.drip and self.transport.connected:
            self.transport.write(self.drip.pop(0))
            if self.drip:
                reactor.callLater(0.0005, self.drip_one)

    def dataReceived(self, data: bytes) -> None:
        self.script.received.append(data)
        self.buffer += data
        while True:
            if self.in_body:
                if not self.body():
                    return
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            verb = line.split(b" ", 1)[0].decode().upper()
            what = self.script.reply(verb)
            self.send(what)
            if verb == "DATA" and isinstance(what, bytes) and what.startswith(b"354"):
                self.in_body = True
                self.buffer = b"\r\n" + self.buffer  # DATA's CRLF starts the first line

    def body(self) -> bool:
        limit = self.script.close_after_body_bytes
        if limit is not None and self.body_bytes + len(self.buffer) >= limit:
            self.transport.loseConnection()
            self.buffer = b""
            return False
        end = self.buffer.find(b"\r\n.\r\n")
        if end < 0:
            self.body_bytes += len(self.buffer) - 4
            self.buffer = self.buffer[-4:]
            return False
        self.buffer = self.buffer[end + 5 :]
        self.in_body = False
        self.send(self.script.reply("."))
        return True


@pytest.fixture
def fake() -> Any:
    listeners: list[Any] = []

    def start(script: Script) -> int:
        listener = reactor.listenTCP(0, Factory.forProtocol(lambda: Scripted(script)),
                                     interface="127.0.0.1")
        listeners.append(listener)
        return listener.getHost().port

    yield start
    for listener in listeners:
        stopped = listener.stopListening()
        if isinstance(stopped, Deferred):
            pytest_twisted.blockon(stopped)


async def connect(port: int, **kw: Any) -> SMTPClient:
    kw.setdefault("tls", TLSMode.NONE)
    return await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{port}", helo="client.test", **kw)


def outcomes(result) -> list[tuple[str, Outcome, int | None]]:
    return [(r.recipient, r.outcome, r.reply.code if r.reply else None)
            for r in result.recipients]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("greeting", "permanent"), [
    (b"554 5.3.2 fake.test no service here\r\n", True),
    (b"421-4.3.2 fake.test busy,\r\n421 4.3.2 try later\r\n", False)])
async def test_refused_greeting(fake, greeting, permanent):
    port = fake(Script({}, greeting=greeting))
    with pytest.raises(ServerRefused) as caught:
        await connect(port)
    assert caught.value.permanent is permanent
    assert caught.value.reply.code == int(greeting[:3])


@pytest_twisted.ensureDeferred
async def test_ehlo_refused_then_helo(fake):
    script = Script({"EHLO": [b"500 5.5.2 What?\r\n"], "HELO": [b"250 fake.test\r\n"]})
    client = await connect(fake(script))
    assert not client.extensions.esmtp
    result = await client.send("a@b.org", ["x@y.org"], b"Subject: old\r\n\r\nhi\r\n")
    await client.quit()
    assert result.all_delivered
    wire = b"".join(script.received)
    assert b"EHLO client.test\r\nHELO client.test\r\nMAIL FROM:<a@b.org>\r\n" in wire
    assert b"BODY=" not in wire and b"\r\nRCPT TO:<x@y.org>\r\nDATA\r\n" in wire


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("split", [False, True])
async def test_failures_at_each_step_with_multi_line_replies(fake, split):
    """MAIL ok, the 2nd RCPT 4xx in three lines, the 3rd 5xx, DATA 354, then a 4xx
    after the body; written whole, then one byte per read."""
    script = Script({
        "EHLO": [EHLO],
        "MAIL": [b"250 2.1.0 OK\r\n"],
        "RCPT": [b"250 2.1.5 OK\r\n",
                 b"450-4.2.1 Mailbox busy,\r\n450-4.2.1 come back\r\n450 4.2.1 later\r\n",
                 b"550 5.1.1 No such user\r\n", b"250 2.1.5 OK\r\n"],
        "DATA": [b"354 Go ahead\r\n"],
        ".": [b"451-4.3.0 Queue full\r\n451 4.3.0 try again\r\n", b"250 2.0.0 Queued\r\n"],
    }, split=split)
    client = await connect(fake(script))
    rcpts = ["a@x.org", "busy@x.org", "gone@x.org", "b@x.org"]
    first = await client.send("s@x.org", rcpts, b"Subject: 1\r\n\r\nhi\r\n")
    assert outcomes(first) == [("a@x.org", Outcome.TEMPORARY, 451),
                               ("busy@x.org", Outcome.TEMPORARY, 450),
                               ("gone@x.org", Outcome.PERMANENT, 550),
                               ("b@x.org", Outcome.TEMPORARY, 451)]
    assert first["busy@x.org"].reply.lines == ("Mailbox busy,", "come back", "later")
    assert first.data_reply.status == "4.3.0"
    second = await client.send("s@x.org", ["a@x.org"], b"Subject: 2\r\n\r\nhi\r\n")
    assert second.all_delivered
    await client.quit()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("step", "reply", "kind"), [
    ("MAIL", b"451 4.3.0 Try later\r\n", Outcome.TEMPORARY),
    ("MAIL", b"553 5.1.8 Sender refused\r\n", Outcome.PERMANENT),
    ("DATA", b"554 5.5.1 No thanks\r\n", Outcome.PERMANENT),
    ("DATA", b"451 4.3.0 Not now\r\n", Outcome.TEMPORARY),
])
async def test_refusal_at_mail_or_data(fake, step, reply, kind):
    need_mail = b"503 5.5.1 Need MAIL first\r\n"
    replies = {"EHLO": [EHLO], "DATA": [b"354 go\r\n"], step: [reply, b"250 2.0.0 OK\r\n"]}
    if step == "MAIL":  # as a real server: nothing goes after a refused MAIL
        replies.update(RCPT=[need_mail, b"250 2.1.5 OK\r\n"],
                       DATA=[need_mail, b"354 go\r\n"])
    else:
        replies["DATA"] = [reply, b"354 go\r\n"]
    script = Script(replies)
    client = await connect(fake(script))
    result = await client.send("s@x.org", ["a@x.org", "b@x.org"], b"Subject: x\r\n\r\nhi\r\n")
    assert outcomes(result) == [("a@x.org", kind, int(reply[:3])),
                                ("b@x.org", kind, int(reply[:3]))]
    wire = b"".join(script.received)
    assert b"Subject: x" not in wire  # no body after a refusal
    again = await client.send("s@x.org", ["a@x.org"], b"Subject: y\r\n\r\nhi\r\n")
    assert again.all_delivered
    # After a refused DATA the MAIL is still open at the server: RSET first.
    assert (b"RSET\r\nMAIL FROM" in b"".join(script.received)) is (step == "DATA")
    await client.quit()


@pytest_twisted.ensureDeferred
async def test_all_rcpt_refused_with_pipelined_354_sends_a_lone_dot(fake):
    script = Script({"EHLO": [EHLO], "RCPT": [b"550 5.1.1 no\r\n"],
                     "DATA": [b"354 go\r\n"], ".": [b"554 5.5.1 no valid recipients\r\n"]})
    client = await connect(fake(script))
    result = await client.send("s@x.org", ["a@x.org"], b"Subject: x\r\n\r\nsecret\r\n")
    await client.quit()
    assert outcomes(result) == [("a@x.org", Outcome.PERMANENT, 550)]
    wire = b"".join(script.received)
    assert b"DATA\r\n.\r\n" in wire and b"secret" not in wire


@pytest_twisted.ensureDeferred
async def test_connection_closed_mid_body(fake):
    script = Script({"EHLO": [EHLO], "DATA": [b"354 go\r\n"]}, close_after_body_bytes=200_000)
    client = await connect(fake(script))
    body = b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n"
    result = await client.send("s@x.org", ["a@x.org", "b@x.org"], body * 1000)
    assert outcomes(result) == [("a@x.org", Outcome.TEMPORARY, None),
                                ("b@x.org", Outcome.TEMPORARY, None)]
    assert isinstance(result.error, ConnectionLost) and result.error.temporary
    assert not client.connected
    with pytest.raises(ConnectionLost):
        await client.send("s@x.org", ["a@x.org"], b"x\r\n")
    assert await client.quit() is None


@pytest_twisted.ensureDeferred
async def test_starttls_not_offered(fake):
    with pytest.raises(TLSUnavailable, match="does not offer STARTTLS") as caught:
        await connect(fake(Script({"EHLO": [EHLO]})), tls=TLSMode.REQUIRED,
                      tls_hostname="fake.test")
    assert caught.value.temporary
    client = await connect(fake(Script({"EHLO": [EHLO]})), tls=TLSMode.OPPORTUNISTIC,
                           tls_hostname="fake.test")
    assert not client.tls
    await client.quit()


@pytest_twisted.ensureDeferred
async def test_starttls_refused(fake):
    refusing = {"EHLO": [EHLO_TLS], "STARTTLS": [b"454 4.7.0 TLS not available\r\n"]}
    with pytest.raises(TLSUnavailable, match="refused STARTTLS") as caught:
        await connect(fake(Script(dict(refusing))), tls=TLSMode.REQUIRED,
                      tls_hostname="fake.test")
    assert caught.value.reply.code == 454
    script = Script(dict(refusing))
    client = await connect(fake(script), tls=TLSMode.OPPORTUNISTIC, tls_hostname="fake.test")
    assert not client.tls  # opportunistic: on in the clear
    assert (await client.send("s@x.org", ["a@x.org"], b"Subject: x\r\n\r\nhi\r\n")).delivered
    await client.quit()
    assert b"STARTTLS\r\n" in b"".join(script.received)


@pytest_twisted.ensureDeferred
async def test_data_after_the_starttls_reply_is_refused(fake):
    script = Script({"EHLO": [EHLO_TLS],
                     "STARTTLS": [b"220 2.0.0 Ready\r\n250-injected\r\n250 PIPELINING\r\n"]})
    with pytest.raises(ProtocolViolation, match="after its STARTTLS reply"):
        await connect(fake(script), tls=TLSMode.OPPORTUNISTIC, tls_hostname="fake.test")


@pytest_twisted.ensureDeferred
async def test_timeouts_on_a_clock(fake):
    script = Script({"EHLO": [EHLO], "MAIL": [SILENT], "RCPT": [SILENT], "DATA": [SILENT]})
    clock = Clock()
    client = await connect(fake(script), clock=clock, timeouts=Timeouts(mail=30))
    sent = Deferred.fromCoroutine(
        client.send("s@x.org", ["a@x.org"], b"Subject: x\r\n\r\nhi\r\n"))
    await deferLater(reactor, 0.05, lambda: None)  # the batch reaches the server
    clock.advance(29)
    assert not sent.called
    clock.advance(1)
    result = await sent
    assert isinstance(result.error, ResponseTimeout) and "(mail)" in str(result.error)
    assert outcomes(result) == [("a@x.org", Outcome.TEMPORARY, None)]


@pytest_twisted.ensureDeferred
async def test_greeting_timeout_on_a_clock(fake):
    clock = Clock()
    connecting = Deferred.fromCoroutine(connect(fake(Script({}, greeting=SILENT)), clock=clock))
    await deferLater(reactor, 0.05, lambda: None)
    clock.advance(300)
    with pytest.raises(ResponseTimeout, match="greeting"):
        await connecting


@pytest_twisted.ensureDeferred
async def test_custom_command_and_unknown_extension(fake):
    ehlo = b"250-fake.test\r\n250-XFOO bar baz\r\n250 ENHANCEDSTATUSCODES\r\n"
    script = Script({"EHLO": [ehlo], "XFOO": [b"250-2.0.0 one\r\n250 2.0.0 two\r\n"]},
                    split=True)
    client = await connect(fake(script))
    assert client.extensions.params("XFOO") == ("bar", "baz")
    reply = await client.command("XFOO hello")
    assert (reply.code, reply.status, reply.lines) == (250, "2.0.0", ("one", "two"))
    await client.quit()
