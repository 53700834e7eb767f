"""MTA-STS (RFC 8461) records and policies: the ``_mta-sts`` TXT record and the policy file.

Owns the grammar of section 3.1 (the TXT record, with the record selection rule: records
not starting with ``v=STSv1;`` are discarded, and anything but exactly one left means "no
policy"), of section 3.2 (the policy file: ``key: value`` lines ended by LF or CRLF,
unknown keys ignored, only the first of a repeated non-``mx`` key used), the limits both
sections set (id of 1-32 alphanumerics, ``max_age`` of at most 31557600 seconds, a policy
of at most 64 KiB, section 3.3) and MX host matching (section 4.1).

Pure: stdlib and the SMTP core's domain normalisation only.  A malformed record or policy
raises :class:`StsError` with a message that says which line and why; nothing else
escapes for any input.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from maitred_tx.smtp.address import AddressError, normalize_domain

__all__ = [
    "MAX_MAX_AGE",
    "MAX_POLICY_SIZE",
    "Mode",
    "NoStsRecord",
    "Policy",
    "StsError",
    "StsRecord",
    "ascii_domain",
    "parse_policy",
    "parse_txt_record",
    "select_record",
]

# RFC 8461 3.2: max_age is at most 31557600 seconds (one year of 365.25 days).
MAX_MAX_AGE: Final = 31557600
# RFC 8461 3.3 asks senders to bound the policy body and names 64 KiB; real policies
# are a few hundred bytes.
MAX_POLICY_SIZE: Final = 64 * 1024
VERSION: Final = "STSv1"

# 3.1: sts-id = "id=" 1*32(ALPHA / DIGIT)
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9]{1,32}")
# 3.1 sts-ext-name / 3.2 sts-policy-ext-name: (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
# 3.1 sts-ext-value: 1*(%x21-3A / %x3C / %x3E-7E), i.e. no "=", ";", space or controls.
_TXT_VALUE: Final = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# 3.2 sts-policy-max-age-value = 1*10(DIGIT)
_MAX_AGE: Final = re.compile(r"[0-9]{1,10}")
# The record selection rule of 3.1 ("records that do not begin with 'v=STSv1;' are
# discarded"), read with the field delimiter's optional whitespace (erratum 6285).
_STS_START: Final = re.compile(r"v=STSv1[ \t]*;")
_WSP: Final = " \t"
# 3.2 excludes CTLs from every value; HT is whitespace (WSP), not data.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class StsError(ValueError):
    """A TXT record or policy that RFC 8461 says to treat as absent or invalid."""


class NoStsRecord(StsError):
    """No ``v=STSv1`` TXT record at all: the domain does not use MTA-STS (3.1)."""


class Mode(enum.Enum):
    """3.2 ``mode``: what a sender does when an MX fails validation (section 5)."""

    ENFORCE = "enforce"  # do not deliver to it
    TESTING = "testing"  # report (TLS-RPT) but deliver
    NONE = "none"  # as if there were no policy (8.3: how a domain withdraws one)


@dataclass(frozen=True, slots=True)
class StsRecord:
    """The ``_mta-sts`` TXT record: ``id`` names the current policy (3.1); a new id
    tells senders to fetch the policy again."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy (3.2).  ``mx`` holds the patterns in lower-case A-label form
    (``"*.example.net"`` keeps its wildcard); ``max_age`` is in seconds; ``extensions``
    are the unknown ``(key, value)`` pairs, kept for reports but never interpreted."""

    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    extensions: tuple[tuple[str, str], ...] = ()

    def matches(self, mx_host: str) -> bool:
        """Whether the MX host name is allowed by one of the ``mx`` patterns (4.1).

        Case-insensitive, a trailing dot ignored, IDNs compared as A-labels; a leading
        ``*.`` matches exactly one left-most label, so ``*.example.com`` matches
        ``mx1.example.com`` but neither ``example.com`` nor ``a.b.example.com``.  A host
        name that cannot be a domain matches nothing."""
        try:
            host = ascii_domain(mx_host)
        except StsError:
            return False
        _, _, parent = host.partition(".")
        return any(
            parent == pattern[2:] if pattern.startswith("*.") else host == pattern
            for pattern in self.mx
        )

    def lines(self) -> list[str]:
        """The policy as ``key: value`` lines, known keys first (the RFC 8460 4.4
        ``policy-string`` of a TLS report, and the form kept in the cache)."""
        return [
            f"version: {VERSION}",
            f"mode: {self.mode.value}",
            *(f"mx: {pattern}" for pattern in self.mx),
            f"max_age: {self.max_age}",
            *(f"{key}: {value}" for key, value in self.extensions),
        ]

    def to_text(self) -> str:
        """The policy file text (CRLF line ends, 3.2); ``parse_policy`` gives it back."""
        return "".join(line + "\r\n" for line in self.lines())


def ascii_domain(name: str) -> str:
    """The lower-case A-label form of a domain name, without a trailing dot.

    U-labels are converted (IDNA 2003, as the SMTP core does); a name that cannot be a
    DNS name (bad label, too long, an address literal) raises StsError."""
    try:
        unicode = normalize_domain(name)
    except AddressError as exc:
        raise StsError(f"{name!r} is not a domain name: {exc}") from None
    return unicode.encode("idna").decode("ascii")


def select_record(texts: Iterable[str]) -> StsRecord:
    """The one MTA-STS record among a name's TXT records (3.1).

    Records not starting with ``v=STSv1;`` are discarded.  None left raises NoStsRecord;
    more than one, or one that does not parse, raises StsError: in all three cases the
    RFC says to act as if the domain had no policy (a cached one still applies, 5.1)."""
    candidates = [text for text in texts if _STS_START.match(text)]
    if not candidates:
        raise NoStsRecord("no v=STSv1 TXT record")
    if len(candidates) > 1:
        raise StsError(f"{len(candidates)} v=STSv1 TXT records: only one is allowed")
    return parse_txt_record(candidates[0])


def parse_txt_record(text: str) -> StsRecord:
    """Parse one ``_mta-sts`` TXT record (its character-strings already joined, 3.1).

    ``v=STSv1`` must come first; ``id`` is required; unknown fields are kept as
    extensions; of a repeated ``id`` the first counts (the rule 3.2 states for
    policies)."""
    fields = text.split(";")
    if fields[0].rstrip(_WSP) != "v=" + VERSION:
        raise StsError(f"TXT record must start with 'v={VERSION}': {text[:40]!r}")
    rest = [field.strip(_WSP) for field in fields[1:]]
    if rest and not rest[-1]:
        rest.pop()  # the optional trailing ";"
    record_id: str | None = None
    extensions: list[tuple[str, str]] = []
    for field in rest:
        name, sep, value = field.partition("=")
        if not sep or not _NAME.fullmatch(name):
            raise StsError(f"TXT record field {field!r} is not name=value")
        if name == "id":
            if record_id is None and not ID_PATTERN.fullmatch(value):
                raise StsError(f"TXT record id {value!r} is not 1 to 32 letters and digits")
            record_id = record_id or value  # a repeated id is ignored
        elif not _TXT_VALUE.fullmatch(value):
            raise StsError(f"TXT record field {name!r} has an invalid value {value!r}")
        else:
            extensions.append((name, value))
    if record_id is None:
        raise StsError("TXT record has no id")
    return StsRecord(record_id, tuple(extensions))


def parse_policy(body: str | bytes) -> Policy:
    """Parse a policy file (3.2): UTF-8, at most MAX_POLICY_SIZE octets.

    Lines end with LF or CRLF; whitespace after the colon and at the end of a line is
    ignored, and so are blank lines (a lenience: a stray empty line should not cost a
    domain its protection).  ``version``, ``mode`` and ``max_age`` are required, and at
    least one ``mx`` unless the mode is ``none``; for repeated keys other than ``mx``
    the first wins; unknown keys are ignored (kept in ``extensions``)."""
    text = _decode(body)
    known: dict[str, str] = {}
    mx: list[str] = []
    extensions: list[tuple[str, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip(_WSP):
            continue
        key, value = _split_line(number, line)
        if key == "mx":
            mx.append(_mx_pattern(number, value))
        elif key in ("version", "mode", "max_age"):
            known.setdefault(key, value)  # 3.2: "all entries except for the first"
        else:
            extensions.append((key, value))
    for key in ("version", "mode", "max_age"):
        if key not in known:
            raise StsError(f"policy has no {key!r} line")
    if known["version"] != VERSION:
        raise StsError(f"policy version {known['version']!r} is not {VERSION!r}")
    mode = _mode(known["mode"])
    if not mx and mode is not Mode.NONE:
        raise StsError(f"policy in mode {mode.value!r} has no 'mx' line")
    return Policy(mode, tuple(mx), _max_age(known["max_age"]), tuple(extensions))


def _decode(body: str | bytes) -> str:
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if len(raw) > MAX_POLICY_SIZE:
        raise StsError(f"policy of {len(raw)} octets exceeds the {MAX_POLICY_SIZE} limit")
    try:
        return raw.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError as exc:
        raise StsError(f"policy is not UTF-8 (octet {exc.start})") from None


def _split_line(number: int, line: str) -> tuple[str, str]:
    bad = _CONTROL.search(line)
    if bad:
        raise StsError(f"policy line {number}: control character {bad.group()!r}")
    key, sep, value = line.partition(":")
    if not sep or not _NAME.fullmatch(key):
        raise StsError(f"policy line {number}: expected 'key: value', got {line[:40]!r}")
    value = value.strip(_WSP)
    if not value:
        raise StsError(f"policy line {number}: {key!r} has no value")
    return key, value


def _mx_pattern(number: int, value: str) -> str:
    wildcard = value.startswith("*.")
    name = value[2:] if wildcard else value
    if "*" in name:
        raise StsError(f"policy line {number}: mx {value!r}: '*' only as the whole first label")
    try:
        pattern = ascii_domain(name)
    except StsError as exc:
        raise StsError(f"policy line {number}: mx {value!r}: {exc}") from None
    return "*." + pattern if wildcard else pattern


def _mode(value: str) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise StsError(f"policy mode {value!r} is not enforce, testing or none") from None


def _max_age(value: str) -> int:
    if not _MAX_AGE.fullmatch(value):
        raise StsError(f"policy max_age {value!r} is not 1 to 10 digits")
    seconds = int(value)
    if seconds > MAX_MAX_AGE:
        raise StsError(f"policy max_age {seconds} exceeds {MAX_MAX_AGE} (one year)")
    return seconds
