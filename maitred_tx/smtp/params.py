"""MAIL and RCPT parameters: the ``KEYWORD[=VALUE]`` text after the path.

This module owns the parameter grammar of RFC 5321 4.1.2 (esmtp-param) and the values
of the extensions the server implements:

- MAIL: SIZE (RFC 1870 6), BODY (RFC 6152 2, RFC 3030 3), SMTPUTF8 (RFC 6531 3.4),
  RET and ENVID (RFC 3461 4.3, 4.4), AUTH (RFC 4954 5);
- RCPT: NOTIFY and ORCPT (RFC 3461 4.1, 4.2; RFC 6533 3 for ``utf-8`` addresses);
- xtext (RFC 3461 4), the encoding of ENVID, ORCPT and AUTH values.

Every mistake becomes a :class:`ParamError` that carries the reply to send: 555 5.5.4
for a keyword this server does not know on that command (RFC 5321 4.1.1.11), 501 5.5.4
for a bad value, a repeated keyword or a malformed keyword.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from maitred_tx.smtp.replies import (
    R501_BAD_PARAM_VALUE,
    R501_DUPLICATE_PARAM,
    R501_SYNTAX,
    R555_UNKNOWN_PARAM,
    Reply,
)

__all__ = [
    "NO_MAIL_PARAMS",
    "NO_RCPT_PARAMS",
    "BodyType",
    "MailParams",
    "Notify",
    "ParamError",
    "RcptParams",
    "Ret",
    "parse_mail_params",
    "parse_rcpt_params",
    "xtext_decode",
    "xtext_encode",
]

_T = TypeVar("_T")

# RFC 5321 4.1.2 esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 1870 6: size-value = 1*20DIGIT (ASCII digits only, unlike str.isdigit()).
_SIZE: Final = re.compile(r"[0-9]{1,20}")
# RFC 3461 4.2 addr-type = atom (RFC 5322 3.2.3).
_ATOM: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
# RFC 3461 4: hexchar = "+" 2 upper-case HEXDIG.  Lower case is accepted too (as
# Postfix does): "+" is always an escape, so reading "+2b" as "+" is unambiguous and
# refusing it would only bounce mail from sloppy clients.
_HEXCHAR: Final = re.compile(r"\+([0-9A-Fa-f]{2})")
# RFC 6533 3 EmbeddedUnicodeChar = "\x{" HEXPOINT "}"; case-insensitive like Postfix.
_EMBEDDED: Final = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")

# RFC 3461 4.4: "The ENVID parameter MUST NOT exceed 100 characters".
MAX_ENVID: Final = 100
# RFC 3461 4.2 bounds the ORCPT value at 500 characters.
MAX_ORCPT: Final = 500


class ParamError(ValueError):
    """A parameter the peer sent is not acceptable; ``reply`` is the answer to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(" ".join(reply.text))
        self.reply = reply


class BodyType(enum.Enum):
    """BODY= (RFC 6152 2: 7BIT / 8BITMIME; RFC 3030 3: BINARYMIME)."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"
    BINARY_MIME = "BINARYMIME"


class Ret(enum.Enum):
    """RET= (RFC 3461 4.3): what a failure DSN should return of the message."""

    FULL = "FULL"
    HDRS = "HDRS"


class Notify(enum.Enum):
    """One NOTIFY= condition (RFC 3461 4.1)."""

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


@dataclass(frozen=True, slots=True)
class MailParams:
    """The parameters of one MAIL command; ``None`` means "not given"."""

    size: int | None = None  # RFC 1870: the caller compares it with its own limit
    body: BodyType | None = None
    smtputf8: bool = False
    ret: Ret | None = None
    envid: str | None = None  # xtext-decoded
    # xtext-decoded mailbox or "<>".  Untrusted: RFC 4954 5 lets the server use it only
    # when it trusts the authenticated client, a decision for policy, not the parser.
    auth: str | None = None


@dataclass(frozen=True, slots=True)
class RcptParams:
    """The parameters of one RCPT command; ``None`` means "not given"."""

    notify: frozenset[Notify] | None = None
    orcpt: tuple[str, str] | None = None  # (addr-type lower-cased, decoded address)


def parse_mail_params(text: str) -> MailParams:
    """Parse the parameter text of MAIL FROM (may be empty)."""
    if not text:
        return NO_MAIL_PARAMS  # the usual case; the value is immutable, so shared
    raw = _collect(text, _MAIL_KEYWORDS)
    return MailParams(
        size=_convert(raw, "SIZE", _size),
        body=_convert(raw, "BODY", lambda v: BodyType(_required(v).upper())),
        smtputf8=_convert(raw, "SMTPUTF8", _flag) or False,
        ret=_convert(raw, "RET", lambda v: Ret(_required(v).upper())),
        envid=_convert(raw, "ENVID", _envid),
        auth=_convert(raw, "AUTH", _auth),
    )


def parse_rcpt_params(text: str) -> RcptParams:
    """Parse the parameter text of RCPT TO (may be empty)."""
    if not text:
        return NO_RCPT_PARAMS
    raw = _collect(text, _RCPT_KEYWORDS)
    return RcptParams(
        notify=_convert(raw, "NOTIFY", _notify),
        orcpt=_convert(raw, "ORCPT", _orcpt),
    )


# No parameters given: the usual case.  The values are immutable, so one each is shared.
NO_MAIL_PARAMS: Final = MailParams()
NO_RCPT_PARAMS: Final = RcptParams()
_MAIL_KEYWORDS: Final = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
_RCPT_KEYWORDS: Final = frozenset({"NOTIFY", "ORCPT"})


def _collect(text: str, known: frozenset[str]) -> dict[str, str | None]:
    """Split ``KEYWORD[=VALUE]`` words: upper-cased keyword -> raw value (None if absent)."""
    raw: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue  # several spaces between parameters are tolerated
        keyword, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            raise ParamError(R501_SYNTAX)
        keyword = keyword.upper()  # RFC 5321 2.4: keywords are case-insensitive
        if keyword not in known:
            # RFC 5321 4.1.1.11: an unrecognised or unimplemented parameter is 555.
            raise ParamError(R555_UNKNOWN_PARAM.format(keyword=keyword))
        if keyword in raw:
            raise ParamError(R501_DUPLICATE_PARAM.format(keyword=keyword))
        if eq and not _is_esmtp_value(value):
            raise ParamError(R501_BAD_PARAM_VALUE.format(keyword=keyword))
        raw[keyword] = value if eq else None
    return raw


def _is_esmtp_value(value: str) -> bool:
    """RFC 5321 4.1.2 esmtp-value = 1*(%d33-60 / %d62-126); RFC 6531 3.3 adds UTF-8."""
    return bool(value) and all((33 <= ord(c) <= 126 and c != "=") or ord(c) >= 0xA0 for c in value)


def _convert(
    raw: dict[str, str | None], keyword: str, convert: Callable[[str | None], _T]
) -> _T | None:
    """Apply *convert* to the keyword's value; any ValueError becomes 501 for it."""
    if keyword not in raw:
        return None
    try:
        return convert(raw[keyword])
    except ValueError:
        raise ParamError(R501_BAD_PARAM_VALUE.format(keyword=keyword)) from None


def _required(value: str | None) -> str:
    if value is None:
        raise ValueError("value required")
    return value


def _flag(value: str | None) -> bool:
    """A keyword that takes no value (RFC 6531 3.4: SMTPUTF8)."""
    if value is not None:
        raise ValueError("no value allowed")
    return True


def _size(value: str | None) -> int:
    value = _required(value)
    if not _SIZE.fullmatch(value):  # RFC 1870 6
        raise ValueError("bad size")
    return int(value)


def _envid(value: str | None) -> str:
    value = _required(value)
    if len(value) > MAX_ENVID:  # RFC 3461 4.4, measured on the xtext as sent
        raise ValueError("ENVID too long")
    return _printable(xtext_decode(value), ascii_only=True)


def _auth(value: str | None) -> str:
    # RFC 4954 5: AUTH=<> or AUTH=xtext(addr-spec).  The mailbox may be international
    # (RFC 6531), so only control characters are refused.
    return _printable(xtext_decode(_required(value)), ascii_only=False)


def _notify(value: str | None) -> frozenset[Notify]:
    """RFC 3461 4.1: "NEVER" alone, or a comma list of SUCCESS / FAILURE / DELAY."""
    items = [Notify(item) for item in _required(value).upper().split(",")]
    if Notify.NEVER in items and len(items) > 1:
        raise ValueError("NEVER combined with other conditions")
    return frozenset(items)


def _orcpt(value: str | None) -> tuple[str, str]:
    """RFC 3461 4.2: ORCPT=addr-type ";" xtext; RFC 6533 3 for addr-type utf-8."""
    value = _required(value)
    if len(value) > MAX_ORCPT:
        raise ValueError("ORCPT too long")
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not _ATOM.fullmatch(addr_type) or not encoded:
        raise ValueError("bad ORCPT syntax")
    addr_type = addr_type.lower()
    if addr_type == "utf-8":
        return addr_type, _printable(_utf8_addr_decode(encoded), ascii_only=False)
    # RFC 3461 4.2: before xtext encoding the address is printable US-ASCII.
    return addr_type, _printable(xtext_decode(encoded), ascii_only=True)


def _printable(text: str, *, ascii_only: bool) -> str:
    """Refuse control characters (and non-ASCII if asked) in a decoded value.

    These values end up in DSN fields (Original-Envelope-Id, Original-Recipient) and
    logs; a decoded CR or LF there would let the peer write header fields of its own.
    """
    for c in text:
        code = ord(c)
        if code < 0x20 or 0x7F <= code < 0xA0 or (ascii_only and code > 0x7F):
            raise ValueError("control or non-ASCII character in value")
    return text


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 4 xtext; the octets are read as UTF-8.  Invalid -> ValueError.

    xchar is "!".."~" except "+" and "="; "+XX" is one octet.  Octets are read as UTF-8
    (plain ASCII being a subset) so that :func:`xtext_encode` round-trips any text.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "+":
            match = _HEXCHAR.match(text, i)
            if match is None:
                raise ValueError("bad xtext hexchar")
            out.append(int(match.group(1), 16))
            i += 3
            continue
        if not "!" <= c <= "~" or c == "=":
            raise ValueError("bad xtext character")
        out.append(ord(c))
        i += 1
    return out.decode("utf-8")  # UnicodeDecodeError is a ValueError


def xtext_encode(text: str) -> str:
    """Encode *text* (as UTF-8 octets) as RFC 3461 4 xtext, with upper-case hex."""
    out = []
    for octet in text.encode("utf-8"):
        if 0x21 <= octet <= 0x7E and octet not in b"+=":
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def _utf8_addr_decode(text: str) -> str:
    """Decode RFC 6533 3 utf-8-addr-xtext / utf-8-addr-unitext.

    QCHAR is printable ASCII except "\\", "+" and "="; raw UTF-8 is the unitext form;
    ``\\x{HEX}`` is one code point.  A plain xtext "+XX" is also read, since some
    senders xtext-encode whatever the addr-type: "+" is never a QCHAR, so it is not
    ambiguous.  The octets are collected and read as UTF-8 at the end.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c in "\\+":
            match = (_EMBEDDED if c == "\\" else _HEXCHAR).match(text, i)
            if match is None:
                raise ValueError("bad escape in utf-8-addr-xtext")
            code = int(match.group(1), 16)
            if c == "+":
                out.append(code)
            elif code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise ValueError("bad code point")
            else:
                out += chr(code).encode("utf-8")
            i = match.end()
            continue
        if not (("!" <= c <= "~" and c != "=") or ord(c) >= 0xA0):
            raise ValueError("bad utf-8-addr-xtext character")
        out += c.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError here
        i += 1
    return out.decode("utf-8")
