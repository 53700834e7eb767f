"""PROXY protocol v1 and v2 (haproxy doc/proxy-protocol.txt, sections 2.1 and 2.2)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.smtp.proxy import (
    MAX_V1_LENGTH,
    ProxyError,
    ProxyHeader,
    TLSInfo,
    crc32c,
    parse_proxy_header,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
SMTP = b"EHLO client.example\r\n"


# --- builders -----------------------------------------------------------------------------


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(client: int, verify: int, *subs: bytes) -> bytes:
    return tlv(0x20, struct.pack("!BI", client, verify) + b"".join(subs))


def v2(
    ver_cmd: int = 0x21,
    fam: int = 0x11,
    addresses: bytes | None = None,
    tlvs: bytes = b"",
    crc: bool = False,
) -> bytes:
    if addresses is None:
        addresses = (
            ipaddress.IPv4Address("192.0.2.10").packed
            + ipaddress.IPv4Address("198.51.100.1").packed
            + struct.pack("!HH", 56324, 25)
        )
    body = addresses + tlvs
    if crc:
        body += tlv(0x03, b"\0\0\0\0")
    header = SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body
    if crc:
        header = header[:-4] + struct.pack("!I", crc32c(header))
    return header


def v6_addresses() -> bytes:
    return (
        ipaddress.IPv6Address("2001:db8::1").packed
        + ipaddress.IPv6Address("2001:db8::25").packed
        + struct.pack("!HH", 40000, 587)
    )


def parse(data: bytes) -> ProxyHeader:
    header = parse_proxy_header(data)
    assert header is not None
    return header


def error(data: bytes) -> ProxyError:
    with pytest.raises(ProxyError) as e:
        parse_proxy_header(data)
    return e.value


def assert_needs_more_at_every_split(whole: bytes) -> None:
    """Every proper prefix asks for more; the whole parses (STYLE.md: byte by byte)."""
    for i in range(len(whole)):
        assert parse_proxy_header(whole[:i]) is None, i
    assert parse(whole).length == len(whole)


# --- v1 -----------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 25\r\n"
    header = parse(line + SMTP)
    assert header == ProxyHeader(
        1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 25), None, len(line)
    )


def test_v1_tcp6_is_normalised() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:192.0.2.1 0 65535\r\n"
    header = parse(line)
    assert header.family == "TCP6"
    assert header.source == ("2001:db8::1", 0)
    assert header.destination == ("::ffff:c000:201", 65535)


def test_v1_worst_case_length_is_accepted() -> None:
    full = "ffff:" * 7 + "ffff"
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert parse(line).length == 104
    unknown = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(unknown) == MAX_V1_LENGTH
    assert parse(unknown).length == MAX_V1_LENGTH


@pytest.mark.parametrize(
    "line",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 1.2.3.4 whatever ignored\r\n"],
)
def test_v1_unknown(line: bytes) -> None:
    # 2.1: the receiver must ignore anything before the CRLF and use the real endpoints.
    assert parse(line + SMTP) == ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None, len(line))


def test_v1_every_split_point() -> None:
    assert_needs_more_at_every_split(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 25\r\n")
    assert_needs_more_at_every_split(b"PROXY UNKNOWN\r\n")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 25\n",  # bare LF
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 25\rX",  # lone CR
        b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 25\r\n",  # two spaces
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",  # a field missing
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 25 1\r\n",  # a field too many
        b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 25\r\n",  # leading zeros
        b"PROXY TCP4 192.168.0.256 192.168.0.11 56324 25\r\n",
        b"PROXY TCP4 ::1 192.168.0.11 56324 25\r\n",  # wrong family
        b"PROXY TCP6 192.168.0.1 ::1 56324 25\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 56324 25\r\n",  # zone index
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 25\r\n",  # port leading zero
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 25\r\n",  # port out of range
        b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 25\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 +1 25\r\n",
        b"PROXY UDP4 192.168.0.1 192.168.0.11 1 25\r\n",  # no such v1 protocol
        b"PROXY tcp4 192.168.0.1 192.168.0.11 1 25\r\n",
        b"PROXY \r\n",
        b"PROXY\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY UNKNOWN \x00\r\n",  # control byte
        b"PROXY UNKNOWN \xc3\xa9\r\n",  # non-ASCII
        b"EHLO x\r\n",
        b"GET / HTTP/1.1\r\n",
        b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n",
    ],
)
def test_v1_invalid(line: bytes) -> None:
    error(line)


def test_v1_without_crlf_in_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == MAX_V1_LENGTH + 1
    assert parse_proxy_header(line[:MAX_V1_LENGTH - 1]) is None
    error(line)
    error(line[:MAX_V1_LENGTH])


def test_v1_garbage_is_refused_early() -> None:
    # 2.1: "abort the connection as soon as possible".
    error(b"PROXX")
    error(b"PROXY TCP4 1.2.3.4\n")
    error(b"PROXY TCP4 1.2.3.4\x00")
    error(b"H")


def test_v1_never_reads_past_the_line() -> None:
    line = b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"
    assert parse(line + b"PROXY TCP4 garbage\r\n").length == len(line)
    assert parse(line + b"\xff" * 200).length == len(line)


# --- v2 -----------------------------------------------------------------------------------


def test_v2_tcp4() -> None:
    data = v2()
    header = parse(data + SMTP)
    assert header == ProxyHeader(
        2, "PROXY", "TCP4", ("192.0.2.10", 56324), ("198.51.100.1", 25), None, len(data)
    )
    assert len(data) == 16 + 12


def test_v2_tcp6() -> None:
    data = v2(fam=0x21, addresses=v6_addresses())
    header = parse(data)
    assert (header.family, header.source, header.destination) == (
        "TCP6", ("2001:db8::1", 40000), ("2001:db8::25", 587)
    )
    assert header.length == 16 + 36


@pytest.mark.parametrize(("fam", "family"), [(0x12, "UDP4"), (0x22, "UDP6")])
def test_v2_udp_is_reported_as_such(fam: int, family: str) -> None:
    addresses = v6_addresses() if fam == 0x22 else None
    assert parse(v2(fam=fam, addresses=addresses)).family == family


@pytest.mark.parametrize(("fam", "family"), [(0x31, "UNIX"), (0x32, "UNIX_DGRAM")])
def test_v2_unix_has_no_addresses(fam: int, family: str) -> None:
    paths = b"/run/client.sock".ljust(108, b"\0") + b"/run/smtp.sock".ljust(108, b"\0")
    header = parse(v2(fam=fam, addresses=paths))
    assert (header.family, header.source, header.destination) == (family, None, None)
    assert header.length == 16 + 216


def test_v2_local_discards_the_block() -> None:
    # 2.2: LOCAL: use the real endpoints, "discard the protocol block including the
    # family which is ignored"; the length must still be honoured.
    for fam in (0x00, 0x11, 0xFF):
        data = v2(ver_cmd=0x20, fam=fam, addresses=b"\xff" * 7)
        assert parse(data + SMTP) == ProxyHeader(
            2, "LOCAL", "UNKNOWN", None, None, None, 16 + 7
        )
    assert parse(v2(ver_cmd=0x20, fam=0x00, addresses=b"")).length == 16


def test_v2_unspec_ignores_address_information() -> None:
    data = v2(fam=0x00, addresses=b"\x01\x02\x03")
    assert parse(data) == ProxyHeader(2, "PROXY", "UNKNOWN", None, None, None, 19)


def test_v2_every_split_point() -> None:
    assert_needs_more_at_every_split(v2())
    assert_needs_more_at_every_split(
        v2(fam=0x21, addresses=v6_addresses(), tlvs=ssl_tlv(1, 0, tlv(0x21, b"TLSv1.3")),
           crc=True)
    )


def test_v2_never_reads_past_the_declared_length() -> None:
    data = v2()
    assert parse(data + SIG + b"\x21\x11\xff\xff").length == len(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (SIG[:5] + b"X", "signature"),
        (SIG + b"\x11", "version 1 in a v2 header"),
        (SIG + b"\x31", "version 3"),
        (SIG + b"\x22", "command 2"),
        (SIG + b"\x2f", "command 15"),
        (SIG + b"\x21\x13", "transport 3"),
        (SIG + b"\x21\x41", "family 4"),
        (SIG + b"\x21\x10", "AF_INET with UNSPEC transport"),
        (SIG + b"\x21\x01", "AF_UNSPEC with STREAM transport"),
    ],
)
def test_v2_invalid_fixed_header_refused_early(data: bytes, why: str) -> None:
    error(data)


def test_v2_address_block_too_short() -> None:
    error(v2(addresses=b"\x7f\x00\x00\x01" * 2 + b"\x00\x19"))  # 10 of 12 bytes
    error(v2(fam=0x21, addresses=v6_addresses()[:-1]))
    error(v2(fam=0x31, addresses=b"\0" * 215))


def test_v2_malformed_tlvs() -> None:
    error(v2(tlvs=b"\x04"))  # one stray byte
    error(v2(tlvs=b"\x04\x00"))  # two
    error(v2(tlvs=b"\x04\x00\x05abcd"))  # value runs past the block
    error(v2(tlvs=tlv(0x20, b"\x01\x00\x00")))  # SSL TLV shorter than 5 bytes
    error(v2(tlvs=ssl_tlv(1, 0, b"\x21\x00\x09TLS")))  # sub-TLV runs past the SSL TLV
    error(v2(tlvs=tlv(0x05, b"u" * 129)))  # 2.2.5: unique id up to 128 bytes
    error(v2(tlvs=ssl_tlv(1, 0) + ssl_tlv(1, 0)))  # two SSL TLVs
    error(v2(tlvs=ssl_tlv(1, 0, tlv(0x21, b"TLSv1.2"), tlv(0x21, b"TLSv1.3"))))
    error(v2(tlvs=ssl_tlv(1, 0, tlv(0x21, b"TLS\xff"))))  # not ASCII
    error(v2(tlvs=ssl_tlv(1, 0, tlv(0x22, b"cn\r\nX-Evil: 1"))))  # control characters
    error(v2(tlvs=ssl_tlv(1, 0, tlv(0x22, b"\xc3("))))  # not UTF-8


# --- v2 TLVs --------------------------------------------------------------------------------


def test_v2_tls_tlv() -> None:
    tls = ssl_tlv(
        0x01 | 0x02 | 0x04,
        0,
        tlv(0x21, b"TLSv1.3"),
        tlv(0x23, b"TLS_AES_256_GCM_SHA384"),
        tlv(0x22, "client.exämple".encode()),
        tlv(0x24, b"RSA-SHA256"),
        tlv(0x25, b"RSA2048"),
        tlv(0x7A, b"unknown sub-TLV, skipped"),
    )
    header = parse(v2(tlvs=tls))
    assert header.tls == TLSInfo(
        client=7,
        verify=0,
        version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        common_name="client.exämple",
        sig_alg="RSA-SHA256",
        key_alg="RSA2048",
    )
    assert header.tls.client_certificate and header.tls.certificate_verified
    assert header.tlvs == ()


def test_v2_tls_without_client_certificate() -> None:
    header = parse(v2(tlvs=ssl_tlv(0x01, 1, tlv(0x21, b"TLSv1.2"))))
    assert header.tls == TLSInfo(client=1, verify=1, version="TLSv1.2")
    assert not header.tls.client_certificate
    assert not header.tls.certificate_verified


def test_v2_unverified_client_certificate() -> None:
    header = parse(v2(tlvs=ssl_tlv(0x03, 0x12, tlv(0x22, b"mallory"))))
    assert header.tls is not None
    assert header.tls.client_certificate and not header.tls.certificate_verified
    # verify == 0 without a certificate says nothing.
    assert not TLSInfo(client=1, verify=0).certificate_verified


def test_v2_ssl_tlv_without_ssl_flag_is_not_tls() -> None:
    # 2.2.6: PP2_CLIENT_SSL "indicates that the client connected over SSL/TLS".
    assert parse(v2(tlvs=ssl_tlv(0x00, 0))).tls is None


def test_v2_other_tlvs_are_kept_in_order_noop_dropped() -> None:
    tlvs = tlv(0x01, b"smtp") + tlv(0x04, b"\0\0\0") + tlv(0x02, b"mx.example") + tlv(
        0x05, b"u" * 128
    ) + tlv(0xE0, b"")
    header = parse(v2(tlvs=tlvs))
    assert header.tlvs == ((0x01, b"smtp"), (0x02, b"mx.example"), (0x05, b"u" * 128),
                           (0xE0, b""))


def test_v2_crc32c() -> None:
    # RFC 4960 Appendix B / iSCSI check value.
    assert crc32c(b"123456789") == 0xE3069283
    good = v2(tlvs=ssl_tlv(1, 0, tlv(0x21, b"TLSv1.3")), crc=True)
    assert parse(good).tls == TLSInfo(client=1, verify=0, version="TLSv1.3")
    flipped = bytearray(good)
    flipped[17] ^= 0x01  # one bit of the source address
    error(bytes(flipped))
    error(v2(tlvs=tlv(0x03, b"\0\0\0")))  # 3-byte checksum
    error(v2(tlvs=tlv(0x03, b"\0\0\0\0")))  # wrong checksum
    twice = bytearray(v2(tlvs=tlv(0x03, b"\0\0\0\0"), crc=True))
    error(bytes(twice))


# --- properties -----------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except ProxyError:
        return
    assert header is None or 0 < header.length <= len(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_valid_signatures(tail: bytes) -> None:
    for prefix in (b"PROXY ", b"PROXY TCP4 ", SIG, SIG + b"\x21\x11", SIG + b"\x21\x21"):
        data = prefix + tail
        try:
            header = parse_proxy_header(data)
        except ProxyError:
            continue
        assert header is None or 0 < header.length <= len(data)


@given(
    st.binary(max_size=120).map(lambda b: struct.pack("!H", len(b)) + b),
    st.sampled_from([0x20, 0x21]),
    st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]),
)
def test_arbitrary_v2_blocks(block: bytes, ver_cmd: int, fam: int) -> None:
    data = SIG + bytes([ver_cmd, fam]) + block
    try:
        header = parse(data + SMTP)
    except ProxyError:
        return
    assert header.length == len(data)


@given(
    src=st.ip_addresses(v=4),
    dst=st.ip_addresses(v=4),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
)
def test_v1_and_v2_agree(
    src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int
) -> None:
    one = parse(f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode())
    two = parse(v2(addresses=src.packed + dst.packed + struct.pack("!HH", sport, dport)))
    assert (one.family, one.source, one.destination) == (
        two.family, two.source, two.destination
    )
    assert one.source == (str(src), sport)
