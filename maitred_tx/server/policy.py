"""Turns the core's decision events into delivery calls and outcomes into replies.

Everything the application returns or raises is mapped here, in one place: an outcome
becomes its reply; anything else that goes wrong becomes 451 4.3.0, so the sender
retries and nothing is lost or bounced because of a bug (RFC 5321 4.2.5).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from maitred_tx.delivery.base import Delivery
from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.interfaces import IDelivery, IMessageSink
from maitred_tx.outcomes import Accepted, Outcome, PermanentFailure, TemporaryFailure, to_reply
from maitred_tx.server.calls import Eventually, is_later, settle, then
from maitred_tx.smtp import replies as R
from maitred_tx.smtp.commands import MailFrom, RcptTo
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.session import Transaction

__all__ = ["Policy", "new_id"]

_log = Logger()
_OUTCOMES = (Accepted, TemporaryFailure, PermanentFailure)


_ID_PREFIX = secrets.token_hex(3).upper()  # differs from run to run
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    """A short id, unique per process run, for sessions and transactions (logs,
    Received:).  A counter behind a random prefix: cheap enough for every message."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):07X}"


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


def _answer(
    fn: Callable[..., Any], args: tuple[Any, ...], accepted: Reply, what: str
) -> Eventually[Reply | None]:
    try:
        result = fn(*args)
    except Exception:
        return _failed(Failure(), what)
    if result is None:  # the usual answer (accept, default reply): nothing to map
        return None
    return settle(result, lambda r: _reply(r, accepted, what), lambda f: _failed(f, what))


def _keep_capabilities(result: Any) -> Reply | None:
    # Accepted keeps the EHLO/LHLO reply: it is the capability list.
    return _reply(None if isinstance(result, Accepted) else result, R.R250_OK, "hello()")


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


_DEFAULT_HOOKS: dict[tuple[type, str], bool] = {}


def _default_hook(delivery: Any, name: str) -> bool:
    """True when *delivery*'s hook *name* is the base Delivery's, which accepts: calling
    it, and building its arguments, would change nothing.  Asked once per class."""
    if name in getattr(delivery, "__dict__", ()):  # replaced on the instance
        return False
    key = (type(delivery), name)
    default = _DEFAULT_HOOKS.get(key)
    if default is None:
        default = getattr(type(delivery), name, None) is getattr(Delivery, name)
        _DEFAULT_HOOKS[key] = default
    return default


def _as_sink(sink: Any) -> Any:
    """``IMessageSink(sink)``: the object itself when it provides the interface (and has
    no ``__conform__`` of its own, which adaptation would ask first), without the
    adaptation machinery (~1.5 us per message)."""
    if IMessageSink.providedBy(sink) and getattr(sink, "__conform__", None) is None:
        return sink
    return IMessageSink(sink)


@implementer(IMessageSink)
class FailedSink:
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
        self.transaction_id = ""
        # Recipient values of this transaction, built once each: an Envelope is made
        # per RCPT, and rebuilding them all would cost O(n^2) for n recipients.
        self._recipients: list[Recipient] = []
        self._recipients_tuple: tuple[Recipient, ...] = ()  # the same, as last handed out

    def hello(self) -> Eventually[Reply | None]:
        if _default_hook(self.delivery, "hello"):
            return None  # what it answers (the capability list), without the call
        return then(
            self.delivery.hello,
            (self.context,),
            _keep_capabilities,
            lambda f: _failed(f, "hello()"),
        )

    def mail(self, command: MailFrom) -> Eventually[Reply | None]:
        self.transaction_id = new_id()  # the Envelope.message_id of this transaction
        self._recipients = []
        self._recipients_tuple = ()
        if _default_hook(self.delivery, "mail_from"):
            return None  # what it answers, without the call
        args = (self.context, command.sender, command.params)
        return _answer(self.delivery.mail_from, args, R.R250_SENDER_OK, "mail_from()")

    def rcpt(self, command: RcptTo, txn: Transaction) -> Eventually[Reply | None]:
        if _default_hook(self.delivery, "rcpt_to"):
            return None  # what it answers, without building an Envelope for it
        args = (self.context, self.envelope(txn), command.recipient, command.params)
        return _answer(self.delivery.rcpt_to, args, R.R250_RCPT_OK, "rcpt_to()")

    def envelope(self, txn: Transaction) -> Envelope:
        return Envelope(
            self.context,
            self.transaction_id,
            txn.sender,
            txn.params,
            self._recipients_of(txn),
            time.time(),  # received_at, as its default would be
            txn.chunked,
        )

    def _recipients_of(self, txn: Transaction) -> tuple[Recipient, ...]:
        known, accepted = self._recipients, txn.recipients
        if len(known) != len(accepted):
            if len(known) > len(accepted):  # a new transaction without MAIL here
                known.clear()
            for mailbox, params in accepted[len(known) :]:
                known.append(Recipient(mailbox, params))
            self._recipients_tuple = tuple(known)
        return self._recipients_tuple

    def open(self, envelope: Envelope) -> Eventually[Any]:
        # A result that is no IMessageSink fails too.
        try:
            sink = self.delivery.open_message(envelope)
            if not is_later(sink):  # the usual answer: no callbacks to build
                return _as_sink(sink)
        except Exception:
            return _open_failed(Failure(), envelope)
        return settle(sink, _as_sink, lambda f: _open_failed(f, envelope))

    @staticmethod
    def close(sink: Any, count: int) -> Eventually[list[Reply]]:
        # A result that is no outcome fails too.
        try:
            result = sink.close()
            if not is_later(result):  # the usual answer: no callbacks to build
                return message_reply(result, count)
        except Exception:
            return _close_failed(Failure(), count)
        return settle(result, lambda r: message_reply(r, count), lambda f: _close_failed(f, count))


def _open_failed(failure: Failure, envelope: Envelope) -> FailedSink:
    _log.failure("open_message() failed: the message gets 451", failure)
    return FailedSink(envelope)


def _close_failed(failure: Failure, count: int) -> list[Reply]:
    return [_failed(failure, "close()")] * count
