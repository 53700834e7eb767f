"""TLS over real sockets (issue 4): STARTTLS (RFC 3207) with smtplib and a raw client,
the CVE-2011-0411 command injection, implicit TLS through ``ssl:`` endpoint strings
(RFC 8314) with smtplib.SMTP_SSL, require_tls, and what the delivery learns about TLS.

The certificate is made by the test (security_support.make_certificate) and clients
trust exactly it, so a handshake proves the server presents the configured certificate.
"""

from __future__ import annotations

import smtplib

import pytest_twisted
from maitred_interop import LOCALHOST, Client
from security_support import client_context, make_certificate, mx_config
from twisted.internet.threads import deferToThread

from maitred_tx.server.tls import server_context
from maitred_tx.service import implicit_tls_as_tcp

MESSAGE = b"From: a@b.org\r\nTo: user@example.com\r\nSubject: tls\r\n\r\nOver TLS.\r\n"


def smtp(port: int) -> smtplib.SMTP:
    return smtplib.SMTP(LOCALHOST, port, local_hostname="client.test", timeout=10)


def status(msg: bytes) -> str:
    """The enhanced status code at the start of smtplib's reply text."""
    return msg.split(b" ", 1)[0].decode()


@pytest_twisted.ensureDeferred
async def test_starttls_with_smtplib_delivers_with_tls_facts(service, certs):
    server = service([("tcp:{port}:interface=127.0.0.1", mx_config())],
                     tls=server_context(certs.cert, certs.key))

    def send() -> tuple[object, ...]:
        with smtp(server.port) as s:
            s.ehlo()
            before = s.has_extn("starttls")
            code, msg = s.starttls(context=client_context(ca=certs.cert))
            s.ehlo()
            after = s.has_extn("starttls")
            version = s.sock.version()
            refused = s.sendmail("a@b.org", ["user@example.com"], MESSAGE)
            return before, (code, status(msg)), after, version, refused

    before, reply, after, version, refused = await deferToThread(send)
    assert before and not after  # RFC 3207 4.2: not advertised once TLS is active
    assert reply == (220, "2.0.0")
    assert refused == {}
    [stored] = server.messages
    session = stored.envelope.session
    assert session.tls is True
    assert session.tls_version == version  # e.g. "TLSv1.3", as the client negotiated
    assert session.tls_cipher
    assert session.tls_client_certificate is None  # the client presented none
    assert stored.body.endswith(MESSAGE)


@pytest_twisted.ensureDeferred
async def test_starttls_client_certificate_reaches_the_delivery(service, certs, tmp_path):
    client_cert = make_certificate(tmp_path, "client", cn="client.example")
    server = service([("tcp:{port}:interface=127.0.0.1", mx_config())],
                     tls=server_context(certs.cert, certs.key))

    def send() -> None:
        with smtp(server.port) as s:
            s.starttls(context=client_context(ca=certs.cert, client=client_cert))
            s.sendmail("a@b.org", ["user@example.com"], MESSAGE)

    await deferToThread(send)
    [stored] = server.messages
    assert stored.envelope.session.tls_client_certificate == "CN=client.example"


@pytest_twisted.ensureDeferred
async def test_starttls_not_offered_without_a_certificate(service):
    server = service([("tcp:{port}:interface=127.0.0.1", mx_config())])

    def session() -> tuple[object, ...]:
        with Client(server.port) as c:
            ehlo = c.greet()
            reply = c.command("STARTTLS")
            return ehlo, reply

    ehlo, reply = await deferToThread(session)
    assert "STARTTLS" not in ehlo.lines
    assert (reply.code, reply.status) == (502, "5.5.1")


@pytest_twisted.ensureDeferred
async def test_starttls_twice_and_before_ehlo(service, certs):
    server = service([("tcp:{port}:interface=127.0.0.1", mx_config())],
                     tls=server_context(certs.cert, certs.key))

    def session() -> list[tuple[int, str | None]]:
        with Client(server.port) as c:
            assert c.reply().code == 220
            early = c.command("STARTTLS")  # before EHLO
            assert c.command("EHLO client.test").code == 250
            assert c.command("STARTTLS").code == 220
            c.sock = client_context().wrap_socket(c.sock, server_hostname="localhost")
            ehlo = c.command("EHLO client.test")
            assert ehlo.code == 250 and "STARTTLS" not in ehlo.lines
            again = c.command("STARTTLS")
            return [(early.code, early.status), (again.code, again.status)]

    # Before EHLO there are no enhanced codes yet (RFC 2034); after it, 5.5.1.
    assert await deferToThread(session) == [(503, None), (503, "5.5.1")]


def injected_session(port: int, injected: bytes) -> tuple[bytes, bytes, list[tuple]]:
    """EHLO, then STARTTLS and *injected* in ONE write (CVE-2011-0411); finish the
    handshake on the same socket; return (bytes after the 220 in the clear, bytes that
    arrived over TLS unasked, replies to MAIL and to EHLO + MAIL after it)."""
    with Client(port) as c:
        c.greet()
        c.send(b"STARTTLS\r\n" + injected)
        ready = c.reply()
        assert (ready.code, ready.status) == (220, "2.0.0"), ready
        cleartext_extra = c._buf  # nothing may follow the 220 in the clear
        c._buf = b""
        tls = client_context().wrap_socket(c.sock, server_hostname="localhost")
        c.sock = tls
        tls.settimeout(0.5)
        try:
            unasked = tls.recv(4096)  # a reply to the injected command would be here
        except TimeoutError:
            unasked = b""
        tls.settimeout(10)
        mail = c.command("MAIL FROM:<x@example.org>")
        ehlo = c.command("EHLO client.test")
        again = c.command("MAIL FROM:<x@example.org>")
        codes = [(r.code, r.status) for r in (mail, ehlo, again)]
        return cleartext_extra, unasked, codes


@pytest_twisted.ensureDeferred
async def test_cve_2011_0411_rset_injection_is_discarded(service, certs):
    server = service([("tcp:{port}:interface=127.0.0.1", mx_config())],
                     tls=server_context(certs.cert, certs.key))
    extra, unasked, codes = await deferToThread(injected_session, server.port, b"RSET\r\n")
    assert extra == b"" and unasked == b""
    # After the handshake the session starts over: MAIL needs EHLO again (and, before
    # the new EHLO, enhanced codes are not negotiated: RFC 2034).
    assert codes == [(503, None), (250, None), (250, "2.1.0")]


@pytest_twisted.ensureDeferred
async def test_cve_2011_0411_mail_injection_is_discarded(service, certs):
    server = service([("tcp:{port}:interface=127.0.0.1", mx_config())],
                     tls=server_context(certs.cert, certs.key))
    injected = b"MAIL FROM:<x@y.org>\r\nRCPT TO:<user@example.com>\r\n"
    extra, unasked, codes = await deferToThread(injected_session, server.port, injected)
    assert extra == b"" and unasked == b""
    assert codes == [(503, None), (250, None), (250, "2.1.0")]
    assert server.messages == []


@pytest_twisted.ensureDeferred
async def test_implicit_tls_with_smtp_ssl(service, certs):
    endpoint = (f"ssl:{{port}}:interface=127.0.0.1:privateKey={certs.key}"
                f":certKey={certs.cert}")
    server = service([(endpoint, mx_config())], tls=server_context(certs.cert, certs.key))

    def send() -> tuple[object, ...]:
        with smtplib.SMTP_SSL(LOCALHOST, server.port, local_hostname="client.test",
                              timeout=10, context=client_context(ca=certs.cert)) as s:
            code, _ = s.ehlo()
            offered = s.has_extn("starttls")
            version = s.sock.version()
            again = s.docmd("STARTTLS")
            refused = s.sendmail("a@b.org", ["user@example.com"], MESSAGE)
            return code, offered, version, (again[0], status(again[1])), refused

    code, offered, version, again, refused = await deferToThread(send)
    assert code == 250 and not offered  # RFC 8314: already TLS, no STARTTLS
    assert again[0] in (502, 503) and again[1] == "5.5.1"
    assert refused == {}
    [stored] = server.messages
    session = stored.envelope.session
    assert session.tls and session.tls_version == version and session.tls_cipher


@pytest_twisted.ensureDeferred
async def test_implicit_tls_uses_our_context_and_sees_the_client_certificate(
        service, certs, tmp_path):
    """With --tls-cert, an ssl: listener needs no privateKey=/certKey= of its own and
    asks for a client certificate, as STARTTLS does."""
    client_cert = make_certificate(tmp_path, "client", cn="client.example")
    server = service([("ssl:{port}:interface=127.0.0.1", mx_config())],
                     tls=server_context(certs.cert, certs.key))

    def send() -> None:
        context = client_context(ca=certs.cert, client=client_cert)
        with smtplib.SMTP_SSL(LOCALHOST, server.port, local_hostname="client.test",
                              timeout=10, context=context) as s:
            assert s.ehlo()[0] == 250 and not s.has_extn("starttls")
            s.sendmail("a@b.org", ["user@example.com"], MESSAGE)

    await deferToThread(send)
    [stored] = server.messages
    session = stored.envelope.session
    # Twisted's own ssl: context never asks for one: seeing it proves ours served.
    assert session.tls and session.tls_client_certificate == "CN=client.example"


def test_ssl_descriptions_become_tcp_for_our_context():
    assert implicit_tls_as_tcp(
        "ssl:465:interface=127.0.0.1:privateKey=/k\\:x.pem:certKey=/c.pem"
    ) == "tcp:465:interface=127.0.0.1"
    assert implicit_tls_as_tcp("ssl:port=465:interface=\\:\\:1:backlog=9") == (
        "tcp:port=465:interface=\\:\\:1:backlog=9")
    # Positional arguments are the ssl: endpoint's: privateKey, certKey, sslmethod,
    # then interface and backlog, which tcp: takes by name.
    assert implicit_tls_as_tcp("ssl:465:server.pem") == "tcp:465"
    assert implicit_tls_as_tcp("ssl:465:k.pem:c.pem:SSLv23_METHOD:127.0.0.1:9") == (
        "tcp:465:interface=127.0.0.1:backlog=9")
    # One too many stays positional, for Twisted's tcp: parser to refuse.
    assert implicit_tls_as_tcp("ssl:465:k.pem:c.pem:m:127.0.0.1:9:x") == (
        "tcp:465:interface=127.0.0.1:backlog=9:x")
    assert implicit_tls_as_tcp("tcp:25") is None
    assert implicit_tls_as_tcp("unix:/run/x.sock") is None


@pytest_twisted.ensureDeferred
async def test_require_tls_refuses_mail_until_starttls(service, certs):
    server = service([("tcp:{port}:interface=127.0.0.1", mx_config(require_tls=True))],
                     tls=server_context(certs.cert, certs.key))

    def session() -> list[tuple[int, str | None]]:
        with Client(server.port) as c:
            c.greet()
            refused = c.command("MAIL FROM:<a@b.org>")
            assert c.command("STARTTLS").code == 220
            c.sock = client_context().wrap_socket(c.sock, server_hostname="localhost")
            c.command("EHLO client.test")
            accepted = c.command("MAIL FROM:<a@b.org>")
            return [(refused.code, refused.status), (accepted.code, accepted.status)]

    assert await deferToThread(session) == [(530, "5.7.0"), (250, "2.1.0")]
