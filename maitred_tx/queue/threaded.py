"""Any :class:`~maitred_tx.queue.store.QueueStore` for the reactor: every blocking call
runs in a thread pool and returns a Deferred.

The reactor and the pool are given (the global reactor is never imported); without a
pool, ``reactor.getThreadPool()`` is used, as :mod:`maitred_tx.delivery.maildir` does.
Only ``MessageWriter.write`` (it appends to a bounded buffer, see
:class:`~maitred_tx.queue.store.MessageWriter`) and ``journal_attempt`` (one appending
``write`` of a line) are called on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO, ParamSpec, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from maitred_tx.queue.spool import RecoveryReport
from maitred_tx.queue.store import (
    AttemptResult,
    MessageWriter,
    QueuedMessage,
    QueueEnvelope,
    QueueStore,
)

__all__ = ["ThreadedQueue", "log_recovery"]

_log = Logger()
_P = ParamSpec("_P")
_R = TypeVar("_R")


class ThreadedQueue:
    """The asynchronous face of *store*: the same operations, each a Deferred."""

    def __init__(
        self,
        store: QueueStore,
        reactor: IReactorThreads,
        threadpool: ThreadPool | None = None,
    ) -> None:
        self.store = store
        self._reactor = reactor
        self._threadpool = threadpool

    def _run(self, f: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_R]:
        pool = self._threadpool or self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, f, *args, **kwargs)

    # Writing a message as it arrives (maitred_tx.delivery.queue).
    def create(self, prefix: bytes = b"") -> Deferred[MessageWriter]:
        return self._run(self.store.create, prefix)

    def commit(self, writer: MessageWriter, envelope: QueueEnvelope) -> Deferred[QueuedMessage]:
        return self._run(writer.commit, envelope)

    def abort(self, writer: MessageWriter) -> Deferred[None]:
        return self._run(writer.abort)

    def add(
        self, envelope: QueueEnvelope, source: BinaryIO | Iterable[bytes]
    ) -> Deferred[str]:
        return self._run(self.store.add, envelope, source)

    # The runner's side.
    def due(self, now: float, limit: int | None = None) -> Deferred[list[str]]:
        return self._run(self.store.due, now, limit)

    def next_due(self) -> Deferred[float | None]:
        return self._run(self.store.next_due)

    def load(self, message_id: str) -> Deferred[QueuedMessage | None]:
        return self._run(self.store.load, message_id)

    def open_body(self, message_id: str) -> Deferred[BinaryIO | None]:
        return self._run(self.store.open_body, message_id)

    def record_attempt(
        self, message_id: str, results: Sequence[AttemptResult], now: float, *,
        journaled: bool = False, remove_if: Callable[[QueuedMessage], bool] | None = None,
    ) -> Deferred[QueuedMessage | None]:
        return self._run(self.store.record_attempt, message_id, tuple(results), now,
                         journaled=journaled, remove_if=remove_if)

    def journal_attempt(
        self, message_id: str, results: Sequence[AttemptResult], now: float
    ) -> bool:
        """On the calling thread, at once: note the results in the store's journal
        (SpoolStore.journal_attempt); False when the store keeps none."""
        journal = getattr(self.store, "journal_attempt", None)
        if journal is None:
            return False
        journal(message_id, results, now)
        return True

    def record_notified(
        self, message_id: str, addresses: Iterable[str], *, delay: bool = False
    ) -> Deferred[QueuedMessage | None]:
        return self._run(self.store.record_notified, message_id, tuple(addresses), delay=delay)

    def remove(self, message_id: str) -> Deferred[None]:
        return self._run(self.store.remove, message_id)

    # Operators' tools.
    def hold(self, message_id: str, held: bool = True) -> Deferred[bool]:
        return self._run(self.store.hold, message_id, held)

    def flush(self, message_id: str | None = None) -> Deferred[int]:
        return self._run(self.store.flush, message_id)

    def delete(self, message_id: str) -> Deferred[bool]:
        return self._run(self.store.delete, message_id)

    def consume_flush(self) -> Deferred[bool]:
        return self._run(self.store.consume_flush)

    def take_new(self) -> Deferred[int]:
        """Messages other processes added (a store without that notion: 0)."""
        take = getattr(self.store, "take_new", None)
        return self._run(take) if take is not None else succeed(0)

    def count(self) -> Deferred[int | None]:
        count = getattr(self.store, "count", None)
        return self._run(count) if count is not None else succeed(None)


def log_recovery(root: str, report: RecoveryReport) -> None:
    """Log what a spool's recovery found: a summary, then each problem file."""
    _log.info(
        "queue {root}: {loaded} messages in {seconds:.3f}s; removed {tmp} tmp files, "
        "{orphans} bodies that never got their 250, {done} finished messages",
        root=root, loaded=report.loaded, seconds=report.seconds,
        tmp=len(report.removed_tmp), orphans=len(report.removed_orphans),
        done=len(report.removed_done),
    )
    for name, reason in report.quarantined:
        _log.warn("queue {root}: {name} moved to corrupt/: {reason}", root=root, name=name,
                  reason=reason)
    for error in report.errors:
        _log.error("queue {root}: {error}", root=root, error=error)
    if report.replayed:
        _log.info("queue {root}: {count} delivery attempts taken from the journal (the "
                  "process stopped before recording them)", root=root,
                  count=len(report.replayed))
