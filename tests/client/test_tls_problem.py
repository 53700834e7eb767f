"""Why a TLS handshake was refused (``TLSVerificationFailed.problem``), over real TLS on
loopback: maitred_tx's server presents a certificate for another name, an expired one
from the trusted CA, one from a CA the client does not know, or a self-signed one, and
the client, verifying against the test CA, says which; a peer that is not TLS at all is
OTHER.  No OpenSSL is mocked: the category comes from what service_identity and
OpenSSL's X.509 verify result report.  The mapping of verify results and the RFC 8460
names are checked without a reactor."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from client_support import maitred_config
from security_support import make_certificate
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from maitred_tx.client import SMTPClient, TLSMode, TLSUnavailable, TLSVerificationFailed
from maitred_tx.client.errors import CertificateProblem, certificate_problem
from maitred_tx.mta_sts.report import ResultType
from maitred_tx.server.tls import server_context

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mta_sts"))
from mta_sts_support import CA

PLAIN_LISTENER = "tcp:{port}:interface=127.0.0.1"
NAME = "mx.good.test"


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("client test CA")


def _pem(tmp_path: Path, certificate: Any) -> Path:
    """A certificate and its key in one PEM file, as server_context and ssl: take."""
    path = tmp_path / "server.pem"
    path.write_bytes(certificate.dumpPEM())
    return path


def _server_certificate(case: str, ca: CA, tmp_path: Path) -> tuple[Path, str]:
    """The server's PEM file for *case*, and the name the client checks."""
    if case == "self-signed":  # for localhost, signed by its own key
        files = make_certificate(tmp_path)
        pem = tmp_path / "self-signed.pem"
        pem.write_bytes(files.cert.read_bytes() + files.key.read_bytes())
        return pem, "localhost"
    if case == "other name":
        return _pem(tmp_path, ca.issue(["mx.other.test"])), NAME
    if case == "expired":
        return _pem(tmp_path, ca.issue([NAME], expired=True)), NAME
    assert case == "unknown CA"
    return _pem(tmp_path, CA("a CA the client does not know").issue([NAME])), NAME


# What the message says, for people: the real reason, not just "not trusted".
WORDS = {
    "other name": f"is not valid for the name {NAME}",
    "expired": "has expired (or is not valid yet) (certificate verify failed)",
    "unknown CA": "is not trusted (certificate verify failed)",
    "self-signed": "is not trusted (certificate verify failed)",
}

CASES = {
    "other name": CertificateProblem.HOST_MISMATCH,
    "expired": CertificateProblem.EXPIRED,
    "unknown CA": CertificateProblem.NOT_TRUSTED,
    "self-signed": CertificateProblem.NOT_TRUSTED,
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("case", list(CASES))
async def test_starttls_says_why_the_certificate_was_refused(service, ca, tmp_path, case):
    pem, name = _server_certificate(case, ca, tmp_path)
    server = service([(PLAIN_LISTENER, maitred_config())], tls=server_context(pem))
    with pytest.raises(TLSVerificationFailed) as caught:
        await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{server.port}",
                                 tls=TLSMode.REQUIRED, tls_hostname=name,
                                 trust_root=ca.trust_root())
    error = caught.value
    assert error.problem is CASES[case]
    # The words stay for people, naming the host; the category is for code.
    assert error.host == name and f"TLS with {name}: the server's certificate" in str(error)
    assert WORDS[case].replace(NAME, name) in str(error)
    assert error.local_ip == "127.0.0.1"  # our end, for a TLS report's sending-mta-ip
    assert error.temporary
    assert server.messages == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("case", ["expired", "unknown CA"])
async def test_implicit_tls_says_why_the_certificate_was_refused(service, ca, tmp_path,
                                                                  case):
    """Port 465: TLS from the first byte, so the OpenSSL connection is found through
    the TLS transport itself rather than through the TCP one STARTTLS upgraded."""
    pem, name = _server_certificate(case, ca, tmp_path)
    listener = f"ssl:{{port}}:interface=127.0.0.1:privateKey={pem}:certKey={pem}"
    server = service([(listener, maitred_config())], tls=server_context(pem))
    with pytest.raises(TLSVerificationFailed) as caught:
        await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{server.port}",
                                 tls=TLSMode.IMPLICIT, tls_hostname=name,
                                 trust_root=ca.trust_root())
    assert caught.value.problem is CASES[case]
    assert caught.value.local_ip == "127.0.0.1"


class _NotTLS(Protocol):
    """Offers STARTTLS, says 220 to it, then answers the ClientHello in plain text."""

    def connectionMade(self) -> None:
        self.transport.write(b"220 fake.test ESMTP\r\n")
        self.starttls = False

    def dataReceived(self, data: bytes) -> None:
        if self.starttls:  # the ClientHello
            self.transport.write(b"220 this is not TLS\r\n" * 8)
            self.transport.loseConnection()
        elif data.upper().startswith(b"EHLO"):
            self.transport.write(b"250-fake.test\r\n250 STARTTLS\r\n")
        elif data.upper().startswith(b"STARTTLS"):
            self.starttls = True
            self.transport.write(b"220 2.0.0 go ahead\r\n")


@pytest_twisted.ensureDeferred
async def test_a_handshake_that_fails_without_a_certificate_is_other():
    listener = reactor.listenTCP(0, Factory.forProtocol(_NotTLS), interface="127.0.0.1")
    try:
        with pytest.raises(TLSVerificationFailed) as caught:
            await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{listener.getHost().port}",
                                     helo="client.test", tls=TLSMode.REQUIRED,
                                     tls_hostname=NAME)
    finally:
        await listener.stopListening()
    assert caught.value.problem is CertificateProblem.OTHER
    assert f"TLS handshake with {NAME} failed" in str(caught.value)
    assert caught.value.local_ip == "127.0.0.1"


class _NoStartTLS(Protocol):
    """An ESMTP server that does not offer STARTTLS."""

    def connectionMade(self) -> None:
        self.transport.write(b"220 fake.test ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        if data.upper().startswith(b"EHLO"):
            self.transport.write(b"250-fake.test\r\n250 PIPELINING\r\n")
        elif data.upper().startswith(b"QUIT"):
            self.transport.write(b"221 2.0.0 bye\r\n")
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_starttls_not_offered_names_our_address_too():
    """The error raised while opening the session (no STARTTLS where it is required)
    carries our address, as the handshake errors do: RFC 8460's sending-mta-ip."""
    listener = reactor.listenTCP(0, Factory.forProtocol(_NoStartTLS),
                                 interface="127.0.0.1")
    try:
        with pytest.raises(TLSUnavailable) as caught:
            await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{listener.getHost().port}",
                                     helo="client.test", tls=TLSMode.REQUIRED,
                                     tls_hostname=NAME)
    finally:
        await listener.stopListening()
    assert caught.value.local_ip == "127.0.0.1"


@pytest.mark.parametrize(("code", "problem"), [
    (62, CertificateProblem.HOST_MISMATCH),  # X509_V_ERR_HOSTNAME_MISMATCH
    (64, CertificateProblem.HOST_MISMATCH),  # IP_ADDRESS_MISMATCH
    (9, CertificateProblem.EXPIRED),  # CERT_NOT_YET_VALID
    (10, CertificateProblem.EXPIRED),  # CERT_HAS_EXPIRED
    (2, CertificateProblem.NOT_TRUSTED),  # UNABLE_TO_GET_ISSUER_CERT
    (18, CertificateProblem.NOT_TRUSTED),  # DEPTH_ZERO_SELF_SIGNED_CERT
    (19, CertificateProblem.NOT_TRUSTED),  # SELF_SIGNED_CERT_IN_CHAIN
    (20, CertificateProblem.NOT_TRUSTED),  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    (21, CertificateProblem.NOT_TRUSTED),  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    (27, CertificateProblem.NOT_TRUSTED),  # CERT_UNTRUSTED
    (28, CertificateProblem.NOT_TRUSTED),  # CERT_REJECTED
    (0, CertificateProblem.OTHER),  # X509_V_OK: the handshake failed otherwise
    (1, CertificateProblem.OTHER),  # UNSPECIFIED
    (23, CertificateProblem.OTHER),  # CERT_REVOKED: RFC 8460 has no type of its own
    (None, CertificateProblem.OTHER),  # not known
])
def test_verify_results_by_what_they_mean(code, problem):
    assert certificate_problem(code) is problem


def test_verify_result_numbers_are_openssls():
    """The numbers in maitred_tx.client.errors, checked against the OpenSSL in use."""
    from OpenSSL._util import lib

    for name, code in [("HOSTNAME_MISMATCH", 62), ("IP_ADDRESS_MISMATCH", 64),
                       ("CERT_NOT_YET_VALID", 9), ("CERT_HAS_EXPIRED", 10),
                       ("UNABLE_TO_GET_ISSUER_CERT", 2), ("DEPTH_ZERO_SELF_SIGNED_CERT", 18),
                       ("SELF_SIGNED_CERT_IN_CHAIN", 19),
                       ("UNABLE_TO_GET_ISSUER_CERT_LOCALLY", 20),
                       ("UNABLE_TO_VERIFY_LEAF_SIGNATURE", 21), ("CERT_UNTRUSTED", 27),
                       ("CERT_REJECTED", 28)]:
        assert getattr(lib, f"X509_V_ERR_{name}") == code, name


def test_each_problem_is_its_rfc_8460_result_type():
    """The relay reports ``ResultType(problem.value)``: the pairs of RFC 8460 4.3."""
    assert {p: ResultType(p.value) for p in CertificateProblem} == {
        CertificateProblem.HOST_MISMATCH: ResultType.CERTIFICATE_HOST_MISMATCH,
        CertificateProblem.EXPIRED: ResultType.CERTIFICATE_EXPIRED,
        CertificateProblem.NOT_TRUSTED: ResultType.CERTIFICATE_NOT_TRUSTED,
        CertificateProblem.OTHER: ResultType.VALIDATION_FAILURE,
    }


def test_an_error_made_without_a_problem_is_other():
    error = TLSVerificationFailed("TLS with mx.test failed", host="mx.test")
    assert error.problem is CertificateProblem.OTHER and error.local_ip is None
