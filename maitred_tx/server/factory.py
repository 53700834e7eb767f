"""The factory: one per listener; builds a protocol and a delivery per connection."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address, ip_network
from typing import TYPE_CHECKING, Any

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import ServerFactory

from maitred_tx.delivery.compat import delivery_provider
from maitred_tx.metrics import NO_METRICS, Metrics
from maitred_tx.server.limits import ClientLimiter
from maitred_tx.server.protocol import SMTPServerProtocol
from maitred_tx.smtp.config import Config

if TYPE_CHECKING:  # imported by whoever builds one: dkimpy stays unloaded without checks
    from maitred_tx.auth.checks import AuthChecker

__all__ = ["SMTPFactory"]


class SMTPFactory(ServerFactory):
    """Serves *delivery* — a maitred_tx IDelivery or a twisted.mail IMessageDelivery /
    IMessageDeliveryFactory — with the limits and policy of *config*.  With a *checker*
    (maitred_tx.auth.checks.AuthChecker), messages get SPF/DKIM/ARC/DMARC verdicts
    when ``config.checks_messages``.  With *metrics* (maitred_tx.metrics.Metrics),
    its sessions, messages and verdicts are counted.

    The reactor is a parameter (for timers), never the global one.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        delivery: Any,
        *,
        portal: Portal | None = None,
        tls: Any = None,
        trusted_proxies: Sequence[str] = (),
        limiter: ClientLimiter | None = None,
        checker: AuthChecker | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.delivery = delivery
        self._new_delivery = delivery_provider(delivery)
        self.connections: set[SMTPServerProtocol] = set()
        # AUTH (issue: through twisted.cred), STARTTLS context, PROXY/XCLIENT sources.
        self.portal = portal
        self.tls = tls
        self.trusted_proxies = tuple(ip_network(n, strict=False) for n in trusted_proxies)
        # SPF/DKIM/ARC/DMARC (issue 5): messages are checked when a checker is given and
        # config.checks_messages says so.
        self.checker = checker
        # Prometheus counters (maitred_tx.metrics): the protocols count through this,
        # one call per event; without metrics the calls do nothing.
        self.metrics = NO_METRICS if metrics is None else metrics.listener(config.mode)
        limits = config.limits
        self.limiter = limiter or ClientLimiter(
            reactor.seconds,
            max_connections=limits.max_client_connections,
            max_connection_rate=limits.max_client_connection_rate,
            max_message_rate=limits.max_client_message_rate,
        )

    def is_trusted_proxy(self, host: str) -> bool:
        """True if *host* may send PROXY headers and XCLIENT (issue 4: trusted only)."""
        if not self.trusted_proxies:  # the usual case: no address parsing per connection
            return False
        try:
            address = ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)

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
