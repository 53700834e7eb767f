"""Submission (RFC 6409): the authenticated user may only send as their own addresses,
in MAIL FROM and in the message's From: field (issue 4; Postfix's
reject_sender_login_mismatch and the From: check of authenticated submission)."""

from __future__ import annotations

from email.utils import getaddresses
from typing import Any

from zope.interface import implementer

from maitred_tx.envelope import Envelope
from maitred_tx.interfaces import IMessageSink
from maitred_tx.outcomes import PermanentFailure

__all__ = ["FromGuard", "from_addresses"]

NOT_OWNED = PermanentFailure("From: address not owned by the authenticated user", 550, "5.7.1")


def from_addresses(header_block: bytes) -> list[str]:
    """The addresses of every From: field (RFC 5322 3.6.2), lower-cased."""
    text = header_block.decode("utf-8", "replace").replace("\r\n", "\n")
    fields: list[str] = []
    collecting = False
    for line in text.split("\n"):
        if line[:1] in (" ", "\t"):
            if collecting:
                fields[-1] += line  # a folded continuation (RFC 5322 2.2.3)
            continue
        collecting = line[:5].lower() == "from:"
        if collecting:
            fields.append(line[5:])
    return [address.lower() for _, address in getaddresses(fields) if address]


@implementer(IMessageSink)
class FromGuard:
    """Passes the body through and remembers its header block (bounded), so that close()
    can refuse a From: the user does not own before the delivery stores anything."""

    def __init__(self, sink: Any, allowed: frozenset[str], max_header: int) -> None:
        self.sink = sink
        self.envelope: Envelope = sink.envelope
        self._allowed = allowed
        self._max = max_header
        self._head: list[bytes] = []
        self._size = 0
        self._complete = False

    def write(self, data: bytes) -> Any:
        if not self._complete:
            self._head.append(data[: self._max + 4])
            self._size += len(data)
            joined = b"".join(self._head)
            if b"\r\n\r\n" in joined or joined.startswith(b"\r\n") or self._size > self._max:
                self._complete = True
                self._head = [joined.split(b"\r\n\r\n", 1)[0][: self._max]]
        return self.sink.write(data)

    def close(self) -> Any:
        senders = from_addresses(b"".join(self._head))
        if not senders or any(a not in self._allowed for a in senders):
            self.sink.abort()
            return NOT_OWNED
        return self.sink.close()  # the policy handles values, Deferreds and errors

    def abort(self) -> None:
        self.sink.abort()

