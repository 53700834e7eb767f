"""The outbound queue's data model and the small interface every queue store offers.

This module owns what a queued message *is* (:class:`QueuedMessage`,
:class:`QueuedRecipient`), what one delivery attempt reports (:class:`AttemptResult`),
the pure state transitions between them (:func:`apply_attempt` and friends) and the
:class:`QueueStore` protocol.  It does no I/O; :mod:`maitred_tx.queue.spool` is the
embedded store on a directory, :mod:`maitred_tx.queue.threaded` runs any store's
blocking methods in a thread pool for the reactor.

Why a ``typing.Protocol`` and not a zope Interface: the store is called by our own
runner and CLI, not plugged in by users beside Twisted objects, and a Protocol is
checked statically (``mypy --strict``) against every implementation, structurally,
with no registration and no runtime dependency.  A shared store serving several
instances later (a database, an object store) implements the same methods.

Crash safety: the protocol between store and runner
---------------------------------------------------

*Accepting* (the 250 after DATA, RFC 5321 4.1.1.4 / 6.1): :meth:`QueueStore.add`, and
:meth:`MessageWriter.commit`, return only once the body and the envelope are on stable
storage.  For the spool: body written to ``tmp/``, fsync'd, renamed into ``msg/``,
``msg/`` fsync'd; then the envelope likewise into ``env/``.  The envelope file is the
commit point: a body without one never got its 250 and is deleted at start.  A
``kill -9`` (or power loss) before the commit point loses only a message whose client
got no 250 and will retry; after it, nothing is lost.

*Delivering*: state only ever advances after the next hop acknowledged it.  The runner

1. takes ids from :meth:`QueueStore.due` and :meth:`QueueStore.load` s each (None: it
   was deleted meanwhile - skip it);
2. streams :meth:`QueueStore.open_body` to the recipients that are not final;
3. **immediately** after the remote's final reply to the message (the reply to DATA /
   the last BDAT, or each LMTP per-recipient reply) notes the results in the store's
   journal where it keeps one (``SpoolStore.journal_attempt``: one appending write,
   done on the spot; it survives a crash of the process, and the next start applies
   it), then calls :meth:`QueueStore.record_attempt` with one :class:`AttemptResult`
   per recipient, and does nothing else with the message until that returned - it is
   durable then, power losses included;
4. works out the DSNs owed (:func:`maitred_tx.queue.dsn.notices`), enqueues each with
   :meth:`QueueStore.add`, then calls :meth:`QueueStore.record_notified` for every
   final recipient (owed a DSN or not) - a message whose recipients are all final and
   that owes none may skip this for 5: a crash then leaves it to be settled again;
5. calls :meth:`QueueStore.remove` once :attr:`QueuedMessage.done`.

An attempt that leaves every recipient final and owes no DSN may skip 4 and 5: 3's
``record_attempt(..., remove_if=...)`` then removes the message instead of rewriting
it, and that removal, made durable (for the spool: the envelope unlinked, ``env/``
fsync'd, then the body unlinked), is the record - what a rewrite followed by a
removal would leave, with one file written, fsync'd and deleted fewer.

A crash at any point repeats at most the step it interrupted: before 3 completes the
recipients are still pending and the message is sent again; between 3 and 4 the DSNs
are worked out again at the next run (a final recipient that is not ``notified`` makes
its message due at once); between 4's add and its record, a DSN may be sent twice;
before 5, the message is removed at the next start.  Nothing acknowledged is lost;
nothing is sent twice *except* in one window that no store can close: between the
remote's 250 and the moment the record of it is durable (for a crash of the process:
the journal line; for a power loss: the envelope's rewrite), a crash makes the next
run send the message again.  RFC 5321 6.1 accepts exactly this ("duplicates are the safe
side": a message must not be lost).  The window is kept as small as it can be: no
other work is done in it, and it is one atomic rewrite of a small file - for a
``kill -9`` it closes at the rename(2), after one fsync; for a power loss at the
directory's fsync that follows.

No "in flight" marker is written before an attempt: it would add an fsync to every
attempt and buy nothing, because a crash during an attempt is indistinguishable, to
the next run, from an attempt that never started - the recipients are still pending
and are sent again, which is what must happen anyway (the remote may never have
seen the message, and if it did, we are in the window above).  A marker could only
serve to delay that retry, which RFC 5321 4.5.4.1 does not ask for.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO, Protocol

from maitred_tx.queue.schedule import RetryPolicy
from maitred_tx.smtp.params import BodyType, Notify, Ret

__all__ = [
    "AttemptResult",
    "MessageWriter",
    "QueueEnvelope",
    "QueueReply",
    "QueueStore",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientState",
    "apply_attempt",
    "new_message",
    "with_flush",
    "with_held",
    "with_notified",
]


class RecipientState(enum.Enum):
    """Where one recipient stands.  The last three are final."""

    PENDING = "pending"  # not tried yet
    DEFERRED = "deferred"  # tried, temporary failure: retried at next_attempt_at
    DELIVERED = "delivered"  # the next hop took it (RFC 3464 2.3.3 "delivered")
    # Taken by a next hop that does not announce DSN: RFC 3464 2.3.3 "relayed" - it
    # will not report success, so a NOTIFY=SUCCESS sender hears it from us.
    RELAYED = "relayed"
    FAILED = "failed"  # permanent failure, or gave up (RetryPolicy.give_up_after)

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({RecipientState.DELIVERED, RecipientState.RELAYED, RecipientState.FAILED})


@dataclass(frozen=True, slots=True)
class QueueReply:
    """A reply from the next hop: code, RFC 3463 enhanced status (if sent), text."""

    code: int
    status: str | None
    text: str

    def __str__(self) -> str:
        status = f" {self.status}" if self.status else ""
        return f"{self.code}{status} {self.text}".rstrip()


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    """One envelope recipient and what became of it.

    ``notify`` and ``orcpt`` are the RFC 3461 NOTIFY and ORCPT parameters as received
    (None: not given).  ``status`` is the RFC 3463 code of the last attempt; ``reply``
    the next hop's last reply; ``diagnostic`` a local reason when there was no reply
    (the connection failed, no MX).  ``remote_dsn``: the next hop announced DSN and
    was passed NOTIFY, so it, not we, reports success (RFC 3461 4.1).  ``notified``:
    the final DSN owed for it (if any) was enqueued; ``delay_notified``: likewise the
    one "delayed" DSN.
    """

    address: str
    orcpt: tuple[str, str] | None = None
    notify: frozenset[Notify] | None = None
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt_at: float | None = None  # None once final
    last_attempt_at: float | None = None
    status: str | None = None
    reply: QueueReply | None = None
    diagnostic: str | None = None
    remote_mta: str | None = None
    remote_dsn: bool = False
    notified: bool = False
    delay_notified: bool = False


@dataclass(frozen=True, slots=True)
class QueueEnvelope:
    """What :meth:`QueueStore.add` is given: the transaction, before it has an id.

    ``received_at`` (default: the time of the commit) becomes ``created_at``, the start
    of the retry period and the DSN's Arrival-Date.  ``transaction_id`` is the id the
    SMTP server wrote in Received: and its logs, kept to match them.
    """

    sender: str | None  # None: the null reverse-path <> (a bounce)
    recipients: tuple[QueuedRecipient, ...]
    envid: str | None = None
    ret: Ret | None = None
    smtputf8: bool = False
    body_type: BodyType | None = None
    received_at: float | None = None
    transaction_id: str | None = None


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One queued message: envelope, state per recipient; the body is kept apart."""

    id: str
    sender: str | None
    recipients: tuple[QueuedRecipient, ...]
    created_at: float
    size: int  # of the stored body, our Received: field included
    envid: str | None = None
    ret: Ret | None = None
    smtputf8: bool = False
    body_type: BodyType | None = None
    transaction_id: str | None = None
    held: bool = False

    @property
    def pending(self) -> tuple[QueuedRecipient, ...]:
        """The recipients still to be tried (not final)."""
        return tuple(r for r in self.recipients if not r.state.final)

    @property
    def done(self) -> bool:
        """Every recipient is final and its DSN settled: the message may be removed."""
        return all(r.state.final and r.notified for r in self.recipients)

    @property
    def next_attempt_at(self) -> float | None:
        """When the runner should look at this message again (None: done).

        A final recipient whose DSN is not settled makes the message due at once: the
        runner crashed between recording and notifying, and must finish that first.
        """
        if any(r.state.final and not r.notified for r in self.recipients):
            return 0.0
        times = [r.next_attempt_at for r in self.recipients if not r.state.final]
        return min((t if t is not None else 0.0 for t in times), default=None)


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt did for one recipient (*state* is never PENDING).

    *status* overrides the enhanced code taken from *reply* (needed when there is no
    reply: a failed connection is typically 4.4.1, RFC 3463).  A DEFERRED result whose
    retry period is over makes the recipient FAILED (see :func:`apply_attempt`).
    """

    address: str
    state: RecipientState
    reply: QueueReply | None = None
    status: str | None = None
    diagnostic: str | None = None
    remote_mta: str | None = None
    remote_dsn: bool = False

    def __post_init__(self) -> None:
        if self.state is RecipientState.PENDING:
            raise ValueError("an attempt result cannot be PENDING")


class MessageWriter(Protocol):
    """A message being written into the store (the SMTP body streams into it).

    ``write`` must not block on the disk beyond a buffered append (it is called on the
    reactor thread); ``commit`` and ``abort`` block and run in a thread.
    """

    def write(self, data: bytes) -> None: ...

    def commit(self, envelope: QueueEnvelope) -> QueuedMessage:
        """Make the message durable (see the module docstring); then return it."""
        ...

    def abort(self) -> None:
        """Throw the partial message away.  Idempotent; never raises."""
        ...


class QueueStore(Protocol):
    """The queue's storage: blocking methods, to be run off the reactor thread.

    Ids are unique across restarts and processes.  A method given an id that is not
    (or no longer) in the queue returns None / False rather than raising: a message
    may be deleted by an operator at any time.
    """

    def create(self, prefix: bytes = b"") -> MessageWriter:
        """A writer for a new message whose body starts with *prefix* (Received:)."""
        ...

    def add(self, envelope: QueueEnvelope, source: BinaryIO | Iterable[bytes]) -> str:
        """Store a whole message (e.g. a DSN) durably; return its id."""
        ...

    def due(self, now: float, limit: int | None = None) -> list[str]:
        """Ids whose next attempt is at or before *now*, earliest first; not held."""
        ...

    def next_due(self) -> float | None:
        """The earliest next attempt of any message that is not held (None: none)."""
        ...

    def load(self, message_id: str) -> QueuedMessage | None: ...

    def load_all(self) -> Iterator[QueuedMessage]:
        """Every message, read from storage now (for the CLI and the runner's start)."""
        ...

    def open_body(self, message_id: str) -> BinaryIO | None:
        """The stored body, to be streamed (never read whole); None if gone."""
        ...

    def record_attempt(
        self, message_id: str, results: Sequence[AttemptResult], now: float, *,
        journaled: bool = False, remove_if: Callable[[QueuedMessage], bool] | None = None,
    ) -> QueuedMessage | None:
        """Apply *results* durably (atomic rewrite) before returning the new state.
        *journaled*: they were passed to ``journal_attempt`` first (a store that keeps
        such a journal may then let go of that entry).  *remove_if*: when it is true
        of the new state (the runner's "every recipient final, no DSN owed"), the
        message is removed instead, durably - that removal is the record; the new
        state is returned all the same."""
        ...

    def record_notified(
        self, message_id: str, addresses: Iterable[str], *, delay: bool = False
    ) -> QueuedMessage | None:
        """Mark the DSNs (final, or "delayed" when *delay*) of *addresses* as enqueued."""
        ...

    def remove(self, message_id: str) -> None:
        """Forget a message that is done."""
        ...

    def hold(self, message_id: str, held: bool = True) -> bool:
        """Keep (or, with held=False, release) a message from delivery attempts."""
        ...

    def flush(self, message_id: str | None = None) -> int:
        """Make one message (None: every message) due now; return how many."""
        ...

    def delete(self, message_id: str) -> bool:
        """Remove a message whatever its state, without any DSN (an operator's act)."""
        ...

    def flush_requested(self) -> bool:
        """True when a flush (or another change) was asked for from outside."""
        ...

    def consume_flush(self) -> bool:
        """Take a pending request (reload what changed); True if there was one."""
        ...


# --- pure transitions ---------------------------------------------------------------


def apply_attempt(
    message: QueuedMessage,
    results: Sequence[AttemptResult],
    now: float,
    policy: RetryPolicy,
) -> QueuedMessage:
    """*message* after the attempt that produced *results* (one per recipient tried).

    A recipient that is already final is never changed (a late or repeated result must
    not undo a delivery); a result for an address not in the message is a bug.
    """
    by_address = {r.address: r for r in results}
    unknown = set(by_address) - {r.address for r in message.recipients}
    if unknown:
        raise KeyError(f"not recipients of {message.id}: {sorted(unknown)}")
    recipients = tuple(
        _apply(r, by_address[r.address], message.created_at, now, policy)
        if r.address in by_address and not r.state.final
        else r
        for r in message.recipients
    )
    return replace(message, recipients=recipients)


def _apply(
    recipient: QueuedRecipient,
    result: AttemptResult,
    created_at: float,
    now: float,
    policy: RetryPolicy,
) -> QueuedRecipient:
    attempts = recipient.attempts + 1
    state = result.state
    next_at: float | None = None
    if state is RecipientState.DEFERRED:
        next_at = policy.next_attempt(attempts, created_at, now)
        if next_at is None:  # the retry period is over: give up (RFC 5321 4.5.4.1)
            state = RecipientState.FAILED
    return replace(
        recipient,
        state=state,
        attempts=attempts,
        next_attempt_at=next_at,
        last_attempt_at=now,
        status=result.status or _status_of(result.reply, state),
        reply=result.reply,
        diagnostic=result.diagnostic,
        remote_mta=result.remote_mta,
        remote_dsn=result.remote_dsn,
    )


def _status_of(reply: QueueReply | None, state: RecipientState) -> str:
    """The enhanced status of a result: the reply's own, else its class (x.0.0, as
    Postfix does for a server without ENHANCEDSTATUSCODES), else by state."""
    if reply is not None and reply.status:
        return reply.status
    if reply is not None and 2 <= reply.code // 100 <= 5 and reply.code // 100 != 3:
        return f"{reply.code // 100}.0.0"
    if state is RecipientState.FAILED:
        return "5.0.0"
    return "4.0.0" if state is RecipientState.DEFERRED else "2.0.0"


def with_notified(
    message: QueuedMessage, addresses: Iterable[str], *, delay: bool = False
) -> QueuedMessage:
    """*message* with the final (or "delayed") DSN of *addresses* marked as settled."""
    wanted = set(addresses)
    recipients = tuple(
        (replace(r, delay_notified=True) if delay else replace(r, notified=True))
        if r.address in wanted and (delay or r.state.final)
        else r
        for r in message.recipients
    )
    return replace(message, recipients=recipients)


def with_flush(message: QueuedMessage, now: float = 0.0) -> QueuedMessage:
    """*message* with every recipient that is not final due at *now*."""
    recipients = tuple(
        r if r.state.final else replace(r, next_attempt_at=now) for r in message.recipients
    )
    return replace(message, recipients=recipients)


def with_held(message: QueuedMessage, held: bool) -> QueuedMessage:
    return replace(message, held=held)


def new_message(
    message_id: str, envelope: QueueEnvelope, size: int, now: float
) -> QueuedMessage:
    """The first state of a message just committed: every recipient due at once."""
    created = envelope.received_at if envelope.received_at is not None else now
    if not math.isfinite(created):
        raise ValueError("received_at must be a finite time")
    recipients = tuple(
        replace(r, state=RecipientState.PENDING, next_attempt_at=created)
        for r in envelope.recipients
    )
    if not recipients:
        raise ValueError("a queued message needs at least one recipient")
    return QueuedMessage(
        id=message_id,
        sender=envelope.sender,
        recipients=recipients,
        created_at=created,
        size=size,
        envid=envelope.envid,
        ret=envelope.ret,
        smtputf8=envelope.smtputf8,
        body_type=envelope.body_type,
        transaction_id=envelope.transaction_id,
    )

