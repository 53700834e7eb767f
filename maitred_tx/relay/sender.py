"""Sending one queued message to one destination: the MX hosts of a recipient domain
(RFC 5321 5.1) with its MTA-STS policy (RFC 8461), or a smarthost; through
``maitred_tx.client``, over a connection kept open for the next message to the same
place.

How TLS is chosen per host:

- an MTA-STS policy in ``enforce`` mode: only MX hosts its ``mx`` patterns match are
  tried, and each must offer STARTTLS and present a certificate valid for its own MX
  name (RFC 8461 4.2); if none can be used the recipients stay queued (4.7.5);
- ``testing``: the same checks, but a failure is only reported (RFC 8461 5, TLS-RPT)
  and the message goes over an unverified or cleartext connection;
- no policy (or ``none``): opportunistic STARTTLS, unverified, as Postfix's
  ``smtp_tls_security_level = may``;
- a smarthost: as its ``RelayHost.tls`` says (``maitred_tx.relay.smarthost``);
  with credentials, always verified TLS, then AUTH (RFC 4954) once per connection.
  AUTH refused (535, 454) or not offered, or TLS failing, defers the recipients
  (4.7.x; Postfix's ``smtp_sasl_auth_soft_bounce``): a password changed at the
  provider should not bounce a day's mail.

Hosts are tried in order until one takes the transaction: a host that cannot be
reached, greets with 4xx/5xx, or fails TLS where TLS is required, is skipped; once a
transaction ran, its per-recipient replies are the result (a 4xx there defers those
recipients, it is not retried at the next MX in this run, as Postfix does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, Protocol

from twisted.logger import Logger

from maitred_tx.auth.resolver import Resolver
from maitred_tx.client import (
    SendResult,
    SMTPClient,
    SMTPClientError,
    Timeouts,
    TLSMode,
    TLSUnavailable,
    TLSVerificationFailed,
)
from maitred_tx.mta_sts.enforce import check_mx, filter_mx
from maitred_tx.mta_sts.policy import Mode, Policy
from maitred_tx.mta_sts.report import ResultType
from maitred_tx.mta_sts.tlsrpt import is_report_transaction
from maitred_tx.queue.store import AttemptResult, QueuedMessage, QueuedRecipient
from maitred_tx.queue.store import RecipientState as S
from maitred_tx.relay.connections import ConnectionCache, quit_later
from maitred_tx.relay.results import (
    AUTH_ERRORS,
    TLS_ERRORS,
    attempt_results,
    dsn_of,
    recipient_of,
    stale,
    status_of_error,
)
from maitred_tx.relay.route import Host, RelayHost, RouteError, addresses, route
from maitred_tx.relay.smarthost import RelayCredentials, RelayTLS

__all__ = ["OutboundSender", "destination_of"]

_log = Logger()

# Seconds to wait for a TCP connection (Postfix's smtp_connect_timeout).
CONNECT_TIMEOUT: Final = 30.0
# At most this many addresses of one host are tried (Postfix: smtp_mx_address_limit 5
# over all hosts).
MAX_ADDRESSES: Final = 2
# --relay-tls as the client's TLS mode and whether the certificate is verified.
_RELAY_TLS: Final = {
    RelayTLS.OPPORTUNISTIC: (TLSMode.OPPORTUNISTIC, False),
    RelayTLS.VERIFY: (TLSMode.REQUIRED, True),
    RelayTLS.IMPLICIT: (TLSMode.IMPLICIT, True),
}



def destination_of(address: str, relay: RelayHost | None) -> str:
    """Which destination a recipient belongs to: the smarthost, or its domain."""
    if relay is not None:
        return f"[{relay.name}]:{relay.port}"
    return address.rpartition("@")[2].lower()


class PolicySource(Protocol):
    """What the sender needs of ``maitred_tx.mta_sts.PolicyStore``."""

    async def policy_for(self, domain: str) -> Policy | None: ...

    def report_success(self, domain: str) -> None: ...

    def report_failure(self, domain: str, mx_host: str, result_type: ResultType, *,
                       reason: str = "", sending_ip: str | None = None,
                       receiving_ip: str | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to talk to one host: TLS mode, whether its certificate is checked, what
    to do when TLS fails (``fallback``: testing mode, report and go on without),
    whether a verified session here meets an MTA-STS policy (``listed``: counted as a
    success in the TLS report), and the ``credentials`` to AUTH with (a smarthost with
    ``--relay-auth``)."""

    host: Host
    tls: TLSMode
    verify: bool
    fallback: bool = False
    credentials: RelayCredentials | None = None
    listed: bool = False

    def key(self, ip: str) -> tuple[Any, ...]:
        """Its connections' key in the ConnectionCache: one made (and authenticated)
        for other settings is never reused for these."""
        user = None if self.credentials is None else self.credentials.username
        return (ip, self.host.port, self.tls, self.verify, self.host.name, user)


class OutboundSender:
    """Sends a message's recipients for one destination; returns one AttemptResult each.

    *resolver*: MX and address lookups (twisted.names).  *relay*: a smarthost for
    everything (no MX lookup, no MTA-STS).  *mta_sts*: a ``PolicyStore`` (None: no
    MTA-STS).  *signer*: a ``maitred_tx.auth.sign.Signer`` whose ``sign`` runs off the
    reactor (None: no DKIM signing).  *trust_root*: CAs for verified TLS (None: the
    platform's).  *port*: the SMTP port of MX hosts (25; tests use others)."""

    def __init__(
        self,
        reactor: Any,
        resolver: Resolver,
        *,
        helo: str,
        relay: RelayHost | None = None,
        mta_sts: PolicySource | None = None,
        signer: Any = None,
        trust_root: Any = None,
        timeouts: Timeouts | None = None,
        port: int = 25,
        connections: ConnectionCache | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.helo = helo
        self.relay = relay
        self.mta_sts = mta_sts
        self.signer = signer
        self.trust_root = trust_root
        self.timeouts = timeouts or Timeouts()
        self.port = port
        self.connections = connections or ConnectionCache(reactor)
        self.connect_timeout = connect_timeout

    async def deliver(
        self,
        message: QueuedMessage,
        recipients: Sequence[QueuedRecipient],
        open_body: Callable[[], Any],
        destination: str,
    ) -> list[AttemptResult]:
        """Try *recipients* of *message* (all of one *destination*) once.
        *open_body*: returns (a Deferred of) the stored body, a binary file."""
        try:
            plans = await self._plans(destination,
                                      report=is_report_transaction(message.transaction_id))
        except RouteError as e:
            state = S.FAILED if e.permanent else S.DEFERRED
            return [AttemptResult(r.address, state, status=e.status, diagnostic=e.text)
                    for r in recipients]
        prefix = b""
        if self.signer is not None:
            prefix = await self._signature(message, open_body)
        last = "no host to try"
        status = "4.4.1"
        for plan in plans:
            try:
                ips = await addresses(self.resolver, plan.host)
            except RouteError as e:
                if e.permanent:
                    return [AttemptResult(r.address, S.FAILED, status=e.status,
                                          diagnostic=e.text) for r in recipients]
                last, status = e.text, e.status
                continue
            for ip in ips[:MAX_ADDRESSES]:
                outcome = await self._try_host(plan, ip, message, recipients, open_body,
                                               prefix, destination)
                if isinstance(outcome, list):
                    return outcome
                last, status = outcome
        return [AttemptResult(r.address, S.DEFERRED, status=status, diagnostic=last)
                for r in recipients]

    # --- where and how ---------------------------------------------------------------

    async def _plans(self, destination: str, *, report: bool = False) -> list[_Plan]:
        """How to try *destination*'s hosts.  A TLS report we queued (*report*) goes
        without MTA-STS, like a domain without a policy: RFC 8460 5.3, "Sending MTAs
        MUST deliver reports despite any TLS-related failures and SHOULD NOT include
        this SMTP session in the next report" (no plan is ``verify``/``listed``, so
        nothing is counted), and a report about a domain's broken TLS still reaches
        it.  Its opportunistic connections have their own ConnectionCache key."""
        relay = self.relay
        if relay is not None:
            hosts = (await route(self.resolver, relay.name, port=relay.port) if relay.mx
                     else [Host(relay.name, None, relay.port)])
            tls, verify = _RELAY_TLS[relay.tls]
            return [_Plan(h, tls, verify, credentials=relay.credentials) for h in hosts]
        domain = destination
        mta_sts = None if report else self.mta_sts
        policy = None if mta_sts is None else await mta_sts.policy_for(domain)
        hosts = await route(self.resolver, domain, port=self.port)
        if mta_sts is None or policy is None or policy.mode is Mode.NONE:
            return [_Plan(h, TLSMode.OPPORTUNISTIC, verify=False) for h in hosts]
        allowed_names, refused_names = filter_mx(policy, [h.name for h in hosts])
        allowed = [h for h in hosts if h.name in allowed_names]
        for name in refused_names:
            mta_sts.report_failure(domain, name, ResultType.VALIDATION_FAILURE,
                                        reason="MX host not listed in the MTA-STS policy")
        if policy.mode is Mode.ENFORCE:
            if not allowed:
                raise RouteError(f"{domain}: no MX host matches its MTA-STS policy",
                                 permanent=False, code=451, status="4.7.5")
            return [_Plan(h, TLSMode.REQUIRED, verify=True, listed=True) for h in allowed]
        plans = []
        for host in hosts:  # testing: every host, TLS checked, failures only reported
            verdict = check_mx(policy, host.name)
            plans.append(_Plan(host, TLSMode.REQUIRED, verify=True,
                               fallback=not verdict.tls_required,
                               listed=verdict.failure is None))
        return plans

    # --- one host ----------------------------------------------------------------------

    async def _try_host(
        self, plan: _Plan, ip: str, message: QueuedMessage,
        recipients: Sequence[QueuedRecipient], open_body: Callable[[], Any],
        prefix: bytes, destination: str,
    ) -> list[AttemptResult] | tuple[str, str]:
        """The results, or (why, status) when this host could not take the message."""
        try:
            client, reused = await self._connect(plan, ip)
        except (TLSUnavailable, TLSVerificationFailed) as e:
            if self.mta_sts is not None and plan.verify and self.relay is None:
                # a CertificateProblem's value is its RFC 8460 4.3 result type
                kind = (ResultType.STARTTLS_NOT_SUPPORTED if isinstance(e, TLSUnavailable)
                        else ResultType(e.problem.value))
                self.mta_sts.report_failure(destination, plan.host.name, kind,
                                            reason=str(e), sending_ip=e.local_ip,
                                            receiving_ip=ip)
            if not plan.fallback:
                return self._not_connected(plan, ip, e)
            _log.info("{host}: {error}; MTA-STS testing: delivering without verified TLS",
                      host=plan.host.name, error=str(e))
            plan = _Plan(plan.host, TLSMode.OPPORTUNISTIC, verify=False)
            try:
                client, reused = await self._connect(plan, ip)
            except SMTPClientError as e2:
                return f"{plan.host.name}[{ip}]: {e2}", status_of_error(e2)
        except SMTPClientError as e:
            return self._not_connected(plan, ip, e)
        if not reused and plan.listed and self.mta_sts is not None:
            # RFC 8460 4.4 counts sessions: a new one that met the policy (a listed MX,
            # verified TLS); an unlisted MX in testing mode was counted as a failure
            self.mta_sts.report_success(destination)
        key = plan.key(ip)
        outcome = await self._send(client, message, recipients, open_body, prefix)
        if reused and stale(outcome):
            # The server closed the idle connection as we took it: once more, anew.
            client.abort()
            try:
                client, _ = await self._connect(plan, ip, fresh=True)
            except SMTPClientError as e:
                return self._not_connected(plan, ip, e)
            outcome = await self._send(client, message, recipients, open_body, prefix)
        if outcome is None:  # deleted meanwhile: say nothing, the next run skips it
            self.connections.put(key, client)
            return f"{message.id} was deleted", "4.0.0"
        if isinstance(outcome, SMTPClientError):  # refused before MAIL: too big, ...
            client.abort()
            state = S.FAILED if outcome.permanent else S.DEFERRED
            return [AttemptResult(r.address, state, status=status_of_error(outcome),
                                  diagnostic=f"{plan.host.name}[{ip}]: {outcome}",
                                  remote_mta=plan.host.name)
                    for r in recipients]
        self.connections.put(key, client)
        return attempt_results(outcome, recipients, plan.host.name, client)

    def _not_connected(self, plan: _Plan, ip: str, e: SMTPClientError) -> tuple[str, str]:
        """Why *plan*'s host at *ip* could not take the message, and the status.  A
        smarthost's TLS or AUTH failure is a configuration problem (ours or the
        provider's) that keeps all mail queued: a warning for the operator."""
        why = f"{plan.host.name}[{ip}]: {e}"
        if self.relay is not None and isinstance(e, AUTH_ERRORS + TLS_ERRORS):
            _log.warn("smarthost {why}: recipients deferred", why=why)
        return why, "4.7.5" if isinstance(e, TLS_ERRORS) else status_of_error(e)

    async def _send(
        self, client: SMTPClient, message: QueuedMessage,
        recipients: Sequence[QueuedRecipient], open_body: Callable[[], Any], prefix: bytes,
    ) -> SendResult | SMTPClientError | None:
        """One transaction: its result, the error that stopped it before MAIL, or None
        when the message was deleted meanwhile."""
        body = await open_body()
        if body is None:
            return None
        try:
            return await client.send(
                message.sender or "",
                [recipient_of(r) for r in recipients],
                _stream(prefix, body),
                dsn=dsn_of(message),
                size=message.size + len(prefix),
                body_type=message.body_type,
                smtputf8=message.smtputf8,
            )
        except SMTPClientError as e:
            return e
        except BaseException:
            client.abort()  # in an unknown state: never cached, never left open
            raise
        finally:
            with contextlib.suppress(Exception):
                body.close()

    async def _connect(self, plan: _Plan, ip: str, *, fresh: bool = False
                       ) -> tuple[SMTPClient, bool]:
        """A connection to *ip* as *plan* says, and whether it was reused: an idle one
        from the cache unless *fresh*."""
        client = None if fresh else self.connections.take(plan.key(ip))
        if client is not None:
            return client, True  # authenticated already, if it had to be
        endpoint = (f"tcp:{_endpoint_host(ip)}:{plan.host.port}"
                    f":timeout={self.connect_timeout:g}")
        client = await SMTPClient.connect(
            self.reactor, endpoint, helo=self.helo, tls=plan.tls,
            tls_hostname=plan.host.name, trust_root=self.trust_root,
            verify_certificate=plan.verify, timeouts=self.timeouts)
        credentials = plan.credentials
        if credentials is not None:  # once per session (RFC 4954 4), after TLS
            try:
                await client.authenticate(credentials.username, credentials.password)
            except SMTPClientError:
                quit_later(client)  # the session is sound; it is just of no use
                raise
            except BaseException:
                client.abort()
                raise
        return client, False

    async def _signature(self, message: QueuedMessage, open_body: Callable[[], Any]) -> bytes:
        """DKIM-Signature fields for the stored message: it is read whole and signed in
        the reactor's thread pool, up to the signer's size limit; b"" when it is not
        signed (why is logged)."""
        if message.size > self.signer.max_size:
            return b""
        from twisted.internet.threads import deferToThreadPool

        body = await open_body()
        if body is None:
            return b""

        def sign() -> Any:
            try:
                return self.signer.signature(body.read())
            finally:
                body.close()

        signed = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), sign)
        if signed.skipped:
            _log.info("{id}: not DKIM-signed: {why}", id=message.id, why=signed.skipped)
        return bytes(signed.fields)


def _endpoint_host(ip: str) -> str:
    return ip.replace(":", "\\:")  # IPv6 colons are escaped in endpoint strings


def _stream(prefix: bytes, body: BinaryIO, chunk: int = 64 * 1024) -> Iterator[bytes]:
    if prefix:
        yield prefix
    while True:
        data = body.read(chunk)
        if not data:
            return
        yield data
