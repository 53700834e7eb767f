"""XCLIENT: a trusted SMTP proxy (nginx's mail module, Postfix's postscreen) tells the
server about the client it is relaying for.

This module owns the grammar of the XCLIENT argument as Postfix defines it
(https://www.postfix.org/XCLIENT_README.html):

    xclient-command = XCLIENT 1*( SP attribute-name"="attribute-value )
    attribute-name  = ( NAME | ADDR | PORT | PROTO | HELO | LOGIN | DESTADDR | DESTPORT )
    attribute-value = xtext

Whether the peer may send XCLIENT at all, the 220 greeting that follows it, and the
session reset are the glue's and the session's business.  Every refusal is 501 5.5.4,
as Postfix answers.

Absent versus unavailable: Postfix changes only the attributes a command names, and
nginx splits its information over two commands (ADDR / LOGIN / NAME, then PROTO /
HELO), so "absent" (keep what you have) and "[UNAVAILABLE]" (forget it) differ.  Both
are None in the attribute fields; :attr:`XClient.given` says which were named.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from maitred_tx.smtp.params import xtext_decode
from maitred_tx.smtp.replies import (
    R501_XCLIENT_BAD_VALUE,
    R501_XCLIENT_DUPLICATE,
    R501_XCLIENT_SYNTAX,
    R501_XCLIENT_UNKNOWN,
    Reply,
)

__all__ = ["ATTRIBUTES", "XClient", "XClientError", "parse_xclient"]

_T = TypeVar("_T")

ATTRIBUTES: Final = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")

# XCLIENT_README: "syntactically valid NAME and HELO attribute-value elements can be up
# to 255 characters long"; LOGIN gets the same bound as SASL identities (RFC 4616 2).
MAX_VALUE: Final = 255

# XCLIENT_README: the special values, "in upper case, lower case or mixed case".
_UNAVAILABLE: Final = "[UNAVAILABLE]"
_TEMPUNAVAIL: Final = "[TEMPUNAVAIL]"  # NAME: "the lookup error condition was transient"
# RFC 1123 2.1 host names (underscores too, as Postfix's valid_hostname() allows them:
# they appear in real PTR records), labels of at most 63 (RFC 1035 2.3.4).
_HOSTNAME: Final = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?"
)
_PORT: Final = re.compile(r"[0-9]{1,5}")
# attribute-name: a keyword (RFC 5321 4.1.2 esmtp-keyword), so that echoing an unknown
# one in the reply is safe.
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


class XClientError(ValueError):
    """The XCLIENT argument is not acceptable; ``reply`` is the answer to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(" ".join(reply.text))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class XClient:
    """The attributes of one XCLIENT command: None when absent or unavailable.

    ``addr`` / ``destaddr`` are in :mod:`ipaddress` normal form, without Postfix's
    "IPV6:" prefix.  ``given`` holds the upper-cased names the command carried;
    ``temporary`` those whose value was [TEMPUNAVAIL] (for NAME, Postfix's
    reject_unknown_client_hostname then defers instead of rejecting).
    """

    name: str | None = None
    addr: str | None = None
    port: int | None = None
    proto: str | None = None  # "SMTP" or "ESMTP"
    helo: str | None = None
    login: str | None = None
    destaddr: str | None = None
    destport: int | None = None
    given: frozenset[str] = frozenset()
    temporary: frozenset[str] = frozenset()


def parse_xclient(argument: str) -> XClient:
    """Parse the text after ``XCLIENT `` into an :class:`XClient`."""
    raw: dict[str, str] = {}
    for word in argument.split(" "):
        if not word:
            continue  # several spaces between attributes are tolerated, as in params.py
        name, eq, value = word.partition("=")
        if not eq or not _NAME.fullmatch(name):
            raise XClientError(R501_XCLIENT_SYNTAX)
        name = name.upper()  # XCLIENT_README: attribute names are case-insensitive
        if name not in ATTRIBUTES:
            raise XClientError(R501_XCLIENT_UNKNOWN.format(attribute=name[:32]))
        if name in raw:
            # Postfix lets the last one win; two values for one fact is a proxy bug,
            # and refusing it keeps the logged value the one that is used.
            raise XClientError(R501_XCLIENT_DUPLICATE.format(attribute=name))
        raw[name] = value
    if not raw:
        raise XClientError(R501_XCLIENT_SYNTAX)  # 1*( SP attribute-name"="attribute-value )
    temporary: set[str] = set()

    def attribute(name: str, convert: Callable[[str, str], _T]) -> _T | None:
        if name not in raw:
            return None
        text = _decode(name, raw[name])
        if text.upper() == _UNAVAILABLE:
            return None
        if text.upper() == _TEMPUNAVAIL:
            temporary.add(name)
            return None
        return convert(name, text)

    return XClient(
        name=attribute("NAME", _hostname),
        addr=attribute("ADDR", _address),
        port=attribute("PORT", _port),
        proto=attribute("PROTO", _proto),
        helo=attribute("HELO", _text),
        login=attribute("LOGIN", _text),
        destaddr=attribute("DESTADDR", _address),
        destport=attribute("DESTPORT", _port),
        given=frozenset(raw),
        temporary=frozenset(temporary),
    )


def _decode(name: str, value: str) -> str:
    """xtext-decode (RFC 3461 4) and refuse what cannot be a value of any attribute:
    empty, over-long, or carrying control characters (these end up in Received fields
    and logs, where a CR or LF would forge lines)."""
    try:
        text = xtext_decode(value)
    except ValueError:
        text = ""
    if (
        not text
        or len(text) > MAX_VALUE
        or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)
    ):
        raise _bad(name)
    return text


def _bad(name: str) -> XClientError:
    return XClientError(R501_XCLIENT_BAD_VALUE.format(attribute=name))


def _hostname(name: str, text: str) -> str:
    """NAME: the client's verified host name (XCLIENT_README), so host name syntax."""
    if not _HOSTNAME.fullmatch(text):
        raise _bad(name)
    return text


def _address(name: str, text: str) -> str:
    """ADDR, DESTADDR: IPv4, or IPv6 prefixed with "IPV6:" (any case).  A bare IPv6
    address is accepted too: it cannot be mistaken for anything else."""
    try:
        if text[:5].upper() == "IPV6:":
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
                text[5:]
            )
        else:
            address = ipaddress.ip_address(text)
    except ValueError:
        raise _bad(name) from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise _bad(name)  # a zone index is local to the proxy, not a client address
    return str(address)


def _port(name: str, text: str) -> int:
    """PORT, DESTPORT: a decimal TCP port."""
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise _bad(name)
    return int(text)


def _proto(name: str, text: str) -> str:
    """PROTO: "either SMTP or ESMTP" (XCLIENT_README), in any case."""
    proto = text.upper()
    if proto not in ("SMTP", "ESMTP"):
        raise _bad(name)
    return proto


def _text(name: str, text: str) -> str:
    """HELO, LOGIN: what the client said or authenticated as; free text, checked by
    :func:`_decode` only (a HELO argument is often not a valid domain, and recording
    it faithfully is the point)."""
    return text


