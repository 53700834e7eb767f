"""LMTPDelivery against a real Dovecot (dovecot-lmtpd, started per test on a UNIX socket
and 127.0.0.1, see dovecot_support.py), with a real maitred in front on 127.0.0.1 and
real senders: smtplib (SMTP) and maitred_tx.client (LMTP).

What is checked: the message lands in the user's Maildir with exactly our body (and
Dovecot's Return-Path/Delivered-To, our Received:); Dovecot's per-recipient 550 5.1.1
comes back through an LMTP listener as 550 5.1.1 and, per the IMessageSink rule,
decides an SMTP listener's one reply; with verify_recipients it is refused at RCPT;
Dovecot down means 451 4.4.1 and the message arrives once it is back; TCP works too; a
20 MB message streams with bounded memory; consecutive messages share one connection,
which is closed when idle, and a connection Dovecot drops is replaced; what Dovecot
cannot take (BINARYMIME, SMTPUTF8) is refused for good; and ``twistd -n maitred
--delivery lmtp:unix:...`` does all this as deployed.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import smtplib
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from dovecot_support import Dovecot, needs_dovecot, run_dovecot
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from maitred_tx.client import Outcome, SMTPClient, TLSMode
from maitred_tx.delivery.lmtp import LMTPDelivery
from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.outcomes import Accepted, PermanentFailure
from maitred_tx.smtp.address import parse_forward_path, parse_reverse_path
from maitred_tx.smtp.config import Config, Limits, Mode
from maitred_tx.smtp.params import MailParams

pytestmark = needs_dovecot

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@localhost\r\n"
    b"Subject: to dovecot\r\n"
    b"Message-ID: <lmtp-1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot\r\n"
    b"bye\r\n"
)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    yield from run_dovecot(("bob", "carol"))


@pytest.fixture
def lmtp() -> Iterator[Callable[..., LMTPDelivery]]:
    """``lmtp(endpoint, **kw)``: an LMTPDelivery closed after the test."""
    made: list[LMTPDelivery] = []

    def make(endpoint: str, **kw: Any) -> LMTPDelivery:
        made.append(LMTPDelivery(reactor, endpoint, lhlo="mx.test", **kw))
        return made[-1]

    yield make
    for delivery in made:
        pytest_twisted.blockon(delivery.close())


def smtp_send(port: int, recipients: list[str], message: bytes = MESSAGE
              ) -> tuple[int, bytes] | dict[str, Any]:
    """smtplib, in a worker thread: {} / the refused dict, or (code, text) of the
    reply that refused the message."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as c:
        try:
            return c.sendmail("alice@example.org", recipients, message)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error
        except smtplib.SMTPRecipientsRefused as e:
            return {r: v for r, v in e.recipients.items()}


def wait(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def stored_parts(stored: bytes) -> tuple[list[bytes], bytes]:
    """Dovecot's Maildir file: its trace header lines (Return-Path, Delivered-To, its
    Received, ours) and the message after them, with CRLF line ends again (Dovecot
    stores LF)."""
    data = stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    ours = re.search(rb"Received: from \S+ \(\[127\.0\.0\.1\]\)\r\n"
                     rb"\tby mx\.test \(maitred_tx\) with (?:E?SMTP|LMTP) id \S+"
                     rb"(\r\n\tfor <[^>]+>)?;"
                     rb"\r\n\t[^\r\n]+\r\n", data)
    assert ours is not None, stored[:600]
    return data[: ours.end()].split(b"\r\n")[:-1], data[ours.end():]


@pytest_twisted.ensureDeferred
async def test_smtp_to_dovecot_maildir_over_unix_socket(dovecot, lmtp, serve) -> None:
    delivery = lmtp(dovecot.unix_endpoint)
    server = serve(Config(hostname="mx.test"), delivery)
    assert await deferToThread(smtp_send, server.port, ["bob@localhost"]) == {}
    (stored,) = dovecot.messages("bob")
    trace, message = stored_parts(stored)
    assert message == MESSAGE  # smtplib stuffs the dot, maitred unstuffs, Dovecot keeps
    assert trace[0] == b"Return-Path: <alice@example.org>"
    assert trace[1] == b"Delivered-To: bob@localhost"
    assert trace[2].startswith(b"Received: from mx.test")  # Dovecot's, naming our LHLO
    assert trace[3] == b"\tby lmtp.test with LMTP"
    assert b"\t(envelope-from <alice@example.org>)" in trace
    # ours, under Dovecot's: one recipient, so a "for" clause (RFC 5321 4.4)
    assert trace[-4] == b"Received: from client.test ([127.0.0.1])"
    assert trace[-3].startswith(b"\tby mx.test (maitred_tx) with ESMTP id ")
    assert trace[-2] == b"\tfor <bob@localhost>;"
    assert dovecot.messages("carol") == []


@pytest_twisted.ensureDeferred
async def test_lmtp_listener_passes_each_dovecot_reply_back(dovecot, lmtp, serve) -> None:
    delivery = lmtp(dovecot.unix_endpoint)
    server = serve(Config(hostname="mx.test", mode=Mode.LMTP), delivery)
    client = await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{server.port}", lmtp=True,
                                      tls=TLSMode.NONE)
    try:
        result = await client.send("alice@example.org",
                                   ["bob@localhost", "nosuchuser@localhost", "carol@localhost"],
                                   MESSAGE)
    finally:
        await client.quit()
    bob, unknown, carol = result.recipients
    assert (bob.outcome, bob.reply.code, bob.reply.status) == (Outcome.DELIVERED, 250, "2.0.0")
    assert (carol.outcome, carol.reply.code) == (Outcome.DELIVERED, 250)
    # Dovecot refused the RCPT; maitred accepted it, forwarded, and passes the refusal
    # on as this recipient's reply after the body, code and enhanced code intact.
    assert unknown.rcpt_reply.code == 250
    assert (unknown.outcome, unknown.reply.code, unknown.reply.status) == (
        Outcome.PERMANENT, 550, "5.1.1")
    assert unknown.reply.text == ("<nosuchuser@localhost> User doesn't exist: "
                                  "nosuchuser@localhost")
    assert len(dovecot.messages("bob")) == len(dovecot.messages("carol")) == 1
    _, message = stored_parts(dovecot.messages("bob")[0])
    assert message == MESSAGE


@pytest_twisted.ensureDeferred
async def test_smtp_listener_answers_once_for_all(dovecot, lmtp, serve) -> None:
    """SMTP has one reply per message: the IMessageSink rule answers 250 only if every
    recipient was accepted, else the first failure.  (bob got his copy: the sender
    will bounce a message that was partly delivered - verify_recipients avoids it.)"""
    server = serve(Config(hostname="mx.test"), lmtp(dovecot.unix_endpoint))
    got = await deferToThread(smtp_send, server.port, ["bob@localhost", "ghost@localhost"])
    assert got == (550, b"5.1.1 <ghost@localhost> User doesn't exist: ghost@localhost")
    assert len(dovecot.messages("bob")) == 1


@pytest_twisted.ensureDeferred
async def test_verify_recipients_refuses_at_rcpt(dovecot, lmtp, serve) -> None:
    delivery = lmtp(dovecot.unix_endpoint, verify_recipients=True, idle_timeout=30)
    server = serve(Config(hostname="mx.test"), delivery)
    got = await deferToThread(smtp_send, server.port, ["bob@localhost", "ghost@localhost"])
    assert got == {"ghost@localhost": (
        550, b"5.1.1 <ghost@localhost> User doesn't exist: ghost@localhost")}
    assert len(dovecot.messages("bob")) == 1
    # the probes and the message shared one connection
    assert (delivery.connections_made, dovecot.connections()) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_dovecot_down_is_451_and_the_message_is_not_lost(dovecot, lmtp, serve) -> None:
    server = serve(Config(hostname="mx.test", mode=Mode.LMTP), lmtp(dovecot.unix_endpoint))
    dovecot.stop()
    client = await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{server.port}", lmtp=True,
                                      tls=TLSMode.NONE)
    try:
        first = await client.send("alice@example.org", ["bob@localhost"], MESSAGE)
        (result,) = first.recipients
        assert (result.outcome, result.reply.code, result.reply.status) == (
            Outcome.TEMPORARY, 451, "4.4.1")
        assert result.reply.text == "LMTP server unavailable, try again later"
        dovecot.start()  # the sender keeps the message and tries again
        second = await client.send("alice@example.org", ["bob@localhost"], MESSAGE)
        assert second.all_delivered
    finally:
        await client.quit()
    (stored,) = dovecot.messages("bob")
    assert stored_parts(stored)[1] == MESSAGE


@pytest_twisted.ensureDeferred
async def test_tcp_endpoint(dovecot, lmtp, serve) -> None:
    server = serve(Config(hostname="mx.test"), lmtp(dovecot.tcp_endpoint))
    assert await deferToThread(smtp_send, server.port, ["carol@localhost"]) == {}
    assert stored_parts(dovecot.messages("carol")[0])[1] == MESSAGE
    assert "Connect from 127.0.0.1" in dovecot.log


@pytest_twisted.ensureDeferred
async def test_connection_is_reused_then_closed_when_idle(dovecot, lmtp, serve) -> None:
    delivery = lmtp(dovecot.unix_endpoint, idle_timeout=1.0)
    server = serve(Config(hostname="mx.test"), delivery)
    for user in ("bob", "carol", "bob"):
        assert await deferToThread(smtp_send, server.port, [f"{user}@localhost"]) == {}
    assert (len(dovecot.messages("bob")), len(dovecot.messages("carol"))) == (2, 1)
    assert (delivery.connections_made, dovecot.connections()) == (1, 1)
    for _ in range(150):  # idle for 1 s: we QUIT
        if "Disconnect from local: Logged out" in dovecot.log:
            break
        await wait(0.02)
    assert "Disconnect from local: Logged out" in dovecot.log
    assert await deferToThread(smtp_send, server.port, ["carol@localhost"]) == {}
    assert (delivery.connections_made, dovecot.connections()) == (2, 2)


@pytest_twisted.ensureDeferred
async def test_connection_dropped_by_dovecot_while_idle_is_replaced(dovecot, lmtp,
                                                                   serve) -> None:
    delivery = lmtp(dovecot.unix_endpoint, idle_timeout=30)
    server = serve(Config(hostname="mx.test"), delivery)
    assert await deferToThread(smtp_send, server.port, ["bob@localhost"]) == {}
    (pid,) = re.findall(r"lmtp\((\d+)\): Info: Connect from local", dovecot.log)
    os.kill(int(pid), signal.SIGKILL)  # the LMTP process serving our idle connection
    await wait(0.1)
    assert await deferToThread(smtp_send, server.port, ["bob@localhost"]) == {}
    assert len(dovecot.messages("bob")) == 2
    assert delivery.connections_made == 2


def big_message(size: int) -> Iterator[bytes]:
    """About *size* octets in 64 KiB pieces of 78-octet lines."""
    yield b"From: a@example.org\r\nSubject: big\r\n\r\n"
    line = b"0123456789" * 7 + b"abcdef\r\n"
    piece = line * (64 * 1024 // len(line))
    for _ in range(size // len(piece)):
        yield piece


@pytest_twisted.ensureDeferred
async def test_20_mb_message_streams_with_bounded_memory(dovecot, lmtp, serve) -> None:
    config = Config(hostname="mx.test", limits=Limits(max_message_size=64 * 1024 * 1024))
    server = serve(config, lmtp(dovecot.unix_endpoint, received=False))
    size = 20 * 1024 * 1024
    body = b"".join(big_message(size))
    digest, sent = hashlib.sha256(body).hexdigest(), len(body)
    del body
    tracemalloc.start()
    try:
        client = await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{server.port}",
                                          tls=TLSMode.NONE, chunking=False)
        try:
            result = await client.send("a@example.org", ["bob@localhost"],
                                       big_message(size))
        finally:
            await client.quit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.all_delivered, result
    (stored,) = dovecot.messages("bob")
    message = stored_parts_plain(stored)
    assert (len(message), hashlib.sha256(message).hexdigest()) == (sent, digest)
    # our client's chunks + maitred's buffers + SPOOL_MEMORY + the LMTP client's chunks
    assert peak < 8 * 1024 * 1024, peak


def stored_parts_plain(stored: bytes) -> bytes:
    """The message after Dovecot's trace fields (no Received: of ours), CRLF again."""
    data = stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    start = data.index(b"\r\nFrom: a@example.org\r\n") + 2
    return data[start:]


def envelope(*recipients: str, smtputf8: bool = False) -> Envelope:
    context = SessionContext(session_id="s1", hostname="mx.test", peer_host="192.0.2.7",
                             peer_port=2525, helo="client.test", esmtp=True)
    return Envelope(
        session=context, message_id="Q1",
        sender=parse_reverse_path("<alice@example.org>", smtputf8=True),
        params=MailParams(smtputf8=smtputf8),
        recipients=tuple(Recipient(parse_forward_path(r, smtputf8=True)) for r in recipients),
    )


@pytest_twisted.ensureDeferred
async def test_what_dovecot_cannot_take_is_refused_for_good(dovecot, lmtp) -> None:
    """Dovecot 2.3 offers neither BINARYMIME nor SMTPUTF8 (its LHLO reply): a binary
    body or a UTF-8 mailbox cannot be forwarded faithfully, and trying again will not
    help.  An SMTPUTF8 message with ASCII addresses goes (its 8-bit header as 8BITMIME)."""
    delivery = lmtp(dovecot.unix_endpoint, received=False)

    async def deliver(env: Envelope, body: bytes) -> Any:
        sink = delivery.open_message(env)
        sink.write(body)
        return await sink.close()

    binary = b"Subject: raw\r\n\r\nbare\nLF\r\n"
    assert await deliver(envelope("<bob@localhost>"), binary) == [PermanentFailure(
        "The LMTP server does not support BINARYMIME, which this message needs", 554, "5.6.3")]
    utf8 = envelope("<jörg@localhost>", smtputf8=True)
    assert await deliver(utf8, MESSAGE) == [PermanentFailure(
        "The LMTP server does not take SMTPUTF8 addresses", 553, "5.6.7")]
    header = "Subject: Grüße\r\n\r\nHallo\r\n".encode()
    assert await deliver(envelope("<bob@localhost>", smtputf8=True), header) == [Accepted()]
    (stored,) = dovecot.messages("bob")
    assert stored.endswith(header.replace(b"\r\n", b"\n"))
    assert delivery.connections_made == 1  # the refusals left the connection usable


def test_twistd_maitred_delivery_lmtp(dovecot, twistd) -> None:
    """The whole path as deployed: twistd -n maitred --delivery lmtp:unix:..."""
    args = ("--delivery", f"lmtp:{dovecot.unix_endpoint}", "--domain", "localhost",
            "--hostname", "mx.test")
    with twistd(*args) as server:
        assert smtp_send(server.port, ["bob@localhost"]) == {}
        assert smtp_send(server.port, ["ghost@localhost"]) == (
            550, b"5.1.1 <ghost@localhost> User doesn't exist: ghost@localhost")
    (stored,) = dovecot.messages("bob")
    trace, message = stored_parts(stored)
    assert message.startswith(b"Authentication-Results: mx.test;")  # twistd checks SPF..
    assert message.endswith(b"\r\n" + MESSAGE)
    assert trace[2] == b"Received: from mx.test"  # --hostname is our LHLO name
