"""Routing a domain (RFC 5321 5.1, RFC 7505) over zone data and over a real dnsmasq."""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dnsmasq_support

from dnsmasq_support import Dnsmasq, run_dnsmasq

from maitred_tx.auth.resolver import MX, Record, ZoneResolver
from maitred_tx.relay.route import (
    Host,
    RelayHost,
    RouteError,
    addresses,
    parse_relay_host,
    route,
)

ZONE: dict[tuple[str, str], list[Record]] = {
    ("multi.test", "MX"): [MX(20, "mx3.multi.test"), MX(10, "mx1.multi.test"),
                           MX(10, "mx2.multi.test")],
    ("plain.test", "A"): ["192.0.2.1"],
    ("plain.test", "TXT"): ["v=spf1 -all"],  # the name exists, without MX: implicit MX
    ("nullmx.test", "MX"): [MX(0, "")],
    ("notnull.test", "MX"): [MX(0, ""), MX(10, "mx.notnull.test")],
    ("mx1.multi.test", "A"): ["192.0.2.11"],
    ("mx1.multi.test", "AAAA"): ["2001:db8::11"],
    ("v6.test", "AAAA"): ["2001:db8::6"],
    ("noaddr.test", "TXT"): ["x"],
}


def run(coro):
    return asyncio.run(coro)


def test_mx_hosts_in_preference_order_equal_ones_shuffled() -> None:
    zone = ZoneResolver(ZONE)
    seen = set()
    for seed in range(20):
        hosts = run(route(zone, "Multi.Test.", rng=random.Random(seed)))
        assert [h.preference for h in hosts] == [10, 10, 20]
        assert hosts[2].name == "mx3.multi.test"
        seen.add(tuple(h.name for h in hosts[:2]))
    assert seen == {("mx1.multi.test", "mx2.multi.test"), ("mx2.multi.test", "mx1.multi.test")}


def test_implicit_mx() -> None:
    assert run(route(ZoneResolver(ZONE), "plain.test")) == [Host("plain.test", None, 25)]


@pytest.mark.parametrize(
    ("domain", "permanent", "code", "status"),
    [
        ("nullmx.test", True, 556, "5.1.10"),  # RFC 7505 3
        ("nowhere.test", True, 550, "5.1.2"),  # NXDOMAIN
        ("broken.test", False, 451, "4.4.3"),  # the MX lookup failed
        ("[192.0.2.300]", True, 553, "5.1.3"),
    ],
)
def test_no_route(domain: str, permanent: bool, code: int, status: str) -> None:
    zone = ZoneResolver(ZONE, temporary=["broken.test"])
    with pytest.raises(RouteError) as e:
        run(route(zone, domain))
    assert (e.value.permanent, e.value.code, e.value.status) == (permanent, code, status)


def test_a_dot_among_other_mx_is_not_a_null_mx() -> None:
    assert run(route(ZoneResolver(ZONE), "notnull.test")) == [Host("mx.notnull.test", 10)]


def test_address_literals_are_their_own_route() -> None:
    zone = ZoneResolver(ZONE)
    assert run(route(zone, "[192.0.2.5]")) == [Host("192.0.2.5")]
    assert run(route(zone, "[IPv6:2001:db8::5]")) == [Host("2001:db8::5")]
    assert zone.lookups == []


def test_addresses() -> None:
    zone = ZoneResolver(ZONE, temporary=[("flaky.test", "A")])
    assert run(addresses(zone, Host("mx1.multi.test", 10))) == ["192.0.2.11", "2001:db8::11"]
    assert run(addresses(zone, Host("v6.test", 10))) == ["2001:db8::6"]
    assert run(addresses(zone, "192.0.2.9")) == ["192.0.2.9"]
    with pytest.raises(RouteError) as e:  # an MX host without address: temporary
        run(addresses(zone, Host("noaddr.test", 10)))
    assert (e.value.permanent, e.value.status) == (False, "4.4.4")
    with pytest.raises(RouteError) as e:  # the implicit MX without address: permanent
        run(addresses(zone, Host("noaddr.test", None)))
    assert (e.value.permanent, e.value.status) == (True, "5.1.2")
    with pytest.raises(RouteError) as e:  # a DNS failure never bounces
        run(addresses(zone, Host("flaky.test", None)))
    assert not e.value.permanent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smtp.example.com", RelayHost("smtp.example.com", 25, mx=True)),
        ("smtp.example.com:587", RelayHost("smtp.example.com", 587, mx=True)),
        ("[smtp.example.com]", RelayHost("smtp.example.com", 25, mx=False)),
        ("[smtp.example.com]:2525", RelayHost("smtp.example.com", 2525, mx=False)),
        ("[2001:db8::1]:25", RelayHost("2001:db8::1", 25, mx=False)),
        ("192.0.2.1:26", RelayHost("192.0.2.1", 26, mx=False)),
        ("Smtp.Example.COM.", RelayHost("smtp.example.com", 25, mx=True)),
    ],
)
def test_parse_relay_host(text: str, expected: RelayHost) -> None:
    assert parse_relay_host(text) == expected


@pytest.mark.parametrize("text", ["", "[host", "host:", "host:x", "host:70000", "[h]x",
                                  "bad_name!:25"])
def test_parse_relay_host_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_relay_host(text)


# --- over a real DNS server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    yield from run_dnsmasq(
        tmp_path_factory.mktemp("route-dns"),
        [
            "--mx-host=multi.test,mx1.multi.test,10",
            "--mx-host=multi.test,mx2.multi.test,20",
            "--host-record=mx1.multi.test,192.0.2.11,2001:db8::11",
            "--host-record=mx2.multi.test,192.0.2.12",
            "--mx-host=nullmx.test,.,0",
            "--host-record=plain.test,192.0.2.1",
        ],
        local=("test",),
    )


@pytest_twisted.ensureDeferred
async def test_routes_over_dnsmasq(dns: Dnsmasq) -> None:
    resolver = dns.resolver()
    hosts = await route(resolver, "multi.test")
    assert [(h.name, h.preference) for h in hosts] == [("mx1.multi.test", 10),
                                                       ("mx2.multi.test", 20)]
    assert await addresses(resolver, hosts[0]) == ["192.0.2.11", "2001:db8::11"]
    assert await route(resolver, "plain.test") == [Host("plain.test", None)]
    assert await addresses(resolver, Host("plain.test")) == ["192.0.2.1"]
    with pytest.raises(RouteError) as e:
        await route(resolver, "nullmx.test")
    assert (e.value.code, e.value.status, e.value.permanent) == (556, "5.1.10", True)
    with pytest.raises(RouteError) as e:
        await route(resolver, "nosuch.test")
    assert (e.value.status, e.value.permanent) == ("5.1.2", True)
