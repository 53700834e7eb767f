"""The session's one-command operations (pure): greeting, EHLO with HELO fallback,
LHLO, STARTTLS and what it forgets, AUTH PLAIN/LOGIN on the wire (read back by the
server's own SASL parser), custom commands and QUIT."""

from __future__ import annotations

import base64

import pytest

from maitred_tx.client.errors import (
    AuthenticationFailed,
    AuthenticationUnavailable,
    CleartextAuthRefused,
    ProtocolViolation,
    ServerRefused,
    TLSUnavailable,
)
from maitred_tx.client.session import ClientSession, TLSMode
from maitred_tx.smtp.sasl import Credentials, SaslExchange, parse_auth_command

EHLO = b"250-mx.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n" \
       b"250 ENHANCEDSTATUSCODES\r\n"


def play(session: ClientSession, op, *server: bytes) -> list[bytes]:
    """Run *op*: what the client writes first, then after each server chunk."""
    out = [op.start()]
    for data in server:
        session.receive_data(data)
        written = b""
        while not op.done and (reply := session.next_reply()) is not None:
            written += op.on_reply(reply)
        out.append(written)
    return out


def ready(lmtp: bool = False, ehlo: bytes = EHLO, tls: bool = False) -> ClientSession:
    session = ClientSession(host="mx.test", helo="client.test", lmtp=lmtp)
    play(session, session.greet(), b"220 mx.test ESMTP\r\n")
    if tls:
        session.tls = True
    play(session, session.hello(), ehlo)
    return session


def test_greeting_and_ehlo():
    session = ready()
    assert session.greeting.lines == ("mx.test ESMTP",)
    assert session.extensions.starttls and session.extensions.auth == {"PLAIN", "LOGIN"}
    assert session.parser.enhanced and session.ready


@pytest.mark.parametrize(("greeting", "permanent"), [
    (b"554 5.3.2 No service\r\n", True), (b"421 4.3.2 Busy\r\n", False)])
def test_refused_greeting(greeting, permanent):
    session = ClientSession(host="mx.test", helo="client.test")
    with pytest.raises(ServerRefused, match=r"mx\.test refused the connection") as caught:
        play(session, session.greet(), greeting)
    assert caught.value.permanent is permanent and caught.value.reply.code in (554, 421)


def test_helo_fallback_after_ehlo_5xx():
    session = ClientSession(host="mx.test", helo="client.test")
    play(session, session.greet(), b"220 old.test\r\n")
    out = play(session, session.hello(), b"502 Command not implemented\r\n",
               b"250 old.test\r\n")
    assert out == [b"EHLO client.test\r\n", b"HELO client.test\r\n", b""]
    assert session.ready and not session.extensions.esmtp


@pytest.mark.parametrize(("replies", "permanent"), [
    ((b"451 4.3.0 later\r\n",), False),  # no fallback on 4xx
    ((b"500 no\r\n", b"550 no HELO either\r\n"), True),
])
def test_hello_refused(replies, permanent):
    session = ClientSession(host="mx.test", helo="client.test")
    play(session, session.greet(), b"220 x\r\n")
    with pytest.raises(ServerRefused) as caught:
        play(session, session.hello(), *replies)
    assert caught.value.permanent is permanent


def test_lhlo_has_no_helo_fallback():
    session = ClientSession(host="lmtp.test", helo="client.test", lmtp=True)
    play(session, session.greet(), b"220 lmtp.test LMTP\r\n")
    op = session.hello()
    assert op.start() == b"LHLO client.test\r\n"
    session.receive_data(b"500 5.5.2 unknown\r\n")
    with pytest.raises(ServerRefused, match="LHLO"):
        op.on_reply(session.next_reply())


def test_starttls_decisions():
    session = ready()
    assert session.wants_starttls(TLSMode.REQUIRED)
    assert session.wants_starttls(TLSMode.OPPORTUNISTIC)
    assert not session.wants_starttls(TLSMode.NONE)
    plain = ready(ehlo=b"250-mx.test\r\n250 PIPELINING\r\n")
    assert not plain.wants_starttls(TLSMode.OPPORTUNISTIC)
    with pytest.raises(TLSUnavailable, match=r"TLS is required, but mx\.test does not offer"):
        plain.wants_starttls(TLSMode.REQUIRED)


def test_starttls_forgets_what_was_said_before():
    session = ready()
    session.authenticated = "someone"  # as if AUTH had happened before
    op = session.starttls(required=True)
    play(session, op, b"220 2.0.0 Ready\r\n")
    assert op.result and session.tls
    assert not session.extensions.esmtp and session.hello_reply is None
    assert session.authenticated is None and not session.parser.enhanced
    assert not session.wants_starttls(TLSMode.REQUIRED)  # never twice


def test_bytes_after_the_starttls_reply_are_an_injection():
    session = ready()
    op = session.starttls(required=True)
    with pytest.raises(ProtocolViolation, match="sent data after its STARTTLS reply"):
        play(session, op, b"220 2.0.0 Ready\r\n250 injected\r\n")


@pytest.mark.parametrize("required", [True, False])
def test_starttls_refused(required):
    session = ready()
    op = session.starttls(required=required)
    if required:
        with pytest.raises(TLSUnavailable, match="refused STARTTLS") as caught:
            play(session, op, b"454 4.7.0 TLS not available\r\n")
        assert caught.value.temporary
    else:
        play(session, op, b"454 4.7.0 TLS not available\r\n")
        assert op.done and not op.result and not session.tls and session.ready


def test_starttls_421_fails_even_when_tls_is_not_required():
    """The server is closing (RFC 5321 3.8): there is no clear text to go on in."""
    session = ready()
    with pytest.raises(TLSUnavailable) as caught:
        play(session, session.starttls(required=False), b"421 4.3.2 Shutting down\r\n")
    assert caught.value.temporary and session.closing and not session.ready


def test_auth_plain_is_one_round_trip_and_reads_back():
    session = ready(tls=True)
    op = session.authenticate("jörg@example.com", "pa ss")
    out = play(session, op, b"235 2.7.0 Authentication successful\r\n")
    mechanism, initial = parse_auth_command(out[0][5:-2].decode())
    assert mechanism == "PLAIN"
    credentials = SaslExchange(mechanism).start(initial)
    assert isinstance(credentials, Credentials)
    assert (credentials.authzid, credentials.authcid, credentials.password) == (
        "", "jörg@example.com", "pa ss")
    assert session.authenticated == "jörg@example.com"


def test_auth_login_exchange():
    session = ready(ehlo=b"250-mx.test\r\n250 AUTH LOGIN\r\n", tls=True)
    out = play(session, session.authenticate("user", "secret"),
               b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"235 2.7.0 OK\r\n")
    assert out[0] == b"AUTH LOGIN\r\n"
    assert [base64.b64decode(line) for line in out[1:3]] == [b"user", b"secret"]
    assert session.authenticated == "user"
    with pytest.raises(RuntimeError, match="already authenticated"):
        session.authenticate("user", "secret")  # RFC 4954 4: once per session


@pytest.mark.parametrize(("reply", "permanent"), [
    (b"535 5.7.8 Authentication credentials invalid\r\n", True),
    (b"454 4.7.0 Temporary authentication failure\r\n", False)])
def test_auth_refused(reply, permanent):
    session = ready(tls=True)
    with pytest.raises(AuthenticationFailed) as caught:
        play(session, session.authenticate("user", "bad"), reply)
    assert caught.value.permanent is permanent and session.authenticated is None


def test_auth_endless_challenges_are_cancelled():
    session = ready(tls=True)
    op = session.authenticate("user", "pw")
    out = play(session, op, b"334 \r\n", b"334 \r\n")
    assert out[1].endswith(b"\r\n") and out[2] == b"*\r\n"  # RFC 4954 4: cancel
    with pytest.raises(AuthenticationFailed, match="asked for more"):
        play(session, op, b"501 5.7.0 Cancelled\r\n")


def test_auth_refused_before_any_round_trip():
    with pytest.raises(CleartextAuthRefused, match="without TLS"):
        ready().authenticate("user", "pw")
    ready().authenticate("user", "pw", allow_cleartext=True)  # asked for explicitly
    with pytest.raises(AuthenticationUnavailable, match="CRAM-MD5"):
        ready(ehlo=b"250-mx\r\n250 AUTH CRAM-MD5\r\n", tls=True).authenticate("u", "p")
    with pytest.raises(AuthenticationUnavailable):
        ready(tls=True).authenticate("u", "p", mechanism="XOAUTH2")


def test_custom_commands():
    session = ready()
    op = session.command("XFOO bar")
    assert play(session, op, b"250-line one\r\n250 2.0.0 line two\r\n")[0] == b"XFOO bar\r\n"
    assert (op.result.code, op.result.status, op.result.lines) == (
        250, "2.0.0", ("line one", "line two"))
    for bad in ["NOOP\r\nMAIL FROM:<x@y>", "MAIL FROM:<x@y>", "starttls", "", "9X"]:
        with pytest.raises(ValueError):
            session.command(bad)


def test_quit():
    session = ready()
    op = session.quit()
    assert play(session, op, b"221 2.0.0 Bye\r\n")[0] == b"QUIT\r\n"
    assert op.result.code == 221 and session.closing
