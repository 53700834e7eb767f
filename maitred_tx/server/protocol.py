"""The Twisted protocol: bytes from the transport into the pure session, events out to
the Policy, replies back in one write per batch.

This module holds the connection and the transaction; the loop, the timer and the
state they share are ``protocol_base``; STARTTLS, AUTH and the client behind a proxy
(PROXY, XCLIENT, per-client limits) are ``protocol_tls``, ``protocol_auth`` and
``protocol_proxy``; the log events are ``logevents``.

Reading is paused while any decision or a slow sink is pending, so pipelined commands
are answered strictly in order and a slow delivery pushes back on the sender instead
of filling memory.  Bodies are never split into lines here (nor in the core).
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from typing import Any

from twisted.internet.interfaces import ISSLTransport
from twisted.python.failure import Failure

from maitred_tx.envelope import SessionContext
from maitred_tx.server import authn
from maitred_tx.server.calls import is_deferred
from maitred_tx.server.logevents import (
    SUMMARY_FORMAT,
    emit_info,
    log,
    message_summary,
    session_summary,
)
from maitred_tx.server.policy import FailedSink, Policy, new_id, smtp_reply
from maitred_tx.server.protocol_proxy import ProxiedClient
from maitred_tx.server.submission import FromGuard
from maitred_tx.server.tls import tls_facts
from maitred_tx.smtp import replies as R
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.commands import Helo, RcptTo
from maitred_tx.smtp.events import (
    AuthRequested,
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
    XClientReceived,
)
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.session import ServerSession

__all__ = ["SUMMARY_FORMAT", "SMTPServerProtocol"]

_READ_SIZE = 256 * 1024


class SMTPServerProtocol(ProxiedClient):
    """One SMTP/LMTP connection.  Built by SMTPFactory; not meant to be subclassed."""

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
        self.factory.metrics.session_started(implicit_tls)
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
            self.factory.metrics.session_ended()
            ctx = self.policy.context
            duration = time.monotonic() - self._started
            errors = self.session.errors if self.session else 0
            emit_info({  # as the per-message event: one lazily built text field
                "summary": partial(session_summary, ctx.peer_host, ctx.session_id,
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

    def shutdown(self) -> None:
        """The server stops: answer 421 and close (RFC 5321 3.8)."""
        if self.session is not None:
            self.session.shutdown()
            self._force_close()

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
            log.info("{peer} refused: message rate", peer=self._client)
            self.factory.metrics.session_refused("message_rate")
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
        self._wait_for(answer, self._rcpt_decided)

    def _rcpt_decided(self, reply: Reply | None) -> None:
        session = self.session
        assert session is not None
        # Counted here, as the session accepts it; refusals are counted by _on_refused.
        if (reply is None or reply.is_positive) and not session.closing:
            self.factory.metrics.recipient_accepted()
        session.decide(reply)

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
            self.factory.metrics.recipient_refused(event.reply)
        else:
            verb, address = "MAIL", refused.sender
            self.factory.metrics.sender_refused(event.reply)
        log.info(
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
        if event.reply is not None:  # refused in the body (552, 550 5.6.0, ...)
            self.factory.metrics.message(event.reply, 0)
        self._log_message(event.reply, 0)

    def _write_failed(self, failure: Failure, sink: Any) -> None:
        """A sink write failed: discard that sink; the message will get 451 4.3.0."""
        log.failure("sink write() failed: the message gets 451", failure)
        if self._sink is sink:
            envelope: Any = getattr(sink, "envelope", None)
            self._sink = FailedSink(envelope)
            try:
                sink.abort()
            except Exception:
                log.failure("sink abort() raised")

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
        metrics = self.factory.metrics
        metrics.message(reply, size)
        if auth is not None:
            metrics.checks(auth)
        self._log_message(reply, size, None if auth is None else auth.summary())

    def _log_message(self, reply: Reply | None, size: int, auth: str | None = None) -> None:
        policy = self.policy
        assert policy is not None
        txn, self._txn = self._txn, None
        context = policy.context
        sender = "" if txn is None or txn.sender is None else str(txn.sender)
        recipients = [str(m) for m, _ in txn.recipients] if txn else []
        code, status = (reply.code, reply.status) if reply else (0, "aborted")
        emit_info({
            # One field for the text, built only if an observer formats the event:
            # Twisted's formatter costs ~3 us per field, and the text is the same as
            # "{peer} message {message_id} from <{sender}> to {recipients}: {code} {status}".
            "summary": partial(
                message_summary, context.peer_host, self._message_id, sender, recipients,
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


# Which method handles which event: one dictionary lookup per event.
SMTPServerProtocol._handlers = {
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
