"""RFC 8460 for senders, pure: the ``_smtp._tls`` TXT record (3, its examples), the
report period (4.1), the filename (5.1) and the mailed report (5.3), parsed back with
Python's ``email`` package and the attachment gunzip'd and loaded."""

from __future__ import annotations

import email
import gzip
import json
import re
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default

import pytest

from maitred_tx.mta_sts.policy import parse_policy
from maitred_tx.mta_sts.report import FailureDetail, ResultType, TlsReport
from maitred_tx.mta_sts.tlsrpt import (
    GZIP_MEDIA_TYPE,
    NoTlsRptRecord,
    ReportPeriod,
    TlsRptError,
    TlsRptRecord,
    build_report_mail,
    gzip_report,
    is_report_transaction,
    next_midnight,
    parse_tlsrpt_record,
    report_filename,
    select_tlsrpt_record,
)

# --- the record (3) -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "record"), [
    # 3.1's examples
    ("v=TLSRPTv1;rua=mailto:reports@example.com",
     TlsRptRecord(("reports@example.com",), ())),
    ("v=TLSRPTv1; rua=https://reporting.example.com/v1/tlsrpt",
     TlsRptRecord((), ("https://reporting.example.com/v1/tlsrpt",))),
    # both schemes, white space around the delimiters, a trailing ";"
    ("v=TLSRPTv1 ; rua=mailto:a@example.com , https://r.example.com/x ;",
     TlsRptRecord(("a@example.com",), ("https://r.example.com/x",))),
    # an unknown extension field is ignored; so is a URI of another scheme
    ("v=TLSRPTv1; ext_1=yes; rua=http://plain.example.com/,mailto:b@EXAMPLE.com",
     TlsRptRecord(("b@example.com",), ())),
    # percent-encoding (3: commas in a URI are encoded) and mailto: headers
    ("v=TLSRPTv1; rua=mailto:a%2Bb@example.com%2Cc@example.org?subject=tls",
     TlsRptRecord(("a+b@example.com", "c@example.org"), ())),
])
def test_valid_records(text: str, record: TlsRptRecord) -> None:
    assert parse_tlsrpt_record(text) == record
    assert select_tlsrpt_record([text]) == record


@pytest.mark.parametrize(("text", "why"), [
    ("v=TLSRPTv1", "no rua= field"),
    ("v=TLSRPTv1; rua=", "empty URI"),
    ("v=TLSRPTv1; rua=mailto:a@example.com; rua=mailto:b@example.com", "twice"),
    ("v=TLSRPTv1; rua=ftp://example.com/", "no mailto: or https: URI"),
    ("v=TLSRPTv1; rua=mailto:nobody", "invalid mailto"),
    ("v=TLSRPTv1; rua=mailto:a%40b@example.com", "invalid mailto"),
    ("v=TLSRPTv1; rua=mailto:a@-bad-.example", "domain"),
    ("v=TLSRPTv1; rua=https:///no-host", "invalid https"),
    ("v=TLSRPTv1; rua", "malformed field"),
    ("v=TLSRPTv1; rua=mailto:a@example.com; x=a b", "malformed field"),
    ("v=TLSRPTv1; rua=mailto:a@example.com; v=TLSRPTv1", "malformed field"),
])
def test_invalid_records_say_why(text: str, why: str) -> None:
    with pytest.raises(TlsRptError, match=why):
        parse_tlsrpt_record(text)


def test_not_a_tlsrpt_record() -> None:
    for text in ("v=spf1 -all", "v=TLSRPTv10; rua=mailto:a@example.com", " v=TLSRPTv1;"):
        with pytest.raises(NoTlsRptRecord):
            parse_tlsrpt_record(text)


def test_strings_of_one_record_are_concatenated_and_others_discarded() -> None:
    record = select_tlsrpt_record([
        "v=spf1 -all",  # 3: "records that do not begin with v=TLSRPTv1; are discarded"
        ("v=TLSRPTv1;", "rua=mailto:tls", "rpt@example.com"),
    ])
    assert record.mailto == ("tlsrpt@example.com",)


def test_exactly_one_record_or_none() -> None:
    with pytest.raises(NoTlsRptRecord):
        select_tlsrpt_record(["v=spf1 -all"])
    with pytest.raises(NoTlsRptRecord):
        select_tlsrpt_record([])
    two = ["v=TLSRPTv1; rua=mailto:a@example.com", "v=TLSRPTv1; rua=mailto:b@example.com"]
    with pytest.raises(TlsRptError, match="2 v=TLSRPTv1 records"):
        select_tlsrpt_record(two)


def test_report_transactions_are_recognised() -> None:
    assert is_report_transaction("tlsrpt.0123abcd")
    assert not is_report_transaction("6F3A2B10000001")  # the SMTP server's ids
    assert not is_report_transaction(None)


# --- the period (4.1) -----------------------------------------------------------------

# 2026-12-07 00:00:00 UTC
MIDNIGHT = 1796601600.0


def test_the_period_is_the_utc_day_before() -> None:
    period = ReportPeriod.day_before(MIDNIGHT + 1800)  # sent half an hour later
    assert period.start == datetime(2026, 12, 6, tzinfo=UTC)
    assert period.end == datetime(2026, 12, 6, 23, 59, 59, tzinfo=UTC)
    assert (period.begin_timestamp, period.end_timestamp) == (MIDNIGHT - 86400, MIDNIGHT - 1)
    assert next_midnight(MIDNIGHT - 1) == MIDNIGHT
    assert next_midnight(MIDNIGHT) == MIDNIGHT + 86400


def test_a_period_starts_when_counting_did() -> None:
    started = MIDNIGHT - 3600.5  # the process started at 23:00 the day before
    period = ReportPeriod.day_before(MIDNIGHT, counted_since=started)
    assert period.start == datetime(2026, 12, 6, 22, 59, 59, tzinfo=UTC)
    # counting that started before that day does not widen it
    assert ReportPeriod.day_before(MIDNIGHT, MIDNIGHT - 5 * 86400).start == datetime(
        2026, 12, 6, tzinfo=UTC)


def test_take_starts_a_new_period() -> None:
    report = TlsReport()
    report.record_success("example.net", None)
    ended = report.take()
    report.record_success("example.org", None)
    assert ended.domains() == ["example.net"]
    assert report.domains() == ["example.org"]


# --- the filename (5.1) and the message (5.3) -----------------------------------------

# 5.1: sender "!" policy-domain "!" begin-timestamp "!" end-timestamp ["!" unique-id]
# "." extension
FILENAME = re.compile(r"(?P<sender>[a-z0-9.-]+)!(?P<domain>[a-z0-9.-]+)!(?P<begin>\d+)!"
                      r"(?P<end>\d+)(?:!(?P<id>[A-Za-z0-9]+))?\.json\.gz")
POLICY = parse_policy("version: STSv1\nmode: enforce\nmx: mx.example.net\nmax_age: 86400\n")


def test_the_filename_follows_the_grammar() -> None:
    period = ReportPeriod.day_before(MIDNIGHT)
    name = report_filename("Mail.Sndr.Example.COM", "bücher.example", period, "a1b2")
    match = FILENAME.fullmatch(name)
    assert match is not None, name
    assert match["sender"] == "mail.sndr.example.com"
    assert match["domain"] == "xn--bcher-kva.example"  # A-labels, not U-labels
    assert (int(match["begin"]), int(match["end"])) == (MIDNIGHT - 86400, MIDNIGHT - 1)
    assert match["id"] == "a1b2"
    assert FILENAME.fullmatch(report_filename("a.example", "b.example", period))
    with pytest.raises(ValueError, match="unique-id"):
        report_filename("a.example", "b.example", period, "no-dash")


def _mail() -> tuple[bytes, dict[str, object], ReportPeriod]:
    report = TlsReport()
    report.record_success("example.net", POLICY)
    report.record_failure("example.net", POLICY, FailureDetail(
        ResultType.CERTIFICATE_EXPIRED, "mx.example.net", "192.0.2.1", "198.51.100.2"))
    period = ReportPeriod.day_before(MIDNIGHT)
    report_id = "20261206.5f3a@mail.sndr.example.com"
    rendered = report.render("example.net", organization="Sndr Inc.",
                             contact="postmaster@mail.sndr.example.com",
                             report_id=report_id, start=period.start, end=period.end)
    data = build_report_mail(
        gzip_report(rendered), policy_domain="example.net", submitter="mail.sndr.example.com",
        report_id=report_id, organization="Sndr Inc.",
        from_address="postmaster@mail.sndr.example.com",
        to_addresses=["tlsrpt@example.net", "other@example.org"],
        filename=report_filename("mail.sndr.example.com", "example.net", period, "5f3a"),
        message_id=f"<{report_id}>", date=datetime.fromtimestamp(MIDNIGHT + 1800, UTC),
        period=period)
    return data, rendered, period


def test_the_mailed_report_parses_back() -> None:
    data, rendered, period = _mail()
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    message = email.message_from_bytes(data, policy=default)
    assert isinstance(message, EmailMessage)
    assert message["From"] == "postmaster@mail.sndr.example.com"
    assert message["To"] == "tlsrpt@example.net, other@example.org"
    assert message["Message-ID"] == "<20261206.5f3a@mail.sndr.example.com>"
    assert message["Date"].datetime == datetime.fromtimestamp(MIDNIGHT + 1800, UTC)
    assert message["TLS-Report-Domain"] == "example.net"
    assert message["TLS-Report-Submitter"] == "mail.sndr.example.com"
    # 5.3: tlsrpt-subject = "Report" FWS "Domain:" FWS domain-name FWS "Submitter:" FWS
    # domain-name FWS "Report-ID:" FWS "<" id-left "@" id-right ">"
    assert re.fullmatch(r"Report\s+Domain:\s+example\.net\s+Submitter:\s+"
                        r"mail\.sndr\.example\.com\s+Report-ID:\s+"
                        r"<20261206\.5f3a@mail\.sndr\.example\.com>", message["Subject"])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    text, attachment = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "example.net" in text.get_content()
    assert attachment.get_content_type() == GZIP_MEDIA_TYPE
    name = attachment.get_filename()
    match = FILENAME.fullmatch(name or "")
    assert match is not None, name
    assert (match["sender"], match["domain"]) == ("mail.sndr.example.com", "example.net")
    assert (int(match["begin"]), int(match["end"])) == (period.begin_timestamp,
                                                       period.end_timestamp)
    loaded = json.loads(gzip.decompress(attachment.get_content()))
    assert loaded == rendered
    assert loaded["date-range"] == {"start-datetime": "2026-12-06T00:00:00Z",
                                    "end-datetime": "2026-12-06T23:59:59Z"}
    [policy] = loaded["policies"]
    assert policy["summary"] == {"total-successful-session-count": 1,
                                 "total-failure-session-count": 1}
    assert policy["failure-details"][0]["result-type"] == "certificate-expired"


def test_the_gzip_is_the_same_for_the_same_report() -> None:
    assert gzip_report({"a": 1})[4:8] == b"\0\0\0\0"  # no mtime: same report, same bytes
    assert json.loads(gzip.decompress(gzip_report({"a": 1}))) == {"a": 1}
