"""A discarding delivery whose every message takes one thread-pool hop.

The yardstick for issue 5's "the checks add no more than a thread-pool hop per message
on the reactor thread": ``maitred-hop`` runs maitred with this delivery and the checks
off, so its main-thread CPU per message is the SMTP path plus one ``deferToThread`` and
the asynchronous completion that follows it; ``maitred-auth`` is compared with it.
Loaded by twistd as ``--delivery python:hop_delivery.HopDelivery`` (benchmarks only:
it uses the global reactor).
"""

from __future__ import annotations

from twisted.internet.threads import deferToThread

from maitred_tx.delivery.base import MessageSink
from maitred_tx.delivery.discard import DiscardDelivery
from maitred_tx.envelope import Envelope


class _HopSink(MessageSink):
    def __init__(self, envelope: Envelope, inner: MessageSink) -> None:
        super().__init__(envelope)
        self._inner = inner

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    def close(self):  # type: ignore[no-untyped-def]
        return deferToThread(self._inner.close)


class HopDelivery(DiscardDelivery):
    """DiscardDelivery, answering each message from a pool thread."""

    def open_message(self, envelope: Envelope) -> MessageSink:
        return _HopSink(envelope, super().open_message(envelope))
