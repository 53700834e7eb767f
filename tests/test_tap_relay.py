"""`twistd maitred` options for an authenticated smarthost: --relay-tls, --relay-auth
and --relay-trust-root as parsed, the refusals that keep a password from going out
unprotected, and what reaches the queue runner's sender."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.python.usage import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parent / "interop"))

from security_support import make_certificate

from maitred_tx.relay.options import queue_delivery, queue_runner
from maitred_tx.relay.route import RelayHost
from maitred_tx.relay.smarthost import RelayCredentials, RelayTLS
from maitred_tx.tap import Options

SECRET = "pa:ss word"


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "relay-password"
    path.write_text(f"relay@example.net:{SECRET}\n")
    path.chmod(0o600)
    return path


def test_without_the_new_options_a_smarthost_is_as_before() -> None:
    relay = parse("--delivery", "queue", "--relay-host", "[smtp.example.net]:2525")["relay-host"]
    assert relay == RelayHost("smtp.example.net", 2525, mx=False)
    assert relay.tls is RelayTLS.OPPORTUNISTIC and relay.credentials is None
    assert parse()["relay-host"] is None


def test_relay_auth_reads_the_file_and_defaults_to_verified_starttls(secret_file) -> None:
    options = parse("--relay-host", "[smtp.example.net]:587", "--relay-auth", str(secret_file))
    relay = options["relay-host"]
    assert relay.tls is RelayTLS.VERIFY
    assert relay.credentials == RelayCredentials("relay@example.net", SECRET)
    assert options["relay-trust-root"] is None  # the platform's CAs


@pytest.mark.parametrize(("mode", "tls"), [("verify", RelayTLS.VERIFY),
                                           ("implicit", RelayTLS.IMPLICIT),
                                           ("opportunistic", RelayTLS.OPPORTUNISTIC)])
def test_relay_tls_modes(mode: str, tls: RelayTLS) -> None:
    relay = parse("--relay-host", "[smtp.example.net]:465", "--relay-tls", mode)["relay-host"]
    assert relay.tls is tls and relay.credentials is None


def test_relay_auth_with_implicit_tls(secret_file) -> None:
    relay = parse("--relay-host", "[smtp.example.net]:465", "--relay-tls", "implicit",
                  "--relay-auth", str(secret_file))["relay-host"]
    assert relay.tls is RelayTLS.IMPLICIT and relay.credentials.username == "relay@example.net"


@pytest.mark.parametrize("option", ["--relay-tls", "--relay-auth", "--relay-trust-root"])
def test_the_relay_options_need_relay_host(option: str, secret_file) -> None:
    value = "verify" if option == "--relay-tls" else str(secret_file)
    with pytest.raises(UsageError, match=f"{option} needs --relay-host"):
        parse(option, value)


def test_an_unknown_tls_mode_is_refused() -> None:
    with pytest.raises(UsageError, match="opportunistic, verify or implicit"):
        parse("--relay-host", "[smtp.example.net]", "--relay-tls", "dane")


def test_a_password_never_goes_with_opportunistic_tls(secret_file, tmp_path) -> None:
    with pytest.raises(UsageError, match="--relay-auth needs --relay-tls verify or implicit"):
        parse("--relay-host", "[smtp.example.net]:587", "--relay-auth", str(secret_file),
              "--relay-tls", "opportunistic")
    certs = make_certificate(tmp_path)
    with pytest.raises(UsageError, match="--relay-trust-root needs --relay-tls verify"):
        parse("--relay-host", "[smtp.example.net]", "--relay-trust-root", str(certs.cert))


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604])
def test_a_password_file_others_can_read_is_refused(secret_file, mode: int) -> None:
    secret_file.chmod(mode)
    with pytest.raises(UsageError, match=re.escape(f"chmod 600 {secret_file}")) as caught:
        parse("--relay-host", "[smtp.example.net]:587", "--relay-auth", str(secret_file))
    assert "--relay-auth" in str(caught.value) and SECRET not in str(caught.value)


@pytest.mark.parametrize(("content", "why"), [("", "is empty"),
                                              ("just-a-password\n", "USER:PASSWORD")])
def test_an_empty_or_malformed_password_file_is_refused(secret_file, content, why) -> None:
    secret_file.write_text(content)
    with pytest.raises(UsageError, match=why):
        parse("--relay-host", "[smtp.example.net]:587", "--relay-auth", str(secret_file))


def test_a_missing_password_file_is_refused(tmp_path) -> None:
    with pytest.raises(UsageError, match=r"--relay-auth: cannot read .*absent"):
        parse("--relay-host", "[smtp.example.net]:587", "--relay-auth", str(tmp_path / "absent"))


def test_a_worker_does_not_read_the_password_file(secret_file) -> None:
    """A --workers worker only queues: the supervisor read (and checked) the file."""
    secret_file.chmod(0o644)
    options = parse("--relay-host", "[smtp.example.net]:587", "--relay-auth",
                    str(secret_file), "--inherited-fds", "3")
    assert options["relay-host"].credentials is None


def test_the_trust_root_is_checked_at_startup(tmp_path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(UsageError, match="--relay-trust-root: no PEM certificate"):
        parse("--relay-host", "[smtp.example.net]", "--relay-tls", "verify",
              "--relay-trust-root", str(not_pem))
    with pytest.raises(UsageError, match=r"--relay-trust-root: .*No such file"):
        parse("--relay-host", "[smtp.example.net]", "--relay-tls", "verify",
              "--relay-trust-root", str(tmp_path / "absent.pem"))


def test_the_queue_runner_sends_with_the_credentials_and_trust_root(secret_file,
                                                                     tmp_path) -> None:
    certs = make_certificate(tmp_path)
    options = parse("--delivery", "queue", "--spool", str(tmp_path / "spool"),
                    "--relay-host", "[127.0.0.1]:587", "--relay-auth", str(secret_file),
                    "--relay-trust-root", str(certs.cert))
    delivery = queue_delivery(options, reactor)
    try:
        sender = queue_runner(options, reactor, delivery.queue).sender
        assert sender.relay == RelayHost("127.0.0.1", 587, tls=RelayTLS.VERIFY,
                                         credentials=RelayCredentials("relay@example.net",
                                                                      SECRET))
        assert sender.trust_root == str(certs.cert)
        assert sender.mta_sts is None
    finally:
        delivery.queue.store.close()


# --- --tls-reports (RFC 8460) ----------------------------------------------------------

REPORTS = ("--tls-reports", "Example Mail", "--tls-reports-contact", "tlsrpt@mail.example.net")


@pytest.mark.parametrize(("argv", "why"), [
    (("--delivery", "queue", "--tls-reports", "Example Mail"),
     "--tls-reports needs --tls-reports-contact"),
    (("--delivery", "queue", "--tls-reports-contact", "tlsrpt@mail.example.net"),
     "--tls-reports-contact needs --tls-reports"),
    (REPORTS, "--tls-reports needs --delivery queue"),
    (("--delivery", "queue", "--relay-host", "[smtp.example.net]", *REPORTS),
     "meaningless with --relay-host"),
    (("--delivery", "queue", "--no-mta-sts", *REPORTS), "meaningless with --no-mta-sts"),
    (("--delivery", "queue", "--tls-reports", " ", "--tls-reports-contact", "a@b.example"),
     "organization name is empty"),
    (("--delivery", "queue", "--tls-reports", "Org", "--tls-reports-contact", "postmaster"),
     "is not an address"),
    (("--delivery", "queue", "--tls-reports", "Org", "--tls-reports-contact", "a@-x-"),
     "--tls-reports-contact: "),
])
def test_tls_reports_refusals(argv: tuple[str, ...], why: str) -> None:
    with pytest.raises(UsageError, match=re.escape(why)):
        parse(*argv)


def test_tls_reports_are_off_by_default_and_sent_by_the_runner_when_asked(tmp_path) -> None:
    from maitred_tx.relay.reports import TlsReportSender

    for argv, wanted in (((), False), (REPORTS, True)):
        options = parse("--delivery", "queue", "--spool", str(tmp_path / "spool"), *argv)
        delivery = queue_delivery(options, reactor)
        try:
            runner = queue_runner(options, reactor, delivery.queue)
            senders = [c for c in runner.companions if isinstance(c, TlsReportSender)]
            assert bool(senders) is wanted
            if wanted:
                [reports] = senders
                assert reports.report is runner.sender.mta_sts.report
                assert (reports.organization, reports.contact, reports.submitter) == (
                    "Example Mail", "tlsrpt@mail.example.net", "mail.example.net")
                # the counts are kept beside the MTA-STS policy cache (only with the option:
                # without it there is no sender, and nothing writes the file)
                assert reports.state_path == tmp_path / "spool" / "mta-sts" / "tls-report.json"
        finally:
            delivery.queue.store.close()
