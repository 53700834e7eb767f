"""AUTH over real sockets (issue 4, RFC 4954 / RFC 6409): swaks with --tls / --tlsc and
--auth PLAIN / LOGIN, smtplib, the cleartext refusal (538 5.7.11), the submission rules,
and one ``twistd -n maitred`` process with MX, submission and LMTP listeners."""

from __future__ import annotations

import base64
import smtplib
import time
from pathlib import Path

import pytest
import pytest_twisted
from maitred_interop import LOCALHOST, Client, free_port, message_files
from security_support import (
    PASSWORD,
    USER,
    client_context,
    mx_config,
    portal_for,
    submission_config,
    swaks,
)
from twisted.internet.threads import deferToThread

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.server.tls import server_context

STARTTLS_LISTENER = "tcp:{port}:interface=127.0.0.1"


def plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def start_submission(service, certs, endpoint=STARTTLS_LISTENER, **kw):
    """A submission listener (STARTTLS on tcp:, implicit TLS on ssl:) whose portal
    knows USER / PASSWORD and whose realm serves the same MemoryDelivery."""
    delivery = MemoryDelivery()
    return service([(endpoint, submission_config(**kw))], delivery=delivery,
                   tls=server_context(certs.cert, certs.key), portal=portal_for(delivery))


def swaks_submit(port: int, *args: str, sender: str = USER) -> tuple[int, str]:
    result = swaks("--port", str(port), "--from", sender, "--to", "bob@example.org",
                   "--auth-user", USER, "--auth-password", PASSWORD, *args)
    return result.returncode, result.stdout + result.stderr


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_starttls_auth_submits(service, certs, mechanism):
    server = start_submission(service, certs)
    code, out = await deferToThread(swaks_submit, server.port, "--tls", "--auth", mechanism)
    assert code == 0, out
    assert "<~  235 2.7.0" in out  # swaks prints what it received after "<~" under TLS
    [stored] = server.messages  # any recipient domain, handed to the delivery
    envelope = stored.envelope
    assert [str(r.mailbox) for r in envelope.recipients] == ["bob@example.org"]
    assert envelope.session.authenticated == USER and envelope.session.tls


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_implicit_tls_auth_submits(service, certs, mechanism):
    endpoint = (f"ssl:{{port}}:interface=127.0.0.1:privateKey={certs.key}"
                f":certKey={certs.cert}")
    server = start_submission(service, certs, endpoint)
    code, out = await deferToThread(swaks_submit, server.port, "--tlsc", "--auth", mechanism)
    assert code == 0, out
    [stored] = server.messages
    assert stored.envelope.session.tls and stored.envelope.session.authenticated == USER


@pytest_twisted.ensureDeferred
async def test_swaks_wrong_password_fails(service, certs):
    server = start_submission(service, certs)

    def run() -> tuple[int, str]:
        result = swaks("--port", str(server.port), "--from", USER, "--to", "bob@example.org",
                       "--tls", "--auth", "PLAIN", "--auth-user", USER,
                       "--auth-password", "wrong")
        return result.returncode, result.stdout + result.stderr

    started = time.monotonic()
    code, out = await deferToThread(run)
    assert code != 0, out
    assert "<~* 535 5.7.8" in out
    assert time.monotonic() - started >= 0.9  # the first failure is answered after 1 s
    assert server.messages == []


@pytest_twisted.ensureDeferred
async def test_swaks_sender_not_owned(service, certs):
    server = start_submission(service, certs)
    code, out = await deferToThread(
        swaks_submit, server.port, "--tls", "--auth", "PLAIN", sender="mallory@example.com"
    )
    assert code != 0, out
    assert "<~* 550 5.7.1" in out
    assert server.messages == []


@pytest_twisted.ensureDeferred
async def test_swaks_auth_refused_in_the_clear(service, certs):
    """No --tls: AUTH is not advertised, so swaks cannot authenticate; sent anyway it
    gets 538 5.7.11 (RFC 4954 6), and MAIL without it 530 5.7.0."""
    server = start_submission(service, certs)
    code, out = await deferToThread(swaks_submit, server.port, "--auth", "PLAIN")
    assert code != 0, out

    def raw() -> list[tuple[int, str | None]]:
        with Client(server.port) as c:
            ehlo = c.greet()
            assert not any(line.startswith("AUTH") for line in ehlo.lines)
            assert "STARTTLS" in ehlo.lines
            auth = c.command(f"AUTH PLAIN {plain('', USER, PASSWORD)}")
            mail = c.command(f"MAIL FROM:<{USER}>")
            return [(auth.code, auth.status), (mail.code, mail.status)]

    assert await deferToThread(raw) == [(538, "5.7.11"), (530, "5.7.0")]
    assert server.messages == []


@pytest_twisted.ensureDeferred
async def test_insecure_auth_allows_cleartext_auth(service, certs):
    server = start_submission(service, certs, insecure_auth=True)
    code, out = await deferToThread(swaks_submit, server.port, "--auth", "LOGIN")
    assert code == 0, out
    [stored] = server.messages
    assert not stored.envelope.session.tls and stored.envelope.session.authenticated == USER


@pytest_twisted.ensureDeferred
async def test_smtplib_login_after_starttls(service, certs):
    server = start_submission(service, certs)
    message = f"From: {USER}\r\nTo: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n".encode()

    def send() -> tuple[object, ...]:
        with smtplib.SMTP(LOCALHOST, server.port, local_hostname="client.test",
                          timeout=10) as s:
            s.ehlo()
            before = s.has_extn("auth")
            s.starttls(context=client_context(ca=certs.cert))
            s.ehlo()
            mechanisms = s.esmtp_features.get("auth", "")
            code, msg = s.login(USER, PASSWORD)
            again = s.docmd("AUTH", "PLAIN " + plain("", USER, PASSWORD))
            refused = s.sendmail(USER, ["bob@example.org"], message)
            return before, mechanisms, (code, msg.split()[0]), again, refused

    before, mechanisms, login, again, refused = await deferToThread(send)
    assert not before and mechanisms.split() == ["PLAIN", "LOGIN"]
    assert login == (235, b"2.7.0")
    assert (again[0], again[1].split()[0]) == (503, b"5.5.1")  # AUTH twice
    assert refused == {}
    [stored] = server.messages
    assert stored.body.endswith(message)


@pytest_twisted.ensureDeferred
async def test_mx_listener_refuses_auth(service, certs):
    server = service([(STARTTLS_LISTENER, mx_config())], portal=portal_for(None),
                     tls=server_context(certs.cert, certs.key))

    def raw() -> list[tuple[int, str | None]]:
        with Client(server.port) as c:
            c.greet()
            assert c.command("STARTTLS").code == 220
            c.sock = client_context().wrap_socket(c.sock, server_hostname="localhost")
            ehlo = c.command("EHLO client.test")
            assert not any(line.startswith("AUTH") for line in ehlo.lines)
            auth = c.command(f"AUTH PLAIN {plain('', USER, PASSWORD)}")
            relay = [c.command(f"MAIL FROM:<{USER}>"), c.command("RCPT TO:<bob@example.org>")]
            return [(r.code, r.status) for r in (auth, *relay)]

    # MX: AUTH refused and mail only for the local domains (no relaying).
    assert await deferToThread(raw) == [(503, "5.5.1"), (250, "2.1.0"), (550, "5.7.1")]


def test_twistd_with_mx_submission_and_lmtp_listeners(twistd, tmp_path: Path) -> None:
    """One ``twistd -n maitred`` process: MX (with STARTTLS), submission (AUTH after
    STARTTLS) and LMTP on a UNIX socket, all into the Maildir."""
    from security_support import make_certificate

    certs = make_certificate(tmp_path)
    submission_port = free_port()
    sock = tmp_path / "lmtp.sock"
    args = [
        "--domain", "example.com",
        "--submission", f"tcp:{submission_port}:interface=127.0.0.1",
        "--lmtp", f"unix:{sock}",
        "--auth", f"memory:{USER}:{PASSWORD}",
        "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
        "--trusted-proxy", "127.0.0.1/32",
        "--maildir", str(tmp_path / "maildir"),
    ]
    with twistd(*args) as server:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # MX: STARTTLS offered, AUTH refused, a local recipient accepted.
        with smtplib.SMTP(LOCALHOST, server.port, local_hostname="client.test",
                          timeout=10) as s:
            s.ehlo()
            assert s.has_extn("starttls") and not s.has_extn("auth")
            s.starttls(context=client_context(ca=certs.cert))
            s.ehlo()
            assert not s.has_extn("auth")
            code, msg = s.docmd("AUTH", "PLAIN " + plain("", USER, PASSWORD))
            assert (code, msg.split()[0]) == (503, b"5.5.1")
            assert s.sendmail("a@b.org", ["carol@example.com"], b"Subject: mx\r\n\r\nx\r\n") == {}
        # Submission: swaks with STARTTLS and AUTH PLAIN to a remote domain.
        result = swaks("--port", str(submission_port), "--tls", "--auth", "PLAIN",
                       "--auth-user", USER, "--auth-password", PASSWORD,
                       "--from", USER, "--to", "dave@example.com")
        assert result.returncode == 0, result.stdout + result.stderr
        # LMTP over the UNIX socket.
        with smtplib.LMTP(str(sock), local_hostname="client.test", timeout=10) as lmtp:
            code, _ = lmtp.ehlo()  # smtplib.LMTP sends LHLO
            assert code == 250
            assert lmtp.sendmail("a@b.org", ["erin@example.com"], b"Subject: l\r\n\r\ny\r\n") \
                == {}
        maildir = tmp_path / "maildir" / "example.com"
        for user in ("carol", "dave", "erin"):
            assert len(message_files(maildir / user)) == 1, (user, server.log_text())
        assert PASSWORD not in server.log_text()
