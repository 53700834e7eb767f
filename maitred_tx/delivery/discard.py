"""Accepts and drops every message, like Postfix's smtp-sink: for load tests only."""

from __future__ import annotations

from maitred_tx.delivery.base import Delivery, MessageSink
from maitred_tx.envelope import Envelope
from maitred_tx.outcomes import Accepted, Outcome

__all__ = ["DiscardDelivery"]


# Every message gets the same answer; an outcome is immutable, so one is shared.
_DISCARDED = Accepted("OK: discarded")


class _CountingSink(MessageSink):
    def __init__(self, envelope: Envelope, owner: DiscardDelivery) -> None:
        super().__init__(envelope)
        self._owner = owner
        self._size = 0

    def write(self, data: bytes) -> None:
        self._size += len(data)

    def close(self) -> Outcome:
        self._owner.messages += 1
        self._owner.octets += self._size
        return _DISCARDED


class DiscardDelivery(Delivery):
    """Counts messages and octets, stores nothing.  Never use it for real mail."""

    def __init__(self) -> None:
        self.messages = 0
        self.octets = 0

    def open_message(self, envelope: Envelope) -> MessageSink:
        return _CountingSink(envelope, self)
