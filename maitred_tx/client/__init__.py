"""maitred_tx.client: sending mail over SMTP and LMTP from a Twisted application.

The protocol is a pure, I/O-free core (``replies``, ``extensions``, ``body``,
``message``, ``transaction``, ``session``, ``timeouts``, ``errors``) with thin Twisted
glue (``protocol``, ``source``, ``api``).  Start with :class:`SMTPClient.connect` or
:func:`send_message`; see README "Sending mail (client)".
"""

from __future__ import annotations

from maitred_tx.client.api import SMTPClient, send_message, tls_options
from maitred_tx.client.errors import (
    AuthenticationFailed,
    AuthenticationUnavailable,
    CleartextAuthRefused,
    ConnectionLost,
    ExtensionUnsupported,
    InvalidAddress,
    MessageTooBig,
    ProtocolViolation,
    ResponseTimeout,
    ServerRefused,
    SMTPClientError,
    TLSUnavailable,
    TLSVerificationFailed,
)
from maitred_tx.client.extensions import Extensions
from maitred_tx.client.message import DSN, InvalidBody, Recipient
from maitred_tx.client.replies import ServerReply
from maitred_tx.client.session import TLSMode
from maitred_tx.client.timeouts import Timeouts
from maitred_tx.client.transaction import Outcome, RecipientResult, SendResult
from maitred_tx.smtp.params import BodyType, Notify, Ret

__all__ = [
    "DSN",
    "AuthenticationFailed",
    "AuthenticationUnavailable",
    "BodyType",
    "CleartextAuthRefused",
    "ConnectionLost",
    "ExtensionUnsupported",
    "Extensions",
    "InvalidAddress",
    "InvalidBody",
    "MessageTooBig",
    "Notify",
    "Outcome",
    "ProtocolViolation",
    "Recipient",
    "RecipientResult",
    "ResponseTimeout",
    "Ret",
    "SMTPClient",
    "SMTPClientError",
    "SendResult",
    "ServerRefused",
    "ServerReply",
    "TLSMode",
    "TLSUnavailable",
    "TLSVerificationFailed",
    "Timeouts",
    "send_message",
    "tls_options",
]
