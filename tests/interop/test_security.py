"""Attacks over a real socket: SMTP smuggling (CVE-2023-51764 family) and the address
tricks that would turn the server into a relay."""

from __future__ import annotations

import pytest
import pytest_twisted
from maitred_interop import Client, config
from twisted.internet.threads import deferToThread

from maitred_tx.smtp.config import BareLineEndings

# What a lax downstream MTA might take for the end of the message, followed by a whole
# second transaction.  For us only CRLF.CRLF ends DATA: the "smuggled\r\n.\r\n" is the
# one real end, so everything before it is the body of ONE message.
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@localhost>\r\nDATA\r\nsmuggled\r\n.\r\n"
BARE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r"]
SEQUENCES = [*BARE_ENDS, b"\r\n\x00.\r\n"]
HEAD = b"From: a@b.org\r\nSubject: smuggling\r\n\r\nfirst message"


def stored_body(sequence: bytes) -> bytes:
    """The body as it must be stored: a line that starts with "." and has more on it
    loses that dot (RFC 5321 4.5.2), "\r\n.\n" included."""
    return HEAD + sequence.replace(b"\r\n.", b"\r\n") + SMUGGLED[: -len(b".\r\n")]


def smuggle(port: int, sequence: bytes) -> list[tuple[int, str | None]]:
    """One transaction whose body hides a second one; every reply after the 354."""
    with Client(port) as c:
        c.greet()
        c.send(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n")
        assert [r.code for r in c.replies(3)] == [250, 250, 354]
        c.send(HEAD + sequence + SMUGGLED + b"QUIT\r\n")
        return [(r.code, r.status) for r in c.rest()]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("sequence", BARE_ENDS, ids=repr)
async def test_smuggling_rejected_by_default(serve, sequence):
    server = serve()
    replies = await deferToThread(smuggle, server.port, sequence)
    # Exactly one reply to the body, then the QUIT: no MAIL/RCPT/DATA was ever seen.
    assert replies == [(550, "5.6.0"), (221, "2.0.0")]
    assert server.messages == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("sequence", SEQUENCES, ids=repr)
async def test_smuggling_accepted_as_one_message(serve, sequence):
    server = serve(config(bare=BareLineEndings.ACCEPT))
    replies = await deferToThread(smuggle, server.port, sequence)
    assert replies == [(250, "2.0.0"), (221, "2.0.0")]
    [stored] = server.messages  # never a second message
    assert stored.body == stored_body(sequence)
    assert [str(r.mailbox) for r in stored.envelope.recipients] == ["user@localhost"]


@pytest_twisted.ensureDeferred
async def test_smuggling_nul_before_dot_by_default(serve):
    """CRLF NUL "." CRLF has no bare line end, so the bare-line policy does not apply:
    whatever the verdict, it is one reply and at most one message holding the bytes."""
    server = serve()
    sequence = b"\r\n\x00.\r\n"
    replies = await deferToThread(smuggle, server.port, sequence)
    assert len(replies) == 2 and replies[1] == (221, "2.0.0")
    if replies[0][0] == 250:
        [stored] = server.messages
        assert stored.body == stored_body(sequence)
    else:
        assert replies[0][0] >= 500
        assert server.messages == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("bare", list(BareLineEndings))
async def test_smuggling_split_byte_by_byte(serve, bare):
    """The same attack, one byte per send: no chunking shows a second end marker."""
    server = serve(config(bare=bare))

    def session() -> list[tuple[int, str | None]]:
        with Client(server.port) as c:
            c.sock.setsockopt(6, 1, 1)  # TCP_NODELAY: each byte its own segment
            c.greet()
            c.send(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n")
            assert [r.code for r in c.replies(3)] == [250, 250, 354]
            for byte in b"x\n.\n" + SMUGGLED:
                c.send(bytes([byte]))
            c.send(b"QUIT\r\n")
            return [(r.code, r.status) for r in c.rest()]

    replies = await deferToThread(session)
    expected = 250 if bare is BareLineEndings.ACCEPT else 550
    assert [code for code, _ in replies] == [expected, 221]
    assert len(server.messages) == (1 if bare is BareLineEndings.ACCEPT else 0)


RELAY_TRICKS = [
    "user%other@localhost",  # the percent hack
    "other!user@localhost",  # UUCP bang path
    '"user@other"@localhost',  # a quoted local part with an @
    "@a,@b:user@localhost",  # a source route (RFC 5321 C, dropped, never followed)
    "user@[127.0.0.1]",  # an address literal: not one of our domains
    "user@example.org",  # plainly foreign
]


@pytest_twisted.ensureDeferred
async def test_relay_tricks_refused(serve):
    server = serve()

    def session() -> list[tuple[str, int, str | None]]:
        with Client(server.port) as c:
            c.greet()
            assert c.command("MAIL FROM:<a@b.org>").code == 250
            out = []
            for address in RELAY_TRICKS:
                reply = c.command(f"RCPT TO:<{address}>")
                out.append((address, reply.code, reply.status))
            reply = c.command("RCPT TO:<user@LOCALHOST.>")
            out.append(("user@LOCALHOST.", reply.code, reply.status))
            return out

    results = await deferToThread(session)
    assert results[:-1] == [(a, 550, "5.7.1") for a in RELAY_TRICKS]
    assert results[-1] == ("user@LOCALHOST.", 250, "2.1.5")


@pytest_twisted.ensureDeferred
async def test_relay_refusals_store_nothing(serve):
    server = serve(config(max_errors=100))

    def session() -> None:
        with Client(server.port) as c:
            c.greet()
            rcpts = b"".join(f"RCPT TO:<{a}>\r\n".encode() for a in RELAY_TRICKS)
            c.send(b"MAIL FROM:<a@b.org>\r\n" + rcpts + b"DATA\r\n")
            replies = c.replies(len(RELAY_TRICKS) + 2)
            assert [r.code for r in replies[1:-1]] == [550] * len(RELAY_TRICKS)
            assert (replies[-1].code, replies[-1].status) == (503, "5.5.1")  # no recipient

    await deferToThread(session)
    assert server.messages == []


@pytest_twisted.ensureDeferred
async def test_nul_before_dot_refused_by_default(serve):
    """RFC 5322 2.3 / RFC 6152 forbid NUL in a text body; a downstream MTA that strips
    NUL would turn CRLF NUL . CRLF into an end of data."""
    server = serve()
    replies = await deferToThread(smuggle, server.port, b"\r\n\x00.\r\n")
    assert replies == [(550, "5.6.0"), (221, "2.0.0")]
    assert server.messages == []
