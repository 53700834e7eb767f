"""STARTTLS, PROXY headers, XCLIENT and the per-client limits in the glue, without
sockets: FakeConnection + task.Clock (issue 4).  The real handshake, HAProxy and real
clients are in tests/interop/test_tls.py and test_proxy.py.

Every reply is checked for its code and its enhanced code (None before EHLO).
"""

from __future__ import annotations

import base64
import socket
import struct
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.task import Clock

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.config import Config, Limits, Mode
from maitred_tx.tap import DeliveryRealm
from maitred_tx.testing import FakeConnection

LOCAL = frozenset({"example.com"})
PROXY_PEER = ("10.0.0.5", 51000)  # a load balancer in the trusted network
TRUSTED = ["10.0.0.0/8"]
MESSAGE = b"From: a@b.org\r\n\r\nhi\r\n.\r\n"
TRANSACTION = b"MAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n" + MESSAGE
TRANSACTION_CODES = [(250, "2.1.0"), (250, "2.1.5"), (354, None), (250, "2.0.0")]
USER, PASSWORD = "alice@example.com", "pw-9f8e7d"


def mx(**kw: Any) -> Config:
    return Config(hostname="mx.test", local_domains=LOCAL, **kw)


def factory(config: Config, *, clock: Clock | None = None, trusted: list[str] | None = None,
            delivery: Any = None, portal: Portal | None = None, tls: Any = None
            ) -> SMTPFactory:
    delivery = MemoryDelivery() if delivery is None else delivery
    return SMTPFactory(clock or Clock(), config, delivery, portal=portal, tls=tls,
                       trusted_proxies=trusted or [])


def connect(f: SMTPFactory, peer: tuple[str, int] = ("192.0.2.7", 40000)) -> FakeConnection:
    return FakeConnection(factory=f, clock=f.reactor, peer=peer)  # type: ignore[arg-type]


def codes(conn: FakeConnection) -> list[tuple[int, str | None]]:
    return [(r.code, r.status) for r in conn.replies()]


def v1(source: str, port: int = 44321) -> bytes:
    return f"PROXY TCP4 {source} 192.0.2.25 {port} 25\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def v2(source: str, port: int = 44322, *, tls: bool = False, local: bool = False) -> bytes:
    block = socket.inet_aton(source) + socket.inet_aton("192.0.2.25") + struct.pack(
        "!HH", port, 25)
    if tls:  # PP2_TYPE_SSL with PP2_CLIENT_SSL, version and cipher sub-TLVs
        block += tlv(0x20, b"\x01" + struct.pack("!I", 0) + tlv(0x21, b"TLSv1.3")
                     + tlv(0x23, b"TLS_AES_128_GCM_SHA256") + tlv(0x22, b"client.example"))
    command = 0x20 if local else 0x21
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, 0x11]) + struct.pack("!H", len(block))
            + block)


# --- STARTTLS ---------------------------------------------------------------------------


class Handshake:
    """Stands in for transport.startTLS: records the context it was given."""

    def __init__(self, conn: FakeConnection) -> None:
        self.contexts: list[Any] = []
        self.written_before: bytes = b""
        conn.transport.startTLS = self  # type: ignore[attr-defined]
        self._conn = conn

    def __call__(self, context: Any) -> None:
        self.written_before = self._conn.transport.value()
        self.contexts.append(context)


def tls_conn(config: Config | None = None, **kw: Any) -> tuple[FakeConnection, Handshake]:
    tls_context = object()
    conn = connect(factory(config or mx(starttls=True), tls=tls_context, **kw))
    assert codes(conn) == [(220, None)]
    return conn, Handshake(conn)


def test_starttls_advertised_only_with_a_certificate() -> None:
    conn, _ = tls_conn()
    [ehlo] = conn.send(b"EHLO client.test\r\n")
    assert "STARTTLS" in ehlo.lines
    plain = connect(factory(mx()))
    plain.replies()
    [ehlo] = plain.send(b"EHLO client.test\r\n")
    assert "STARTTLS" not in ehlo.lines
    assert plain.codes(b"STARTTLS\r\n") == [(502, "5.5.1")]


@pytest.mark.parametrize("injected", [b"RSET\r\n", b"MAIL FROM:<x@y.org>\r\n",
                                      b"EHLO evil\r\nMAIL FROM:<x@y.org>\r\n"])
@pytest.mark.parametrize("already_buffered", [b"", b"NOOP\r\n"])
def test_starttls_discards_what_came_before_the_handshake(
    injected: bytes, already_buffered: bytes
) -> None:
    """CVE-2011-0411: bytes pipelined after STARTTLS in the same read are never read as
    commands.  (Only one read is meaningful here: with the fake transport, a later
    read stands for bytes that came through TLS; over a real socket, cleartext sent
    later breaks the handshake: tests/interop/test_tls.py.)"""
    conn, handshake = tls_conn()
    conn.send(b"EHLO client.test\r\n")
    replies = conn.codes(already_buffered + b"STARTTLS\r\n" + injected)
    assert replies == [(250, "2.0.0")] * bool(already_buffered) + [(220, "2.0.0")]
    assert len(handshake.contexts) == 1 and handshake.contexts[0] is conn.factory.tls
    # The 220 was written before the handshake started, in the clear.
    assert handshake.written_before.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    # Now "encrypted": EHLO is required again, STARTTLS no longer offered.
    assert conn.codes(b"MAIL FROM:<x@y.org>\r\n") == [(503, None)]
    [ehlo] = conn.send(b"EHLO client.test\r\n")
    assert (ehlo.code, ehlo.status) == (250, None) and "STARTTLS" not in ehlo.lines
    assert conn.codes(b"STARTTLS\r\n") == [(503, "5.5.1")]
    assert conn.codes(TRANSACTION) == TRANSACTION_CODES


def test_starttls_ends_a_transaction_and_forgets_the_helo() -> None:
    conn, _ = tls_conn()
    conn.send(b"EHLO before.tls\r\n")
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\nSTARTTLS\r\n") == [(250, "2.1.0"),
                                                                  (503, "5.5.1")]
    conn.send(b"RSET\r\n")
    assert conn.codes(b"STARTTLS\r\n") == [(220, "2.0.0")]
    conn.send(b"EHLO after.tls\r\n")
    assert conn.codes(TRANSACTION) == TRANSACTION_CODES
    [stored] = conn.factory.delivery.messages
    assert stored.envelope.session.helo == "after.tls" and stored.envelope.session.tls


def test_starttls_forgets_a_cleartext_login() -> None:
    """RFC 3207 4.2: everything learnt from the client before TLS is discarded, the AUTH
    identity included (possible only with insecure_auth)."""
    delivery = MemoryDelivery()
    users = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})
    portal = Portal(DeliveryRealm(delivery), [users])
    config = mx(mode=Mode.SUBMISSION, auth=True, insecure_auth=True, starttls=True)
    conn, _ = tls_conn(config, delivery=delivery, portal=portal)
    conn.send(b"EHLO client.test\r\n")
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    assert conn.codes(b"AUTH PLAIN " + token + b"\r\n") == [(235, "2.7.0")]
    assert conn.codes(b"STARTTLS\r\n") == [(220, "2.0.0")]
    assert conn.protocol.policy.context.authenticated is None
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(b"MAIL FROM:<alice@example.com>\r\n") == [(530, "5.7.0")]
    assert conn.codes(b"AUTH PLAIN " + token + b"\r\n") == [(235, "2.7.0")]
    assert conn.codes(b"MAIL FROM:<alice@example.com>\r\n") == [(250, "2.1.0")]


def test_require_tls() -> None:
    conn, _ = tls_conn(mx(starttls=True, require_tls=True))
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\n") == [(530, "5.7.0")]
    assert conn.codes(b"STARTTLS\r\n") == [(220, "2.0.0")]
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\n") == [(250, "2.1.0")]


# --- PROXY headers ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["whole", "lines", "bytes"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_trusted_proxy_header(mode: str, version: str) -> None:
    f = factory(mx(proxy_protocol=True), trusted=TRUSTED)
    conn = connect(f, PROXY_PEER)
    header = v1("203.0.113.50") if version == "v1" else v2("203.0.113.50")
    replies = [(r.code, r.status) for r in conn.replies() + conn.send(
        header + b"EHLO client.test\r\n" + TRANSACTION, mode)]
    assert replies == [(220, None), (250, None), *TRANSACTION_CODES]
    [stored] = f.delivery.messages
    session = stored.envelope.session
    assert (session.peer_host, session.proxied_by) == ("203.0.113.50", "10.0.0.5")
    assert session.peer_port == (44321 if version == "v1" else 44322)
    assert not session.tls


def test_trusted_proxy_v2_local_keeps_the_connection_address() -> None:
    f = factory(mx(proxy_protocol=True), trusted=TRUSTED)
    conn = connect(f, PROXY_PEER)
    conn.send(v2("203.0.113.50", local=True) + b"EHLO client.test\r\n" + TRANSACTION)
    [stored] = f.delivery.messages
    assert stored.envelope.session.peer_host == "10.0.0.5"


def test_trusted_proxy_v2_ssl_tlv_is_tls() -> None:
    f = factory(mx(proxy_protocol=True), trusted=TRUSTED)
    conn = connect(f, PROXY_PEER)
    [_, ehlo] = conn.replies() + conn.send(v2("203.0.113.50", tls=True)
                                           + b"EHLO client.test\r\n")
    assert "STARTTLS" not in ehlo.lines
    conn.send(TRANSACTION)
    [stored] = f.delivery.messages
    session = stored.envelope.session
    assert session.tls and session.tls_version == "TLSv1.3"
    assert session.tls_cipher == "TLS_AES_128_GCM_SHA256"
    assert session.tls_client_certificate == "client.example"


def test_trusted_peer_without_a_header_where_one_is_expected_is_closed() -> None:
    # The PROXY spec forbids guessing: a listener that expects headers reads no commands
    # from a trusted proxy that did not send one.
    f = factory(mx(proxy_protocol=True), trusted=TRUSTED)
    conn = connect(f, PROXY_PEER)
    conn.replies()
    assert conn.send(b"EHLO client.test\r\n" + TRANSACTION) == []
    assert not conn.connected and f.delivery.messages == []


def test_proxy_header_is_not_read_where_none_is_expected() -> None:
    # Without proxy_protocol a trusted peer's PROXY line is an unknown command.
    f = factory(mx(), trusted=TRUSTED)
    conn = connect(f, PROXY_PEER)
    conn.replies()
    assert conn.codes(v1("203.0.113.9")) == [(500, None)]


def test_trusted_peer_without_a_header_is_served_as_itself() -> None:
    f = factory(mx(), trusted=TRUSTED)
    conn = connect(f, PROXY_PEER)
    assert [(r.code, r.status) for r in conn.replies() + conn.send(
        b"EHLO client.test\r\n" + TRANSACTION)] == [(220, None), (250, None),
                                                   *TRANSACTION_CODES]
    [stored] = f.delivery.messages
    assert stored.envelope.session.peer_host == "10.0.0.5"


@pytest.mark.parametrize("header", [b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\n",
                                    b"PROXY TCP4 1.1.1.1 1.1.1.1 01 2\r\n",
                                    b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x00"])
def test_bad_header_from_a_trusted_proxy_aborts(header: bytes) -> None:
    conn = connect(factory(mx(proxy_protocol=True), trusted=TRUSTED), PROXY_PEER)
    conn.replies()
    assert conn.send(header + b"EHLO client.test\r\n") == []
    assert conn.transport.disconnecting or not conn.connected


@pytest.mark.parametrize("line", [v1("203.0.113.50"), b"PROXY UNKNOWN\r\n"])
def test_proxy_line_from_an_untrusted_peer_is_a_bad_command(line: bytes) -> None:
    f = factory(mx(), trusted=TRUSTED)
    conn = connect(f, ("192.0.2.99", 40000))
    conn.replies()
    assert conn.codes(line) == [(500, None)]
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(line) == [(500, "5.5.2")]
    assert conn.codes(TRANSACTION) == TRANSACTION_CODES
    [stored] = f.delivery.messages
    assert (stored.envelope.session.peer_host, stored.envelope.session.proxied_by) == (
        "192.0.2.99", None)


def test_proxy_v2_from_an_untrusted_peer_is_never_honoured() -> None:
    f = factory(mx(), trusted=TRUSTED)
    conn = connect(f, ("192.0.2.99", 40000))
    conn.replies()
    errors = conn.codes(v2("203.0.113.50", tls=True) + b"\r\n")
    assert errors and all(code == 500 for code, _ in errors)
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(TRANSACTION) == TRANSACTION_CODES
    [stored] = f.delivery.messages
    assert stored.envelope.session.peer_host == "192.0.2.99"
    assert not stored.envelope.session.tls


# --- XCLIENT ----------------------------------------------------------------------------


def test_xclient_from_a_trusted_peer() -> None:
    f = factory(mx(), trusted=TRUSTED)
    conn = connect(f, PROXY_PEER)
    conn.replies()
    [ehlo] = conn.send(b"EHLO proxy.test\r\n")
    assert any(line.startswith("XCLIENT ") for line in ehlo.lines)
    assert conn.codes(b"XCLIENT ADDR=198.51.100.8 PORT=1234 HELO=real.example\r\n") == [
        (220, None)]
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\n") == [(503, None)]  # EHLO again first
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(TRANSACTION) == TRANSACTION_CODES
    session = f.delivery.messages[0].envelope.session
    assert (session.peer_host, session.peer_port, session.proxied_by) == (
        "198.51.100.8", 1234, "10.0.0.5")


def test_xclient_login_counts_as_authenticated_in_submission() -> None:
    f = factory(mx(mode=Mode.SUBMISSION), trusted=TRUSTED)
    conn = connect(f, PROXY_PEER)
    conn.replies()
    conn.send(b"EHLO proxy.test\r\n")
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\n") == [(530, "5.7.0")]
    assert conn.codes(b"XCLIENT ADDR=198.51.100.8 LOGIN=carol\r\n") == [(220, None)]
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<x@far.example>\r\n") == [
        (250, "2.1.0"), (250, "2.1.5")]
    assert conn.protocol.policy.context.authenticated == "carol"


def test_xclient_from_an_untrusted_peer() -> None:
    conn = connect(factory(mx(), trusted=TRUSTED), ("192.0.2.99", 40000))
    conn.replies()
    [ehlo] = conn.send(b"EHLO client.test\r\n")
    assert not any(line.startswith("XCLIENT") for line in ehlo.lines)
    assert conn.codes(b"XCLIENT ADDR=198.51.100.8\r\n") == [(550, "5.7.0")]
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\n") == [(250, "2.1.0")]  # session unchanged
    assert conn.protocol.policy.context.peer_host == "192.0.2.99"


# --- per-client limits --------------------------------------------------------------------


def test_concurrency_limit_per_client_address() -> None:
    f = factory(mx(limits=Limits(max_client_connections=2)))
    first, second = connect(f), connect(f)
    assert codes(first) == codes(second) == [(220, None)]
    third = connect(f)
    [refused] = third.replies()
    assert (refused.code, refused.status) == (421, None)  # before EHLO: RFC 2034
    assert "Too many connections from your address" in refused.text
    assert not third.connected
    other = connect(f, ("192.0.2.8", 1))
    assert codes(other) == [(220, None)]
    first.transport.loseConnection()
    assert codes(connect(f)) == [(220, None)]  # one closed: room for one more


def test_connection_rate_per_client_address() -> None:
    clock = Clock()
    f = factory(mx(limits=Limits(max_client_connection_rate=2)), clock=clock)
    for _ in range(2):
        conn = connect(f)
        assert codes(conn) == [(220, None)]
        conn.transport.loseConnection()
    [refused] = connect(f).replies()
    assert (refused.code, refused.status) == (421, None)
    assert "slow down" in refused.text
    clock.advance(60)
    assert codes(connect(f)) == [(220, None)]


def test_message_rate_per_client_address() -> None:
    clock = Clock()
    f = factory(mx(limits=Limits(max_client_message_rate=2)), clock=clock)
    conn = connect(f)
    conn.replies()
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(TRANSACTION + TRANSACTION) == TRANSACTION_CODES * 2
    [refused] = conn.send(b"MAIL FROM:<a@b.org>\r\n")
    assert (refused.code, refused.status) == (421, "4.7.0")
    assert "Too many messages" in refused.text and not conn.connected
    clock.advance(60)
    again = connect(f)
    again.replies()
    again.send(b"EHLO client.test\r\n")
    assert again.codes(TRANSACTION) == TRANSACTION_CODES


@pytest.mark.parametrize("via", ["proxy", "xclient"])
def test_limits_are_keyed_by_the_real_client(via: str) -> None:
    config = mx(limits=Limits(max_client_connections=1), proxy_protocol=via == "proxy")
    f = factory(config, trusted=TRUSTED)

    def through_proxy(client: str) -> tuple[FakeConnection, tuple[int, str | None]]:
        conn = connect(f, PROXY_PEER)
        conn.replies()
        if via == "proxy":
            replies = conn.send(v1(client) + b"EHLO client.test\r\n")
        else:
            replies = conn.send(b"EHLO p\r\nXCLIENT ADDR=" + client.encode() + b"\r\n")
        return conn, (replies[-1].code, replies[-1].status)

    _first, last = through_proxy("203.0.113.1")
    assert last == ((250, None) if via == "proxy" else (220, None))
    other, last = through_proxy("203.0.113.2")  # same proxy, another client: admitted
    assert last == ((250, None) if via == "proxy" else (220, None)) and other.connected
    same, last = through_proxy("203.0.113.1")
    # After XCLIENT the EHLO was done: with enhanced codes; with PROXY: before EHLO.
    assert last == ((421, None) if via == "proxy" else (421, "4.7.0"))
    assert not same.connected
    assert f.limiter._open.get("10.0.0.5") is None  # the proxy itself is not counted
