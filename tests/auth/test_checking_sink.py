"""CheckingSink on the real reactor: how a checked message reaches the delivery's sink."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped,unused-ignore]
from twisted.internet import reactor
from twisted.logger import capturedLogs

from maitred_tx.auth.checks import AuthChecker
from maitred_tx.auth.resolver import NXDomain, Record
from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.outcomes import Accepted
from maitred_tx.smtp.address import plain_mailbox
from maitred_tx.smtp.config import AuthChecks
from maitred_tx.smtp.params import NO_MAIL_PARAMS

MESSAGE = b"From: a@sender.test\r\nSubject: hi\r\n\r\nbody\r\n"


class NoRecords:
    """Every name exists with no records: SPF none, DMARC none, nothing raises."""

    async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
        raise NXDomain(f"{name}: no such name")


class BrokenSPF:
    """A resolver bug on SPF's lookups only (DMARC's _dmarc names work): the SPF
    evaluation raises something no resolver should, the rest of the checks run."""

    async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
        if name.startswith("_dmarc."):
            raise NXDomain(f"{name}: no such name")
        raise KeyError("resolver bug")


class AsyncCloseSink:
    """A delivery sink whose close() is a coroutine (async def), which deliveries may be."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    async def close(self) -> Accepted:
        return Accepted("stored")

    def abort(self) -> None:
        raise AssertionError("not aborted")


def envelope() -> Envelope:
    context = SessionContext("S1", "mx.test", "192.0.2.7", 40000, helo="client.test",
                             esmtp=True)
    return Envelope(context, "M1", plain_mailbox("a", "sender.test"), NO_MAIL_PARAMS,
                    (Recipient(plain_mailbox("user", "mx.test")),))


@pytest.fixture
def checker_for() -> Any:
    made: list[AuthChecker] = []

    def make(resolver: Any) -> AuthChecker:
        checker = AuthChecker(reactor, resolver)
        checker.start()
        made.append(checker)
        return checker

    yield make
    for checker in made:
        checker.stop()


async def deliver(checker: AuthChecker, sink: Any) -> Any:
    checking = checker.sink(envelope(), AuthChecks(), lambda env: sink, 65536)
    checking.write(MESSAGE)
    return await checking.close()


@pytest_twisted.ensureDeferred
async def test_a_sink_with_an_async_close_gets_its_outcome_awaited(checker_for) -> None:
    """The small-message fast path closes the sink itself: a coroutine from close()
    must be awaited (the delivery's outcome), not handed on as the outcome."""
    sink = AsyncCloseSink()
    outcome = await deliver(checker_for(NoRecords()), sink)
    assert outcome == Accepted("stored")
    stored = b"".join(sink.data)
    assert stored.startswith(b"Authentication-Results: mx.test;") and stored.endswith(MESSAGE)


@pytest_twisted.ensureDeferred
async def test_a_bug_in_spf_is_logged_with_its_traceback(checker_for) -> None:
    sink = AsyncCloseSink()
    with capturedLogs() as events:
        outcome = await deliver(checker_for(BrokenSPF()), sink)
    assert outcome == Accepted("stored")  # temperror is recorded, the mail delivered
    assert b"spf=temperror" in b"".join(sink.data)
    [logged] = [e for e in events if "SPF check failed" in e.get("log_format", "")]
    assert "Traceback" in logged["error"] and "KeyError: 'resolver bug'" in logged["error"]
    assert logged["message_id"] == "M1"


def test_with_auth_is_replace_field_by_field() -> None:
    """Envelope.with_auth names every field: one added later and not copied there would
    be lost for every checked message, so each gets a value of its own here."""
    import dataclasses

    values: dict[str, Any] = {f.name: object() for f in dataclasses.fields(Envelope)}
    before = Envelope(**values)
    auth = object()
    after = before.with_auth(auth)
    assert after == dataclasses.replace(before, auth=auth)
    assert all(getattr(after, f.name) is getattr(before, f.name)
               for f in dataclasses.fields(Envelope) if f.name != "auth")


@pytest_twisted.ensureDeferred
async def test_a_bug_in_the_verdict_cache_falls_back_to_the_checks_thread(checker_for) -> None:
    """The cache's path runs on the reactor thread before any hand-over: an exception
    there is logged and the message is checked the usual way, not refused."""
    checker = checker_for(NoRecords())
    checker._expiring = object()  # as if the resolver said when answers expire

    def broken(*args: Any) -> Any:
        raise KeyError("cache bug")

    checker.cached_verdict = broken  # type: ignore[method-assign]
    sink = AsyncCloseSink()
    with capturedLogs() as events:
        outcome = await deliver(checker, sink)
    assert outcome == Accepted("stored")
    assert b"".join(sink.data).startswith(b"Authentication-Results: mx.test;")
    assert any("verdict cache failed" in e.get("log_format", "") for e in events)
