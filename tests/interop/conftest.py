"""Fixtures for the real-socket tests: an in-process server on 127.0.0.1:0 in the test's
own (real) reactor, and ``twistd -n maitred`` subprocesses.

In-process tests are ``@pytest_twisted.ensureDeferred`` coroutines; every blocking
client (smtplib, the raw Client) runs in ``deferToThread`` so the reactor keeps serving,
and every external program runs through ``getProcessOutputAndValue``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dnsmasq_support

from maitred_interop import twistd_maitred
from security_support import CertFiles, make_certificate, running_services

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.config import Config


@dataclass(slots=True)
class Server:
    """An in-process server: its port, factory and delivery."""

    port: int
    factory: SMTPFactory
    delivery: Any
    listener: IListeningPort

    @property
    def messages(self) -> list[Any]:
        """The stored messages of a MemoryDelivery."""
        return self.delivery.messages  # type: ignore[no-any-return]


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """``serve(config=None, delivery=None)`` starts a server on 127.0.0.1:0 (default
    Config with hostname mx.test, a fresh MemoryDelivery); all are stopped after the
    test: 421 to open sessions, then the listener closes."""
    servers: list[Server] = []

    def start(config: Config | None = None, delivery: Any = None) -> Server:
        delivery = MemoryDelivery() if delivery is None else delivery
        factory = SMTPFactory(reactor, config or Config(hostname="mx.test"), delivery)
        listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        server = Server(listener.getHost().port, factory, delivery, listener)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.factory.shutdown()
        d = server.listener.stopListening()
        if isinstance(d, Deferred):
            pytest_twisted.blockon(d)


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``with twistd(*args, env=...) as server:`` runs ``twistd -n maitred`` in tmp_path."""

    def start(*args: str, env: dict[str, str] | None = None) -> Any:
        return twistd_maitred(tmp_path, args, env)

    yield start


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    """A self-signed certificate for localhost / 127.0.0.1 and its key, in tmp_path."""
    return make_certificate(tmp_path)


service = pytest.fixture(running_services)
