"""What every part of the protocol shares: its state, the loop that drives the pure
session (``_drive``: events to handlers, one write per batch, reading paused while a
decision is pending), and the one timer for idle timeouts and the session deadline.

``SMTPServerProtocol`` (protocol.py) is this plus the handlers: the connection and the
transaction in protocol.py, STARTTLS in protocol_tls.py, AUTH in protocol_auth.py, and
the client's identity behind a proxy (PROXY headers, XCLIENT, per-client limits) in
protocol_proxy.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from maitred_tx.server import authn
from maitred_tx.server.calls import is_deferred
from maitred_tx.server.logevents import log
from maitred_tx.server.policy import Policy
from maitred_tx.smtp.config import Config
from maitred_tx.smtp.events import (
    NEED_DATA,
    PAUSED,
    CloseConnection,
    Event,
    MessageAborted,
    Transaction,
)
from maitred_tx.smtp.session import ServerSession

if TYPE_CHECKING:
    from maitred_tx.server.factory import SMTPFactory

__all__ = ["ProtocolBase"]

# The transport _write may send on directly: the accepted plain TCP connection, whose
# write() and buffers are Twisted's own (a subclass could change either).
_TCP_SERVER = tcp.Server


class ProtocolBase(Protocol):
    """The state of one connection and the loop every handler runs in."""

    factory: SMTPFactory
    # Which method handles which session event (filled by SMTPServerProtocol): one
    # dictionary lookup per event; an event without an entry is ignored.
    _handlers: ClassVar[dict[type, Callable[[Any, Any], None]]] = {}

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
        self._unauthenticated: Any = None  # the delivery that serves before AUTH

    def _peer(self) -> str:
        return self.policy.context.peer_host if self.policy else "?"

    def _force_close(self) -> None:
        """Close now, even while a decision is pending (it is answered into the void)."""
        self._drain_events()
        self._flush()
        if self.transport is not None:
            self.transport.loseConnection()

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
            log.info("{peer} idle timeout", peer=self._peer())
            self.session.timed_out()
            self._force_close()

    def _expired(self) -> None:
        if self.session is not None:
            log.info("{peer} session deadline reached", peer=self._peer())
            self.session.deadline_expired()
            self._force_close()

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
                handler = self._handlers.get(kind)  # an event without an entry is ignored
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
        log.failure("internal error: closing the connection", failure)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _drain_events(self) -> None:
        """After the connection is lost: abort an open sink, ignore everything else."""
        session = self.session
        assert session is not None
        while isinstance(event := session.next_event(), Event):
            if isinstance(event, MessageAborted) and self._sink is not None:
                self._sink.abort()
                self._sink = None


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
