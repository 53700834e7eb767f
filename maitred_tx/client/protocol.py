"""Twisted glue for one client connection: bytes to the session, replies to the running
operation, what it answers to the transport, timeouts on the clock.

- Reading is bounded by the session's reply parser (one partial line, one reply).  A
  reply nobody asked for is an error, except the greeting and 421 (RFC 5321 3.8: the
  server may say it is closing at any time), which wait for the next operation.
- Writing: TCP_NODELAY is set, since a pipelined batch is one write and must not wait
  for Nagle.  While a body streams, the protocol is the transport's push producer: when
  the transport's buffer is full it pauses us (``pauseProducing``) and the body is read
  no further until ``resumeProducing``, so a body of any size costs bounded memory.  A
  pause longer than the data-block timeout (RFC 5321 4.5.3.2.5) ends the connection.
- Time comes from the clock passed in (``reactor.callLater``; a ``task.Clock`` in tests).
"""

from __future__ import annotations

import contextlib
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from maitred_tx.client.errors import (
    CertificateProblem,
    ConnectionLost,
    ProtocolViolation,
    ResponseTimeout,
    SMTPClientError,
    TLSVerificationFailed,
    certificate_problem,
)
from maitred_tx.client.message import InvalidBody
from maitred_tx.client.replies import ServerReply
from maitred_tx.client.session import ClientSession
from maitred_tx.client.source import BodySource
from maitred_tx.client.timeouts import Phase, Timeouts
from maitred_tx.client.transaction import SendResult, Transaction

__all__ = ["ClientProtocol"]

# Replies kept for the next operation (the greeting, a 421); more is a flood.
_MAX_EARLY = 4


@implementer(IPushProducer, IHandshakeListener)
class ClientProtocol(Protocol):
    """Runs one operation at a time of a :class:`ClientSession`."""

    # A TCP or TLS transport: it has setTcpNoDelay, startTLS, the producer methods and
    # abortConnection, which ITransport does not declare.
    transport: Any = None

    def __init__(self, session: ClientSession, clock: Any, timeouts: Timeouts) -> None:
        self.session = session
        self.clock = clock
        self.timeouts = timeouts
        self.closed: Deferred[None] = Deferred()  # fires once the connection is gone
        self.lost: SMTPClientError | None = None  # why, once it is gone
        self.local_ip: str | None = None  # our address, once connected over IP
        self.tls_handshake_pending = False
        self._op: Any = None
        self._done: Deferred[Any] | None = None
        self._early: list[ServerReply] = []
        self._timer: IDelayedCall | None = None
        self._phase = Phase.GREETING  # what the reply timer is waiting for
        self._changed: Deferred[None] | None = None
        self._paused = False
        self._resumed: Deferred[None] | None = None
        self._block_timer: IDelayedCall | None = None
        self._abort_reason: SMTPClientError | None = None

    # --- Twisted ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            self.transport.setTcpNoDelay(True)
        # Kept now: once the connection is lost its socket cannot be asked.
        with contextlib.suppress(AttributeError, OSError):
            host = self.transport.getHost().host
            self.local_ip = host if isinstance(host, str) else None

    def dataReceived(self, data: bytes) -> None:
        self.session.receive_data(data)
        while self.lost is None and self._abort_reason is None:
            try:
                reply = self.session.next_reply()
            except ProtocolViolation as e:
                self.fail(e)
                return
            if reply is None:
                return
            self._dispatch(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = self._addressed(self._abort_reason or self._lost_error(reason))
        self._cancel_timers()
        op, self._op = self._op, None
        done, self._done = self._done, None
        if op is not None and done is not None:
            if isinstance(op, Transaction):
                op.connection_lost(self.lost)
                done.callback(op)
            else:
                done.errback(self.lost)
        self._wake()
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.callback(None)
        self.closed.callback(None)

    def handshakeCompleted(self) -> None:
        self.tls_handshake_pending = False

    # IPushProducer: the transport's buffer is full / drained.
    def pauseProducing(self) -> None:
        self._paused = True
        if self._block_timer is None:
            seconds = self.timeouts[Phase.DATA_BLOCK]
            self._block_timer = self.clock.callLater(seconds, self._blocked, seconds)

    def resumeProducing(self) -> None:
        self._paused = False
        if self._block_timer is not None and self._block_timer.active():
            self._block_timer.cancel()
        self._block_timer = None
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.callback(None)

    def stopProducing(self) -> None:
        pass  # the connection is going away; connectionLost follows

    # --- running operations ----------------------------------------------------------
    def run(self, op: Any) -> Deferred[Any]:
        """Start a one-command operation (greeting, EHLO, AUTH, ...); its Deferred
        fires with the operation once it is done, or fails with its error."""
        if self._op is not None:
            raise RuntimeError("another operation is running")
        if self.lost is not None:
            raise self.lost
        done: Deferred[Any] = Deferred()
        self._op, self._done = op, done
        try:
            self._write(op.start())
        except BaseException:
            self._op = self._done = None
            raise
        self._arm(op.phase)
        self._replay_early()
        return done

    async def transact(self, tx: Transaction, source: BodySource) -> SendResult:
        """Run one mail transaction, streaming the body from *source*."""
        if self._op is not None:
            raise RuntimeError("another operation is running")
        if self.lost is not None:
            raise self.lost
        first, last = await source.next()
        start = tx.start(first, last)  # InvalidBody here: nothing was sent
        done: Deferred[Any] = Deferred()
        self._op, self._done = tx, done
        # A body in one chunk is written whole; only a stream needs back-pressure.
        streaming = not last
        if streaming:
            self.transport.registerProducer(self, True)
        problem: BaseException | None = None
        try:
            self._write(start)
            self._arm(tx.phase)
            self._replay_early()
            problem = await self._pump(tx, source)
            if not tx.done:
                await done
        finally:
            if streaming and self.lost is None:
                self.transport.unregisterProducer()
        if tx.must_close or self.session.closing:
            self.close()
        if problem is not None:
            raise problem
        return tx.result

    async def _pump(self, tx: Transaction, source: BodySource) -> BaseException | None:
        """Send the body while the transaction wants it; return what went wrong with
        the body or its source (the transaction is then aborted)."""
        while not tx.done:
            if not tx.wants_body:
                await self._wait_change()
                continue
            try:
                chunk, last = await source.next()
                if not tx.wants_body:
                    continue  # refused meanwhile: nothing more to send
                data = tx.body_chunk(chunk, last)
            except Exception as e:  # the source failed, or InvalidBody
                error = e if isinstance(e, InvalidBody) else ConnectionLost(
                    f"the message body could not be read: {e!r}", permanent=False)
                tx.abort(error)
                if tx.must_close:
                    self.fail(error)  # a DATA body cut short: drop it, flush nothing
                if tx.done and self._op is tx:
                    self._finish()
                return e
            self._write(data)
            self._arm(tx.phase)
            if self._paused:
                await self._wait_resumed()
        return None

    def fail(self, error: SMTPClientError) -> None:
        """End the connection now because of *error*."""
        if self._abort_reason is None:
            self._abort_reason = error
        if self.transport is not None:
            self.transport.abortConnection()

    def close(self) -> None:
        """Close after what was written has gone out."""
        if self.transport is not None and self.lost is None:
            self.transport.loseConnection()

    def start_tls(self, options: Any) -> None:
        """Begin the handshake on this connection (after STARTTLS's 220)."""
        self.tls_handshake_pending = True
        self.transport.startTLS(options)

    # --- internals -------------------------------------------------------------------
    def _dispatch(self, reply: ServerReply) -> None:
        op = self._op
        if op is None:
            self._keep_early(reply)
            return
        try:
            out = op.on_reply(reply)
        except SMTPClientError as e:
            self._finish(e)
            if self.session.closing:
                self.close()
            return
        self._write(out)
        if op.done:
            self._finish()
        else:
            self._arm(op.phase)
        self._wake()

    def _keep_early(self, reply: ServerReply) -> None:
        if reply.code != 421 and self.session.greeting is not None:
            self.fail(ProtocolViolation(
                f"{self.session.host} sent a reply nothing asked for: {reply}", reply=reply))
        elif len(self._early) >= _MAX_EARLY:
            self.fail(ProtocolViolation(f"{self.session.host} floods unasked replies"))
        else:
            self._early.append(reply)

    def _replay_early(self) -> None:
        while self._early and self._op is not None:
            self._dispatch(self._early.pop(0))

    def _finish(self, error: SMTPClientError | None = None) -> None:
        op, done = self._op, self._done
        self._op = self._done = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if done is not None:
            if error is None:
                done.callback(op)
            else:
                done.errback(self._addressed(error))

    def _addressed(self, error: SMTPClientError) -> SMTPClientError:
        """*error* with our address on this connection, unless it has one."""
        if error.local_ip is None:
            error.local_ip = self.local_ip
        return error

    def _write(self, data: bytes) -> None:
        if data and self.lost is None:
            self.transport.write(data)

    def _arm(self, phase: Phase | None) -> None:
        """(Re)start the reply timer for *phase*; None stops it.  One DelayedCall is
        moved with reset() rather than cancelled and made anew for every reply."""
        timer = self._timer
        if phase is None or self.lost is not None:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = None
            return
        seconds = self.timeouts[phase]
        self._phase = phase
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self.clock.callLater(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        phase = self._phase
        self.fail(ResponseTimeout(
            f"{self.session.host} did not answer within {self.timeouts[phase]:g}s "
            f"({phase.value})", host=self.session.host))

    def _blocked(self, seconds: float) -> None:
        self._block_timer = None
        self.fail(ResponseTimeout(
            f"{self.session.host} read none of our data for {seconds:g}s (data block)",
            host=self.session.host))

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._block_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._block_timer = None

    def _wait_change(self) -> Deferred[None]:
        self._changed = Deferred()
        return self._changed

    def _wake(self) -> None:
        if self._changed is not None:
            changed, self._changed = self._changed, None
            changed.callback(None)

    def _wait_resumed(self) -> Deferred[None]:
        self._resumed = Deferred()
        return self._resumed

    def _lost_error(self, reason: Failure) -> SMTPClientError:
        host = self.session.host
        if self.tls_handshake_pending and _is_tls_failure(reason):
            problem = _tls_problem(reason, self.transport)
            return TLSVerificationFailed(_tls_failure(host, reason, problem), host=host,
                                         problem=problem)
        if self.session.closing:
            return ConnectionLost(f"{host} closed the connection", host=host)
        return ConnectionLost(
            f"connection to {host} lost: {_describe(reason)}", host=host, permanent=False)


# What the certificate problems are called in a message for people.
_PROBLEM_WORDS: Final = {
    CertificateProblem.EXPIRED: "has expired (or is not valid yet)",
    CertificateProblem.NOT_TRUSTED: "is not trusted",
    CertificateProblem.OTHER: "did not verify",
}


def _tls_failure(host: str, reason: Failure, problem: CertificateProblem) -> str:
    """What went wrong in the handshake, in words that name the host."""
    detail = _describe(reason)
    if problem is CertificateProblem.HOST_MISMATCH:
        return f"TLS with {host}: the server's certificate is not valid for the name {host}"
    if "certificate verify failed" in detail:
        return (f"TLS with {host}: the server's certificate {_PROBLEM_WORDS[problem]} "
                f"({detail})")
    return f"TLS handshake with {host} failed ({detail})"


def _tls_problem(reason: Failure, transport: Any) -> CertificateProblem:
    """Why the handshake failed, as Twisted and OpenSSL report it.  A name that does
    not match is service_identity's VerificationError (Twisted checks the name in its
    verify callback); a chain OpenSSL refused is "certificate verify failed", and the
    X.509 verify result kept on the connection says why (expired, unknown issuer,
    ...).  Anything else, e.g. no common protocol version, is OTHER."""
    if type(reason.value).__name__ == "VerificationError":  # service_identity
        return CertificateProblem.HOST_MISMATCH
    if "certificate verify failed" not in _describe(reason):
        return CertificateProblem.OTHER
    return certificate_problem(_verify_result(transport))


def _verify_result(transport: Any) -> int | None:
    """OpenSSL's ``SSL_get_verify_result`` for the connection's handshake (None if
    it cannot be had).  The OpenSSL error itself carries only "certificate verify
    failed".  pyOpenSSL (26) has no public method for it, so its own cffi binding is
    used, as pyOpenSSL's methods do; a ``get_verify_result`` it may grow is
    preferred.  tests/client/test_tls_problem.py fails if this stops working."""
    try:
        connection = transport.getHandle()  # the OpenSSL.SSL.Connection
        public = getattr(connection, "get_verify_result", None)
        if public is not None:
            return int(public())
        from OpenSSL._util import lib

        return int(lib.SSL_get_verify_result(connection._ssl))
    except Exception:  # no TLS connection, or another pyOpenSSL: not known
        return None


def _is_tls_failure(reason: Failure) -> bool:
    from OpenSSL import SSL
    from service_identity import VerificationError

    return reason.check(SSL.Error, VerificationError) is not None


def _describe(reason: Failure) -> str:
    value: Any = reason.value
    if type(value).__name__ == "Error" and value.args and isinstance(value.args[0], list):
        # OpenSSL.SSL.Error: [('SSL routines', '', 'certificate verify failed')]
        return "; ".join(str(item[-1]) for item in value.args[0] if item) or repr(value)
    return str(value) or type(value).__name__
