"""The TLS report's counts across restarts (``TlsReportSender(state_path=...)``), with
real files in tmp_path, a ``task.Clock`` and a thread pool that runs writes at once:
counts survive a restart and reach the next report with their original start; the file
is written only when they changed; a corrupt file is ignored with a warning; midnight
replaces the file by the new day; a shutdown over midnight sends the report later."""

from __future__ import annotations

import email
import gzip
import json
import random
from email.policy import default
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from maitred_tx.auth.resolver import ZoneResolver
from maitred_tx.mta_sts.cache import REPORT_STATE_FILE, PolicyCache
from maitred_tx.mta_sts.report import ResultType, TlsReport, dump_state, load_state
from maitred_tx.mta_sts.store import PolicyStore
from maitred_tx.mta_sts.tlsrpt import GZIP_MEDIA_TYPE
from maitred_tx.relay.reports import TlsReportSender

MIDNIGHT = 1796601600.0  # 2026-12-07 00:00:00 UTC
ZONE = {("_smtp._tls.example.net", "TXT"): ["v=TLSRPTv1; rua=mailto:r@example.net"]}


class _Pool:
    """A thread pool that runs each call at once and notes what it ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kw: Any) -> None:
        self.calls.append(f.__name__)
        try:
            result = f(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class _Reactor(task.Clock):
    """``task.Clock`` with the thread-pool half of a reactor (``deferToThreadPool``)."""

    def __init__(self, now: float) -> None:
        super().__init__()
        self.pool = _Pool()
        self.advance(now)

    def getThreadPool(self) -> _Pool:
        return self.pool

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class _NoFetch:
    async def fetch(self, domain: str) -> Any:
        raise AssertionError("no fetch in these tests")


class _Process:
    """One run of the relay's MTA-STS half: a PolicyStore caching in ``directory`` and
    its TlsReportSender keeping the counts there, as ``relay.options`` builds them."""

    def __init__(self, reactor: _Reactor, directory: Path, *, persist: bool = True) -> None:
        self.queued: list[tuple[Any, bytes]] = []
        self.store = PolicyStore(reactor, ZoneResolver({}), _NoFetch(), cache_dir=directory)
        self.sender = TlsReportSender(
            reactor, self.store.report, ZoneResolver(ZONE), self._submit, organization="Org",
            contact="postmaster@sender.test", rng=random.Random(7),
            state_path=directory / REPORT_STATE_FILE if persist else None)
        self.sender.startService()

    async def _submit(self, envelope: Any, data: bytes) -> str:
        self.queued.append((envelope, data))
        return "Q1"

    def fail(self, domain: str = "example.net") -> None:
        self.store.report_failure(domain, f"mx.{domain}", ResultType.CERTIFICATE_EXPIRED)

    def reports(self) -> list[dict[str, Any]]:
        out = []
        for _, data in self.queued:
            message = email.message_from_bytes(data, policy=default)
            [part] = [p for p in message.iter_parts() if p.get_content_type() == GZIP_MEDIA_TYPE]
            out.append(json.loads(gzip.decompress(part.get_content())))
        return out


DELAY = random.Random(7).uniform(0, 3600)  # the sender's first random delay


def _failures(rendered: dict[str, Any]) -> int:
    return sum(p["summary"]["total-failure-session-count"] for p in rendered["policies"])


def test_counts_survive_a_restart_and_keep_their_start(tmp_path: Path) -> None:
    reactor = _Reactor(MIDNIGHT - 7200)  # 22:00 UTC
    first = _Process(reactor, tmp_path)
    first.fail()
    reactor.advance(300)
    first.fail()
    d = first.sender.stopService()  # a deploy: the counts so far are written
    assert d is not None and d.called
    reactor.advance(1800)  # down for half an hour
    second = _Process(reactor, tmp_path)
    assert second.store.report.failures("example.net") != {}
    assert second.sender.counting_since == MIDNIGHT - 7200
    second.fail()
    reactor.advance(MIDNIGHT - reactor.seconds())
    reactor.advance(DELAY)
    [rendered] = second.reports()
    assert rendered["date-range"] == {"start-datetime": "2026-12-06T22:00:00Z",
                                      "end-datetime": "2026-12-06T23:59:59Z"}
    assert _failures(rendered) == 3
    second.sender.stopService()


def test_a_crash_keeps_the_counts_of_the_last_write(tmp_path: Path) -> None:
    reactor = _Reactor(MIDNIGHT - 7200)
    first = _Process(reactor, tmp_path)
    first.fail()
    first.fail()
    assert not (tmp_path / REPORT_STATE_FILE).exists()
    reactor.advance(300)  # written: two failures since 22:00
    first.fail()  # lost with the crash (no stopService)
    saved, since = load_state((tmp_path / REPORT_STATE_FILE).read_bytes())
    assert since == MIDNIGHT - 7200
    assert list(saved.failures("example.net").values()) == [2]
    assert list(first.store.report.failures("example.net").values()) == [3]
    second = _Process(_Reactor(reactor.seconds() + 60), tmp_path)
    [count] = second.store.report.failures("example.net").values()
    assert count == 2


def test_the_file_is_written_only_when_the_counts_changed(tmp_path: Path) -> None:
    reactor = _Reactor(MIDNIGHT - 7200)
    process = _Process(reactor, tmp_path)
    reactor.advance(300)
    assert reactor.pool.calls == []  # nothing counted: nothing written
    process.fail()
    reactor.advance(300)
    assert reactor.pool.calls == ["write_atomically"]
    reactor.advance(300 * 3)
    assert reactor.pool.calls == ["write_atomically"]  # unchanged: not rewritten
    process.fail()
    reactor.advance(300)
    assert reactor.pool.calls == ["write_atomically"] * 2
    assert process.sender.stopService() is None  # saved already
    assert reactor.pool.calls == ["write_atomically"] * 2


def test_restored_counts_are_not_rewritten_unchanged(tmp_path: Path) -> None:
    reactor = _Reactor(MIDNIGHT - 7200)
    first = _Process(reactor, tmp_path)
    first.fail()
    first.sender.stopService()
    reactor.pool.calls.clear()
    second = _Process(reactor, tmp_path)
    reactor.advance(900)
    assert second.sender.stopService() is None
    assert reactor.pool.calls == []


@pytest.mark.parametrize("content", [
    b"{not json", b"\x00" * 10, json.dumps({"version": 2}).encode(),
    json.dumps({"version": 1, "since": 0, "sessions": [{"domain": 1}]}).encode(),
])
def test_a_corrupt_file_is_ignored_with_a_warning(tmp_path: Path, content: bytes) -> None:
    (tmp_path / REPORT_STATE_FILE).write_bytes(content)
    reactor = _Reactor(MIDNIGHT - 7200)
    with capturedLogs() as events:
        process = _Process(reactor, tmp_path)
    assert process.sender.running
    assert process.store.report.domains() == []
    [warning] = [e for e in events if e["log_level"] is LogLevel.warn]
    assert "ignoring the saved counts" in warning["log_format"]
    assert warning["path"] == str(tmp_path / REPORT_STATE_FILE)
    # the policy cache beside it does not take it for a policy either
    assert not any("MTA-STS cache" in str(e.get("message", "")) for e in events)
    process.fail()
    reactor.advance(300)  # and the next write replaces it
    assert load_state((tmp_path / REPORT_STATE_FILE).read_bytes())[0].domains() == [
        "example.net"]


def test_an_unreadable_file_is_ignored_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / REPORT_STATE_FILE).mkdir()  # read() fails with an OSError
    with capturedLogs() as events:
        process = _Process(_Reactor(MIDNIGHT - 7200), tmp_path)
    assert process.sender.running
    assert any(e["log_level"] is LogLevel.warn and "ignoring" in e["log_format"]
               for e in events)


def test_midnight_replaces_the_file_with_the_new_day(tmp_path: Path) -> None:
    reactor = _Reactor(MIDNIGHT - 7200)
    first = _Process(reactor, tmp_path)
    first.fail()
    reactor.advance(7200)  # 00:00: taken, and the file says so
    saved, since = load_state((tmp_path / REPORT_STATE_FILE).read_bytes())
    assert (saved.domains(), since) == ([], MIDNIGHT)
    first.fail()  # the new day's
    first.sender.stopService()  # restarted after midnight, before the report went out
    second = _Process(reactor, tmp_path)
    [count] = second.store.report.failures("example.net").values()
    assert count == 1  # yesterday's is not counted (nor sent) again
    reactor.advance(86400)
    reactor.advance(DELAY)
    [rendered] = second.reports()
    assert rendered["date-range"]["start-datetime"] == "2026-12-07T00:00:00Z"
    assert _failures(rendered) == 1
    assert first.queued == []  # stopped before its delay ran out: that report is lost


def test_counts_of_an_earlier_day_are_sent_after_the_delay(tmp_path: Path) -> None:
    reactor = _Reactor(MIDNIGHT - 7200)
    first = _Process(reactor, tmp_path)
    first.fail()
    first.fail()
    first.sender.stopService()
    reactor.advance(7200 + 8 * 3600)  # down over midnight, back at 08:00
    with capturedLogs() as events:
        second = _Process(reactor, tmp_path)
    assert second.store.report.domains() == []
    assert any("shutdown over midnight" in e["log_format"] for e in events)
    saved, since = load_state((tmp_path / REPORT_STATE_FILE).read_bytes())
    assert (saved.domains(), since) == ([], MIDNIGHT + 8 * 3600)  # not sent twice
    reactor.advance(DELAY)
    [rendered] = second.reports()
    assert rendered["date-range"] == {"start-datetime": "2026-12-06T22:00:00Z",
                                      "end-datetime": "2026-12-06T23:59:59Z"}
    assert _failures(rendered) == 2
    second.sender.stopService()


def test_nothing_is_written_without_a_state_path(tmp_path: Path) -> None:
    reactor = _Reactor(MIDNIGHT - 7200)
    process = _Process(reactor, tmp_path, persist=False)
    process.fail()
    reactor.advance(7200 + 3600)
    process.fail()
    assert process.sender.stopService() is None
    assert reactor.pool.calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_write_is_logged_and_tried_again(tmp_path: Path) -> None:
    reactor = _Reactor(MIDNIGHT - 7200)
    directory = tmp_path / "gone"
    process = _Process(reactor, directory)
    process.fail()
    directory.rmdir()
    with capturedLogs() as events:
        reactor.advance(300)
    assert any(e["log_level"] is LogLevel.error for e in events)
    directory.mkdir()
    reactor.advance(300)  # unchanged since, but the last write failed: tried again
    assert list(load_state((directory / REPORT_STATE_FILE).read_bytes())[0].failures(
        "example.net").values()) == [1]
    assert process.sender.stopService() is None


def test_the_policy_cache_skips_the_report_file(tmp_path: Path) -> None:
    (tmp_path / REPORT_STATE_FILE).write_bytes(dump_state(TlsReport(), MIDNIGHT))
    problems: list[str] = []
    cache = PolicyCache(tmp_path, lambda: MIDNIGHT, problems.append)
    assert (problems, len(cache)) == ([], 0)
