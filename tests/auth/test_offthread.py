"""The checks thread (maitred_tx.auth.offthread) on the real reactor: work runs there,
verdicts come back on the reactor thread, DNS misses go to the reactor and cache hits
do not, cancellation and stop reach the thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped,unused-ignore]
from twisted.internet import defer, reactor

from maitred_tx.auth import offthread
from maitred_tx.auth.offthread import BridgedResolver, CheckThread
from maitred_tx.auth.resolver import NXDomain, Record

MAIN = threading.main_thread()


@pytest.fixture
def thread() -> Any:
    t = CheckThread(reactor, name="test-auth")
    yield t
    t.stop()


class Recording:
    """A resolver with a cache of its own: ``cached()`` answers hit.test and raises for
    nx.test; ``lookup()`` answers anything.  Records the thread of every call."""

    def __init__(self) -> None:
        self.cached_on: list[str] = []
        self.lookup_on: list[str] = []

    def cached(self, name: str, rtype: str) -> Sequence[Record] | None:
        self.cached_on.append(threading.current_thread().name)
        if name == "nx.test":
            raise NXDomain("nx.test: no such name (cached)")
        return ["cached answer"] if name == "hit.test" else None

    async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
        self.lookup_on.append(threading.current_thread().name)
        if name == "raise.test":
            raise NXDomain("raise.test: no such name")
        d: defer.Deferred[list[Record]] = defer.Deferred()
        reactor.callLater(0.01, d.callback, [f"{name} {rtype} from the reactor"])
        return await d


@pytest_twisted.ensureDeferred
async def test_work_runs_on_the_checks_thread_and_fires_on_the_reactor(thread) -> None:
    async def where() -> str:
        return threading.current_thread().name

    fired_on = []
    d = (thread.submit(where()))
    d.addCallback(lambda name: fired_on.append(threading.current_thread()) or name)
    assert await d == "test-auth"
    assert fired_on == [MAIN]


@pytest_twisted.ensureDeferred
async def test_an_exception_in_the_thread_is_an_errback(thread) -> None:
    async def broken() -> None:
        raise ValueError("in the checks thread")

    with pytest.raises(ValueError, match="in the checks thread"):
        await (thread.submit(broken()))


@pytest_twisted.ensureDeferred
async def test_cpu_work_runs_in_the_executor_not_the_loop(thread) -> None:
    async def cpu() -> tuple[str, str]:
        inner = await thread.run_cpu(lambda: threading.current_thread().name)
        return threading.current_thread().name, inner

    loop_name, cpu_name = await (thread.submit(cpu()))
    assert loop_name == "test-auth" and cpu_name.startswith("test-auth-cpu")


@pytest_twisted.ensureDeferred
async def test_cache_hits_stay_in_the_thread_and_misses_ask_on_the_reactor(thread) -> None:
    inner = Recording()
    bridged = BridgedResolver(reactor, inner)

    async def ask() -> tuple[Any, ...]:
        hit = await bridged.lookup("hit.test", "TXT")
        miss, other = await asyncio.gather(bridged.lookup("miss.test", "TXT"),
                                           bridged.lookup("other.test", "A"))
        errors = []
        for name in ("nx.test", "raise.test"):
            try:
                await bridged.lookup(name, "TXT")
            except NXDomain as e:
                errors.append(str(e))
        return hit, miss, other, errors

    hit, miss, other, errors = await (thread.submit(ask()))
    assert hit == ["cached answer"]
    assert miss == ["miss.test TXT from the reactor"]
    assert other == ["other.test A from the reactor"]
    assert errors == ["nx.test: no such name (cached)", "raise.test: no such name"]
    assert set(inner.cached_on) == {"test-auth"} and len(inner.cached_on) == 5
    assert inner.lookup_on == [MAIN.name] * 3  # miss, other, raise: not hit, not nx


@pytest_twisted.ensureDeferred
async def test_a_resolver_without_a_cache_is_always_asked_on_the_reactor(thread) -> None:
    class Plain:
        def __init__(self) -> None:
            self.on: list[str] = []

        async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
            self.on.append(threading.current_thread().name)
            return ["x"]

    plain = Plain()
    bridged = BridgedResolver(reactor, plain)

    async def ask() -> Sequence[Record]:
        return await bridged.lookup("a.test", "TXT")

    assert await (thread.submit(ask())) == ["x"]
    assert plain.on == [MAIN.name]


@pytest_twisted.ensureDeferred
async def test_a_lookup_that_raises_at_the_call_fails_its_future(thread) -> None:
    class Raising:
        def lookup(self, name: str, rtype: str) -> Any:
            raise RuntimeError("not even a coroutine")

    bridged = BridgedResolver(reactor, Raising())

    async def ask() -> Sequence[Record]:
        return await asyncio.wait_for(bridged.lookup("a.test", "TXT"), 5)

    with pytest.raises(RuntimeError, match="not even a coroutine"):
        await (thread.submit(ask()))


class Forever:
    """Work that waits for ever, and says whether it began and whether it was cancelled."""

    def __init__(self) -> None:
        self.started, self.cancelled = threading.Event(), threading.Event()

    async def run(self) -> None:
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest_twisted.ensureDeferred
async def test_cancelling_the_deferred_cancels_the_work(thread) -> None:
    work = Forever()
    d = (thread.submit(work.run()))
    while not work.started.is_set():
        await _turn()
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    for _ in range(200):
        if work.cancelled.is_set():
            break
        await _turn()
    assert work.cancelled.is_set()


@pytest_twisted.ensureDeferred
async def test_a_cancel_between_the_check_and_the_task_still_stops_the_work(
    thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reactor's cancel() lands after _take saw the job not cancelled and before its
    task exists: the canceller finds no task to stop, so _take must stop it."""
    work = Forever()
    jobs: list[Any] = []

    class Recorded(offthread._Job):  # type: ignore[type-arg]
        def __init__(self, coroutine: Any) -> None:
            super().__init__(coroutine)
            jobs.append(self)

    monkeypatch.setattr(offthread, "_Job", Recorded)
    loop = thread.start()
    real_create_task = loop.create_task

    def create_task(coroutine: Any, **kwargs: Any) -> Any:
        job = jobs[0]
        job.cancel(job.deferred)  # the Deferred's canceller, at the worst moment
        return real_create_task(coroutine, **kwargs)

    loop.create_task = create_task  # type: ignore[method-assign]
    d = thread.submit(work.run())
    for _ in range(200):
        if d.called:
            break
        await _turn()
    assert not work.started.is_set() or work.cancelled.is_set()  # stopped, or never began
    with pytest.raises(defer.CancelledError):
        await d


def test_stop_joins_the_threads_and_a_new_use_starts_them_again() -> None:
    t = CheckThread(reactor, name="test-stop")
    loop = t.start()
    assert t.start() is loop and t.running
    names = {th.name for th in threading.enumerate()}
    assert "test-stop" in names
    t.stop()
    assert not t.running and loop.is_closed()
    assert "test-stop" not in {th.name for th in threading.enumerate()}
    t.stop()  # twice is harmless

    async def one() -> int:
        return 1

    assert not t.running
    d = t.submit(one())  # lazily started again
    assert t.running
    t.stop()
    assert d.called  # fired with 1, or cancelled: never left waiting
    d.addErrback(lambda f: f.trap(defer.CancelledError))


def test_stop_cancels_the_work_still_running() -> None:
    t = CheckThread(reactor, name="test-stop-running")
    work = Forever()
    d = t.submit(work.run())
    assert work.started.wait(5)
    t.stop()
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(defer.CancelledError)
    assert work.cancelled.is_set()


async def _turn() -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.005, d.callback, None)
    await d
