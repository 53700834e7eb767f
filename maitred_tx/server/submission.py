"""Submission (RFC 6409): the authenticated user may only send as their own addresses,
in MAIL FROM and in the message's From: field (issue 4; Postfix's
reject_sender_login_mismatch and the From: check of authenticated submission)."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from maitred_tx.auth.headers import from_addresses
from maitred_tx.envelope import Envelope
from maitred_tx.interfaces import IMessageSink
from maitred_tx.outcomes import PermanentFailure

__all__ = ["FromGuard"]

NOT_OWNED = PermanentFailure("From: address not owned by the authenticated user", 550, "5.7.1")


@implementer(IMessageSink)
class FromGuard:
    """Passes the body through and remembers its header block (bounded), so that close()
    can refuse a From: the user does not own before the delivery stores anything."""

    def __init__(self, sink: Any, allowed: frozenset[str], max_header: int) -> None:
        self.sink = sink
        self.envelope: Envelope = sink.envelope
        self._allowed = allowed
        self._max = max_header
        self._head = bytearray()  # the header block so far, at most max_header octets
        self._complete = False

    def write(self, data: bytes) -> Any:
        if not self._complete:
            head = self._head
            scan_from = max(0, len(head) - 3)  # the empty line may straddle two writes
            head += data[: self._max + 4 - len(head)]
            end = 0 if head.startswith(b"\r\n") else head.find(b"\r\n\r\n", scan_from)
            if end >= 0 or len(head) >= self._max:
                self._complete = True
                del head[end if end >= 0 else self._max :]
        return self.sink.write(data)

    def close(self) -> Any:
        senders = from_addresses(bytes(self._head))
        if not senders or any(a not in self._allowed for a in senders):
            self.sink.abort()
            return NOT_OWNED
        return self.sink.close()  # the policy handles values, Deferreds and errors

    def abort(self) -> None:
        self.sink.abort()

