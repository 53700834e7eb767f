"""The sink of a delivery that forwards each message elsewhere once it is complete.

The LMTP and HTTP deliveries both need the whole message before they can hand it on
(one knows the size and body type to announce only at the end, the other posts one
request), yet must not hold a 50 MB message in memory: the body is spooled while it
arrives - in memory up to ``SPOOL_MEMORY`` octets, then in an anonymous temporary file
- with our ``Received:`` field first (RFC 5321 4.4), and forwarded at ``close``.
What the two share is here: the spool, the open/closing/closed/aborted life cycle, and
the log line with the outcome; a subclass says how to forward.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from typing import IO, Final, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from maitred_tx.envelope import Envelope, received_header
from maitred_tx.interfaces import IMessageSink
from maitred_tx.outcomes import Accepted, Outcome, PermanentFailure, TemporaryFailure

__all__ = ["SPOOL_MEMORY", "ForwardingSink", "summary"]

_log = Logger()

SPOOL_MEMORY: Final = 1024 * 1024
"""Octets of a message kept in memory before its spool moves to a temporary file."""

R = TypeVar("R", bound="Outcome | Sequence[Outcome]")


@implementer(IMessageSink)
class ForwardingSink(Generic[R]):
    """Spools the body; at ``close`` calls ``forward`` with the spool rewound.

    *received*: write our ``Received:`` field first.  *max_size*: a body that grows
    beyond it is dropped at once (nothing more is kept) and ``forward`` gets None, so
    that the subclass answers with its own "too big" reply.  *label*: names the
    destination in the log line.  ``forward`` must fire with the outcome(s), never
    with a failure: the reply to the client is built from what it returns.
    """

    def __init__(self, envelope: Envelope, *, received: bool, label: str,
                 max_size: int | None = None) -> None:
        self.envelope = envelope
        self.size = 0
        self._label = label
        self._max_size = max_size
        self._file: IO[bytes] | None = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=SPOOL_MEMORY)  # closed by _drop, whatever the ending
        self._state = "open"  # -> "closing" -> "closed", or -> "aborted"
        if received:
            recipients = envelope.recipients
            self.write(received_header(
                envelope, recipients[0].mailbox if len(recipients) == 1 else None))

    def write(self, data: bytes) -> None:
        file = self._file
        if self._state != "open" or file is None:
            return
        if self._max_size is not None and self.size + len(data) > self._max_size:
            self._drop()
            return
        file.write(data)
        self.size += len(data)

    def forward(self, body: IO[bytes] | None) -> Deferred[R]:
        """Hand the message on; *body* is the spool at its start, or None when the
        message exceeded *max_size*."""
        raise TypeError(f"{type(self).__name__} must implement forward")

    def close(self) -> Deferred[R]:
        if self._state != "open":
            raise RuntimeError(f"close() on a sink that is {self._state}")
        self._state = "closing"
        if self._file is not None:
            self._file.seek(0)
        return self.forward(self._file).addCallback(self._done)

    def _done(self, outcome: R) -> R:
        self._state = "closed"
        self._drop()
        _log.info("{label}: {message_id} -> {outcome}", label=self._label,
                  message_id=self.envelope.message_id, outcome=summary(outcome))
        return outcome

    def abort(self) -> None:
        """Drop the spooled body.  Idempotent; nothing was sent."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._drop()

    def _drop(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def summary(outcome: Outcome | Iterable[Outcome]) -> str:
    """The replies in short, for a log line: ``250, 550 5.1.1``."""
    outcomes: list[Outcome] = (
        [outcome] if isinstance(outcome, Accepted | TemporaryFailure | PermanentFailure)
        else list(outcome))
    return ", ".join("250" if isinstance(o, Accepted) else f"{o.code} {o.status}"
                     for o in outcomes)
