"""TLS failure accounting and the RFC 8460 (SMTP TLS Reporting) JSON report.

A sender counts, per recipient domain and applied policy, its successful and failed TLS
sessions (RFC 8460 4.4 ``summary``) and the details of failures (4.4
``failure-details``, result types of 4.3).  ``TlsReport.render`` builds the report
object of 4.4 for one domain; delivering it (``rua=mailto:`` / ``https:``, 3) and the
``_smtp._tls`` record are left to the caller.

Pure: stdlib and ``policy`` only; the report period and id are the caller's.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from maitred_tx.mta_sts.policy import Policy, StsError, ascii_domain

__all__ = ["FailureDetail", "ResultType", "TlsReport"]

# Distinct failure details kept per domain and policy; beyond it failures are still
# counted in the summary.  An attacker cannot grow the report without bound by varying
# reasons or addresses.
MAX_DETAILS: Final = 100


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

    def _entry(self, domain: str, policy: Policy | None) -> _Sessions:
        key = (_policy_domain(domain), tuple(policy.lines()) if policy else None)
        entry = self._sessions.get(key)
        if entry is None:
            entry = self._sessions[key] = _Sessions(policy)
        return entry

    def record_success(self, domain: str, policy: Policy | None) -> None:
        """One session to ``domain`` that met its policy."""
        self._entry(domain, policy).successes += 1

    def record_failure(self, domain: str, policy: Policy | None, detail: FailureDetail) -> None:
        """One failed session (or policy fetch) for ``domain`` under ``policy`` (None:
        no policy could be applied)."""
        entry = self._entry(domain, policy)
        entry.failures += 1
        if detail in entry.details or len(entry.details) < MAX_DETAILS:
            entry.details[detail] += 1

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

    def take(self) -> TlsReport:
        """The counts so far, as a report of their own, and a new period here: at
        midnight the day's counts are taken, then sent later while the next day's
        sessions are counted apart (RFC 8460 4.1: a report covers one day)."""
        ended = TlsReport()
        ended._sessions, self._sessions = self._sessions, {}
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
