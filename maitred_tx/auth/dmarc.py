"""DMARC evaluation (RFC 7489), pure: a ``Resolver`` in, a ``DMARCVerdict`` out.

Owns: the Organizational Domain from the Public Suffix List (3.2), identifier
alignment (3.1), the policy record grammar (6.3, 6.4), policy discovery (6.6.3), the
policy that applies (p= or sp=, 6.3) and pct sampling (6.6.4), and the several-authors
case (6.6.1).  SPF and DKIM results come in as plain values; this module imports no
Twisted and no other check.

The Public Suffix List is the copy bundled with ``publicsuffixlist`` (ICANN and private
sections, as that package reads it): no network at run time; upgrading the package
upgrades the list.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Literal, TypeAlias, TypeVar

from publicsuffixlist import PublicSuffixList

from maitred_tx.auth.resolver import DNSError, NXDomain, Resolver

__all__ = [
    "DMARCRecord",
    "DMARCRecordError",
    "DMARCVerdict",
    "MAX_AUTHOR_DOMAINS",
    "aligned",
    "check_dmarc",
    "check_dmarc_authors",
    "is_dmarc_record",
    "organizational_domain",
    "parse_dmarc_record",
    "registrable_domain",
]

Policy: TypeAlias = Literal["none", "quarantine", "reject"]
Alignment: TypeAlias = Literal["r", "s"]
Result: TypeAlias = Literal["none", "pass", "fail", "temperror", "permerror"]

_POLICIES: Final[dict[str, Policy]] = {
    "none": "none",
    "quarantine": "quarantine",
    "reject": "reject",
}
_ALIGNMENTS: Final[dict[str, Alignment]] = {"r": "r", "s": "s"}
# 6.6.4: a message not selected by pct gets "the next policy lower in terms of severity".
_T = TypeVar("_T")
_LOWER: Final[dict[Policy, Policy]] = {
    "reject": "quarantine",
    "quarantine": "none",
    "none": "none",
}

# Several author domains cost up to two TXT lookups each (6.6.3).  DMARCbis warns that
# evaluating many is a denial-of-service vector; 5 keeps the worst case at 10 lookups,
# the budget RFC 7208 4.6.4 gives SPF.  Beyond it the verdict is permerror.
MAX_AUTHOR_DOMAINS: Final = 5


# --- Organizational Domain (3.2) -------------------------------------------------------


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the bundled list; parsed once, on first use


@functools.lru_cache(maxsize=4096)
def registrable_domain(domain: str) -> str | None:
    """The public suffix plus one label (lower case, same IDN form as given), or None
    when ``domain`` is itself a public suffix or not a valid name (empty, empty label)."""
    return _psl().privatesuffix(domain)


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the registrable domain; a name that has none (a public suffix
    itself) is its own Organizational Domain, as in OpenDMARC."""
    return registrable_domain(domain) or domain.lower().rstrip(".")


def _canonical(domain: str) -> str:
    """Lower case, no trailing dot, A-labels (so U-label and A-label forms compare
    equal and the DNS name is ASCII)."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain  # not a valid IDN: left as is, it will find no record


def aligned(identifier: str, from_domain: str, mode: Alignment) -> bool:
    """RFC 7489 3.1.1 / 3.1.2: strict is an exact (case-insensitive) match; relaxed is
    the same Organizational Domain."""
    a, b = _canonical(identifier), _canonical(from_domain)
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


# --- The policy record (6.3, 6.4) --------------------------------------------------------


class DMARCRecordError(ValueError):
    """A DMARC record (it starts with v=DMARC1) that cannot be used: broken tag-list or
    no valid p= and no reporting address.  Evaluation gives permerror (RFC 7489 11.2)."""


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    """A parsed policy record; defaults are those of RFC 7489 6.3.

    ``ignored`` names the known tags whose values were invalid and were ignored (their
    defaults apply); "p" or "sp" there means the record is used as p=none (6.6.3 6.1).
    """

    p: Policy
    sp: Policy | None = None  # None: subdomains get p (6.3)
    pct: int = 100
    adkim: Alignment = "r"
    aspf: Alignment = "r"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: tuple[str, ...] = ("0",)
    rf: tuple[str, ...] = ("afrf",)
    ri: int = 86400
    ignored: tuple[str, ...] = ()

    def policy_for(self, *, subdomain: bool) -> Policy:
        """6.3 sp: it applies only to subdomains of the domain the record was found at."""
        return self.sp if subdomain and self.sp is not None else self.p


# 6.4 dmarc-version: "v" (any case, RFC 5234 2.3) then exactly "DMARC1" (%x44 %x4d ...).
_VERSION = re.compile(r"[ \t]*[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)")
# The DKIM tag-list (RFC 6376 3.2) DMARC records follow (6.4): tag-name = ALPHA *ALNUMPUNC.
_TAG = re.compile(r"([A-Za-z][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*)", re.S)
# 6.4 dmarc-uri = URI [ "!" 1*DIGIT [ "k" / "m" / "g" / "t" ] ]; commas separate URIs
# and must be %-encoded inside one (6.2), so a URI never holds "," ";" "!" or space.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s,;!]+(?:![0-9]+[kmgtKMGT]?)?")
_KEYWORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")  # RFC 5321 Keyword
_FO = frozenset({"0", "1", "d", "s"})
_WSP = " \t\r\n"


def is_dmarc_record(text: str) -> bool:
    """6.6.3 steps 2 and 4: a TXT record is a DMARC record iff it starts with v=DMARC1."""
    return _VERSION.match(text) is not None


def _tags(text: str) -> dict[str, str]:
    match = _VERSION.match(text)
    if match is None:
        raise DMARCRecordError("not a DMARC record: it must start with v=DMARC1 (6.3)")
    tags: dict[str, str] = {}
    for part in text[match.end() :].split(";"):
        part = part.strip(_WSP)
        if not part:
            continue
        tag = _TAG.fullmatch(part)
        if tag is None:
            raise DMARCRecordError(f"malformed tag-spec {part!r} (6.4, RFC 6376 3.2)")
        name, value = tag.group(1).lower(), tag.group(2).strip(_WSP)
        if name in tags or name == "v":  # RFC 6376 3.2: a duplicate voids the tag-list
            raise DMARCRecordError(f"duplicate tag {name!r} (RFC 6376 3.2)")
        tags[name] = value
    return tags


def _number(value: str, digits: int, top: int) -> int | None:
    if not (value.isascii() and value.isdigit() and len(value) <= digits):
        return None
    number = int(value)
    return number if number <= top else None


def _list(value: str, valid: Callable[[str], bool]) -> tuple[str, ...] | None:
    """A colon-separated list (6.4 dmarc-fo, dmarc-rfmt), lower case, if all valid."""
    items = tuple(item.strip(_WSP).lower() for item in value.split(":"))
    return items if all(valid(item) for item in items) else None


def _optional_tags(tags: dict[str, str], ignored: list[str]) -> DMARCRecord:
    """A p=none record carrying the valid optional tags; invalid ones go to ``ignored``."""

    def checked(name: str, value: _T | None, default: _T) -> _T:
        if name not in tags:
            return default
        if value is None:
            ignored.append(name)
            return default
        return value

    def uris(name: str) -> tuple[str, ...]:
        items = [item.strip(_WSP) for item in tags.get(name, "").split(",")]
        good = tuple(item for item in items if _URI.fullmatch(item))
        if name in tags and len(good) != len(items):
            ignored.append(name)  # the valid URIs are kept
        return good

    def get(name: str) -> str:
        return tags.get(name, "")

    return DMARCRecord(
        p="none",
        rua=uris("rua"),
        ruf=uris("ruf"),
        adkim=checked("adkim", _ALIGNMENTS.get(get("adkim").lower()), "r"),
        aspf=checked("aspf", _ALIGNMENTS.get(get("aspf").lower()), "r"),
        pct=checked("pct", _number(get("pct"), 3, 100), 100),  # 6.4: 1*3DIGIT; 6.3: 0..100
        ri=checked("ri", _number(get("ri"), 10, 2**32 - 1), 86400),  # 6.3: 32-bit unsigned
        fo=checked("fo", _list(get("fo"), _FO.__contains__), ("0",)),
        rf=checked("rf", _list(get("rf"), lambda k: _KEYWORD.fullmatch(k) is not None), ("afrf",)),
    )


@functools.lru_cache(maxsize=1024)
def parse_dmarc_record(text: str) -> DMARCRecord:
    """Parse one DMARC TXT record (6.3, 6.4).  Unknown tags are ignored (6.3); invalid
    values of optional tags are ignored and listed in ``ignored``; a missing or invalid
    p= (or an invalid sp=) makes the record p=none if rua= has a valid URI, else
    raises ``DMARCRecordError`` (6.6.3 step 6).  Cached: the record is immutable and
    the same few come back message after message."""
    tags = _tags(text)
    ignored: list[str] = []
    record = _optional_tags(tags, ignored)
    p = _POLICIES.get(tags.get("p", "").lower())
    sp = _POLICIES.get(tags["sp"].lower()) if "sp" in tags else None
    if p is None or ("sp" in tags and sp is None):
        if not record.rua:
            raise DMARCRecordError("no valid p= (or an invalid sp=) and no valid rua= (6.6.3)")
        # 6.6.3 step 6.1: act as if the record said p=none (no sp=, so none everywhere)
        ignored += [n for n, v in (("p", p), ("sp", sp)) if n in tags and v is None]
        p, sp = "none", None
    return replace(record, p=p, sp=sp, ignored=tuple(ignored))


# --- The verdict --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DMARCVerdict:
    """What DMARC says about one message.

    ``policy`` is the policy that applies (sp= for a subdomain of the Organizational
    Domain whose record was used, else p=), None when no record applies;
    ``disposition`` is what the Domain Owner asks for this message: the policy for a
    failing message selected by pct, the next lower policy for one that is not
    (6.6.4), "none" otherwise (pass, none, temperror, permerror).  Alignment is
    reported in the record's modes, or relaxed (the default of 6.3) with no record.
    """

    result: Result
    from_domain: str
    policy: Policy | None
    disposition: Policy
    record: DMARCRecord | None
    aligned_spf: bool
    aligned_dkim: bool
    policy_domain: str | None = None  # where the record was found
    reason: str = field(default="", compare=False)  # for logs, never for decisions


async def _records_at(resolver: Resolver, name: str) -> list[str]:
    """6.6.3 steps 1-2 / 3-4: the DMARC records at ``name``; NXDOMAIN and NODATA are an
    empty set; a temporary failure raises."""
    try:
        answers = await resolver.lookup(name, "TXT")
    except NXDomain:
        return []
    return [a for a in answers if isinstance(a, str) and is_dmarc_record(a)]


async def _discover(resolver: Resolver, domain: str) -> tuple[list[str], str]:
    """6.6.3: the record set at _dmarc.<domain>, else at _dmarc.<org domain>."""
    records = await _records_at(resolver, f"_dmarc.{domain}")
    org = organizational_domain(domain)
    if records or org == domain:
        return records, domain
    return await _records_at(resolver, f"_dmarc.{org}"), org


async def check_dmarc(
    resolver: Resolver,
    from_domain: str,
    *,
    spf_domain: str | None,
    spf_pass: bool,
    dkim_pass_domains: Sequence[str],
    sample: Callable[[], float] = random.random,
) -> DMARCVerdict:
    """Evaluate DMARC for one author domain (RFC 7489 6.6).

    ``spf_domain`` is the domain SPF checked (the MAIL FROM domain, or the HELO name
    for a null reverse-path, 3.1.2), counted only if ``spf_pass``;
    ``dkim_pass_domains`` are the d= of the signatures that verified.  ``sample``
    returns a float in [0, 1) and is called only for a failing message with pct < 100.
    """
    domain = _canonical(from_domain)

    def alignment(record: DMARCRecord | None) -> tuple[bool, bool]:
        aspf = record.aspf if record else "r"
        adkim = record.adkim if record else "r"
        spf = spf_pass and bool(spf_domain) and aligned(spf_domain or "", domain, aspf)
        return spf, any(aligned(d, domain, adkim) for d in dkim_pass_domains)

    def unevaluated(result: Result, at: str | None, reason: str) -> DMARCVerdict:
        return DMARCVerdict(
            result, domain, None, "none", None, *alignment(None), policy_domain=at, reason=reason
        )

    try:
        records, at = await _discover(resolver, domain)
    except DNSError as error:  # NXDOMAIN was an empty set: this is a temporary failure
        return unevaluated("temperror", None, str(error))  # 6.9
    if len(records) != 1:  # 6.6.3 step 5: none, or several, means no DMARC processing
        return unevaluated(
            "none", at if records else None, f"{len(records)} DMARC records at _dmarc.{at}"
        )
    try:
        record = parse_dmarc_record(records[0])
    except DMARCRecordError as error:
        return unevaluated("permerror", at, str(error))  # RFC 7489 11.2
    a_spf, a_dkim = alignment(record)
    policy = record.policy_for(subdomain=at != domain)
    if a_spf or a_dkim:  # 4.2: pass if either identifier aligns and passed
        return DMARCVerdict("pass", domain, policy, "none", record, a_spf, a_dkim, at)
    selected = record.pct >= 100 or sample() * 100 < record.pct  # 6.6.4
    return DMARCVerdict(
        "fail",
        domain,
        policy,
        policy if selected else _LOWER[policy],
        record,
        a_spf,
        a_dkim,
        at,
        "" if selected else "not selected by pct",
    )


_STRICTNESS: Final[dict[str, int]] = {"reject": 5, "quarantine": 4, "none": 3}
_RANK: Final[dict[Result, int]] = {"temperror": 2, "permerror": 1, "pass": 0, "none": -1}


def _severity(v: DMARCVerdict) -> int:
    return _STRICTNESS[v.disposition] if v.result == "fail" else _RANK[v.result]


async def check_dmarc_authors(
    resolver: Resolver,
    from_domains: Sequence[str],
    *,
    spf_domain: str | None,
    spf_pass: bool,
    dkim_pass_domains: Sequence[str],
    sample: Callable[[], float] = random.random,
) -> DMARCVerdict:
    """DMARC for a message with any number of author domains (``headers.from_domains``).

    One domain: ``check_dmarc``.  None (no From:, or no address with a domain): the
    message is outside DMARC's scope (6.6.1) and malformed (RFC 5322 3.6 requires
    From:), so permerror; the caller may reject it.  Several: 6.6.1's recommendation,
    every domain is evaluated and the strictest failing verdict wins (then temperror,
    permerror, pass, none); more than ``MAX_AUTHOR_DOMAINS``: permerror unevaluated.
    """
    domains = list(dict.fromkeys(_canonical(d) for d in from_domains if _canonical(d)))
    if not domains or len(domains) > MAX_AUTHOR_DOMAINS:
        return DMARCVerdict(
            "permerror",
            domains[0] if domains else "",
            None,
            "none",
            None,
            False,
            False,
            reason=f"{len(domains)} author domains (RFC 7489 6.6.1)",
        )
    verdicts = [
        await check_dmarc(
            resolver,
            d,
            spf_domain=spf_domain,
            spf_pass=spf_pass,
            dkim_pass_domains=dkim_pass_domains,
            sample=sample,
        )
        for d in domains
    ]
    return max(verdicts, key=_severity)  # max keeps the first of equals
