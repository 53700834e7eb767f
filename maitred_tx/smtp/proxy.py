"""The HAProxy PROXY protocol, versions 1 and 2: who the client really is.

A trusted load balancer prepends one header to the TCP stream before the first SMTP
byte.  This module owns reading that header from the bytes received so far and nothing
else: the glue decides whether the peer is trusted, waits while :func:`parse_proxy_header`
returns None, strips ``header.length`` bytes, and closes the connection on
:class:`ProxyError` (there is no reply: the peer is a proxy, not an SMTP client).

Section numbers refer to https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt.
Enforced here:

- 2.1: the v1 line, "PROXY" SP ("TCP4" / "TCP6" / "UNKNOWN") ..., single spaces,
  canonical addresses and ports (no leading zeros), CRLF within 107 bytes, no lone CR
  or LF, printable US-ASCII only;
- 2.2: the v2 signature, version 2, commands LOCAL / PROXY only, the defined family
  and transport bytes only, the address block inside the declared length;
- 2.2 TLVs: each inside the block, PP2_TYPE_CRC32C verified (2.2.3), PP2_TYPE_NOOP
  dropped (2.2.4), PP2_TYPE_UNIQUE_ID at most 128 bytes (2.2.5), PP2_TYPE_SSL and its
  sub-TLVs decoded into :class:`TLSInfo` (2.2.6); other TLVs are kept raw.

Mistakes are detected as early as the bytes allow (2.1: "abort the connection as soon as
possible"), and :attr:`ProxyHeader.length` never exceeds the header: the bytes after it
are the client's SMTP stream.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "MAX_V1_LENGTH",
    "ProxyError",
    "ProxyHeader",
    "TLSInfo",
    "crc32c",
    "parse_proxy_header",
]

Command = Literal["PROXY", "LOCAL"]
Family = Literal["TCP4", "TCP6", "UDP4", "UDP6", "UNIX", "UNIX_DGRAM", "UNKNOWN"]

# 2.1: "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n" is the worst case;
# "If the CRLF sequence is not found in the first 107 characters, the receiver should
# declare the line invalid."
MAX_V1_LENGTH: Final = 107
_V1_PREFIX: Final = b"PROXY "
# 2.2: the 12-byte signature; 16 bytes of fixed header, then the 16-bit length (so a
# v2 header is at most 16 + 65535 bytes: the bound is the format's own).
_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED: Final = 16

# 2.1: "Heading zeroes are not permitted in front of numbers".
_PORT: Final = re.compile(r"0|[1-9][0-9]{0,4}")

# 2.2: byte 14, family (high nibble) and transport (low nibble); the only valid values.
_FAMILIES: Final[dict[int, Family]] = {
    0x00: "UNKNOWN",  # AF_UNSPEC: the spec's "UNSPEC", named as v1 names it
    0x11: "TCP4",
    0x12: "UDP4",
    0x21: "TCP6",
    0x22: "UDP6",
    0x31: "UNIX",
    0x32: "UNIX_DGRAM",
}
# 2.2: address block sizes: 2*4+2*2, 2*16+2*2, 2*108.
_ADDRESS_SIZE: Final = {0x1: 12, 0x2: 36, 0x3: 216}

# 2.2 TLV types.
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
# 2.2.6: the <client> bit field.
PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04
_MAX_UNIQUE_ID: Final = 128  # 2.2.5: "up to 128 bytes"


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header; the glue closes the connection."""


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """How the client reached the proxy over TLS (2.2.6, PP2_TYPE_SSL).

    Only present when the proxy set PP2_CLIENT_SSL: a PP2_TYPE_SSL TLV without it says
    the client did *not* use TLS, and reporting it as TLS would be a lie.
    """

    client: int  # the PP2_CLIENT_* bit field
    verify: int  # 0: the client presented a certificate and it verified
    version: str | None = None  # PP2_SUBTYPE_SSL_VERSION, e.g. "TLSv1.3"
    cipher: str | None = None  # PP2_SUBTYPE_SSL_CIPHER, e.g. "TLS_AES_256_GCM_SHA384"
    common_name: str | None = None  # PP2_SUBTYPE_SSL_CN of the client certificate
    sig_alg: str | None = None  # PP2_SUBTYPE_SSL_SIG_ALG
    key_alg: str | None = None  # PP2_SUBTYPE_SSL_KEY_ALG

    @property
    def client_certificate(self) -> bool:
        """The client presented a certificate (on this connection or its session)."""
        return bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))

    @property
    def certificate_verified(self) -> bool:
        """2.2.6: verify is zero "if the client presented a certificate and it was
        successfully verified"; zero without a certificate means nothing."""
        return self.client_certificate and self.verify == 0


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY header.

    ``source`` / ``destination`` are (address, port) with the address in
    :mod:`ipaddress` normal form, or None when the glue must use the real endpoints:
    LOCAL (2.2: "must use the real connection endpoints"), UNKNOWN / AF_UNSPEC (2.1,
    2.2: "should ignore address information") and AF_UNIX (a path is no peer identity;
    2.2 allows falling back to UNSPEC for what a receiver does not support).
    """

    version: int
    command: Command
    family: Family
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tls: TLSInfo | None
    length: int  # bytes of the input the header occupied
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 TLVs not decoded above, in order


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse a PROXY header at the start of *data*; None if more bytes are needed.

    Raises :class:`ProxyError` as soon as *data* cannot be the start of a valid header.
    """
    if data[:1] == _V1_PREFIX[:1]:
        return _parse_v1(data)
    return _parse_v2(data)


# --- version 1 ---------------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:MAX_V1_LENGTH]
    if not head.startswith(_V1_PREFIX[: len(head)]):
        raise ProxyError("not a PROXY protocol header")
    end = head.find(b"\r\n")
    scanned = head if end < 0 else head[:end]
    # 2.1: US-ASCII; "must not tolerate a single CR or LF character to end the line".
    for i, octet in enumerate(scanned):
        if not 0x20 <= octet <= 0x7E and not (octet == 0x0D and i == len(head) - 1):
            raise ProxyError("PROXY v1 line contains a control or non-ASCII byte")
    if end < 0:
        if len(head) >= MAX_V1_LENGTH:  # 2.1: no CRLF in the first 107 characters
            raise ProxyError("PROXY v1 line longer than 107 bytes")
        return None
    if end < len(_V1_PREFIX):
        raise ProxyError("not a PROXY protocol header")
    words = head[len(_V1_PREFIX) : end].decode("ascii").split(" ")
    length = end + 2
    if words[0] == "UNKNOWN":
        # 2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None, length)
    if words[0] not in ("TCP4", "TCP6"):
        raise ProxyError(f"PROXY v1 protocol {words[0][:16]!r} unknown")
    if len(words) != 5:  # 2.1: exactly one space between exactly five fields
        raise ProxyError("PROXY v1 line has the wrong number of fields")
    family: Family = "TCP4" if words[0] == "TCP4" else "TCP6"
    return ProxyHeader(
        1,
        "PROXY",
        family,
        (_v1_address(family, words[1]), _v1_port(words[3])),
        (_v1_address(family, words[2]), _v1_port(words[4])),
        None,
        length,
    )


def _v1_address(family: Family, text: str) -> str:
    """2.1: the address in the family's canonical format (ipaddress refuses IPv4
    leading zeros); an IPv6 zone ("%eth0") is no part of that format."""
    try:
        if family == "TCP4":
            return str(ipaddress.IPv4Address(text))
        if "%" not in text:
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        pass
    raise ProxyError(f"bad {family} address in PROXY v1 line")


def _v1_port(text: str) -> int:
    if _PORT.fullmatch(text) and int(text) <= 65535:  # 2.1: [0..65535], no heading zeroes
        return int(text)
    raise ProxyError("bad port in PROXY v1 line")


# --- version 2 ---------------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    signature = data[: len(_V2_SIGNATURE)]
    if not _V2_SIGNATURE.startswith(signature):
        raise ProxyError("not a PROXY protocol header")
    if len(data) > 12 and data[12] >> 4 != 2:  # 2.2: "the receiver must only accept" 2
        raise ProxyError("PROXY v2 header with an unknown version")
    if len(data) > 12 and data[12] & 0x0F > 1:  # 2.2: "must drop ... unexpected values"
        raise ProxyError("PROXY v2 header with an unknown command")
    local = len(data) > 12 and data[12] & 0x0F == 0
    # 2.2: for LOCAL "the family ... is ignored"; otherwise undefined values "must be
    # rejected as invalid by receivers".
    if len(data) > 13 and not local and data[13] not in _FAMILIES:
        raise ProxyError("PROXY v2 header with an unknown family or transport")
    if len(data) < _V2_FIXED:
        return None
    (block_length,) = struct.unpack_from("!H", data, 14)
    length = _V2_FIXED + block_length  # 2.2: "always exactly 16 + this value"
    if len(data) < length:
        return None
    if local:
        # 2.2: LOCAL: use the real endpoints and "discard the protocol block".
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, None, length)
    family = _FAMILIES[data[13]]
    size = _ADDRESS_SIZE.get(data[13] >> 4, 0)
    if family == "UNKNOWN":
        # 2.2: AF_UNSPEC: "The receiver should ignore address information."
        return ProxyHeader(2, "PROXY", family, None, None, None, length)
    if block_length < size:
        raise ProxyError("PROXY v2 address block shorter than its family needs")
    source, destination = _v2_addresses(data, family)
    tls, tlvs = _v2_tlvs(data[:length], _V2_FIXED + size)
    return ProxyHeader(2, "PROXY", family, source, destination, tls, length, tlvs)


def _v2_addresses(
    data: bytes, family: Family
) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """2.2: source address, destination address, source port, destination port."""
    if family in ("TCP4", "UDP4"):
        src4, dst4, sport, dport = struct.unpack_from("!4s4sHH", data, _V2_FIXED)
        return (
            (str(ipaddress.IPv4Address(src4)), sport),
            (str(ipaddress.IPv4Address(dst4)), dport),
        )
    if family in ("TCP6", "UDP6"):
        src6, dst6, sport, dport = struct.unpack_from("!16s16sHH", data, _V2_FIXED)
        return (
            (str(ipaddress.IPv6Address(src6)), sport),
            (str(ipaddress.IPv6Address(dst6)), dport),
        )
    return None, None  # AF_UNIX: see ProxyHeader


def _split_tlvs(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of each TLV in data[start:end]; 2.2: struct pp2_tlv.

    A TLV that does not fit, or stray bytes too short to be one, make the header
    invalid: the block must be exactly a sequence of TLVs.
    """
    out = []
    i = start
    while i < end:
        if end - i < 3:
            raise ProxyError("truncated TLV in PROXY v2 header")
        kind, size = struct.unpack_from("!BH", data, i)
        if i + 3 + size > end:
            raise ProxyError("TLV longer than the PROXY v2 header")
        out.append((kind, i + 3, i + 3 + size))
        i += 3 + size
    return out


def _v2_tlvs(header: bytes, start: int) -> tuple[TLSInfo | None, tuple[tuple[int, bytes], ...]]:
    tls: TLSInfo | None = None
    seen: set[int] = set()
    kept = []
    for kind, lo, hi in _split_tlvs(header, start, len(header)):
        if kind in (PP2_TYPE_CRC32C, PP2_TYPE_SSL, PP2_TYPE_UNIQUE_ID):
            if kind in seen:  # two answers to one question: refuse rather than pick
                raise ProxyError(f"TLV {kind:#04x} given twice in PROXY v2 header")
            seen.add(kind)
        if kind == PP2_TYPE_CRC32C:
            _check_crc32c(header, lo, hi)
        elif kind == PP2_TYPE_NOOP:
            continue  # 2.2.4: "should be ignored when parsed"
        elif kind == PP2_TYPE_SSL:
            tls = _tls_info(header, lo, hi)
        else:
            if kind == PP2_TYPE_UNIQUE_ID and hi - lo > _MAX_UNIQUE_ID:  # 2.2.5
                raise ProxyError("PP2_TYPE_UNIQUE_ID longer than 128 bytes")
            kept.append((kind, header[lo:hi]))
    return tls, tuple(kept)


_SSL_TEXT: Final = {
    PP2_SUBTYPE_SSL_VERSION: "version",
    PP2_SUBTYPE_SSL_CN: "common_name",
    PP2_SUBTYPE_SSL_CIPHER: "cipher",
    PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
    PP2_SUBTYPE_SSL_KEY_ALG: "key_alg",
}


def _tls_info(header: bytes, lo: int, hi: int) -> TLSInfo | None:
    """2.2.6: struct pp2_tlv_ssl { uint8_t client; uint32_t verify; sub-TLVs }."""
    if hi - lo < 5:
        raise ProxyError("PP2_TYPE_SSL TLV shorter than 5 bytes")
    client, verify = struct.unpack_from("!BI", header, lo)
    fields: dict[str, str] = {}
    for kind, sub_lo, sub_hi in _split_tlvs(header, lo + 5, hi):
        name = _SSL_TEXT.get(kind)
        if name is None:
            continue  # 2.2: "skip over and ignore the TLVs it is not interested in"
        if name in fields:
            raise ProxyError(f"SSL sub-TLV {kind:#04x} given twice in PROXY v2 header")
        # 2.2.6: the CN is UTF-8, the others US-ASCII.  They are headed for Received
        # fields and logs, so control characters are refused either way.
        fields[name] = _text(header[sub_lo:sub_hi], utf8=kind == PP2_SUBTYPE_SSL_CN)
    if not client & PP2_CLIENT_SSL:
        return None  # see TLSInfo: without PP2_CLIENT_SSL the client did not use TLS
    return TLSInfo(client, verify, **fields)


def _text(value: bytes, *, utf8: bool) -> str:
    try:
        text = value.decode("utf-8" if utf8 else "ascii")
    except UnicodeDecodeError:
        text = None
    if text is None or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise ProxyError("non-printable text in a PP2_TYPE_SSL sub-TLV")
    return text


# --- CRC32C (2.2.3; RFC 4960 Appendix B, the Castagnoli polynomial, reflected) -----------


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC32C of *data*; the stdlib has only zlib's CRC32, a different polynomial."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for octet in data:
        crc = table[(crc ^ octet) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _check_crc32c(header: bytes, lo: int, hi: int) -> None:
    """2.2.3: zero the checksum field, checksum the whole header, compare; the value
    is in network byte order, as HAProxy writes it."""
    if hi - lo != 4:
        raise ProxyError("PP2_TYPE_CRC32C value is not 4 bytes")
    (expected,) = struct.unpack_from("!I", header, lo)
    zeroed = header[:lo] + b"\0\0\0\0" + header[hi:]
    if crc32c(zeroed) != expected:
        raise ProxyError("PROXY v2 header fails its CRC32C check")
