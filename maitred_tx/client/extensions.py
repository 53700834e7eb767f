"""What the server offered: the EHLO/LHLO reply as an :class:`Extensions` value.

RFC 5321 4.1.1.1: the first line of a positive EHLO reply is the server's name and
greeting, every further line one ``ehlo-keyword *(SP ehlo-param)``; keywords are
case-insensitive.  The keywords the client acts on get fields: SIZE (RFC 1870),
PIPELINING (RFC 2920), CHUNKING and BINARYMIME (RFC 3030), 8BITMIME (RFC 6152),
SMTPUTF8 (RFC 6531), DSN (RFC 3461), STARTTLS (RFC 3207), AUTH (RFC 4954; the old
``AUTH=`` form that some servers still send is read too) and ENHANCEDSTATUSCODES
(RFC 2034).  Every keyword, known or not, stays in ``keywords`` with its parameters,
so that callers can look for extensions this module does not know.

A server that only answered HELO offers nothing: :data:`NO_EXTENSIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from maitred_tx.client.replies import ServerReply

__all__ = ["NO_EXTENSIONS", "Extensions", "parse_ehlo"]


@dataclass(frozen=True, slots=True)
class Extensions:
    """The service extensions one EHLO/LHLO reply announced."""

    esmtp: bool = False  # False after a HELO fallback: no extension may be used
    # SIZE announced (RFC 1870 4): the client may send MAIL ... SIZE=n.
    size: bool = False
    # Its fixed maximum in octets; None when none is given or "SIZE 0" (no fixed limit).
    max_size: int | None = None
    pipelining: bool = False
    chunking: bool = False
    eight_bit_mime: bool = False
    binary_mime: bool = False
    smtputf8: bool = False
    dsn: bool = False
    starttls: bool = False
    enhanced_status_codes: bool = False
    auth: frozenset[str] = frozenset()  # SASL mechanisms, upper-case
    # Every keyword (upper-case) with its parameters as sent, in order.
    keywords: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __contains__(self, keyword: object) -> bool:
        """``"XCLIENT" in extensions``: was the keyword announced (any case)?"""
        return isinstance(keyword, str) and self.params(keyword) is not None

    def params(self, keyword: str) -> tuple[str, ...] | None:
        """The parameters announced with *keyword*, or None if it was not announced."""
        wanted = keyword.upper()
        for name, params in self.keywords:
            if name == wanted:
                return params
        return None


NO_EXTENSIONS: Final = Extensions()


def parse_ehlo(reply: ServerReply) -> Extensions:
    """The extensions a positive EHLO/LHLO *reply* announces (lines after the first)."""
    keywords: list[tuple[str, tuple[str, ...]]] = []
    auth: set[str] = set()
    for line in reply.lines[1:]:
        words = line.split()
        if not words:
            continue  # an empty last line ("250 "), as smtp-sink sends
        keyword, params = words[0].upper(), tuple(words[1:])
        if keyword.startswith("AUTH="):
            # Pre-RFC 4954 servers (old Exchange, some appliances) announce AUTH=LOGIN.
            params = (keyword[5:], *params)
            keyword = "AUTH="
        if keyword in ("AUTH", "AUTH="):
            auth.update(p.upper() for p in params if p)
        keywords.append((keyword, params))
    names = {name for name, _ in keywords}
    size_params = next((p for name, p in keywords if name == "SIZE"), None)
    return Extensions(
        esmtp=True,
        size=size_params is not None,
        max_size=_max_size(size_params),
        pipelining="PIPELINING" in names,
        chunking="CHUNKING" in names,
        eight_bit_mime="8BITMIME" in names,
        binary_mime="BINARYMIME" in names,
        smtputf8="SMTPUTF8" in names,
        dsn="DSN" in names,
        starttls="STARTTLS" in names,
        enhanced_status_codes="ENHANCEDSTATUSCODES" in names,
        auth=frozenset(auth),
        keywords=tuple(keywords),
    )


def _max_size(params: tuple[str, ...] | None) -> int | None:
    """RFC 1870 4: ``SIZE [number]``; 0 or no number means no fixed maximum.  A value
    that is not a number is read as none announced: refusing to send because of the
    server's typo would help nobody, and the server still enforces its own limit."""
    if not params or not params[0].isascii() or not params[0].isdigit():
        return None
    value = int(params[0])
    return value or None
