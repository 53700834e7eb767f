"""Small pure helpers over a message's header section (RFC 5322 2.2, 3.6.2).

Owns: finding where the header section ends without touching the body
(``header_end``, ``split_message``), cutting the header block into fields with their
exact bytes (``iter_fields``), unfolding (RFC 5322 2.2.3) and reading the author
domains of the From: field(s) (``from_domains``, for DMARC, RFC 7489 3.1 / 6.6.1).

Everything here works on bytes as received and never rewrites them: a field's ``raw``
is byte-identical to the input, so callers (``authresults.strip_forged``, DKIM) can
drop or keep fields without re-serialising anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.headerregistry import AddressHeader, HeaderRegistry
from email.utils import getaddresses

__all__ = ["HeaderField", "from_domains", "header_end", "iter_fields", "split_message", "unfold"]

# RFC 5322 2.2: field-name = 1*ftext, ftext = %d33-57 / %d59-126; obs-optional (4.5.8)
# allows WSP between the name and the colon.
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# Where a field starts: after a line feed, at a line that does not begin with WSP (a
# line that does continues the field before it, RFC 5322 2.2.3).
_FIELD_BREAK = re.compile(rb"(?<=\n)(?=[^ \t])")
# The name of a From field (lower-cased), right after a line feed or at the start of
# the block: such a line is never a continuation, as in iter_fields (see from_values).
_FROM_NAME = re.compile(rb"from[ \t]*:")
# RFC 5322 2.2.3: unfolding removes a CRLF (we also accept a bare LF) before WSP.
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field as received.

    ``name`` is the field name as written (None for a line that is neither a field nor
    a continuation, e.g. an mbox "From " line); ``raw`` is the whole field with its
    continuation lines and line breaks, byte-identical to the input; ``value`` is the
    part after the colon, still folded.
    """

    name: bytes | None
    raw: bytes
    value: bytes

    def is_named(self, name: bytes) -> bool:
        """Case-insensitive name comparison (RFC 5322 1.2.2)."""
        return self.name is not None and self.name.lower() == name.lower()


def header_end(data: bytes) -> int | None:
    """Offset of the first body byte: just past the empty line that ends the header
    section (RFC 5322 2.1), or None while that line has not been seen.

    Feed it the first chunks of a message until it answers; the body is never scanned
    beyond the empty line.  Bare LF line ends are accepted as well as CRLF.
    """
    if data.startswith(b"\r\n"):
        return 2
    if data.startswith(b"\n"):
        return 1
    crlf, lf = data.find(b"\n\r\n"), data.find(b"\n\n")
    ends = [i + n for i, n in ((crlf, 3), (lf, 2)) if i >= 0]
    return min(ends) if ends else None


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """``(header_block, body)``: the fields, each with its line break, and what follows
    the empty separator line.  A message without that line is all header."""
    end = header_end(message)
    if end is None:
        return message, b""
    sep = 2 if message[:end].endswith(b"\r\n") else 1
    return message[: end - sep], message[end:]


def iter_fields(header_block: bytes) -> Iterator[HeaderField]:
    """The fields of a header block, in order, each with its continuation lines.

    Concatenating every ``raw`` gives back ``header_block`` exactly.  A continuation
    line before any field (malformed) is yielded as a nameless field of its own.
    """
    # A field ends at a line feed that the next line does not continue (RFC 5322 2.2.3:
    # a continuation starts with WSP).  A lone CR ends no line in a message; splitting
    # at the line feeds alone keeps it inside its field.
    for raw in _FIELD_BREAK.split(header_block):
        if not raw:
            continue
        match = _FIELD_NAME.match(raw)
        if match is None:
            yield HeaderField(None, raw, raw)
        else:
            yield HeaderField(match.group(1), raw, raw[match.end() :])


def unfold(value: bytes) -> bytes:
    """RFC 5322 2.2.3: remove every line break that is followed by WSP, and the final
    line break of the field."""
    return _FOLD.sub(b"", value).rstrip(b"\r\n")


def _domain_of(address: str) -> str | None:
    # The domain is after the last "@": a quoted local part may itself contain "@".
    _, at, domain = address.rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    if not at or not domain or domain.startswith("[") or not _looks_like_domain(domain):
        return None  # no domain, or an address literal: not a DNS domain, no DMARC
    return domain


def _looks_like_domain(domain: str) -> bool:
    return all(
        label and not any(c in label for c in ' <>()[]"\\,;:@') for label in domain.split(".")
    )


_REGISTRY = HeaderRegistry()


# A From: value so plain that every parser reads the same one address out of it: an
# optional display name of atext words, then a dot-atom addr-spec, bare or in angle
# brackets.  Most mail looks like this; it skips the two full parsers below (about
# 0.6 ms per message, the largest part of the checks' cost on the reactor thread).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_FROM = re.compile(
    rf"[ \t]*(?:(?:{_ATEXT}[ \t]+)*{_ATEXT}[ \t]*)?"
    rf"(<?)({_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*)(>?)[ \t]*"
)


def _addresses(value: str) -> list[str]:
    plain = _PLAIN_FROM.fullmatch(value)
    # "<a@b>" or "Name <a@b>" or a bare "a@b"; never "Name a@b" nor unbalanced brackets
    if (plain is not None and bool(plain.group(1)) == bool(plain.group(3))
            and (plain.group(1) or value.strip() == plain.group(2))):
        return [plain.group(2)]
    found: list[str] = []
    # Two parsers, and the union of what they see.  A From: field crafted so that one
    # parser reads another address than the other (e.g. "a@victim.example
    # <b@evil.example>") is how DMARC gets bypassed when the verifier and the MUA
    # disagree (Chen et al., "Composition Kills", USENIX Security 2020): every domain
    # either parser finds is an author domain and gets evaluated.
    try:
        header = _REGISTRY("From", value)
    except Exception:  # the stdlib parser has raised assorted errors on hostile input
        header = None
    if isinstance(header, AddressHeader):
        found.extend(f"{a.username}@{a.domain}" for a in header.addresses)
    found.extend(addr for _, addr in getaddresses([value]))
    return found


def from_addresses(header_block: bytes) -> list[str]:
    """Every address either parser finds in every From: field, lower case, each once.
    Submission's From: ownership check uses the same union as DMARC, so a field that two
    parsers read differently cannot pass one check with the other's address."""
    addresses: list[str] = []
    for raw in from_values(header_block):
        value = unfold(raw).decode("utf-8", "replace")
        for address in _addresses(value):
            address = address.strip().lower()
            if address and address not in addresses:
                addresses.append(address)
    return addresses


def from_values(header_block: bytes) -> list[bytes]:
    """The (folded) values of the From: fields: what ``iter_fields`` gives for them,
    found by searching for their names instead of building every field (most of a
    header block is Received:, DKIM-Signature: and the like, never looked at)."""
    values = []
    lower = b"\n" + header_block.lower()  # lower[i + 1] is header_block[i]
    at = lower.find(b"\nfrom")
    while at >= 0:  # a line starting "from" (bytes.find: C speed), then the name's rule
        match = _FROM_NAME.match(lower, at + 1)
        if match is not None:
            start = match.end() - 1
            end = _FIELD_BREAK.search(header_block, start)
            values.append(header_block[start : end.start() if end else None])
        at = lower.find(b"\nfrom", at + 1)
    return values


def from_domains(header_block: bytes) -> list[str]:
    """The author domains (RFC 7489 3.1: the domain of the RFC5322.From address) of
    every From: field, lower case, without trailing dot, each once, in order.

    Handles groups (RFC 6854), comments, quoted local parts and encoded-word display
    names.  Address literals and addresses without a domain are left out.  More than
    one result means several authors (or several From: fields, which RFC 5322 3.6
    forbids); none means DMARC has nothing to evaluate (RFC 7489 6.6.1).
    """
    domains: list[str] = []
    for address in from_addresses(header_block):
        domain = _domain_of(address)
        if domain is not None and domain not in domains:
            domains.append(domain)
    return domains
