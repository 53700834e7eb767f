"""Where the checks run: one thread with its own asyncio loop, beside the reactor.

SPF and DMARC evaluation, DKIM/ARC header parsing and the Authentication-Results field
are Python work of a few hundred microseconds per message; on the reactor thread it
would hold up every session (issue 5 allows the checks one thread-pool hop per message
there).  So the reactor thread only hands a message over (``submit``) and takes the
verdict back (the Deferred ``submit`` returned): one wake-up each way, batched
(``call_soon_threadsafe`` into the loop, ``callFromThread`` back to the reactor).

DNS stays twisted.names on the reactor: ``BridgedResolver`` answers from the
resolver's own TTL cache in the checks thread when it can (``TwistedResolver.cached``,
thread-safe), and only a miss crosses to the reactor to send a query.  dkimpy's RSA and
hashing run in a small executor behind the loop: they are CPU-bound (more threads than
cores only queue on the GIL) and each holds a message, so its size bounds that memory.

Why asyncio here and not a second reactor: the pure checks are coroutines against a
small resolver interface, and the standard library's loop runs them in any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Awaitable, Coroutine, Sequence
from functools import partial
from typing import Any, Final, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.python.failure import Failure

from maitred_tx.auth.resolver import Record, Resolver

__all__ = ["CPU_THREADS", "BridgedResolver", "CheckThread"]

_T = TypeVar("_T")

# Threads for dkimpy's CPU work: see the module docstring.  The machines we target have
# 2+ cores; the reactor needs one.
CPU_THREADS: Final = 2
# How long stop() waits for the checks thread to finish its loop.
_JOIN_TIMEOUT: Final = 10.0


class CheckThread:
    """The checks thread: started on first use (or by ``start``), stopped by ``stop``.

    ``submit(coroutine)`` runs a coroutine on the loop and returns a Deferred that fires
    on the reactor thread with its result (cancelling it cancels the work).  Hand-overs
    are batched both ways: a burst of messages costs one wake-up of the loop, and a
    burst of verdicts one ``callFromThread``, rather than one each.  The thread dies
    with the process (daemon), so an embedding application that forgets ``stop`` still
    exits.
    """

    def __init__(self, reactor: Any, *, cpu_threads: int = CPU_THREADS,
                 name: str = "maitred-auth") -> None:
        self._reactor = reactor
        self._cpu_threads = cpu_threads
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Jobs from the reactor, and finished ones back.  A flag says a wake-up is on
        # its way; the side that drains clears it before draining, so an item appended
        # after the drain began is seen by that drain or gets a wake-up of its own.
        self._inbox: deque[_Job[Any]] = deque()
        self._inbox_woken = False
        self._outbox: deque[_Job[Any]] = deque()
        self._outbox_woken = False

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> asyncio.AbstractEventLoop:
        """Start the thread (once) and return its loop."""
        with self._lock:
            if self._loop is not None:
                return self._loop
            ready = threading.Event()
            loop = asyncio.new_event_loop()
            executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._cpu_threads, thread_name_prefix=f"{self._name}-cpu"
            )
            loop.set_default_executor(executor)

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:  # cancel what runs; each cancelled job goes to the outbox
                    tasks = asyncio.all_tasks(loop)
                    for task in tasks:
                        task.cancel()
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                    loop.close()

            thread = threading.Thread(target=run, name=self._name, daemon=True)
            thread.start()
            ready.wait()
            self._inbox_woken = False
            self._loop, self._thread, self._executor = loop, thread, executor
            return loop

    def stop(self) -> None:
        """Stop the loop (pending checks are cancelled) and join the threads."""
        with self._lock:
            loop, thread, executor = self._loop, self._thread, self._executor
            self._loop = self._thread = self._executor = None
        if loop is None or thread is None or executor is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_JOIN_TIMEOUT)
        executor.shutdown(wait=True, cancel_futures=True)
        # Nobody waits for ever: jobs never started are cancelled, finished ones fired.
        while self._inbox:
            job = self._inbox.popleft()
            job.coroutine.close()
            job.deferred.cancel()
        self._deliver()

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> Deferred[_T]:
        """Run ``coroutine`` on the checks loop; its outcome fires on the reactor."""
        loop = self._loop if self._loop is not None else self.start()
        job: _Job[_T] = _Job(coroutine)
        self._inbox.append(job)
        if not self._inbox_woken:
            self._inbox_woken = True
            loop.call_soon_threadsafe(self._take)
        return job.deferred

    def _take(self) -> None:
        """On the loop: start every job handed over."""
        self._inbox_woken = False
        inbox, loop = self._inbox, asyncio.get_running_loop()
        while inbox:
            job = inbox.popleft()
            if job.cancelled:
                job.coroutine.close()
                continue
            job.task = task = loop.create_task(job.coroutine)
            task.add_done_callback(partial(self._finished, job))
            if job.cancelled:  # cancel() came between the check and the task: it saw
                task.cancel()  # no task to stop, so the work would have run for nothing

    def _finished(self, job: _Job[Any], _: object = None) -> None:
        """On the loop: queue the outcome for the reactor."""
        self._outbox.append(job)
        if not self._outbox_woken:
            self._outbox_woken = True
            reactor: IReactorThreads = self._reactor
            reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        """On the reactor: fire the Deferreds of every finished job."""
        self._outbox_woken = False
        outbox = self._outbox
        while outbox:
            outbox.popleft().fire()

    async def run_cpu(self, fn: Any) -> Any:
        """``fn()`` in the CPU executor (dkimpy's ``CPURunner``); called on the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


class _Job(Generic[_T]):
    """One coroutine handed to the checks loop and the Deferred waiting for it."""

    __slots__ = ("cancelled", "coroutine", "deferred", "task")

    def __init__(self, coroutine: Coroutine[Any, Any, _T]) -> None:
        self.coroutine = coroutine
        self.deferred: Deferred[_T] = Deferred(self.cancel)
        self.task: asyncio.Task[_T] | None = None
        self.cancelled = False

    def cancel(self, _: Deferred[_T]) -> None:
        """The Deferred's canceller (reactor thread): stop the task if it runs."""
        self.cancelled = True
        task = self.task
        if task is not None and not task.get_loop().is_closed():
            task.get_loop().call_soon_threadsafe(task.cancel)

    def fire(self) -> None:
        """On the reactor: the task's outcome to the Deferred."""
        d, task = self.deferred, self.task
        if task is None or d.called:  # cancelled meanwhile
            return
        if task.cancelled():
            d.cancel()
            return
        exc = task.exception()
        if exc is not None:
            d.errback(Failure(exc))
        else:
            d.callback(task.result())


class BridgedResolver:
    """A ``Resolver`` for coroutines on the checks loop over one that lives on the
    reactor.

    ``lookup()`` starts at the call (it returns a future, not a coroutine), so
    ``dkim.fetch_keys`` asks for all keys of a message at once.  Answers the resolver
    holds in its TTL cache (``cached(name, rtype)``, when it has one) come straight
    back without the reactor; everything else is asked on the reactor thread.
    """

    def __init__(self, reactor: Any, resolver: Resolver) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._cached = getattr(resolver, "cached", None)

    def lookup(self, name: str, rtype: str) -> asyncio.Future[Sequence[Record]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Sequence[Record]] = loop.create_future()
        if self._cached is not None:
            try:
                hit = self._cached(name, rtype)
            except Exception as exc:  # a cached NXDOMAIN
                future.set_exception(exc)
                return future
            if hit is not None:
                future.set_result(hit)
                return future
        reactor: IReactorThreads = self._reactor
        reactor.callFromThread(self._ask, name, rtype, loop, future)
        return future

    def _ask(self, name: str, rtype: str, loop: asyncio.AbstractEventLoop,
             future: asyncio.Future[Sequence[Record]]) -> None:
        """On the reactor thread: send the query, hand the answer back to the loop."""

        def answer(result: Any) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, future, result)

        try:
            d: Deferred[Any] = Deferred.fromCoroutine(_awaited(self._resolver.lookup(name, rtype)))
        except Exception:  # a lookup() that raises instead of failing its awaitable
            answer(Failure())
        else:
            d.addBoth(answer)


async def _awaited(awaitable: Awaitable[_T]) -> _T:
    return await awaitable


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # cancelled by a timeout meanwhile
        return
    if isinstance(result, Failure):
        future.set_exception(result.value or Exception("lookup failed"))
    else:
        future.set_result(result)
