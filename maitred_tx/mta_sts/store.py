"""Which MTA-STS policy applies to a domain now: RFC 8461 3 (discovery) and 5.1 (the
cache), over a ``Resolver`` and a ``PolicyFetcher``.

``PolicyStore.policy_for(domain)``:

1. look up the ``_mta-sts.<domain>`` TXT record (3.1);
2. no usable record (none, two, malformed, DNS failure): the cached policy if one is
   still within its max_age, else None (3.1, 3.3: "if no 'live' policy can be
   discovered ... but a valid (non-expired) policy exists in the sender's cache, the
   sender MUST apply that cached policy"); when that cached policy was due for a
   refresh (step 3), the refresh failed: warned about and counted (3.3, 6, 10.2);
3. a record whose id is the cached policy's: the cached policy, with no fetch (3.1:
   the id changes when the policy does), unless it is older than ``refresh_after``
   or than half its max_age (3.3: refresh cached policies, "a suggested refresh
   frequency is once per day"; before they expire);
4. otherwise fetch (3.3); on success cache and return the new policy, on failure
   return the cached one if any, else None (3.3: "as though the domain has not
   implemented MTA-STS"), and do not try that id again for ``retry_after`` seconds.

Concurrent calls for one domain share one discovery.  Fetch failures are logged and
counted in ``store.report`` (RFC 8460); a failed refresh of a cached policy is a warning
unless that policy's mode is ``none`` (3.3: a domain withdrawing MTA-STS, 8.3), at most
once per ``retry_after`` for a domain.  Before a message bounces for an ``enforce``
policy, call ``policy_for`` again (5.1: check for a new policy first).

Glue: twisted.logger, Deferreds, and the disk write in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from maitred_tx.auth.resolver import DNSError, NXDomain, Resolver
from maitred_tx.mta_sts.cache import CachedPolicy, PolicyCache
from maitred_tx.mta_sts.fetch import FetchError, PolicyFetcher
from maitred_tx.mta_sts.policy import (
    Mode,
    NoStsRecord,
    Policy,
    StsError,
    StsRecord,
    ascii_domain,
    select_record,
)
from maitred_tx.mta_sts.report import FailureDetail, ResultType, TlsReport

__all__ = ["Fetcher", "PolicyStore"]

_log = Logger()

# 3.3 "a suggested refresh frequency is once per day".
DEFAULT_REFRESH_AFTER: Final = 86400.0
# After a failed fetch, the same (domain, id) is not fetched again for 5 minutes: a
# queue run with many messages for a broken domain costs one fetch, not one each (3.3:
# "Senders may wish to rate-limit the frequency of attempts"); mox waits as long.
DEFAULT_RETRY_AFTER: Final = 300.0
# Domains whose last fetch failure is remembered.
MAX_FAILURES_KEPT: Final = 10000


class Fetcher(Protocol):
    """Fetches a domain's policy or raises FetchError (``PolicyFetcher``)."""

    def fetch(self, domain: str) -> Awaitable[Policy]: ...


class PolicyStore:
    """MTA-STS policies for recipient domains, cached in memory and in ``cache_dir``.

    ``resolver``: TXT lookups (``maitred_tx.auth.dns.TwistedResolver`` in production).
    ``fetcher``: a ``PolicyFetcher`` (the default one trusts the platform's CAs).
    ``clock``: seconds since the epoch (``reactor.seconds``).  ``refresh_after``:
    age after which a cached policy is fetched again although its id is unchanged,
    or half its max_age if that is sooner (None: never).  ``retry_after``: seconds
    between fetch attempts for a failing domain.  ``report``: where failures are
    counted (a new ``TlsReport`` by default)."""

    def __init__(
        self,
        reactor: Any,
        resolver: Resolver,
        fetcher: Fetcher | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] | None = None,
        refresh_after: float | None = DEFAULT_REFRESH_AFTER,
        retry_after: float = DEFAULT_RETRY_AFTER,
        report: TlsReport | None = None,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._fetcher: Fetcher = fetcher if fetcher is not None else PolicyFetcher(reactor)
        self._clock: Callable[[], float] = clock if clock is not None else reactor.seconds
        self._refresh_after = refresh_after
        self._retry_after = retry_after
        self.report = report if report is not None else TlsReport()
        self._persistent = cache_dir is not None
        self._cache = PolicyCache(cache_dir, self._clock, self._cache_problem)
        self._pending: dict[str, defer.Deferred[Policy | None]] = {}
        self._failed: dict[str, tuple[str, float]] = {}
        self._save_lock = defer.DeferredLock()

    @staticmethod
    def _cache_problem(message: str) -> None:
        _log.warn("{message}", message=message)

    def cached(self, domain: str) -> CachedPolicy | None:
        """The live cache entry for ``domain``, without any lookup."""
        try:
            return self._cache.get(ascii_domain(domain))
        except StsError:
            return None

    async def policy_for(self, domain: str) -> Policy | None:
        """The policy to apply when sending to ``domain`` now; None when it has none
        (or its name cannot have one, e.g. an address literal).  Never raises for
        network, DNS or policy trouble: those mean "the cached policy, or none"."""
        try:
            name = ascii_domain(domain)
        except StsError as exc:
            _log.debug("MTA-STS: no policy for {domain!r}: {why}", domain=domain, why=exc)
            return None
        shared = self._pending.get(name)
        if shared is None:
            shared = defer.Deferred.fromCoroutine(self._discover(name))
            self._pending[name] = shared
            shared.addBoth(self._settle, name)
        waiter: defer.Deferred[Policy | None] = defer.Deferred()
        shared.addBoth(_relay, waiter)
        return await waiter

    async def refresh_cached(self) -> None:
        """Run discovery for every cached domain (3.3 proactive refresh; schedule it
        with a LoopingCall, e.g. hourly, together with ``refresh_after``)."""
        for domain in self._cache.domains():
            await self.policy_for(domain)

    def report_success(self, domain: str) -> None:
        """Count a session to ``domain`` that met its policy (RFC 8460 summary)."""
        self.report.record_success(domain, self._applied(domain))

    def report_failure(
        self,
        domain: str,
        mx_host: str,
        result_type: ResultType,
        *,
        reason: str | None = None,
        sending_ip: str | None = None,
        receiving_ip: str | None = None,
    ) -> None:
        """Count a failed session to ``mx_host`` for ``domain`` under its current
        policy, e.g. ``CERTIFICATE_HOST_MISMATCH`` or ``STARTTLS_NOT_SUPPORTED``."""
        detail = FailureDetail(result_type, mx_host, sending_ip, receiving_ip, reason)
        self.report.record_failure(domain, self._applied(domain), detail)
        _log.info(
            "MTA-STS {domain}: {mx} failed: {result}{why}",
            domain=domain, mx=mx_host, result=result_type.value,
            why=f" ({reason})" if reason else "",
        )

    def _applied(self, domain: str) -> Policy | None:
        entry = self.cached(domain)
        return entry.policy if entry is not None else None

    def _settle(self, result: object, name: str) -> object:
        self._pending.pop(name, None)
        return result

    async def _discover(self, name: str) -> Policy | None:
        cached = self._cache.get(name)
        fallback = cached.policy if cached is not None else None
        record, why = await self._record(name)
        now = self._clock()
        if record is None:
            if cached is not None and self._stale(cached, now):
                self._refresh_failed(name, cached, why, now)
            return fallback
        if cached is not None and cached.policy_id == record.id and not self._stale(cached, now):
            return cached.policy
        failed = self._failed.get(name)
        if failed is not None and failed[0] == record.id and now - failed[1] < self._retry_after:
            return fallback
        try:
            policy = await self._fetcher.fetch(name)
        except FetchError as exc:
            self._fetch_failed(name, record, cached, exc, now)
            return fallback
        self._failed.pop(name, None)
        entry = CachedPolicy(name, record.id, policy, self._clock())
        self._cache.put(entry)
        await self._save(entry)
        _log.info(
            "MTA-STS {domain}: policy {id} ({mode}, max_age {max_age}) fetched",
            domain=name, id=record.id, mode=policy.mode.value, max_age=policy.max_age,
        )
        return policy

    async def _record(self, name: str) -> tuple[StsRecord | None, str]:
        """The domain's TXT record, or None and why there is no usable one."""
        try:
            texts = await self._resolver.lookup(f"_mta-sts.{name}", "TXT")
        except NXDomain:
            return None, "no _mta-sts TXT record"
        except DNSError as exc:
            _log.info("MTA-STS {domain}: TXT lookup failed: {why}", domain=name, why=exc)
            return None, f"_mta-sts TXT lookup failed: {exc}"
        try:
            return select_record(text for text in texts if isinstance(text, str)), ""
        except NoStsRecord:
            return None, "no _mta-sts TXT record"
        except StsError as exc:
            _log.warn("MTA-STS {domain}: TXT record ignored: {why}", domain=name, why=exc)
            return None, f"_mta-sts TXT record ignored: {exc}"

    def _stale(self, cached: CachedPolicy, now: float) -> bool:
        """Due for a refetch although its id is unchanged: after ``refresh_after``, or
        sooner, half-way through its max_age, so that a policy of a day or less (86400
        is a common max_age) is refreshed before it expires instead of lapsing."""
        if self._refresh_after is None:
            return False
        return now - cached.fetched_at >= min(self._refresh_after, cached.policy.max_age / 2)

    def _fetch_failed(
        self,
        name: str,
        record: StsRecord,
        cached: CachedPolicy | None,
        exc: FetchError,
        now: float,
    ) -> None:
        self._remember_failure(name, record.id, now)
        policy = cached.policy if cached is not None else None
        # 6: "HTTPS policy fetch failures when a valid TXT record is present" are
        # reportable whatever the cached mode; 3.3: no alert over a cached "none".
        self.report.record_failure(name, policy, FailureDetail(exc.result_type, reason=exc.reason))
        alert = _log.info if policy is not None and policy.mode is Mode.NONE else _log.warn
        alert(
            "MTA-STS {domain}: policy {id} not fetched ({result}: {why}); {fallback}",
            domain=name, id=record.id, result=exc.result_type.value, why=exc.reason,
            fallback="keeping the cached policy" if cached else "no policy applies",
        )

    def _refresh_failed(self, name: str, cached: CachedPolicy, why: str, now: float) -> None:
        """A cached policy due for a refresh whose TXT record could not be had: 10.2's
        blocked discovery, or a domain that removed its record without publishing
        mode "none" first (8.3).  Warned about and counted (3.3, 6) unless its mode
        is none, once per ``retry_after``; the cached policy still applies."""
        if cached.policy.mode is Mode.NONE:
            return
        failed = self._failed.get(name)
        if failed is not None and failed[0] == "" and now - failed[1] < self._retry_after:
            return
        self._remember_failure(name, "", now)  # "": no record (ids are never empty)
        detail = FailureDetail(ResultType.STS_POLICY_FETCH_ERROR, reason=why)
        self.report.record_failure(name, cached.policy, detail)
        _log.warn(
            "MTA-STS {domain}: cached policy {id} not refreshed: {why}; "
            "kept until it expires in {left:.0f} s",
            domain=name, id=cached.policy_id, why=why, left=cached.expires_at - now,
        )

    def _remember_failure(self, name: str, policy_id: str, now: float) -> None:
        """Note a failure for ``name`` (under the TXT record's ``policy_id``, "" for no
        record), most recent last, at most MAX_FAILURES_KEPT domains."""
        self._failed.pop(name, None)
        self._failed[name] = (policy_id, now)
        while len(self._failed) > MAX_FAILURES_KEPT:
            del self._failed[next(iter(self._failed))]

    async def _save(self, entry: CachedPolicy) -> None:
        """Write the entry to disk in a thread, one write at a time (in order)."""
        if not self._persistent:
            return
        try:
            await self._save_lock.run(
                threads.deferToThreadPool,
                self._reactor,
                self._reactor.getThreadPool(),
                self._cache.save,
                entry,
            )
        except OSError as exc:
            _log.error(
                "MTA-STS {domain}: cannot write the policy cache: {why}",
                domain=entry.domain, why=exc,
            )


def _relay(result: object, waiter: defer.Deferred[Policy | None]) -> object:
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)  # type: ignore[arg-type]
    return result
