"""The production ``Resolver``: twisted.names over UDP (TCP on truncation), with a cache.

Owns the translation from DNS messages to the plain records of ``maitred_tx.auth.resolver``
(TXT character-strings joined, RFC 7208 3.3 / RFC 6376 3.6.2.2; CNAME chains in the answer
section followed, RFC 1034 3.6.2), the error mapping (RCODE 3 -> NXDomain, everything
that may succeed later -> TemporaryDNSError), and a bounded cache that honours TTLs
(RFC 1035 3.2.1, negative answers per RFC 2308 5, failures per RFC 2308 7).  The reactor
is a parameter; the global one is never imported.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.interfaces import IReactorTime
from twisted.names import client, dns
from twisted.names import error as nerror

from maitred_tx.auth.resolver import MX, NXDomain, Record, TemporaryDNSError

__all__ = ["FAILURE_TTL", "TwistedResolver", "parse_dns_server"]

_TYPES: Final = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "TXT": dns.TXT,
    "PTR": dns.PTR,
    "CNAME": dns.CNAME,
    "NS": dns.NS,
}
# RFC 1034 3.6.2 asks resolvers to follow chains and catch loops; 8 links is what
# BIND's and Unbound's defaults (max-cname-chain / 11 and 9 restarts) comfortably exceed
# for real data while a loop is caught quickly.
MAX_CNAME_CHAIN: Final = 8
# RFC 2308 5: negative answers are cached for min(SOA TTL, SOA MINIMUM); without an SOA
# we keep them 5 minutes, and never more than 3 hours (RFC 2308's upper advice).
DEFAULT_NEGATIVE_TTL: Final = 300
MAX_NEGATIVE_TTL: Final = 3 * 3600
# Positive answers: never beyond a day (Unbound's cache-max-ttl default).
MAX_TTL: Final = 86400
# Failed lookups (SERVFAIL, REFUSED, timeouts): RFC 2308 7.1 and 7.2 let a resolver
# cache a server failure or a dead server for at most five minutes; we keep one for 30
# seconds, BIND's largest servfail-ttl.  Without it every message from a sender whose
# domain's servers are broken waits out the timeout again, and each of those lookups
# costs the reactor as much as the rest of the message.
FAILURE_TTL: Final = 30
# Errors that may go away by themselves: timeouts, SERVFAIL / REFUSED / FORMERR / NOTIMP /
# unknown RCODEs (all DomainError but NXDOMAIN, handled first), and socket trouble.
_TEMPORARY: Final = (
    nerror.DomainError,
    nerror.ResolverError,
    defer.TimeoutError,
    ierror.ConnectError,
    ierror.CannotListenError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    records: tuple[Record, ...] | None  # None: NXDOMAIN, or the failure below
    failure: str | None = None  # a cached TemporaryDNSError's text


class _Cache:
    """At most ``size`` answers, the oldest inserted evicted first, each kept for its TTL.

    Locked: the reactor thread fills it and the checks thread reads it
    (``TwistedResolver.cached``, maitred_tx.auth.offthread)."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= self._clock():
                del self._entries[key]
                return None
            return entry

    def put(self, key: tuple[str, str], records: tuple[Record, ...] | None, ttl: float,
            failure: str | None = None) -> None:
        if ttl <= 0 or self._size <= 0:
            return
        entry = _Entry(self._clock() + ttl, records, failure)
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = entry
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


def _timeouts(timeout: float | Sequence[float]) -> tuple[float, ...]:
    """twisted.names sends one UDP try per element.  A single number is the whole budget:
    a first try of a third of it and a retry with the rest (a lost datagram costs one
    short wait, not the whole budget)."""
    if isinstance(timeout, int | float):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive: {timeout!r}")
        return (timeout / 3, timeout * 2 / 3)
    values = tuple(float(t) for t in timeout)
    if not values or min(values) <= 0:
        raise ValueError(f"timeouts must be positive: {timeout!r}")
    return values


def _wire_name(name: str) -> bytes | None:
    """The query name, or None when no such name can exist (RFC 1035 2.3.4 limits)."""
    name = name[:-1] if name.endswith(".") else name
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        try:
            raw = name.encode("idna")
        except UnicodeError:
            raw = name.encode("utf-8")
    labels = raw.split(b".")
    if not raw or len(raw) > 253 or any(not 0 < len(label) <= 63 for label in labels):
        return None
    return raw


def _text(name: bytes) -> str:
    return name.decode("latin-1").lower().rstrip(".")


def _convert(rr: dns.RRHeader) -> Record:
    payload: Any = rr.payload
    if rr.type == dns.A:
        return str(payload.dottedQuad())
    if rr.type == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, payload.address)
    if rr.type == dns.MX:
        return MX(int(payload.preference), _text(payload.name.name))
    if rr.type == dns.TXT:
        return b"".join(payload.data).decode("latin-1")
    return _text(payload.name.name)  # PTR, CNAME, NS


def _negative_ttl(authority: Sequence[dns.RRHeader]) -> float:
    for rr in authority:
        if rr.type == dns.SOA:
            soa: Any = rr.payload
            return float(min(rr.ttl, soa.minimum, MAX_NEGATIVE_TTL))
    return DEFAULT_NEGATIVE_TTL


def _extract(
    name: bytes, qtype: int, answers: Sequence[dns.RRHeader]
) -> tuple[tuple[Record, ...], float | None]:
    """The records of type ``qtype`` for ``name``, following CNAMEs within the answer
    section, and the smallest TTL on the way (None when nothing was found: NODATA)."""
    current = name.lower().rstrip(b".")
    ttls: list[int] = []
    seen = {current}
    for _ in range(MAX_CNAME_CHAIN + 1):
        here = [rr for rr in answers if rr.name.name.lower().rstrip(b".") == current]
        found = [rr for rr in here if rr.type == qtype]
        if found:
            ttl = min(ttls + [rr.ttl for rr in found])
            return tuple(_convert(rr) for rr in found), float(ttl)
        alias = next((rr for rr in here if rr.type == dns.CNAME), None)
        if alias is None or qtype == dns.CNAME:
            return (), None
        ttls.append(alias.ttl)
        target: Any = alias.payload
        current = target.name.name.lower().rstrip(b".")
        if current in seen:
            raise TemporaryDNSError(f"{name!r}: CNAME loop at {current!r}")
        seen.add(current)
    raise TemporaryDNSError(f"{name!r}: CNAME chain longer than {MAX_CNAME_CHAIN}")


class TwistedResolver:
    """``Resolver`` over twisted.names.

    ``servers``: (address, port) pairs to ask (recursive resolvers); None reads
    /etc/resolv.conf.  ``timeout``: seconds for one lookup, or the per-try timeouts
    twisted.names takes.  ``cache_size``: answers kept (0 disables the cache).
    ``clock``: the cache's time source, ``reactor.seconds`` unless given (tests)."""

    def __init__(
        self,
        reactor: IReactorTime,
        servers: Sequence[tuple[str, int]] | None = None,
        timeout: float | Sequence[float] = 5.0,
        cache_size: int = 10000,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._timeouts = _timeouts(timeout)
        self._client = client.Resolver(
            servers=list(servers) if servers is not None else None,
            resolv="/etc/resolv.conf" if servers is None else None,
            reactor=reactor,
            timeout=self._timeouts,
        )
        self._cache = _Cache(cache_size, clock or reactor.seconds)

    def cached(self, name: str, rtype: str) -> Sequence[Record] | None:
        """The answer held in the cache (NXDomain raised for a cached one), None when
        there is none; no query.  Safe to call from any thread."""
        return self._hit(name, (name.lower().rstrip("."), rtype.upper()))

    def expires(self, name: str, rtype: str) -> float | None:
        """When the cached answer (records, NXDOMAIN or failure) for *name* / *rtype*
        expires, on the cache's clock; None when none is cached.  Verdicts computed
        from cached answers may be kept that long (maitred_tx.auth.checks)."""
        entry = self._cache.get((name.lower().rstrip("."), rtype.upper()))
        return None if entry is None else entry.expires

    def _hit(self, name: str, key: tuple[str, str]) -> Sequence[Record] | None:
        cached = self._cache.get(key)
        if cached is None:
            return None
        if cached.records is None:
            if cached.failure is not None:
                raise TemporaryDNSError(f"{cached.failure} (cached)")
            raise NXDomain(f"{name}: no such name (cached)")
        return list(cached.records)

    async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
        qtype = _TYPES.get(rtype.upper())
        if qtype is None:
            raise ValueError(f"unsupported record type {rtype!r}")
        key = (name.lower().rstrip("."), rtype.upper())
        hit = self._hit(name, key)
        if hit is not None:
            return hit
        wire = _wire_name(name)
        if wire is None:
            raise NXDomain(f"{name!r} cannot be a DNS name")
        try:
            answers, authority, _ = await self._client.query(
                dns.Query(wire, qtype, dns.IN), timeout=self._timeouts
            )
        except nerror.DNSNameError as exc:
            message = exc.args[0] if exc.args else None
            self._cache.put(key, None, _negative_ttl(getattr(message, "authority", [])))
            raise NXDomain(f"{name}: no such name") from None
        except _TEMPORARY as exc:
            failure = f"{name} {rtype}: {type(exc).__name__}"
            self._cache.put(key, None, FAILURE_TTL, failure)
            raise TemporaryDNSError(failure) from None
        records, ttl = _extract(wire, qtype, answers)
        if ttl is None:  # NODATA (RFC 2308 2.2)
            self._cache.put(key, (), _negative_ttl(authority))
        else:
            self._cache.put(key, records, min(ttl, MAX_TTL))
        return list(records)


def parse_dns_server(text: str) -> tuple[str, int]:
    """``--dns-server HOST[:PORT]``: an IP address, IPv6 in brackets when a port follows
    (``[2001:db8::53]:5353``); the port defaults to 53.  Raises ValueError."""
    text = text.strip()
    port = "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad DNS server {text!r}: expected [IPv6]:PORT")
        port = rest[1:] if rest else port
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"bad DNS server {text!r}: brackets are for IPv6")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text  # IPv4, or a bare IPv6 address without a port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad DNS server {text!r}: not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad DNS server {text!r}: bad port {port!r}")
    return host, int(port)
