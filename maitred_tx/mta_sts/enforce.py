"""Applying an MTA-STS policy to MX hosts (RFC 8461 4 and 5): pure decisions for a sender.

The sender asks, per candidate MX, :func:`check_mx` before connecting (may it use this
host? must it verify TLS?) and again after STARTTLS with what went wrong, if anything
(may it send the message?).  :func:`filter_mx` does the first question for a whole MX
list.  Section 5: in ``enforce`` mode a host that is not listed or whose TLS fails is not
used, and when no host is left the message stays queued (a temporary failure; 8.4: never
fall back to the implicit MX of RFC 5321 5.1); ``testing`` reports and delivers;
``none`` (or no policy) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from maitred_tx.auth.resolver import MX
from maitred_tx.mta_sts.policy import Mode, Policy
from maitred_tx.mta_sts.report import ResultType

__all__ = ["MxVerdict", "check_mx", "filter_mx"]

_Host = TypeVar("_Host", str, MX)


@dataclass(frozen=True, slots=True)
class MxVerdict:
    """What a sender may do with one MX host.

    ``deliver``: the message may go to this host.  ``validate_tls``: STARTTLS must be
    tried and the certificate checked against ``mx_host`` (RFC 8461 4.2: trusted chain,
    not expired, a DNS-ID matching the name), to enforce or to report.
    ``tls_required``: a TLS or certificate failure forbids delivery to this host.
    ``failure``: what to report (RFC 8460 result type), with ``reason`` for logs."""

    mx_host: str
    deliver: bool
    validate_tls: bool
    tls_required: bool
    failure: ResultType | None = None
    reason: str = ""


def check_mx(
    policy: Policy | None, mx_host: str, tls_failure: ResultType | None = None
) -> MxVerdict:
    """The verdict for ``mx_host`` under ``policy``; ``tls_failure`` is what STARTTLS
    or certificate validation found wrong with the host, None before trying or when all
    was well."""
    if policy is None or policy.mode is Mode.NONE:
        return MxVerdict(mx_host, deliver=True, validate_tls=False, tls_required=False)
    enforce = policy.mode is Mode.ENFORCE
    if not policy.matches(mx_host):
        return MxVerdict(
            mx_host,
            deliver=not enforce,
            validate_tls=False,
            tls_required=False,
            failure=ResultType.VALIDATION_FAILURE,
            reason=f"MX {mx_host} is not listed in the MTA-STS policy",
        )
    if tls_failure is not None:
        return MxVerdict(
            mx_host,
            deliver=not enforce,
            validate_tls=True,
            tls_required=enforce,
            failure=tls_failure,
            reason=f"MX {mx_host}: {tls_failure.value}",
        )
    return MxVerdict(mx_host, deliver=True, validate_tls=True, tls_required=enforce)


def filter_mx(
    policy: Policy | None, mx_hosts: Iterable[_Host]
) -> tuple[list[_Host], list[_Host]]:
    """Split MX hosts (names or ``MX`` records, order kept) into ``(allowed, refused)``.

    ``refused`` holds the hosts the policy does not list; in ``enforce`` mode they are
    left out of ``allowed``, in ``testing`` mode they stay in it (report them), with no
    policy or mode ``none`` nothing is refused.  An empty ``allowed`` under ``enforce``
    means: keep the message queued and try again later."""
    allowed: list[_Host] = []
    refused: list[_Host] = []
    for host in mx_hosts:
        name = host if isinstance(host, str) else host.exchange
        verdict = check_mx(policy, name)
        if verdict.failure is not None:
            refused.append(host)
        if verdict.deliver:
            allowed.append(host)
    return allowed, refused
