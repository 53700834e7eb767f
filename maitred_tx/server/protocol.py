"""The Twisted protocol: bytes from the transport into the pure session, events out to
the Policy, replies back in one write per batch.

Reading is paused while any decision or a slow sink is pending, so pipelined commands
are answered strictly in order and a slow delivery pushes back on the sender instead
of filling memory.  Bodies are never split into lines here (nor in the core).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from maitred_tx.delivery.compat import delivery_provider
from maitred_tx.envelope import SessionContext
from maitred_tx.interfaces import IDelivery
from maitred_tx.server import authn
from maitred_tx.server.calls import is_deferred
from maitred_tx.server.policy import FailedSink, Policy, new_id, smtp_reply
from maitred_tx.server.submission import FromGuard
from maitred_tx.server.tls import tls_facts
from maitred_tx.smtp import replies as R
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.commands import Helo, RcptTo
from maitred_tx.smtp.config import Config
from maitred_tx.smtp.events import (
    NEED_DATA,
    PAUSED,
    AuthRequested,
    CloseConnection,
    Event,
    HelloReceived,
    MailReceived,
    MessageAborted,
    MessageComplete,
    MessageData,
    MessageStarted,
    RcptReceived,
    Refused,
    SessionInfo,
    StartTlsRequested,
    Transaction,
    XClientReceived,
)
from maitred_tx.smtp.proxy import ProxyError, ProxyHeader, parse_proxy_header
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.session import ServerSession

if TYPE_CHECKING:
    from maitred_tx.server.factory import SMTPFactory

__all__ = ["SUMMARY_FORMAT", "SMTPServerProtocol"]

_log = Logger()
_READ_SIZE = 256 * 1024
# The first bytes of a PROXY header: v1 text, or the v2 binary signature.
_PROXY_V1 = b"PROXY "
_PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
# Failed AUTH answers wait longer each time (seconds), to slow down password guessing.
_AUTH_DELAYS = (1.0, 2.0, 4.0, 8.0)
# The transport _write may send on directly: the accepted plain TCP connection, whose
# write() and buffers are Twisted's own (a subclass could change either).
_TCP_SERVER = tcp.Server
# The log_format of the per-message and end-of-session events: their text is one field,
# built only when an observer formats the event (maitred_tx.textlog calls it directly).
SUMMARY_FORMAT = "{summary()}"


class SMTPServerProtocol(Protocol):
    """One SMTP/LMTP connection.  Built by SMTPFactory; not meant to be subclassed."""

    factory: SMTPFactory

    def __init__(self, config: Config, delivery: Any, clock: IReactorTime) -> None:
        self.config = config
        self._delivery = delivery
        self._clock = clock
        self.session: ServerSession | None = None
        self.policy: Policy | None = None
        self._waiting = 0  # decisions or sink writes in flight: reading is paused
        self._reading_paused = False
        self._driving = False
        self._sink: Any = None
        self._message_id = ""
        self._txn: Transaction | None = None  # the transaction whose body is open
        self._message_started = 0.0
        # One timer per connection for both the idle timeout and the session deadline;
        # see _arm_idle.
        self._timer: IDelayedCall | None = None
        self._active_at = 0.0  # the peer's last read
        self._deadline_at = 0.0
        self._started = 0.0
        self.messages = 0
        self._client = ""  # the real client address, for the per-client limits
        self._counted = False  # counted in the limiter: uncount when the connection ends
        self._proxy_buf: bytes | None = None  # a trusted proxy's PROXY header, arriving
        self._login: authn.Login | None = None

    # --- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)  # replies are small and awaited: no Nagle delay
        if hasattr(transport, "bufferSize"):
            # Bigger reads mean fewer trips through the loop for bodies; Python allocates
            # the buffer per read and trims it, so idle connections do not pay for it.
            transport.bufferSize = _READ_SIZE
        peer, host = transport.getPeer(), transport.getHost()
        self._started = time.monotonic()
        implicit_tls = ISSLTransport.providedBy(transport)
        lmtp = self.config.lmtp
        context = SessionContext(
            session_id=new_id(),
            hostname=self.config.hostname,
            peer_host=_host(peer),
            peer_port=getattr(peer, "port", 0),
            local_host=_host(host),
            local_port=getattr(host, "port", 0),
            lmtp=lmtp,
            tls=implicit_tls,
        )
        trusted = self.factory.is_trusted_proxy(context.peer_host)
        self.policy = Policy(self._delivery, context)
        self._unauthenticated = self.policy.delivery  # what serves the session before AUTH
        info = SessionInfo(lmtp=lmtp, tls=implicit_tls, trusted=trusted)
        self.session = ServerSession(self.config, info=info)
        if trusted and self.config.proxy_protocol:
            self._proxy_buf = b""  # the first bytes must be a PROXY header (v1 or v2)
        else:
            self._admit(context.peer_host, at_connect=True)
        if self.factory.portal is not None:
            d = authn.anonymous_login(self.factory.portal)
            d.addCallback(self._anonymous_avatar)
        self._deadline_at = self._clock.seconds() + self.config.limits.session_deadline
        self._arm_idle()
        self._drive()

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is None or session.closing:
            return
        if self._proxy_buf is not None:
            data = self._proxy_header(data)
            if not data:
                return
        # The peer was active: the idle timeout counts from now.  Only the time is
        # noted; the timer moves where the timeout can get shorter, see _arm_idle.
        self._active_at = self._clock.seconds()
        session.receive_data(data)
        self._drive()

    def connectionLost(self, reason: Failure | None = None) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.session is not None:
            self.session.connection_lost()
            self._drain_events()
        if self.policy is not None:
            ctx = self.policy.context
            duration = time.monotonic() - self._started
            errors = self.session.errors if self.session else 0
            _emit_info({  # as the per-message event: one lazily built text field
                "summary": partial(_session_summary, ctx.peer_host, ctx.session_id,
                                   duration, self.messages, errors),
                "peer": ctx.peer_host,
                "session_id": ctx.session_id,
                "duration": duration,
                "messages": self.messages,
                "errors": errors,
                "helo": ctx.helo,
            })
        if self._counted:
            self.factory.limiter.connection_closed(self._client)
        if self._login is not None:
            self._login.logout()
        self.factory.forget(self)

    # --- who the client is: limits, PROXY headers, anonymous avatar ----------------------

    def _admit(self, client: str, at_connect: bool = False) -> None:
        """Count the session against *client*'s limits; over them: 421 4.7.0."""
        self._client, self._counted = client, True
        limiter, session = self.factory.limiter, self.session
        assert session is not None
        refused = limiter.admit(client)
        if refused is not None:
            _log.info("{peer} refused: {limit} limit", peer=client, limit=refused)
            if at_connect:
                # The 421 replaces the greeting, not follows it (RFC 5321 3.1, as
                # Postfix answers): drop the 220 the session has queued but not sent.
                session.data_to_send()
            session.close_with(R.R421_CLIENT_RATE if refused == "rate" else R.R421_CLIENT_LIMIT)
            self._drive()

    def _proxy_header(self, data: bytes) -> bytes:
        """Take the PROXY header off the front of a trusted proxy's stream (HAProxy's
        send-proxy / send-proxy-v2).  No header where one is expected closes the
        connection: guessing would let a client forge one (the PROXY spec, 2.)."""
        buf = (self._proxy_buf or b"") + data
        sig = _PROXY_V2 if buf[:1] == b"\r" else _PROXY_V1
        if not (buf.startswith(sig) or sig.startswith(buf[: len(sig)])):
            _log.info("{peer} sent no PROXY header: closing", peer=self._peer())
            self._proxy_buf = None
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return b""
        try:
            header = parse_proxy_header(buf)
        except ProxyError as e:
            _log.info("{peer} bad PROXY header: {error}", peer=self._peer(), error=str(e))
            self._proxy_buf = None
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return b""
        if header is None:
            self._proxy_buf = buf
            return b""
        self._proxy_buf = None
        self._apply_proxy(header)
        return buf[header.length :]

    def _apply_proxy(self, header: ProxyHeader) -> None:
        policy, session = self.policy, self.session
        assert policy is not None and session is not None
        proxy = policy.context.peer_host
        if header.command == "PROXY" and header.source is not None:
            host, port = header.source
            policy.context = replace(policy.context, peer_host=host, peer_port=port,
                                     proxied_by=proxy)
        if header.tls is not None:
            # The proxy terminated TLS for us (PP2_TYPE_SSL): the session counts as TLS.
            tls = header.tls
            policy.context = replace(policy.context, tls=True, tls_version=tls.version,
                                     tls_cipher=tls.cipher,
                                     tls_client_certificate=tls.common_name)
            session.info = replace(session.info, tls=True)
        self._admit(policy.context.peer_host)

    def _anonymous_avatar(self, avatar: Any) -> None:
        # twisted.mail's ESMTP gives anonymous sessions the portal's anonymous avatar.
        if avatar is not None and self.policy is not None and self._login is None:
            self.policy.delivery = IDelivery(delivery_provider(avatar)())
            self._unauthenticated = self.policy.delivery

    def shutdown(self) -> None:
        """The server stops: answer 421 and close (RFC 5321 3.8)."""
        if self.session is not None:
            self.session.shutdown()
            self._force_close()

    def _force_close(self) -> None:
        """Close now, even while a decision is pending (it is answered into the void)."""
        self._drain_events()
        self._flush()
        if self.transport is not None:
            self.transport.loseConnection()

    # --- timers ------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        """The idle timeout counts from now; the timer fires no later than it is due.

        Moving a DelayedCall on every read (and a second one for the session deadline)
        cost more than the rest of a small command's handling; so there is one timer,
        and a read only notes the time (dataReceived).  The timer is moved only to fire
        sooner: when the connection starts, when a sink opens or closes (the DATA
        timeout or the command timeout applies, either may be the shorter) and when
        reading resumes after a decision.  When it fires it looks at the last read and
        the deadline (_on_timer), and sleeps on if neither is due."""
        now = self._active_at = self._clock.seconds()
        due = min(self._idle_due(), self._deadline_at)
        timer = self._timer
        if timer is None:
            self._timer = self._clock.callLater(due - now, self._on_timer)
        elif due < timer.getTime():
            timer.reset(due - now)

    def _idle_due(self) -> float:
        """When the idle timeout of the current state ends, counted from the last read."""
        limits = self.config.limits
        return self._active_at + (
            limits.command_timeout if self._sink is None else limits.data_timeout
        )

    def _timeout_changed(self) -> None:
        """A sink opened or closed: now the DATA timeout applies, or the command timeout.
        The timer must move only if that one is the shorter (by default they are the
        same, and nothing is done)."""
        limits, session = self.config.limits, self.session
        if self._sink is None:
            shorter = limits.command_timeout < limits.data_timeout
        else:
            shorter = limits.data_timeout < limits.command_timeout
        if shorter and session is not None and not session.closing:
            self._arm_idle()

    def _on_timer(self) -> None:
        now, idle_due = self._clock.seconds(), self._idle_due()
        self._timer = None
        if now >= self._deadline_at:
            self._expired()
        elif now >= idle_due:
            self._timed_out()
        else:
            due = min(idle_due, self._deadline_at)
            self._timer = self._clock.callLater(due - now, self._on_timer)

    def _timed_out(self) -> None:
        if self.session is not None:
            _log.info("{peer} idle timeout", peer=self._peer())
            self.session.timed_out()
            self._force_close()

    def _expired(self) -> None:
        if self.session is not None:
            _log.info("{peer} session deadline reached", peer=self._peer())
            self.session.deadline_expired()
            self._force_close()

    def _peer(self) -> str:
        return self.policy.context.peer_host if self.policy else "?"

    # --- the event loop ------------------------------------------------------------------

    def _drive(self) -> None:
        """Run the session until it needs bytes or a decision; then write once."""
        session = self.session
        if self._driving or session is None:
            return
        self._driving = True
        try:
            while self._waiting == 0:
                event = session.next_event()
                if event is NEED_DATA or event is PAUSED:
                    break
                kind = type(event)
                if kind is CloseConnection:
                    self._flush()
                    if self.transport is not None:
                        self.transport.loseConnection()
                    return
                handler = _ON_EVENT.get(kind)  # an event without an entry is ignored
                if handler is not None:
                    handler(self, event)
        finally:
            self._driving = False
        self._flush()
        if not session.closing:  # a closing transport is neither paused nor resumed
            self._set_reading(self._waiting == 0 and not session.paused)

    def _flush(self) -> None:
        assert self.session is not None
        out = self.session.data_to_send()
        if out and self.transport is not None:
            _write(self.transport, out)

    def _set_reading(self, reading: bool) -> None:
        transport = self.transport
        if transport is None or reading is not self._reading_paused:
            return  # already as wanted
        self._reading_paused = not reading
        if reading:
            transport.resumeProducing()  # type: ignore[attr-defined]
            self._arm_idle()
        else:
            transport.pauseProducing()  # type: ignore[attr-defined]

    def _wait_for(self, d: Any, then: Any) -> None:
        """Run *then* with *d*'s result; if it is a Deferred, hold the loop until then."""
        if not is_deferred(d):
            then(d)
            return
        self._waiting += 1

        def done(result: Any) -> None:
            self._waiting -= 1
            then(result)
            if not self._driving:
                self._drive()

        d.addCallback(done).addErrback(self._bug)

    def _bug(self, failure: Failure) -> None:
        _log.failure("internal error: closing the connection", failure)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _on_data(self, event: MessageData) -> None:
        sink = self._sink
        if sink is not None:
            try:
                result = sink.write(event.data)
            except Exception:
                self._write_failed(Failure(), sink)
            else:
                if is_deferred(result):
                    result.addErrback(self._write_failed, sink)
                    self._wait_for(result, lambda _: None)  # back-pressure

    def _on_hello(self, event: HelloReceived) -> None:
        session, policy = self.session, self.policy
        assert session is not None and policy is not None
        command = event.command
        esmtp = not isinstance(command, Helo)
        policy.context = _with_hello(policy.context, command.domain, esmtp)
        facts = tls_facts(self.transport)  # the handshake is done by the first EHLO
        if facts is not None:
            policy.context = replace(
                policy.context, tls=True, tls_version=facts.version, tls_cipher=facts.cipher,
                tls_client_certificate=facts.client_certificate,
            )
        self._wait_for(policy.hello(), session.decide)

    def _on_mail(self, event: MailReceived) -> None:
        session, policy = self.session, self.policy
        assert session is not None and policy is not None
        if not self.factory.limiter.message_allowed(self._client):
            _log.info("{peer} refused: message rate", peer=self._client)
            session.close_with(R.R421_MESSAGE_RATE)  # the MAIL is answered by the 421
            return
        sender = event.command.sender
        login = self._login
        if login is not None and self.config.submission and sender is not None:
            allowed = authn.allowed_senders(login, self.config.local_domains)
            if str(sender).lower() not in allowed:
                session.decide(R.R550_SENDER_NOT_OWNED)
                return
        self._wait_for(policy.mail(event.command), session.decide)

    def _on_rcpt(self, event: RcptReceived) -> None:
        assert self.session is not None and self.policy is not None
        answer = self.policy.rcpt(event.command, event.transaction)
        self._wait_for(answer, self.session.decide)

    def _on_started(self, event: MessageStarted) -> None:
        policy = self.policy
        assert policy is not None
        self._message_id = policy.transaction_id
        self._message_started = time.monotonic()
        self._txn = event.transaction
        envelope = policy.envelope(event.transaction)
        checker = self.factory.checker
        if checker is not None and self.config.checks_messages and not (
            policy.context.authenticated
        ):  # checked: the body goes to a spool; the delivery's sink opens after the checks
            self._opened(checker.sink(envelope, self.config.auth_checks, policy.open,
                                      self.config.limits.max_header_block))
            return
        self._wait_for(policy.open(envelope), self._opened)

    def _on_complete(self, event: MessageComplete) -> None:
        count = len(event.transaction.recipients)
        sink, self._sink = self._sink, None
        self._timeout_changed()
        size = event.transaction.size
        self._wait_for(Policy.close(sink, count), lambda r: self._delivered(r, size, sink))

    def _on_refused(self, event: Refused) -> None:
        policy = self.policy
        assert policy is not None
        refused = event.command
        address: Mailbox | None
        if isinstance(refused, RcptTo):
            verb, address = "RCPT", refused.recipient
        else:
            verb, address = "MAIL", refused.sender
        _log.info(
            "{peer} {verb} <{address}> refused: {code} {status}",
            peer=policy.context.peer_host,
            session_id=policy.context.session_id,
            verb=verb,
            address="" if address is None else str(address),
            code=event.reply.code,
            status=event.reply.status,
        )

    def _on_aborted(self, event: MessageAborted) -> None:
        sink, self._sink = self._sink, None
        self._timeout_changed()
        if sink is not None:
            sink.abort()
        self._log_message(event.reply, 0)

    def _drain_events(self) -> None:
        """After the connection is lost: abort an open sink, ignore everything else."""
        session = self.session
        assert session is not None
        while isinstance(event := session.next_event(), Event):
            if isinstance(event, MessageAborted) and self._sink is not None:
                self._sink.abort()
                self._sink = None

    def _write_failed(self, failure: Failure, sink: Any) -> None:
        """A sink write failed: discard that sink; the message will get 451 4.3.0."""
        _log.failure("sink write() failed: the message gets 451", failure)
        if self._sink is sink:
            envelope: Any = getattr(sink, "envelope", None)
            self._sink = FailedSink(envelope)
            try:
                sink.abort()
            except Exception:
                _log.failure("sink abort() raised")

    def _opened(self, sink: Any) -> None:
        if self._login is not None and self.config.submission:
            allowed = authn.allowed_senders(self._login, self.config.local_domains)
            sink = FromGuard(sink, allowed, self.config.limits.max_header_block)
        self._sink = sink
        session = self.session
        txn = session.transaction if session is not None else None
        if txn is None or not txn.started:  # aborted meanwhile (RSET, timeout, lost)
            sink.abort()
            self._sink = None
        else:
            self._timeout_changed()

    # --- STARTTLS, AUTH, XCLIENT ----------------------------------------------------------

    def _on_starttls(self, event: StartTlsRequested) -> None:
        session = self.session
        assert session is not None
        self._flush()  # the 220 goes out in the clear, then the handshake starts
        transport: Any = self.transport
        transport.startTLS(self.factory.tls)
        session.tls_started()
        # RFC 3207 4.2: forget what the client told us in the clear (EHLO, AUTH).
        self._forget_client(tls=True)

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
            _log.info("{peer} AUTH failed", peer=policy.context.peer_host)
            d: Deferred[None] = Deferred()
            self._clock.callLater(delay, d.callback, None)
            self._wait_for(d, lambda _: session.auth_result(None))
            return
        self._login = login
        policy.delivery = IDelivery(delivery_provider(login.avatar)())
        policy.context = replace(policy.context, authenticated=login.identity)
        _log.info("{peer} AUTH as {user}", peer=policy.context.peer_host, user=login.identity)
        session.auth_result(login.identity)

    def _on_xclient(self, event: XClientReceived) -> None:
        session, policy = self.session, self.policy
        assert session is not None and policy is not None
        x = event.attributes
        self._forget_client()
        context = policy.context
        policy.context = replace(
            context,
            peer_host=x.addr or context.peer_host,
            peer_port=x.port if x.port is not None else context.peer_port,
            helo=x.helo or context.helo,
            authenticated=x.login,
            proxied_by=context.proxied_by or context.peer_host,
        )
        if x.addr and x.addr != self._client:
            if self._counted:
                self.factory.limiter.connection_closed(self._client)
            self._admit(x.addr)
        session.xclient_applied()

    def _delivered(self, replies: list[Reply], size: int, sink: Any = None) -> None:
        session = self.session
        assert session is not None
        self.messages += 1
        if self.config.lmtp:
            session.decide_each(replies)
            reply = smtp_reply(replies)
        else:
            reply = smtp_reply(replies)
            session.decide(reply)
        # The checks' verdicts (maitred_tx.auth.checks.CheckingSink) join this event:
        # one log line per message, not two.
        auth = getattr(sink, "auth", None)
        self._log_message(reply, size, None if auth is None else auth.summary())

    def _log_message(self, reply: Reply | None, size: int, auth: str | None = None) -> None:
        policy = self.policy
        assert policy is not None
        txn, self._txn = self._txn, None
        context = policy.context
        sender = "" if txn is None or txn.sender is None else str(txn.sender)
        recipients = [str(m) for m, _ in txn.recipients] if txn else []
        code, status = (reply.code, reply.status) if reply else (0, "aborted")
        _emit_info({
            # One field for the text, built only if an observer formats the event:
            # Twisted's formatter costs ~3 us per field, and the text is the same as
            # "{peer} message {message_id} from <{sender}> to {recipients}: {code} {status}".
            "summary": partial(
                _message_summary, context.peer_host, self._message_id, sender, recipients,
                code, status, auth,
            ),
            "peer": context.peer_host,
            "session_id": context.session_id,
            "message_id": self._message_id,
            "sender": sender,
            "recipients": recipients,
            "size": size,
            "code": code,
            "status": status,
            "auth": auth,
            "duration": time.monotonic() - self._message_started,
        })


def _message_summary(
    peer: str, message_id: str, sender: str, recipients: list[str], code: int, status: object,
    auth: str | None = None,
) -> str:
    """The text of the per-message log event; the checks' verdicts last, when made."""
    text = f"{peer} message {message_id} from <{sender}> to {recipients}: {code} {status}"
    return text if auth is None else f"{text} ({auth})"


def _session_summary(peer: str, session_id: str, duration: float, messages: int,
                     errors: int) -> str:
    """The text of the end-of-session log event."""
    return (f"{peer} session {session_id} ended after {duration:.3f}s: "
            f"{messages} messages, {errors} errors")


def _host(address: Any) -> str:
    """The address's host, or its text for an address without one (a UNIX socket)."""
    host = getattr(address, "host", None)  # not getattr's default: str() is ~1 us
    return str(address) if host is None else host


def _with_hello(c: SessionContext, helo: str, esmtp: bool) -> SessionContext:
    """``replace(c, helo=helo, esmtp=esmtp)``, for every EHLO: dataclasses.replace
    inspects the fields on each call, at twice the cost of naming them here.
    (tests/server/test_protocol.py holds it to replace(), field by field.)"""
    return SessionContext(
        session_id=c.session_id, hostname=c.hostname, peer_host=c.peer_host,
        peer_port=c.peer_port, local_host=c.local_host, local_port=c.local_port,
        helo=helo, esmtp=esmtp, lmtp=c.lmtp, tls=c.tls, tls_version=c.tls_version,
        tls_cipher=c.tls_cipher, tls_client_certificate=c.tls_client_certificate,
        authenticated=c.authenticated, proxied_by=c.proxied_by,
    )


def _write(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent at once when the transport is plain TCP with
    nothing queued.  Twisted's write only queues: it registers the socket for writing
    (an epoll_ctl), sends on the reactor's next turn, then unregisters it (another), at
    about a tenth of the server's CPU for the two writes of each pipelined message.  The
    bytes, their order and their timing relative to later writes are unchanged: when
    the socket takes all of them nothing is left to queue, otherwise (a full socket
    buffer, or an error for the reactor to report) the rest goes the usual way."""
    # Twisted's internals (26.10): a Twisted without one of them must fall back to
    # queueing, not fail.  (Read directly: getattr with a default costs twice as much,
    # on every reply.)
    try:
        plain = (
            type(transport) is _TCP_SERVER
            and transport.TLS is False
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport.dataBuffer
            and not transport._tempDataLen
        )
    except AttributeError:
        plain = False
    if plain:
        sent = transport.writeSomeData(data)
        if type(sent) is int and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def _emit_info(event: dict[str, object]) -> None:
    """``_log.info(SUMMARY_FORMAT, **event)`` for the per-message and per-session events:
    the same event, without Logger.emit's check of the level (constantly sorts every
    level on each call) and its keyword arguments (a dict built twice): a few
    microseconds per message.  The keys added are those Logger.emit adds."""
    event["log_logger"] = _log
    event["log_level"] = LogLevel.info
    event["log_namespace"] = _log.namespace
    event["log_source"] = _log.source
    event["log_format"] = SUMMARY_FORMAT
    event["log_time"] = time.time()
    _log.observer(event)


# Which method handles which event: one dictionary lookup per event.
_ON_EVENT: dict[type, Callable[[SMTPServerProtocol, Any], None]] = {
    MessageData: SMTPServerProtocol._on_data,
    HelloReceived: SMTPServerProtocol._on_hello,
    MailReceived: SMTPServerProtocol._on_mail,
    RcptReceived: SMTPServerProtocol._on_rcpt,
    MessageStarted: SMTPServerProtocol._on_started,
    MessageComplete: SMTPServerProtocol._on_complete,
    Refused: SMTPServerProtocol._on_refused,
    StartTlsRequested: SMTPServerProtocol._on_starttls,
    AuthRequested: SMTPServerProtocol._on_auth,
    XClientReceived: SMTPServerProtocol._on_xclient,
    MessageAborted: SMTPServerProtocol._on_aborted,
}
