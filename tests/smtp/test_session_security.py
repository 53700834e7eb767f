"""STARTTLS, AUTH, submission and XCLIENT rules of the pure core, as transcripts fed
whole, line by line and byte by byte (the glue and real sockets are tested elsewhere)."""

from __future__ import annotations

import base64
from dataclasses import replace

from transcript import EHLO, PASSWORD, run

from maitred_tx.smtp.config import Config, Mode
from maitred_tx.smtp.events import NEED_DATA, StartTlsRequested
from maitred_tx.smtp.session import ServerSession, SessionInfo

SUBMISSION = Config(hostname="mx.test", local_domains=frozenset({"example.com"}),
                    mode=Mode.SUBMISSION, auth=True, starttls=True)
MAIL = ["MAIL FROM:<alice@example.com>", (250, "2.1.0"),
        "RCPT TO:<bob@elsewhere.example>", (250, "2.1.5")]


def plain(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def under_tls(config: Config) -> ServerSession:
    return ServerSession(config, info=SessionInfo(tls=True))


def test_cleartext_submission_refuses_auth_and_mail() -> None:
    result = run([*EHLO, f"AUTH PLAIN {plain('alice', PASSWORD)}", (538, "5.7.11"),
                  "MAIL FROM:<alice@example.com>", (530, "5.7.0")], SUBMISSION)
    assert result.replies[1].lines[-1] == "STARTTLS"  # offered; AUTH is not (cleartext)
    assert not any(line.startswith("AUTH") for line in result.replies[1].lines)


def test_auth_plain_then_any_recipient_domain_over_insecure_auth() -> None:
    config = replace(SUBMISSION, insecure_auth=True)
    run([*EHLO, f"AUTH PLAIN {plain('alice', PASSWORD)}", (235, "2.7.0"), *MAIL,
         "AUTH PLAIN", (503, "5.5.1")], config)


def test_auth_login_challenges_and_wrong_password() -> None:
    config = replace(SUBMISSION, insecure_auth=True)
    user = base64.b64encode(b"alice").decode()
    run([*EHLO, "AUTH LOGIN", (334, None), user, (334, None),
         base64.b64encode(b"wrong").decode(), (535, "5.7.8"),
         "MAIL FROM:<alice@example.com>", (530, "5.7.0")], config)


def test_auth_cancel_bad_base64_and_inside_a_transaction() -> None:
    config = replace(SUBMISSION, insecure_auth=True, mode=Mode.SUBMISSION)
    run([*EHLO, "AUTH PLAIN", (334, None), "*", (501, "5.7.0"),
         "AUTH PLAIN", (334, None), "not base64!", (501, "5.5.2"),
         f"AUTH PLAIN {plain('alice', PASSWORD)}", (235, "2.7.0"),
         "MAIL FROM:<alice@example.com>", (250, "2.1.0"),
         "AUTH LOGIN", (503, "5.5.1")], config)


def test_too_many_auth_failures_close_the_session() -> None:
    config = replace(SUBMISSION, insecure_auth=True)
    bad = f"AUTH PLAIN {plain('alice', 'nope')}"
    result = run([*EHLO, bad, (535, "5.7.8"), bad, (535, "5.7.8"), bad, (535, "5.7.8"),
                  (421, "4.7.0")], config)
    assert result.closed


def test_mx_refuses_auth_and_require_tls_refuses_mail() -> None:
    mx = Config(hostname="mx.test", require_tls=True, starttls=True)
    run([*EHLO, f"AUTH PLAIN {plain('alice', PASSWORD)}", (503, "5.5.1"),
         "MAIL FROM:<a@b.example>", (530, "5.7.0"), "STARTTLS", (220, "2.0.0")], mx)


def test_starttls_discards_the_plaintext_sent_with_it() -> None:
    # CVE-2011-0411: commands pipelined behind STARTTLS must not run after the handshake.
    session = ServerSession(SUBMISSION)
    session.receive_data(b"EHLO c\r\n")
    while session.next_event() is not NEED_DATA:
        session.decide(None)
    session.receive_data(b"STARTTLS\r\nMAIL FROM:<alice@example.com>\r\n")
    assert isinstance(session.next_event(), StartTlsRequested)
    session.tls_started()
    assert session.next_event() is NEED_DATA
    assert session.info == SessionInfo(tls=True)  # no HELO, nothing authenticated
    out = session.data_to_send()
    assert out.endswith(b"220 2.0.0 Ready to start TLS\r\n")  # nothing after it
    session.receive_data(b"MAIL FROM:<alice@example.com>\r\n")
    assert session.next_event() is NEED_DATA
    assert session.data_to_send() == b"503 Send EHLO or HELO first\r\n"  # before EHLO: no code


def test_auth_is_offered_under_tls_and_starttls_is_not_offered_twice() -> None:
    session = under_tls(SUBMISSION)
    session.receive_data(b"EHLO c\r\nSTARTTLS\r\n")
    while session.next_event() is not NEED_DATA:
        session.decide(None)
    out = session.data_to_send().decode()
    assert "250 AUTH PLAIN LOGIN\r\n" in out and "STARTTLS\r\n2" not in out
    assert out.endswith("503 5.5.1 TLS already active\r\n")


def test_xclient_only_from_trusted_peers() -> None:
    run([*EHLO, "XCLIENT ADDR=192.0.2.1", (550, "5.7.0")], Config())
