"""ThreadedQueue: every store call runs in the given thread pool, never on the reactor
thread, and its result comes back as a Deferred; log_recovery's events."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import capturedLogs
from twisted.python.threadpool import ThreadPool

from maitred_tx.queue.spool import RecoveryReport, SpoolStore
from maitred_tx.queue.store import (
    AttemptResult,
    QueuedRecipient,
    QueueEnvelope,
    QueueReply,
    RecipientState,
)
from maitred_tx.queue.threaded import ThreadedQueue, log_recovery

T0 = 1_700_000_000.0


class Watched:
    """A SpoolStore that notes the thread of every call."""

    def __init__(self, store: SpoolStore) -> None:
        self._store = store
        self.threads: dict[str, set[int]] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.threads.setdefault(name, set()).add(threading.get_ident())
            return method(*args, **kwargs)

        return call


@pytest.fixture
def pool() -> Any:
    p = ThreadPool(1, 2, name="queue-test")
    p.start()
    yield p
    p.stop()


@pytest_twisted.ensureDeferred
async def test_every_call_runs_in_the_pool(tmp_path: Path, pool: ThreadPool) -> None:
    spool = SpoolStore(tmp_path / "spool")
    spool.recover()
    watched = Watched(spool)
    queue = ThreadedQueue(watched, reactor, pool)  # type: ignore[arg-type]
    envelope = QueueEnvelope("a@origin.test", (QueuedRecipient("b@x.test"),), received_at=T0)
    message_id = await queue.add(envelope, [b"Subject: t\r\n\r\nbody\r\n"])
    assert await queue.due(T0) == [message_id]
    assert await queue.next_due() == T0
    loaded = await queue.load(message_id)
    assert loaded is not None and loaded.sender == "a@origin.test"
    body = await queue.open_body(message_id)
    assert body is not None
    with body:
        assert body.read() == b"Subject: t\r\n\r\nbody\r\n"
    failed = AttemptResult("b@x.test", RecipientState.FAILED, QueueReply(550, "5.1.1", "no"))
    after = await queue.record_attempt(message_id, [failed], T0 + 1)
    assert after is not None and after.recipients[0].state is RecipientState.FAILED
    settled = await queue.record_notified(message_id, ["b@x.test"])
    assert settled is not None and settled.done
    await queue.remove(message_id)
    assert await queue.load(message_id) is None
    other = await queue.add(envelope, [b"x\r\n"])
    assert await queue.hold(other)
    assert await queue.flush() == 1
    assert not await queue.consume_flush()
    assert await queue.delete(other)
    writer = await queue.create(b"Received: x\r\n")
    writer.write(b"body\r\n")
    committed = await queue.commit(writer, envelope)
    assert committed.size == len(b"Received: x\r\nbody\r\n")
    aborted = await queue.create()
    await queue.abort(aborted)
    reactor_thread = threading.get_ident()  # the test runs on the reactor thread
    used = set().union(*watched.threads.values())
    assert reactor_thread not in used
    assert {"add", "due", "next_due", "load", "open_body", "record_attempt",
            "record_notified", "remove", "hold", "flush", "consume_flush", "delete",
            "create"} <= set(watched.threads)
    spool.close()


def test_log_recovery() -> None:
    report = RecoveryReport(loaded=3, seconds=0.25, removed_tmp=["t"],
                            removed_orphans=["o1", "o2"],
                            quarantined=[("x.json", "not JSON")], errors=["y: EIO"])
    with capturedLogs() as events:
        log_recovery("/var/spool/maitred", report)
    texts = [(e["log_level"].name, e["log_format"].format(**e)) for e in events]
    assert texts == [
        ("info", "queue /var/spool/maitred: 3 messages in 0.250s; removed 1 tmp files, "
                 "2 bodies that never got their 250, 0 finished messages"),
        ("warn", "queue /var/spool/maitred: x.json moved to corrupt/: not JSON"),
        ("error", "queue /var/spool/maitred: y: EIO"),
    ]
