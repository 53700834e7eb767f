"""The factory: one per listener; builds a protocol and a delivery per connection."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import ServerFactory

from maitred_tx.delivery.compat import delivery_provider
from maitred_tx.server.protocol import SMTPServerProtocol
from maitred_tx.smtp.config import Config

__all__ = ["SMTPFactory"]


class SMTPFactory(ServerFactory):
    """Serves *delivery* — a maitred_tx IDelivery or a twisted.mail IMessageDelivery /
    IMessageDeliveryFactory — with the limits and policy of *config*.

    The reactor is a parameter (for timers), never the global one.
    """

    def __init__(self, reactor: IReactorTime, config: Config, delivery: Any) -> None:
        self.reactor = reactor
        self.config = config
        self.delivery = delivery
        self._new_delivery = delivery_provider(delivery)
        self.connections: set[SMTPServerProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> SMTPServerProtocol:  # type: ignore[override]
        protocol = SMTPServerProtocol(self.config, self._new_delivery(), self.reactor)
        protocol.factory = self
        self.connections.add(protocol)
        return protocol

    def forget(self, protocol: SMTPServerProtocol) -> None:
        self.connections.discard(protocol)

    def shutdown(self) -> None:
        """Tell every open session 421 and close it (RFC 5321 3.8)."""
        for protocol in list(self.connections):
            protocol.shutdown()
