"""The queue runner: takes due messages from the queue and sends them onward.

One run takes the messages whose time has come (``QueueStore.due``) and are not being
delivered already, and starts each: its pending recipients are grouped by destination
(their domain, or the smarthost) and each group is sent with ``OutboundSender``;
deliveries to one destination go one after another over one connection (reused for
the next message: ``ConnectionCache``), different destinations in parallel, at most
``concurrency`` at once.  A run does not wait for the deliveries it started, so mail
for one destination is never held back behind another's backlog; and a message waits
for its destination's turn before it takes one of the ``concurrency`` places.

Per message it follows the queue's crash protocol (``maitred_tx.queue.store``): the
results of an attempt are recorded durably at once; then the DSNs owed are built and
queued (RFC 3464; never for a bounce), then recorded as sent, then a message whose
every recipient is final is removed (when an attempt finishes a message that owes no
DSN, its record is that removal, made durable: no rewrite first).  A crash anywhere
repeats at most the step it interrupted.  An error of ours while sending defers the
recipients (4.3.0); one after it (the record, a DSN: a full disk) keeps the message
out of the runs for ``policy.first`` seconds, and results not recorded are recorded
before it is sent again - never a loop that repeats the error, or the message, as
fast as it can.

When runs happen: at start; when a message is queued (``notify`` starts it at once);
when the earliest retry is due (while deliveries are under way, at most every ``poll``
seconds); when an operator asks (``maitred-queue flush`` leaves a trigger file,
looked at every ``poll`` seconds), and at least every ``scan`` seconds.  Given a
``refresh`` (the MTA-STS store's ``refresh_cached``), the runner also calls it every
``refresh_every`` seconds.  ``companions`` (services, e.g. ``relay.reports``'s daily
TLS reports) start and stop with the runner.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from maitred_tx.queue.dsn import Notice, build_dsn, notices, read_original, to_settle
from maitred_tx.queue.schedule import DelayWarning, RetryPolicy
from maitred_tx.queue.store import (
    AttemptResult,
    QueuedMessage,
    QueuedRecipient,
    QueueEnvelope,
    RecipientState,
)
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
# connections help a destination with slow replies, not the queue's own bound (its
# file creations and fsyncs: against smtp-sink 4 relayed 194 messages/s, 1 relayed
# 186; benchmarks/README).
DESTINATION_CONCURRENCY: Final = 1
# Messages taken per run; the rest wait for the next run, right after.
BATCH: Final = 500
# How often the trigger files of maitred-queue and of --workers are looked at.
POLL: Final = 1.0
# A run at least this often, whatever the schedule says (a clock step, a lost wake-up).
SCAN: Final = 60.0
# How often ``refresh`` (the MTA-STS policies' proactive refresh, RFC 8461 3.3) runs:
# each cached policy is refetched when a day or half its max_age has passed, so an
# hourly look keeps policies current even for domains no mail goes to for a while.
REFRESH_EVERY: Final = 3600.0


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
        refresh: Callable[[], Awaitable[object]] | None = None,
        refresh_every: float = REFRESH_EVERY,
        companions: Sequence[Any] = (),
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
        # The messages being delivered (a run never starts one twice; stopService
        # waits for them), and those whose delivery raised (a full disk, a bug), kept
        # from the runs until the time given: neither the error nor - when it was the
        # record of a 250 that failed - the message goes out again in a loop.
        self._active: dict[str, defer.Deferred[None]] = {}
        self._cooling: dict[str, float] = {}
        # Results that could not be recorded (record_attempt raised): recorded before
        # that message is sent again, so that what the next hop took is not resent.
        self._unrecorded: dict[str, tuple[list[AttemptResult], float]] = {}
        self._more = False  # the last run left due messages for the next one
        self.attempts = 0  # deliveries attempted, for tests and logs
        # The queue's own threads (started and stopped with the runner), so that
        # recording a delivery never waits behind the commits of incoming mail in the
        # reactor's pool: that wait is the window in which a crash repeats a delivery.
        self.threadpool = threadpool
        self._refresh = refresh
        self._refresh_every = refresh_every
        self._refresher: LoopingCall | None = None
        # Services that live as long as the runner: the daily TLS reports
        # (relay.reports), which need the queue running to be sent.
        self.companions = tuple(companions)

    # --- service -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.threadpool is not None:
            self.threadpool.start()
        self._poller = LoopingCall(self._poll)
        self._poller.clock = self.reactor
        self._poller.start(self.poll, now=False).addErrback(
            lambda f: _log.failure("queue poller stopped", f))
        if self._refresh is not None:
            self._refresher = LoopingCall(lambda: defer.ensureDeferred(self._refreshing()))
            self._refresher.clock = self.reactor
            self._refresher.start(self._refresh_every, now=False)
        for companion in self.companions:
            companion.startService()
        self.kick()

    def stopService(self) -> Any:
        super().stopService()
        companions = [c.stopService() for c in self.companions]
        for loop in (self._poller, self._refresher):
            if loop is not None and loop.running:
                loop.stop()
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self.sender.connections.close()
        # Transactions under way finish; messages still waiting for a place do not
        # start (_attempt), and are sent after the next start.
        pending = [d for d in (self._running, *self._active.values(), *companions)
                   if d is not None]
        if not pending:
            self._stop_threads()
            return None
        return defer.DeferredList(pending, consumeErrors=True).addBoth(
            lambda _: self._stop_threads())

    async def _refreshing(self) -> None:
        """One ``refresh``; an error is logged and the next one runs as planned."""
        assert self._refresh is not None
        try:
            await self._refresh()
        except Exception:
            _log.failure("queue: the periodic refresh failed")

    def _stop_threads(self) -> None:
        if self.threadpool is not None and self.threadpool.started:
            self.threadpool.stop()

    def notify(self, message: QueuedMessage | None = None) -> None:
        """A message was queued (``QueueDelivery.subscribe``): start it now (no scan
        of the queue per message), or run soon."""
        if (message is not None and self.running and message.id not in self._active
                and len(self._active) < BATCH):
            self._start(message.id)
        else:
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
        self._cooling = {i: t for i, t in self._cooling.items() if t > now}
        skip = len(self._active) + len(self._cooling)
        ids = await self.queue.due(now, BATCH + skip)
        fresh = [i for i in ids if i not in self._active and i not in self._cooling]
        room = max(BATCH - len(self._active), 0)
        for message_id in fresh[:room]:
            self._start(message_id)
        self._more = len(ids) == BATCH + skip or len(fresh) > room
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
        if due is None:
            delay = self.scan
        else:
            delay = due - self.clock()
            if self._active or self._cooling:  # the earliest may be one of those:
                delay = max(delay, self.poll)  # look again soon, not in a loop
            delay = min(max(delay, 0.0), self.scan)
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = self.reactor.callLater(delay, self.kick)

    def _start(self, message_id: str) -> None:
        delivery = defer.ensureDeferred(self._message(message_id))
        self._active[message_id] = delivery
        delivery.addBoth(self._finished, message_id)

    def _finished(self, _: object, message_id: str) -> None:
        self._active.pop(message_id, None)
        if self._more and len(self._active) <= BATCH // 2:
            self.kick()  # refill from the messages the last run left

    async def _message(self, message_id: str) -> None:
        try:
            await self._deliver(message_id)
        except Exception:
            self._cooling[message_id] = self.clock() + self.policy.first
            _log.failure("queue: delivering {id} failed; not tried again for {seconds:g} s",
                         id=message_id, seconds=self.policy.first)

    async def _deliver(self, message_id: str) -> None:
        message = await self.queue.load(message_id)
        unrecorded = self._unrecorded.pop(message_id, None)
        if message is not None and unrecorded is not None:
            try:
                message = await self.queue.record_attempt(message_id, *unrecorded)
            except BaseException:
                self._unrecorded[message_id] = unrecorded
                raise
        if message is None or message.held:
            return
        now = self.clock()
        pending = [r for r in message.pending
                   if r.next_attempt_at is None or r.next_attempt_at <= now]
        groups: dict[str, list[QueuedRecipient]] = defaultdict(list)
        for r in pending:
            groups[destination_of(r.address, self.sender.relay)].append(r)
        for destination, recipients in groups.items():
            recorded = await self._attempt(message, recipients, destination)
            if recorded is None:  # deleted meanwhile, or stopping
                return
            message = recorded
            if self._owes_nothing(message):  # the record was its removal (remove_if)
                return
        await self._settle(message)

    def _owes_nothing(self, message: QueuedMessage) -> bool:
        """Every recipient final and no DSN owed: the message can simply go.  (With
        every recipient final, only final DSNs can be owed: *now* does not matter.)"""
        return (all(r.state.final for r in message.recipients)
                and not notices(message, self.clock(), self.warning))

    async def _attempt(self, message: QueuedMessage, recipients: list[QueuedRecipient],
                       destination: str) -> QueuedMessage | None:
        """Send *recipients* to *destination* once and record the results."""
        slot = self._destinations[destination]
        await slot.acquire()  # the destination's turn first, then one of the places:
        try:  # a message waiting for its turn holds no place another could use
            await self.semaphore.acquire()
            try:
                if not self.running:
                    return None
                try:
                    results = await self.sender.deliver(
                        message, recipients, lambda: self.queue.open_body(message.id),
                        destination)
                except Exception as e:  # ours (a bug, the disk): retried, given up in time
                    _log.failure("queue: sending {id} to {destination} failed",
                                 id=message.id, destination=destination)
                    results = [AttemptResult(r.address, RecipientState.DEFERRED,
                                             status="4.3.0", diagnostic=f"local error: {e}")
                               for r in recipients]
                self.attempts += 1
                # At once, before anything else: the crash protocol's step 3.  The
                # journal line, written right here on this thread, survives a crash of
                # this process from now on; the envelope's fsync'd rewrite follows (for
                # power losses).  The destination's slot is held until it is done.
                now = self.clock()
                journaled = self.queue.journal_attempt(message.id, results, now)
                try:
                    # A message this attempt finished, owing no DSN, is removed rather
                    # than rewritten: its durable removal is the record (one file
                    # created, fsync'd and deleted fewer per message).
                    recorded = await self.queue.record_attempt(
                        message.id, results, now, journaled=journaled,
                        remove_if=self._owes_nothing)
                except BaseException:
                    self._unrecorded[message.id] = (results, now)
                    raise
            finally:
                self._release(self.semaphore)
        finally:
            self._release(slot)  # may run a waiter to its end, which may drop the slot
            if (slot.tokens == slot.limit and not slot.waiting
                    and self._destinations.get(destination) is slot):
                del self._destinations[destination]  # one per destination in use only
        if recorded is not None:
            self._log_results(recorded, results, destination)
        return recorded

    def _release(self, semaphore: defer.DeferredSemaphore) -> None:
        """Give a place back.  While stopping, each waiter resumes only to return, and
        would do so inside the previous one's release(): released from the reactor
        then, not nested, or a hundred waiters exceed the recursion limit and the
        stop never ends."""
        if self.running:
            semaphore.release()
        else:
            self.reactor.callLater(0, semaphore.release)

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
            pool = self.threadpool or self.reactor.getThreadPool()
            built = await deferToThreadPool(self.reactor, pool, self._build_dsn, message,
                                            notice, now)
            if built is None:  # deleted meanwhile
                return
            envelope, data = built
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

    def _build_dsn(self, message: QueuedMessage, notice: Notice, now: float
                   ) -> tuple[QueueEnvelope, bytes] | None:
        """In a thread: the DSN for *notice*, its original read from the stored body
        (up to dsn.MAX_RETURN_FULL octets for RET=FULL) and scanned - never on the
        reactor thread.  None if the body is gone."""
        body = self.queue.store.open_body(message.id)
        if body is None:
            return None
        with body:
            original, full = read_original(message, body)
        return build_dsn(message, notice, reporting_mta=self.hostname, original=original,
                         full=full, now=now, policy=self.policy)

    def _log_results(self, message: QueuedMessage, results: Any, destination: str) -> None:
        for result in results:
            _log.info(
                "queue: {id} to <{rcpt}> via {destination}: {state} {status} {reply}",
                id=message.id, rcpt=result.address, destination=destination,
                state=result.state.value, status=result.status or "",
                reply=str(result.reply) if result.reply else (result.diagnostic or ""),
            )
