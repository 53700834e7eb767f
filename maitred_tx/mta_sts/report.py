"""TLS failure accounting and the RFC 8460 (SMTP TLS Reporting) JSON report.

A sender counts, per recipient domain and applied policy, its successful and failed TLS
sessions (RFC 8460 4.4 ``summary``) and the details of failures (4.4
``failure-details``, result types of 4.3).  ``TlsReport.render`` builds the report
object of 4.4 for one domain; delivering it (``rua=mailto:`` / ``https:``, 3) and the
``_smtp._tls`` record are left to the caller.

``dump_state`` / ``load_state`` turn the counts and the start of their period into JSON
and back, so that the glue can keep them across a restart (``relay.reports``); the
loader checks every field and refuses anything else with a ValueError.

Pure: stdlib and ``policy`` only; the report period and id are the caller's.
"""

from __future__ import annotations

import enum
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from maitred_tx.mta_sts.policy import Policy, StsError, ascii_domain, parse_policy

__all__ = ["FailureDetail", "ResultType", "TlsReport", "dump_state", "load_state"]

# Distinct failure details kept per domain and policy; beyond it failures are still
# counted in the summary.  An attacker cannot grow the report without bound by varying
# reasons or addresses.
MAX_DETAILS: Final = 100
# The saved counts' format (``dump_state``); a loader meeting another refuses it.
STATE_VERSION: Final = 1
_DETAIL_FIELDS: Final = ("mx_host", "sending_ip", "receiving_ip", "reason")


class ResultType(enum.Enum):
    """RFC 8460 4.3 result types that MTA-STS senders can meet."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"  # e.g. an MX not listed in the policy
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


@dataclass(frozen=True, slots=True)
class FailureDetail:
    """One kind of failure (4.4 ``failure-details`` entry without its count)."""

    result_type: ResultType
    mx_host: str | None = None
    sending_ip: str | None = None
    receiving_ip: str | None = None
    reason: str | None = None  # 4.4 "failure-reason-code": free text for humans

    def to_json(self, count: int) -> dict[str, object]:
        out: dict[str, object] = {"result-type": self.result_type.value}
        for key, value in (
            ("sending-mta-ip", self.sending_ip),
            ("receiving-mx-hostname", self.mx_host),
            ("receiving-ip", self.receiving_ip),
        ):
            if value is not None:
                out[key] = value
        out["failed-session-count"] = count
        if self.reason is not None:
            out["failure-reason-code"] = self.reason
        return out


@dataclass(slots=True)
class _Sessions:
    policy: Policy | None
    successes: int = 0
    failures: int = 0
    details: Counter[FailureDetail] = field(default_factory=Counter)


class TlsReport:
    """Session counters for one reporting period, grouped by domain and policy."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, tuple[str, ...] | None], _Sessions] = {}
        # Grows with every change: the glue saves the counts only when it moved.
        self.changes = 0

    def _entry(self, domain: str, policy: Policy | None) -> _Sessions:
        key = (_policy_domain(domain), tuple(policy.lines()) if policy else None)
        entry = self._sessions.get(key)
        if entry is None:
            entry = self._sessions[key] = _Sessions(policy)
        return entry

    def record_success(self, domain: str, policy: Policy | None) -> None:
        """One session to ``domain`` that met its policy."""
        self._entry(domain, policy).successes += 1
        self.changes += 1

    def record_failure(self, domain: str, policy: Policy | None, detail: FailureDetail) -> None:
        """One failed session (or policy fetch) for ``domain`` under ``policy`` (None:
        no policy could be applied)."""
        entry = self._entry(domain, policy)
        entry.failures += 1
        if detail in entry.details or len(entry.details) < MAX_DETAILS:
            entry.details[detail] += 1
        self.changes += 1

    def merge(self, other: TlsReport) -> None:
        """Add ``other``'s counts to these (counts restored after a restart join those
        recorded since), keeping at most MAX_DETAILS details per domain and policy."""
        for (domain, _), theirs in other._sessions.items():
            entry = self._entry(domain, theirs.policy)
            entry.successes += theirs.successes
            entry.failures += theirs.failures
            for detail, count in theirs.details.items():
                if detail in entry.details or len(entry.details) < MAX_DETAILS:
                    entry.details[detail] += count
        self.changes += 1

    def domains(self) -> list[str]:
        """The domains with anything recorded, sorted."""
        return sorted({domain for domain, _ in self._sessions})

    def failures(self, domain: str) -> dict[FailureDetail, int]:
        """All failure details recorded for ``domain``, with their counts."""
        total: Counter[FailureDetail] = Counter()
        domain = _policy_domain(domain)
        for (name, _), entry in self._sessions.items():
            if name == domain:
                total.update(entry.details)
        return dict(total)

    def clear(self) -> None:
        """Start a new reporting period."""
        self._sessions.clear()
        self.changes += 1

    def take(self) -> TlsReport:
        """The counts so far, as a report of their own, and a new period here: at
        midnight the day's counts are taken, then sent later while the next day's
        sessions are counted apart (RFC 8460 4.1: a report covers one day)."""
        ended = TlsReport()
        ended._sessions, self._sessions = self._sessions, {}
        self.changes += 1
        return ended

    def render(
        self,
        domain: str,
        *,
        organization: str,
        contact: str,
        report_id: str,
        start: datetime,
        end: datetime,
    ) -> dict[str, object]:
        """The RFC 8460 4.4 report object for ``domain`` (``json.dumps`` it)."""
        domain = _policy_domain(domain)
        policies = [
            _policy_json(domain, entry)
            for (name, _), entry in self._sessions.items()
            if name == domain
        ]
        return {
            "organization-name": organization,
            "date-range": {"start-datetime": _rfc3339(start), "end-datetime": _rfc3339(end)},
            "contact-info": contact,
            "report-id": report_id,
            "policies": policies,
        }


def dump_state(report: TlsReport, since: float) -> bytes:
    """``report``'s counts and the start of their period (``since``, seconds since the
    epoch) as JSON, versioned, for ``load_state``."""
    sessions = []
    for (domain, _), entry in report._sessions.items():
        details = []
        for detail, count in entry.details.items():
            fields: dict[str, object] = {"result_type": detail.result_type.value}
            for name in _DETAIL_FIELDS:
                if getattr(detail, name) is not None:
                    fields[name] = getattr(detail, name)
            fields["count"] = count
            details.append(fields)
        sessions.append({
            "domain": domain,
            "policy": entry.policy.to_text() if entry.policy is not None else None,
            "successes": entry.successes,
            "failures": entry.failures,
            "details": details,
        })
    state = {"version": STATE_VERSION, "since": since, "sessions": sessions}
    return json.dumps(state, indent=1).encode("utf-8")


def load_state(raw: bytes) -> tuple[TlsReport, float]:
    """Read back ``dump_state``'s output: the counts and the start of their period.

    Anything else (not JSON, another version, a field missing, of the wrong type or
    out of range) raises ValueError saying where: the file is ours, but a crash, a
    full disk or a hand edit must cost the counts, never the start-up."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"version {data.get('version')!r}, not {STATE_VERSION}")
    since = data.get("since")
    if isinstance(since, bool) or not isinstance(since, int | float) or not (
            math.isfinite(since) and since >= 0):
        raise ValueError(f"bad period start {since!r}")
    sessions = data.get("sessions")
    if not isinstance(sessions, list):
        raise ValueError("no sessions list")
    report = TlsReport()
    for index, item in enumerate(sessions):
        try:
            _load_sessions(report, item)
        except ValueError as exc:
            raise ValueError(f"sessions[{index}]: {exc}") from None
    return report, float(since)


def _load_sessions(report: TlsReport, item: object) -> None:
    if not isinstance(item, dict):
        raise ValueError("not an object")
    domain, text = item.get("domain"), item.get("policy")
    if not isinstance(domain, str) or not domain or _policy_domain(domain) != domain:
        raise ValueError(f"bad domain {domain!r}")
    if text is None:
        policy = None
    elif isinstance(text, str):
        try:
            policy = parse_policy(text)
        except StsError as exc:
            raise ValueError(f"bad policy: {exc}") from None
    else:
        raise ValueError("bad policy")
    key = (domain, tuple(policy.lines()) if policy else None)
    if key in report._sessions:
        raise ValueError(f"{domain} and its policy given twice")
    entry = _Sessions(policy, _count(item.get("successes"), "successes"),
                      _count(item.get("failures"), "failures"))
    details = item.get("details")
    if not isinstance(details, list) or len(details) > MAX_DETAILS:
        raise ValueError(f"details: not a list of at most {MAX_DETAILS}")
    for fields in details:
        detail, count = _load_detail(fields)
        if detail in entry.details or count < 1:
            raise ValueError(f"detail {fields!r} repeated or not counted")
        entry.details[detail] = count
    if entry.details.total() > entry.failures:
        raise ValueError("more failure details than failures")
    report._sessions[key] = entry


def _load_detail(fields: object) -> tuple[FailureDetail, int]:
    if not isinstance(fields, dict):
        raise ValueError("a detail is not an object")
    try:
        result_type = ResultType(fields.get("result_type"))
    except ValueError:
        raise ValueError(f"bad result type {fields.get('result_type')!r}") from None
    values: list[str | None] = []
    for name in _DETAIL_FIELDS:
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"bad {name} {value!r}")
        values.append(value)
    detail = FailureDetail(result_type, *values)
    return detail, _count(fields.get("count"), "count")


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"bad {what} {value!r}")
    return value


def _policy_domain(domain: str) -> str:
    """4.4 "policy-domain": lower-case A-labels ("the Punycode-encoded A-label ... and
    not the U-label"), whichever form the caller had (U-labels under SMTPUTF8)."""
    try:
        return ascii_domain(domain)
    except StsError:  # not a domain name: kept as given, never a policy of ours
        return domain.lower().rstrip(".")


def _policy_json(domain: str, entry: _Sessions) -> dict[str, object]:
    if entry.policy is None:
        policy: dict[str, object] = {"policy-type": "no-policy-found", "policy-domain": domain}
    else:
        policy = {
            "policy-type": "sts",
            "policy-string": entry.policy.lines(),
            "policy-domain": domain,
            "mx-host": list(entry.policy.mx),
        }
    out: dict[str, object] = {
        "policy": policy,
        "summary": {
            "total-successful-session-count": entry.successes,
            "total-failure-session-count": entry.failures,
        },
    }
    if entry.details:
        out["failure-details"] = [d.to_json(n) for d, n in entry.details.items()]
    return out


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("report times must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
