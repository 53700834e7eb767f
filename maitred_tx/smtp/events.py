"""What the session hands its caller: events, the sentinels NEED_DATA and PAUSED, and
the facts and transaction those events refer to.  Plain values, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.commands import Ehlo, Helo, Lhlo, MailFrom, RcptTo
from maitred_tx.smtp.params import BodyType, MailParams, RcptParams
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.sasl import Credentials
from maitred_tx.smtp.xclient import XClient

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthRequested",
    "CloseConnection",
    "Event",
    "HelloReceived",
    "MailReceived",
    "MessageAborted",
    "MessageComplete",
    "MessageData",
    "MessageStarted",
    "RcptReceived",
    "Refused",
    "SessionInfo",
    "StartTlsRequested",
    "Transaction",
    "XClientReceived",
]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")  # nothing to do until more bytes arrive
PAUSED: Final = _Sentinel("PAUSED")  # waiting for decide(); stop reading meanwhile


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Facts about the session that are not states (they do not gate commands alone)."""

    helo: str | None = None  # the EHLO/HELO/LHLO argument, for Received: and logs
    esmtp: bool = False  # EHLO/LHLO used: enhanced status codes are sent (RFC 2034)
    lmtp: bool = False
    tls: bool = False  # STARTTLS done, implicit TLS, or a trusted proxy terminated TLS
    authenticated: str | None = None  # the AUTH identity; allows relaying
    trusted: bool = False  # the peer is a trusted proxy: XCLIENT is offered


@dataclass(slots=True)
class Transaction:
    """The envelope being built: sender, parameters, accepted recipients."""

    sender: Mailbox | None
    params: MailParams
    recipients: list[tuple[Mailbox, RcptParams]] = field(default_factory=list)
    chunked: bool = False  # the body came by BDAT
    size: int = 0  # octets of body received (after dot-unstuffing)
    started: bool = False  # MessageStarted has been emitted

    @property
    def smtputf8(self) -> bool:
        return self.params.smtputf8

    @property
    def binary(self) -> bool:
        return self.params.body is BodyType.BINARY_MIME


class Event:
    """Base of what next_event hands out."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """Decide: None accepts with the capability list; a Reply rejects."""

    command: Ehlo | Helo | Lhlo


@dataclass(frozen=True, slots=True)
class MailReceived(Event):
    """Decide: None gives 250 2.1.0; any Reply is sent as is."""

    command: MailFrom


@dataclass(frozen=True, slots=True)
class RcptReceived(Event):
    """Decide: None gives 250 2.1.5; a positive Reply accepts, others refuse."""

    command: RcptTo
    transaction: Transaction


@dataclass(frozen=True, slots=True)
class MessageStarted(Event):
    """The body begins: open the sink.  No decision."""

    transaction: Transaction


@dataclass(frozen=True, slots=True)
class MessageData(Event):
    """Body bytes, in order, dot-unstuffed, binary-safe.  No decision."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageComplete(Event):
    """The body ended: deliver, then decide (SMTP) or decide_each (LMTP)."""

    transaction: Transaction


@dataclass(frozen=True, slots=True)
class MessageAborted(Event):
    """The started body will not complete (limit, RSET, ...): discard the sink."""

    reply: Reply | None


@dataclass(frozen=True, slots=True)
class AuthRequested(Event):
    """AUTH gave credentials: verify them, then call auth_result()."""

    mechanism: str
    credentials: Credentials


@dataclass(frozen=True, slots=True)
class StartTlsRequested(Event):
    """220 is queued: write it, start TLS on the transport, then call tls_started()."""


@dataclass(frozen=True, slots=True)
class XClientReceived(Event):
    """A trusted proxy says who the real client is: apply it, then xclient_applied()."""

    attributes: XClient


@dataclass(frozen=True, slots=True)
class Refused(Event):
    """A MAIL or RCPT was refused (by policy or by the delivery), for the log."""

    command: MailFrom | RcptTo
    reply: Reply


@dataclass(frozen=True, slots=True)
class CloseConnection(Event):
    """Send what data_to_send() holds, then close."""
