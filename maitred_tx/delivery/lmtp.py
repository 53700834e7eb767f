"""LMTP forwarding delivery: every accepted message goes on to an LMTP server such as
Dovecot's ``dovecot-lmtpd`` (issue 15).  The contract (README, "LMTP delivery"):

- the body is spooled while it arrives (``maitred_tx.delivery.spooled``: in memory up
  to ``SPOOL_MEMORY`` octets, then in an anonymous temporary file) with a ``Received:``
  field first (RFC 5321 4.4), and at ``close()`` streamed to the LMTP server by
  :mod:`maitred_tx.client` (LHLO, PIPELINING and CHUNKING when offered,
  back-pressure: bounded memory for any size);
- one outcome per recipient, in envelope order: the LMTP server's reply for it after
  the body (RFC 2033 4.2), or its refusal of the RCPT, with its code and enhanced
  status code, so a Dovecot "550 5.1.1" reaches our own client as 550 5.1.1.  The
  server's text is passed through, sanitized (see :func:`outcome_for_reply`);
- no answer is never a bounce: no connection, a refused greeting or LHLO is 451 4.4.1,
  a lost connection or a timeout 451 4.4.2 (RFC 3463 X.4.1 "no answer from host",
  X.4.2 "bad connection", as Postfix's lmtp client reports them) - the sender keeps
  the message and retries;
- connections are reused: a finished connection waits ``idle_timeout`` seconds for the
  next message (the client sends RSET when the last transaction needs it); one that
  the server closed meanwhile is retried once on a new connection, since nothing of
  the message reached the server (no MAIL reply was read);
- optionally (``verify_recipients``) every RCPT is first checked with the LMTP server,
  as Postfix's ``reject_unverified_recipient`` does: MAIL FROM:<>, RCPT, RSET.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any, Final

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger

from maitred_tx.client import (
    DSN,
    ConnectionLost,
    ExtensionUnsupported,
    InvalidAddress,
    InvalidBody,
    MessageTooBig,
    Recipient,
    ResponseTimeout,
    SendResult,
    ServerReply,
    SMTPClient,
    SMTPClientError,
    Timeouts,
    TLSMode,
)
from maitred_tx.client.body import BodyScanner, ContentScan
from maitred_tx.client.timeouts import Phase
from maitred_tx.delivery.base import Delivery
from maitred_tx.delivery.spooled import SPOOL_MEMORY, ForwardingSink, summary
from maitred_tx.envelope import Envelope, SessionContext
from maitred_tx.outcomes import Accepted, Outcome, PermanentFailure, TemporaryFailure
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.params import MailParams, RcptParams

__all__ = [
    "DEFAULT_TIMEOUTS", "IDLE_TIMEOUT", "LOCAL_ERROR", "LOST", "MAX_CONNECTIONS", "MAX_TEXT",
    "NO_ANSWER", "SPOOL_MEMORY", "UNAVAILABLE", "LMTPDelivery", "outcome_for_error",
    "outcome_for_reply",
]

_log = Logger()

# Postfix's lmtp_destination_concurrency_limit (default_destination_concurrency_limit
# = 20); each connection is one dovecot-lmtp process (service lmtp client_limit = 1).
MAX_CONNECTIONS: Final = 20
# Postfix's lmtp_connection_cache_time_limit = 2s: long enough for a burst of messages
# to share a connection, short enough not to hold an LMTP process per idle client.
IDLE_TIMEOUT: Final = 2.0
# The client's RFC 5321 4.5.3.2 defaults are minutes, for remote MTAs.  A local LMTP
# server that does not greet or answer a command within these is down, and the sender
# waiting for our reply after its body gives up after 10 minutes (RFC 5321 4.5.3.2.6):
# the LMTP server's own delivery (quota, Sieve) gets half of that.
DEFAULT_TIMEOUTS: Final = Timeouts(
    greeting=30.0, hello=30.0, mail=60.0, rcpt=60.0, data_init=60.0, data_block=60.0,
    data_done=300.0, command=30.0, quit=10.0)
# RFC 5321 4.5.3.1.5: a reply line is 512 octets with its code, enhanced code and CRLF;
# 400 characters of passed-through text leave room for those.
MAX_TEXT: Final = 400
_READ_SIZE: Final = 64 * 1024  # the client's chunk: one TCP window's order of size

UNAVAILABLE: Final = TemporaryFailure("LMTP server unavailable, try again later", 451, "4.4.1")
LOST: Final = TemporaryFailure("Connection to the LMTP server lost, try again later",
                               451, "4.4.2")
# RFC 5321 4.2.3 "local error in processing", RFC 3463 X.3.0: a bug of ours.
LOCAL_ERROR: Final = TemporaryFailure("Local error in processing, try again later",
                                      451, "4.3.0")
NO_ANSWER: Final = TemporaryFailure("No answer from the LMTP server, try again later",
                                    451, "4.4.2")


def outcome_for_reply(reply: ServerReply | None, error: SMTPClientError | None = None
                      ) -> Outcome:
    """The outcome for one recipient from the LMTP server's reply that decided it
    (None: the connection ended first; *error* says how).

    2xx is accepted with our own text (the sender's reference is our queue id; the
    server's is logged).  4xx and 5xx keep the server's code and enhanced status code
    where an outcome may carry them (450-459, 550-559; others become 451 / 550, the
    class kept), and its text: it is what the sender needs to read ("User doesn't
    exist", "Quota exceeded"), as Postfix passes a before-queue proxy's replies on.
    The text is cut to printable ASCII - no CR or LF can forge a reply line - and to
    ``MAX_TEXT`` characters.
    """
    if reply is None:
        return NO_ANSWER if isinstance(error, ResponseTimeout) else LOST
    if reply.is_positive:
        return Accepted()
    text = _reply_text(reply.lines)
    if reply.is_permanent:
        code = reply.code if 550 <= reply.code <= 559 else 550
        status = reply.status if reply.status and reply.status[0] == "5" else "5.0.0"
        return PermanentFailure(text or "Refused by the LMTP server", code, status)
    code = reply.code if 450 <= reply.code <= 459 else 451  # 421 closes: not ours to say
    status = reply.status if reply.status and reply.status[0] == "4" else "4.0.0"
    return TemporaryFailure(text or "LMTP server: try again later", code, status)


def _reply_text(lines: Sequence[str]) -> str:
    joined = " ".join(line.strip() for line in lines if line.strip())
    return "".join(c if " " <= c <= "~" else "?" for c in joined)[:MAX_TEXT].strip()


def outcome_for_error(error: SMTPClientError) -> Outcome:
    """The outcome of a message the client would not send, or could not."""
    if isinstance(error, MessageTooBig):  # RFC 1870 6.3; RFC 3463 X.3.4
        return PermanentFailure("Message too big for the LMTP server", 552, "5.3.4")
    if isinstance(error, ExtensionUnsupported):
        if error.extension == "SMTPUTF8":  # RFC 6531 3.7.4.1
            return PermanentFailure("The LMTP server does not take SMTPUTF8 addresses",
                                    553, "5.6.7")
        # RFC 3463 X.6.3 "conversion required but not supported": a binary body for
        # a server without BINARYMIME, as Postfix bounces 8-bit content it may not send.
        return PermanentFailure(f"The LMTP server does not support {error.extension}, "
                                "which this message needs", 554, "5.6.3")
    if isinstance(error, InvalidBody):
        return PermanentFailure("Message content cannot be sent to the LMTP server",
                                554, "5.6.0")
    if isinstance(error, InvalidAddress):
        return PermanentFailure("Address not accepted by the LMTP client", 553, "5.1.3")
    return NO_ANSWER if isinstance(error, ResponseTimeout) else LOST


class _Pool:
    """Open LMTP connections: at most ``size`` (busy, idle or being opened); an idle
    one is closed after ``idle`` seconds; callers beyond ``size`` wait in turn."""

    def __init__(self, reactor: Any, connect: Callable[[], Awaitable[SMTPClient]],
                 size: int, idle: float) -> None:
        self._reactor = reactor
        self._connect = connect
        self.size = size
        self.idle = idle
        self.made = 0  # connections opened so far
        self._live: set[SMTPClient] = set()
        self._connecting = 0
        self._idle: list[tuple[SMTPClient, IDelayedCall]] = []
        self._waiting: deque[Deferred[None]] = deque()
        self._quitting: set[Deferred[Any]] = set()
        self._closed = False

    async def acquire(self) -> tuple[SMTPClient, bool]:
        """A connection for one caller alone, and whether it was used before."""
        woken = False
        while True:
            while self._idle:
                client, timer = self._idle.pop()  # the most recent: the least stale
                if timer.active():
                    timer.cancel()
                if client.connected:
                    return client, True
                self._quit(client)  # the server said 421 while it was idle
            if len(self._live) + self._connecting < self.size:
                return await self._open(), False
            waiter: Deferred[None] = Deferred()
            if woken:  # woken for nothing (a slot not free yet): keep the turn
                self._waiting.appendleft(waiter)
            else:
                self._waiting.append(waiter)
            await waiter
            woken = True

    async def _open(self) -> SMTPClient:
        self._connecting += 1
        try:
            client = await self._connect()
            if not client.connected:  # lost between the LHLO reply and now
                raise ConnectionLost("the LMTP server closed the connection at once",
                                     permanent=False)
        except BaseException:
            # The slot is free before the next waiter is woken: it resumes at once
            # (inside _wake) and must find it free, or it waits again with nobody left
            # to wake it.
            self._connecting -= 1
            self._wake()  # the next waiter may try its own
            raise
        self._connecting -= 1
        self.made += 1
        self._live.add(client)
        client.protocol.closed.addBoth(self._gone, client)
        return client

    def release(self, client: SMTPClient, reusable: bool) -> None:
        """*client* is free again: kept for the next caller, or closed."""
        if self._closed or not reusable or not client.connected:
            self._quit(client)
        else:
            timer = self._reactor.callLater(self.idle, self._expire, client)
            self._idle.append((client, timer))
        self._wake()

    def close(self) -> Deferred[Any]:
        """Close the idle connections now and the busy ones when they are released."""
        self._closed = True
        for client, timer in self._idle:
            if timer.active():
                timer.cancel()
            self._quit(client)
        self._idle.clear()
        return DeferredList(list(self._quitting))

    def _expire(self, client: SMTPClient) -> None:
        self._idle = [(c, t) for c, t in self._idle if c is not client]
        self._quit(client)

    def _quit(self, client: SMTPClient) -> None:
        if not client.connected:
            client.abort()  # already closing or gone: make sure of it
            return
        quitting = Deferred.fromCoroutine(client.quit())
        self._quitting.add(quitting)
        quitting.addBoth(lambda _: self._quitting.discard(quitting))

    def _gone(self, result: Any, client: SMTPClient) -> Any:
        self._live.discard(client)
        for entry in [e for e in self._idle if e[0] is client]:
            self._idle.remove(entry)
            if entry[1].active():
                entry[1].cancel()
        self._wake()
        return result

    def _wake(self) -> None:
        if self._waiting:
            self._waiting.popleft().callback(None)


class LMTPDelivery(Delivery):
    """Forward every accepted message to the LMTP server at *endpoint* (a Twisted
    client endpoint string such as ``unix:/run/dovecot/lmtp`` or ``tcp:127.0.0.1:24``,
    or an ``IStreamClientEndpoint``); see the module docstring for the contract.

    ``lhlo``: our name in LHLO (default: the client's, an address literal).
    ``timeouts``: per-phase reply timeouts (default ``DEFAULT_TIMEOUTS``); the connect
    timeout is the endpoint's (``timeout=`` in the string, 30 s by default).
    ``max_connections``: concurrent connections to the server; more messages wait.
    ``idle_timeout``: seconds an unused connection stays open.  ``verify_recipients``:
    check each RCPT with the server first (one round trip per recipient).
    ``received``: add our ``Received:`` field.  Call ``close()`` when done.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: str | IStreamClientEndpoint,
        *,
        lhlo: str | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        verify_recipients: bool = False,
        received: bool = True,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if idle_timeout < 0:
            raise ValueError("idle_timeout must not be negative")
        if isinstance(endpoint, str):
            if endpoint.split(":", 1)[0].lower() in ("tls", "ssl"):
                raise ValueError("LMTP over TLS is not supported: use unix: or tcp:")
            try:  # a bad description fails here, not at the first message
                clientFromString(reactor, endpoint)
            except (ValueError, TypeError) as e:
                raise ValueError(f"bad LMTP endpoint {endpoint!r}: {e}") from None
        self.endpoint = endpoint
        self.lhlo = lhlo
        self.timeouts = timeouts or DEFAULT_TIMEOUTS
        self.verify_recipients = verify_recipients
        self.received = received
        self._reactor = reactor
        self._where = endpoint if isinstance(endpoint, str) else repr(endpoint)
        self._pool = _Pool(reactor, self._connect, max_connections, idle_timeout)

    @property
    def connections_made(self) -> int:
        """How many connections were opened so far (reuse shows as fewer)."""
        return self._pool.made

    def open_message(self, envelope: Envelope) -> _LMTPSink:
        return _LMTPSink(envelope, self)

    def close(self) -> Deferred[Any]:
        """QUIT the idle connections (an embedding service calls this when it stops);
        busy ones are closed as their messages finish."""
        return self._pool.close()

    async def _connect(self) -> SMTPClient:
        return await SMTPClient.connect(
            self._reactor, self.endpoint, lmtp=True, tls=TLSMode.NONE, helo=self.lhlo,
            timeouts=self.timeouts)

    # --- RCPT-time verification ---------------------------------------------------------
    def rcpt_to(self, context: SessionContext, envelope: Envelope, recipient: Mailbox,
                params: RcptParams) -> Any:
        """With ``verify_recipients``: a Deferred of :meth:`verify`; else None."""
        if not self.verify_recipients:
            return None
        return Deferred.fromCoroutine(self.verify(recipient))

    async def verify(self, recipient: Mailbox) -> Outcome | None:
        """None if the LMTP server takes *recipient* in RCPT, else its refusal; 451
        4.4.x when it cannot be asked.  A recipient whose address is not ASCII is not
        probed (the message's own RCPT decides)."""
        address = str(recipient)
        if not address.isascii():
            return None
        for attempt in (1, 2):
            try:
                client, reused = await self._pool.acquire()
            except SMTPClientError as e:
                return self._unavailable(f"verify <{address}>", e)
            probe = _Probe(address, client)
            try:
                await client.protocol.run(probe)
            except SMTPClientError as e:
                self._pool.release(client, False)
                if reused and attempt == 1 and isinstance(e, ConnectionLost) and not probe.replies:
                    continue  # closed while idle: try a new connection once
                return self._unavailable(f"verify <{address}>", e)
            except BaseException:  # a bug: the slot must not be lost with it
                self._pool.release(client, False)
                raise
            self._pool.release(client, client.connected)
            return probe.outcome()
        raise AssertionError("unreachable")  # pragma: no cover

    # --- forwarding ---------------------------------------------------------------------
    async def forward(self, envelope: Envelope, body: IO[bytes], size: int,
                      scan: ContentScan) -> list[Outcome]:
        """Send *body* (*size* octets, its ``ContentScan``) for *envelope*; one outcome
        per recipient.  Never raises for the server's sake."""
        count = len(envelope.recipients)
        for attempt in (1, 2):
            try:
                client, reused = await self._pool.acquire()
            except SMTPClientError as e:
                return [self._unavailable(envelope.message_id, e)] * count
            body.seek(0)
            try:
                result = await self._send(client, envelope, body, size, scan)
            except SMTPClientError as e:
                self._pool.release(client, client.connected)
                if reused and attempt == 1 and isinstance(e, ConnectionLost):
                    self._retrying(envelope, e)
                    continue
                return [self._refused(envelope, e)] * count
            except BaseException:
                self._pool.release(client, False)
                raise
            self._pool.release(client, result.error is None)
            if reused and attempt == 1 and _stale(result):
                self._retrying(envelope, result.error)
                continue
            return [outcome_for_reply(r.reply, result.error) for r in result.recipients]
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, client: SMTPClient, envelope: Envelope, body: IO[bytes],
                    size: int, scan: ContentScan) -> SendResult:
        params = envelope.params
        return await client.send(
            "" if envelope.sender is None else str(envelope.sender),
            _recipients(envelope), _Reader(body), size=size, body_type=scan.needs,
            dsn=_dsn(params), smtputf8=params.smtputf8 and client.extensions.smtputf8)

    def _retrying(self, envelope: Envelope, error: SMTPClientError | None) -> None:
        _log.info("lmtp {endpoint}: {message_id}: reused connection was closed ({error});"
                  " retrying on a new connection", endpoint=self._where,
                  message_id=envelope.message_id, error=str(error))

    def _unavailable(self, what: str, error: SMTPClientError) -> Outcome:
        outcome = NO_ANSWER if isinstance(error, ResponseTimeout) else UNAVAILABLE
        _log.warn("lmtp {endpoint}: {what} not done: {error} -> {code} {status}",
                  endpoint=self._where, what=what, error=str(error), code=outcome.code,
                  status=outcome.status)
        return outcome

    def _refused(self, envelope: Envelope, error: SMTPClientError) -> Outcome:
        outcome = outcome_for_error(error)
        _log.warn("lmtp {endpoint}: {message_id} not delivered: {error} -> {outcome}",
                  endpoint=self._where, message_id=envelope.message_id, error=str(error),
                  outcome=summary(outcome))
        return outcome


def _stale(result: SendResult) -> bool:
    """The connection was gone before the server read any of the transaction."""
    return result.mail_reply is None and isinstance(result.error, ConnectionLost)


def _recipients(envelope: Envelope) -> list[str | Recipient]:
    """The recipients with their DSN parameters (RFC 3461 4.1, 4.2), which the client
    sends when the server offers DSN and drops otherwise."""
    out: list[str | Recipient] = []
    for r in envelope.recipients:
        address, params = str(r.mailbox), r.params
        orcpt = params.orcpt[1] if params.orcpt and params.orcpt[0] in ("rfc822", "utf-8") \
            else None
        if params.notify is None and orcpt is None:
            out.append(address)
            continue
        try:
            out.append(Recipient(address, notify=params.notify, orcpt=orcpt))
        except ValueError:  # parameters the client would not send: the address alone
            out.append(address)
    return out


def _dsn(params: MailParams) -> DSN | None:
    if params.ret is None and params.envid is None:
        return None
    try:
        return DSN(ret=params.ret, envid=params.envid)
    except ValueError:  # an ENVID the client cannot send: RET alone
        return DSN(ret=params.ret) if params.ret is not None else None


class _Reader:
    """The spool as the client reads it: ``read()`` alone, so that the client does not
    ask for a file descriptor (a SpooledTemporaryFile would move to disk for it)."""

    __slots__ = ("_file",)

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def read(self, size: int = _READ_SIZE, /) -> bytes:
        return self._file.read(size)


class _Probe:
    """An address verification probe as a client operation: MAIL FROM:<>, RCPT TO,
    RSET (RSET first too if the last transaction left the server mid-way), pipelined
    when the server offers PIPELINING.  ``replies`` are those read so far."""

    phase: Phase | None = Phase.RCPT

    def __init__(self, address: str, client: SMTPClient) -> None:
        lines = [b"RSET\r\n"] if client.session.needs_rset else []
        self._mail = len(lines)
        lines += [b"MAIL FROM:<>\r\n", f"RCPT TO:<{address}>\r\n".encode("ascii"),
                  b"RSET\r\n"]
        self._lines = lines
        self._pipelined = client.extensions.pipelining
        self._sent = 0
        self.replies: list[ServerReply] = []
        self.done = False

    def start(self) -> bytes:
        return self._next()

    def on_reply(self, reply: ServerReply) -> bytes:
        self.replies.append(reply)
        if reply.code == 421:  # RFC 5321 3.8: closing; the glue closes too
            raise ConnectionLost(f"the LMTP server is closing: {reply}", reply=reply,
                                 permanent=False)
        if len(self.replies) == len(self._lines):
            self.done = True
            return b""
        return b"" if self._pipelined else self._next()

    def _next(self) -> bytes:
        if self._pipelined:
            self._sent = len(self._lines)
            return b"".join(self._lines)
        self._sent += 1
        return self._lines[self._sent - 1]

    def outcome(self) -> Outcome | None:
        """None: accepted, or the server would not take MAIL FROM:<> (then it cannot
        be asked, and the message's own transaction decides)."""
        mail, rcpt = self.replies[self._mail], self.replies[self._mail + 1]
        if not mail.is_positive or rcpt.is_positive:
            return None
        return outcome_for_reply(rcpt)


class _LMTPSink(ForwardingSink[list[Outcome]]):
    """Spools the body (and scans it: what BODY= it needs); forwards it at close."""

    def __init__(self, envelope: Envelope, owner: LMTPDelivery) -> None:
        self._scanner = BodyScanner()
        self._owner = owner
        super().__init__(envelope, received=owner.received, label=f"lmtp {owner._where}")

    def write(self, data: bytes) -> None:
        super().write(data)
        self._scanner.feed(data)

    def forward(self, body: IO[bytes] | None) -> Deferred[list[Outcome]]:
        """Forward the message; fire with one outcome per recipient (never a failure:
        a bug of ours is logged and answered 451 4.3.0)."""
        assert body is not None  # no max_size: the body is always kept
        d = Deferred.fromCoroutine(self._owner.forward(
            self.envelope, body, self.size, self._scanner.finish()))
        return d.addErrback(self._failed)

    def _failed(self, failure: Any) -> list[Outcome]:
        _log.failure("lmtp: forwarding {message_id} failed", failure,
                     message_id=self.envelope.message_id)
        return [LOCAL_ERROR] * len(self.envelope.recipients)
