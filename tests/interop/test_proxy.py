"""Behind a proxy, over real sockets (issue 4): HAProxy (Debian's) with send-proxy,
send-proxy-v2 and, terminating TLS itself, send-proxy-v2-ssl; hand-made PROXY v1/v2
headers; XCLIENT; and the per-client limits keyed by the real client address.

The PROXY header is honoured only from trusted_proxies; from anyone else it is just a
bad command (500) and the connection's own address stays the client's.
"""

from __future__ import annotations

import smtplib
import socket
import struct

import pytest
import pytest_twisted
from maitred_interop import LOCALHOST, Client
from security_support import (
    PASSWORD,
    USER,
    client_context,
    haproxy,
    mx_config,
    portal_for,
    submission_config,
)
from twisted.internet.threads import deferToThread

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.smtp.config import Limits

LISTENER = "tcp:{port}:interface=127.0.0.1"
TRUSTED = ["127.0.0.0/8"]
MESSAGE = b"From: alice@example.com\r\nSubject: proxied\r\n\r\nHi.\r\n"


def v1(source: str, port: int = 40001) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 25\r\n".encode()


def v2(source: str, port: int = 40002, tlvs: bytes = b"") -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    block = addresses + struct.pack("!HH", port, 25) + tlvs
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(block)) + block


def ssl_tlv(version: bytes = b"TLSv1.3") -> bytes:
    sub = bytes([0x21]) + struct.pack("!H", len(version)) + version
    value = bytes([0x01]) + struct.pack("!I", 0) + sub  # PP2_CLIENT_SSL, verify 0
    return bytes([0x20]) + struct.pack("!H", len(value)) + value


def send_message(port: int, header: bytes = b"") -> list[tuple[int, str | None]]:
    """Optional raw *header*, then one whole transaction; every reply."""
    with Client(port) as c:
        c.send(header)
        c.send(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<user@example.com>\r\n"
               b"DATA\r\n" + MESSAGE + b".\r\nQUIT\r\n")
        return [(r.code, r.status) for r in c.rest()]


HAPPY = [(220, None), (250, None), (250, "2.1.0"), (250, "2.1.5"), (354, None),
         (250, "2.0.0"), (221, "2.0.0")]


# --- hand-made headers from a trusted and an untrusted peer --------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_trusted_proxy_header_gives_the_real_client(service, version):
    server = service([(LISTENER, mx_config(proxy_protocol=True))], trusted_proxies=TRUSTED)
    header = v1("203.0.113.9") if version == "v1" else v2("203.0.113.9")
    assert await deferToThread(send_message, server.port, header) == HAPPY
    [stored] = server.messages
    session = stored.envelope.session
    assert (session.peer_host, session.proxied_by) == ("203.0.113.9", "127.0.0.1")
    assert session.peer_port == (40001 if version == "v1" else 40002)
    assert b"[203.0.113.9]" in stored.body or session.tls is False


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_untrusted_proxy_header_is_a_bad_command(service, version):
    server = service([(LISTENER, mx_config())], trusted_proxies=["10.0.0.0/8"])
    # The v2 block does not end with a line end: one ends it, as a client would send.
    header = v1("203.0.113.9") if version == "v1" else v2("203.0.113.9", tlvs=ssl_tlv()) + b"\r\n"
    replies = await deferToThread(send_message, server.port, header)
    assert replies[0] == (220, None)
    errors = replies[1 : -len(HAPPY) + 1]
    assert errors and all(code == 500 for code, _ in errors), replies
    assert replies[-len(HAPPY) + 1 :] == HAPPY[1:]
    [stored] = server.messages
    session = stored.envelope.session
    # Never honoured: the connection's address, no proxy, and no TLS from the TLV.
    assert (session.peer_host, session.proxied_by, session.tls) == ("127.0.0.1", None, False)


@pytest_twisted.ensureDeferred
async def test_untrusted_proxy_line_after_ehlo_gets_500_5_5_2(service):
    server = service([(LISTENER, mx_config())])

    def session() -> tuple[int, str | None]:
        with Client(server.port) as c:
            c.greet()
            reply = c.command(v1("203.0.113.9").rstrip(b"\r\n"))
            return reply.code, reply.status

    assert await deferToThread(session) == (500, "5.5.2")


@pytest_twisted.ensureDeferred
async def test_proxy_tls_tlv_makes_auth_available(service):
    """PROXY v2 with PP2_TYPE_SSL (PP2_CLIENT_SSL): the proxy terminated TLS, so AUTH is
    offered on a cleartext hop; without the TLV it is refused (538 5.7.11)."""
    delivery = MemoryDelivery()
    server = service([(LISTENER, submission_config(proxy_protocol=True))], delivery=delivery,
                     portal=portal_for(delivery), trusted_proxies=TRUSTED)
    import base64

    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())

    def session(header: bytes) -> tuple[bool, tuple[int, str | None]]:
        with Client(server.port) as c:
            c.send(header)
            ehlo = c.greet()
            offered = any(line.startswith("AUTH ") for line in ehlo.lines)
            reply = c.command(b"AUTH PLAIN " + token)
            return offered, (reply.code, reply.status)

    with_tls = await deferToThread(session, v2("203.0.113.9", tlvs=ssl_tlv()))
    without = await deferToThread(session, v2("203.0.113.9"))
    assert with_tls == (True, (235, "2.7.0"))
    assert without == (False, (538, "5.7.11"))


# --- XCLIENT ---------------------------------------------------------------------------------


def xclient_session(port: int) -> tuple[bool, list[tuple[int, str | None]]]:
    with Client(port) as c:
        ehlo = c.greet()
        offered = any(line.startswith("XCLIENT") for line in ehlo.lines)
        c.send(b"XCLIENT ADDR=203.0.113.7 PORT=4242 HELO=real.example\r\n")
        first = c.reply()
        if first.code != 220:
            return offered, [(first.code, first.status)]
        c.send(b"MAIL FROM:<a@b.org>\r\nEHLO client.test\r\nMAIL FROM:<a@b.org>\r\n"
               b"RCPT TO:<user@example.com>\r\nDATA\r\n" + MESSAGE + b".\r\nQUIT\r\n")
        return offered, [(first.code, first.status)] + [(r.code, r.status) for r in c.rest()]


@pytest_twisted.ensureDeferred
async def test_xclient_from_a_trusted_network(service):
    server = service([(LISTENER, mx_config())], trusted_proxies=TRUSTED)
    offered, replies = await deferToThread(xclient_session, server.port)
    assert offered
    # A new greeting, and EHLO is required again (503 before it).
    assert replies == [(220, None), (503, None), (250, None), (250, "2.1.0"), (250, "2.1.5"),
                       (354, None), (250, "2.0.0"), (221, "2.0.0")]
    [stored] = server.messages
    session = stored.envelope.session
    assert (session.peer_host, session.peer_port, session.proxied_by) == (
        "203.0.113.7", 4242, "127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_xclient_from_an_untrusted_network(service):
    server = service([(LISTENER, mx_config())], trusted_proxies=["10.0.0.0/8"])
    offered, replies = await deferToThread(xclient_session, server.port)
    assert not offered
    assert replies == [(550, "5.7.0")]


# --- per-client limits keyed by the real address ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrency_limit_is_per_real_client(service):
    config = mx_config(proxy_protocol=True, limits=Limits(max_client_connections=1))
    server = service([(LISTENER, config)], trusted_proxies=TRUSTED)

    def sessions() -> list[tuple[int, str | None]]:
        with Client(server.port) as first:
            first.send(v2("203.0.113.1"))
            assert first.reply().code == 220
            with Client(server.port) as same, Client(server.port) as other:
                same.send(v1("203.0.113.1"))
                other.send(v1("203.0.113.2"))
                refused = same.rest()
                greeting = other.reply()
                assert "Too many connections from your address" in refused[-1].text
                return [(r.code, r.status) for r in (*refused, greeting)]

    # Refused before any EHLO: no enhanced code (RFC 2034); 421 and closed.
    assert await deferToThread(sessions) == [(220, None), (421, None), (220, None)]


@pytest_twisted.ensureDeferred
async def test_connection_and_message_rates(service):
    limits = Limits(max_client_connection_rate=2, max_client_message_rate=1)
    config = mx_config(proxy_protocol=True, limits=limits)
    server = service([(LISTENER, config)], trusted_proxies=TRUSTED)

    def sessions() -> list[list[tuple[int, str | None]]]:
        out = []
        for _ in range(3):  # the third new session within a minute is over the rate
            with Client(server.port) as c:
                c.send(v1("198.51.100.4") + b"QUIT\r\n")
                replies = c.rest()
                out.append([(r.code, r.status) for r in replies])
        assert "Too many connections, slow down" in replies[-1].text
        with Client(server.port) as c:  # another client is not affected
            c.send(v1("198.51.100.5") + b"EHLO c\r\nMAIL FROM:<a@b.org>\r\nRSET\r\n"
                   b"MAIL FROM:<a@b.org>\r\n")
            out.append([(r.code, r.status) for r in c.rest()])
        return out

    first, second, third, messages = await deferToThread(sessions)
    # No EHLO in these sessions: no enhanced codes (RFC 2034).
    assert first == second == [(220, None), (221, None)]
    assert third == [(220, None), (421, None)]
    assert messages == [(220, None), (250, None), (250, "2.1.0"), (250, "2.0.0"),
                        (421, "4.7.0")]


# --- HAProxy ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
async def test_haproxy_reports_the_client(service, tmp_path, send):
    server = service([(LISTENER, mx_config(proxy_protocol=True))], trusted_proxies=TRUSTED)

    def through() -> tuple[int, list[tuple[int, str | None]]]:
        with haproxy(tmp_path, server.port, send=send) as port, Client(port) as c:
            client_port = c.sock.getsockname()[1]
            c.send(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<user@example.com>\r\n"
                   b"DATA\r\n" + MESSAGE + b".\r\nQUIT\r\n")
            return client_port, [(r.code, r.status) for r in c.rest()]

    client_port, replies = await deferToThread(through)
    assert replies == HAPPY
    [stored] = server.messages
    session = stored.envelope.session
    # The real client's own port, not HAProxy's outgoing one.
    assert (session.peer_host, session.peer_port) == ("127.0.0.1", client_port)
    assert session.proxied_by == "127.0.0.1" and session.tls is False


@pytest_twisted.ensureDeferred
async def test_haproxy_terminating_tls_with_send_proxy_v2_ssl(service, tmp_path, certs):
    """HAProxy holds the certificate and reports TLS in the PROXY v2 SSL TLV: the
    submission listener (no certificate of its own) offers AUTH and sees the version."""
    delivery = MemoryDelivery()
    server = service([(LISTENER, submission_config(proxy_protocol=True))], delivery=delivery,
                     portal=portal_for(delivery), trusted_proxies=TRUSTED)

    def through() -> tuple[object, ...]:
        send = "send-proxy-v2-ssl-cn proxy-v2-options ssl-cipher"
        context = client_context(ca=certs.cert)
        with haproxy(tmp_path, server.port, send=send, terminate_tls=certs.pem) as port, \
                smtplib.SMTP_SSL(LOCALHOST, port, local_hostname="client.test", timeout=10,
                                 context=context) as s:
            s.ehlo()
            mechanisms = s.esmtp_features.get("auth", "")
            code, msg = s.login(USER, PASSWORD)
            refused = s.sendmail(USER, ["bob@example.org"], MESSAGE)
            return mechanisms, (code, msg.split()[0]), refused, s.sock.version()

    mechanisms, login, refused, version = await deferToThread(through)
    assert mechanisms.split() == ["PLAIN", "LOGIN"]
    assert login == (235, b"2.7.0") and refused == {}
    [stored] = server.messages
    session = stored.envelope.session
    assert session.tls and session.tls_version == version and session.tls_cipher
    assert session.authenticated == USER and session.proxied_by == "127.0.0.1"
