"""The client's errors: one class per thing that can go wrong at the connection level,
each saying whether trying again later can help (``permanent``) and, when the server
said something, its reply.

Per-recipient refusals are not errors: they are results (``transaction.SendResult``).
What the caller did wrong with the API (no recipients, a CR in a custom command) is a
``ValueError``/``RuntimeError``, as misuse of the pure core is elsewhere.
"""

from __future__ import annotations

from maitred_tx.client.replies import ServerReply

__all__ = [
    "AuthenticationFailed",
    "AuthenticationUnavailable",
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
]


class SMTPClientError(Exception):
    """Base class.  ``permanent``: the same attempt will fail again (bounce rather
    than retry); ``reply``: what the server answered, if it did; ``host``: the peer."""

    permanent: bool = False

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


class TLSVerificationFailed(SMTPClientError):
    """The server's certificate did not verify (unknown CA, expired, or not valid for
    the host name).  ``host`` is the name it was checked against.  Temporary, like
    Postfix's "Server certificate not verified"."""


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
