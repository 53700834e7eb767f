"""Envelope paths: reverse-path, forward-path, domains and address literals.

This module owns the text between ``<`` and ``>`` of MAIL FROM and RCPT TO and turns it
into a :class:`Mailbox`, or refuses it with :class:`AddressError`.  It enforces:

- RFC 5321 4.1.2 (Path, Mailbox, Local-part, Domain grammar) and 4.1.3 (address
  literals), the obsolete source route of 4.1.2 / Appendix C (accepted, flagged, dropped),
- RFC 5321 4.5.3.1.3 (a path is at most 256 octets) and 4.5.1 / 4.5.5 (``<Postmaster>``,
  the null reverse path ``<>``),
- RFC 6531 3.3 (UTF-8 in local parts and U-labels in domains), RFC 5890 / RFC 3490
  (IDNA: domains are compared in their Unicode form).

Parsing never depends on whether the client declared SMTPUTF8: a non-ASCII path is
parsed all the same and :attr:`Mailbox.is_utf8` lets the caller answer 553 5.6.7
(RFC 6531 3.5) instead of a misleading syntax error.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import string
import unicodedata
from dataclasses import dataclass, field

# The stdlib IDNA 2003 codec (RFC 3490/3491): nameprep + punycode, per label.
from encodings import idna as _idna
from typing import Final

__all__ = [
    "PLAIN_PATH",
    "AddressError",
    "Mailbox",
    "normalize_domain",
    "parse_forward_path",
    "parse_reverse_path",
    "plain_mailbox",
    "split_path_argument",
]

# RFC 5321 4.5.3.1.3: "The maximum total length of a reverse-path or forward-path is
# 256 octets (including the punctuation and element separators)."
MAX_PATH_OCTETS: Final = 256
# RFC 1035 2.3.4: 255 octets on the wire, i.e. 253 characters in dotted text without the
# root dot; RFC 5321 4.5.3.1.2 repeats the 255 of the wire form.
MAX_DOMAIN_OCTETS: Final = 253
# RFC 1035 2.3.4 / RFC 5890 2.3.2.1: a label (in its A-label form) is 1..63 octets.
MAX_LABEL_OCTETS: Final = 63
# The local part is deliberately NOT capped at the 64 octets of RFC 5321 4.5.3.1.1: VERP
# and SRS addresses routinely exceed it, and the RFC itself asks servers to accept
# longer objects where they can (4.5.3.1).  The 256-octet path limit still bounds it.

# RFC 5322 3.2.3 atext (RFC 5321 4.1.2 Atom = 1*atext).
_ATEXT: Final = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
# RFC 5321 4.1.2 Let-dig / Ldh-str, after lower-casing.
_LDH: Final = frozenset(string.ascii_lowercase + string.digits + "-")
# RFC 3490 3.1 lets IDNA treat these as dots; SMTP only knows ".", so they are refused
# rather than silently becoming label separators somewhere downstream.
_IDNA_DOTS: Final = frozenset("\u3002\uff0e\uff61")
_HEX_COLON_DOT: Final = frozenset(string.hexdigits + ":.")
_DIGITS_DOT: Final = frozenset(string.digits + ".")


class AddressError(ValueError):
    """A path the peer sent is not valid; str(e) is a short reason (for logs, not sent)."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One envelope mailbox, as the rest of the server uses it.

    ``local_part`` is the dot-string as sent, or the quoted-string with its quotes
    removed and quoted-pairs resolved: RFC 5321 4.1.2 makes ``"joe"@x`` and ``joe@x``
    the same mailbox, so code downstream never deals with quoting.  ``domain`` is the
    :func:`normalize_domain` form (or a normalised address literal ``[1.2.3.4]`` /
    ``[IPv6:...]``), so comparing two domains is plain string equality.  ``domain`` is
    ``""`` only for the bare ``<Postmaster>`` recipient (RFC 5321 4.5.1).
    """

    local_part: str
    domain: str
    quoted: bool = False
    source_route: bool = False
    # Whether the path as sent contained non-ASCII.  Kept apart from the fields because
    # the normalised domain is a U-label even when the peer sent the A-label, and an
    # all-ASCII path needs no SMTPUTF8 (RFC 6531 3.5).  Not part of equality: it says
    # how the address travelled, not which mailbox it is.
    _sent_utf8: bool = field(default=False, compare=False, repr=False)
    # str(self), built on first use: it is asked for in every message's log event, and
    # a Mailbox of a plain path is shared by the commands that name it.  Not a field of
    # the value.
    _text: str | None = field(default=None, init=False, compare=False, repr=False)

    def __str__(self) -> str:
        """``local@domain``, quoting the local part only when it must be (RFC 5321 4.1.2)."""
        text = self._text
        if text is None:
            local = self.local_part
            if not (_DOT_ATOM.fullmatch(local) or _is_dot_string(local)):  # regex: shortcut
                local = _quote(local)
            text = f"{local}@{self.domain}" if self.domain else local
            object.__setattr__(self, "_text", text)  # a cache, not a change of value
        return text

    @property
    def is_utf8(self) -> bool:
        """True when the path needed SMTPUTF8: non-ASCII in what the peer sent (RFC 6531 3.3)."""
        return self._sent_utf8 or not self.local_part.isascii()

    @property
    def is_address_literal(self) -> bool:
        """True for ``user@[1.2.3.4]`` / ``user@[IPv6:...]`` (RFC 5321 4.1.3)."""
        return self.domain.startswith("[")

    @property
    def has_relay_syntax(self) -> bool:
        """True for the classic ways of asking a host to relay on to another one.

        A source route (RFC 5321 Appendix C), the ``%`` hack and bang paths in the
        local part, an ``@`` hidden in a quoted local part, or an address literal: a
        server that hands such a local part to a mailer that still honours them becomes
        an open relay, so policy refuses them unless told otherwise.
        """
        local = self.local_part
        return (
            self.source_route
            or self.is_address_literal
            or "%" in local
            or "!" in local
            or "@" in local
        )


def split_path_argument(arg: str) -> tuple[str, str]:
    """Split the text after ``FROM:`` / ``TO:`` into ``(path, parameters)``.

    Leading spaces are accepted (``MAIL FROM: <a@b>`` is common).  The path ends at the
    first ``>`` that is not inside a quoted string; the parameters, if any, must be
    separated from it by a space (RFC 5321 4.1.1.2) and come back stripped.
    """
    text = arg.lstrip(" ")
    if not text.startswith("<"):
        raise AddressError("path not in angle brackets")
    if '"' not in text:  # the usual case: no quoted string, the first '>' ends the path
        end = text.find(">")
        if end < 0:
            raise AddressError("unbalanced angle brackets or quotes")
        rest = text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise AddressError("no space between path and parameters")
        return text[: end + 1], rest.strip(" ")
    in_quote = False
    i = 1
    while i < len(text):
        c = text[i]
        if in_quote:
            if c == "\\":
                i += 2  # RFC 5321 4.1.2 quoted-pairSMTP: the next character is literal
                continue
            if c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == ">":
            rest = text[i + 1 :]
            if rest and not rest.startswith(" "):
                raise AddressError("no space between path and parameters")
            return text[: i + 1], rest.strip(" ")
        i += 1
    raise AddressError("unbalanced angle brackets or quotes")


def parse_reverse_path(path: str, *, smtputf8: bool) -> Mailbox | None:
    """Parse a MAIL FROM path; ``<>`` is the null reverse path (RFC 5321 4.5.5) -> None.

    ``smtputf8`` does not change what is accepted: see the module docstring.
    """
    if path == "<>":
        return None
    return _parse_path(path)


def parse_forward_path(path: str, *, smtputf8: bool) -> Mailbox:
    """Parse a RCPT TO path; ``<Postmaster>`` without a domain is accepted (RFC 5321 4.5.1).

    ``smtputf8`` does not change what is accepted: see the module docstring.
    """
    if path == "<>":
        raise AddressError("null forward path")
    if path.lower() == "<postmaster>":
        # RFC 5321 4.5.1: "Postmaster" is case-insensitive and needs no domain.
        return Mailbox("Postmaster", "")
    return _parse_path(path)


# The shape of nearly every real path: an ASCII dot-atom at an ASCII LDH domain.  It is
# a strict subset of what the full parser accepts, so matching it is only a shortcut.
# Groups: the local part, the domain as sent.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"  # an ASCII Dot-string
_DOT_ATOM: Final = re.compile(_DOT_STRING)
PLAIN_PATH: Final = rf"<({_DOT_STRING})@({_LABEL}(?:\.{_LABEL})*\.?)>"
_PLAIN_PATH: Final = re.compile(PLAIN_PATH)


@functools.lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """The comparison form of a domain name: lower case, Unicode (U-label) form, NFC.

    One trailing dot is dropped (``example.com.`` is the same name).  Each label is
    validated as LDH in its A-label form (RFC 5321 4.1.2 sub-domain, RFC 5890 2.3.2.1);
    A-labels are decoded so that ``MÜNCHEN.de``, ``münchen.de.`` and
    ``xn--mnchen-3ya.de`` all give ``münchen.de``.  This uses the stdlib IDNA 2003
    codec (nameprep, RFC 3491), not IDNA 2008: it is what the stdlib offers, and the
    two agree on the names real mail uses.  Address literals are not domains here.
    """
    domain = domain.removesuffix(".")
    if not domain:
        raise AddressError("empty domain")
    if any(c in _IDNA_DOTS for c in domain):
        raise AddressError("non-ASCII label separator")
    ascii_length = domain.count(".")
    labels = []
    for label in domain.split("."):
        a_label, u_label = _normalize_label(label)
        ascii_length += len(a_label)
        labels.append(u_label)
    if ascii_length > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long")
    return unicodedata.normalize("NFC", ".".join(labels))


def _normalize_label(label: str) -> tuple[str, str]:
    """Return ``(A-label, U-label)`` of one label, or raise AddressError."""
    if not label:
        raise AddressError("empty domain label")
    try:
        if label.isascii():
            a_label = label.lower()
            _check_ldh(a_label)
            # RFC 3490 4.2: ToUnicode checks that ToASCII gives the A-label back, so a
            # malformed or non-canonical "xn--" label is refused here.
            u_label = _idna.ToUnicode(a_label) if a_label.startswith("xn--") else a_label
            return a_label, u_label
        # RFC 3490 4.1 ToASCII: nameprep (case fold, NFKC) then punycode.
        a_label = _idna.ToASCII(label).decode("ascii").lower()
        _check_ldh(a_label)
        return a_label, _idna.ToUnicode(a_label)
    except UnicodeError as e:
        raise AddressError(f"invalid IDN label: {e}") from None


def _check_ldh(label: str) -> None:
    """RFC 5321 4.1.2 sub-domain: Let-dig [Ldh-str], at most 63 octets."""
    if not 1 <= len(label) <= MAX_LABEL_OCTETS:
        raise AddressError("domain label length")
    if not all(c in _LDH for c in label):
        raise AddressError("invalid character in domain")
    if label.startswith("-") or label.endswith("-"):
        raise AddressError("domain label starts or ends with a hyphen")


def plain_mailbox(local_part: str, domain: str) -> Mailbox:
    """The Mailbox of a path that matched :data:`PLAIN_PATH` (its two groups).

    For callers that matched the plain shape themselves (the command parser's fast
    path); the result is what :func:`_parse_path` gives for the same path.
    """
    if len(local_part) + len(domain) + 3 > MAX_PATH_OCTETS:  # "<" "@" ">"; 4.5.3.1.3
        raise AddressError("path too long")
    return Mailbox(local_part, normalize_domain(domain), False, False, False)


def _parse_path(path: str) -> Mailbox:
    """RFC 5321 4.1.2 Path = "<" [ A-d-l ":" ] Mailbox ">"."""
    fast = _PLAIN_PATH.fullmatch(path)
    if fast is not None:
        return plain_mailbox(fast.group(1), fast.group(2))  # checks the length too
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_OCTETS:  # RFC 5321 4.5.3.1.3
        raise AddressError("path too long")
    if not (path.startswith("<") and path.endswith(">")) or len(path) < 2:
        raise AddressError("path not in angle brackets")
    inner = path[1:-1]
    source_route = inner.startswith("@")
    if source_route:
        inner = _strip_source_route(inner)
    local_part, domain, quoted = _parse_mailbox(inner)
    return Mailbox(local_part, domain, quoted, source_route, not path.isascii())


def _strip_source_route(inner: str) -> str:
    """Validate and drop ``@a,@b:`` (RFC 5321 4.1.2 A-d-l; Appendix C: ignore it)."""
    colon = inner.find(":")
    if colon < 0:
        raise AddressError("source route without ':'")
    for hop in inner[:colon].split(","):
        if not hop.startswith("@"):
            raise AddressError("bad source route")
        normalize_domain(hop[1:])  # At-domain = "@" Domain
    return inner[colon + 1 :]


def _parse_mailbox(text: str) -> tuple[str, str, bool]:
    """RFC 5321 4.1.2 Mailbox = Local-part "@" ( Domain / address-literal )."""
    if text.startswith('"'):
        local_part, end = _scan_quoted(text)
        quoted = True
    else:
        end = text.find("@")
        if end < 0:
            raise AddressError("no '@' in mailbox")
        local_part = text[:end]
        _check_dot_string(local_part)
        quoted = False
    if not local_part:
        # Grammatically `""@x` is a Quoted-string, but no mailbox is named by nothing
        # and an empty local part is a common way to confuse later parsers.
        raise AddressError("empty local part")
    if text[end : end + 1] != "@":
        raise AddressError("no '@' after local part")
    domain_text = text[end + 1 :]
    if domain_text.startswith("["):
        domain = _parse_address_literal(domain_text)
    else:
        domain = normalize_domain(domain_text)
    return local_part, domain, quoted


def _scan_quoted(text: str) -> tuple[str, int]:
    """Decode the Quoted-string at the start of *text*; return (value, index after it)."""
    out: list[str] = []
    i = 1
    while i < len(text):
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            # RFC 5321 4.1.2 quoted-pairSMTP = %d92 %d32-126
            if i + 1 >= len(text) or not 32 <= ord(text[i + 1]) <= 126:
                raise AddressError("bad quoted-pair")
            out.append(text[i + 1])
            i += 2
            continue
        # RFC 5321 4.1.2 qtextSMTP = %d32-33 / %d35-91 / %d93-126; RFC 6531 3.3 adds
        # UTF8-non-ascii.
        if not (32 <= ord(c) <= 126 or _is_utf8_non_ascii(c)):
            raise AddressError("invalid character in quoted local part")
        out.append(c)
        i += 1
    raise AddressError("unterminated quoted string")


def _check_dot_string(local_part: str) -> None:
    """RFC 5321 4.1.2 Dot-string = Atom *("." Atom); RFC 6531 3.3 extends atext."""
    if not local_part:
        raise AddressError("empty local part")
    for atom in local_part.split("."):
        if not atom:
            raise AddressError("leading, trailing or double dot in local part")
        if not all(c in _ATEXT or _is_utf8_non_ascii(c) for c in atom):
            raise AddressError("invalid character in local part")


def _is_dot_string(local_part: str) -> bool:
    try:
        _check_dot_string(local_part)
    except AddressError:
        return False
    return True


def _is_utf8_non_ascii(c: str) -> bool:
    """RFC 6531 3.3 UTF8-non-ascii, minus C1 controls and lone surrogates.

    C1 controls are control characters all the same; a surrogate can only come from
    bytes that were not valid UTF-8 (decoded with ``surrogateescape``).
    """
    code = ord(c)
    return code >= 0xA0 and not 0xD800 <= code <= 0xDFFF


def _quote(local_part: str) -> str:
    escaped = local_part.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _parse_address_literal(text: str) -> str:
    """RFC 5321 4.1.3 address-literal, normalised: ``[1.2.3.4]`` or ``[IPv6:<compressed>]``."""
    if not text.endswith("]") or len(text) < 3:
        raise AddressError("unterminated address literal")
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":  # ABNF strings are case-insensitive (RFC 5234 2.3)
        addr = inner[5:]
        # Only hex, ':' and '.': the stdlib would also take a "%zone" suffix.
        if not addr or not all(c in _HEX_COLON_DOT for c in addr):
            raise AddressError("bad IPv6 address literal")
        try:
            return f"[IPv6:{ipaddress.IPv6Address(addr).compressed}]"
        except ValueError:
            raise AddressError("bad IPv6 address literal") from None
    if ":" in inner:
        # General-address-literal: no other tag is standardised, nothing to deliver to.
        raise AddressError("unsupported address literal")
    if not inner or not all(c in _DIGITS_DOT for c in inner):
        raise AddressError("bad IPv4 address literal")
    try:
        # Snum is 1*3DIGIT 0..255; the stdlib also refuses leading zeros (octal doubt).
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError("bad IPv4 address literal") from None
