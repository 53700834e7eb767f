"""What the relay records for the TLS report (RFC 8460) when an MTA-STS ``enforce``
MX's certificate is refused, with real peers (dnsmasq, the HTTPS policy server, a
receiving maitred_tx with STARTTLS): the result type of 4.3 that says why (expired, not
trusted, not for the MX's name), our address as ``sending-mta-ip`` and the MX's as
``receiving-ip`` (4.4); and the mail stays queued (RFC 8461 4.7.5)."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from maitred_interop import until
from mta_sts_support import CA

from maitred_tx.mta_sts.report import FailureDetail, ResultType
from maitred_tx.queue.store import RecipientState

MESSAGE = b"From: alice@sender.test\r\nTo: bob@sts.test\r\nSubject: sts\r\n\r\nHello.\r\n"


class _Expired:
    """An issuer for the ``receiver`` fixture: the test CA, certificates expired."""

    def __init__(self, ca: CA) -> None:
        self.ca = ca

    def issue(self, names: list[str]) -> Any:
        return self.ca.issue(names, expired=True)


async def _refused(r: Any, address: str) -> tuple[Any, list[FailureDetail]]:
    """Queue a message for *address*; once the runner deferred it, its recipient and
    the failures recorded for the domain."""
    message_id = r.add("alice@sender.test", [address], MESSAGE)

    def deferred() -> bool:
        message = r.store.load(message_id)
        return message is not None and message.recipients[0].state is RecipientState.DEFERRED

    await until(deferred, what="the deferral")
    domain = address.rpartition("@")[2]
    return (r.store.load(message_id).recipients[0],
            list(r.mta_sts.report.failures(domain)))


def _only(details: list[FailureDetail], mx: str) -> FailureDetail:
    """The one kind of failure recorded for *mx* (a retry would add to its count)."""
    [detail] = [d for d in details if d.mx_host == mx]
    return detail


@pytest_twisted.ensureDeferred
async def test_an_expired_certificate_is_reported_as_expired(receiver, relay, policies, ca):
    mx = receiver(issuer=_Expired(ca))
    r = relay(port=mx.port, policy_server=policies)
    recipient, details = await _refused(r, "bob@sts.test")
    assert recipient.status == "4.7.5" and mx.messages == []
    detail = _only(details, "mx.sts.test")
    assert detail.result_type is ResultType.CERTIFICATE_EXPIRED
    assert (detail.sending_ip, detail.receiving_ip) == ("127.0.0.1", "127.0.0.1")
    assert "mx.sts.test" in (detail.reason or "")


@pytest_twisted.ensureDeferred
async def test_a_certificate_from_an_unknown_ca_is_reported_as_not_trusted(
        receiver, relay, policies):
    mx = receiver(issuer=CA("a CA the relay does not know"))
    r = relay(port=mx.port, policy_server=policies)
    recipient, details = await _refused(r, "bob@sts.test")
    assert recipient.status == "4.7.5" and mx.messages == []
    detail = _only(details, "mx.sts.test")
    assert detail.result_type is ResultType.CERTIFICATE_NOT_TRUSTED
    assert (detail.sending_ip, detail.receiving_ip) == ("127.0.0.1", "127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_other_names_is_reported_as_a_host_mismatch(
        receiver, relay, policies):
    mx = receiver()  # trusted and valid, but mx.wrongcert.test is not among its names
    r = relay(port=mx.port, policy_server=policies)
    recipient, details = await _refused(r, "bob@wrongcert.test")
    assert recipient.status == "4.7.5" and mx.messages == []
    detail = _only(details, "mx.wrongcert.test")
    assert detail.result_type is ResultType.CERTIFICATE_HOST_MISMATCH
    assert (detail.sending_ip, detail.receiving_ip) == ("127.0.0.1", "127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_the_report_json_carries_the_result_type_and_both_addresses(
        receiver, relay, policies, ca):
    from datetime import UTC, datetime

    mx = receiver(issuer=_Expired(ca))
    r = relay(port=mx.port, policy_server=policies)
    await _refused(r, "bob@sts.test")
    now = datetime.now(UTC)
    rendered = r.mta_sts.report.render("sts.test", organization="o", contact="c",
                                       report_id="r", start=now, end=now)
    [policy] = rendered["policies"]
    [detail] = policy["failure-details"]
    assert detail["result-type"] == "certificate-expired"
    assert detail["sending-mta-ip"] == "127.0.0.1"
    assert detail["receiving-ip"] == "127.0.0.1"
    assert detail["receiving-mx-hostname"] == "mx.sts.test"
