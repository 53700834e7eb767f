"""The one small DNS interface every check uses, and a resolver over zone data.

Checks are written as coroutines against ``Resolver``: in production they await the
twisted.names resolver in ``maitred_tx.auth.dns``; in tests they can await
``ZoneResolver``, whose answers are plain data.  Neither the interface nor this module
imports Twisted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

__all__ = [
    "DNSError",
    "MX",
    "NXDomain",
    "Record",
    "Resolver",
    "TemporaryDNSError",
    "ZoneResolver",
]


class DNSError(Exception):
    """Base of the lookup failures a check must tell apart."""


class NXDomain(DNSError):
    """The name does not exist (RCODE 3).  For SPF a "void lookup" (RFC 7208 4.6.4)."""


class TemporaryDNSError(DNSError):
    """Timeout, SERVFAIL, refused, truncated beyond repair: the answer may come later.
    Checks turn it into temperror."""


@dataclass(frozen=True, slots=True)
class MX:
    preference: int
    exchange: str  # lower case, no trailing dot


# TXT: str (the character-strings of one record joined, RFC 7208 3.3 / RFC 6376 3.6.2.2;
# decoded as latin-1 so that no byte is lost); A / AAAA: str (address text);
# MX: MX; PTR / CNAME / NS: str (lower case, no trailing dot).
Record: TypeAlias = "str | MX"


class Resolver(Protocol):
    """Looks up one record type for one name.

    ``rtype`` is one of "A", "AAAA", "MX", "TXT", "PTR".  Returns the records, which may
    be an empty list (the name exists but has no such record: NODATA).  Raises NXDomain
    when the name does not exist and TemporaryDNSError when no answer could be had.
    CNAMEs are followed by the resolver.  Names are given without a trailing dot and
    compared case-insensitively.
    """

    def lookup(self, name: str, rtype: str) -> Awaitable[Sequence[Record]]: ...


class ZoneResolver:
    """Answers from data: ``{(name, rtype): [records]}``; a name with no entry at all is
    NXDOMAIN, one present under other types is NODATA.  ``temporary`` names (or
    (name, rtype) pairs) raise TemporaryDNSError.  Counts lookups for limit tests."""

    def __init__(
        self,
        zone: Mapping[tuple[str, str], Sequence[Record]],
        temporary: Sequence[str | tuple[str, str]] = (),
    ) -> None:
        self._zone = {(n.lower().rstrip("."), t.upper()): list(r) for (n, t), r in zone.items()}
        self._names = {n for n, _ in self._zone}
        self._temporary = {
            (t.lower().rstrip("."), None) if isinstance(t, str) else (t[0].lower(), t[1].upper())
            for t in temporary
        }
        self.lookups: list[tuple[str, str]] = []

    async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
        key = (name.lower().rstrip("."), rtype.upper())
        self.lookups.append(key)
        if (key[0], None) in self._temporary or key in self._temporary:
            raise TemporaryDNSError(f"{name} {rtype}: temporary failure (test zone)")
        if key in self._zone:
            return list(self._zone[key])
        if key[0] in self._names:
            return []
        raise NXDomain(f"{name}: no such name (test zone)")
