"""Embedding: a MultiService that listens on endpoint strings and serves one delivery.

    from maitred_tx.service import SMTPService
    service = SMTPService(reactor, Config(...), MyDelivery(), ["tcp:2525:interface=127.0.0.1"])
    service.listen("tcp:587:interface=127.0.0.1", Config(..., mode=Mode.SUBMISSION))
    service.setServiceParent(application)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from maitred_tx.auth.resolver import Resolver
from maitred_tx.metrics import Metrics
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.server.limits import ClientLimiter
from maitred_tx.smtp.config import Config

__all__ = ["DEFAULT_BACKLOG", "DEFAULT_DNS_TIMEOUT", "DEFAULT_LISTEN", "SMTPService"]

_log = Logger()

# Loopback only by default: exposing a mail server is a decision, not an accident.
DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"
# Seconds one DNS lookup of the authentication checks may take (two UDP tries, see
# maitred_tx.auth.dns): short, so that a host without a reachable resolver gets
# temperror verdicts quickly instead of holding every message; OpenDKIM's DNSTimeout
# is 10 s, and a recursive resolver that needs more has failed for this message anyway.
DEFAULT_DNS_TIMEOUT = 5.0
# Endpoint types whose connections can be upgraded with STARTTLS.
_STARTTLS_ENDPOINTS = ("tcp:", "tcp6:")
# The listen queue when the endpoint string sets no backlog=.  Twisted's 50 drops SYNs
# in a burst of new connections (hundreds at once, after a network blip or when a
# queue flushes), and each dropped SYN costs the client a one-second retry.  Linux
# silently caps the value at net.core.somaxconn (4096 since 5.4), so this asks for the
# system's maximum there, and for at least 1024 elsewhere (nginx asks for 511, HAProxy
# for its maxconn, Postfix's master for its process limit times a factor).
DEFAULT_BACKLOG = 1024
# Where each endpoint type takes its backlog among its positional arguments (counting
# the port or path as the first): a description that fills that place sets it.
_BACKLOG_POSITION = {"tcp": 3, "tcp6": 2, "ssl": 6, "unix": 3}


class SMTPService(MultiService):
    """Listens on Twisted server endpoint strings and serves *delivery*.

    Every listener added with ``listen`` may have its own Config (mode, limits); the
    portal (AUTH), TLS context (STARTTLS on TCP listeners; ``ssl:`` endpoints are
    implicit TLS), trusted proxies and the per-client limits are shared.  With
    *metrics* (``maitred_tx.metrics.Metrics``) every listener counts into it; serve it
    with ``maitred_tx.metrics.metrics_service``.
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        delivery: Any,
        listen: Sequence[str] = (DEFAULT_LISTEN,),
        *,
        portal: Portal | None = None,
        tls: Any = None,
        trusted_proxies: Sequence[str] = (),
        resolver: Resolver | None = None,
        dns_servers: Sequence[tuple[str, int]] | None = None,
        dns_timeout: float = DEFAULT_DNS_TIMEOUT,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.delivery = delivery
        self.portal = portal
        self.tls = tls
        self.trusted_proxies = tuple(trusted_proxies)
        limits = config.limits
        self.limiter = ClientLimiter(
            reactor.seconds,
            max_connections=limits.max_client_connections,
            max_connection_rate=limits.max_client_connection_rate,
            max_message_rate=limits.max_client_message_rate,
        )
        # Authentication checks (issue 5): built when the first listener that checks
        # messages is added.  *resolver* replaces the twisted.names one that asks
        # *dns_servers* (default: /etc/resolv.conf) with *dns_timeout* per lookup.
        self.resolver = resolver
        self.dns_servers = dns_servers
        self.dns_timeout = dns_timeout
        self.checker: Any = None
        self.factories: list[SMTPFactory] = []
        self.metrics = metrics
        for description in listen:
            self.listen(description, config)

    @property
    def factory(self) -> SMTPFactory:
        """The first listener's factory."""
        return self.factories[0]

    def listen(self, description: str, config: Config) -> SMTPFactory:
        """Add a listener on *description* with its own *config*."""
        factory, served, description = self._serve(description, config)
        description = with_backlog(description, default_backlog())
        strports.service(description, served, reactor=self.reactor).setServiceParent(self)
        return factory

    def adopt(self, fd: int, description: str, config: Config) -> SMTPFactory:
        """Add a listener on the listening socket *fd*, made for *description* by
        another process (``maitred_tx.workers``: the parent binds, every worker
        accepts).  The socket is duplicated; *fd* is not closed."""
        factory, served, _ = self._serve(description, config)
        _AdoptedPort(self.reactor, fd, served).setServiceParent(self)
        return factory

    def _serve(self, description: str, config: Config) -> tuple[SMTPFactory, Any, str]:
        """The factory for a listener, what the port serves (the factory, or TLS around
        it for implicit TLS) and the description to listen on."""
        if self.tls is not None and description.startswith(_STARTTLS_ENDPOINTS):
            config = replace(config, starttls=True)
        if self.portal is not None:
            config = replace(config, auth=True)
        factory = SMTPFactory(
            self.reactor,
            config,
            self.delivery,
            portal=self.portal,
            tls=self.tls,
            trusted_proxies=self.trusted_proxies,
            limiter=self.limiter,
            checker=self._checker() if config.checks_messages else None,
            metrics=self.metrics,
        )
        served: Any = factory
        plain = implicit_tls_as_tcp(description) if self.tls is not None else None
        if plain is not None:
            # Implicit TLS with our own context: TLS 1.2 at least, and a client
            # certificate asked for (Twisted's ssl: parser builds a context that never
            # asks), so deliveries see the same facts as after STARTTLS.
            description, served = plain, TLSMemoryBIOFactory(self.tls, False, factory)
        self.factories.append(factory)
        return factory, served, description

    def _checker(self) -> Any:
        if self.checker is None:
            from maitred_tx.auth.checks import AuthChecker

            if self.resolver is None:
                from maitred_tx.auth.dns import TwistedResolver

                self.resolver = TwistedResolver(self.reactor, self.dns_servers, self.dns_timeout)
            self.checker = AuthChecker(self.reactor, self.resolver)  # offthread.CPU_THREADS
            _CheckerService(self.checker).setServiceParent(self)
        return self.checker

    def stopService(self) -> Deferred[None] | None:
        # Say 421 to every open session before the listeners go (RFC 5321 3.8).
        for factory in self.factories:
            factory.shutdown()
        stopped = super().stopService()
        # A delivery that keeps connections (LMTP, HTTP) says goodbye to them: it has a
        # close(), which may return a Deferred.
        close = getattr(self.delivery, "close", None)
        if not callable(close):
            return stopped
        closing = maybeDeferred(close)
        closing.addErrback(lambda f: _log.failure("closing the delivery failed", f))
        return DeferredList([d for d in (stopped, closing) if d is not None],
                            consumeErrors=True).addCallback(lambda _: None)


# Arguments of Twisted's ssl: server endpoint that only configure its own TLS context.
_SSL_ONLY_ARGS = frozenset({"privatekey", "certkey", "extracertchain", "sslmethod",
                            "dhparameters"})
# Its positional arguments after the port, in order (twisted.internet.endpoints
# _parseSSL): ssl:465:server.pem is privateKey=server.pem, not an interface.
_SSL_POSITIONAL = ("privateKey", "certKey", "sslmethod", "interface", "backlog")


def _split_description(description: str) -> list[str]:
    """An endpoint string's parts, split at unescaped colons as Twisted splits them
    (escapes are kept, so that the parts join back into the same string)."""
    parts, current, i = [], "", 0
    while i < len(description):
        char = description[i]
        if char == "\\" and i + 1 < len(description):
            current += description[i : i + 2]
            i += 2
            continue
        if char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
        i += 1
    parts.append(current)
    return parts


def default_backlog() -> int:
    """DEFAULT_BACKLOG, or the system's maximum listen queue where that is larger."""
    try:
        with open("/proc/sys/net/core/somaxconn", "rb") as f:
            return max(DEFAULT_BACKLOG, int(f.read()))
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


def with_backlog(description: str, backlog: int) -> str:
    """*description* with ``backlog=`` added when it is a tcp, tcp6, ssl or unix
    endpoint that sets none (as a keyword or in its positional place); any other
    endpoint string is returned as it is."""
    parts = _split_description(description)
    position = _BACKLOG_POSITION.get(parts[0].lower())
    if position is None:
        return description
    args = parts[1:]
    if any(a.partition("=")[0].lower() == "backlog" for a in args if "=" in a):
        return description
    if sum("=" not in a for a in args) >= position:
        return description
    return f"{description}:backlog={backlog}"


def implicit_tls_as_tcp(description: str) -> str | None:
    """``ssl:PORT:...`` as the ``tcp:`` description of the same port and interface, its
    TLS-only arguments (privateKey=, certKey=, ...) dropped; None for anything else.
    Arguments are split at unescaped colons, as Twisted's endpoint strings are."""
    parts = _split_description(description)
    if parts[0] != "ssl":
        return None
    # Positional arguments get their names (the port stays first, too many are left for
    # Twisted's parser to refuse), so that the ssl-only ones can be dropped by name.
    names = iter(("port", *_SSL_POSITIONAL))
    named = [
        part if "=" in part or (name := next(names, "port")) == "port" else f"{name}={part}"
        for part in parts[1:]
    ]
    kept = [p for p in named if p.partition("=")[0].lower() not in _SSL_ONLY_ARGS]
    return ":".join(["tcp", *kept])


class _AdoptedPort(Service):
    """Accepts on a listening socket another process bound (``SMTPService.adopt``)."""

    def __init__(self, reactor: Any, fd: int, factory: Any) -> None:
        self.reactor, self.fd, self.factory = reactor, fd, factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        with socket.socket(fileno=os.dup(self.fd)) as sock:
            family = sock.family
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        return None if port is None else port.stopListening()


class _CheckerService(Service):
    """Starts the checks thread with the service and stops it (joining it) after."""

    def __init__(self, checker: Any) -> None:
        self.checker = checker

    def startService(self) -> None:
        super().startService()
        self.checker.start()

    def stopService(self) -> None:
        super().stopService()
        self.checker.stop()
