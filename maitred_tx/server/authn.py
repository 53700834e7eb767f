"""AUTH through twisted.cred: the SASL exchange yields credentials (pure core); here
they meet the Portal, and the realm's avatar becomes this session's delivery.

The interfaces asked of the realm are ours and twisted.mail's, in that order, so
every realm a twisted.mail user already has works unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.cred import credentials as creds
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.python.failure import Failure

from maitred_tx.interfaces import IDelivery, ISubmissionUser

__all__ = ["AVATAR_INTERFACES", "Login", "allowed_senders", "anonymous_login", "login"]

_log = Logger()
AVATAR_INTERFACES = (IDelivery, IMessageDeliveryFactory, IMessageDelivery)


class Login:
    """A successful login: who, and the delivery that now serves the session."""

    def __init__(self, identity: str, avatar: Any, logout: Any) -> None:
        self.identity = identity
        self.avatar = avatar
        self.logout = logout


def login(portal: Portal, authcid: str, password: str, authzid: str) -> Deferred[Login | None]:
    """Log in; None for wrong credentials (or a refused authzid), never an exception.
    The password is not logged, not even on failure."""
    credentials = creds.UsernamePassword(authcid.encode("utf-8"), password.encode("utf-8"))

    def in_(result: tuple[Any, Any, Any]) -> Login | None:
        _interface, avatar, logout = result
        if authzid and authzid != authcid:
            user = ISubmissionUser(avatar, None)
            if user is None or not user.may_act_as(authcid, authzid):
                logout()
                return None
            return Login(authzid, avatar, logout)
        return Login(authcid, avatar, logout)

    def out(failure: Failure) -> None:
        if not failure.check(UnauthorizedLogin, LoginFailed):
            _log.failure("the portal failed for {user}", failure, user=authcid)
        return None

    d = portal.login(credentials, None, *AVATAR_INTERFACES)
    return d.addCallbacks(in_, out)


def anonymous_login(portal: Portal) -> Deferred[Any]:
    """The anonymous avatar, as twisted.mail's ESMTP asks for it; None if there is none."""
    d = portal.login(creds.Anonymous(), None, *AVATAR_INTERFACES)
    return d.addCallbacks(lambda result: result[1], lambda _failure: None)


def allowed_senders(login: Login, local_domains: Iterable[str]) -> frozenset[str]:
    """Lower-cased addresses *login* may send as (see ISubmissionUser)."""
    user = ISubmissionUser(login.avatar, None)
    if user is not None:
        return frozenset(a.lower() for a in user.allowed_senders(login.identity))
    if "@" in login.identity:
        return frozenset({login.identity.lower()})
    return frozenset(f"{login.identity}@{d}".lower() for d in local_domains)
