"""AUTH on the connection (RFC 4954, through twisted.cred): the login, slower answers
after each failure, the avatar as the session's delivery, and forgetting it all when the
session starts over (STARTTLS, XCLIENT)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred

from maitred_tx.delivery.compat import delivery_provider
from maitred_tx.interfaces import IDelivery
from maitred_tx.server import authn
from maitred_tx.server.logevents import log
from maitred_tx.server.protocol_base import ProtocolBase
from maitred_tx.smtp.events import AuthRequested

__all__ = ["AuthHandling"]

# Failed AUTH answers wait longer each time (seconds), to slow down password guessing.
_AUTH_DELAYS = (1.0, 2.0, 4.0, 8.0)


class AuthHandling(ProtocolBase):
    """The AuthRequested event, the portal's anonymous avatar, and logging out."""

    def _anonymous_avatar(self, avatar: Any) -> None:
        # twisted.mail's ESMTP gives anonymous sessions the portal's anonymous avatar.
        if avatar is not None and self.policy is not None and self._login is None:
            self.policy.delivery = IDelivery(delivery_provider(avatar)())
            self._unauthenticated = self.policy.delivery

    def _forget_client(self, tls: bool = False) -> None:
        """The session starts over (STARTTLS, XCLIENT): log out, and the delivery and
        context no longer carry the HELO name or the identity of before."""
        policy = self.policy
        assert policy is not None
        if self._login is not None:
            self._login.logout()
            self._login = None
            policy.delivery = self._unauthenticated
        policy.context = replace(policy.context, helo=None, esmtp=False, authenticated=None,
                                 tls=policy.context.tls or tls)

    def _on_auth(self, event: AuthRequested) -> None:
        portal, session = self.factory.portal, self.session
        assert portal is not None and session is not None
        c = event.credentials
        self._wait_for(authn.login(portal, c.authcid, c.password, c.authzid), self._logged_in)

    def _logged_in(self, login: authn.Login | None) -> None:
        session, policy = self.session, self.policy
        assert session is not None and policy is not None
        if login is None:
            # Answer later and later: each failure costs the guesser time (issue 4).
            delay = _AUTH_DELAYS[min(session.auth_failures, len(_AUTH_DELAYS) - 1)]
            log.info("{peer} AUTH failed", peer=policy.context.peer_host)
            self.factory.metrics.auth_failed()
            d: Deferred[None] = Deferred()
            self._clock.callLater(delay, d.callback, None)
            self._wait_for(d, lambda _: session.auth_result(None))
            return
        self._login = login
        policy.delivery = IDelivery(delivery_provider(login.avatar)())
        policy.context = replace(policy.context, authenticated=login.identity)
        log.info("{peer} AUTH as {user}", peer=policy.context.peer_host, user=login.identity)
        self.factory.metrics.auth_succeeded()
        session.auth_result(login.identity)
