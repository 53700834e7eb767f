"""SPF, RFC 7208: ``check_host()`` over a ``Resolver``, and the HELO / MAIL FROM checks.

Owns record selection (4.5), the record grammar (4.6, 12), mechanism and modifier
evaluation (5, 6), macro expansion (7) and the processing limits (4.6.4).  Pure: it imports
the stdlib and the resolver interface only; DNS comes in as ``Resolver`` and time as ``now``.

Behaviour is checked against the OpenSPF RFC 7208 test suite (tests/auth/test_spf.py).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias
from urllib.parse import quote

from maitred_tx.auth.resolver import MX, NXDomain, Record, Resolver, TemporaryDNSError

__all__ = ["SPFResult", "SPFVerdict", "check", "check_host", "client_address"]

IP: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address"
Identity: TypeAlias = Literal["mailfrom", "helo"]

# 4.6.4: at most 10 terms that cause DNS queries per check_host() (includes and
# redirects counted across the whole evaluation), at most 2 void lookups (the RECOMMENDED
# default), at most 10 MX / PTR names looked up per term.
MAX_DNS_TERMS = 10
MAX_VOID_LOOKUPS = 2
MAX_NAMES_PER_TERM = 10


class SPFResult(enum.Enum):
    """The seven results of 2.6; values are the Authentication-Results names (RFC 8601)."""

    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class SPFVerdict:
    """One identity's result.  ``mechanism`` is the directive that matched, as written
    (``"-all"``, ``"include:_spf.example.net"``), None for the default result;
    ``explanation`` is the exp= text of a fail (6.2), None without one; ``reason`` says
    why a none / permerror / temperror came out, for logs."""

    result: SPFResult
    identity: Identity
    domain: str
    explanation: str | None = None
    mechanism: str | None = None
    reason: str | None = None
    # The traceback when a bug, not the DNS, made this a temperror: for the glue to log
    # (this module does no logging).  Not part of the verdict's value.
    error: str | None = field(default=None, compare=False, repr=False)


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


# ---------------------------------------------------------------- grammar (4.6.1, 7.1, 12)

_QUALIFIERS = {
    "+": SPFResult.PASS,
    "-": SPFResult.FAIL,
    "~": SPFResult.SOFTFAIL,
    "?": SPFResult.NEUTRAL,
}
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)\Z", re.S)
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z0-9]+)(.*)\Z", re.S)
_MACRO = re.compile(r"%(?:\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}|([%_\-]))")
_TOPLABEL = r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9])"
_DOMAIN_END = re.compile(rf"\.{_TOPLABEL}\.?\Z")
_CIDR = r"(0|[1-9][0-9]{0,2})"
_DUAL_CIDR = re.compile(rf"(.*?)(?:/{_CIDR})?(?://{_CIDR})?\Z", re.S)
_SINGLE_CIDR = re.compile(rf"(.*?)(?:/{_CIDR})?\Z", re.S)
_IP4 = re.compile(
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|"
    r"1[0-9][0-9]|[1-9]?[0-9])){3}\Z"
)
_DOMAIN_LETTERS = "slodiphv"  # 7.1: c, r, t are for explanation strings only (7.3)
_EXP_LETTERS = "slodiphvcrt"


@dataclass(frozen=True, slots=True)
class _Directive:
    text: str
    result: SPFResult
    name: str  # all include a mx ptr ip4 ip6 exists
    domain_spec: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True, slots=True)
class _Record:
    directives: tuple[_Directive, ...]
    redirect: str | None
    exp: str | None


def _check_macro_string(text: str, letters: str, *, space: bool = False) -> None:
    """7.1 macro-string / explain-string syntax; raises _PermError."""
    pos = 0
    while pos < len(text):
        ch = text[pos]
        if ch == "%":
            m = _MACRO.match(text, pos)
            if m is None:  # 7.1: "%" not followed by "{", "%", "-" or "_"
                raise _PermError(f"bad macro in {text!r}")
            letter, digits = m.group(1), m.group(2)
            if letter is not None and letter.lower() not in letters:
                raise _PermError(f"macro letter %{{{letter}}} not allowed here")
            if digits and int(digits) == 0:  # 7.3: a DIGIT transformer MUST be nonzero
                raise _PermError(f"zero transformer in {m.group(0)!r}")
            pos = m.end()
        elif "\x21" <= ch <= "\x7e" or (space and ch == " "):  # macro-literal
            pos += 1
        else:
            raise _PermError(f"bad character {ch!r} in {text!r}")


def _check_domain_spec(spec: str) -> str:
    """domain-spec = macro-string domain-end (7.1); checked before expansion."""
    if not spec:
        raise _PermError("empty domain-spec")
    _check_macro_string(spec, _DOMAIN_LETTERS)
    macros = list(_MACRO.finditer(spec))
    if not (_DOMAIN_END.search(spec) or (macros and macros[-1].end() == len(spec))):
        raise _PermError(f"domain-spec {spec!r} does not end in a macro or a top label")
    return spec


def _parse_directive(term: str) -> _Directive:
    m = _MECHANISM.match(term)
    if m is None:
        raise _PermError(f"unknown term {term!r}")
    result = _QUALIFIERS[m.group(1) or "+"]
    name, rest = m.group(2).lower(), m.group(3)
    if name == "all":
        if rest:
            raise _PermError(f"bad all: {term!r}")
        return _Directive(term, result, name)
    if name in ("include", "exists"):  # 5.2, 5.7: ":" domain-spec required
        if not rest.startswith(":"):
            raise _PermError(f"{name} needs a domain: {term!r}")
        return _Directive(term, result, name, _check_domain_spec(rest[1:]))
    if name in ("a", "mx", "ptr"):  # 5.3, 5.4, 5.5
        cm = (_SINGLE_CIDR if name == "ptr" else _DUAL_CIDR).match(rest)
        assert cm is not None  # both patterns match any string
        head = cm.group(1)
        if name == "ptr" and cm.group(2) is not None:
            raise _PermError(f"ptr takes no cidr: {term!r}")
        spec = None
        if head:
            if not head.startswith(":"):
                raise _PermError(f"bad {name}: {term!r}")
            spec = _check_domain_spec(head[1:])
        cidr4 = int(cm.group(2)) if cm.group(2) is not None else 32
        cidr6 = int(cm.group(3)) if name != "ptr" and cm.group(3) is not None else 128
        if cidr4 > 32 or cidr6 > 128:
            raise _PermError(f"bad cidr length: {term!r}")
        return _Directive(term, result, name, spec, None, cidr4, cidr6)
    if name in ("ip4", "ip6"):  # 5.6
        cm = _SINGLE_CIDR.match(rest)
        assert cm is not None
        if not cm.group(1).startswith(":"):
            raise _PermError(f"{name} needs a network: {term!r}")
        return _Directive(term, result, name, None, _network(name, cm.group(1)[1:], cm.group(2)))
    raise _PermError(f"unknown mechanism {term!r}")


def _network(
    name: str, text: str, cidr: str | None
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        if name == "ip4":
            if not _IP4.match(text) or (cidr is not None and int(cidr) > 32):
                raise ValueError(text)
            return ipaddress.IPv4Network(f"{text}/{cidr or 32}", strict=False)
        if not text or not re.fullmatch(r"[0-9A-Fa-f:.]+", text) or (cidr and int(cidr) > 128):
            raise ValueError(text)
        return ipaddress.IPv6Network(f"{text}/{cidr or 128}", strict=False)
    except ValueError:
        raise _PermError(f"bad {name} network {text!r}/{cidr}") from None


@functools.lru_cache(maxsize=1024)
def _parse_record(text: str) -> _Record:
    """Parse a selected "v=spf1" record (4.6); any syntax error anywhere is a permerror.

    Cached (a record's text is its own key, a parse is immutable): the same few records
    come back message after message, and a parse with its networks costs more than the
    rest of an evaluation.  A permerror is not cached; it is rare."""
    if any(not ("\x20" <= ch <= "\x7e") for ch in text):  # 3.1: 7-bit ASCII only
        raise _PermError("non-ASCII or control character in record")
    directives: list[_Directive] = []
    mods: dict[str, str] = {}
    for term in text.split(" ")[1:]:  # 4.6.1: terms are separated by spaces only
        if not term:
            continue
        m = _MODIFIER.match(term)
        if m is None:
            directives.append(_parse_directive(term))
            continue
        name, value = m.group(1).lower(), m.group(2)
        if name in ("redirect", "exp"):
            if name in mods:  # 6: each MUST NOT appear more than once
                raise _PermError(f"{name}= appears twice")
            mods[name] = _check_domain_spec(value)
        else:  # 6: unknown modifiers are ignored, but their macros must be well formed
            _check_macro_string(value, _EXP_LETTERS)
    return _Record(tuple(directives), mods.get("redirect"), mods.get("exp"))


def _select(records: Sequence[Record]) -> str | None:
    """4.5: the one record starting "v=spf1" (then space or end); none -> None."""
    spf = [r for r in records if isinstance(r, str) and _VERSION.match(r)]
    if len(spf) > 1:
        raise _PermError(f"{len(spf)} SPF records")
    return spf[0] if spf else None


def _queryable(name: str) -> bool:
    """RFC 1035 limits: a name we could not put on the wire cannot exist."""
    labels = name.split(".")
    return len(name) <= 253 and all(0 < len(label) <= 63 for label in labels)


_VERSION = re.compile(r"v=spf1( |\Z)", re.I)
_TOP = re.compile(_TOPLABEL)


@functools.lru_cache(maxsize=4096)
def _valid_domain(domain: str) -> bool:
    """4.3: a multi-label domain name with a proper top label, else result none."""
    name = domain[:-1] if domain.endswith(".") else domain
    if not name or not name.isascii() or not _queryable(name) or "." not in name:
        return False
    return _TOP.fullmatch(name.rsplit(".", 1)[1]) is not None


def _reverse_name(ip: IP) -> str:
    if ip.version == 4:
        return ".".join(reversed(str(ip).split("."))) + ".in-addr.arpa"
    return ".".join(reversed(ip.exploded.replace(":", ""))) + ".ip6.arpa"


# ---------------------------------------------------------------- evaluation (4, 5, 6, 7)


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: SPFResult
    mechanism: str | None = None
    reason: str | None = None
    exp: str | None = None  # the exp= of the record that decided, and its domain (6.2)
    exp_domain: str = ""


@dataclass(slots=True)
class _Evaluation:
    """One check_host() run: its inputs and the counters the limits of 4.6.4 apply to."""

    resolver: Resolver
    ip: IP
    sender: str
    helo: str
    receiver: str
    now: float
    dns_terms: int = 0
    voids: int = 0
    _validated: list[str] | None = field(default=None, init=False)
    _ptr_void: bool = field(default=False, init=False)

    @property
    def local_part(self) -> str:
        return self.sender.rpartition("@")[0] or "postmaster"  # 4.3

    async def query(self, name: str, rtype: str, *, void: bool = True) -> Sequence[Record]:
        """A lookup whose empty answer or NXDOMAIN counts as a void lookup (4.6.4)."""
        try:
            records = await self.resolver.lookup(name, rtype) if _queryable(name) else []
        except NXDomain:
            records = []
        except TemporaryDNSError as exc:
            raise _TempError(f"{name} {rtype}: {exc}") from None
        if not records and void:
            self.count_void()
        return records

    def count_void(self) -> None:
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise _PermError(f"more than {MAX_VOID_LOOKUPS} void lookups")

    def count_term(self, text: str) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _PermError(f"more than {MAX_DNS_TERMS} DNS lookups at {text!r}")

    async def addresses(self, name: str, *, void: bool) -> list[IP]:
        rtype = "A" if self.ip.version == 4 else "AAAA"
        found: list[IP] = []
        for rec in await self.query(name, rtype, void=void):
            try:
                found.append(ipaddress.ip_address(str(rec)))
            except ValueError:
                continue
        return found

    async def validated_names(self) -> list[str]:
        """5.5: the PTR names of <ip> (the first 10) whose addresses include <ip>."""
        if self._validated is None:
            self._validated = []
            try:
                names = await self.query(_reverse_name(self.ip), "PTR", void=False)
            except _TempError:  # 5.5: a DNS error on the PTR lookup: no match
                names = []
            self._ptr_void = not names
            for ptr in names[:MAX_NAMES_PER_TERM]:  # 4.6.4: ignore all but the first 10
                name = str(ptr).rstrip(".")
                try:
                    if self.ip in await self.addresses(name, void=False):
                        self._validated.append(name)
                except _TempError:  # 5.5: a DNS error on an A lookup skips that name
                    continue
        return self._validated

    async def expand(self, spec: str, domain: str, *, exp: bool = False) -> str:
        """7.3: expand a (syntax-checked) macro-string; domain names are then trimmed."""
        out: list[str] = []
        pos = 0
        for m in _MACRO.finditer(spec):
            out.append(spec[pos : m.start()])
            pos = m.end()
            if m.group(5) is not None:  # "%%", "%_", "%-"
                out.append({"%": "%", "_": " ", "-": "%20"}[m.group(5)])
                continue
            letter, digits, rev, delims = m.group(1), m.group(2), m.group(3), m.group(4)
            value = await self._macro_value(letter.lower(), domain)
            parts = re.split("[" + re.escape(delims or ".") + "]", value)
            if rev:
                parts.reverse()
            if digits:
                parts = parts[-int(digits) :]
            text = ".".join(parts)
            out.append(quote(text, safe="") if letter.isupper() else text)  # 7.3 uppercase
        out.append(spec[pos:])
        result = "".join(out)
        if exp:
            return result
        result = result[:-1] if result.endswith(".") else result
        while len(result) > 253 and "." in result:  # 7.3: drop labels from the left
            result = result.split(".", 1)[1]
        return result

    async def _macro_value(self, letter: str, domain: str) -> str:
        """7.2; the parser let through only letters valid where they appear."""
        if letter == "p":
            names = await self.validated_names()
            lower = domain.lower().rstrip(".")
            for name in names:  # 7.3: prefer <domain> or a subdomain of it
                if name.lower() == lower or name.lower().endswith("." + lower):
                    return name
            return names[0] if names else "unknown"
        v4 = self.ip.version == 4
        # "i" of IPv6 is dot-format nibbles, upper case as the RFC 7208 test suite expects
        # (v-macro-ip6); DNS compares case-insensitively, so only exp text can tell.
        return {
            "s": self.sender,
            "l": self.local_part,
            "o": self.sender.rpartition("@")[2],
            "d": domain,
            "i": str(self.ip) if v4 else ".".join(self.ip.exploded.replace(":", "").upper()),
            "v": "in-addr" if v4 else "ip6",
            "h": self.helo,
            "c": str(self.ip),
            "r": self.receiver,
            "t": str(int(self.now)),
        }[letter]

    async def matches(self, d: _Directive, domain: str) -> bool:
        if d.name == "all":
            return True
        if d.name in ("ip4", "ip6"):
            return d.network is not None and self.ip in d.network
        self.count_term(d.text)
        target = await self.expand(d.domain_spec, domain) if d.domain_spec else domain
        if d.name == "include":
            return await self._include(target)
        if d.name == "a":
            return self._in_cidr(await self.addresses(target, void=True), d)
        if d.name == "mx":
            exchanges = [r for r in await self.query(target, "MX") if isinstance(r, MX)]
            if len(exchanges) > MAX_NAMES_PER_TERM:  # 4.6.4: more than 10 MX: permerror
                raise _PermError(f"{target}: more than {MAX_NAMES_PER_TERM} MX records")
            for mx in exchanges:
                if mx.exchange.strip(".") and self._in_cidr(
                    await self.addresses(mx.exchange, void=False), d
                ):
                    return True
            return False
        if d.name == "ptr":
            names = await self.validated_names()
            if self._ptr_void:
                self.count_void()  # the PTR lookup of this term was void (4.6.4)
            want = target.lower()
            return any(n.lower() == want or n.lower().endswith("." + want) for n in names)
        return bool(await self.query(target, "A"))  # exists (5.7): any A record

    def _in_cidr(self, addrs: list[IP], d: _Directive) -> bool:
        cidr = d.cidr4 if self.ip.version == 4 else d.cidr6
        return any(
            self.ip in ipaddress.ip_network((a, cidr), strict=False)
            for a in addrs
            if a.version == self.ip.version
        )

    async def _include(self, target: str) -> bool:
        out = await self.evaluate(target)  # 5.2: the recursive result decides
        if out.result is SPFResult.PASS:
            return True
        if out.result is SPFResult.TEMPERROR:
            raise _TempError(out.reason or f"include:{target}")
        if out.result in (SPFResult.PERMERROR, SPFResult.NONE):
            raise _PermError(f"include:{target}: {out.result.value} ({out.reason})")
        return False

    async def evaluate(self, domain: str) -> _Outcome:
        """check_host() proper (4): fetch, select, parse, evaluate."""
        try:
            if not _valid_domain(domain):
                return _Outcome(SPFResult.NONE, reason=f"{domain!r} is not a domain (4.3)")
            try:
                text = _select(await self.resolver.lookup(domain.rstrip("."), "TXT"))
            except NXDomain:
                text = None
            except TemporaryDNSError as exc:
                raise _TempError(f"{domain} TXT: {exc}") from None
            if text is None:
                return _Outcome(SPFResult.NONE, reason=f"no SPF record at {domain}")
            record = _parse_record(text)
            for d in record.directives:
                if await self.matches(d, domain):
                    return _Outcome(d.result, d.text, None, record.exp, domain)
            if record.redirect is None:
                return _Outcome(SPFResult.NEUTRAL, None, None, record.exp, domain)  # 4.7
            self.count_term("redirect=" + record.redirect)
            target = await self.expand(record.redirect, domain)
            out = await self.evaluate(target)  # 6.1: its result is ours, exp included
            if out.result is SPFResult.NONE:
                return _Outcome(SPFResult.PERMERROR, "redirect=" + target, out.reason)
            return out
        except _PermError as exc:
            return _Outcome(SPFResult.PERMERROR, reason=str(exc))
        except _TempError as exc:
            return _Outcome(SPFResult.TEMPERROR, reason=str(exc))

    async def explain(self, spec: str, domain: str) -> str | None:
        """6.2: any DNS error, not exactly one record, or bad syntax: no explanation."""
        try:
            target = await self.expand(spec, domain)
            if not _queryable(target):
                return None
            records = await self.resolver.lookup(target, "TXT")
            if len(records) != 1 or not isinstance(records[0], str):
                return None
            _check_macro_string(records[0], _EXP_LETTERS, space=True)
            return await self.expand(records[0], domain, exp=True)
        except (_PermError, _TempError, NXDomain, TemporaryDNSError):
            return None


@functools.lru_cache(maxsize=4096)
def client_address(ip: str) -> IP:
    """The client address, IPv4-mapped IPv6 as IPv4 (5, 5.6); cached because the
    ipaddress module's parsing is slow and clients come back."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


async def check_host(
    resolver: Resolver,
    ip: str,
    domain: str,
    sender: str,
    *,
    helo: str,
    receiver: str = "unknown",
    now: float | None = None,
    identity: Identity = "mailfrom",
) -> SPFVerdict:
    """RFC 7208 check_host(<ip>, <domain>, <sender>).  Never raises for anything found
    in DNS; ``ip`` must be an address (ValueError otherwise).  IPv4-mapped IPv6 addresses
    are evaluated as IPv4 (5, 5.6).  ``receiver`` is %{r}, ``now`` is %{t} (default: the
    wall clock); ``identity`` only labels the verdict."""
    addr = client_address(ip)
    if "@" not in sender:
        sender = f"postmaster@{domain}"
    elif sender.startswith("@"):  # 4.3: no local-part: "postmaster"
        sender = "postmaster" + sender
    ev = _Evaluation(resolver, addr, sender, helo, receiver, time.time() if now is None else now)
    out = await ev.evaluate(domain)
    explanation = None
    if out.result is SPFResult.FAIL and out.exp is not None:
        explanation = await ev.explain(out.exp, out.exp_domain)
    return SPFVerdict(out.result, identity, domain, explanation, out.mechanism, out.reason)


async def check(
    resolver: Resolver, ip: str, mail_from: str | None, helo: str, *, receiver: str = "unknown"
) -> tuple[SPFVerdict, SPFVerdict]:
    """The HELO identity check and the MAIL FROM check; returns (helo, mailfrom).

    ``mail_from`` None or "" is the null reverse-path: the MAIL FROM identity is then
    postmaster@<helo> (2.4), the very check the HELO one just made, so its verdict is
    reused with identity "mailfrom" rather than asked of DNS twice."""
    helo_verdict = await check_host(
        resolver, ip, helo, f"postmaster@{helo}", helo=helo, receiver=receiver, identity="helo"
    )
    if not mail_from:
        return helo_verdict, replace(helo_verdict, identity="mailfrom")
    domain = mail_from.rpartition("@")[2]
    mail_verdict = await check_host(resolver, ip, domain, mail_from, helo=helo, receiver=receiver)
    return helo_verdict, mail_verdict
