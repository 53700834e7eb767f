"""Queue delivery: every accepted message goes into the outbound queue, durably,
before its 250 (RFC 5321 4.1.1.4 / 6.1); a runner delivers it onward later.

The body streams into the store as it arrives (a bounded buffer on the reactor
thread, as :mod:`maitred_tx.delivery.maildir` does); at the end of DATA the store
commits it in a thread - fsync, rename, directory fsync, for the body and then the
envelope (:mod:`maitred_tx.queue.spool`) - and only then is the message Accepted.
A failure anywhere is 451 4.3.0 for every recipient: the client keeps the message.

What is stored: a ``Received:`` field (RFC 5321 4.4; ``for <rcpt>`` when there is one
recipient, as Postfix writes it), then exactly the bytes received.  No Return-Path:
or Delivered-To: - those belong to final delivery (RFC 5321 4.4), and this message
is being relayed.  The DSN parameters are kept per message (RET, ENVID) and per
recipient (NOTIFY, ORCPT, RFC 3461), with SMTPUTF8 and BODY for the next hop.

Which recipients are accepted is the server's decision (a relay domain, or an
authenticated submission session); this delivery accepts what it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from maitred_tx.delivery.base import Delivery
from maitred_tx.envelope import Envelope, received_header
from maitred_tx.interfaces import IMessageSink
from maitred_tx.outcomes import Accepted, Outcome, TemporaryFailure
from maitred_tx.queue.store import MessageWriter, QueuedMessage, QueuedRecipient, QueueEnvelope
from maitred_tx.queue.threaded import ThreadedQueue

__all__ = ["QueueDelivery", "queue_envelope"]

_log = Logger()

# The answer for a message that is not durably queued: the sender keeps it, retries.
STORE_FAILED: Final = TemporaryFailure("Could not queue message, try again later", 451, "4.3.0")

Subscriber = Callable[[QueuedMessage], object]


def queue_envelope(envelope: Envelope) -> QueueEnvelope:
    """The queue's envelope for an SMTP transaction, every DSN parameter kept.

    A mailbox given twice is queued once, with its first RCPT's parameters (Postfix's
    cleanup drops duplicate recipients too): otherwise it would be sent twice in one
    transaction, and the queue, which keys results by address, would report it twice.
    """
    params = envelope.params
    recipients: dict[str, QueuedRecipient] = {}
    for r in envelope.recipients:
        address = str(r.mailbox)  # the domain normalised: one form per mailbox
        if address not in recipients:
            recipients[address] = QueuedRecipient(
                address, orcpt=r.params.orcpt, notify=r.params.notify)
    return QueueEnvelope(
        sender=None if envelope.sender is None else str(envelope.sender),
        recipients=tuple(recipients.values()),
        envid=params.envid,
        ret=params.ret,
        smtputf8=params.smtputf8,
        body_type=params.body,
        received_at=envelope.received_at,
        transaction_id=envelope.message_id,
    )


class QueueDelivery(Delivery):
    """Queue every message in *queue* (a :class:`ThreadedQueue` over a store).

    ``subscribe(callback)`` calls *callback* with each :class:`QueuedMessage` once it
    is durable, after the sink answered Accepted - the runner's "new mail" signal.
    """

    def __init__(self, queue: ThreadedQueue) -> None:
        self.queue = queue
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add a subscriber; the returned function removes it."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def open_message(self, envelope: Envelope) -> Deferred[_QueueSink]:
        """Create the spool file (in a thread) with our Received: field first."""
        recipients = envelope.recipients
        only = recipients[0].mailbox if len(recipients) == 1 else None
        d = self.queue.create(received_header(envelope, only))
        return d.addCallback(lambda writer: _QueueSink(envelope, self, writer))

    def _queued(self, message: QueuedMessage) -> None:
        for callback in tuple(self._subscribers):
            try:
                callback(message)
            except Exception:
                _log.failure("queue subscriber {callback!r} failed for {id}",
                             callback=callback, id=message.id)


@implementer(IMessageSink)
class _QueueSink:
    """Streams the body into the store's writer; commits it at close."""

    def __init__(self, envelope: Envelope, owner: QueueDelivery, writer: MessageWriter) -> None:
        self.envelope = envelope
        self._owner = owner
        self._writer = writer
        self._state = "open"  # -> "closing" -> "closed", or -> "aborted"

    def write(self, data: bytes) -> None:
        if self._state == "open":
            self._writer.write(data)  # a buffered append; errors surface at commit

    def close(self) -> Deferred[Sequence[Outcome]]:
        if self._state != "open":
            raise RuntimeError(f"close() on a sink that is {self._state}")
        self._state = "closing"
        d = self._owner.queue.commit(self._writer, queue_envelope(self.envelope))
        return d.addCallbacks(self._committed, self._failed)

    def _committed(self, message: QueuedMessage) -> Sequence[Outcome]:
        self._state = "closed"
        _log.info("queued {id} ({transaction}): {size} octets for {count} recipients",
                  id=message.id, transaction=self.envelope.message_id, size=message.size,
                  count=len(message.recipients))
        self._owner._queued(message)
        return [Accepted(f"Queued as {message.id}")] * len(self.envelope.recipients)

    def _failed(self, failure: Failure) -> Sequence[Outcome]:
        self._state = "closed"
        _log.warn("queue: {transaction} not stored: {error}",
                  transaction=self.envelope.message_id, error=failure.getErrorMessage())
        return [STORE_FAILED] * len(self.envelope.recipients)

    def abort(self) -> None:
        """Discard the partial file (in a thread).  Idempotent."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._owner.queue.abort(self._writer).addErrback(
            lambda f: _log.failure("queue: discarding a partial message failed", f)
        )
