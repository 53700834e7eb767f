"""The RFC 8461 3 / 5.1 flow through PolicyStore, with both real peers: dnsmasq on
loopback for the ``_mta-sts`` TXT records and the HTTPS policy server with a test CA.

Two dnsmasq instances stand for the DNS before and after the domain owners changed
their records: a store built on ``dns_later`` over the same cache directory is the
sending MTA after a restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from dnsmasq_support import Dnsmasq, free_udp_port, run_dnsmasq
from mta_sts_support import CA, GOOD_POLICY, PolicyServer, make_fetcher, policy_handler
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.web import server

from maitred_tx.auth.dns import TwistedResolver
from maitred_tx.auth.resolver import NXDomain, TemporaryDNSError
from maitred_tx.mta_sts import PolicyStore, check_mx, filter_mx
from maitred_tx.mta_sts.fetch import FetchError, PolicyFetcher
from maitred_tx.mta_sts.policy import Mode, Policy, parse_policy
from maitred_tx.mta_sts.report import FailureDetail, ResultType

GOOD = parse_policy(GOOD_POLICY)
POLICY_A = "version: STSv1\nmode: testing\nmx: a.example.test\nmax_age: 3600\n"
POLICY_B = "version: STSv1\nmode: enforce\nmx: *.b.example.test\nmax_age: 7200\n"


def txt(name: str, text: str) -> str:
    return f"--txt-record=_mta-sts.{name},{text}"


@pytest.fixture(scope="module")
def dns_now(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    yield from run_dnsmasq(tmp_path_factory.mktemp("dns-now"), [
        txt("example.test", "v=STSv1; id=20160831085700Z;"),
        txt("two.example.test", "v=STSv1; id=one"),
        txt("two.example.test", "v=STSv1; id=two"),
        txt("other.example.test", "v=spf1 -all"),
        txt("other.example.test", "v=STSv1; id=other1; ext=1"),
        txt("bad.example.test", "v=STSv1; id=not-an-id"),
        txt("gone.example.test", "v=STSv1; id=gone1"),
        txt("later.example.test", "v=STSv1; id=old"),
        txt("missing.example.test", "v=STSv1; id=m1"),
        txt("wrongname.example.test", "v=STSv1; id=w1"),
        txt("slow.example.test", "v=STSv1; id=s1"),
    ])


@pytest.fixture(scope="module")
def dns_later(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    yield from run_dnsmasq(tmp_path_factory.mktemp("dns-later"), [
        txt("example.test", "v=STSv1; id=20160831085700Z;"),  # unchanged
        txt("later.example.test", "v=STSv1; id=new"),  # a new policy was published
        # gone.example.test: the record was removed
    ])


def delayed(text: str, seconds: float) -> Callable[[server.Request], Any]:
    def handle(request: server.Request) -> Any:
        request.setHeader(b"content-type", b"text/plain")

        def finish() -> None:
            request.write(text.encode())
            request.finish()

        reactor.callLater(seconds, finish)  # type: ignore[attr-defined]
        return server.NOT_DONE_YET

    return handle


@pytest.fixture
def https(start_server: Callable[..., PolicyServer]) -> PolicyServer:
    return start_server({
        "mta-sts.example.test": policy_handler(GOOD_POLICY),
        "mta-sts.other.example.test": policy_handler(GOOD_POLICY),
        "mta-sts.gone.example.test": policy_handler(POLICY_A),
        "mta-sts.later.example.test": policy_handler(POLICY_A),
        "mta-sts.wrongname.example.test": policy_handler(GOOD_POLICY),  # not in the cert
        "mta-sts.slow.example.test": delayed(GOOD_POLICY, 0.2),
        "mta-sts.two.example.test": policy_handler(GOOD_POLICY),
        "mta-sts.bad.example.test": policy_handler(GOOD_POLICY),
    })


@pytest.fixture
def make_store(ca: CA, https: PolicyServer, tmp_path: Path) -> Callable[..., PolicyStore]:
    """``make_store(dns, **kw)``: a store asking ``dns`` and ``https``, caching in
    tmp_path/cache unless ``cache_dir`` is given."""

    def make(dns: Dnsmasq | TwistedResolver, **kw: Any) -> PolicyStore:
        resolver = dns.resolver() if isinstance(dns, Dnsmasq) else dns
        kw.setdefault("cache_dir", tmp_path / "cache")
        return PolicyStore(reactor, resolver, make_fetcher(reactor, ca, https), **kw)

    return make


def clock_at(seconds: float) -> task.Clock:
    clock = task.Clock()
    clock.advance(seconds)
    return clock


# ---------------------------------------------------------------- discovery


@pytest_twisted.ensureDeferred
async def test_policy_is_fetched_cached_and_survives_a_restart(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq,
    dns_later: Dnsmasq, tmp_path: Path,
) -> None:
    store = make_store(dns_now)
    assert await store.policy_for("Example.TEST.") == GOOD
    assert https.requests == {"mta-sts.example.test": 1}
    assert (tmp_path / "cache" / "example.test.json").is_file()
    entry = store.cached("example.test")
    assert entry is not None and entry.policy_id == "20160831085700Z"
    assert await store.policy_for("example.test") == GOOD  # same id: no fetch
    assert https.requests == {"mta-sts.example.test": 1}
    restarted = make_store(dns_later)  # a new process: memory empty, same directory
    assert await restarted.policy_for("example.test") == GOOD
    assert https.requests == {"mta-sts.example.test": 1}
    assert await dns_later.count("TXT", "_mta-sts.example.test") == 1  # it did look


@pytest_twisted.ensureDeferred
async def test_no_record_means_no_policy(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq
) -> None:
    store = make_store(dns_now)
    assert await store.policy_for("none.example.test") is None
    assert await dns_now.count("TXT", "_mta-sts.none.example.test") == 1
    assert https.requests == {}
    assert store.cached("none.example.test") is None


@pytest_twisted.ensureDeferred
async def test_two_or_broken_records_mean_no_policy(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq
) -> None:
    store = make_store(dns_now)
    with capturedLogs() as events:
        assert await store.policy_for("two.example.test") is None
        assert await store.policy_for("bad.example.test") is None
    assert https.requests == {}
    logged = [e["log_format"].format(**e) for e in events]
    assert any("two.example.test: TXT record ignored: 2 v=STSv1" in m for m in logged), logged
    assert any("bad.example.test: TXT record ignored" in m for m in logged), logged
    # other TXT records beside the one STSv1 record do not matter
    assert await store.policy_for("other.example.test") == GOOD
    assert store.cached("other.example.test").policy_id == "other1"  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_id_change_fetches_the_new_policy(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq,
    dns_later: Dnsmasq,
) -> None:
    assert await make_store(dns_now).policy_for("later.example.test") == parse_policy(POLICY_A)
    https.handlers["mta-sts.later.example.test"] = policy_handler(POLICY_B)
    store = make_store(dns_later)
    assert await store.policy_for("later.example.test") == parse_policy(POLICY_B)
    assert https.requests["mta-sts.later.example.test"] == 2
    entry = store.cached("later.example.test")
    assert entry is not None and entry.policy_id == "new"
    assert await make_store(dns_later).policy_for("later.example.test") == parse_policy(POLICY_B)
    assert https.requests["mta-sts.later.example.test"] == 2  # persisted with its new id


@pytest_twisted.ensureDeferred
async def test_failed_fetch_keeps_the_cached_policy_and_backs_off(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq,
    dns_later: Dnsmasq,
) -> None:
    await make_store(dns_now).policy_for("later.example.test")
    del https.handlers["mta-sts.later.example.test"]  # the new policy is not served: 404
    clock = clock_at(time.time())
    store = make_store(dns_later, clock=clock.seconds, retry_after=300)
    assert await store.policy_for("later.example.test") == parse_policy(POLICY_A)
    assert https.requests["mta-sts.later.example.test"] == 2
    assert store.cached("later.example.test").policy_id == "old"  # type: ignore[union-attr]
    (detail,) = store.report.failures("later.example.test")
    assert detail.result_type is ResultType.STS_POLICY_FETCH_ERROR
    assert "HTTP status 404" in (detail.reason or "")
    clock.advance(299)  # within retry_after: no new attempt
    assert await store.policy_for("later.example.test") == parse_policy(POLICY_A)
    assert https.requests["mta-sts.later.example.test"] == 2
    https.handlers["mta-sts.later.example.test"] = policy_handler(POLICY_B)
    clock.advance(1)
    assert await store.policy_for("later.example.test") == parse_policy(POLICY_B)
    assert https.requests["mta-sts.later.example.test"] == 3


@pytest_twisted.ensureDeferred
async def test_removed_record_keeps_the_cached_policy_until_max_age(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq,
    dns_later: Dnsmasq,
) -> None:
    clock = clock_at(1_000_000)
    assert await make_store(dns_now, clock=clock.seconds).policy_for("gone.example.test")
    store = make_store(dns_later, clock=clock.seconds)
    clock.advance(3599)
    assert await store.policy_for("gone.example.test") == parse_policy(POLICY_A)
    clock.advance(1)  # max_age 3600 has passed: discarded
    assert await store.policy_for("gone.example.test") is None
    assert https.requests["mta-sts.gone.example.test"] == 1


@pytest_twisted.ensureDeferred
async def test_max_age_expiry_refetches(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq
) -> None:
    clock = clock_at(1_000_000)
    store = make_store(dns_now, clock=clock.seconds, refresh_after=None)
    await store.policy_for("later.example.test")
    clock.advance(3599)
    await store.policy_for("later.example.test")
    assert https.requests["mta-sts.later.example.test"] == 1
    clock.advance(1)
    assert await store.policy_for("later.example.test") == parse_policy(POLICY_A)
    assert https.requests["mta-sts.later.example.test"] == 2
    entry = store.cached("later.example.test")
    assert entry is not None and entry.fetched_at == 1_003_600


@pytest_twisted.ensureDeferred
async def test_refresh_after_refetches_the_same_id(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq
) -> None:
    clock = clock_at(1_000_000)
    store = make_store(dns_now, clock=clock.seconds, refresh_after=600)
    await store.policy_for("example.test")
    clock.advance(599)
    await store.refresh_cached()
    assert https.requests["mta-sts.example.test"] == 1
    clock.advance(1)
    await store.refresh_cached()  # 3.3: refresh before expiry, extending the lifetime
    assert https.requests["mta-sts.example.test"] == 2
    assert store.cached("example.test").fetched_at == 1_000_600  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_one_day_policy_is_refreshed_before_it_expires(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq
) -> None:
    """max_age 86400 and the default refresh_after of a day: an hourly refresh_cached()
    refetches it half-way, so that an HTTPS outage at the 24th hour still finds it."""
    clock = clock_at(1_000_000)
    store = make_store(dns_now, clock=clock.seconds)
    assert await store.policy_for("example.test") == GOOD  # max_age 86400
    for _ in range(23):
        clock.advance(3600)
        await store.refresh_cached()
    assert https.requests["mta-sts.example.test"] == 2  # at the 12th hour
    assert store.cached("example.test").fetched_at == 1_043_200  # type: ignore[union-attr]
    del https.handlers["mta-sts.example.test"]  # the policy host is down (404)
    clock.advance(3600)
    assert await store.policy_for("example.test") == GOOD  # still within its max_age


@pytest_twisted.ensureDeferred
async def test_bad_certificate_caches_nothing(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq,
    tmp_path: Path,
) -> None:
    store = make_store(dns_now)
    assert await store.policy_for("wrongname.example.test") is None
    assert store.cached("wrongname.example.test") is None
    assert not (tmp_path / "cache" / "wrongname.example.test.json").exists()
    assert https.requests == {}
    report = store.report.render(
        "wrongname.example.test", organization="o", contact="c", report_id="r",
        start=datetime(2024, 1, 1, tzinfo=UTC), end=datetime(2024, 1, 2, tzinfo=UTC),
    )
    (entry,) = report["policies"]  # type: ignore[misc]
    assert entry["policy"]["policy-type"] == "no-policy-found"
    assert entry["failure-details"][0]["result-type"] == "sts-webpki-invalid"


@pytest_twisted.ensureDeferred
async def test_concurrent_calls_share_one_discovery(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq
) -> None:
    store = make_store(dns_now)
    calls = [Deferred.fromCoroutine(store.policy_for("slow.example.test")) for _ in range(5)]
    assert await gatherResults(calls) == [GOOD] * 5
    assert https.requests["mta-sts.slow.example.test"] == 1


@pytest_twisted.ensureDeferred
async def test_dns_failure_falls_back_to_the_cache(
    make_store: Callable[..., PolicyStore], dns_now: Dnsmasq
) -> None:
    await make_store(dns_now).policy_for("example.test")
    dead = TwistedResolver(reactor, [("127.0.0.1", free_udp_port())], timeout=0.3)
    assert await make_store(dead).policy_for("example.test") == GOOD
    assert await make_store(dead).policy_for("other.example.test") is None


@pytest_twisted.ensureDeferred
async def test_names_that_cannot_have_a_policy(
    make_store: Callable[..., PolicyStore], dns_now: Dnsmasq
) -> None:
    store = make_store(dns_now)
    for name in ("[192.0.2.1]", "", "a..example.test", "x" * 300):
        assert await store.policy_for(name) is None


@pytest_twisted.ensureDeferred
async def test_corrupt_cache_file_is_logged_and_replaced(
    make_store: Callable[..., PolicyStore], https: PolicyServer, dns_now: Dnsmasq,
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "example.test.json").write_bytes(b'{"format": 1, "domain": "example.te')
    with capturedLogs() as events:
        store = make_store(dns_now)
    (event,) = events
    assert event["log_level"].name == "warn"
    assert "ignoring MTA-STS cache file" in event["message"]
    assert "example.test.json" in event["message"]
    assert await store.policy_for("example.test") == GOOD
    assert https.requests == {"mta-sts.example.test": 1}
    assert make_store(dns_now).cached("example.test") is not None  # rewritten whole


# ---------------------------------------------------------------- sending with it


@pytest_twisted.ensureDeferred
async def test_enforcement_and_reports_with_the_fetched_policy(
    make_store: Callable[..., PolicyStore], dns_now: Dnsmasq
) -> None:
    store = make_store(dns_now)
    policy = await store.policy_for("example.test")
    assert policy is not None and policy.mode is Mode.ENFORCE
    mx = await dns_now.resolver().lookup("example.test", "MX")  # none published: implicit
    assert mx == []
    allowed, refused = filter_mx(policy, ["mx1.example.test", "mx.attacker.test"])
    assert (allowed, refused) == (["mx1.example.test"], ["mx.attacker.test"])
    assert check_mx(policy, "mx1.example.test").tls_required
    store.report_success("example.test")
    store.report_failure("example.test", "mx1.example.test",
                         ResultType.CERTIFICATE_EXPIRED, receiving_ip="192.0.2.25")
    assert store.report.failures("example.test") == {
        FailureDetail(ResultType.CERTIFICATE_EXPIRED, "mx1.example.test",
                      receiving_ip="192.0.2.25"): 1
    }
    assert store.report.domains() == ["example.test"]


def test_defaults_platform_trust_and_reactor_clock() -> None:
    store = PolicyStore(reactor, TwistedResolver(reactor, [("127.0.0.1", 53)]))
    assert isinstance(store._fetcher, PolicyFetcher)
    assert store._clock == reactor.seconds  # type: ignore[attr-defined]
    assert store.cached("example.test") is None  # memory only: nothing loaded


# ------------------------------------------- failed refreshes (RFC 8461 3.3, 6, 10.2)

ENFORCE_1 = "version: STSv1\nmode: enforce\nmx: mx.r.example.test\nmax_age: 86400\n"
NONE_1 = "version: STSv1\nmode: none\nmax_age: 86400\n"


class _Zone:
    """``_mta-sts`` TXT records that a test changes as it goes: absent is NXDOMAIN,
    ``TemporaryDNSError`` a failed lookup."""

    def __init__(self) -> None:
        self.txt: dict[str, list[str] | Exception] = {}

    async def lookup(self, name: str, rtype: str) -> list[str]:
        answer = self.txt.get(name, NXDomain(name))
        if isinstance(answer, Exception):
            raise answer
        return answer


class _Fetcher:
    """Serves ``policies[domain]`` (text), or fails when there is none."""

    def __init__(self) -> None:
        self.policies: dict[str, str] = {}
        self.fetches = 0

    async def fetch(self, domain: str) -> Policy:
        self.fetches += 1
        if domain not in self.policies:
            raise FetchError(domain, "HTTP status 404", ResultType.STS_POLICY_FETCH_ERROR)
        return parse_policy(self.policies[domain])


def _stub_store(clock: task.Clock, **kw: Any) -> tuple[PolicyStore, _Zone, _Fetcher]:
    zone, fetcher = _Zone(), _Fetcher()
    return PolicyStore(clock, zone, fetcher, clock=clock.seconds, **kw), zone, fetcher


def _warnings(events: list[Any], domain: str) -> list[str]:
    return [formatEvent(e) for e in events
            if e["log_level"] is LogLevel.warn and domain in formatEvent(e)]


@pytest_twisted.ensureDeferred
async def test_rfc8461_3_3_refresh_failure_of_a_none_policy_is_no_alarm() -> None:
    """3.3: alert administrators when a refresh fails, "unless the cached policy mode
    is none" (8.3: how a domain withdraws its policy); the failure is still counted
    for TLS-RPT, as 6 asks for HTTPS fetch failures under a valid TXT record."""
    clock = clock_at(1_000_000)
    store, zone, fetcher = _stub_store(clock)
    for domain, text in (("e.example.test", ENFORCE_1), ("n.example.test", NONE_1)):
        zone.txt[f"_mta-sts.{domain}"] = ["v=STSv1; id=one"]
        fetcher.policies[domain] = text
        assert await store.policy_for(domain) == parse_policy(text)
        zone.txt[f"_mta-sts.{domain}"] = ["v=STSv1; id=two"]  # a new policy ...
        del fetcher.policies[domain]  # ... that cannot be fetched
    with capturedLogs() as events:
        assert await store.policy_for("e.example.test") == parse_policy(ENFORCE_1)
        assert await store.policy_for("n.example.test") == parse_policy(NONE_1)
    assert len(_warnings(events, "e.example.test")) == 1
    assert _warnings(events, "n.example.test") == []
    assert [d.result_type for d in store.report.failures("n.example.test")] == [
        ResultType.STS_POLICY_FETCH_ERROR
    ]


@pytest_twisted.ensureDeferred
async def test_rfc8461_10_2_refresh_without_a_txt_record_is_alerted_and_reported() -> None:
    """10.2: an attacker who blocks the TXT record keeps a cached policy from being
    refreshed until it lapses; 3.3 and 10.2 ask for an alert when a due refresh fails
    and 6 counts "policy fetch failures of any kind" under a cached policy (not mode
    none).  The cached policy still applies meanwhile (3.1, 5.1)."""
    clock = clock_at(1_000_000)
    store, zone, fetcher = _stub_store(clock, retry_after=300)
    for domain, text in (("e.example.test", ENFORCE_1), ("n.example.test", NONE_1)):
        zone.txt[f"_mta-sts.{domain}"] = ["v=STSv1; id=one"]
        fetcher.policies[domain] = text
        await store.policy_for(domain)
    del zone.txt["_mta-sts.e.example.test"]  # NXDOMAIN from now on
    zone.txt["_mta-sts.n.example.test"] = TemporaryDNSError("SERVFAIL")
    with capturedLogs() as events:
        clock.advance(3600)  # not due for a refresh yet: nothing to say
        assert await store.policy_for("e.example.test") == parse_policy(ENFORCE_1)
        assert _warnings(events, "e.example.test") == []
        clock.advance(43200 - 3600)  # half its max_age: due
        assert await store.policy_for("e.example.test") == parse_policy(ENFORCE_1)
        assert await store.policy_for("n.example.test") == parse_policy(NONE_1)
        clock.advance(299)  # once per retry_after, not once per message
        assert await store.policy_for("e.example.test") == parse_policy(ENFORCE_1)
    (warning,) = _warnings(events, "e.example.test")
    assert "not refreshed" in warning and "no _mta-sts TXT record" in warning, warning
    assert _warnings(events, "n.example.test") == []
    (detail,) = store.report.failures("e.example.test")
    assert detail.result_type is ResultType.STS_POLICY_FETCH_ERROR
    assert store.report.failures("n.example.test") == {}
    assert fetcher.fetches == 2  # no HTTPS fetch without a record (3.1)
    zone.txt["_mta-sts.e.example.test"] = ["v=STSv1; id=one"]  # back: refreshed
    clock.advance(1)
    assert await store.policy_for("e.example.test") == parse_policy(ENFORCE_1)
    assert store.cached("e.example.test").fetched_at == clock.seconds()  # type: ignore[union-attr]
