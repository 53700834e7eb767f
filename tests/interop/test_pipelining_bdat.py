"""PIPELINING (RFC 2920) and CHUNKING / BINARYMIME (RFC 3030) over a real socket."""

from __future__ import annotations

import random
import socket

import pytest_twisted
from maitred_interop import Client, message_files, split_trace
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from maitred_tx.delivery.maildir import MaildirDelivery
from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.outcomes import PermanentFailure

PIPELINED = (
    b"MAIL FROM:<a@b.org>\r\n"
    b"RCPT TO:<user@localhost>\r\n"
    b"RCPT TO:<someone@example.org>\r\n"
    b"RCPT TO:<other@localhost>\r\n"
    b"DATA\r\n"
)
EXPECTED = [(250, "2.1.0"), (250, "2.1.5"), (550, "5.7.1"), (250, "2.1.5"), (354, None)]


def pipeline(port: int) -> tuple[list[tuple[int, str | None]], bytes]:
    """After EHLO, MAIL+RCPT+RCPT+RCPT+DATA in one send; the replies and the raw bytes
    of the first read after it."""
    with Client(port) as c:
        ehlo = c.greet()
        assert "PIPELINING" in ehlo.lines
        c.send(PIPELINED)
        first_read = c.read_once()  # one write from the server holds every reply
        replies = [(r.code, r.status) for r in c.replies(5)]
        c.send(b"Subject: p\r\n\r\npipelined\r\n.\r\nQUIT\r\n")
        replies += [(r.code, r.status) for r in c.rest()]
        return replies, first_read


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_in_order(serve):
    server = serve()
    replies, first_read = await deferToThread(pipeline, server.port)
    assert replies == [*EXPECTED, (250, "2.0.0"), (221, "2.0.0")]
    assert first_read.count(b"\r\n") == 5  # one batch, one write
    [stored] = server.messages
    assert [str(r.mailbox) for r in stored.envelope.recipients] == [
        "user@localhost",
        "other@localhost",
    ]


class SlowDelivery(MemoryDelivery):
    """Answers MAIL and RCPT late, the first RCPT slowest: replies must still be in
    command order (what twisted.mail gets wrong, twisted/twisted#8126)."""

    def __init__(self) -> None:
        super().__init__()
        self.delays = iter([0.3, 0.1, 0.2])

    def mail_from(self, context, sender, params) -> Deferred:
        return deferLater(reactor, 0.2, lambda: None)

    def rcpt_to(self, context, envelope, recipient, params) -> Deferred:
        answer = (
            PermanentFailure("No such user", 550, "5.1.1")
            if (recipient.local_part == "nobody")
            else None
        )
        return deferLater(reactor, next(self.delays, 0.0), lambda: answer)


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_in_order_with_slow_decisions(serve):
    server = serve(delivery=SlowDelivery())

    def session() -> list[tuple[int, str | None]]:
        with Client(server.port) as c:
            c.greet()
            c.send(
                b"MAIL FROM:<a@b.org>\r\nRCPT TO:<user@localhost>\r\n"
                b"RCPT TO:<nobody@localhost>\r\nRCPT TO:<other@localhost>\r\nDATA\r\n"
                b"Subject: slow\r\n\r\nbody\r\n.\r\nQUIT\r\n"
            )
            return [(r.code, r.status) for r in c.rest()]

    replies = await deferToThread(session)
    assert replies == [
        (250, "2.1.0"),
        (250, "2.1.5"),
        (550, "5.1.1"),
        (250, "2.1.5"),
        (354, None),
        (250, "2.0.0"),
        (221, "2.0.0"),
    ]
    [stored] = server.messages
    assert stored.body == b"Subject: slow\r\n\r\nbody\r\n"


@pytest_twisted.ensureDeferred
async def test_tcp_nodelay_on_server_socket(serve):
    server = serve()
    client = await deferToThread(Client, server.port)
    try:
        await deferToThread(client.reply)  # the greeting: connectionMade has run
        [protocol] = server.factory.connections
        handle = protocol.transport.getHandle()
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.close()


def bdat_session(port: int, mail: bytes, wire: bytes, count: int) -> list[tuple[int, str]]:
    """MAIL/RCPT, then *wire* (BDAT commands and chunks) in one send; *count* replies."""
    with Client(port) as c:
        c.greet()
        c.send(mail + b"RCPT TO:<user@localhost>\r\n" + wire)
        replies = c.replies(count + 2)
        assert [r.code for r in replies[:2]] == [250, 250]
        assert c.command("QUIT").code == 221
        return [(r.code, r.text) for r in replies[2:]]


ALL_BYTES = bytes(range(256))
BINARY = b"Subject: binary\r\n\r\n" + ALL_BYTES + b"\r\n.\r\n" + ALL_BYTES[::-1] + b"\n.\n\r"


@pytest_twisted.ensureDeferred
async def test_bdat_binary_chunk_stored_identically(serve):
    server = serve()
    wire = b"BDAT %d LAST\r\n" % len(BINARY) + BINARY
    mail = b"MAIL FROM:<a@b.org> BODY=BINARYMIME\r\n"
    replies = await deferToThread(bdat_session, server.port, mail, wire, 1)
    assert replies == [(250, "2.0.0 OK: message accepted")]
    [stored] = server.messages
    assert stored.body == BINARY  # no unstuffing, no end marker, every octet as sent
    assert stored.envelope.chunked


@pytest_twisted.ensureDeferred
async def test_bdat_multi_chunk_then_zero_last(serve):
    server = serve()
    chunks = [b"S", b"ubject: chunks\r\n\r\n", BINARY[:100], b"\r\n.\r", b"\n", BINARY[100:]]
    wire = b"".join(b"BDAT %d\r\n" % len(c) + c for c in chunks) + b"BDAT 0 LAST\r\n"
    mail = b"MAIL FROM:<a@b.org> BODY=BINARYMIME\r\n"
    replies = await deferToThread(bdat_session, server.port, mail, wire, len(chunks) + 1)
    assert replies[:-1] == [(250, f"2.0.0 {len(c)} octets received") for c in chunks]
    assert replies[-1] == (250, "2.0.0 OK: message accepted")
    [stored] = server.messages
    assert stored.body == b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_bdat_text_chunks_split_into_tiny_sends(serve):
    server = serve()
    body = b"Subject: text\r\n\r\nline one\r\n.\r\n..dots stay as sent\r\n"
    wire = b"BDAT 20\r\n" + body[:20] + b"BDAT %d LAST\r\n" % (len(body) - 20) + body[20:]

    def session() -> list[int]:
        with Client(server.port) as c:
            c.greet()
            c.send(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<user@localhost>\r\n")
            assert [r.code for r in c.replies(2)] == [250, 250]
            for i in range(0, len(wire), 3):  # chunk boundaries fall anywhere
                c.send(wire[i : i + 3])
            return [r.code for r in c.replies(2)]

    assert await deferToThread(session) == [250, 250]
    [stored] = server.messages
    assert stored.body == body


@pytest_twisted.ensureDeferred
async def test_bdat_large_text_is_checked_in_every_read(serve):
    """A 600 KiB text chunk arrives in several reads of up to 256 KiB, each checked in
    32 KiB blocks: one bare LF anywhere in it, and only there, refuses the message."""
    server = serve()
    lines = [b"line %06d of a long text message\r\n" % i for i in range(17000)]
    clean = b"Subject: long\r\n\r\n" + b"".join(lines)
    mail = b"MAIL FROM:<a@b.org>\r\n"
    wire = b"BDAT %d LAST\r\n" % len(clean) + clean
    assert await deferToThread(bdat_session, server.port, mail, wire, 1) == [
        (250, "2.0.0 OK: message accepted")
    ]
    [stored] = server.messages
    assert stored.body == clean
    for at in (32 * 1024, 256 * 1024 + 1, len(clean) - 40):
        cut = clean.index(b"\r\n", at)
        bare = clean[:cut] + clean[cut + 1 :]  # that line ends in LF alone
        wire = b"BDAT %d LAST\r\n" % len(bare) + bare
        replies = await deferToThread(bdat_session, server.port, mail, wire, 1)
        assert replies == [(550, "5.6.0 Message contains a bare <CR> or <LF>")], at
    assert len(server.messages) == 1


@pytest_twisted.ensureDeferred
async def test_bdat_zero_last_alone_is_an_empty_message(serve):
    server = serve()
    replies = await deferToThread(
        bdat_session, server.port, b"MAIL FROM:<a@b.org>\r\n", b"BDAT 0 LAST\r\n", 1
    )
    assert replies == [(250, "2.0.0 OK: message accepted")]
    assert [m.body for m in server.messages] == [b""]


@pytest_twisted.ensureDeferred
async def test_bdat_then_data_is_refused_and_two_transactions_pipeline(serve):
    server = serve()
    second = b"Subject: second\r\n\r\nx\r\n"
    wire = (
        b"BDAT 4\r\nabcdDATA\r\n"  # DATA may not follow BDAT: 503, chunk kept
        b"BDAT 3 LAST\r\nefg"
        b"MAIL FROM:<b@b.org>\r\nRCPT TO:<user@localhost>\r\n"
        b"BDAT %d LAST\r\n" % len(second) + second
    )
    replies = await deferToThread(bdat_session, server.port, b"MAIL FROM:<a@b.org>\r\n", wire, 6)
    assert [(code, text.split(" ", 1)[0]) for code, text in replies] == [
        (250, "2.0.0"),
        (503, "5.5.1"),
        (250, "2.0.0"),
        (250, "2.1.0"),
        (250, "2.1.5"),
        (250, "2.0.0"),
    ]
    assert [m.body for m in server.messages] == [b"abcdefg", second]


@pytest_twisted.ensureDeferred
async def test_bdat_large_binary_into_maildir(serve, tmp_path):
    server = serve(delivery=MaildirDelivery(tmp_path, reactor))
    payload = b"Subject: big binary\r\n\r\n" + random.Random(3030).randbytes(3_000_000)
    sizes = [1, 65_535, 65_537, 1_000_000]
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(payload[pos : pos + size])
        pos += size
    chunks.append(payload[pos:])
    wire = b"".join(b"BDAT %d\r\n" % len(c) + c for c in chunks[:-1])
    wire += b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1]
    mail = b"MAIL FROM:<a@b.org> BODY=BINARYMIME\r\n"
    replies = await deferToThread(bdat_session, server.port, mail, wire, len(chunks))
    assert [code for code, _ in replies] == [250] * len(chunks)
    [path] = message_files(tmp_path / "localhost" / "user")
    fields, body = split_trace(path.read_bytes())
    assert fields[1] == b"Delivered-To: user@localhost"
    assert b" with ESMTP id " in fields[2]
    assert body == payload


LF_MESSAGE = b"Subject: lf\nFrom: a@b.org\n\n" + b"binary\n\r\xff" * 25_000  # 250 KB


def test_binarymime_is_never_refused_for_its_line_endings(twistd, tmp_path):
    """``twistd maitred`` as shipped (checks on, Maildir): a BINARYMIME message of bare
    LFs and CRs, its header block ended by a bare LF empty line, is stored octet
    for octet; the same content declared 7BIT or 8BITMIME is text, and refused for
    its bare line endings (550 5.6.0) under the default --bare-line-endings reject."""
    with twistd("--dns-server", "127.0.0.1:9", "--dns-timeout", "0.2") as server:
        wire = b"BDAT %d LAST\r\n" % len(LF_MESSAGE) + LF_MESSAGE
        replies = [
            bdat_session(server.port, b"MAIL FROM:<a@b.org>%s\r\n" % body, wire, 1)
            for body in (b" BODY=BINARYMIME", b" BODY=8BITMIME", b"", b" body=binarymime")
        ]
    assert replies == [
        [(250, "2.0.0 OK: message accepted")],
        [(550, "5.6.0 Message contains a bare <CR> or <LF>")],
        [(550, "5.6.0 Message contains a bare <CR> or <LF>")],
        [(250, "2.0.0 OK: message accepted")],
    ]
    stored = message_files(tmp_path / "maildir" / "localhost" / "user")
    assert len(stored) == 2
    for path in stored:
        fields, rest = split_trace(path.read_bytes())
        assert fields[0] == b"Return-Path: <a@b.org>"
        # Our Authentication-Results field, then the message as sent.
        assert rest.startswith(b"Authentication-Results: ")
        assert rest.endswith(b"\r\n" + LF_MESSAGE)
        assert b"dkim=none" in rest[: -len(LF_MESSAGE)]
