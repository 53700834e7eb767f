"""Where mail for a domain goes: RFC 5321 5.1 (MX records, the implicit MX) and
RFC 7505 (null MX), over the ``Resolver`` interface; pure.

``route(resolver, domain)`` gives the hosts to try, in order:

- the MX records, lowest preference first; hosts of equal preference in random order
  (5.1: "the SMTP client SHOULD randomize them to spread the load");
- no MX record at all (NODATA): the domain itself is the one host, the implicit MX
  (5.1), if it has an address;
- a single MX of preference 0 naming the root (``MX 0 .``): the domain accepts no mail
  (RFC 7505 3): a permanent failure, 556 5.1.10 for the bounce;
- an MX of ``.`` among others is ignored (RFC 7505 3: "not a null MX");
- NXDOMAIN: the domain does not exist, a permanent failure (5.1.2);
- a DNS failure: temporary; the message stays queued.

``addresses(resolver, host)`` gives a host's IP addresses to connect to.  A smarthost
(``parse_relay_host``) written in brackets, ``[host]:port``, is used as it is, without
MX lookup (Postfix's relayhost syntax).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from maitred_tx.auth.resolver import MX, NXDomain, Resolver, TemporaryDNSError
from maitred_tx.relay.smarthost import RelayCredentials, RelayTLS
from maitred_tx.smtp.address import AddressError, normalize_domain

__all__ = [
    "SMTP_PORT",
    "Host",
    "RelayHost",
    "RouteError",
    "addresses",
    "parse_relay_host",
    "route",
]

SMTP_PORT: Final = 25
# RFC 5321 5.1 leaves it open; Postfix tries at most 5 MX hosts per delivery
# (smtp_mx_address_limit counts addresses, smtp_mx_session_limit = 2 sessions).
MAX_HOSTS: Final = 10


class RouteError(Exception):
    """No host to send to.  ``permanent``: the message bounces (a null MX, a domain
    that does not exist); else it stays queued.  ``code``/``status``: the reply to
    report for it (RFC 3463)."""

    def __init__(self, text: str, *, permanent: bool, code: int, status: str) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent
        self.code = code
        self.status = status


@dataclass(frozen=True, slots=True)
class Host:
    """One host to try: its name (the one its certificate must carry under MTA-STS),
    its MX preference (None for the implicit MX or a smarthost) and port."""

    name: str
    preference: int | None = None
    port: int = SMTP_PORT


@dataclass(frozen=True, slots=True)
class RelayHost:
    """``--relay-host``: a smarthost.  ``mx``: look up the MX of ``name`` (written
    without brackets) rather than connect to it directly.  ``tls``: how its connection
    is protected; ``credentials``: AUTH with these (``--relay-tls``, ``--relay-auth``;
    see ``maitred_tx.relay.smarthost``)."""

    name: str
    port: int = SMTP_PORT
    mx: bool = False
    tls: RelayTLS = RelayTLS.OPPORTUNISTIC
    credentials: RelayCredentials | None = None

    def __post_init__(self) -> None:
        if self.credentials is not None and self.tls is RelayTLS.OPPORTUNISTIC:
            # RFC 4954 4 / RFC 8314: a password only over TLS, and only to the host
            # whose certificate proves it is the one we mean.
            raise ValueError("credentials need verified TLS (RelayTLS.VERIFY or "
                             "IMPLICIT), not opportunistic STARTTLS")


def parse_relay_host(text: str) -> RelayHost:
    """``host``, ``host:port``, ``[host]``, ``[host]:port`` or ``[IPv6]:port``, as
    Postfix's relayhost: brackets mean "no MX lookup"."""
    text = text.strip()
    port = SMTP_PORT
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: unbalanced '['")
        name, rest = text[1:end], text[end + 1 :]
        mx = False
    else:
        name, sep, rest = text.partition(":")
        rest = sep + rest
        mx = True
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            raise ValueError(f"{text!r}: expected HOST[:PORT] or [HOST][:PORT]")
        port = int(rest[1:])
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}: port out of range")
    if not name:
        raise ValueError(f"{text!r}: no host")
    if _is_ip(name):
        return RelayHost(name, port, mx=False)
    try:
        name = normalize_domain(name)
    except AddressError as e:
        raise ValueError(f"{text!r}: {e}") from None
    return RelayHost(name, port, mx=mx)


async def route(resolver: Resolver, domain: str, *, port: int = SMTP_PORT,
                rng: random.Random | None = None) -> list[Host]:
    """The hosts to try for *domain*, in order; RouteError when there are none."""
    name = domain.lower().rstrip(".")
    if name.startswith("[") or _is_ip(name):
        literal = name.strip("[]").removeprefix("ipv6:")
        if not _is_ip(literal):
            raise RouteError(f"{domain}: not an address literal", permanent=True, code=553,
                             status="5.1.3")
        return [Host(literal, None, port)]
    try:
        records = await resolver.lookup(name, "MX")
    except NXDomain:
        raise RouteError(f"{domain}: no such domain", permanent=True, code=550,
                         status="5.1.2") from None
    except TemporaryDNSError as e:
        raise RouteError(f"{domain}: MX lookup failed ({e})", permanent=False, code=451,
                         status="4.4.3") from None
    mxs = [r for r in records if isinstance(r, MX)]
    if len(mxs) == 1 and mxs[0].exchange in ("", ".") and mxs[0].preference == 0:
        raise RouteError(f"{domain} accepts no mail (null MX, RFC 7505)", permanent=True,
                         code=556, status="5.1.10")
    mxs = [m for m in mxs if m.exchange not in ("", ".")]
    if not mxs:
        return [Host(name, None, port)]  # the implicit MX (5.1)
    return [Host(m.exchange, m.preference, port) for m in _ordered(mxs, rng)][:MAX_HOSTS]


def _ordered(mxs: Sequence[MX], rng: random.Random | None) -> list[MX]:
    shuffle = (rng or random).random
    return sorted(mxs, key=lambda m: (m.preference, shuffle()))


async def addresses(resolver: Resolver, host: Host | str) -> list[str]:
    """The IP addresses of *host* (an IP literal is its own), IPv4 first then IPv6:
    most of the Internet's MX hosts reach IPv4, and an empty answer for one family is
    no error.  RouteError when neither gave an address: permanent for the implicit MX
    (the domain has neither MX nor address: 5.1.2, as Postfix bounces it), temporary
    for a named MX or smarthost (a DNS mistake of the moment, or an outage)."""
    name = host if isinstance(host, str) else host.name
    implicit = isinstance(host, Host) and host.preference is None and not _is_ip(name)
    if _is_ip(name):
        return [name]
    found: list[str] = []
    failures: list[str] = []
    temporary = False
    for rtype in ("A", "AAAA"):
        try:
            found += [str(r) for r in await resolver.lookup(name, rtype)]
        except NXDomain:
            failures.append(f"{name}: no such name")
            break  # the name does not exist: no use asking for AAAA
        except TemporaryDNSError as e:
            failures.append(str(e))
            temporary = True
    if found:
        return found
    why = "; ".join(failures) or f"{name} has no address"
    if implicit and not temporary:
        raise RouteError(f"{name} has neither an MX nor an address ({why})",
                         permanent=True, code=550, status="5.1.2")
    raise RouteError(why, permanent=False, code=451, status="4.4.4")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
