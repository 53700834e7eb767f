"""Embedding: a MultiService that listens on endpoint strings and serves one delivery.

    from maitred_tx.service import SMTPService
    service = SMTPService(reactor, Config(...), MyDelivery(), ["tcp:2525:interface=127.0.0.1"])
    service.listen("tcp:587:interface=127.0.0.1", Config(..., mode=Mode.SUBMISSION))
    service.setServiceParent(application)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred

from maitred_tx.server.factory import SMTPFactory
from maitred_tx.server.limits import ClientLimiter
from maitred_tx.smtp.config import Config

__all__ = ["DEFAULT_LISTEN", "SMTPService"]

# Loopback only by default: exposing a mail server is a decision, not an accident.
DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"
# Endpoint types whose connections can be upgraded with STARTTLS.
_STARTTLS_ENDPOINTS = ("tcp:", "tcp6:")


class SMTPService(MultiService):
    """Listens on Twisted server endpoint strings and serves *delivery*.

    Every listener added with ``listen`` may have its own Config (mode, limits); the
    portal (AUTH), TLS context (STARTTLS on TCP listeners; ``ssl:`` endpoints are
    implicit TLS), trusted proxies and the per-client limits are shared.
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
        self.factories: list[SMTPFactory] = []
        for description in listen:
            self.listen(description, config)

    @property
    def factory(self) -> SMTPFactory:
        """The first listener's factory."""
        return self.factories[0]

    def listen(self, description: str, config: Config) -> SMTPFactory:
        """Add a listener on *description* with its own *config*."""
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
        )
        strports.service(description, factory, reactor=self.reactor).setServiceParent(self)
        self.factories.append(factory)
        return factory

    def stopService(self) -> Deferred[None] | None:
        # Say 421 to every open session before the listeners go (RFC 5321 3.8).
        for factory in self.factories:
            factory.shutdown()
        return super().stopService()
