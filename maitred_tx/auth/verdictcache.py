"""Verdicts kept for as long as the DNS answers they were computed from: pure.

Most mail to an MX comes from senders it has just seen: the same client address, HELO
name, MAIL FROM and From: field, message after message.  For a message that carries no
DKIM or ARC signature, every verdict (SPF for HELO and MAIL FROM, DMARC, the
Authentication-Results field) is a function of exactly those values and of DNS answers;
while every one of those answers is still cached (``Resolver.expires``), computing the
verdict again could only give the same result.  So the verdict is kept, keyed by those
values, until the first of its answers expires (RFC 1035 3.2.1 TTLs, RFC 2308 negative
and failure lifetimes), and a message that finds one is judged on the reactor thread
with a dictionary lookup instead of a hand-over to the checks thread.

A signed message is never answered from here: its DKIM and ARC results depend on its
own bytes; nor is a DMARC failure under a pct= below 100, sampled message by message;
nor is one whose From: fields are large (``MAX_FROM_OCTETS``): the keys are held in
memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

from maitred_tx.auth.headers import from_values
from maitred_tx.auth.verdicts import AuthResults

__all__ = ["MAX_FROM_OCTETS", "NO_LOOKUP_LIFETIME", "CachedVerdict", "Expiring", "VerdictCache",
           "VerdictKey"]

# From: fields longer than this (all of them together) are not made part of a key: a
# normal one is a few dozen octets, and a header block may hold 100 KiB of them.
MAX_FROM_OCTETS: Final = 1024
# A verdict that needed no DNS answer at all (no SPF for a UNIX-socket client, no
# author domain) depends on its key alone; it is still renewed once an hour.
NO_LOOKUP_LIFETIME: Final = 3600.0

# (client address, HELO name, MAIL FROM or None, our host name, From: values as sent)
VerdictKey: TypeAlias = "tuple[str, str, str | None, str, tuple[bytes, ...]]"


class Expiring(Protocol):
    """What the verdict cache needs of a resolver: when a cached answer expires."""

    def expires(self, name: str, rtype: str) -> float | None: ...


@dataclass(frozen=True, slots=True)
class CachedVerdict:
    results: AuthResults
    header: bytes  # results.header(authserv_id): our Authentication-Results field
    expires: float
    temporary: tuple[str, ...]  # results.temporary(), for verdicts.decide


def verdict_key(head: bytes, ip: str, helo: str, mail_from: str | None,
                authserv_id: str) -> VerdictKey | None:
    """The key of a message whose header block is *head*; None when its verdict may
    not be cached: it may carry a DKIM or ARC signature (the test is on the raw bytes,
    so it errs on the side of "signed"), or it may have several authors, or its From:
    field is too large."""
    lower = head.lower()
    if b"dkim-signature" in lower or b"arc-" in lower:
        return None
    froms = tuple(from_values(head))
    # One author: with several, DMARC evaluates each and keeps the strictest verdict,
    # and _repeatable could not tell whether pct sampling chose among them.  A comma
    # or semicolon may separate addresses (RFC 5322 3.4); a display name with one in
    # it is merely not cached.
    if len(froms) > 1 or sum(map(len, froms)) > MAX_FROM_OCTETS or (
            froms and (b"," in froms[0] or b";" in froms[0])):
        return None
    return (ip, helo, mail_from, authserv_id, froms)


class VerdictCache:
    """At most *size* verdicts, the oldest inserted evicted first, each until its
    ``expires`` on *clock*.  Read and written on one thread (the reactor's)."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[VerdictKey, CachedVerdict] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: VerdictKey) -> CachedVerdict | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= self._clock():
            del self._entries[key]
            return None
        return entry

    def put(self, key: VerdictKey, results: AuthResults, authserv_id: str,
            asked: Iterable[tuple[str, str]], resolver: Expiring) -> CachedVerdict | None:
        """Keep *results*, computed from the answers to the lookups *asked*, until the
        first of those answers leaves *resolver*'s cache; not at all when one of them
        is not cached (a lookup that timed out, or a cache turned off), or when the
        verdict records a bug rather than a DNS outcome."""
        if self._size <= 0 or not _repeatable(results):
            return None
        now = self._clock()
        expires = now + NO_LOOKUP_LIFETIME
        for name, rtype in asked:
            until = resolver.expires(name, rtype)
            if until is None:
                return None
            expires = min(expires, until)
        if expires <= now:
            return None
        entry = CachedVerdict(results, results.header(authserv_id), expires,
                              tuple(results.temporary()))
        self._entries.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return entry


def _repeatable(results: AuthResults) -> bool:
    """Whether the same inputs and answers always give these results: not when a bug
    made a verdict (it is logged, and may not happen again), nor when DMARC's pct
    sampling chose the disposition of a failing message (RFC 7489 6.6.4: each message
    is sampled on its own)."""
    if any(v is not None and v.error is not None
           for v in (results.spf_helo, results.spf_mailfrom)):
        return False
    record = results.dmarc.record
    return not (results.dmarc.result == "fail" and record is not None and record.pct < 100)
