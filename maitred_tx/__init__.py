"""maitred_tx: an embeddable, secure-by-default ESMTP/LMTP receiving server for Twisted."""

from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.interfaces import IDelivery, IMessageSink
from maitred_tx.outcomes import Accepted, PermanentFailure, TemporaryFailure
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.service import SMTPService
from maitred_tx.smtp.config import BareLineEndings, Config, Limits

__all__ = [
    "Accepted",
    "BareLineEndings",
    "Config",
    "Envelope",
    "IDelivery",
    "IMessageSink",
    "Limits",
    "PermanentFailure",
    "Recipient",
    "SMTPFactory",
    "SMTPService",
    "SessionContext",
    "TemporaryFailure",
]
