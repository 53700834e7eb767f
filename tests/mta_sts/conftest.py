"""Fixtures for the MTA-STS tests: a test CA, a real HTTPS policy server on 127.0.0.1,
fetchers that trust the CA and reach every ``mta-sts.<domain>`` on that server."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dnsmasq_support

from mta_sts_support import (
    CA,
    GOOD_POLICY,
    PolicyServer,
    policy_handler,
    start_policy_server,
)

# The names the good server's certificate carries (not mta-sts.wrongname.example.test).
NAMES = [
    f"mta-sts.{d}example.test"
    for d in ("", "redirect.", "missing.", "html.", "big.", "slow.", "zip.", "bad.", "cut.",
              "charset.", "stall.", "untyped.", "twotypes.", "error.", "gone.", "later.",
              "other.", "none.")
]


@pytest.fixture(scope="session")
def ca() -> CA:
    return CA("maitred MTA-STS test CA")


@pytest.fixture
def start_server(ca: CA) -> Iterator[Callable[..., PolicyServer]]:
    """``start_server(handlers, names=NAMES, issuer=ca, expired=False)``."""
    servers: list[PolicyServer] = []

    def start(
        handlers: dict[str, Any] | None = None,
        names: list[str] | None = None,
        issuer: CA | None = None,
        expired: bool = False,
    ) -> PolicyServer:
        cert = (issuer or ca).issue(names or NAMES, expired=expired)
        server = start_policy_server(reactor, cert, handlers)
        servers.append(server)
        return server

    yield start
    for server in servers:
        stopped = server.listener.stopListening()
        if isinstance(stopped, Deferred):
            pytest_twisted.blockon(stopped)


@pytest.fixture
def https(start_server: Callable[..., PolicyServer]) -> PolicyServer:
    """The good server: a policy for example.test, signed by the test CA."""
    return start_server({"mta-sts.example.test": policy_handler(GOOD_POLICY)})
