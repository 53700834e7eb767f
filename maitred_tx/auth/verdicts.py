"""Every verdict about one message, and the listener's policy on them: pure.

``check_spf`` and ``check_message`` are the whole per-message pipeline (SPF for HELO and
MAIL FROM, DKIM, ARC, DMARC, our Authentication-Results field, the forged fields taken
out) written against the ``Resolver`` interface and a ``CPURunner``: no Twisted, no
threads, no clock of their own.  ``maitred_tx.auth.checks`` runs them off the reactor
thread (``maitred_tx.auth.offthread``); tests run them on asyncio with a zone as data.
"""

from __future__ import annotations

import asyncio
import functools
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar

from maitred_tx.auth import spf
from maitred_tx.auth.arc import ARCResult, verify_arc
from maitred_tx.auth.authresults import (
    DKIMEntry,
    SPFEntry,
    format_authentication_results,
    strip_forged,
)
from maitred_tx.auth.dkim import CPURunner, DKIMResult, header_fields, lenient_tags, verify_dkim
from maitred_tx.auth.dmarc import DMARCVerdict, check_dmarc_authors
from maitred_tx.auth.headers import from_domains, header_end
from maitred_tx.auth.resolver import Resolver
from maitred_tx.smtp import replies as R
from maitred_tx.smtp.config import AuthChecks, AuthTempError
from maitred_tx.smtp.replies import Reply

__all__ = [
    "SPF_TIMEOUT",
    "AuthResults",
    "SPFPair",
    "SPFRequest",
    "Verdict",
    "check_message",
    "check_spf",
    "decide",
]

# The SPF evaluation as a whole (up to 10 DNS-querying terms, RFC 7208 4.6.4, each with
# the resolver's own timeout): RFC 7208 4.6.4 asks for an overall limit "at least 20
# seconds"; past it the result is temperror.
SPF_TIMEOUT: Final = 20.0

SPFPair: TypeAlias = "tuple[spf.SPFVerdict, spf.SPFVerdict]"  # (helo, mailfrom)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class AuthResults:
    """Every verdict about one message, handed to the delivery as ``Envelope.auth``.

    ``spf_helo`` / ``spf_mailfrom``: None when SPF could not run (the client address is
    no IP address, e.g. a UNIX socket).  ``mail_from``: the reverse-path, None for the
    null path (then the MAIL FROM check is the HELO one, RFC 7208 2.4, and only
    ``smtp.helo`` is reported).  ``dkim``: one result per DKIM-Signature, in header
    order.  ``arc``: None when not evaluated (message too large).  ``dkim_skipped``:
    why signatures were not verified, None when they were.
    """

    spf_helo: spf.SPFVerdict | None
    spf_mailfrom: spf.SPFVerdict | None
    mail_from: str | None
    dkim: tuple[DKIMResult, ...]
    arc: ARCResult | None
    dmarc: DMARCVerdict
    dkim_skipped: str | None = None

    def header(self, authserv_id: str) -> bytes:
        """Our one Authentication-Results field, CRLF-terminated (RFC 8601 2.2)."""
        return _header(self, authserv_id)

    def _format(self, authserv_id: str) -> bytes:
        entries: list[SPFEntry] = []
        if self.spf_mailfrom is not None and self.mail_from:
            entries.append(SPFEntry(self.spf_mailfrom.result, self.mail_from, "mailfrom"))
        if self.spf_helo is not None:
            entries.append(SPFEntry(self.spf_helo.result, _printable(self.spf_helo.domain),
                                    "helo"))
        dkim = [
            DKIMEntry(r.result, _printable(r.domain), _printable(r.selector), _printable(r.b))
            for r in self.dkim
        ] or [DKIMEntry("none")]
        return format_authentication_results(
            authserv_id, spf=entries, dkim=dkim, arc=self.arc, dmarc=self.dmarc
        )

    def temporary(self) -> list[str]:
        """The checks whose temporary DNS error could change the verdict: DMARC's own,
        or, when DMARC did not pass, SPF (MAIL FROM) and DKIM temperrors (a pass among
        them could have made DMARC pass).  A HELO temperror alone never matters."""
        if self.dmarc.result == "pass":
            return []
        found = []
        mailfrom = self.spf_mailfrom
        if mailfrom is not None and mailfrom.result is spf.SPFResult.TEMPERROR:
            found.append("spf")
        if any(r.result == "temperror" for r in self.dkim):
            found.append("dkim")
        if self.dmarc.result == "temperror":
            found.append("dmarc")
        return found

    def summary(self) -> str:
        """One line for the log: ``spf=pass dkim=pass,fail arc=none dmarc=pass``."""
        spf_result = self.spf_mailfrom.result.value if self.spf_mailfrom else "-"
        dkim = ",".join(r.result for r in self.dkim) or "none"
        arc = self.arc.result if self.arc else "-"
        return f"spf={spf_result} dkim={dkim} arc={arc} dmarc={self.dmarc.result}"


@functools.lru_cache(maxsize=1024)
def _header(results: AuthResults, authserv_id: str) -> bytes:
    """Formatting the field is a good part of the checks' cost, and mail from one
    sender gets the same verdicts message after message: cached by value."""
    return results._format(authserv_id)


def _printable(text: str | None) -> str | None:
    """A value from the message for the header, or None when it holds control
    characters (which would let it forge header lines, RFC 8601 2.2)."""
    if text is None or any(ord(c) < 32 or ord(c) == 127 for c in text):
        return None
    return text


def decide(results: AuthResults, settings: AuthChecks,
           temporary: Sequence[str] | None = None) -> Reply | None:
    """The listener's policy: a refusal for the message, or None to deliver it.

    A temporary error that could change the verdict is deferred (451) when asked; a
    DMARC failure under p=reject is refused (550) when asked, but only when no
    temporary error and no unverified (oversized) signature could have made it pass.
    ``temporary``: ``results.temporary()`` when the caller has it already.
    """
    if temporary is None:
        temporary = results.temporary()
    if temporary and settings.temperror is AuthTempError.DEFER:
        return R.R451_AUTH_TEMPERROR.format(checks=", ".join(temporary))
    dmarc = results.dmarc
    if (settings.dmarc_reject and dmarc.result == "fail" and dmarc.disposition == "reject"
            and not temporary and results.dkim_skipped is None):
        return R.R550_DMARC_REJECT.format(domain=dmarc.from_domain)
    return None


async def check_spf(
    resolver: Resolver,
    ip: str,
    mail_from: str | None,
    helo: str,
    *,
    receiver: str,
    timeout: float = SPF_TIMEOUT,
) -> SPFPair:
    """The HELO and MAIL FROM verdicts (``spf.check``) within ``timeout`` seconds; never
    raises: past the timeout, or on a bug, both are temperror with the reason."""
    try:
        async with asyncio.timeout(timeout):
            return await spf.check(resolver, ip, mail_from, helo, receiver=receiver)
    except TimeoutError:
        reason, error = f"SPF evaluation took longer than {timeout:g}s", None
    except Exception as exc:  # a bug must not lose the message: temperror, reason kept
        reason = f"SPF evaluation failed: {type(exc).__name__}: {exc}"
        error = traceback.format_exc()  # the glue logs it (checks.CheckingSink)
    domain = mail_from.rpartition("@")[2] if mail_from else helo
    temp = spf.SPFResult.TEMPERROR
    return (spf.SPFVerdict(temp, "helo", helo, reason=reason, error=error),
            spf.SPFVerdict(temp, "mailfrom", domain, reason=reason, error=error))


@dataclass(frozen=True, slots=True)
class SPFRequest:
    """What the SPF checks of one message need (``check_spf``): the client's address,
    the reverse-path (None: the null path), the HELO name, our host name (%{r})."""

    ip: str
    mail_from: str | None
    helo: str
    receiver: str
    timeout: float = SPF_TIMEOUT

    async def check(self, resolver: Resolver) -> SPFPair | None:
        """Both verdicts; None when the client address is no IP address (a UNIX
        socket), where SPF cannot apply."""
        try:
            spf.client_address(self.ip)
        except ValueError:
            return None
        return await check_spf(resolver, self.ip, self.mail_from, self.helo,
                               receiver=self.receiver, timeout=self.timeout)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one spooled message.

    ``results``: None when the checks themselves failed (``error`` says how); the
    message is then delivered without our field, forged ones still removed.
    ``refusal``: the policy's reply instead of delivery, or None.  ``prefix``: what the
    delivery gets first, our Authentication-Results field and the header block without
    forgeries; then the spooled message from ``offset`` on.
    """

    results: AuthResults | None
    refusal: Reply | None
    prefix: bytes
    offset: int
    error: str | None = None


async def check_message(
    resolver: Resolver,
    run_cpu: CPURunner,
    *,
    first: bytes,
    size: int,
    read: Callable[[], Awaitable[bytes]],
    spf: SPFRequest | None,
    mail_from: str | None,
    settings: AuthChecks,
    authserv_id: str,
) -> Verdict:
    """The verdict for a message of ``size`` octets whose first octets are ``first``
    (at least the header block and its blank line, or the whole message); ``read()``
    gives all of it, and is only called when there are signatures to verify.  ``spf``:
    None when SPF cannot apply (the client address is no IP address)."""
    end = header_end(first)
    if end is None:  # no body: all of it is header when it fits
        end = len(first) if len(first) == size else 0
    head = first[:end]
    try:
        results = await _results(resolver, run_cpu, head, size, read, spf, mail_from,
                                 settings)
    except Exception:
        return Verdict(None, None, strip_forged(head, authserv_id), end,
                       error=traceback.format_exc())
    prefix = results.header(authserv_id) + strip_forged(head, authserv_id)
    return Verdict(results, decide(results, settings), prefix, end)


async def _results(
    resolver: Resolver,
    run_cpu: CPURunner,
    head: bytes,
    size: int,
    read: Callable[[], Awaitable[bytes]],
    spf_request: SPFRequest | None,
    mail_from: str | None,
    settings: AuthChecks,
) -> AuthResults:
    lower = head.lower()
    signed = sealed = False
    if b"dkim-signature" in lower or b"arc-" in lower:  # else surely neither: no parse
        names = {name.lower() for name, _ in header_fields(head)}
        signed = b"dkim-signature" in names
        sealed = any(n.startswith(b"arc-") for n in names)
    skipped = None
    dkim_results: Sequence[DKIMResult] = ()
    arc: ARCResult | None = ARCResult("none", 0, None, "message is not ARC signed")
    if (signed or sealed) and size > settings.max_dkim_size:
        skipped = f"message larger than {settings.max_dkim_size} octets: not verified"
        dkim_results = _unverified(head, skipped)
        arc = None
    if (signed or sealed) and skipped is None:
        message = await read()
        # SPF, DKIM and ARC ask DNS concurrently; DKIM and ARC each ask for all their
        # keys before they await any (fetch_keys).
        spf_pair, dkim_results, arc = await asyncio.gather(
            _spf(spf_request, resolver),
            verify_dkim(message, resolver, run_cpu),
            verify_arc(message, resolver, run_cpu) if sealed else _value(arc),
        )
        del message
    else:  # nothing to verify: SPF alone
        spf_pair = await _spf(spf_request, resolver)
    helo_verdict, mail_verdict = spf_pair if spf_pair is not None else (None, None)
    dmarc = await check_dmarc_authors(
        resolver,
        from_domains(head),
        spf_domain=mail_verdict.domain if mail_verdict else None,
        spf_pass=mail_verdict is not None and mail_verdict.result is spf.SPFResult.PASS,
        dkim_pass_domains=[r.domain for r in dkim_results if r.result == "pass"],
    )
    return AuthResults(helo_verdict, mail_verdict, mail_from, tuple(dkim_results), arc,
                       dmarc, skipped)


async def _spf(request: SPFRequest | None, resolver: Resolver) -> SPFPair | None:
    return None if request is None else await request.check(resolver)


async def _value(value: _T) -> _T:
    return value


def _unverified(head: bytes, reason: str) -> list[DKIMResult]:
    """``policy`` for every signature of a message too large to verify (RFC 8601
    2.7.1: signed, but some aspect was not acceptable to the ADMD)."""
    results = []
    for name, value in header_fields(head):
        if name.lower() == b"dkim-signature":
            tags = lenient_tags(value)
            b = "".join(tags.get("b", "").split())
            results.append(DKIMResult("policy", tags.get("d", ""), tags.get("s", ""), b,
                                      tags.get("a", ""), reason))
    return results

