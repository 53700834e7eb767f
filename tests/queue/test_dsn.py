"""DSNs: who is told (RFC 3461 NOTIFY, never the null path), and the RFC 3464 report,
parsed back by the stdlib's email parser and by an independent one: Perl's
Mail::DeliveryStatus::BounceParser (Debian libmail-deliverystatus-bounceparser-perl)."""

from __future__ import annotations

import email.message
import re
import shutil
import subprocess
from dataclasses import replace
from email.parser import BytesParser
from email.policy import default
from io import BytesIO

import pytest

from maitred_tx.queue.dsn import (
    MAX_RETURN_FULL,
    Notice,
    NoticeKind,
    build_dsn,
    header_block,
    notices,
    read_original,
    to_settle,
)
from maitred_tx.queue.schedule import DelayWarning, RetryPolicy
from maitred_tx.queue.store import (
    QueuedMessage,
    QueuedRecipient,
    QueueReply,
    RecipientState,
)
from maitred_tx.smtp.params import BodyType, Notify, Ret

T0 = 1_700_000_000.0
S = RecipientState
HEADERS = (b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test; date\r\n"
           b"From: Alice <alice@origin.test>\r\nTo: bob@example.com\r\n"
           b"Subject: quarterly report\r\nMessage-ID: <orig-1@origin.test>\r\n\r\n")
ORIGINAL = HEADERS + b"Dear Bob,\r\n\r\nthe numbers.\r\n"


def rcpt(address: str = "bob@example.com", state: RecipientState = S.FAILED,
         **kw: object) -> QueuedRecipient:
    fields: dict[str, object] = {"attempts": 1, "last_attempt_at": T0 + 60}
    if state is S.FAILED:
        fields.update(status="5.1.1", reply=QueueReply(550, "5.1.1", "no such user"),
                      remote_mta="mx.example.com")
    elif state is S.DEFERRED:
        fields.update(status="4.7.1", reply=QueueReply(451, "4.7.1", "greylisted"),
                      remote_mta="mx.example.com", next_attempt_at=T0 + 900)
    fields.update(kw)
    return QueuedRecipient(address, state=state, **fields)  # type: ignore[arg-type]


def message(*recipients: QueuedRecipient, **kw: object) -> QueuedMessage:
    fields: dict[str, object] = {"id": "1700000000.M1P1Q1Rabcdef",
                                 "sender": "alice@origin.test", "created_at": T0,
                                 "size": len(ORIGINAL), "envid": "QQ314159"}
    fields.update(kw)
    return QueuedMessage(recipients=recipients or (rcpt(),), **fields)  # type: ignore[arg-type]


def kinds(m: QueuedMessage, now: float = T0 + 60, **kw: object) -> dict[NoticeKind, list[str]]:
    warning = DelayWarning(**kw) if kw else None  # type: ignore[arg-type]
    return {n.kind: [r.address for r in n.recipients] for n in notices(m, now, warning)}


# --- who is told ------------------------------------------------------------------


def test_failure_is_reported_by_default() -> None:
    assert kinds(message(rcpt())) == {NoticeKind.FAILURE: ["bob@example.com"]}


def test_never_a_bounce_for_a_bounce() -> None:
    m = message(rcpt(notify=frozenset({Notify.FAILURE, Notify.SUCCESS, Notify.DELAY})),
                rcpt("c@x.test", S.RELAYED, notify=frozenset({Notify.SUCCESS})),
                rcpt("d@x.test", S.DEFERRED, notify=frozenset({Notify.DELAY})),
                sender=None)
    assert notices(m, T0 + 10 * 86400, DelayWarning(after=1)) == []
    with pytest.raises(ValueError):
        build_dsn(m, Notice(NoticeKind.FAILURE, m.recipients), reporting_mta="mx.test",
                  original=HEADERS, full=False, now=T0)


@pytest.mark.parametrize(
    ("notify", "state", "expected"),
    [
        ({Notify.NEVER}, S.FAILED, {}),
        ({Notify.SUCCESS}, S.FAILED, {}),
        ({Notify.DELAY}, S.FAILED, {}),
        ({Notify.FAILURE}, S.FAILED, {NoticeKind.FAILURE: ["bob@example.com"]}),
        (None, S.RELAYED, {}),
        ({Notify.FAILURE}, S.RELAYED, {}),
        ({Notify.SUCCESS}, S.RELAYED, {NoticeKind.SUCCESS: ["bob@example.com"]}),
        ({Notify.SUCCESS}, S.DELIVERED, {NoticeKind.SUCCESS: ["bob@example.com"]}),
        ({Notify.NEVER}, S.DELIVERED, {}),
        ({Notify.SUCCESS}, S.PENDING, {}),
    ],
)
def test_notify_conditions(notify: set[Notify] | None, state: RecipientState,
                           expected: dict[NoticeKind, list[str]]) -> None:
    r = rcpt(state=state, notify=None if notify is None else frozenset(notify))
    assert kinds(message(r)) == expected


def test_success_passed_on_to_a_dsn_capable_next_hop_is_theirs_to_report() -> None:
    r = rcpt(state=S.DELIVERED, notify=frozenset({Notify.SUCCESS}), remote_dsn=True)
    assert kinds(message(r)) == {}


def test_settled_recipients_are_not_reported_again() -> None:
    m = message(rcpt(notified=True), rcpt("c@x.test"))
    assert kinds(m) == {NoticeKind.FAILURE: ["c@x.test"]}
    assert to_settle(m) == ("c@x.test",)
    assert to_settle(message(rcpt(state=S.DEFERRED))) == ()


def test_delay_notices_follow_notify_and_the_warning_policy() -> None:
    asked = rcpt(state=S.DEFERRED, notify=frozenset({Notify.DELAY, Notify.FAILURE}))
    silent = rcpt("c@x.test", S.DEFERRED, notify=frozenset({Notify.FAILURE}))
    unsaid = rcpt("d@x.test", S.DEFERRED)
    m = message(asked, silent, unsaid)
    assert kinds(m, T0 + 4 * 3600 - 1) == {}
    assert kinds(m, T0 + 4 * 3600) == {NoticeKind.DELAY: ["bob@example.com"]}
    assert kinds(m, T0 + 3600, after=3600, when_notify_absent=True) == {
        NoticeKind.DELAY: ["bob@example.com", "d@x.test"]}
    warned = message(replace(asked, delay_notified=True), silent, unsaid)
    assert kinds(warned, T0 + 86400) == {}


def test_one_notice_per_kind() -> None:
    m = message(rcpt(), rcpt("c@x.test"),
                rcpt("d@x.test", S.RELAYED, notify=frozenset({Notify.SUCCESS})))
    assert kinds(m) == {NoticeKind.FAILURE: ["bob@example.com", "c@x.test"],
                        NoticeKind.SUCCESS: ["d@x.test"]}


# --- the report -------------------------------------------------------------------


def build(m: QueuedMessage, kind: NoticeKind = NoticeKind.FAILURE, *,
          original: bytes = HEADERS, full: bool = False) -> tuple[object, bytes]:
    [notice] = [n for n in notices(m, T0 + 120, DelayWarning(after=60)) if n.kind is kind]
    return build_dsn(m, notice, reporting_mta="mx.test", original=original, full=full,
                     now=T0 + 120, policy=RetryPolicy())


def parse(raw: bytes) -> email.message.EmailMessage:
    parsed = BytesParser(policy=default).parsebytes(raw)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def well_formed(raw: bytes) -> None:
    """Every line ends with CRLF (no bare CR or LF) and is at most 998 octets."""
    assert raw.endswith(b"\r\n")
    assert re.search(rb"(?<!\r)\n|\r(?!\n)", raw) is None
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def status_blocks(report: email.message.EmailMessage) -> list[email.message.Message]:
    parts = list(report.iter_parts())
    assert len(parts) == 3
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


def test_failure_report_structure() -> None:
    m = message(rcpt(orcpt=("rfc822", "Bob@Example.COM")),
                rcpt("c@x.test", diagnostic="connect to mx.x.test: refused", reply=None,
                     status="4.4.1", remote_mta=None))
    envelope, raw = build(m)
    well_formed(raw)
    assert envelope.sender is None  # type: ignore[attr-defined]
    assert [r.address for r in envelope.recipients] == ["alice@origin.test"]  # type: ignore[attr-defined]
    report = parse(raw)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["To"].addresses[0].addr_spec == "alice@origin.test"
    assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.test"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["Message-ID"].endswith("@mx.test>")
    human, status, original = report.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert "<bob@example.com>: 550 5.1.1 no such user" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status_blocks(report)
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert bob["Original-Recipient"] == "rfc822; Bob@Example.COM"
    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Action"] == "failed" and bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.com"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert bob["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:14:20 +0000"
    assert bob["Will-Retry-Until"] is None
    assert carol["Original-Recipient"] is None  # no ORCPT: no field (RFC 3464 2.3.1)
    assert carol["Status"] == "4.4.1"  # gave up on a temporary failure
    assert carol["Diagnostic-Code"] == "X-maitred; connect to mx.x.test: refused"
    assert carol["Remote-MTA"] is None
    assert original.get_content_type() == "text/rfc822-headers"
    returned = original.get_payload(decode=True)
    assert returned == HEADERS[:-2]  # the header block, its empty line excluded


def test_no_envid_no_field() -> None:
    _, raw = build(message(envid=None))
    assert status_blocks(parse(raw))[0]["Original-Envelope-Id"] is None


def test_ret_full_returns_the_message() -> None:
    m = message(ret=Ret.FULL)
    original, full = read_original(m, BytesIO(ORIGINAL))
    assert full and original == ORIGINAL
    _, raw = build(m, original=original, full=True)
    well_formed(raw)
    part = list(parse(raw).iter_parts())[2]
    assert part.get_content_type() == "message/rfc822"
    [inner] = part.get_payload()
    assert inner["Message-ID"] == "<orig-1@origin.test>"
    assert inner.get_payload() == "Dear Bob,\r\n\r\nthe numbers.\r\n"


@pytest.mark.parametrize(
    ("ret", "size", "body_type"),
    [(None, 100, None), (Ret.HDRS, 100, None), (Ret.FULL, MAX_RETURN_FULL + 1, None),
     (Ret.FULL, 100, BodyType.BINARY_MIME)],
)
def test_headers_only_otherwise(ret: Ret | None, size: int, body_type: BodyType | None) -> None:
    m = message(ret=ret, size=size, body_type=body_type)
    original, full = read_original(m, BytesIO(ORIGINAL))
    assert not full and original == HEADERS[:-2]


def test_read_original_is_bounded() -> None:
    endless = b"X-Long: " + b"y" * 100 + b"\r\n"
    original, full = read_original(message(), BytesIO(endless * 10_000), max_headers=1000)
    assert not full and len(original) <= 1000 and original.endswith(b"\r\n")
    # A message that lies about its size still returns at most max_full + headers.
    m = message(ret=Ret.FULL, size=10)
    original, full = read_original(m, BytesIO(HEADERS + b"z" * 5000), max_full=1000)
    assert not full and original == HEADERS[:-2]
    assert header_block(b"A: b\nC: d\n\nbody") == b"A: b\nC: d\n"
    assert header_block(b"no line end") == b"no line end"


def test_bare_line_ends_in_the_original_are_made_crlf() -> None:
    _, raw = build(message(), original=b"Subject: x\nFrom: a@b\n\nbody\rmore\n")
    well_formed(raw)
    part = list(parse(raw).iter_parts())[2]
    assert part.get_payload(decode=True) == b"Subject: x\r\nFrom: a@b\r\n"


def test_delay_report() -> None:
    m = message(rcpt(state=S.DEFERRED, notify=frozenset({Notify.DELAY})))
    _, raw = build(m, NoticeKind.DELAY)
    well_formed(raw)
    report = parse(raw)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    _, bob = status_blocks(report)
    assert bob["Action"] == "delayed" and bob["Status"] == "4.7.1"
    assert bob["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"  # T0 + 5 days
    assert "Sun, 19 Nov 2023 22:13:20 +0000" in next(report.iter_parts()).get_content()


def test_success_report_says_relayed_or_delivered() -> None:
    m = message(rcpt(state=S.RELAYED, notify=frozenset({Notify.SUCCESS}), status="2.0.0",
                     reply=QueueReply(250, "2.0.0", "queued as 42")),
                rcpt("c@x.test", S.DELIVERED, notify=frozenset({Notify.SUCCESS}),
                     reply=QueueReply(250, None, "ok")))
    _, raw = build(m, NoticeKind.SUCCESS)
    _, bob, carol = status_blocks(parse(raw))
    assert (bob["Action"], bob["Status"]) == ("relayed", "2.0.0")
    assert (carol["Action"], carol["Status"]) == ("delivered", "2.0.0")


def test_peer_text_cannot_add_fields_and_is_folded() -> None:
    evil = QueueReply(550, "5.7.1", "no\r\nX-Injected: yes\r\n\r\nFinal-Recipient: rfc822; x@y "
                      + "word " * 150)
    _, raw = build(message(rcpt(reply=evil, remote_mta="mx\r\nX-Evil: 1")))
    well_formed(raw)
    _, bob = status_blocks(parse(raw))
    assert bob["X-Injected"] is None and bob["X-Evil"] is None
    assert bob.get_all("Final-Recipient") == ["rfc822; bob@example.com"]
    assert bob["Diagnostic-Code"].startswith("smtp; 550 5.7.1 no X-Injected: yes")
    status_text = raw.split(b"message/delivery-status")[1]
    assert max(len(line) for line in status_text.split(b"\r\n")) <= 80


def test_utf8_addresses_make_a_global_report() -> None:
    m = message(rcpt("josé@exämple.com", orcpt=("utf-8", "José@exämple.com")),
                sender="ünï@côde.test")
    original = HEADERS.replace(b"Subject: quarterly report", "Subject: réunion".encode())
    envelope, raw = build(m, original=original)
    well_formed(raw)
    assert envelope.smtputf8  # type: ignore[attr-defined]
    assert envelope.body_type is BodyType.EIGHT_BIT_MIME  # type: ignore[attr-defined]
    report = parse(raw)
    assert report.get_param("report-type") == "global-delivery-status"
    # RFC 6532 raw UTF-8 header (the stdlib parser reads 8-bit headers as surrogates).
    assert "\r\nTo: <ünï@côde.test>\r\n".encode() in raw
    parts = list(report.iter_parts())
    assert parts[1].get_content_type() == "message/global-delivery-status"
    # The parser treats every message/* type as holding messages: read the raw part.
    text = raw.split(b"message/global-delivery-status")[1].decode("utf-8")
    assert "Final-Recipient: utf-8; josé@exämple.com\r\n" in text
    assert "Original-Recipient: utf-8; José@exämple.com\r\n" in text
    assert parts[2].get_content_type() == "message/global-headers"
    assert "réunion".encode() in raw.split(b"message/global-headers")[1]


def test_ascii_report_with_8bit_legacy_headers_stays_rfc822_headers() -> None:
    _, raw = build(message(), original=b"Subject: caf\xe9\r\n\r\n")
    part = list(parse(raw).iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part["Content-Transfer-Encoding"] == "8bit"


def test_non_ascii_reporting_host_becomes_an_a_label() -> None:
    m = message()
    [notice] = notices(m, T0)
    _, raw = build_dsn(m, notice, reporting_mta="mx.exämple.test", original=HEADERS,
                       full=False, now=T0)
    assert b"Reporting-MTA: dns; mx.xn--exmple-cua.test\r\n" in raw
    assert raw.split(b"\r\n\r\n")[0].isascii()


# --- an independent reader ----------------------------------------------------------

_BOUNCEPARSER = r"""
use strict; use warnings;
use Mail::DeliveryStatus::BounceParser;
local $/; my $raw = <STDIN>;
my $bounce = Mail::DeliveryStatus::BounceParser->new($raw);
print "is_bounce=", ($bounce->is_bounce ? 1 : 0), "\n";
print "orig_message_id=", ($bounce->orig_message_id // ""), "\n";
for my $r ($bounce->reports) {
    print join("|", map { $_ . "=" . ($r->get($_) // "") }
                    qw(email std_reason smtp_code Status Action)), "\n";
}
"""


def bounceparser(raw: bytes) -> list[str]:
    perl = shutil.which("perl")
    check = subprocess.run([perl or "perl", "-MMail::DeliveryStatus::BounceParser", "-e", "1"],
                           capture_output=True) if perl else None
    if check is None or check.returncode != 0:
        pytest.skip("Mail::DeliveryStatus::BounceParser is not installed (CI installs "
                    "libmail-deliverystatus-bounceparser-perl: .ci/run)")
    # As a Unix mailbox stores it (the MDA turns CRLF into LF): BounceParser splits
    # the per-recipient blocks at "\n\n", as it meets them in mbox and Maildir files.
    stored = raw.replace(b"\r\n", b"\n")
    out = subprocess.run([perl, "-e", _BOUNCEPARSER], input=stored, capture_output=True,
                         timeout=60, check=True)
    return [line for line in out.stdout.decode().splitlines() if line]


def test_bounceparser_reads_our_failure_report() -> None:
    m = message(rcpt(), rcpt("carol@example.net", status="5.2.2",
                              reply=QueueReply(552, "5.2.2", "mailbox full")))
    _, raw = build(m)
    lines = bounceparser(raw)
    assert lines[0] == "is_bounce=1"
    assert lines[1] == "orig_message_id=<orig-1@origin.test>"
    reports = [dict(f.split("=", 1) for f in line.split("|")) for line in lines[2:]]
    assert len(reports) == 2, lines
    bob, carol = sorted(reports, key=lambda r: r["email"])
    assert bob == {"email": "bob@example.com", "std_reason": "user_unknown",
                   "smtp_code": "550", "Status": "5.1.1", "Action": "failed"}
    assert carol["email"] == "carol@example.net" and carol["Status"] == "5.2.2"
    assert carol["std_reason"] == "over_quota" and carol["Action"] == "failed"


def test_bounceparser_reads_a_delay_report_as_no_bounce() -> None:
    m = message(rcpt(state=S.DEFERRED, notify=frozenset({Notify.DELAY})))
    _, raw = build(m, NoticeKind.DELAY)
    # It stops at the first Action other than failed/expanded: "not a bounce".
    assert bounceparser(raw)[0] == "is_bounce=0"
    # The same recipient given up on is one.
    _, raw = build(message(rcpt(status="4.7.1", reply=QueueReply(451, "4.7.1", "greylisted"))))
    lines = bounceparser(raw)
    assert lines[0] == "is_bounce=1"
    [report] = lines[2:]
    fields = dict(f.split("=", 1) for f in report.split("|"))
    assert fields["Action"] == "failed" and fields["Status"] == "4.7.1"
    assert fields["email"] == "bob@example.com" and fields["smtp_code"] == "451"
