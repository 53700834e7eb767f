"""Embedding: a MultiService that listens on endpoint strings and serves one delivery.

    from maitred_tx.service import SMTPService
    service = SMTPService(reactor, Config(...), MyDelivery(), ["tcp:2525:interface=127.0.0.1"])
    service.setServiceParent(application)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred

from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.config import Config

__all__ = ["DEFAULT_LISTEN", "SMTPService"]

# Loopback only by default: exposing a mail server is a decision, not an accident.
DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"


class SMTPService(MultiService):
    """Listens on each Twisted server endpoint string in *listen* and serves *delivery*."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        delivery: Any,
        listen: Sequence[str] = (DEFAULT_LISTEN,),
    ) -> None:
        super().__init__()
        self.factory = SMTPFactory(reactor, config, delivery)
        for description in listen:
            strports.service(description, self.factory, reactor=reactor).setServiceParent(self)

    def stopService(self) -> Deferred[None] | None:
        # Say 421 to every open session before the listeners go (RFC 5321 3.8).
        self.factory.shutdown()
        return super().stopService()
