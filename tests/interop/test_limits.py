"""Every limit of Limits, enforced over a real socket, with its code and enhanced code;
and the server's memory stays bounded whatever a peer sends."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from maitred_interop import Client, config
from twisted.internet.threads import deferToThread

MAIL = b"MAIL FROM:<a@b.org>\r\n"
RCPT = b"RCPT TO:<user@localhost>\r\n"


def open_transaction(c: Client, mail: bytes = MAIL) -> None:
    c.greet()
    c.send(mail + RCPT)
    assert [r.code for r in c.replies(2)] == [250, 250]


def still_serves(c: Client) -> None:
    """The session survived the refusal: a whole new transaction is accepted."""
    assert c.command("RSET").code == 250
    c.send(MAIL + RCPT + b"DATA\r\n")
    assert [r.code for r in c.replies(3)] == [250, 250, 354]
    reply = c.command(b"Subject: ok\r\n\r\nsmall\r\n.")
    assert (reply.code, reply.status) == (250, "2.0.0")


def body_lines(size: int, width: int = 100) -> bytes:
    """*size* octets of well-formed text lines of *width* octets (CRLF included)."""
    line = b"x" * (width - 2) + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // width)


@pytest_twisted.ensureDeferred
async def test_size_declared_at_mail(serve):
    server = serve(config(max_message_size=10_000))

    def session() -> None:
        with Client(server.port) as c:
            ehlo = c.greet()
            assert "SIZE 10000" in ehlo.lines
            reply = c.command("MAIL FROM:<a@b.org> SIZE=10001")
            assert (reply.code, reply.status) == (552, "5.3.4")
            assert c.command("MAIL FROM:<a@b.org> SIZE=10000").code == 250

    await deferToThread(session)


@pytest_twisted.ensureDeferred
async def test_size_exceeded_by_data_body(serve):
    server = serve(config(max_message_size=10_000))

    def session() -> None:
        with Client(server.port) as c:
            open_transaction(c)
            assert c.command("DATA").code == 354
            c.send(body_lines(20_000))  # no SIZE= declared: only the bytes tell
            reply = c.command(".")
            assert (reply.code, reply.status) == (552, "5.3.4")
            still_serves(c)

    await deferToThread(session)
    assert [m.body for m in server.messages] == [b"Subject: ok\r\n\r\nsmall\r\n"]
    assert server.delivery.aborted == 1


@pytest_twisted.ensureDeferred
async def test_size_exceeded_by_one_bdat_chunk(serve):
    server = serve(config(max_message_size=10_000))

    def session() -> None:
        with Client(server.port) as c:
            open_transaction(c)
            c.send(b"BDAT 10001 LAST\r\n" + b"x" * 10_001)
            reply = c.reply()
            assert (reply.code, reply.status) == (552, "5.3.4")
            still_serves(c)  # the chunk was swallowed, not read as commands

    await deferToThread(session)
    assert len(server.messages) == 1


@pytest_twisted.ensureDeferred
async def test_size_exceeded_over_several_bdat_chunks(serve):
    server = serve(config(max_message_size=10_000))
    chunk = b"Subject: c\r\n\r\n" + b"y" * 5986  # 6000 octets

    def session() -> None:
        with Client(server.port) as c:
            open_transaction(c)
            c.send(b"BDAT 6000\r\n" + chunk + b"BDAT 6000 LAST\r\n" + b"z" * 6000)
            first, second = c.replies(2)
            assert (first.code, first.status) == (250, "2.0.0")
            assert (second.code, second.status) == (552, "5.3.4")
            still_serves(c)

    await deferToThread(session)
    assert [m.body for m in server.messages] == [b"Subject: ok\r\n\r\nsmall\r\n"]
    assert server.delivery.aborted == 1


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("limit", [100, None])  # None: the default of 1000
async def test_too_many_recipients(serve, limit):
    server = serve(config() if limit is None else config(max_recipients=limit))
    allowed = limit or 1000

    def session() -> None:
        with Client(server.port) as c:
            c.greet()
            rcpts = b"".join(b"RCPT TO:<u%d@localhost>\r\n" % i for i in range(allowed + 1))
            c.send(MAIL + rcpts + b"DATA\r\n")  # pipelined, in one go
            replies = c.replies(allowed + 3)
            assert replies[0].code == 250
            assert {(r.code, r.status) for r in replies[1 : allowed + 1]} == {(250, "2.1.5")}
            assert (replies[allowed + 1].code, replies[allowed + 1].status) == (452, "4.5.3")
            assert replies[allowed + 2].code == 354
            assert c.command(b"\r\nbody\r\n.").code == 250
            assert c.command("NOOP").code == 250  # 452 is not counted as an error

    await deferToThread(session)
    [stored] = server.messages
    assert len(stored.envelope.recipients) == allowed


@pytest_twisted.ensureDeferred
async def test_command_line_too_long(serve):
    server = serve()

    def session() -> None:
        with Client(server.port) as c:
            c.greet()
            reply = c.command(b"MAIL FROM:<" + b"a" * 3000 + b"@b.org>")
            assert (reply.code, reply.status) == (500, "5.5.2")
            reply = c.command(b"NOOP " + b"n" * 2041)  # 2048 octets with CRLF: allowed
            assert reply.code == 250
            reply = c.command(b"NOOP " + b"n" * 2042)  # 2049 octets
            assert (reply.code, reply.status) == (500, "5.5.2")
            assert c.command("MAIL FROM:<a@b.org>").code == 250

    await deferToThread(session)


@pytest_twisted.ensureDeferred
async def test_text_line_too_long(serve):
    server = serve()

    def session() -> None:
        with Client(server.port) as c:
            open_transaction(c)
            assert c.command("DATA").code == 354
            c.send(b"Subject: long\r\n\r\n" + b"x" * 998 + b"\r\n")  # 1000 octets: fine
            c.send(b"y" * 999 + b"\r\n")  # 1001 octets: too long
            reply = c.command(".")
            assert (reply.code, reply.status) == (554, "5.6.0")
            still_serves(c)

    await deferToThread(session)
    assert len(server.messages) == 1


@pytest_twisted.ensureDeferred
async def test_header_block_too_large(serve):
    server = serve()

    def session() -> None:
        with Client(server.port) as c:
            open_transaction(c)
            assert c.command("DATA").code == 354
            header = b"X-Filler: " + b"h" * 88 + b"\r\n"  # 100-octet lines, 110 kB
            c.send(header * 1100 + b"\r\nbody\r\n")
            reply = c.command(".")
            assert (reply.code, reply.status) == (552, "5.3.4")
            still_serves(c)

    await deferToThread(session)
    assert len(server.messages) == 1


@pytest_twisted.ensureDeferred
async def test_too_many_errors_closes(serve):
    server = serve()

    def session() -> None:
        with Client(server.port) as c:
            c.greet()
            c.send(b"XYZZY\r\n" * 12)  # the 10th error ends the session
            replies = c.rest()
            assert [(r.code, r.status) for r in replies] == [(500, "5.5.2")] * 10 + [
                (421, "4.7.0")
            ]
            assert "mx.test" in replies[-1].text

    await deferToThread(session)


@pytest_twisted.ensureDeferred
async def test_idle_timeout(serve):
    server = serve(config(command_timeout=0.5))

    def session() -> float:
        with Client(server.port) as c:
            c.greet()
            started = time.monotonic()
            [reply] = c.rest(timeout=5)
            assert (reply.code, reply.status) == (421, "4.4.2")
            return time.monotonic() - started

    assert 0.4 <= await deferToThread(session) < 3


@pytest_twisted.ensureDeferred
async def test_data_timeout_aborts_the_message(serve):
    server = serve(config(data_timeout=0.5))

    def session() -> None:
        with Client(server.port) as c:
            open_transaction(c)
            assert c.command("DATA").code == 354
            c.send(b"Subject: stalled\r\n\r\nhalf a messa")
            [reply] = c.rest(timeout=5)
            assert (reply.code, reply.status) == (421, "4.4.2")

    await deferToThread(session)
    assert server.messages == []
    assert server.delivery.aborted == 1


@pytest_twisted.ensureDeferred
async def test_session_deadline(serve):
    server = serve(config(session_deadline=1, command_timeout=60))

    def session() -> float:
        with Client(server.port) as c:
            started = time.monotonic()
            c.greet()
            for _ in range(50):  # a slow drip that keeps resetting the idle timer
                try:
                    reply = c.command("NOOP")
                except (EOFError, ConnectionError):
                    raise AssertionError("closed without a 421") from None
                if reply.code != 250:
                    assert (reply.code, reply.status) == (421, "4.4.2")
                    assert c.is_closed()
                    return time.monotonic() - started
                time.sleep(0.1)
            raise AssertionError("the session outlived its deadline")

    assert 0.9 <= await deferToThread(session) < 3


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "request_line",
    [b"GET / HTTP/1.1\r\nHost: mx.test\r\n\r\n", b"POST /x HTTP/1.0\r\n\r\n"],
)
async def test_http_request_closed_at_once(serve, request_line):
    server = serve()

    def session() -> None:
        with Client(server.port) as c:
            assert c.reply().code == 220
            c.send(request_line)
            replies = c.rest(timeout=2)
            assert [(r.code, r.text) for r in replies] == [(221, "Not an HTTP server, goodbye")]

    await deferToThread(session)
