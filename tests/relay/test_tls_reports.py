"""Sending RFC 8460 reports (``relay.reports.TlsReportSender``) with real peers: a
report mailed through the real queue and sender to a real receiver, its ``_smtp._tls``
record served by dnsmasq; a report POSTed to a real twisted.web HTTPS server under the
test CA; and the daily schedule on a ``task.Clock``."""

from __future__ import annotations

import email
import gzip
import json
import random
from email.policy import default
from typing import Any

import pytest
import pytest_twisted
from maitred_interop import until
from mta_sts_support import CA
from twisted.internet import reactor, task
from twisted.logger import capturedLogs
from twisted.web import client as web_client
from twisted.web import resource, server

from maitred_tx.auth.resolver import ZoneResolver
from maitred_tx.mta_sts.report import FailureDetail, ResultType, TlsReport
from maitred_tx.mta_sts.tlsrpt import GZIP_MEDIA_TYPE, ReportPeriod
from maitred_tx.queue.store import RecipientState
from maitred_tx.relay.reports import TlsReportSender

CONTACT = "postmaster@sender.test"
TLSRPT_RUA = "tlsrpt@sts.test"  # conftest's dnsmasq serves it as sts.test's rua
MESSAGE = b"From: alice@sender.test\r\nTo: bob@sts.test\r\nSubject: sts\r\n\r\nHello.\r\n"
MIDNIGHT = 1796601600.0  # 2026-12-07 00:00:00 UTC


class _Expired:
    """An issuer for the ``receiver`` fixture: the test CA, certificates expired."""

    def __init__(self, ca: CA) -> None:
        self.ca = ca

    def issue(self, names: list[str]) -> Any:
        return self.ca.issue(names, expired=True)


def _expired_failure(report: TlsReport, domain: str = "example.net") -> None:
    report.record_failure(domain, None, FailureDetail(ResultType.CERTIFICATE_EXPIRED,
                                                      f"mx.{domain}"))


# --- mailto: through our own queue ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_mailed_report_goes_through_the_queue_despite_the_tls_failure(
        receiver, relay, policies, ca, dns):
    # sts.test's MX has an expired certificate: its enforce policy keeps mail queued
    mx = receiver(issuer=_Expired(ca))
    r = relay(port=mx.port, policy_server=policies)
    message_id = r.add("alice@sender.test", ["bob@sts.test"], MESSAGE)

    def deferred() -> bool:
        message = r.store.load(message_id)
        return message is not None and message.recipients[0].state is RecipientState.DEFERRED

    await until(deferred, what="the deferral")
    assert mx.messages == []
    counted = r.mta_sts.report.take()  # midnight: the day's counts

    async def submit(envelope: Any, data: bytes) -> str:
        queued = await r.queue.add(envelope, [data])
        r.runner.kick()
        return queued

    reports = TlsReportSender(reactor, r.mta_sts.report, dns.resolver(), submit,
                              organization="Sender Test", contact=CONTACT)
    await reports.send(counted, ReportPeriod.day_before(MIDNIGHT))
    # RFC 8460 5.3: delivered "despite any TLS-related failures" (the same MX, the same
    # expired certificate, the same enforce policy as bob's message)
    await until(lambda: len(mx.messages) == 1, what="the report's delivery")
    [got] = mx.messages
    assert str(got.envelope.sender) == CONTACT
    assert [str(a.mailbox) for a in got.envelope.recipients] == [TLSRPT_RUA]
    message = email.message_from_bytes(got.body, policy=default)
    assert message["TLS-Report-Domain"] == "sts.test"
    assert message["TLS-Report-Submitter"] == "sender.test"
    assert message["From"] == CONTACT
    [attachment] = [p for p in message.iter_parts() if p.get_content_type() == GZIP_MEDIA_TYPE]
    rendered = json.loads(gzip.decompress(attachment.get_content()))
    assert rendered["organization-name"] == "Sender Test"
    assert rendered["contact-info"] == CONTACT
    [policy] = rendered["policies"]
    assert policy["policy"]["policy-domain"] == "sts.test"
    assert policy["failure-details"][0]["result-type"] == "certificate-expired"
    # 5.3: the report's own session "SHOULD NOT" be in the next report
    assert r.mta_sts.report.domains() == []


# --- https: POSTed --------------------------------------------------------------------


class _Collector(resource.Resource):
    """Takes POSTs; answers with ``codes`` in turn (then 201)."""

    isLeaf = True

    def __init__(self, codes: list[int]) -> None:
        super().__init__()
        self.codes = codes
        self.posts: list[tuple[bytes, bytes, dict[bytes, list[bytes]]]] = []

    def render_POST(self, request: server.Request) -> bytes:
        assert request.content is not None
        headers = dict(request.requestHeaders.getAllRawHeaders())
        self.posts.append((request.path, request.content.read(), headers))
        request.setResponseCode(self.codes.pop(0) if self.codes else 201)
        return b"thanks\n"


@pytest.fixture
def https_receiver(ca: CA) -> Any:
    collector = _Collector([])
    site = server.Site(collector)
    listener = reactor.listenSSL(0, site, ca.issue(["localhost"]).options(),
                                 interface="127.0.0.1")
    yield collector, listener.getHost().port
    pytest_twisted.blockon(listener.stopListening())


def _https_sender(ca: CA, report: TlsReport, resolver: Any, **kw: Any) -> TlsReportSender:
    agent = web_client.Agent(reactor, contextFactory=web_client.BrowserLikePolicyForHTTPS(
        trustRoot=ca.trust_root()), pool=web_client.HTTPConnectionPool(reactor, False))

    async def no_mail(envelope: Any, data: bytes) -> str:
        raise AssertionError("nothing to mail")

    return TlsReportSender(reactor, report, resolver, no_mail, organization="Org",
                           contact="tlsrpt@mail.sender.test", agent=agent, timeout=5.0, **kw)


@pytest_twisted.ensureDeferred
async def test_a_report_is_posted_as_gzipped_json(https_receiver, ca):
    collector, port = https_receiver
    report = TlsReport()
    _expired_failure(report)
    zone = ZoneResolver({("_smtp._tls.example.net", "TXT"): [
        f"v=TLSRPTv1; rua=https://localhost:{port}/v1/tlsrpt"]})
    sender = _https_sender(ca, report, zone)
    sender.startService()
    try:
        await sender.send(report.take(), ReportPeriod.day_before(MIDNIGHT))
    finally:
        sender.stopService()
    [(path, body, headers)] = collector.posts
    assert path == b"/v1/tlsrpt"
    assert headers[b"Content-Type"] == [GZIP_MEDIA_TYPE.encode()]
    rendered = json.loads(gzip.decompress(body))
    assert rendered["contact-info"] == "tlsrpt@mail.sender.test"
    assert rendered["report-id"].endswith("@mail.sender.test")
    assert rendered["date-range"] == {"start-datetime": "2026-12-06T00:00:00Z",
                                      "end-datetime": "2026-12-06T23:59:59Z"}
    [policy] = rendered["policies"]
    assert policy["policy"] == {"policy-type": "no-policy-found",
                                "policy-domain": "example.net"}


@pytest_twisted.ensureDeferred
async def test_a_refused_post_is_tried_once_more_then_dropped(https_receiver, ca):
    collector, port = https_receiver
    collector.codes[:] = [503, 500, 500]
    report = TlsReport()
    _expired_failure(report)
    zone = ZoneResolver({("_smtp._tls.example.net", "TXT"): [
        f"v=TLSRPTv1; rua=https://localhost:{port}/r"]})
    sender = _https_sender(ca, report, zone, retry_after=0.05)
    sender.startService()
    try:
        with capturedLogs() as events:
            await sender.send(report.take(), ReportPeriod.day_before(MIDNIGHT))
    finally:
        sender.stopService()
    assert len(collector.posts) == 2  # the first and one retry, no more
    assert any("not delivered" in e.get("log_format", "") and e.get("why") == "HTTP status 500"
               for e in events)


# --- the schedule, and what gets no report --------------------------------------------


def test_daily_at_midnight_utc_after_a_random_delay() -> None:
    clock = task.Clock()
    clock.advance(MIDNIGHT - 7200)  # started at 22:00 UTC
    report = TlsReport()
    zone = ZoneResolver(
        {("_smtp._tls.example.net", "TXT"): ["v=TLSRPTv1; rua=mailto:r@example.net"],
         ("_smtp._tls.nodns.example", "TXT"): ["x"],
         ("_smtp._tls.none.example", "TXT"): ["v=spf1 -all"]},
        temporary=["_smtp._tls.nodns.example"])
    queued: list[tuple[Any, bytes]] = []

    async def submit(envelope: Any, data: bytes) -> str:
        queued.append((envelope, data))
        return "Q1"

    sender = TlsReportSender(clock, report, zone, submit, organization="Org",
                             contact="postmaster@sender.test", rng=random.Random(7))
    delay = random.Random(7).uniform(0, 3600)
    sender.startService()
    for domain in ("example.net", "nodns.example", "none.example", "absent.example"):
        _expired_failure(report, domain)
    clock.advance(7200 - 1)
    assert queued == [] and report.domains() != []
    clock.advance(1)  # 00:00 UTC: the day's counts are taken
    assert report.domains() == []
    _expired_failure(report, "example.net")  # the new day's: not in this report
    with capturedLogs() as events:
        clock.advance(delay)
    [(envelope, data)] = queued  # only example.net has a valid record
    assert envelope.sender == "postmaster@sender.test"
    assert [r.address for r in envelope.recipients] == ["r@example.net"]
    assert envelope.transaction_id.startswith("tlsrpt.")
    message = email.message_from_bytes(data, policy=default)
    [attachment] = [p for p in message.iter_parts() if p.get_content_type() == GZIP_MEDIA_TYPE]
    rendered = json.loads(gzip.decompress(attachment.get_content()))
    # counting began at 22:00: the range says so
    assert rendered["date-range"] == {"start-datetime": "2026-12-06T22:00:00Z",
                                      "end-datetime": "2026-12-06T23:59:59Z"}
    assert rendered["policies"][0]["summary"]["total-failure-session-count"] == 1
    # the DNS failure is logged and that report dropped, not retried
    assert any(e.get("domain") == "nodns.example" and "dropped" in e["log_format"]
               for e in events)
    assert ("_smtp._tls.nodns.example", "TXT") in zone.lookups
    lookups = len(zone.lookups)
    clock.advance(86400 - delay)  # the next midnight: a whole day now
    clock.advance(3600)
    assert len(queued) == 2 and len(zone.lookups) == lookups + 1
    sender.stopService()
    assert clock.getDelayedCalls() == []


def test_the_service_needs_a_domain_in_its_contact() -> None:
    with pytest.raises(ValueError):
        TlsReportSender(task.Clock(), TlsReport(), ZoneResolver({}), None,  # type: ignore[arg-type]
                        organization="Org", contact="postmaster@")
