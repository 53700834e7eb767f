"""Failed lookups are cached for FAILURE_TTL (RFC 2308 7.1, 7.2; issue 13): a DNS server
on loopback that answers SERVFAIL or REFUSED, or never answers, is asked once per name
and type until then, and each cached failure reads as TemporaryDNSError."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted  # type: ignore[import-untyped,unused-ignore]
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns

from maitred_tx.auth.dns import FAILURE_TTL, TwistedResolver
from maitred_tx.auth.resolver import TemporaryDNSError


class FailingServer(DatagramProtocol):
    """Answers every query with *rcode* (None: never answers), counting the queries."""

    def __init__(self, rcode: int | None) -> None:
        self.rcode = rcode
        self.queries: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        message = dns.Message()
        message.fromStr(data)
        self.queries.append(message.queries[0].name.name)
        if self.rcode is not None:
            answer = dns.Message(id=message.id, answer=1, rCode=self.rcode)
            answer.queries = message.queries
            self.transport.write(answer.toStr(), addr)


@pytest.fixture(params=[dns.ESERVER, dns.EREFUSED, None], ids=["SERVFAIL", "REFUSED", "silent"])
def failing(request: pytest.FixtureRequest) -> Iterator[tuple[FailingServer, int]]:
    server = FailingServer(request.param)
    port = reactor.listenUDP(0, server, interface="127.0.0.1")
    yield server, port.getHost().port
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_a_failure_is_asked_once_until_it_expires(failing) -> None:
    server, port = failing
    now = [1000.0]
    resolver = TwistedResolver(reactor, [("127.0.0.1", port)], timeout=0.2,
                               clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(TemporaryDNSError):
            await resolver.lookup("sender.example", "TXT")
    assert server.queries.count(b"sender.example") in (1, 2)  # the silent one is retried once
    asked = len(server.queries)
    assert resolver.expires("sender.example", "TXT") == pytest.approx(
        now[0] + FAILURE_TTL, abs=1)
    with pytest.raises(TemporaryDNSError):  # another type is another lookup
        await resolver.lookup("sender.example", "A")
    assert len(server.queries) > asked
    asked = len(server.queries)
    now[0] += FAILURE_TTL + 0.5
    assert resolver.expires("sender.example", "TXT") is None
    with pytest.raises(TemporaryDNSError):
        await resolver.lookup("sender.example", "TXT")
    assert len(server.queries) > asked  # asked again once the failure expired


def test_failures_are_kept_no_longer_than_rfc_2308_allows() -> None:
    assert 0 < FAILURE_TTL <= 300
