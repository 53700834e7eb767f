"""Fetching an MTA-STS policy over HTTPS with treq (RFC 8461 3.3).

``https://mta-sts.<domain>/.well-known/mta-sts.txt``, and only that: the certificate
must chain to a trusted root, be current and name ``mta-sts.<domain>`` (SNI sent, RFC
6125 checks by service_identity through Twisted's ``BrowserLikePolicyForHTTPS``); only a
200 counts and redirects are not followed; the media type must be ``text/plain``
(parameters allowed); the body is streamed and the connection dropped past
``max_size`` octets; everything (connect, TLS, headers, body) has one deadline.  No HTTP
cache, no cookies kept, no content coding (``Accept-Encoding`` is not sent and a coded
answer is refused, so a compressed bomb is never inflated).

Every failure is a :class:`FetchError` carrying the RFC 8460 result type a TLS report
would use.  The reactor is a parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from maitred_tx.mta_sts.policy import MAX_POLICY_SIZE, Policy, StsError, parse_policy
from maitred_tx.mta_sts.report import ResultType

__all__ = ["DEFAULT_TIMEOUT", "FetchError", "PolicyFetcher", "policy_url"]

# RFC 8461 3.3 asks senders to time out the fetch and suggests a minute; that is the
# default for the whole fetch, of which the TCP connect alone gets a third.
DEFAULT_TIMEOUT: Final = 60.0
USER_AGENT: Final = b"maitred_tx MTA-STS"
ConnectTo = Callable[[str, int], tuple[str, int]]


class FetchError(Exception):
    """No policy could be had from the HTTPS server of ``domain``."""

    def __init__(self, domain: str, reason: str, result_type: ResultType) -> None:
        super().__init__(f"MTA-STS policy of {domain}: {reason}")
        self.domain = domain
        self.reason = reason
        self.result_type = result_type


def policy_url(domain: str) -> str:
    """The policy's URL (3.3) for an A-label ``domain``."""
    return f"https://mta-sts.{domain}/.well-known/mta-sts.txt"


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """TLS over TCP to the URL's host, or to the address ``connect_to`` maps it to;
    the TLS name (SNI, verification) is always the URL's host."""

    def __init__(
        self, reactor: Any, tls: Any, connect_to: ConnectTo | None, timeout: float
    ) -> None:
        self._reactor = reactor
        self._tls = tls
        self._connect_to = connect_to
        self._timeout = timeout

    def endpointForURI(self, uri: web_client.URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise web_client.SchemeNotSupported(f"only https: {uri.scheme!r}")
        host, port = uri.host.decode("ascii"), uri.port
        if self._connect_to is not None:
            host, port = self._connect_to(host, port)
        tcp = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), tcp)


@implementer(IAgent)
class _IdentityOnly:
    """Innermost agent under treq's: withdraws the ``Accept-Encoding: gzip`` treq adds
    and refuses any content-coded answer before treq's decoder could inflate it."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        headers = headers.copy() if headers is not None else Headers()
        headers.removeHeader(b"accept-encoding")
        d = self._agent.request(method, uri, headers, bodyProducer)
        return d.addCallback(self._check)

    @staticmethod
    def _check(response: IResponse) -> IResponse:
        codings = b",".join(response.headers.getRawHeaders(b"content-encoding") or [])
        if any(c.strip().lower() not in (b"", b"identity") for c in codings.split(b",")):
            _drop(response)
            raise _Refused(f"content-coded answer ({codings.decode('latin-1')[:40]})")
        return response


class _Refused(Exception):
    """An answer we will not read."""


class _BoundedBody(Protocol):
    """Collects a response body of at most ``limit`` octets; past it, drops the
    connection.  ``finished`` fires with the body; cancelling it drops the connection."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._chunks: list[bytes] = []
        self.finished: defer.Deferred[bytes] = defer.Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._abort()
            self.finished.errback(_Refused(f"body larger than {self._limit} octets"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(web_client.ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(_Refused(f"body cut short ({reason.getErrorMessage()})"))


class _Discard(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


def _drop(response: IResponse) -> None:
    """Close the connection of an answer we will not read (else its body would be
    buffered by twisted.web until the server stops sending)."""
    response.deliverBody(_Discard())


class PolicyFetcher:
    """Fetches and parses policies.

    ``trust_root``: the CAs to trust (an ``IOpenSSLTrustRoot``), the platform's when
    None.  ``timeout``: seconds for the whole fetch.  ``max_size``: octets of body
    accepted.  ``connect_to(host, port) -> (address, port)``: where to connect for a
    URL's host (tests, or a proxy-less egress address); SNI and certificate checks
    still use the host name."""

    def __init__(
        self,
        reactor: Any,
        *,
        trust_root: Any = None,  # an IOpenSSLTrustRoot (not exported by twisted.internet.ssl)
        timeout: float = DEFAULT_TIMEOUT,
        max_size: int = MAX_POLICY_SIZE,
        connect_to: ConnectTo | None = None,
    ) -> None:
        if timeout <= 0 or max_size <= 0:
            raise ValueError("timeout and max_size must be positive")
        self._reactor = reactor
        self._timeout = timeout
        self._max_size = max_size
        tls = web_client.BrowserLikePolicyForHTTPS(trustRoot=trust_root)
        endpoints = _Endpoints(reactor, tls, connect_to, timeout / 3)
        pool = web_client.HTTPConnectionPool(reactor, persistent=False)
        self._agent = _IdentityOnly(
            web_client.Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        )

    async def fetch(self, domain: str) -> Policy:
        """The policy of ``domain`` (lower-case A-labels), or FetchError."""
        d = defer.Deferred.fromCoroutine(self._get(domain))
        timer = self._reactor.callLater(self._timeout, d.cancel)
        try:
            body = await d
        except _Refused as exc:
            raise FetchError(domain, str(exc), ResultType.STS_POLICY_FETCH_ERROR) from None
        except Exception as exc:  # connection, TLS and HTTP errors of all kinds
            if not timer.active():  # cancelled by the timer, wherever it was
                reason = f"no answer within {self._timeout:g} s"
                raise FetchError(domain, reason, ResultType.STS_POLICY_FETCH_ERROR) from None
            raise _classify(domain, exc) from None
        finally:
            if timer.active():
                timer.cancel()
        try:
            return parse_policy(body)
        except StsError as exc:
            raise FetchError(domain, str(exc), ResultType.STS_POLICY_INVALID) from None

    async def _get(self, domain: str) -> bytes:
        client = HTTPClient(self._agent)  # a fresh cookie jar each time: none kept
        response = await client.get(
            policy_url(domain),
            headers=Headers({b"User-Agent": [USER_AGENT]}),
            allow_redirects=False,  # 3.3: "HTTP 3xx redirects MUST NOT be followed"
            unbuffered=True,
        )
        if response.code != 200:  # 3.3: a policy is only valid with a 200 (OK)
            _drop(response)
            where = response.headers.getRawHeaders(b"location") or []
            to = f" to {where[0].decode('latin-1')[:100]}" if where else ""
            raise _Refused(f"HTTP status {response.code}{to} (only 200 is accepted)")
        _check_media_type(response)
        if response.length is not web_client.UNKNOWN_LENGTH and response.length > self._max_size:
            _drop(response)
            raise _Refused(f"body of {response.length} octets exceeds {self._max_size}")
        body = _BoundedBody(self._max_size)
        response.deliverBody(body)
        return await body.finished


def _check_media_type(response: IResponse) -> None:
    """3.3: the media type must be text/plain; parameters such as charset are fine."""
    values = response.headers.getRawHeaders(b"content-type") or []
    media = values[0].split(b";")[0].strip().lower() if len(values) == 1 else None
    if media != b"text/plain":
        _drop(response)
        shown = b", ".join(values).decode("latin-1")[:100] or "none"
        raise _Refused(f"Content-Type {shown} is not text/plain")


def _reasons(exc: BaseException) -> list[BaseException]:
    """The exception and the ones twisted.web wraps in it."""
    found = [exc]
    for failure in getattr(exc, "reasons", None) or []:
        if isinstance(failure, Failure) and failure.value is not None:
            found.extend(_reasons(failure.value))
    return found


def _classify(domain: str, exc: BaseException) -> FetchError:
    reasons = _reasons(exc)
    # 3.3: the certificate must chain to a trusted root, be current and be valid for
    # mta-sts.<domain>
    if any(isinstance(r, VerificationError) for r in reasons):
        reason = f"the certificate is not valid for the name mta-sts.{domain}"
        return FetchError(domain, reason, ResultType.STS_WEBPKI_INVALID)
    tls = [r for r in reasons if isinstance(r, SSL.Error)]
    if tls:
        return FetchError(domain, f"TLS: {_describe(tls[0])}", ResultType.STS_WEBPKI_INVALID)
    return FetchError(domain, _describe(reasons[-1]), ResultType.STS_POLICY_FETCH_ERROR)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
