"""RFC 8460 (SMTP TLS Reporting) for senders, the pure half: the ``_smtp._tls`` TXT
record (3) and the report as it is delivered (4.1 period, 5.1 filename, 5.2 gzip,
5.3 email, 5.4 HTTPS media type).  ``report.TlsReport`` counts the sessions and
renders the JSON object (4.4); the glue (``maitred_tx.relay.reports``) looks the
record up, queues the mail and POSTs.

Pure: stdlib and ``policy`` only; time, ids and addresses are the caller's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import Final
from urllib.parse import unquote, urlsplit

from maitred_tx.mta_sts.policy import StsError, ascii_domain

__all__ = [
    "GZIP_MEDIA_TYPE",
    "REPORT_TRANSACTION_PREFIX",
    "NoTlsRptRecord",
    "ReportPeriod",
    "TlsRptError",
    "TlsRptRecord",
    "build_report_mail",
    "gzip_report",
    "is_report_transaction",
    "parse_tlsrpt_record",
    "report_filename",
    "select_tlsrpt_record",
]

# 5.3/5.4 and IANA (6): the compressed report's media type, by mail and by POST.
GZIP_MEDIA_TYPE: Final = "application/tlsrpt+gzip"
# The queue's transaction id of a report we queued.  The sender sends such a message
# without applying MTA-STS and without counting its session (5.3: "MUST deliver
# reports despite any TLS-related failures and SHOULD NOT include this SMTP session in
# the next report"), which also keeps a report from begetting reports.  The SMTP
# server's ids are hex digits (server.policy.new_id): never this prefix.
REPORT_TRANSACTION_PREFIX: Final = "tlsrpt."
# 3: "v=TLSRPTv1", then field-delim = *WSP ";" *WSP.
_VERSION: Final = re.compile(r"v=TLSRPTv1[ \t]*(?:;|$)")
# 3: tlsrpt-ext-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
_EXT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
# 3: tlsrpt-ext-value = 1*(%x21-3A / %x3C / %x3E-7E)  (no "=", ";", space, controls)
_EXT_VALUE: Final = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# Largest record we parse; DNS answers are bounded anyway (a TXT RR is < 64 KiB).
MAX_RECORD: Final = 8192
# rua URIs used from one record: a domain cannot make us send one report to a crowd.
MAX_RUA: Final = 10


class TlsRptError(ValueError):
    """A ``_smtp._tls`` answer that does not give one valid record (3: the domain is
    then treated as not implementing TLSRPT)."""


class NoTlsRptRecord(TlsRptError):
    """No record beginning with ``v=TLSRPTv1`` at all."""


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """A valid record: where reports go.  ``mailto``: addresses (local@domain);
    ``https``: URLs to POST to.  URIs of other schemes are ignored (3: "Two URI
    schemes are supported: mailto and https")."""

    mailto: tuple[str, ...]
    https: tuple[str, ...]


def parse_tlsrpt_record(text: str) -> TlsRptRecord:
    """One TXT record (its strings already joined) or TlsRptError saying why not.

    3: ``v=TLSRPTv1`` first; ``rua=`` required, a comma-separated list of URIs;
    unknown extension fields are ignored if well-formed ("Parsers MUST accept TXT
    records that are syntactically valid ... unknown fields SHALL be ignored")."""
    if len(text) > MAX_RECORD:
        raise TlsRptError(f"record longer than {MAX_RECORD} characters")
    if not _VERSION.match(text):
        raise NoTlsRptRecord("the record does not begin with v=TLSRPTv1")
    fields = [f.strip(" \t") for f in text.split(";")][1:]
    if fields and fields[-1] == "":
        fields.pop()  # 3: a trailing field-delim is allowed
    rua: list[str] | None = None
    for field in fields:
        name, eq, value = field.partition("=")
        if not eq or not _EXT_NAME.fullmatch(name):
            raise TlsRptError(f"malformed field {field[:60]!r}")
        if name == "rua":
            if rua is not None:
                raise TlsRptError("rua= given twice")
            rua = [u.strip(" \t") for u in value.split(",")]
            if any(not u for u in rua):
                raise TlsRptError("rua= has an empty URI")
        elif name == "v" or not _EXT_VALUE.fullmatch(value):
            raise TlsRptError(f"malformed field {field[:60]!r}")
    if rua is None:
        raise TlsRptError("no rua= field")
    mailto: list[str] = []
    https: list[str] = []
    for uri in rua[:MAX_RUA]:
        scheme = uri.partition(":")[0].lower()
        if scheme == "mailto":
            mailto.extend(a for a in _mailto_addresses(uri) if a not in mailto)
        elif scheme == "https":
            https.append(_https_url(uri))
    if not mailto and not https:
        raise TlsRptError("rua= has no mailto: or https: URI")
    return TlsRptRecord(tuple(mailto), tuple(https))


def select_tlsrpt_record(texts: Iterable[str | Sequence[str]]) -> TlsRptRecord:
    """The record of a ``_smtp._tls`` TXT answer.  Each item is one TXT record, its
    character-strings joined or as a sequence (joined here with nothing between, as
    DNS TXT strings are).  3: records not beginning with ``v=TLSRPTv1`` are
    discarded; "If the number of resulting records is not one, or if the resulting
    record is syntactically invalid, senders MUST assume the recipient domain does
    not implement TLSRPT": NoTlsRptRecord or TlsRptError."""
    joined = [t if isinstance(t, str) else "".join(t) for t in texts]
    candidates = [t for t in joined if _VERSION.match(t)]
    if not candidates:
        raise NoTlsRptRecord("no v=TLSRPTv1 record")
    if len(candidates) > 1:
        raise TlsRptError(f"{len(candidates)} v=TLSRPTv1 records (exactly one is valid)")
    return parse_tlsrpt_record(candidates[0])


def _mailto_addresses(uri: str) -> list[str]:
    """RFC 6068: ``mailto:addr[,addr][?headers]``, percent-encoded (3: commas in a
    tlsrpt-uri are encoded, so an encoded comma separates addresses here)."""
    path = uri.partition(":")[2].partition("?")[0]
    out = []
    for address in unquote(path).split(","):
        address = address.strip()
        local, at, domain = address.rpartition("@")
        if not at or not local or "@" in local or any(c in address for c in ' \t<>"()[]\\'):
            raise TlsRptError(f"rua= has an invalid mailto: URI {uri[:80]!r}")
        try:
            domain = ascii_domain(domain)
        except StsError:
            raise TlsRptError(f"rua= mailto: domain {domain[:80]!r} is invalid") from None
        out.append(f"{local}@{domain}")
    return out


def _https_url(uri: str) -> str:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise TlsRptError(f"rua= has an invalid https: URI {uri[:80]!r}") from None
    if not parts.hostname or any(c.isspace() for c in uri):
        raise TlsRptError(f"rua= has an invalid https: URI {uri[:80]!r}")
    return uri


def is_report_transaction(transaction_id: str | None) -> bool:
    """Whether a queued message is a TLS report we queued (REPORT_TRANSACTION_PREFIX)."""
    return transaction_id is not None and transaction_id.startswith(REPORT_TRANSACTION_PREFIX)


# --- the report period (4.1) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportPeriod:
    """One report's time range.  4.1: "The report SHOULD cover a full day, from
    00:00-24:00 UTC"; ``start`` is later when counting began during that day (a
    process started then with no saved counts of that day), so the range says what
    was counted.  ``end`` is the last second in the range (4.4's example ends at
    23:59:59Z)."""

    start: datetime
    end: datetime

    @classmethod
    def day_before(cls, moment: float, counted_since: float | None = None) -> ReportPeriod:
        """The UTC day that ended at or before ``moment`` (seconds since the epoch)."""
        today = datetime.fromtimestamp(moment, UTC).replace(
            hour=0, minute=0, second=0, microsecond=0)
        start = today - timedelta(days=1)
        if counted_since is not None:
            since = datetime.fromtimestamp(int(counted_since), UTC)
            start = min(max(start, since), today - timedelta(seconds=1))
        return cls(start, today - timedelta(seconds=1))

    @property
    def begin_timestamp(self) -> int:
        return int(self.start.timestamp())

    @property
    def end_timestamp(self) -> int:
        return int(self.end.timestamp())


def next_midnight(moment: float) -> float:
    """The next 00:00 UTC strictly after ``moment``."""
    day = datetime.fromtimestamp(moment, UTC).replace(hour=0, minute=0, second=0,
                                                      microsecond=0)
    return (day + timedelta(days=1)).timestamp()


# --- the report as delivered (5) ------------------------------------------------------


def report_filename(submitter: str, policy_domain: str, period: ReportPeriod,
                    unique_id: str | None = None) -> str:
    """5.1: ``sender "!" policy-domain "!" begin-timestamp "!" end-timestamp
    ["!" unique-id] ".json.gz"``, the domains as A-labels, unique-id 1*(ALPHA/DIGIT)."""
    if unique_id is not None and not (unique_id.isascii() and unique_id.isalnum()):
        raise ValueError(f"unique-id must be letters and digits: {unique_id!r}")
    parts = [ascii_domain(submitter), ascii_domain(policy_domain),
             str(period.begin_timestamp), str(period.end_timestamp)]
    if unique_id:
        parts.append(unique_id)
    return "!".join(parts) + ".json.gz"


def gzip_report(report: dict[str, object]) -> bytes:
    """5.2/5.3: the JSON report gzip'd (mtime 0: the same report, the same bytes)."""
    text = json.dumps(report, separators=(",", ":"), ensure_ascii=True)
    return gzip.compress(text.encode("ascii"), mtime=0)


def build_report_mail(
    compressed: bytes,
    *,
    policy_domain: str,
    submitter: str,
    report_id: str,
    organization: str,
    from_address: str,
    to_addresses: Sequence[str],
    filename: str,
    message_id: str,
    date: datetime,
    period: ReportPeriod,
) -> bytes:
    """5.3: a ``multipart/report; report-type="tlsrpt"`` message: a short text/plain
    part, then the gzip'd report as ``application/tlsrpt+gzip`` named ``filename``;
    ``TLS-Report-Domain`` and ``TLS-Report-Submitter`` header fields, and the
    Subject "Report Domain: <domain> Submitter: <submitter> Report-ID: <<id>>"
    (report_id is id-left "@" id-right, shown in angle brackets as the ABNF says).
    CRLF line endings, ready for the queue."""
    domain = ascii_domain(policy_domain)
    sender_domain = ascii_domain(submitter)
    message = EmailMessage(policy=SMTP)
    message["From"] = from_address
    message["To"] = ", ".join(to_addresses)
    message["Date"] = format_datetime(date.astimezone(UTC))
    message["Message-ID"] = message_id
    message["Subject"] = (f"Report Domain: {domain} Submitter: {sender_domain} "
                          f"Report-ID: <{report_id}>")
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = sender_domain
    # RFC 3834 5: generated automatically, not a reply: no vacation responder answers.
    message["Auto-Submitted"] = "auto-generated"
    text = (f"This is an aggregate TLS report (RFC 8460) from {organization} "
            f"({sender_domain})\nfor the policy domain {domain}, covering "
            f"{period.start:%Y-%m-%dT%H:%M:%SZ} to {period.end:%Y-%m-%dT%H:%M:%SZ}.\n"
            f"The report is attached as {filename}.\n")
    if text.isascii():
        message.set_content(text, charset="us-ascii", cte="7bit")
    else:  # a non-ASCII organization name
        message.set_content(text, charset="utf-8", cte="quoted-printable")
    message.add_attachment(compressed, maintype="application", subtype="tlsrpt+gzip",
                           filename=filename)
    # add_attachment made it multipart/mixed: 5.3's media type instead.  The boundary
    # cannot occur in the parts: "-" is not in base64, and the text has no "=_".
    boundary = "=_tlsrpt_" + hashlib.sha256(compressed).hexdigest()[:32]
    del message["Content-Type"]
    message["Content-Type"] = f'multipart/report; report-type="tlsrpt"; boundary="{boundary}"'
    return message.as_bytes(policy=SMTP)
