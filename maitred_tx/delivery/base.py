"""A convenient base for native deliveries: accepts every step; override what you need."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zope.interface import implementer

from maitred_tx.envelope import Envelope, SessionContext
from maitred_tx.interfaces import IDelivery, IMessageSink
from maitred_tx.outcomes import Accepted, Outcome
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.params import MailParams, RcptParams

__all__ = ["Delivery", "MessageSink"]


@implementer(IDelivery)
class Delivery:
    """Accept every sender and every (local) recipient; subclasses add the policy."""

    def hello(self, context: SessionContext) -> Outcome | None:
        return None

    def mail_from(
        self, context: SessionContext, sender: Mailbox | None, params: MailParams
    ) -> Outcome | None:
        return None

    def rcpt_to(
        self,
        context: SessionContext,
        envelope: Envelope,
        recipient: Mailbox,
        params: RcptParams,
    ) -> Outcome | None:
        return None

    def open_message(self, envelope: Envelope) -> Any:
        raise TypeError(f"{type(self).__name__} must implement open_message")


@implementer(IMessageSink)
class MessageSink:
    """Base sink: subclasses implement write/close; abort does nothing by default."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> Outcome | Sequence[Outcome]:
        return Accepted()

    def abort(self) -> None:
        pass
