"""The queue runner: takes due messages from the queue and sends them onward.

One run takes the messages whose time has come (``QueueStore.due``), groups each one's
pending recipients by destination (their domain, or the smarthost), and sends each group
with ``OutboundSender``; deliveries to one destination go one after another over one
connection (reused for the next message: ``ConnectionCache``), different destinations
in parallel, at most ``concurrency`` at once.

Per message it follows the queue's crash protocol (``maitred_tx.queue.store``): the
results of an attempt are recorded durably at once; then the DSNs owed are built and
queued (RFC 3464; never for a bounce), then recorded as sent, then a message whose
every recipient is final is removed.  A crash anywhere repeats at most the step it
interrupted.

When runs happen: at start; when a message is queued (``notify``); when the earliest
retry is due; when an operator asks (``maitred-queue flush`` leaves a trigger file,
looked at every ``poll`` seconds), and at least every ``scan`` seconds.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from maitred_tx.queue.dsn import build_dsn, notices, read_original, to_settle
from maitred_tx.queue.schedule import DelayWarning, RetryPolicy
from maitred_tx.queue.store import QueuedMessage, QueuedRecipient
from maitred_tx.queue.threaded import ThreadedQueue
from maitred_tx.relay.sender import OutboundSender, destination_of

__all__ = ["QueueRunner"]

_log = Logger()

# Deliveries at once (destinations in parallel); Postfix's default_process_limit is
# 100 smtp processes, but each of ours holds a connection and a file, and one process
# with one core gains nothing from more than a few dozen in flight.
CONCURRENCY: Final = 20
# Deliveries at once to one destination (a domain, or the smarthost), each over its
# own connection.  One by default: one connection per destination, reused for its
# queued messages (issue 15), which is also what a receiving MX with a per-client limit
# is happiest with.  Postfix allows 20 (default_destination_concurrency_limit); more
# connections help a destination with slow replies, not the queue's own bound (the
# fsyncs: against smtp-sink 4 relayed 194 messages/s, 1 relayed 186; benchmarks/README).
DESTINATION_CONCURRENCY: Final = 1
# Messages taken per run; the rest wait for the next run, right after.
BATCH: Final = 500
# How often the trigger files of maitred-queue and of --workers are looked at.
POLL: Final = 1.0
# A run at least this often, whatever the schedule says (a clock step, a lost wake-up).
SCAN: Final = 60.0


class QueueRunner(Service):
    """Delivers the messages of *queue* with *sender*.  *hostname*: the Reporting-MTA
    of DSNs.  *policy*: retries and giving up.  *warning*: "delayed" DSNs."""

    def __init__(
        self,
        reactor: Any,
        queue: ThreadedQueue,
        sender: OutboundSender,
        *,
        hostname: str,
        policy: RetryPolicy | None = None,
        warning: DelayWarning | None = None,
        concurrency: int = CONCURRENCY,
        destination_concurrency: int = DESTINATION_CONCURRENCY,
        poll: float = POLL,
        scan: float = SCAN,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
        threadpool: Any = None,
    ) -> None:
        self.reactor = reactor
        self.queue = queue
        self.sender = sender
        self.hostname = hostname
        self.policy = policy or RetryPolicy()
        self.warning = warning or DelayWarning()
        self.semaphore = defer.DeferredSemaphore(concurrency)
        self.poll = poll
        self.scan = scan
        self.metrics = metrics
        self.clock = clock
        self._running: defer.Deferred[None] | None = None
        self._again = False
        self._wakeup: Any = None
        self._poller: LoopingCall | None = None
        self._destinations: dict[str, defer.DeferredSemaphore] = defaultdict(
            lambda: defer.DeferredSemaphore(destination_concurrency))
        self.attempts = 0  # deliveries attempted, for tests and logs
        # The queue's own threads (started and stopped with the runner), so that
        # recording a delivery never waits behind the commits of incoming mail in the
        # reactor's pool: that wait is the window in which a crash repeats a delivery.
        self.threadpool = threadpool

    # --- service -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.threadpool is not None:
            self.threadpool.start()
        self._poller = LoopingCall(self._poll)
        self._poller.clock = self.reactor
        self._poller.start(self.poll, now=False).addErrback(
            lambda f: _log.failure("queue poller stopped", f))
        self.kick()

    def stopService(self) -> Any:
        super().stopService()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self.sender.connections.close()
        running = self._running
        if running is None:
            self._stop_threads()
            return None
        return running.addErrback(lambda f: None).addBoth(lambda _: self._stop_threads())

    def _stop_threads(self) -> None:
        if self.threadpool is not None and self.threadpool.started:
            self.threadpool.stop()

    def notify(self, message: Any = None) -> None:
        """A message was queued (``QueueDelivery.subscribe``): run soon."""
        self.kick()

    def kick(self) -> None:
        """Run now, or right after the run in progress."""
        if not self.running:
            return
        if self._running is not None:
            self._again = True
            return
        self._running = defer.ensureDeferred(self._run())
        self._running.addErrback(lambda f: _log.failure("queue run failed", f))
        self._running.addBoth(self._ran)

    def _ran(self, _: object) -> None:
        self._running = None
        if self._again and self.running:
            self._again = False
            self.kick()

    def _poll(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._check_triggers())

    async def _check_triggers(self) -> None:
        changed = await self.queue.consume_flush()
        taken = await self.queue.take_new()
        if changed or taken:
            self.kick()

    # --- a run -------------------------------------------------------------------------

    async def _run(self) -> None:
        now = self.clock()
        ids = await self.queue.due(now, BATCH)
        work = [self.semaphore.run(self._message_deferred, i) for i in ids]
        if work:
            await defer.DeferredList(work, consumeErrors=True)
        if len(ids) == BATCH:
            self._again = True
        if self.metrics is not None:
            count = await self.queue.count()
            if count is not None:
                self.metrics.set_queue_length(count)
        await self._schedule()

    async def _schedule(self) -> None:
        """Sleep until the earliest retry (at most ``scan`` seconds)."""
        if not self.running:
            return
        due = await self.queue.next_due()
        delay = self.scan if due is None else min(max(due - self.clock(), 0.0), self.scan)
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = self.reactor.callLater(delay, self.kick)

    def _message_deferred(self, message_id: str) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._message(message_id))

    async def _message(self, message_id: str) -> None:
        try:
            await self._deliver(message_id)
        except Exception:
            _log.failure("queue: delivering {id} failed", id=message_id)

    async def _deliver(self, message_id: str) -> None:
        message = await self.queue.load(message_id)
        if message is None or message.held:
            return
        now = self.clock()
        pending = [r for r in message.pending
                   if r.next_attempt_at is None or r.next_attempt_at <= now]
        groups: dict[str, list[QueuedRecipient]] = defaultdict(list)
        for r in pending:
            groups[destination_of(r.address, self.sender.relay)].append(r)
        for destination, recipients in groups.items():
            slot = self._destinations[destination]
            await slot.acquire()
            try:
                results = await self.sender.deliver(
                    message, recipients, lambda: self.queue.open_body(message_id),
                    destination)
                self.attempts += 1
                # At once, before anything else: the crash protocol's step 3.  The
                # journal line, written right here on this thread, survives a crash of
                # this process from now on; the envelope's fsync'd rewrite follows (for
                # power losses).  The destination's slot is held until it is done.
                now = self.clock()
                journaled = self.queue.journal_attempt(message_id, results, now)
                recorded = await self.queue.record_attempt(message_id, results, now,
                                                           journaled=journaled)
            finally:
                slot.release()
            if recorded is None:  # deleted meanwhile
                return
            message = recorded
            self._log_results(message, results, destination)
        await self._settle(message)

    async def _settle(self, message: QueuedMessage) -> None:
        """Queue the DSNs owed, record them, remove the message once done."""
        now = self.clock()
        owed = notices(message, now, self.warning)
        if not owed and all(r.state.final for r in message.recipients):
            # Nothing to tell anyone: the message goes without recording that first.
            # A crash before the removal leaves it final and unsettled, and the next
            # run settles it (no DSN) and removes it: one durable write saved.
            await self.queue.remove(message.id)
            return
        for notice in owed:
            body = await self.queue.open_body(message.id)
            if body is None:
                return
            try:
                original, full = read_original(message, body)
            finally:
                body.close()
            envelope, data = build_dsn(message, notice, reporting_mta=self.hostname,
                                       original=original, full=full, now=now,
                                       policy=self.policy)
            dsn_id = await self.queue.add(envelope, [data])
            _log.info("queue: {id}: {kind} DSN queued as {dsn} for <{sender}>",
                      id=message.id, kind=notice.kind.value, dsn=dsn_id,
                      sender=message.sender)
            addresses = [r.address for r in notice.recipients]
            delay = notice.kind.value == "delay"
            updated = await self.queue.record_notified(message.id, addresses, delay=delay)
            if updated is None:
                return
            message = updated
            self.kick()  # the DSN is due now
        settle = to_settle(message)
        if settle:
            updated = await self.queue.record_notified(message.id, settle)
            if updated is None:
                return
            message = updated
        if message.done:
            await self.queue.remove(message.id)

    def _log_results(self, message: QueuedMessage, results: Any, destination: str) -> None:
        for result in results:
            _log.info(
                "queue: {id} to <{rcpt}> via {destination}: {state} {status} {reply}",
                id=message.id, rcpt=result.address, destination=destination,
                state=result.state.value, status=result.status or "",
                reply=str(result.reply) if result.reply else (result.diagnostic or ""),
            )
