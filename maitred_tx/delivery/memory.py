"""Keeps messages in a list: for tests (yours and ours) and small embedded uses."""

from __future__ import annotations

from dataclasses import dataclass

from maitred_tx.delivery.base import Delivery, MessageSink
from maitred_tx.envelope import Envelope
from maitred_tx.outcomes import Accepted, Outcome

__all__ = ["MemoryDelivery", "StoredMessage"]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    envelope: Envelope
    body: bytes  # exactly the bytes received (after dot-unstuffing for DATA)


class _MemorySink(MessageSink):
    def __init__(self, envelope: Envelope, owner: MemoryDelivery) -> None:
        super().__init__(envelope)
        self._owner = owner
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._chunks.append(data)

    def close(self) -> Outcome:
        self._owner.messages.append(StoredMessage(self.envelope, b"".join(self._chunks)))
        return Accepted()

    def abort(self) -> None:
        self._owner.aborted += 1
        self._chunks.clear()


class MemoryDelivery(Delivery):
    """Every accepted message, in order, in ``messages``."""

    def __init__(self) -> None:
        self.messages: list[StoredMessage] = []
        self.aborted = 0

    def open_message(self, envelope: Envelope) -> MessageSink:
        return _MemorySink(envelope, self)
