"""Fixtures for the client's real-socket tests: maitred_tx's own server in process
(tests/interop/security_support.py starts it), test certificates, a recording TCP
proxy that shows how the client's writes reach the wire, and the peers' helpers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "interop"))
sys.path.insert(0, str(HERE))

from security_support import CertFiles, make_certificate, running_services  # noqa: E402


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    """A self-signed (CA) certificate for localhost / 127.0.0.1 and its key."""
    return make_certificate(tmp_path)


service = pytest.fixture(running_services)


@dataclass
class Recording:
    """What a proxy saw: each read from the client, as it arrived."""

    port: int
    reads: list[bytes] = field(default_factory=list)

    def read_with(self, marker: bytes) -> bytes:
        """The first read that contains *marker*."""
        return next(r for r in self.reads if marker in r)


class _Upstream(Protocol):
    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:
        self.downstream.upstream = self
        self.transport.setTcpNoDelay(True)
        for data in self.downstream.pending:
            self.transport.write(data)
        self.downstream.pending.clear()

    def dataReceived(self, data: bytes) -> None:
        self.downstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.transport.loseConnection()


class _Downstream(Protocol):
    def __init__(self, recording: Recording, target: int) -> None:
        self.recording, self.target = recording, target
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        factory = ClientFactory.forProtocol(lambda: _Upstream(self))
        reactor.connectTCP("127.0.0.1", self.target, factory)

    def dataReceived(self, data: bytes) -> None:
        self.recording.reads.append(data)
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


@pytest.fixture
def recording_proxy() -> Iterator[Callable[[int], Recording]]:
    """``recording_proxy(port)``: a TCP proxy on 127.0.0.1 in front of *port* that
    records every read from the client (so a test sees which commands one write
    carried: on loopback one write arrives as one read)."""
    ports: list[Any] = []

    def start(target: int) -> Recording:
        recording = Recording(0)
        factory = Factory.forProtocol(lambda: _Downstream(recording, target))
        listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(listener)
        recording.port = listener.getHost().port
        return recording

    yield start
    for listener in ports:
        stopped = listener.stopListening()
        if isinstance(stopped, Deferred):
            pytest_twisted.blockon(stopped)
