"""The client's errors: one class per thing that can go wrong at the connection level,
each saying whether trying again later can help (``permanent``) and, when the server
said something, its reply.

Per-recipient refusals are not errors: they are results (``transaction.SendResult``).
What the caller did wrong with the API (no recipients, a CR in a custom command) is a
``ValueError``/``RuntimeError``, as misuse of the pure core is elsewhere.
"""

from __future__ import annotations

import enum
from typing import Final

from maitred_tx.client.replies import ServerReply

__all__ = [
    "AuthenticationFailed",
    "AuthenticationUnavailable",
    "CertificateProblem",
    "CleartextAuthRefused",
    "ConnectionLost",
    "ExtensionUnsupported",
    "InvalidAddress",
    "MessageTooBig",
    "ProtocolViolation",
    "ResponseTimeout",
    "SMTPClientError",
    "ServerRefused",
    "TLSUnavailable",
    "TLSVerificationFailed",
    "certificate_problem",
]


class SMTPClientError(Exception):
    """Base class.  ``permanent``: the same attempt will fail again (bounce rather
    than retry); ``reply``: what the server answered, if it did; ``host``: the peer.
    ``local_ip``: our address on the connection it happened on, set by the connection
    glue when it knows one (None before a connection was made, or over a UNIX socket):
    a TLS report names the sending MTA's address (RFC 8460 4.4)."""

    permanent: bool = False
    local_ip: str | None = None

    def __init__(
        self,
        message: str,
        *,
        reply: ServerReply | None = None,
        host: str | None = None,
        permanent: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.reply = reply
        self.host = host
        if permanent is not None:
            self.permanent = permanent
        elif reply is not None:
            self.permanent = reply.is_permanent

    @property
    def temporary(self) -> bool:
        return not self.permanent


class ServerRefused(SMTPClientError):
    """The server refused the greeting, EHLO/HELO/LHLO or another session command;
    ``permanent`` follows its reply code (5xx)."""


class ConnectionLost(SMTPClientError):
    """The connection could not be made or was closed before the answer: temporary."""


class ResponseTimeout(SMTPClientError):
    """No answer within the RFC 5321 4.5.3.2 timeout: temporary."""


class ProtocolViolation(SMTPClientError):
    """The server sent something that is not SMTP (or bytes after its STARTTLS 220):
    temporary, as Postfix defers on a broken session."""


class TLSUnavailable(SMTPClientError):
    """TLS is required but the server does not offer STARTTLS or refused it.

    Temporary, as Postfix's ``smtp_tls_security_level = encrypt`` defers: a server's
    TLS setup is fixed more often than a message should bounce for it.
    """


class CertificateProblem(enum.Enum):
    """Why a TLS handshake was refused, for code rather than for people.

    The values are RFC 8460 4.3's result type names, the only standard vocabulary for
    these failures: a TLS report takes them as they are, with no mapping to keep in
    step.  ``OTHER`` is its general ``validation-failure``: a handshake that failed
    for another reason (no common protocol version, a revoked certificate, ...).
    """

    HOST_MISMATCH = "certificate-host-mismatch"  # not valid for the name (RFC 6125)
    EXPIRED = "certificate-expired"  # expired, or not valid yet
    NOT_TRUSTED = "certificate-not-trusted"  # unknown issuer, self-signed
    OTHER = "validation-failure"


# OpenSSL's X.509 verify results (X509_V_ERR_*, x509_vfy.h; the same numbers in
# OpenSSL 1.1 and 3.x) by what they mean for the peer.
_VERIFY_RESULTS: Final = {
    9: CertificateProblem.EXPIRED,  # CERT_NOT_YET_VALID
    10: CertificateProblem.EXPIRED,  # CERT_HAS_EXPIRED
    2: CertificateProblem.NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT
    18: CertificateProblem.NOT_TRUSTED,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: CertificateProblem.NOT_TRUSTED,  # SELF_SIGNED_CERT_IN_CHAIN
    20: CertificateProblem.NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: CertificateProblem.NOT_TRUSTED,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    27: CertificateProblem.NOT_TRUSTED,  # CERT_UNTRUSTED
    28: CertificateProblem.NOT_TRUSTED,  # CERT_REJECTED
    62: CertificateProblem.HOST_MISMATCH,  # HOSTNAME_MISMATCH
    64: CertificateProblem.HOST_MISMATCH,  # IP_ADDRESS_MISMATCH
}


def certificate_problem(verify_result: int | None) -> CertificateProblem:
    """The problem an OpenSSL X.509 verify result (``SSL_get_verify_result``) names;
    OTHER for any other code, for 0 (X509_V_OK: the handshake failed for another
    reason) and for None (not known)."""
    if verify_result is None:
        return CertificateProblem.OTHER
    return _VERIFY_RESULTS.get(verify_result, CertificateProblem.OTHER)


class TLSVerificationFailed(SMTPClientError):
    """The server's certificate did not verify (unknown CA, expired, or not valid for
    the host name), or the TLS handshake failed.  ``host`` is the name it was checked
    against; ``problem`` says which (a TLS report needs it, RFC 8460 4.3), while the
    message is for people.  Temporary, like Postfix's "Server certificate not
    verified"."""

    def __init__(
        self,
        message: str,
        *,
        reply: ServerReply | None = None,
        host: str | None = None,
        permanent: bool | None = None,
        problem: CertificateProblem = CertificateProblem.OTHER,
    ) -> None:
        super().__init__(message, reply=reply, host=host, permanent=permanent)
        self.problem = problem


class AuthenticationUnavailable(SMTPClientError):
    """The server offers no SASL mechanism we can use (PLAIN, LOGIN): permanent."""

    permanent = True


class CleartextAuthRefused(SMTPClientError):
    """AUTH was asked for on a connection without TLS and ``allow_cleartext_auth`` was
    not given: the password would cross the network readable.  Permanent."""

    permanent = True


class AuthenticationFailed(SMTPClientError):
    """The server refused the credentials (535: permanent) or could not check them now
    (454: temporary)."""


class InvalidAddress(SMTPClientError, ValueError):
    """A sender or recipient address is not a valid RFC 5321 path: permanent."""

    permanent = True


class MessageTooBig(SMTPClientError):
    """The message is larger than the server's announced SIZE (RFC 1870 4): refused
    before MAIL, permanent (RFC 1870 6.3: the server would answer 552)."""

    permanent = True


class ExtensionUnsupported(SMTPClientError):
    """The message needs an extension the server does not offer (SMTPUTF8 for a UTF-8
    address, 8BITMIME for 8-bit text, BINARYMIME/CHUNKING for binary content):
    permanent for this server.  ``extension`` names it."""

    permanent = True

    def __init__(self, extension: str, message: str, *, host: str | None = None) -> None:
        super().__init__(message, host=host)
        self.extension = extension
