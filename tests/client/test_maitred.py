"""The client against maitred_tx's own server, in process, over real loopback sockets:
plain, STARTTLS and implicit TLS with a test CA (and the verification failures), AUTH
PLAIN/LOGIN on a submission listener, PIPELINING and BDAT as the wire shows them,
BINARYMIME, LMTP per-recipient replies, several messages per connection, SIZE,
SMTPUTF8, DSN parameters, and a 20 MB streamed body in bounded memory."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import pytest
import pytest_twisted
from client_support import maitred_config
from security_support import PASSWORD, USER, make_certificate, portal_for
from twisted.internet import reactor

from maitred_tx.client import (
    DSN,
    AuthenticationFailed,
    BodyType,
    CleartextAuthRefused,
    MessageTooBig,
    Notify,
    Outcome,
    Recipient,
    Ret,
    SMTPClient,
    TLSMode,
    TLSVerificationFailed,
    send_message,
)
from maitred_tx.delivery.base import Delivery, MessageSink
from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.outcomes import Accepted, PermanentFailure, TemporaryFailure
from maitred_tx.server.tls import server_context
from maitred_tx.smtp.config import Limits, Mode

PLAIN_LISTENER = "tcp:{port}:interface=127.0.0.1"
MESSAGE = b"From: a@b.org\r\nSubject: client test\r\n\r\n.leading dot\r\nHello.\r\n"


def endpoint(port: int) -> str:
    return f"tcp:127.0.0.1:{port}"


async def connect(port: int, **kw) -> SMTPClient:
    kw.setdefault("tls", TLSMode.NONE)
    kw.setdefault("helo", "client.test")
    return await SMTPClient.connect(reactor, endpoint(port), **kw)


@pytest_twisted.ensureDeferred
async def test_several_messages_over_one_pipelined_connection(service, recording_proxy):
    server = service([(PLAIN_LISTENER, maitred_config())])
    wire = recording_proxy(server.port)
    client = await connect(wire.port, chunking=False)
    assert client.extensions.pipelining and client.extensions.chunking
    first = await client.send("a@b.org", ["x@example.com", "y@elsewhere.org"], MESSAGE)
    second = await client.send("a@b.org", ["nobody@elsewhere.org"], MESSAGE)
    third = await client.send("", "z@example.com", b"Subject: bounce\r\n\r\nx\r\n")
    assert await client.command("NOOP") is not None
    quit_reply = await client.quit()
    assert (quit_reply.code, quit_reply.status) == (221, "2.0.0")

    assert [(r.recipient, r.outcome, r.reply.code, r.reply.status)
            for r in first.recipients] == [
        ("x@example.com", Outcome.DELIVERED, 250, "2.0.0"),
        ("y@elsewhere.org", Outcome.PERMANENT, 550, "5.7.1")]
    assert second.permanent and not second.delivered
    assert third.all_delivered
    stored = server.messages
    assert [m.body for m in stored] == [MESSAGE, b"Subject: bounce\r\n\r\nx\r\n"]
    assert stored[1].envelope.sender is None  # MAIL FROM:<>
    assert len({m.envelope.session.session_id for m in stored}) == 1  # one connection
    # RFC 2920: MAIL, the RCPTs and DATA arrived in one read; the second message was
    # refused at RCPT after a DATA the server also refused, so the third starts with RSET.
    batch = wire.read_with(b"MAIL FROM:<a@b.org>")
    assert batch.startswith(b"MAIL FROM:<a@b.org>") and batch.endswith(b"DATA\r\n")
    assert batch.count(b"RCPT TO:") == 2
    assert wire.read_with(b"MAIL FROM:<>").startswith(b"RSET\r\nMAIL FROM:<>")
    assert stored[0].envelope.session.helo == "client.test"


@pytest_twisted.ensureDeferred
async def test_bdat_chunks_and_binarymime(service, recording_proxy):
    server = service([(PLAIN_LISTENER, maitred_config())])
    wire = recording_proxy(server.port)
    big = b"Subject: big\r\n\r\n" + b"".join(
        b"line %06d of a longer message\r\n" % i for i in range(6000))
    binary = b"MIME-Version: 1.0\r\n\r\n\x00\x01bare\nLF and bare\rCR\xff" * 100
    async with await connect(wire.port, chunk_size=50_000) as client:
        assert (await client.send("a@b.org", ["x@example.com"], big)).all_delivered
        assert (await client.send("a@b.org", ["x@example.com"], binary)).all_delivered
    text, raw = server.messages
    assert text.body == big and text.envelope.chunked
    assert raw.body == binary and raw.envelope.params.body is BodyType.BINARY_MIME
    first = wire.read_with(b"MAIL FROM:<a@b.org> SIZE=%d" % len(big))
    assert b"BDAT 50000\r\nSubject: big" in first  # the first chunk rides with MAIL/RCPT
    assert any(b"BDAT %d LAST\r\n" % (len(big) % 50_000) in r for r in wire.reads)
    assert b"BODY=BINARYMIME" in wire.read_with(b"SIZE=%d" % len(binary))


@pytest_twisted.ensureDeferred
async def test_a_refused_bdat_last_does_not_leak_into_the_next_message(service):
    """The server refuses the one-chunk BDAT ... LAST of a message whose recipient it
    refused, and keeps that MAIL (RFC 3030 2: indeterminate).  Without RSET the next
    message's MAIL got 503 while its RCPT and body went into the old transaction:
    stored by the server, reported PERMANENT (bounced) by the client."""
    server = service([(PLAIN_LISTENER, maitred_config())])
    async with await connect(server.port) as client:
        refused = await client.send("a@b.org", ["nobody@elsewhere.org"], MESSAGE)
        second = await client.send("c@d.org", ["x@example.com"], b"Subject: 2\r\n\r\nx\r\n")
    assert refused.permanent and refused.data_reply.code == 503
    assert second.all_delivered and second.mail_reply.code == 250
    [stored] = server.messages
    assert str(stored.envelope.sender) == "c@d.org"


@pytest_twisted.ensureDeferred
async def test_starttls_verified_against_the_test_ca(service, certs):
    server = service([(PLAIN_LISTENER, maitred_config())],
                     tls=server_context(certs.cert, certs.key))
    client = await connect(server.port, tls=TLSMode.REQUIRED, tls_hostname="localhost",
                           trust_root=str(certs.cert))
    assert client.tls and not client.extensions.starttls  # EHLO again, under TLS
    assert not client.protocol.tls_handshake_pending  # handshakeCompleted() was called
    result = await client.send("a@b.org", ["x@example.com"], MESSAGE)
    await client.quit()
    assert result.all_delivered
    [stored] = server.messages
    assert stored.envelope.session.tls and stored.envelope.session.tls_version


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("problem", ["name", "ca"])
async def test_starttls_verification_failure_names_the_host(service, certs, tmp_path, problem):
    server = service([(PLAIN_LISTENER, maitred_config())],
                     tls=server_context(certs.cert, certs.key))
    other = make_certificate(tmp_path, "other")
    hostname = "mail.example.com" if problem == "name" else "localhost"
    trust = certs.cert if problem == "name" else other.cert
    with pytest.raises(TLSVerificationFailed) as caught:
        await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{server.port}",
                                 tls=TLSMode.REQUIRED, tls_hostname=hostname,
                                 trust_root=str(trust))
    assert caught.value.host == hostname and hostname in str(caught.value)
    expected = ("is not valid for the name mail.example.com" if problem == "name"
                else "is not trusted (certificate verify failed)")
    assert expected in str(caught.value)
    assert caught.value.temporary
    assert server.messages == []


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_does_not_verify_by_default(service, certs):
    server = service([(PLAIN_LISTENER, maitred_config())],
                     tls=server_context(certs.cert, certs.key))
    client = await connect(server.port, tls=TLSMode.OPPORTUNISTIC,
                           tls_hostname="mail.example.com")  # a name the cert lacks
    assert client.tls
    assert (await client.send("a@b.org", ["x@example.com"], MESSAGE)).all_delivered
    await client.quit()


@pytest_twisted.ensureDeferred
async def test_implicit_tls(service, certs):
    listener = f"ssl:{{port}}:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}"
    server = service([(listener, maitred_config())], tls=server_context(certs.cert, certs.key))
    result = await send_message(
        reactor, f"tcp:127.0.0.1:{server.port}", "a@b.org", ["x@example.com"], MESSAGE,
        tls=TLSMode.IMPLICIT, tls_hostname="127.0.0.1", trust_root=str(certs.cert))
    assert result.all_delivered and server.messages[0].envelope.session.tls
    with pytest.raises(TLSVerificationFailed, match=r"mail\.example\.com"):
        await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{server.port}",
                                 tls=TLSMode.IMPLICIT, tls_hostname="mail.example.com",
                                 trust_root=str(certs.cert))


@pytest_twisted.ensureDeferred
async def test_implicit_tls_submission_with_auth(service, certs):
    """Port 465 (RFC 8314 3.3): the connection is TLS from the first byte, so AUTH
    goes without allow_cleartext_auth and ``client.tls`` says so."""
    listener = f"ssl:{{port}}:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}"
    delivery = MemoryDelivery()
    server = service([(listener, maitred_config(Mode.SUBMISSION))], delivery=delivery,
                     tls=server_context(certs.cert, certs.key), portal=portal_for(delivery))
    async with await SMTPClient.connect(
            reactor, endpoint(server.port), helo="client.test", tls=TLSMode.IMPLICIT,
            tls_hostname="127.0.0.1", trust_root=str(certs.cert)) as client:
        assert client.tls
        await client.authenticate(USER, PASSWORD)
        result = await client.send(USER, ["bob@elsewhere.org"],
                                   b"From: " + USER.encode() + b"\r\n\r\nhi\r\n")
    assert result.all_delivered
    [stored] = server.messages
    assert stored.envelope.session.authenticated == USER and stored.envelope.session.tls


def submission(service, certs, **kw):
    delivery = MemoryDelivery()
    return service([(PLAIN_LISTENER, maitred_config(Mode.SUBMISSION, **kw))],
                   delivery=delivery, tls=server_context(certs.cert, certs.key),
                   portal=portal_for(delivery))


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_on_a_submission_listener(service, certs, mechanism):
    server = submission(service, certs)
    async with await connect(server.port, tls=TLSMode.REQUIRED, tls_hostname="localhost",
                             trust_root=str(certs.cert)) as client:
        assert client.extensions.auth == {"PLAIN", "LOGIN"}
        await client.authenticate(USER, PASSWORD, mechanism=mechanism)
        assert client.authenticated == USER
        result = await client.send(USER, ["bob@elsewhere.org"],
                                   b"From: " + USER.encode() + b"\r\n\r\nhi\r\n")
    assert result.all_delivered
    [stored] = server.messages
    assert stored.envelope.session.authenticated == USER and stored.envelope.session.tls


@pytest_twisted.ensureDeferred
async def test_auth_failures(service, certs):
    server = submission(service, certs, insecure_auth=True)
    client = await connect(server.port, tls=TLSMode.NONE)
    with pytest.raises(CleartextAuthRefused):
        await client.authenticate(USER, PASSWORD)
    with pytest.raises(AuthenticationFailed) as caught:
        await client.authenticate(USER, "wrong", allow_cleartext_auth=True)
    assert caught.value.permanent and (caught.value.reply.code,
                                       caught.value.reply.status) == (535, "5.7.8")
    await client.authenticate(USER, PASSWORD, allow_cleartext_auth=True)  # still usable
    assert client.authenticated == USER
    await client.quit()


class PerRecipient(MemoryDelivery):
    """'full' gets 452 4.2.2 and 'gone' 550 5.1.1 after the body; others 250."""

    def open_message(self, envelope):
        sink = super().open_message(envelope)
        close = sink.close
        outcomes = {"full": TemporaryFailure("Mailbox full", 452, "4.2.2"),
                    "gone": PermanentFailure("No such mailbox", 550, "5.1.1")}

        def per_recipient():
            close()
            return [outcomes.get(r.mailbox.local_part, Accepted()) for r in envelope.recipients]

        sink.close = per_recipient
        return sink


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("chunking", [True, False])
async def test_lmtp_replies_per_recipient(service, chunking):
    server = service([(PLAIN_LISTENER, maitred_config(Mode.LMTP))], delivery=PerRecipient())
    async with await connect(server.port, lmtp=True, chunking=chunking) as client:
        result = await client.send(
            "a@b.org", ["ok@example.com", "full@example.com", "x@elsewhere.org",
                        "gone@example.com", "ok2@example.com"], MESSAGE)
    assert [(r.recipient, r.outcome, r.reply.code, r.reply.status)
            for r in result.recipients] == [
        ("ok@example.com", Outcome.DELIVERED, 250, "2.0.0"),
        ("full@example.com", Outcome.TEMPORARY, 452, "4.2.2"),
        ("x@elsewhere.org", Outcome.PERMANENT, 550, "5.7.1"),
        ("gone@example.com", Outcome.PERMANENT, 550, "5.1.1"),
        ("ok2@example.com", Outcome.DELIVERED, 250, "2.0.0")]
    assert result.data_reply is None  # LMTP: the replies are per recipient
    assert server.messages[0].envelope.chunked is chunking


@pytest_twisted.ensureDeferred
async def test_lmtp_over_a_unix_socket(service, tmp_path):
    path = tmp_path / "lmtp.sock"
    server = service([(f"unix:{path}", maitred_config(Mode.LMTP))], delivery=PerRecipient())
    result = await send_message(reactor, f"unix:{path}", "a@b.org",
                                ["ok@example.com", "full@example.com"], MESSAGE,
                                lmtp=True, tls=TLSMode.NONE)
    assert [(r.outcome, r.reply.code) for r in result.recipients] == [
        (Outcome.DELIVERED, 250), (Outcome.TEMPORARY, 452)]
    assert server.messages[0].envelope.session.helo == "localhost"


@pytest_twisted.ensureDeferred
async def test_a_tls_endpoint_string_is_refused_with_advice():
    with pytest.raises(ValueError, match="IMPLICIT"):
        await SMTPClient.connect(reactor, "tls:127.0.0.1:465")


@pytest_twisted.ensureDeferred
async def test_size_precheck_then_the_connection_goes_on(service):
    server = service([(PLAIN_LISTENER, maitred_config(limits=Limits(max_message_size=1000)))])
    async with await connect(server.port) as client:
        assert client.extensions.max_size == 1000
        with pytest.raises(MessageTooBig, match="SIZE 1000"):
            await client.send("a@b.org", ["x@example.com"], b"x" * 500 + b"\r\n" * 300)
        assert (await client.send("a@b.org", ["x@example.com"], MESSAGE)).all_delivered
    assert len(server.messages) == 1


@pytest_twisted.ensureDeferred
async def test_smtputf8_and_dsn_parameters(service):
    server = service([(PLAIN_LISTENER, maitred_config())])
    async with await connect(server.port) as client:
        result = await client.send(
            "jörg@bücher.example",
            [Recipient("x@example.com", orcpt="X@Example.com",
                       notify=frozenset({Notify.SUCCESS, Notify.FAILURE}))],
            "Subject: grüße\r\n\r\nÄ\r\n".encode(),
            dsn=DSN(ret=Ret.HDRS, envid="QQ314159"))
    assert result.all_delivered
    [stored] = server.messages
    envelope = stored.envelope
    assert envelope.params.smtputf8 and envelope.params.body is BodyType.EIGHT_BIT_MIME
    assert str(envelope.sender) == "jörg@bücher.example"
    assert (envelope.params.ret, envelope.params.envid) == (Ret.HDRS, "QQ314159")
    params = envelope.recipients[0].params
    assert params.notify == {Notify.SUCCESS, Notify.FAILURE}
    assert params.orcpt == ("rfc822", "X@Example.com")


class Digest(Delivery):
    """Keeps only the size and SHA-256 of each body: the server holds no copy."""

    def __init__(self) -> None:
        self.digests: list[tuple[int, str]] = []

    def open_message(self, envelope):
        return _DigestSink(envelope, self)


class _DigestSink(MessageSink):
    def __init__(self, envelope, owner: Digest) -> None:
        super().__init__(envelope)
        self.owner, self.size, self.hash = owner, 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.hash.update(data)

    def close(self):
        self.owner.digests.append((self.size, self.hash.hexdigest()))
        return Accepted()

    def abort(self) -> None:
        pass


LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.....\r\n"
HEADER = b"Subject: large\r\n\r\n"


def lazy_body(lines: int, digest):
    """A text body of HEADER and *lines* LINEs, generated piece by piece (never whole)."""
    digest.update(HEADER)
    yield HEADER
    piece = LINE * 1000
    for start in range(0, lines, 1000):
        data = piece[: (min(lines - start, 1000)) * len(LINE)]
        digest.update(data)
        yield data


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("chunking", [True, False])
async def test_a_20_mb_body_streams_in_bounded_memory(service, chunking):
    lines = 20 * 1024 * 1024 // len(LINE)
    size = len(HEADER) + lines * len(LINE)  # about 20 MiB
    delivery = Digest()
    server = service([(PLAIN_LISTENER, maitred_config(
        limits=Limits(max_message_size=64 * 1024 * 1024)))], delivery=delivery)
    client = await connect(server.port, chunking=chunking)
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        result = await client.send("a@b.org", ["x@example.com"], lazy_body(lines, digest),
                                   size=size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await client.quit()
    assert result.all_delivered
    assert delivery.digests == [(size, digest.hexdigest())]
    # Client and server both live in this process: together they held a few chunks.
    assert peak < 4 * 1024 * 1024, f"peak {peak} octets for a {size}-octet body"


def test_certificate_files_are_found(certs):
    assert Path(certs.cert).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
