"""Sending the daily RFC 8460 TLS reports (opt-in: ``twistd maitred --tls-reports``).

At 00:00 UTC the day's counts (``PolicyStore.report``, a ``TlsReport``) are taken
and counting starts anew; after a random delay of up to ``spread`` seconds (4.1:
deliver "after some delay", so that receivers are not all hit at midnight), each
domain with sessions gets its report: the ``_smtp._tls.<domain>`` TXT record is
looked up (3; none, or not exactly one valid: no report; a DNS failure: logged, that
domain's report dropped), then for each ``rua``:

- ``mailto:``: a 5.3 message queued in our own queue, envelope sender and From: the
  contact address (bounces come back to it; a bounce is a DSN, never a report), with
  a transaction id that makes the sender deliver it without MTA-STS and without
  counting it (5.3: "MUST deliver reports despite any TLS-related failures and
  SHOULD NOT include this SMTP session in the next report");
- ``https:``: the gzip'd JSON POSTed as ``application/tlsrpt+gzip`` (5.4), within
  ``timeout`` seconds; any 2xx is done (5.4: "a 'successful' response ... typically
  a 200 or 201"), anything else is logged and tried once more ``retry_after``
  seconds later (5.5 allows giving up: reports are optional).

With ``state_path`` (``<spool>/mta-sts/tls-report.json`` under ``twistd``), the
counts and the start of their period survive a restart: they are loaded at start-up
and added to the store's, written atomically (``mta_sts.cache.write_atomically``, in
the reactor's thread pool, one write at a time) every ``save_every`` seconds when
they changed and at stopService, and replaced by the new, empty period at midnight,
so that a restart after midnight never sends yesterday's counts again (the cost: a
restart between midnight and the sending loses that day's report).  A file that
cannot be read is logged and ignored.  Saved counts from an earlier UTC day (the
process was down over midnight) belong to a report that was never sent: it is sent
after the usual random delay, its date-range from the saved start to the end of
that day (the counts stop at the shutdown, but nothing was counted after it either);
dropping them would understate, which is what persisting them is meant to stop.
Without ``state_path`` the counts live in memory only.

Glue: the reactor is a parameter (its ``seconds`` is the clock, its ``callLater``
the timer, its thread pool the writer).
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import client as web_client
from twisted.web.http_headers import Headers

from maitred_tx.auth.resolver import DNSError, NXDomain, Resolver
from maitred_tx.mta_sts.cache import write_atomically
from maitred_tx.mta_sts.policy import ascii_domain
from maitred_tx.mta_sts.report import TlsReport, dump_state, load_state
from maitred_tx.mta_sts.tlsrpt import (
    GZIP_MEDIA_TYPE,
    REPORT_TRANSACTION_PREFIX,
    NoTlsRptRecord,
    ReportPeriod,
    TlsRptError,
    TlsRptRecord,
    build_report_mail,
    gzip_report,
    next_midnight,
    report_filename,
    select_tlsrpt_record,
)
from maitred_tx.queue.store import QueuedRecipient, QueueEnvelope

__all__ = ["TlsReportSender"]

_log = Logger()

# 4.1 asks for a delay after the period ends; an hour spreads a fleet's reports
# (Google's arrive over the morning, mox waits a random part of 4 hours).
SPREAD: Final = 3600.0
# One POST (connect, TLS, upload, answer): a report receiver that takes longer is
# broken, and a minute is what RFC 8461 3.3 suggests for the policy fetch.
TIMEOUT: Final = 60.0
# A failed POST is tried once more after this (5.5: "SHOULD attempt redelivery ...
# As previously stated, the reports are optional").
RETRY_AFTER: Final = 600.0
USER_AGENT: Final = b"maitred_tx TLS-RPT"
# Saved counts are at most this old when the process dies without stopService (a
# crash, SIGKILL): five minutes of a day's report is a small loss, and a write every
# five minutes (only when something was counted) is nothing for the disk.
SAVE_EVERY: Final = 300.0
# The saved counts are ours, but a wrong file must not be read whole into memory.
MAX_STATE_SIZE: Final = 64 * 1024 * 1024

Submit = Callable[[QueueEnvelope, bytes], Awaitable[object]]


class TlsReportSender(Service):
    """Sends the reports of ``report`` (the PolicyStore's) once a day.

    ``organization``: 4.4 organization-name.  ``contact``: an address of ours, the
    4.4 contact-info, the From: and the envelope sender of mailed reports; its domain
    is the submitter (5.1 "sender ... used as the domain for the contact-info").
    ``submit(envelope, data)``: queues a message (the queue's ``add``, then a kick of
    the runner).  ``agent``: the IAgent to POST with (default: verifying against the
    platform's CAs).  ``rng``: chooses the delay (tests).  ``state_path``: where the
    counts are kept across restarts (None: in memory only), written every
    ``save_every`` seconds when they changed."""

    def __init__(
        self,
        reactor: Any,
        report: TlsReport,
        resolver: Resolver,
        submit: Submit,
        *,
        organization: str,
        contact: str,
        agent: Any = None,
        spread: float = SPREAD,
        timeout: float = TIMEOUT,
        retry_after: float = RETRY_AFTER,
        rng: random.Random | None = None,
        state_path: str | os.PathLike[str] | None = None,
        save_every: float = SAVE_EVERY,
    ) -> None:
        self.reactor = reactor
        self.report = report
        self.resolver = resolver
        self.submit = submit
        self.organization = organization
        self.contact = contact
        self.submitter = ascii_domain(contact.rpartition("@")[2])
        self.agent = agent if agent is not None else web_client.Agent(
            reactor, pool=web_client.HTTPConnectionPool(reactor, persistent=False))
        self.spread = spread
        self.timeout = timeout
        self.retry_after = retry_after
        self.rng = rng or random.SystemRandom()
        self.counting_since: float | None = None
        self.state_path = Path(state_path) if state_path is not None else None
        self.save_every = save_every
        self._period_start = 0.0  # of the counts in ``report``, for the saved file
        self._saved_changes: int | None = None  # ``report.changes`` when last saved
        self._save_lock = defer.DeferredLock()
        self._saver: task.LoopingCall | None = None
        self._timers: list[Any] = []
        self._sending: set[defer.Deferred[None]] = set()

    # --- the schedule ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        now = self.reactor.seconds()
        self.counting_since = self._period_start = now
        if self.state_path is not None:
            # No counts, no file needed; a stale or corrupt one is replaced (or ignored
            # again) once something is counted.
            self._saved_changes = None if self.report.domains() else self.report.changes
            self._restore(self.state_path, now)
            self._saver = task.LoopingCall(self._save_if_changed)
            self._saver.clock = self.reactor
            self._saver.start(self.save_every, now=False)
        self._plan_midnight()

    def stopService(self) -> Any:
        super().stopService()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for sending in list(self._sending):  # a POST or its retry: not waited for
            sending.cancel()
        if self._saver is not None and self._saver.running:
            self._saver.stop()
        self._saver = None
        if self.state_path is not None and self.report.changes != self._saved_changes:
            return self._save(self.state_path)  # waited for: the counts so far
        return None

    def _later(self, delay: float, f: Callable[..., object], *args: Any) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self.reactor.callLater(delay, f, *args))

    def _plan_midnight(self) -> None:
        now = self.reactor.seconds()
        self._later(next_midnight(now) - now, self._midnight)

    def _midnight(self) -> None:
        """The day ended: take its counts now, send them a little later."""
        now = self.reactor.seconds()
        period = ReportPeriod.day_before(now, self.counting_since)
        self.counting_since = None  # from now on, whole days
        ended = self.report.take()
        self._period_start = now
        if self.state_path is not None:  # the new, empty day replaces the ended one
            self._save(self.state_path)
        if ended.domains():
            self._later(self.rng.uniform(0, self.spread), self._start_sending, ended, period)
        self._plan_midnight()

    # --- the counts across restarts ----------------------------------------------------

    def _restore(self, path: Path, now: float) -> None:
        """Add the saved counts to ``report`` if they are of today (started at their
        saved start); send them later if of an earlier day (module docstring)."""
        try:
            with path.open("rb") as source:
                raw = source.read(MAX_STATE_SIZE + 1)
            if len(raw) > MAX_STATE_SIZE:
                raise ValueError(f"larger than {MAX_STATE_SIZE} octets")
            saved, since = load_state(raw)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            _log.warn("TLS reports: ignoring the saved counts in {path}: {why}",
                      path=str(path), why=exc)
            return
        since = min(since, now)  # a clock that went back: never a range in the future
        if next_midnight(since) > now:  # today's: counting goes on from the saved start
            was_empty = not self.report.domains()
            self.report.merge(saved)
            self.counting_since = self._period_start = since
            if was_empty:
                self._saved_changes = self.report.changes  # the file says just this
            _log.info("TLS reports: counts since {since} restored from {path}",
                      since=_utc(since), path=str(path))
            return
        if saved.domains():
            period = ReportPeriod.day_before(next_midnight(since), since)
            _log.info("TLS reports: the counts of {start} to {end}, saved before a shutdown "
                      "over midnight, are sent after the usual delay",
                      start=_utc(since), end=f"{period.end:%Y-%m-%dT%H:%M:%SZ}")
            self._later(self.rng.uniform(0, self.spread), self._start_sending, saved, period)
        self._save(path)  # today's counts replace them: a second restart sends them not

    def _save_if_changed(self) -> defer.Deferred[None] | None:
        if self.state_path is None or self.report.changes == self._saved_changes:
            return None
        return self._save(self.state_path)

    def _save(self, path: Path) -> defer.Deferred[None]:
        """Write the counts as they are now, in a thread, after any write before it.
        The JSON is made here, on the reactor thread, while the counts hold still; a
        failed write is logged and tried again at the next tick."""
        self._saved_changes = self.report.changes
        data = dump_state(self.report, self._period_start)
        d: defer.Deferred[None] = self._save_lock.run(
            threads.deferToThreadPool, self.reactor, self.reactor.getThreadPool(),
            write_atomically, path, data)

        def failed(failure: Any) -> None:
            self._saved_changes = None
            _log.error("TLS reports: cannot save the counts to {path}: {why}",
                       path=str(path), why=failure.value)

        d.addErrback(failed)
        return d

    def _start_sending(self, ended: TlsReport, period: ReportPeriod) -> None:
        d = defer.ensureDeferred(self.send(ended, period))
        self._sending.add(d)
        d.addErrback(lambda f: f.trap(defer.CancelledError))  # stopped meanwhile
        d.addErrback(lambda f: _log.failure("TLS reports: sending failed", f))
        d.addBoth(lambda _: self._sending.discard(d))

    # --- one period ------------------------------------------------------------------

    async def send(self, ended: TlsReport, period: ReportPeriod) -> None:
        """Send the report of each domain in ``ended`` for ``period``."""
        for domain in ended.domains():
            try:
                await self._send_domain(ended, domain, period)
            except defer.CancelledError:  # stopService
                raise
            except Exception:  # one domain's trouble (ours) never stops the others
                _log.failure("TLS report for {domain} failed", domain=domain)

    async def _send_domain(self, ended: TlsReport, domain: str, period: ReportPeriod) -> None:
        record = await self._record(domain)
        if record is None:
            return
        token = secrets.token_hex(8)
        report_id = f"{period.start:%Y%m%d}.{token}@{self.submitter}"
        rendered = ended.render(domain, organization=self.organization, contact=self.contact,
                                report_id=report_id, start=period.start, end=period.end)
        compressed = gzip_report(rendered)
        filename = report_filename(self.submitter, domain, period, token)
        if record.mailto:
            await self._mail(record, domain, period, report_id, token, filename, compressed)
        for url in record.https:
            await self._post_twice(url, domain, report_id, compressed)

    async def _record(self, domain: str) -> TlsRptRecord | None:
        name = f"_smtp._tls.{domain}"
        try:
            texts = await self.resolver.lookup(name, "TXT")
        except NXDomain:
            return None
        except DNSError as exc:  # 3: no record, no report; not retried
            _log.warn("TLS report for {domain} dropped: {name} TXT lookup failed: {why}",
                      domain=domain, name=name, why=exc)
            return None
        try:
            return select_tlsrpt_record(t for t in texts if isinstance(t, str))
        except NoTlsRptRecord:
            return None
        except TlsRptError as exc:
            _log.info("TLS report for {domain} dropped: {name}: {why}",
                      domain=domain, name=name, why=exc)
            return None

    async def _mail(self, record: TlsRptRecord, domain: str, period: ReportPeriod,
                    report_id: str, token: str, filename: str, compressed: bytes) -> None:
        now = self.reactor.seconds()
        data = build_report_mail(
            compressed, policy_domain=domain, submitter=self.submitter,
            report_id=report_id, organization=self.organization,
            from_address=self.contact, to_addresses=record.mailto, filename=filename,
            message_id=f"<{report_id}>", date=datetime.fromtimestamp(now, UTC),
            period=period)
        envelope = QueueEnvelope(
            sender=self.contact,
            recipients=tuple(QueuedRecipient(a) for a in record.mailto),
            smtputf8=not all(a.isascii() for a in (self.contact, *record.mailto)),
            received_at=now,
            transaction_id=f"{REPORT_TRANSACTION_PREFIX}{token}",
        )
        queued = await self.submit(envelope, data)
        _log.info("TLS report {id} for {domain} queued as {queued} to {to}",
                  id=report_id, domain=domain, queued=queued, to=", ".join(record.mailto))

    async def _post_twice(self, url: str, domain: str, report_id: str,
                          compressed: bytes) -> None:
        why = await self._post(url, compressed)
        if why is None:
            _log.info("TLS report {id} for {domain} posted to {url}",
                      id=report_id, domain=domain, url=url)
            return
        if not self.running:
            return
        _log.info("TLS report {id} for {domain}: POST to {url} failed ({why}); trying "
                  "again in {after:g} s", id=report_id, domain=domain, url=url, why=why,
                  after=self.retry_after)
        await task.deferLater(self.reactor, self.retry_after, lambda: None)
        why = await self._post(url, compressed)
        if why is None:
            _log.info("TLS report {id} for {domain} posted to {url}",
                      id=report_id, domain=domain, url=url)
        else:
            _log.warn("TLS report {id} for {domain} not delivered to {url}: {why}",
                      id=report_id, domain=domain, url=url, why=why)

    async def _post(self, url: str, compressed: bytes) -> str | None:
        """POST once; None when the receiver took it, else why not."""
        client = HTTPClient(self.agent)
        headers = Headers({b"Content-Type": [GZIP_MEDIA_TYPE.encode()],
                           b"User-Agent": [USER_AGENT]})
        try:
            response = await client.post(url, data=compressed, headers=headers,
                                         timeout=self.timeout, allow_redirects=False,
                                         unbuffered=True)
        except defer.CancelledError:
            if not self.running:  # stopService
                raise
            return f"no answer within {self.timeout:g} s"
        except Exception as exc:  # connection, TLS, HTTP
            return f"{type(exc).__name__}: {exc}"[:300]
        response.deliverBody(_Discard())  # nothing of the answer is needed
        if 200 <= response.code < 300:
            return None
        return f"HTTP status {response.code}"


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Discard(Protocol):
    """Closes the connection of an answer whose body we do not read."""

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()
