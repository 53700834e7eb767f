"""AUTH (RFC 4954) and submission (RFC 6409) through the real protocol, factory and a
twisted.cred Portal, without sockets: FakeConnection + task.Clock (issue 4).

Every reply is checked for its code and its enhanced code (None before EHLO).
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.cred.checkers import (
    ANONYMOUS,
    AllowAnonymousAccess,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.mail import smtp
from zope.interface import implementer

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.interfaces import IDelivery, ISubmissionUser
from maitred_tx.server import authn
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.config import Config, Limits, Mode
from maitred_tx.tap import DeliveryRealm, Options, makeService
from maitred_tx.testing import FakeConnection

USER, PASSWORD = "alice@example.com", "Tr0ub4dor&3-secret"
LOCAL = frozenset({"example.com", "example.net"})
MESSAGE = b"From: alice@example.com\r\nSubject: s\r\n\r\nbody\r\n.\r\n"


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def plain(authcid: str = USER, password: str = PASSWORD, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{authcid}\0{password}")


def submission(**kw: Any) -> Config:
    kw.setdefault("insecure_auth", True)  # the cleartext rule has its own tests below
    return Config(hostname="mx.test", local_domains=LOCAL, mode=Mode.SUBMISSION, auth=True,
                  **kw)


def connect(config: Config, portal: Portal | None, delivery: Any = None,
            clock: Clock | None = None) -> FakeConnection:
    clock = clock or Clock()
    delivery = MemoryDelivery() if delivery is None else delivery
    factory = SMTPFactory(clock, config, delivery, portal=portal)
    conn = FakeConnection(factory=factory, clock=clock)
    assert [(r.code, r.status) for r in conn.replies()] == [(220, None)]
    return conn


def greeted(config: Config, portal: Portal | None, delivery: Any = None,
            clock: Clock | None = None) -> FakeConnection:
    conn = connect(config, portal, delivery, clock)
    [ehlo] = conn.send(b"EHLO client.test\r\n")
    assert (ehlo.code, ehlo.status) == (250, None)
    return conn


def portal_of(delivery: Any, *extra: Any) -> Portal:
    users = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode(),
                                                       "bob": b"bobpass"})
    return Portal(DeliveryRealm(delivery), [users, *extra])


@pytest.fixture
def delivery() -> MemoryDelivery:
    return MemoryDelivery()


@pytest.fixture
def conn(delivery: MemoryDelivery) -> FakeConnection:
    return greeted(submission(), portal_of(delivery), delivery)


# --- the mechanisms ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["whole", "lines", "bytes"])
def test_plain_with_initial_response(conn: FakeConnection, mode: str) -> None:
    assert conn.codes(b"AUTH PLAIN " + plain() + b"\r\n", mode) == [(235, "2.7.0")]
    assert conn.protocol.policy.context.authenticated == USER


def test_plain_with_a_challenge(conn: FakeConnection) -> None:
    [challenge] = conn.send(b"AUTH PLAIN\r\n")
    assert (challenge.code, challenge.status, challenge.text) == (334, None, "")
    assert conn.codes(plain() + b"\r\n") == [(235, "2.7.0")]


def test_plain_empty_initial_response_is_a_challenge(conn: FakeConnection) -> None:
    assert conn.codes(b"AUTH PLAIN =\r\n") == [(501, "5.5.2")]  # "=" is an empty message


@pytest.mark.parametrize("initial", [False, True])
def test_login(conn: FakeConnection, initial: bool) -> None:
    if initial:
        replies = conn.send(b"AUTH LOGIN " + b64(USER) + b"\r\n")
    else:
        [username] = conn.send(b"AUTH LOGIN\r\n")
        assert (username.code, base64.b64decode(username.text)) == (334, b"Username:")
        replies = conn.send(b64(USER) + b"\r\n")
    [password] = replies
    assert (password.code, password.status, base64.b64decode(password.text)) == (
        334, None, b"Password:")
    assert conn.codes(b64(PASSWORD) + b"\r\n") == [(235, "2.7.0")]


@pytest.mark.parametrize("command", [b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n"])
def test_star_cancels(conn: FakeConnection, command: bytes) -> None:
    assert conn.codes(command)[0][0] == 334
    assert conn.codes(b"*\r\n") == [(501, "5.7.0")]
    assert conn.codes(b"AUTH PLAIN " + plain() + b"\r\n") == [(235, "2.7.0")]  # not stuck


@pytest.mark.parametrize("lines", [
    [b"AUTH PLAIN !!notbase64\r\n"],
    [b"AUTH PLAIN\r\n", b"%%%\r\n"],
    [b"AUTH LOGIN\r\n", b"not base64!\r\n"],
    [b"AUTH LOGIN " + b64(USER) + b"\r\n", b"@@@\r\n"],
])
def test_bad_base64(conn: FakeConnection, lines: list[bytes]) -> None:
    for line in lines[:-1]:
        assert conn.codes(line)[0][0] == 334
    assert conn.codes(lines[-1]) == [(501, "5.5.2")]


def test_auth_twice(conn: FakeConnection) -> None:
    assert conn.codes(b"AUTH PLAIN " + plain() + b"\r\n") == [(235, "2.7.0")]
    [again] = conn.send(b"AUTH LOGIN\r\n")
    assert (again.code, again.status, again.text) == (503, "5.5.1", "Already authenticated")


def test_auth_inside_a_transaction(conn: FakeConnection) -> None:
    assert conn.codes(b"AUTH PLAIN " + plain() + b"\r\n") == [(235, "2.7.0")]
    assert conn.codes(b"MAIL FROM:<alice@example.com>\r\n") == [(250, "2.1.0")]
    [reply] = conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert (reply.code, reply.status) == (503, "5.5.1")
    assert reply.text == "AUTH not allowed during a mail transaction"


def test_auth_before_ehlo(delivery: MemoryDelivery) -> None:
    conn = connect(submission(), portal_of(delivery), delivery)
    assert conn.codes(b"AUTH PLAIN " + plain() + b"\r\n") == [(503, None)]


def test_unknown_mechanism(conn: FakeConnection) -> None:
    assert conn.codes(b"AUTH CRAM-MD5\r\n") == [(504, "5.5.4")]


# --- authzid (RFC 4616 2) ---------------------------------------------------------------


def test_authzid_equal_to_authcid_is_accepted(conn: FakeConnection) -> None:
    assert conn.codes(b"AUTH PLAIN " + plain(authzid=USER) + b"\r\n") == [(235, "2.7.0")]
    assert conn.protocol.policy.context.authenticated == USER


def test_other_authzid_is_refused_by_default(conn: FakeConnection) -> None:
    conn.codes(b"AUTH PLAIN " + plain(authzid="boss@example.com") + b"\r\n")
    conn.clock.advance(1)
    assert [(r.code, r.status) for r in conn.replies()] == [(535, "5.7.8")]
    assert conn.protocol.policy.context.authenticated is None


@implementer(ISubmissionUser, IDelivery)
class Assistant(MemoryDelivery):
    """An avatar that may act as boss@example.com and send as the boss or itself."""

    def may_act_as(self, identity: str, authzid: str) -> bool:
        return authzid == "boss@example.com"

    def allowed_senders(self, identity: str) -> list[str]:
        return [identity, "Team@Example.com"]


def test_authzid_allowed_by_the_realm(delivery: MemoryDelivery) -> None:
    avatar = Assistant()
    conn = greeted(submission(), portal_of(avatar), delivery)
    assert conn.codes(b"AUTH PLAIN " + plain(authzid="boss@example.com") + b"\r\n") == [
        (235, "2.7.0")]
    assert conn.protocol.policy.context.authenticated == "boss@example.com"
    # ISubmissionUser.allowed_senders decides the senders (case-insensitively).
    assert conn.codes(b"MAIL FROM:<team@example.com>\r\n") == [(250, "2.1.0")]
    assert conn.codes(b"RSET\r\nMAIL FROM:<alice@example.com>\r\n") == [
        (250, "2.0.0"), (550, "5.7.1")]
    [refused] = conn.send(b"MAIL FROM:<other@example.net>\r\n")
    assert (refused.code, refused.status) == (550, "5.7.1")


def test_realm_refusing_the_authzid(delivery: MemoryDelivery) -> None:
    conn = greeted(submission(), portal_of(Assistant()), delivery)
    conn.codes(b"AUTH PLAIN " + plain(authzid="ceo@example.com") + b"\r\n")
    conn.clock.advance(1)
    assert [(r.code, r.status) for r in conn.replies()] == [(535, "5.7.8")]


# --- failures: slowed down, then 421 ----------------------------------------------------


def test_failures_are_slowed_down_then_the_session_closes(delivery: MemoryDelivery) -> None:
    conn = greeted(submission(limits=Limits(max_auth_failures=3)), portal_of(delivery),
                   delivery)
    for delay in (1.0, 2.0):
        assert conn.codes(b"AUTH PLAIN " + plain(password="guess") + b"\r\n") == []
        assert not conn.reading  # nothing else is read meanwhile
        conn.clock.advance(delay - 0.01)
        assert conn.replies() == []  # not yet
        conn.clock.advance(0.01)
        assert [(r.code, r.status) for r in conn.replies()] == [(535, "5.7.8")]
        assert conn.reading
    assert conn.codes(b"AUTH LOGIN " + b64(USER) + b"\r\n" + b64("guess") + b"\r\n") == [
        (334, None)]
    conn.clock.advance(3.99)
    assert conn.replies() == []
    conn.clock.advance(0.01)
    assert [(r.code, r.status) for r in conn.replies()] == [(535, "5.7.8"), (421, "4.7.0")]
    assert not conn.connected


def test_pipelined_commands_wait_for_the_delayed_answer(conn: FakeConnection) -> None:
    assert conn.codes(b"AUTH PLAIN " + plain(password="x") + b"\r\nNOOP\r\n") == []
    conn.clock.advance(1)
    assert [(r.code, r.status) for r in conn.replies()] == [(535, "5.7.8"), (250, "2.0.0")]


def test_success_is_not_delayed_after_a_failure(conn: FakeConnection) -> None:
    conn.codes(b"AUTH PLAIN " + plain(password="x") + b"\r\n")
    conn.clock.advance(1)
    conn.replies()
    assert conn.codes(b"AUTH PLAIN " + plain() + b"\r\n") == [(235, "2.7.0")]


# --- passwords never logged -------------------------------------------------------------


def _leaks(events: list[dict[str, Any]], secret: str) -> list[str]:
    found = []
    for event in events:
        texts = [formatEvent(event), *(repr(v) for v in event.values())]
        failure = event.get("log_failure")
        if failure is not None:
            texts.append(failure.getTraceback())
        found += [t for t in texts if secret in t or secret.encode().hex() in t]
    return found


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_passwords_never_appear_in_logs(delivery: MemoryDelivery, mechanism: str) -> None:
    def attempt(conn: FakeConnection, password: str) -> list[tuple[int, str | None]]:
        if mechanism == "PLAIN":
            replies = conn.send(b"AUTH PLAIN " + plain(password=password) + b"\r\n")
        else:
            replies = conn.send(b"AUTH LOGIN\r\n" + b64(USER) + b"\r\n" + b64(password)
                                + b"\r\n")
        conn.clock.advance(10)
        return [(r.code, r.status) for r in replies + conn.replies()]

    with capturedLogs() as events:
        conn = greeted(submission(), portal_of(delivery), delivery)
        failed = attempt(conn, "Wr0ng-Guess-xyz")
        succeeded = attempt(conn, PASSWORD)
        sent = conn.codes(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
                          b"DATA\r\n" + MESSAGE + b"QUIT\r\n")
    assert failed[-1] == (535, "5.7.8") and succeeded[-1] == (235, "2.7.0")
    assert sent[-2:] == [(250, "2.0.0"), (221, "2.0.0")]
    assert events, "the session logs something"
    for secret in (PASSWORD, "Wr0ng-Guess-xyz"):
        # Neither the password nor the base64 the client sent it in (a logged command
        # line would show the latter).
        for form in (secret, b64(secret).decode(), plain(password=secret).decode()):
            assert _leaks(events, form) == [], form


def test_password_not_logged_when_the_portal_breaks(delivery: MemoryDelivery) -> None:
    @implementer(IRealm)
    class Broken:
        def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
            raise RuntimeError("realm is down")

    users = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})
    with capturedLogs() as events:
        conn = greeted(submission(), Portal(Broken(), [users]), delivery)
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        conn.clock.advance(1)
    assert [(r.code, r.status) for r in conn.replies()] == [(535, "5.7.8")]
    assert any("log_failure" in e for e in events)  # the breakage is logged...
    assert _leaks(events, PASSWORD) == []  # ...without the password


# --- the realm's avatar is the delivery -------------------------------------------------


@implementer(smtp.IMessageDelivery)
class TwistedMailBox:
    """A twisted.mail IMessageDelivery that keeps the lines of each message."""

    def __init__(self) -> None:
        self.messages: list[list[bytes]] = []

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: by twisted.mail avatar"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        box = self

        @implementer(smtp.IMessage)
        class Message:
            def __init__(self) -> None:
                self.lines: list[bytes] = []

            def lineReceived(self, line: bytes) -> None:
                self.lines.append(line)

            def eomReceived(self) -> Any:
                box.messages.append(self.lines)
                return defer.succeed(None)

            def connectionLost(self) -> None:
                pass

        return Message


@implementer(IRealm)
class PerUserRealm:
    """alice gets a native delivery, bob a twisted.mail one, anonymous a third."""

    def __init__(self) -> None:
        self.alice = MemoryDelivery()
        self.bob = TwistedMailBox()
        self.anonymous = MemoryDelivery()

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        avatar = {USER.encode(): self.alice, b"bob": self.bob, ANONYMOUS: self.anonymous}[
            avatarId]
        for interface in interfaces:
            if interface.providedBy(avatar):
                return interface, avatar, lambda: None
        raise NotImplementedError(interfaces)


def per_user_portal(realm: PerUserRealm, anonymous: bool = False) -> Portal:
    users = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode(),
                                                       "bob": b"bobpass"})
    return Portal(realm, [users, *([AllowAnonymousAccess()] if anonymous else [])])


def test_native_avatar_gets_the_message(delivery: MemoryDelivery) -> None:
    realm = PerUserRealm()
    conn = greeted(submission(), per_user_portal(realm), delivery)
    assert conn.codes(b"AUTH PLAIN " + plain() + b"\r\n") == [(235, "2.7.0")]
    assert conn.codes(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@remote.example>\r\n"
                      b"DATA\r\n" + MESSAGE) == [(250, "2.1.0"), (250, "2.1.5"), (354, None),
                                                 (250, "2.0.0")]
    [stored] = realm.alice.messages
    assert stored.envelope.session.authenticated == USER
    assert delivery.messages == []  # not the default delivery


def test_twisted_mail_avatar_gets_the_message(delivery: MemoryDelivery) -> None:
    realm = PerUserRealm()
    conn = greeted(submission(), per_user_portal(realm), delivery)
    assert conn.codes(b"AUTH LOGIN " + b64("bob") + b"\r\n" + b64("bobpass") + b"\r\n") == [
        (334, None), (235, "2.7.0")]
    body = b"From: bob@example.com\r\nSubject: s\r\n\r\nfrom bob\r\n.\r\n"
    assert conn.codes(b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<x@remote.example>\r\n"
                      b"DATA\r\n" + body) == [(250, "2.1.0"), (250, "2.1.5"), (354, None),
                                              (250, "2.0.0")]
    [lines] = realm.bob.messages
    assert lines[0] == b"Received: by twisted.mail avatar" and lines[-1] == b"from bob"
    assert delivery.messages == [] and realm.alice.messages == []


def test_anonymous_sessions_get_the_anonymous_avatar(delivery: MemoryDelivery) -> None:
    realm = PerUserRealm()
    mx = Config(hostname="mx.test", local_domains=LOCAL)
    conn = greeted(mx, per_user_portal(realm, anonymous=True), delivery)
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
                      + MESSAGE) == [(250, "2.1.0"), (250, "2.1.5"), (354, None),
                                     (250, "2.0.0")]
    assert len(realm.anonymous.messages) == 1 and delivery.messages == []


def test_without_anonymous_access_the_default_delivery_serves(delivery: MemoryDelivery) -> None:
    realm = PerUserRealm()
    mx = Config(hostname="mx.test", local_domains=LOCAL)
    conn = greeted(mx, per_user_portal(realm), delivery)
    conn.send(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n" + MESSAGE)
    assert len(delivery.messages) == 1 and realm.anonymous.messages == []


# --- where AUTH is offered and accepted -------------------------------------------------


def test_auth_not_offered_nor_accepted_in_the_clear(delivery: MemoryDelivery) -> None:
    conn = connect(submission(insecure_auth=False), portal_of(delivery), delivery)
    [ehlo] = conn.send(b"EHLO client.test\r\n")
    assert not any(line.startswith("AUTH") for line in ehlo.lines)
    assert conn.codes(b"AUTH PLAIN " + plain() + b"\r\n") == [(538, "5.7.11")]
    assert conn.codes(b"AUTH LOGIN\r\n") == [(538, "5.7.11")]
    assert conn.codes(b"MAIL FROM:<alice@example.com>\r\n") == [(530, "5.7.0")]


def test_insecure_auth_offers_auth_in_the_clear(conn: FakeConnection) -> None:
    conn.send(b"RSET\r\n")
    [ehlo] = conn.send(b"EHLO client.test\r\n")
    assert "AUTH PLAIN LOGIN" in ehlo.lines


def test_mx_refuses_auth_and_relaying(delivery: MemoryDelivery) -> None:
    mx = Config(hostname="mx.test", local_domains=LOCAL, auth=True, insecure_auth=True)
    conn = connect(mx, portal_of(delivery), delivery)
    [ehlo] = conn.send(b"EHLO client.test\r\n")
    assert not any(line.startswith("AUTH") for line in ehlo.lines)
    assert conn.codes(b"AUTH PLAIN " + plain() + b"\r\n") == [(503, "5.5.1")]
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<x@remote.example>\r\n"
                      b"RCPT TO:<u@example.net>\r\n") == [(250, "2.1.0"), (550, "5.7.1"),
                                                         (250, "2.1.5")]


# --- submission rules -------------------------------------------------------------------


def test_submission_needs_auth_before_mail(conn: FakeConnection) -> None:
    assert conn.codes(b"MAIL FROM:<alice@example.com>\r\n") == [(530, "5.7.0")]


def test_submission_any_recipient_domain_after_auth(conn: FakeConnection,
                                                    delivery: MemoryDelivery) -> None:
    conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert conn.codes(b"MAIL FROM:<ALICE@example.com>\r\nRCPT TO:<a@far.example>\r\n"
                      b"RCPT TO:<b@example.net>\r\nDATA\r\n" + MESSAGE) == [
        (250, "2.1.0"), (250, "2.1.5"), (250, "2.1.5"), (354, None), (250, "2.0.0")]
    [stored] = delivery.messages
    assert [str(r.mailbox) for r in stored.envelope.recipients] == [
        "a@far.example", "b@example.net"]


def test_submission_sender_not_owned(conn: FakeConnection) -> None:
    conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
    [reply] = conn.send(b"MAIL FROM:<bob@example.com>\r\n")
    assert (reply.code, reply.status) == (550, "5.7.1")


@pytest.mark.parametrize("header", [
    b"From: Mallory <mallory@example.com>\r\n",
    b"From: alice@example.com, mallory@example.com\r\n",
    b"Subject: no From: at all\r\n",
    b"From: alice@example.com\r\nFrom: mallory@example.com\r\n",
])
def test_submission_from_header_not_owned(conn: FakeConnection, delivery: MemoryDelivery,
                                          header: bytes) -> None:
    conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert conn.codes(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n"
                      + header + b"\r\nbody\r\n.\r\n") == [
        (250, "2.1.0"), (250, "2.1.5"), (354, None), (550, "5.7.1")]
    assert delivery.messages == [] and delivery.aborted == 1


def test_submission_from_header_folded_and_named(conn: FakeConnection,
                                                 delivery: MemoryDelivery) -> None:
    conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
    body = b'From: "Alice A."\r\n <Alice@Example.COM>\r\nSubject: s\r\n\r\nbody\r\n.\r\n'
    assert conn.codes(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n"
                      + body)[-1] == (250, "2.0.0")
    assert len(delivery.messages) == 1


def test_bare_user_name_may_send_as_itself_at_each_local_domain(
    delivery: MemoryDelivery,
) -> None:
    conn = greeted(submission(), portal_of(delivery), delivery)
    conn.send(b"AUTH PLAIN " + plain("bob", "bobpass") + b"\r\n")
    codes = conn.codes(b"MAIL FROM:<bob@example.com>\r\nRSET\r\nMAIL FROM:<bob@example.net>\r\n"
                       b"RSET\r\nMAIL FROM:<bob@far.example>\r\n")
    assert codes == [(250, "2.1.0"), (250, "2.0.0"), (250, "2.1.0"), (250, "2.0.0"),
                     (550, "5.7.1")]


def test_allowed_senders_default() -> None:
    login = authn.Login("bob", object(), lambda: None)
    assert authn.allowed_senders(login, ["a.example", "b.example"]) == {
        "bob@a.example", "bob@b.example"}
    login = authn.Login("Carol@X.example", object(), lambda: None)
    assert authn.allowed_senders(login, ["a.example"]) == {"carol@x.example"}


# --- twistd --auth ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_twistd_auth_checkers_log_in(tmp_path: Any, kind: str) -> None:
    """--auth memory:USER:PASS and --auth file:PATH give a portal that accepts the
    password (the memory: plugin stores str, the credentials are bytes: fixed in tap)."""
    if kind == "memory":
        spec = f"memory:{USER}:{PASSWORD}"
    else:
        users = tmp_path / "users.txt"
        users.write_text(f"{USER}:{PASSWORD}\n")
        spec = f"file:{users}"
    options = Options()
    options.parseOptions(["--auth", spec, "--delivery", "discard",
                          "--submission", "tcp:0:interface=127.0.0.1"])
    service = makeService(options)
    assert service.portal is not None
    ok: list[Any] = []
    authn.login(service.portal, USER, PASSWORD, "").addCallback(ok.append)
    authn.login(service.portal, USER, "wrong", "").addCallback(ok.append)
    assert [None if x is None else x.identity for x in ok] == [USER, None]
    [factory] = service.factories
    assert factory.config.mode is Mode.SUBMISSION and factory.config.auth
