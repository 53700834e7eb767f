"""``twistd -n maitred --delivery queue --relay-host ... --relay-auth ...`` end to end:
two real processes.  The smarthost is ``twistd maitred`` with a submission listener
(STARTTLS, AUTH PLAIN against ``--auth memory:``, Maildir delivery); the relay takes a
message from smtplib, queues it and relays it there with verified STARTTLS (the
smarthost's self-signed certificate as ``--relay-trust-root``, valid for 127.0.0.1)
and AUTH.  And a password file others can read keeps the relay from starting."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time
from pathlib import Path

INTEROP = Path(__file__).resolve().parent.parent / "interop"
sys.path.insert(0, str(INTEROP))

from maitred_interop import (  # noqa: E402
    free_port,
    message_files,
    split_trace,
    twistd_command,
    twistd_maitred,
    wait_for_port,
)
from security_support import make_certificate  # noqa: E402

USER, PASSWORD = "alice@example.com", "s3cret-Pa55 word"
MESSAGE = (b"From: alice@example.com\r\nTo: bob@example.org\r\n"
           b"Subject: through the smarthost\r\n\r\nHello.\r\n")


def password_file(directory: Path, mode: int = 0o600) -> Path:
    path = directory / "relay-password"
    path.write_text(f"{USER}:{PASSWORD}\n")
    path.chmod(mode)
    return path


def test_twistd_relays_through_an_authenticated_smarthost(tmp_path: Path) -> None:
    certs = make_certificate(tmp_path)
    (tmp_path / "smarthost").mkdir()
    (tmp_path / "relay").mkdir()
    maildir = tmp_path / "smarthost" / "mail"
    submission = free_port()
    smarthost_args = [
        "--hostname", "smarthost.test", "--domain", "example.org", "--maildir", str(maildir),
        "--submission", f"tcp:{submission}:interface=127.0.0.1", "--no-auth-checks",
        "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
        "--auth", f"memory:{USER}:{PASSWORD}",
    ]
    relay_args = [
        "--hostname", "relay.test", "--domain", "example.org", "--no-auth-checks",
        "--delivery", "queue", "--spool", str(tmp_path / "relay" / "spool"),
        "--relay-host", f"[127.0.0.1]:{submission}",
        "--relay-auth", str(password_file(tmp_path)),
        "--relay-trust-root", str(certs.cert),
    ]
    with twistd_maitred(tmp_path / "smarthost", smarthost_args) as smarthost:
        wait_for_port(submission, smarthost.process)
        with twistd_maitred(tmp_path / "relay", relay_args) as relay:
            with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test",
                              timeout=10) as s:
                assert s.sendmail(USER, ["bob@example.org"], MESSAGE) == {}
            deadline = time.monotonic() + 30
            while not message_files(maildir / "example.org" / "bob"):
                assert time.monotonic() < deadline, relay.log_text() + smarthost.log_text()
                time.sleep(0.05)
            relay_log = relay.log_text()
    [path] = message_files(maildir / "example.org" / "bob")
    fields, body = split_trace(path.read_bytes())
    # The smarthost's Received: says TLS and AUTH (RFC 3848 ESMTPSA), from the relay.
    assert fields[2].startswith(b"Received: from relay.test ([127.0.0.1])")
    assert b"by smarthost.test (maitred_tx) with ESMTPSA id " in fields[2]
    # The relay's own Received: field, then the message as sent.
    assert body.startswith(b"Received: from client.test ([127.0.0.1])")
    assert body.endswith(MESSAGE)
    assert "AUTH as alice@example.com" in smarthost.log_text()
    assert PASSWORD not in relay_log and PASSWORD not in smarthost.log_text()


def test_twistd_refuses_a_password_file_others_can_read(tmp_path: Path) -> None:
    secret = password_file(tmp_path, 0o644)
    command = [twistd_command(), "-n", "--pidfile=", "maitred", "--delivery", "queue",
               "--spool", str(tmp_path / "spool"), "--relay-host", "[smtp.example.net]:587",
               "--relay-auth", str(secret)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"--relay-auth: {secret} is accessible to its group or others" in output
    assert f"chmod 600 {secret}" in output and PASSWORD not in output
