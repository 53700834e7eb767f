"""HTTP webhook delivery: each message is POSTed to a URL (issue 15).

This module owns the webhook contract (README, "HTTP webhook delivery"):

- ``POST <url>`` with the message as the body (``Content-Type: message/rfc822``, or
  ``message/global`` for an SMTPUTF8 transaction, RFC 6532 3.7), a ``Received:`` field
  first (RFC 5321 4.4: a server that takes a message for delivery adds one), and a
  ``Content-Length``; the envelope travels in ``X-Maitred-*`` header fields;
- the answer decides the SMTP reply: 2xx accepted; 4xx refused (5xx to the sender);
  5xx, a redirect, a timeout, a refused connection or a TLS failure temporary (451 -
  the sender keeps the message: a webhook that is down never loses or bounces mail);
- a 2xx answer with a JSON body ``{"recipients": {"<address>": {"code": 550, ...}}}``
  may decide per recipient (LMTP answers each; SMTP takes the first failure).

The body is spooled while it arrives (``maitred_tx.delivery.spooled``: in memory up to
``SPOOL_MEMORY`` octets, then in an anonymous temporary file) and streamed from there
with a Content-Length, so a large
message is never held in memory.  The whole exchange (connect, TLS, upload, answer) is
bounded by ``timeout``; HTTPS certificates are verified (the platform's trust store, or
the ``trust_root`` given); redirects are never followed (a POST must not be replayed at
a place the configuration did not name).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import IO, Any, Final
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from maitred_tx.delivery.base import Delivery
from maitred_tx.delivery.spooled import SPOOL_MEMORY, ForwardingSink
from maitred_tx.envelope import Envelope
from maitred_tx.outcomes import Accepted, Outcome, PermanentFailure, TemporaryFailure

__all__ = ["SPOOL_MEMORY", "HTTPDelivery", "outcome_for_status", "recipient_outcomes"]

_log = Logger()

# Read size of the upload: one TCP send buffer's worth per cooperator step.
_READ_SIZE: Final = 64 * 1024
# The most of the webhook's answer body we read (per-recipient JSON for a few thousand
# recipients); the rest is not waited for.
MAX_RESPONSE: Final = 64 * 1024
# Idle keep-alive connections are closed after this many seconds: below Node's 5 s
# keepAliveTimeout, the shortest common server default, so that we close an idle
# connection before the server does - a POST racing a server's close fails, and would
# cost the sender a retry.
_IDLE_CONNECTION: Final = 2

# Timeout, refused connection, TLS or DNS failure, 5xx: RFC 3463 X.3.0 "other or
# undefined mail system status" with 451 "local error in processing" (RFC 5321 4.2.3),
# what Postfix answers when its own back end fails; the sender retries.
UNAVAILABLE: Final = TemporaryFailure("Webhook unavailable, try again later", 451, "4.3.0")


def outcome_for_status(status: int) -> Outcome:
    """The outcome of a webhook answer with this HTTP status code (RFC 9110 15).

    ====================  ============  ===============================================
    HTTP                  SMTP          why
    ====================  ============  ===============================================
    2xx                   250 2.0.0     stored by the webhook
    413                   552 5.3.4     "message too big for system" (RFC 3463)
    429                   451 4.7.1     a rate limit: a policy that lifts with time
    408, 425              451 4.3.0     the HTTP exchange failed, not the message
    other 4xx             554 5.6.0     the webhook refuses this message for good; 554
                                        is RFC 5321's "transaction failed" after DATA,
                                        X.6.0 "other or undefined media error"
    1xx, 3xx, 5xx         451 4.3.0     not an answer about the message (a redirect is
                                        a configuration error; it is logged)
    ====================  ============  ===============================================
    """
    if 200 <= status < 300:
        return Accepted()
    if status == 413:
        return PermanentFailure(f"Message too big for the webhook (HTTP {status})", 552, "5.3.4")
    if status == 429:
        return TemporaryFailure(f"Webhook rate limit, try again later (HTTP {status})",
                                451, "4.7.1")
    if 400 <= status < 500 and status not in (408, 425):
        return PermanentFailure(f"Message rejected by the webhook (HTTP {status})", 554, "5.6.0")
    return TemporaryFailure(f"Webhook unavailable, try again later (HTTP {status})", 451, "4.3.0")


def recipient_outcomes(envelope: Envelope, body: bytes) -> list[Outcome] | None:
    """Per-recipient outcomes from a 2xx answer's JSON body, in envelope order; None
    when the body does not hold a ``recipients`` object.

    Each entry is keyed by the address as sent in ``X-Maitred-Recipient`` and holds
    ``code`` (2xx, 4xx or 5xx), optionally ``status`` (enhanced code) and ``text``.  A
    recipient without a usable entry keeps the answer's own outcome (accepted).
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    entries = document.get("recipients") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        return None
    return [_entry_outcome(entries.get(str(r.mailbox))) for r in envelope.recipients]


def _entry_outcome(entry: Any) -> Outcome:
    if not isinstance(entry, dict) or type(entry.get("code")) is not int:
        return Accepted()
    code: int = entry["code"]
    text = _reply_text(entry.get("text"))
    status = entry.get("status")
    if 200 <= code < 300:
        return Accepted(text)
    if 400 <= code < 500:
        code = code if 450 <= code <= 459 else 451  # the codes a delivery may give
        temporary = str(status) if _status_ok(status, "4") else "4.0.0"
        return TemporaryFailure(text or "Webhook: try again later", code, temporary)
    if 500 <= code < 600:
        code = code if 550 <= code <= 559 else 550
        permanent = str(status) if _status_ok(status, "5") else "5.0.0"
        return PermanentFailure(text or "Webhook: rejected", code, permanent)
    return Accepted()


def _status_ok(status: Any, cls: str) -> bool:
    """RFC 3463 2: class.subject.detail, subject and detail 1-3 digits."""
    if not isinstance(status, str):
        return False
    parts = status.split(".")
    return (len(parts) == 3 and parts[0] == cls
            and all(p.isdigit() and 1 <= len(p) <= 3 for p in parts[1:]))


def _reply_text(text: Any) -> str | None:
    """Webhook text for an SMTP reply: printable ASCII only (no CR/LF to forge reply
    lines with), at most 200 characters."""
    if not isinstance(text, str):
        return None
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)[:200].strip()
    return clean or None


def _header_value(text: str) -> bytes:
    """Peer-supplied text (HELO name, addresses) for a header field value: UTF-8 with
    every control character replaced, so no value can end the field."""
    return "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in text).encode(
        "utf-8", "replace")


def _safe_url(url: str) -> str:
    """The URL for logs: no user information, query or fragment (tokens live there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _trust_root(value: Any) -> Any:
    """A trust root from a PEM file of CA certificates, or the given object as is."""
    if not isinstance(value, str | os.PathLike):
        return value
    with open(value, "rb") as f:
        pem = f.read()
    end = b"-----END CERTIFICATE-----"
    blocks = [b + end for b in pem.split(end) if b"-----BEGIN CERTIFICATE-----" in b]
    if not blocks:
        raise ValueError(f"{os.fspath(value)}: no PEM certificate in it")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


class HTTPDelivery(Delivery):
    """POST every accepted message to ``url`` (http: or https:); see the module
    docstring for the contract.

    ``timeout``: seconds for one whole exchange.  ``headers``: fields added to every
    request (e.g. ``{"Authorization": "Bearer ..."}``).  ``max_size``: larger messages
    are refused with 552 5.3.4 without a request (None: the listener's own limit only).
    ``trust_root``: the CA certificates for https: (a PEM file or a Twisted trust root;
    default: the platform's).  ``agent``: an ``IAgent`` to use instead of our own
    (then ``trust_root`` does not apply).  Call ``close()`` when done (idle connections).
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        timeout: float = 30.0,
        headers: Mapping[str, str | Sequence[str]] | None = None,
        max_size: int | None = None,
        agent: IAgent | None = None,
        trust_root: Any = None,
        received: bool = True,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook URL must be http://HOST/... or https://HOST/...: {url!r}")
        if timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        self.url = url.split("#", 1)[0]
        self.timeout = timeout
        self.max_size = max_size
        self.received = received
        self._reactor = reactor
        self._headers = _static_headers(headers or {})
        self._pool: HTTPConnectionPool | None = None
        if agent is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.cachedConnectionTimeout = _IDLE_CONNECTION
            policy = BrowserLikePolicyForHTTPS(trustRoot=_trust_root(trust_root))
            agent = Agent(reactor, contextFactory=policy, connectTimeout=timeout,
                          pool=self._pool)
        self._client = HTTPClient(agent)
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))

    def open_message(self, envelope: Envelope) -> _HTTPSink:
        return _HTTPSink(envelope, self)

    def close(self) -> Deferred[None]:
        """Close idle connections (an embedding service calls this when it stops)."""
        if self._pool is None:  # the caller's agent: its pool is the caller's
            return succeed(None)
        return self._pool.closeCachedConnections()

    def request_headers(self, envelope: Envelope) -> dict[bytes, list[bytes]]:
        """The header fields of the POST for ``envelope`` (ours after the static ones,
        so that configured headers cannot pose as envelope fields)."""
        s = envelope.session
        fields: dict[bytes, list[bytes]] = {k: list(v) for k, v in self._headers.items()}
        content_type = b"message/global" if envelope.params.smtputf8 else b"message/rfc822"
        ours = {
            b"Content-Type": [content_type],
            b"User-Agent": [b"maitred_tx"],
            b"X-Maitred-Message-Id": [_header_value(envelope.message_id)],
            b"X-Maitred-Sender": [_header_value(str(envelope.sender or ""))],
            b"X-Maitred-Recipient": [_header_value(str(r.mailbox)) for r in envelope.recipients],
            b"X-Maitred-Client-Address": [_header_value(s.peer_host)],
            b"X-Maitred-Helo": [_header_value(s.helo or "")],
        }
        if s.tls:
            ours[b"X-Maitred-TLS"] = [_header_value(s.tls_version or "yes")]
        if s.authenticated:
            ours[b"X-Maitred-Authenticated"] = [_header_value(s.authenticated)]
        summary = getattr(envelope.auth, "summary", None)
        if callable(summary):
            ours[b"X-Maitred-Auth"] = [_header_value(str(summary()))]
        lowered = {k.lower() for k in ours}
        fields = {k: v for k, v in fields.items() if k.lower() not in lowered}
        fields.update(ours)
        return fields

    async def post(self, envelope: Envelope, body: IO[bytes]) -> Outcome | list[Outcome]:
        """POST ``body`` (read from its current position to the end) for ``envelope``;
        the outcome of the answer.  Failures to get one raise (the sink maps them)."""
        producer = FileBodyProducer(body, cooperator=self._cooperator, readSize=_READ_SIZE)
        response = await self._client.request(
            "POST", self.url, headers=Headers(self.request_headers(envelope)), data=producer,
            allow_redirects=False, unbuffered=True, reactor=self._reactor)
        answer = await _read_bounded(response, MAX_RESPONSE)
        status = int(response.code)
        outcome = outcome_for_status(status)
        if 300 <= status < 400:
            location = response.headers.getRawHeaders(b"location", [b""])[0]
            _log.warn("webhook {url}: HTTP {status} redirect to {location} not followed",
                      url=_safe_url(self.url), status=status,
                      location=_safe_url(location.decode("latin-1")))
        if isinstance(outcome, Accepted) and _is_json(response):
            per_recipient = recipient_outcomes(envelope, answer)
            if per_recipient is not None:
                return per_recipient
        return outcome


def _static_headers(headers: Mapping[str, str | Sequence[str]]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers.items():
        values = [value] if isinstance(value, str) else list(value)
        if not name or any(c in name for c in " \t\r\n:") or not name.isascii():
            raise ValueError(f"bad header name {name!r}")
        if any(ch in v for v in values for ch in "\r\n\0"):
            raise ValueError(f"header {name}: a value holds a line break")
        out[name.encode("ascii")] = [v.encode("utf-8") for v in values]
    return out


def _is_json(response: Any) -> bool:
    types = response.headers.getRawHeaders(b"content-type", [b""])
    return bool(types[0].split(b";")[0].strip().lower() == b"application/json")


class _Bounded(Protocol):
    """Collects at most ``limit`` octets of an answer body, then stops reading."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        room = self.limit - self.size
        if room > 0:
            self.parts.append(data[:room])
            self.size += min(room, len(data))
        if len(data) >= room:
            self._stop()  # the rest is not read

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.parts))

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._stop()

    def _stop(self) -> None:
        transport: Any = self.transport  # the response's producer (stopProducing aborts)
        if transport is not None:
            transport.stopProducing()


async def _read_bounded(response: Any, limit: int) -> bytes:
    collector = _Bounded(limit)
    response.deliverBody(collector)
    return await collector.done


class _HTTPSink(ForwardingSink["Outcome | list[Outcome]"]):
    """Spools the body; at close, POSTs it and answers with the webhook's outcome."""

    def __init__(self, envelope: Envelope, owner: HTTPDelivery) -> None:
        super().__init__(envelope, received=owner.received, max_size=owner.max_size,
                         label=f"webhook {_safe_url(owner.url)}")
        self._owner = owner

    def forward(self, body: IO[bytes] | None) -> Deferred[Outcome | list[Outcome]]:
        """POST the message; fire with its outcome (never with a failure)."""
        owner = self._owner
        if body is None:
            return succeed(PermanentFailure("Message too big for the webhook", 552, "5.3.4"))
        d = Deferred.fromCoroutine(owner.post(self.envelope, body))
        d.addTimeout(owner.timeout, owner._reactor, onTimeoutCancel=self._timed_out)
        return d.addErrback(self._failed)

    def _timed_out(self, _: object, timeout: float) -> Outcome:
        """The exchange took longer than ``timeout``: it was cancelled (the connection
        closed, whatever it was doing)."""
        return self._unavailable(f"no answer within {timeout:g} s")

    def _failed(self, failure: Failure) -> Outcome:
        return self._unavailable(_describe(failure))

    def _unavailable(self, error: str) -> Outcome:
        _log.warn("webhook {url}: {message_id} not delivered: {error} -> 451 4.3.0",
                  url=_safe_url(self._owner.url), message_id=self.envelope.message_id,
                  error=error)
        return UNAVAILABLE


def _describe(failure: Failure) -> str:
    """A short reason for the log: the exception class and message, the first reason
    of a ResponseFailed / ResponseNeverReceived wrapper."""
    error = failure.value
    reasons = getattr(error, "reasons", None)
    if reasons:
        inner = reasons[0]
        error = inner.value if isinstance(inner, Failure) else inner
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text
