"""Relaying through an authenticated smarthost, every part real: the queue runner and
OutboundSender send to maitred_tx's own submission server on loopback (STARTTLS or
implicit TLS with a certificate from the test CA, AUTH PLAIN through a twisted.cred
portal that counts the logins it is asked for).

Delivered with the relay's user; a wrong password, a server without AUTH, a 454, a
certificate that does not verify or a server without STARTTLS all keep the message
queued (4.7.x), and when TLS fails no password reaches the server.  A reused
connection is not authenticated again."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from maitred_interop import until
from mta_sts_support import CA
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.queue.store import RecipientState
from maitred_tx.relay.route import RelayHost
from maitred_tx.relay.smarthost import RelayCredentials, RelayTLS
from maitred_tx.server.tls import server_context
from maitred_tx.tap import DeliveryRealm

USER, PASSWORD = "relay@sender.test", "s3cret:Pa55 word"
SENDER = USER  # submission: the user may only send as their own address
MESSAGE = (b"From: relay@sender.test\r\nTo: bob@good.test\r\nSubject: via smarthost\r\n"
           b"\r\nHello.\r\n")


@implementer(ICredentialsChecker)
class CountingChecker:
    """The server's password check, recording each user name it is asked about: one
    entry per AUTH exchange the client completed."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.inner = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})
        self.asked: list[bytes] = []

    def requestAvatarId(self, credentials: Any) -> Any:
        self.asked.append(credentials.username)
        return self.inner.requestAvatarId(credentials)


def submission(receiver, **kw: Any) -> tuple[Any, CountingChecker]:
    """A submission smarthost (AUTH before MAIL) and its checker."""
    checker = CountingChecker()
    delivery = MemoryDelivery()
    server = receiver(delivery=delivery, portal=Portal(DeliveryRealm(delivery), [checker]),
                      **kw)
    return server, checker


def smarthost(port: int, *, name: str = "mx.good.test", tls: RelayTLS = RelayTLS.VERIFY,
              password: str = PASSWORD) -> RelayHost:
    """[name]:port (name resolves to 127.0.0.1 through the test DNS) with credentials."""
    return RelayHost(name, port, tls=tls, credentials=RelayCredentials(USER, password))


async def deferred_recipient(r, address: str = "bob@good.test") -> Any:
    """Queue a message for *address*; its recipient once the runner deferred it (the
    message is then still queued)."""
    message_id = r.add(SENDER, [address], MESSAGE)

    def state() -> RecipientState | None:
        message = r.store.load(message_id)
        return None if message is None else message.recipients[0].state

    await until(lambda: state() is RecipientState.DEFERRED, what="the deferral")
    message = r.store.load(message_id)
    assert message is not None  # still queued, for the usual retries
    recipient = message.recipients[0]
    assert recipient.attempts == 1 and recipient.next_attempt_at > time.time()
    return recipient


def warnings(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") is not None
            and e["log_level"].name == "warn"]


def assert_no_password_in(events: list[dict[str, Any]]) -> None:
    for event in events:
        assert PASSWORD not in formatEvent(event)
        assert PASSWORD not in repr(event)


@pytest_twisted.ensureDeferred
async def test_delivered_through_starttls_and_auth(receiver, relay):
    server, checker = submission(receiver)
    r = relay(port=1, relay_host=smarthost(server.port))  # MX port 1: never used
    with capturedLogs() as events:
        message_id = r.add(SENDER, ["bob@good.test", "carol@elsewhere.test"], MESSAGE)
        await until(lambda: server.messages and r.store.load(message_id) is None,
                    what="delivery")
    [got] = server.messages
    session = got.envelope.session
    assert session.authenticated == USER and session.tls
    assert [str(x.mailbox) for x in got.envelope.recipients] == ["bob@good.test",
                                                                 "carol@elsewhere.test"]
    assert checker.asked == [USER.encode()]
    assert warnings(events) == []
    assert_no_password_in(events)


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_defers_and_keeps_the_message(receiver, relay):
    server, checker = submission(receiver)
    r = relay(port=1, relay_host=smarthost(server.port, password="wrong"))
    with capturedLogs() as events:
        recipient = await deferred_recipient(r)
    assert recipient.status == "4.7.8"  # the server's 535 5.7.8, deferred
    assert "mx.good.test" in recipient.diagnostic and "535 5.7.8" in recipient.diagnostic
    assert server.messages == [] and checker.asked == [USER.encode()]
    [warning] = warnings(events)
    assert "smarthost mx.good.test[127.0.0.1]" in warning and "535" in warning
    assert_no_password_in(events)


@pytest_twisted.ensureDeferred
async def test_a_smarthost_without_auth_defers(receiver, relay):
    server = receiver()  # an MX: STARTTLS, but no AUTH
    r = relay(port=1, relay_host=smarthost(server.port))
    recipient = await deferred_recipient(r)
    assert recipient.status == "4.7.0"
    assert "offers no AUTH" in recipient.diagnostic
    assert server.messages == []


@pytest_twisted.ensureDeferred
async def test_a_smarthost_without_starttls_never_gets_the_password(receiver, relay):
    server, checker = submission(receiver, tls=False)
    r = relay(port=1, relay_host=smarthost(server.port))
    recipient = await deferred_recipient(r)
    assert recipient.status == "4.7.5" and "STARTTLS" in recipient.diagnostic
    assert checker.asked == [] and server.messages == []


@pytest.mark.parametrize("failure", ["name not on the certificate", "untrusted CA"])
@pytest_twisted.ensureDeferred
async def test_a_certificate_that_does_not_verify_defers_before_auth(receiver, relay,
                                                                     failure):
    if failure == "untrusted CA":
        server, checker = submission(receiver, issuer=CA("someone else's CA"))
        host = smarthost(server.port)
    else:  # resolves to 127.0.0.1 like the others; the certificate does not name it
        server, checker = submission(receiver)
        host = smarthost(server.port, name="mx.wrongcert.test")
    r = relay(port=1, relay_host=host)
    with capturedLogs() as events:
        recipient = await deferred_recipient(r)
    assert recipient.status == "4.7.5" and host.name in recipient.diagnostic
    assert checker.asked == []  # the credentials never left
    assert server.messages == []
    assert any(host.name in w for w in warnings(events))


@pytest_twisted.ensureDeferred
async def test_implicit_tls(receiver, relay):
    server, checker = submission(receiver, implicit=True)
    r = relay(port=1, relay_host=smarthost(server.port, tls=RelayTLS.IMPLICIT))
    r.add(SENDER, ["bob@good.test"], MESSAGE)
    await until(lambda: server.messages, what="delivery")
    session = server.messages[0].envelope.session
    assert session.authenticated == USER and session.tls
    assert checker.asked == [USER.encode()]


@pytest_twisted.ensureDeferred
async def test_a_reused_connection_is_not_authenticated_again(receiver, relay):
    server, checker = submission(receiver)
    r = relay(port=1, relay_host=smarthost(server.port), destination_concurrency=1)
    for i in range(3):
        r.add(SENDER, ["bob@good.test"], MESSAGE.replace(b"Hello", b"M%d" % i))
    await until(lambda: len(server.messages) == 3, what="three deliveries")
    assert len(server.sessions) == 1
    assert checker.asked == [USER.encode()]
    assert {m.envelope.session.authenticated for m in server.messages} == {USER}


class _TemporaryAuthFailure(LineReceiver):
    """A smarthost that cannot check passwords just now: 454 to every AUTH."""

    delimiter = b"\r\n"

    def connectionMade(self) -> None:
        self.sendLine(b"220 fake.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].upper()
        self.factory.verbs.append(verb)
        if verb == b"EHLO":
            self.transport.write(b"250-fake.test\r\n250-ENHANCEDSTATUSCODES\r\n"
                                 b"250 AUTH PLAIN LOGIN\r\n")
        elif verb == b"AUTH":
            self.sendLine(b"454 4.7.0 Temporary authentication failure")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"503 5.5.1 Authenticate first")


@pytest_twisted.ensureDeferred
async def test_a_temporary_auth_failure_defers(ca, relay, tmp_path):
    pem = tmp_path / "fake.pem"
    pem.write_bytes(ca.issue(["mx.good.test"]).dumpPEM())
    factory = Factory.forProtocol(_TemporaryAuthFailure)
    factory.verbs = []  # type: ignore[attr-defined]
    port = reactor.listenSSL(0, factory, server_context(pem), interface="127.0.0.1")
    try:
        r = relay(port=1, relay_host=smarthost(port.getHost().port, tls=RelayTLS.IMPLICIT))
        recipient = await deferred_recipient(r)
    finally:
        await port.stopListening()
    assert recipient.status == "4.7.0" and "454 4.7.0" in recipient.diagnostic
    assert b"MAIL" not in factory.verbs  # type: ignore[attr-defined]
