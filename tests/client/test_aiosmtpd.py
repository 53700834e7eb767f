"""The client against aiosmtpd (its asyncio Controller in a thread, on loopback): a
server without PIPELINING, CHUNKING or ENHANCEDSTATUSCODES, so the client goes one
command at a time with DATA; then STARTTLS with the test certificate, and AUTH
PLAIN/LOGIN checked by aiosmtpd's authenticator."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from maitred_tx.client import Outcome, SMTPClient, TLSMode

aiosmtpd = pytest.importorskip("aiosmtpd")

from aiosmtpd.controller import Controller  # noqa: E402
from aiosmtpd.smtp import AuthResult, LoginPassword  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Handler:
    """Refuses "nobody@", keeps the rest; records what TLS and AUTH it saw."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, bool, Any]] = []

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("nobody@"):
            return "550 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                              session.ssl is not None,
                              session.authenticated and session.auth_data))
        return "250 Message accepted"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        b"user", b"p\xc3\xa4ss")
    return AuthResult(success=ok, auth_data=auth_data)


@pytest.fixture
def aiosmtpd_server():
    controllers: list[Controller] = []

    def start(**kw: Any) -> tuple[int, Handler]:
        handler = Handler()
        controller = Controller(handler, hostname="127.0.0.1", port=free_port(),
                                enable_SMTPUTF8=True, **kw)
        controller.start()  # blocks until it accepts: it runs in its own thread
        controllers.append(controller)
        return controller.port, handler

    yield start
    for controller in controllers:
        controller.stop()


@pytest_twisted.ensureDeferred
async def test_one_command_at_a_time_and_several_messages(aiosmtpd_server):
    port, handler = await deferToThread(aiosmtpd_server)
    client = await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{port}", tls=TLSMode.NONE)
    assert not client.extensions.pipelining and client.extensions.smtputf8
    first = await client.send("a@b.org", ["x@y.org", "nobody@y.org", "z@y.org"],
                              b"Subject: one\r\n\r\n.dot\r\n")
    second = await client.send("a@b.org", ["jörg@y.org"], "Subject: zwei\r\n\r\nÄ\r\n".encode())
    await client.quit()
    assert [(r.recipient, r.outcome, r.reply.code) for r in first.recipients] == [
        ("x@y.org", Outcome.DELIVERED, 250), ("nobody@y.org", Outcome.PERMANENT, 550),
        ("z@y.org", Outcome.DELIVERED, 250)]
    assert second.all_delivered
    (sender, rcpts, content, tls, _), (_, rcpts2, content2, _, _) = handler.messages
    assert (sender, rcpts, content) == ("a@b.org", ["x@y.org", "z@y.org"],
                                        b"Subject: one\r\n\r\n.dot\r\n")
    assert rcpts2 == ["jörg@y.org"] and content2 == "Subject: zwei\r\n\r\nÄ\r\n".encode()
    assert not tls


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_starttls_and_auth(aiosmtpd_server, certs, mechanism):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.cert), str(certs.key))
    port, handler = await deferToThread(
        aiosmtpd_server, tls_context=context, authenticator=authenticator)
    async with await SMTPClient.connect(
        reactor, f"tcp:127.0.0.1:{port}", tls=TLSMode.REQUIRED, tls_hostname="localhost",
        trust_root=str(certs.cert),
    ) as client:
        assert client.tls and {"PLAIN", "LOGIN"} <= client.extensions.auth
        await client.authenticate("user", "päss", mechanism=mechanism)
        result = await client.send("a@b.org", ["x@y.org"], b"Subject: tls\r\n\r\nhi\r\n")
    assert result.all_delivered
    [(_, _, _, tls, login)] = handler.messages
    assert tls and login.login == b"user"
