"""The Authentication-Results header field (RFC 8601), pure.

Owns: writing our one field (2.2 syntax, 2.7 methods and properties; RFC 6008 for
header.b; RFC 8617 for arc) and removing fields that claim our authserv-id before
ours is added (5: forged fields "MUST" be removed).  The inputs are small frozen
dataclasses defined here, or any object with the same attributes: the check modules
(spf, dkim, arc, dmarc) are not imported, so each can change without this one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

from maitred_tx.auth.headers import header_end, iter_fields, unfold

__all__ = [
    "ARCEntry",
    "DKIMEntry",
    "DMARCEntry",
    "SPFEntry",
    "authserv_id_of",
    "format_authentication_results",
    "strip_forged",
]

FIELD_NAME = b"Authentication-Results"
FOLD = "\r\n\t"  # RFC 5322 2.2.3: fold with CRLF + WSP, between resinfo

# RFC 2045 5.1: token = 1*<any US-ASCII CHAR except SPACE, CTLs, or tspecials>.
_TOKEN = re.compile(r'[!#$%&\'*+\-.0-9A-Z^_`a-z{|}~]+')
_TOKEN_B = re.compile(rb'[!#$%&\'*+\-.0-9A-Z^_`a-z{|}~]+')
# RFC 8601 2.2: pvalue = value / [ [ local-part ] "@" ] domain-name, with a dot-atom
# local part (RFC 5322 3.2.3) and a domain-name (RFC 6376 3.5: sub-domain 1*("." ...)).
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"(?:{_ATOM}(?:\.{_ATOM})*)?@{_LABEL}(?:\.{_LABEL})+")
_KEYWORD = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")  # RFC 8601 2.2 result (Keyword)
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class _Outcome(Protocol):
    @property
    def result(self) -> object: ...  # a str, or an Enum whose value is one


@dataclass(frozen=True, slots=True)
class SPFEntry:
    """``spf=<result> smtp.mailfrom=<identity>`` (or ``smtp.helo`` for the HELO check,
    RFC 8601 2.7.2)."""

    result: object
    identity: str | None
    scope: Literal["mailfrom", "helo"] = "mailfrom"


@dataclass(frozen=True, slots=True)
class DKIMEntry:
    """One signature: ``dkim=<result> header.d= header.s= header.b=`` (2.7.1, RFC 6008);
    ``b`` may be the whole signature: it is shortened to what RFC 6008 asks."""

    result: object
    domain: str | None = None
    selector: str | None = None
    b: str | None = None


@dataclass(frozen=True, slots=True)
class ARCEntry:
    """``arc=<result> header.oldest-pass=<n>`` (RFC 8617 7.2; n only when > 0)."""

    result: object
    oldest_pass: int | None = None


@dataclass(frozen=True, slots=True)
class DMARCEntry:
    """``dmarc=<result> (p=<policy>) header.from=<domain>`` (RFC 7489 11.2)."""

    result: object
    from_domain: str | None
    policy: str | None = None


class DKIMLike(_Outcome, Protocol):
    @property
    def domain(self) -> str | None: ...
    @property
    def selector(self) -> str | None: ...
    @property
    def b(self) -> str | None: ...


class ARCLike(_Outcome, Protocol):
    @property
    def oldest_pass(self) -> int | None: ...


class DMARCLike(_Outcome, Protocol):
    @property
    def from_domain(self) -> str | None: ...
    @property
    def policy(self) -> str | None: ...


# --- Writing ----------------------------------------------------------------------------


def _check(text: str) -> str:
    if _CTL.search(text):  # a line break here would let a value forge header fields
        raise ValueError(f"control character in an Authentication-Results value: {text!r}")
    return text


def _value(text: str) -> str:
    """RFC 2045 value = token / quoted-string (RFC 5322 3.2.4, with quoted-pairs)."""
    if _TOKEN.fullmatch(_check(text)):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pvalue(text: str) -> str:
    """RFC 8601 2.2 pvalue: a token, a bare address or domain, else a quoted-string."""
    if _TOKEN.fullmatch(_check(text)) or _ADDRESS.fullmatch(text):
        return text
    return _value(text)


def _result(outcome: _Outcome) -> str:
    result = outcome.result
    text = str(result.value if isinstance(result, Enum) else result).lower()
    if not _KEYWORD.fullmatch(text):
        raise ValueError(f"not an Authentication-Results result keyword: {text!r}")
    return text


def _resinfo(method: str, outcome: _Outcome, comment: str = "",
             props: Sequence[tuple[str, str | None]] = ()) -> str:
    parts = [f"{method}={_result(outcome)}"]
    if comment:
        parts.append(f"({comment})")
    parts.extend(f"{name}={_pvalue(value)}" for name, value in props if value)
    return " ".join(parts)


def _short_b(b: str, others: Sequence[str]) -> str:
    """RFC 6008 2: at least the first 8 characters, and enough to be unique among the
    signatures reported."""
    length = 8
    while length < len(b) and any(o != b and o[:length] == b[:length] for o in others):
        length += 1
    return b[:length]


def _dkim(entries: Sequence[DKIMLike]) -> list[str]:
    bs = ["".join((e.b or "").split()) for e in entries]  # b= holds FWS (RFC 6376 3.5)
    return [
        _resinfo("dkim", e, props=[("header.d", e.domain), ("header.s", e.selector),
                                   ("header.b", _short_b(b, bs) if b else None)])
        for e, b in zip(entries, bs, strict=True)
    ]


def format_authentication_results(
    authserv_id: str,
    *,
    spf: SPFEntry | Sequence[SPFEntry] | None = None,
    dkim: Sequence[DKIMLike] = (),
    arc: ARCLike | None = None,
    dmarc: DMARCLike | None = None,
) -> bytes:
    """One Authentication-Results field, folded before each result, ending in CRLF.

    ``authserv-id; none`` when nothing was checked (RFC 8601 2.2 no-result).  Values
    that are not a token (or a bare address/domain) are quoted; non-ASCII text is
    written as UTF-8 (RFC 6532).  Control characters raise ValueError: they come from
    our own checks, and writing them would break the header.
    """
    resinfo: list[str] = []
    # RFC 8601 2.7.2: one spf result per identity checked (smtp.mailfrom, smtp.helo).
    for entry in (spf,) if isinstance(spf, SPFEntry) else spf or ():
        resinfo.append(_resinfo("spf", entry, props=[(f"smtp.{entry.scope}", entry.identity)]))
    resinfo.extend(_dkim(dkim))
    if arc is not None:
        oldest = arc.oldest_pass
        resinfo.append(_resinfo("arc", arc, props=[
            ("header.oldest-pass", str(oldest) if oldest else None)]))
    if dmarc is not None:
        comment = f"p={_check(dmarc.policy)}" if dmarc.policy else ""
        resinfo.append(_resinfo("dmarc", dmarc, comment,
                                [("header.from", dmarc.from_domain)]))
    head = f"{FIELD_NAME.decode()}: {_value(authserv_id)};"
    if not resinfo:
        return f"{head} none\r\n".encode()
    return (head + FOLD + (";" + FOLD).join(resinfo) + "\r\n").encode()


# --- Reading and removing ---------------------------------------------------------------


def _skip_cfws(data: bytes, i: int) -> int:
    """Past FWS and (nested) comments, RFC 5322 3.2.2; an unclosed comment runs to the
    end."""
    depth = 0
    while i < len(data):
        c = data[i : i + 1]
        if depth and c == b"\\":
            i += 2
            continue
        if c == b"(":
            depth += 1
        elif c == b")" and depth:
            depth -= 1
        elif not depth and c not in b" \t\r\n":
            return i
        i += 1
    return i


def _quoted(data: bytes, i: int) -> bytes | None:
    """The content of the quoted-string that starts at ``data[i]``, unescaped."""
    out = bytearray()
    i += 1
    while i < len(data):
        c = data[i : i + 1]
        if c == b'"':
            return bytes(out)
        if c == b"\\":
            i += 1
            c = data[i : i + 1]
        out += c
        i += 1
    return None  # unterminated


def _ids_of(value: bytes) -> list[bytes]:
    """The authserv-id (RFC 8601 2.2: [CFWS] authserv-id [CFWS authres-version] ";")
    as a strict token reading and as a lenient one (everything up to WSP, a comment or
    ";"), so that a field some reader would take for ours is recognised as ours."""
    value = unfold(value)
    i = _skip_cfws(value, 0)
    if value[i : i + 1] == b'"':
        quoted = _quoted(value, i)
        return [] if quoted is None else [quoted]
    token = _TOKEN_B.match(value, i)
    lenient = re.match(rb"[^\s(;]+", value[i:])
    return [m.group(0) for m in (token, lenient) if m is not None]


def authserv_id_of(field_value: bytes) -> str | None:
    """The authserv-id of an Authentication-Results field body (what follows the colon,
    folded or not), or None when there is none."""
    ids = _ids_of(field_value)
    return ids[0].decode("utf-8", "replace") if ids else None


def strip_forged(header_block: bytes, authserv_id: str) -> bytes:
    """Remove every Authentication-Results field whose authserv-id is ours
    (case-insensitive; RFC 8601 5), continuation lines included.  Everything else,
    including anything after the header section's empty line, is kept byte for byte.
    """
    if FIELD_NAME.lower() not in header_block.lower():  # the common case, at C speed
        return header_block
    ours = authserv_id.encode("utf-8").lower()
    end = header_end(header_block)
    head, rest = (header_block, b"") if end is None else (header_block[:end],
                                                          header_block[end:])
    kept = [
        field.raw
        for field in iter_fields(head)
        if not (field.is_named(FIELD_NAME) and any(i.lower() == ours
                                                   for i in _ids_of(field.value)))
    ]
    return b"".join(kept) + rest
