"""Per-MX decisions (RFC 8461 4, 5, 8.4) and the TLS-RPT report (RFC 8460 4.4)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from maitred_tx.auth.resolver import MX
from maitred_tx.mta_sts.enforce import MxVerdict, check_mx, filter_mx
from maitred_tx.mta_sts.policy import Mode, Policy
from maitred_tx.mta_sts.report import MAX_DETAILS, FailureDetail, ResultType, TlsReport

MX_PATTERNS = ("mail.example.com", "*.example.net")
ENFORCE = Policy(Mode.ENFORCE, MX_PATTERNS, 86400)
TESTING = Policy(Mode.TESTING, MX_PATTERNS, 86400)
NONE = Policy(Mode.NONE, (), 86400)
HOSTS = ["mail.example.com.", "mx1.example.net", "evil.example.org", "a.b.example.net"]


def test_enforce_listed_host_requires_verified_tls() -> None:
    assert check_mx(ENFORCE, "MAIL.example.com.") == MxVerdict(
        "MAIL.example.com.", deliver=True, validate_tls=True, tls_required=True
    )
    after = check_mx(ENFORCE, "mx1.example.net", ResultType.CERTIFICATE_HOST_MISMATCH)
    assert (after.deliver, after.tls_required) == (False, True)
    assert after.failure is ResultType.CERTIFICATE_HOST_MISMATCH
    assert "certificate-host-mismatch" in after.reason


def test_enforce_unlisted_host_is_not_used() -> None:
    verdict = check_mx(ENFORCE, "evil.example.org")
    assert (verdict.deliver, verdict.failure) == (False, ResultType.VALIDATION_FAILURE)
    assert "not listed" in verdict.reason


def test_testing_reports_but_delivers() -> None:
    unlisted = check_mx(TESTING, "evil.example.org")
    assert (unlisted.deliver, unlisted.failure) == (True, ResultType.VALIDATION_FAILURE)
    listed = check_mx(TESTING, "mail.example.com")
    assert (listed.deliver, listed.validate_tls, listed.tls_required) == (True, True, False)
    failed = check_mx(TESTING, "mail.example.com", ResultType.STARTTLS_NOT_SUPPORTED)
    assert (failed.deliver, failed.failure) == (True, ResultType.STARTTLS_NOT_SUPPORTED)


@pytest.mark.parametrize("policy", [None, NONE])
def test_no_policy_changes_nothing(policy: Policy | None) -> None:
    for tls_failure in (None, ResultType.CERTIFICATE_EXPIRED):
        verdict = check_mx(policy, "evil.example.org", tls_failure)
        assert verdict == MxVerdict("evil.example.org", True, False, False)
    assert filter_mx(policy, HOSTS) == (HOSTS, [])


def test_filter_mx_keeps_order_and_types() -> None:
    assert filter_mx(ENFORCE, HOSTS) == (
        ["mail.example.com.", "mx1.example.net"],
        ["evil.example.org", "a.b.example.net"],
    )
    assert filter_mx(TESTING, HOSTS) == (HOSTS, ["evil.example.org", "a.b.example.net"])
    records = [MX(20, "mx1.example.net"), MX(10, "evil.example.org"), MX(30, "mail.example.com")]
    assert filter_mx(ENFORCE, records) == ([records[0], records[2]], [records[1]])


def test_enforce_with_no_listed_host_leaves_nothing() -> None:
    # 8.4: the sender must then defer, not fall back to the implicit MX
    assert filter_mx(ENFORCE, ["example.com", "mx.example.org"]) == (
        [],
        ["example.com", "mx.example.org"],
    )


# ---------------------------------------------------------------- TLS-RPT


START = datetime(2016, 4, 1, tzinfo=UTC)


def render(report: TlsReport, domain: str) -> dict[str, object]:
    out = report.render(
        domain,
        organization="Company-X",
        contact="sts-reporting@company-x.example",
        report_id="5065427c-23d3-47ca-b6e0-946ea0e8c4be",
        start=START,
        end=START + timedelta(hours=23, minutes=59, seconds=59),
    )
    json.dumps(out)  # JSON-serialisable as is
    return out


def test_report_matches_rfc8460_shape() -> None:
    report = TlsReport()
    for _ in range(3):
        report.record_success("Example.COM.", ENFORCE)
    mismatch = FailureDetail(
        ResultType.CERTIFICATE_HOST_MISMATCH,
        mx_host="mx1.example.net",
        sending_ip="2001:db8:abcd:12::1",
        receiving_ip="203.0.113.56",
    )
    report.record_failure("example.com", ENFORCE, mismatch)
    report.record_failure("example.com", ENFORCE, mismatch)
    report.record_failure(
        "example.com", None, FailureDetail(ResultType.STS_POLICY_FETCH_ERROR, reason="HTTP 404")
    )
    report.record_success("other.example", None)
    assert report.domains() == ["example.com", "other.example"]
    assert render(report, "EXAMPLE.com") == {
        "organization-name": "Company-X",
        "date-range": {
            "start-datetime": "2016-04-01T00:00:00Z",
            "end-datetime": "2016-04-01T23:59:59Z",
        },
        "contact-info": "sts-reporting@company-x.example",
        "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
        "policies": [
            {
                "policy": {
                    "policy-type": "sts",
                    "policy-string": [
                        "version: STSv1",
                        "mode: enforce",
                        "mx: mail.example.com",
                        "mx: *.example.net",
                        "max_age: 86400",
                    ],
                    "policy-domain": "example.com",
                    "mx-host": ["mail.example.com", "*.example.net"],
                },
                "summary": {
                    "total-successful-session-count": 3,
                    "total-failure-session-count": 2,
                },
                "failure-details": [
                    {
                        "result-type": "certificate-host-mismatch",
                        "sending-mta-ip": "2001:db8:abcd:12::1",
                        "receiving-mx-hostname": "mx1.example.net",
                        "receiving-ip": "203.0.113.56",
                        "failed-session-count": 2,
                    }
                ],
            },
            {
                "policy": {"policy-type": "no-policy-found", "policy-domain": "example.com"},
                "summary": {
                    "total-successful-session-count": 0,
                    "total-failure-session-count": 1,
                },
                "failure-details": [
                    {
                        "result-type": "sts-policy-fetch-error",
                        "failed-session-count": 1,
                        "failure-reason-code": "HTTP 404",
                    }
                ],
            },
        ],
    }
    assert report.failures("example.com") == {
        mismatch: 2,
        FailureDetail(ResultType.STS_POLICY_FETCH_ERROR, reason="HTTP 404"): 1,
    }
    report.clear()
    assert report.domains() == []


def test_report_details_are_bounded_but_counted() -> None:
    report = TlsReport()
    for i in range(MAX_DETAILS + 50):
        detail = FailureDetail(ResultType.VALIDATION_FAILURE, mx_host=f"mx{i}.example.org")
        report.record_failure("example.com", ENFORCE, detail)
    (entry,) = render(report, "example.com")["policies"]  # type: ignore[misc]
    assert entry["summary"]["total-failure-session-count"] == MAX_DETAILS + 50
    assert len(entry["failure-details"]) == MAX_DETAILS


def test_report_times_are_utc() -> None:
    report = TlsReport()
    plus2 = timezone(timedelta(hours=2))
    out = report.render(
        "example.com", organization="o", contact="c", report_id="r",
        start=datetime(2016, 4, 1, 2, 0, tzinfo=plus2), end=datetime(2016, 4, 2, tzinfo=UTC),
    )
    assert out["date-range"] == {  # the end is given in UTC already
        "start-datetime": "2016-04-01T00:00:00Z",
        "end-datetime": "2016-04-02T00:00:00Z",
    }
    assert out["policies"] == []
    with pytest.raises(ValueError, match="timezone-aware"):
        report.render("example.com", organization="o", contact="c", report_id="r",
                      start=datetime(2016, 4, 1), end=datetime(2016, 4, 2))


def test_rfc8460_4_4_policy_domain_is_the_a_label() -> None:
    """RFC 8460 4.4: for an IDN, "policy-domain" is "the Punycode-encoded A-label ...
    and not the U-label".  A sender names the domain as the address has it (U-labels
    under SMTPUTF8); both spellings are one policy domain."""
    report = TlsReport()
    report.record_success("Bücher.Example.", ENFORCE)
    detail = FailureDetail(ResultType.STARTTLS_NOT_SUPPORTED, mx_host="mx1.example.net")
    report.record_failure("xn--bcher-kva.example", ENFORCE, detail)
    assert report.domains() == ["xn--bcher-kva.example"]
    assert report.failures("bücher.example") == {detail: 1}
    for name in ("bücher.example", "XN--BCHER-KVA.example."):
        (entry,) = render(report, name)["policies"]  # type: ignore[misc]
        assert entry["policy"]["policy-domain"] == "xn--bcher-kva.example"
        assert entry["summary"] == {
            "total-successful-session-count": 1,
            "total-failure-session-count": 1,
        }
