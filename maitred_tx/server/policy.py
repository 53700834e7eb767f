"""Turns the core's decision events into delivery calls and outcomes into replies.

Everything the application returns or raises is mapped here, in one place: an outcome
becomes its reply; anything else that goes wrong becomes 451 4.3.0, so the sender
retries and nothing is lost or bounced because of a bug (RFC 5321 4.2.5).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.interfaces import IDelivery, IMessageSink
from maitred_tx.outcomes import Accepted, Outcome, PermanentFailure, TemporaryFailure, to_reply
from maitred_tx.server.calls import call
from maitred_tx.smtp import replies as R
from maitred_tx.smtp.commands import MailFrom, RcptTo
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.session import Transaction

__all__ = ["Policy", "new_id"]

_log = Logger()
_OUTCOMES = (Accepted, TemporaryFailure, PermanentFailure)


def new_id() -> str:
    """A short unique id for sessions and transactions (logs, Received:)."""
    return secrets.token_hex(6).upper()


def _reply(result: Any, accepted: Reply, what: str) -> Reply | None:
    if result is None:
        return None
    if isinstance(result, _OUTCOMES):
        return to_reply(result, accepted)
    _log.error("{what} returned {result!r}, not an outcome: answering 451", what=what,
               result=result)
    return R.R451_LOCAL_ERROR


def _failed(failure: Failure, what: str) -> Reply:
    _log.failure("{what} raised: answering 451 4.3.0", failure, what=what)
    return R.R451_LOCAL_ERROR


def _answer(d: Deferred[Any], accepted: Reply, what: str) -> Deferred[Reply | None]:
    return d.addCallbacks(lambda r: _reply(r, accepted, what), lambda f: _failed(f, what))


def message_reply(outcomes: Outcome | Sequence[Outcome], count: int) -> list[Reply]:
    """One reply per recipient, from one outcome for all or one each."""
    if isinstance(outcomes, _OUTCOMES):
        return [to_reply(outcomes, R.R250_QUEUED)] * count
    listed = list(outcomes)
    if len(listed) != count or not all(isinstance(o, _OUTCOMES) for o in listed):
        _log.error("close() returned {n} outcomes for {count} recipients: answering 451",
                   n=len(listed), count=count)
        return [R.R451_LOCAL_ERROR] * count
    return [to_reply(o, R.R250_QUEUED) for o in listed]


def smtp_reply(replies: list[Reply]) -> Reply:
    """SMTP has one reply per message: 250 only if every recipient was accepted, else
    the first temporary failure (the sender retries all), else the first refusal."""
    for reply in replies:
        if reply.is_transient:
            return reply
    for reply in replies:
        if reply.is_permanent:
            return reply
    return replies[0]


@implementer(IMessageSink)
class _FailedSink:
    """Stands in when open_message failed: swallows the body, answers 451."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> Outcome:
        return TemporaryFailure()

    def abort(self) -> None:
        pass


class Policy:
    """One connection's bridge to its IDelivery."""

    def __init__(self, delivery: Any, context: SessionContext) -> None:
        self.delivery = IDelivery(delivery)
        self.context = context

    def hello(self) -> Deferred[Reply | None]:
        def capabilities(result: Any) -> Any:
            # Accepted keeps the EHLO/LHLO reply: it is the capability list.
            return None if isinstance(result, Accepted) else result

        d = call(self.delivery.hello, self.context).addCallback(capabilities)
        return _answer(d, R.R250_OK, "hello()")

    def mail(self, command: MailFrom) -> Deferred[Reply | None]:
        d = call(self.delivery.mail_from, self.context, command.sender, command.params)
        return _answer(d, R.R250_SENDER_OK, "mail_from()")

    def rcpt(self, command: RcptTo, txn: Transaction) -> Deferred[Reply | None]:
        envelope = self.envelope(txn)
        d = call(
            self.delivery.rcpt_to, self.context, envelope, command.recipient, command.params
        )
        return _answer(d, R.R250_RCPT_OK, "rcpt_to()")

    def envelope(self, txn: Transaction, message_id: str = "") -> Envelope:
        return Envelope(
            session=self.context,
            message_id=message_id or new_id(),
            sender=txn.sender,
            params=txn.params,
            recipients=tuple(Recipient(m, p) for m, p in txn.recipients),
            chunked=txn.chunked,
        )

    def open(self, envelope: Envelope) -> Deferred[Any]:
        def opened(sink: Any) -> Any:
            return IMessageSink(sink)

        def broken(failure: Failure) -> Any:
            _log.failure("open_message() failed: the message gets 451", failure)
            return _FailedSink(envelope)

        # addErrback after addCallback: a result that is no IMessageSink fails too.
        return call(self.delivery.open_message, envelope).addCallback(opened).addErrback(broken)

    @staticmethod
    def close(sink: Any, count: int) -> Deferred[list[Reply]]:
        def closed(result: Any) -> list[Reply]:
            return message_reply(result, count)

        def broken(failure: Failure) -> list[Reply]:
            return [_failed(failure, "close()")] * count

        # addErrback after addCallback: a result that is no outcome fails too.
        return call(sink.close).addCallback(closed).addErrback(broken)
