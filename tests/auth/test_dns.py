"""TwistedResolver against a real DNS server (dnsmasq on loopback), the cache with a
fake clock, the error mapping, and ``parse_dns_server``."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped,unused-ignore]
from twisted.internet import reactor, task
from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns

from maitred_tx.auth.dns import (
    DEFAULT_NEGATIVE_TTL,
    TwistedResolver,
    _extract,
    _negative_ttl,
    parse_dns_server,
)
from maitred_tx.auth.resolver import MX, NXDomain, TemporaryDNSError
from maitred_tx.auth.spf import SPFResult, check_host

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsmasq_support import TTL, Dnsmasq, needs_dnsmasq, run_dnsmasq


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    yield from run_dnsmasq(
        tmp_path_factory.mktemp("dnsmasq"),
        [
            "--txt-record=example.test,v=spf1 ip4:192.0.2.0/24 a:host.example.test -all",
            "--txt-record=multi.example.test,v=spf1 ,ip4:198.51.100.0/24, -all",
            "--txt-record=latin.example.test,caf\xe9",
            "--host-record=host.example.test,192.0.2.10,2001:db8::10",
            "--host-record=v4only.example.test,192.0.2.11",
            "--host-record=mx1.example.test,192.0.2.25",
            "--mx-host=example.test,mx1.example.test,10",
            "--mx-host=example.test,mx2.example.test,20",
            "--cname=alias.example.test,host.example.test",
            "--cname=alias2.example.test,alias.example.test",
            *(f"--host-record=c{i}.example.test,192.0.2.{100 + i}" for i in range(4)),
        ],
    )


# ---------------------------------------------------------------- answers


@needs_dnsmasq
@pytest_twisted.ensureDeferred
async def test_txt_a_aaaa_mx(dnsmasq: Dnsmasq) -> None:
    r = dnsmasq.resolver()
    assert await r.lookup("example.test", "TXT") == [
        "v=spf1 ip4:192.0.2.0/24 a:host.example.test -all"
    ]
    assert await r.lookup("HOST.Example.Test.", "A") == ["192.0.2.10"]
    assert await r.lookup("host.example.test", "AAAA") == ["2001:db8::10"]
    assert sorted(await r.lookup("example.test", "MX"), key=lambda m: m.preference) == [  # type: ignore[union-attr]
        MX(10, "mx1.example.test"),
        MX(20, "mx2.example.test"),
    ]


@needs_dnsmasq
@pytest_twisted.ensureDeferred
async def test_txt_character_strings_are_joined_without_separator(dnsmasq: Dnsmasq) -> None:
    r = dnsmasq.resolver()
    assert await r.lookup("multi.example.test", "TXT") == ["v=spf1 ip4:198.51.100.0/24 -all"]
    # bytes beyond ASCII survive as latin-1 (dnsmasq sends the UTF-8 of "café")
    assert await r.lookup("latin.example.test", "TXT") == ["caf\xc3\xa9"]


@needs_dnsmasq
@pytest_twisted.ensureDeferred
async def test_cname_chains_are_followed(dnsmasq: Dnsmasq) -> None:
    r = dnsmasq.resolver()
    assert await r.lookup("alias.example.test", "A") == ["192.0.2.10"]
    assert await r.lookup("alias2.example.test", "AAAA") == ["2001:db8::10"]
    assert await r.lookup("alias.example.test", "TXT") == []  # the target has no TXT


@needs_dnsmasq
@pytest_twisted.ensureDeferred
async def test_nxdomain_and_nodata(dnsmasq: Dnsmasq) -> None:
    r = dnsmasq.resolver()
    with pytest.raises(NXDomain):
        await r.lookup("nowhere.example.test", "A")
    assert await r.lookup("v4only.example.test", "AAAA") == []  # NODATA
    with pytest.raises(NXDomain):  # cannot be put on the wire: cannot exist
        await r.lookup("a" * 64 + ".example.test", "A")


@needs_dnsmasq
@pytest_twisted.ensureDeferred
async def test_spf_over_the_real_resolver(dnsmasq: Dnsmasq) -> None:
    r = dnsmasq.resolver()
    v = await check_host(r, "192.0.2.7", "example.test", "a@example.test", helo="h.example")
    assert (v.result, v.mechanism) == (SPFResult.PASS, "ip4:192.0.2.0/24")
    v = await check_host(r, "2001:db8::10", "example.test", "a@example.test", helo="h.example")
    assert (v.result, v.mechanism) == (SPFResult.PASS, "a:host.example.test")
    v = await check_host(r, "203.0.113.1", "example.test", "a@example.test", helo="h.example")
    assert v.result is SPFResult.FAIL


# ---------------------------------------------------------------- the cache


@needs_dnsmasq
@pytest_twisted.ensureDeferred
async def test_second_lookup_is_answered_from_the_cache(dnsmasq: Dnsmasq) -> None:
    r = dnsmasq.resolver()
    assert await r.lookup("c0.example.test", "A") == ["192.0.2.100"]
    assert await dnsmasq.count("A", "c0.example.test") == 1
    assert await r.lookup("C0.EXAMPLE.TEST", "A") == ["192.0.2.100"]
    assert await dnsmasq.count("A", "c0.example.test") == 1  # no second query


@needs_dnsmasq
@pytest_twisted.ensureDeferred
async def test_positive_answers_expire_with_their_ttl(dnsmasq: Dnsmasq) -> None:
    clock = task.Clock()
    r = dnsmasq.resolver(clock=clock.seconds)
    await r.lookup("c1.example.test", "A")
    clock.advance(TTL - 1)
    await r.lookup("c1.example.test", "A")
    assert await dnsmasq.count("A", "c1.example.test") == 1
    clock.advance(1)
    assert await r.lookup("c1.example.test", "A") == ["192.0.2.101"]
    assert await dnsmasq.count("A", "c1.example.test") == 2


@needs_dnsmasq
@pytest_twisted.ensureDeferred
async def test_negative_answers_are_cached_for_the_default(dnsmasq: Dnsmasq) -> None:
    clock = task.Clock()
    r = dnsmasq.resolver(clock=clock.seconds)
    nodata_before = await dnsmasq.count("AAAA", "v4only.example.test")
    for _ in range(2):  # dnsmasq sends no SOA for --local names: the 300 s default
        with pytest.raises(NXDomain):
            await r.lookup("gone.example.test", "A")
        assert await r.lookup("v4only.example.test", "AAAA") == []
    assert await dnsmasq.count("A", "gone.example.test") == 1
    assert await dnsmasq.count("AAAA", "v4only.example.test") == nodata_before + 1
    clock.advance(DEFAULT_NEGATIVE_TTL)
    with pytest.raises(NXDomain):
        await r.lookup("gone.example.test", "A")
    assert await dnsmasq.count("A", "gone.example.test") == 2


@needs_dnsmasq
@pytest_twisted.ensureDeferred
async def test_cache_is_bounded_oldest_evicted(dnsmasq: Dnsmasq) -> None:
    r = dnsmasq.resolver(cache_size=2)
    for name in ("c2.example.test", "c3.example.test", "c2.example.test"):
        await r.lookup(name, "A")
    assert await dnsmasq.count("A", "c2.example.test") == 1  # still cached
    await r.lookup("mx1.example.test", "A")  # a third entry evicts c2, the oldest
    await r.lookup("c2.example.test", "A")
    assert await dnsmasq.count("A", "c2.example.test") == 2
    await r.lookup("mx1.example.test", "A")
    assert await dnsmasq.count("A", "mx1.example.test") == 1


# ---------------------------------------------------------------- failures


class _Silent(DatagramProtocol):
    def datagramReceived(self, datagram: bytes, addr: object) -> None:
        pass  # never answers


class _Rcode(DatagramProtocol):
    """Answers every query with the RCODE named by its first label."""

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        query = dns.Message()
        query.fromStr(datagram)
        first = query.queries[0].name.name.split(b".")[0].decode()
        reply = dns.Message(id=query.id, answer=1, rCode=getattr(dns, first.upper()))
        reply.queries = query.queries
        assert self.transport is not None
        self.transport.write(reply.toStr(), addr)


@pytest_twisted.ensureDeferred
async def test_timeout_is_temporary() -> None:
    port = reactor.listenUDP(0, _Silent(), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        r = TwistedResolver(reactor, [("127.0.0.1", port.getHost().port)], timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TemporaryDNSError):
            await r.lookup("example.test", "TXT")
        assert time.monotonic() - started < 2
    finally:
        await port.stopListening()


@pytest.mark.parametrize("rcode", ["eserver", "erefused", "eformat", "enotimp"])
@pytest_twisted.ensureDeferred
async def test_error_rcodes_are_temporary(rcode: str) -> None:
    port = reactor.listenUDP(0, _Rcode(), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        r = TwistedResolver(reactor, [("127.0.0.1", port.getHost().port)], timeout=2)
        with pytest.raises(TemporaryDNSError):
            await r.lookup(f"{rcode}.example.test", "A")
        with pytest.raises(NXDomain):
            await r.lookup("ename.example.test", "A")
    finally:
        await port.stopListening()


def _rr(name: bytes, payload: Any, ttl: int = 60) -> dns.RRHeader:
    return dns.RRHeader(name, payload.TYPE, dns.IN, ttl, payload)


def test_cname_loops_and_long_chains_are_temporary() -> None:
    loop = [
        _rr(b"a.test", dns.Record_CNAME(b"b.test")),
        _rr(b"b.test", dns.Record_CNAME(b"a.test")),
    ]
    with pytest.raises(TemporaryDNSError):
        _extract(b"a.test", dns.A, loop)
    chain = [_rr(b"n%d.test" % i, dns.Record_CNAME(b"n%d.test" % (i + 1))) for i in range(20)]
    with pytest.raises(TemporaryDNSError):
        _extract(b"n0.test", dns.A, chain)


def test_ttl_is_the_smallest_on_the_chain() -> None:
    answers = [
        _rr(b"Alias.test.", dns.Record_CNAME(b"host.test"), ttl=30),
        _rr(b"host.test", dns.Record_A("192.0.2.1"), ttl=600),
        _rr(b"host.test", dns.Record_A("192.0.2.2"), ttl=500),
        _rr(b"other.test", dns.Record_A("192.0.2.3"), ttl=5),
    ]
    assert _extract(b"alias.test", dns.A, answers) == (("192.0.2.1", "192.0.2.2"), 30.0)
    assert _extract(b"alias.test", dns.AAAA, answers) == ((), None)


def test_negative_ttl_from_the_soa() -> None:
    soa = dns.Record_SOA(b"ns.test", b"hostmaster.test", minimum=120)
    assert _negative_ttl([_rr(b"test", soa, ttl=3600)]) == 120
    assert _negative_ttl([_rr(b"test", soa, ttl=60)]) == 60
    big = dns.Record_SOA(b"ns.test", b"hostmaster.test", minimum=10**6)
    assert _negative_ttl([_rr(b"test", big, ttl=10**6)]) == 3 * 3600
    assert _negative_ttl([]) == DEFAULT_NEGATIVE_TTL


def test_timeouts_and_types_are_checked() -> None:
    with pytest.raises(ValueError):
        TwistedResolver(reactor, [("127.0.0.1", 53)], timeout=0)
    with pytest.raises(ValueError):
        TwistedResolver(reactor, [("127.0.0.1", 53)], timeout=())
    r = TwistedResolver(reactor, [("127.0.0.1", 53)], timeout=(1, 2, 4))
    assert r._timeouts == (1.0, 2.0, 4.0)
    with pytest.raises(ValueError):
        r.lookup("x.test", "SRV").send(None)


# ---------------------------------------------------------------- --dns-server


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("192.0.2.53:5353", ("192.0.2.53", 5353)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
        ("[2001:db8::53]", ("2001:db8::53", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        (" ::1 ", ("::1", 53)),
    ],
)
def test_parse_dns_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_dns_server(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ns.example.com",
        "192.0.2.53:0",
        "192.0.2.53:65536",
        "192.0.2.53:x",
        "[192.0.2.53]:53",
        "[2001:db8::53",
        "[2001:db8::53]53",
        "2001:db8::53:53:53:53:53:53:53",
    ],
)
def test_parse_dns_server_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dns_server(text)
