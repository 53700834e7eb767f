"""What every part of a ServerSession shares: its state, its output, and the helpers
that send replies, count errors, wait for decisions and end transactions.

``ServerSession`` (session.py) is this plus the verbs: the transaction in session.py,
STARTTLS in session_tls.py, AUTH in session_auth.py and XCLIENT in session_xclient.py.
Each of those is a small class over this one, so that a verb's rules sit in one place
and the state they touch is declared once, here.
"""

from __future__ import annotations

import functools

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.body import BdatReceiver, ContentChecker, DataReceiver
from maitred_tx.smtp.commands import Bdat, Command, MailFrom, RcptTo
from maitred_tx.smtp.config import Config
from maitred_tx.smtp.events import (
    Event,
    MessageAborted,
    Refused,
    SessionInfo,
    Transaction,
)
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.sasl import SaslExchange
from maitred_tx.smtp.state import State

__all__ = ["SessionBase"]

_Receiver = DataReceiver | BdatReceiver


class SessionBase:
    """The state of one session and the helpers every verb uses; see ServerSession."""

    def __init__(self, config: Config, *, info: SessionInfo | None = None) -> None:
        self.config = config
        self.info = info or SessionInfo(lmtp=config.lmtp)
        self.state = State.CONNECTED
        self.transaction: Transaction | None = None
        self.errors = 0
        self._limits = config.limits
        self._in: bytes = b""
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._pending: Command | None = None
        self._receiver: _Receiver | None = None
        self._data_receiver: DataReceiver | None = None  # reused by every DATA body
        self._checker: ContentChecker | None = None  # content checks across BDAT chunks
        self._bdat: Bdat | None = None  # the accepted BDAT whose chunk is being read
        self._chunk_reply: Reply | None = None  # the reply owed for a refused chunk
        self._pos = 0  # command mode: how much of _in has been parsed
        self._skip_line = False  # discarding the rest of an over-long command line
        self._sasl: SaslExchange | None = None  # an AUTH exchange reads the next lines
        self.auth_failures = 0
        self._closing = False
        self._closed = False
        self._send(greeting(config.lmtp, config.hostname))

    # --- input and output -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Store bytes from the peer; nothing is parsed until next_event."""
        if not self._closing and data:
            if self._pos:  # drop what has been parsed before appending (one copy per read)
                self._in, self._pos = self._in[self._pos :], 0
            self._in = self._in + data if self._in else data

    def data_to_send(self) -> bytes:
        """All replies produced so far, as one write."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def paused(self) -> bool:
        return self._pending is not None

    @property
    def closing(self) -> bool:
        return self._closing

    # --- ending: replies, errors, transactions ----------------------------------------------

    def close_with(self, reply: Reply) -> None:
        """End the session with *reply* (a 421 of the caller's: limits, shutdown)."""
        self._close_with(reply)

    def _wait(self, command: Command, event: Event) -> None:
        self._pending = command
        self._events.append(event)

    def _end_transaction(self, reply: Reply | None) -> None:
        self._abort_message(reply)
        self.transaction = None
        self._checker = None
        if self.state is not State.CONNECTED:
            self.state = State.GREETED

    def _abort_message(self, reply: Reply | None) -> None:
        txn = self.transaction
        if txn is not None and txn.started:
            txn.started = False
            self._events.append(MessageAborted(reply))

    def _may_relay(self) -> bool:
        return self.config.relay or self.info.authenticated is not None

    def _is_local(self, mailbox: Mailbox) -> bool:
        # RFC 5321 4.5.1: <Postmaster> without a domain is always ours.
        return mailbox.domain == "" or self.config.is_local_domain(mailbox.domain)

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.encode(self.info.esmtp))

    def _refuse(self, command: MailFrom | RcptTo, reply: Reply) -> None:
        """A sender or recipient refused: worth a log line (dictionary attacks, typos)."""
        self._events.append(Refused(command, reply))
        self._error(reply)

    def _error(self, reply: Reply) -> None:
        """Send a negative reply and count it; too many ends the session (421 4.7.0)."""
        self._send(reply)
        self.errors += 1
        if self.errors >= self._limits.max_errors and not self._closing:
            self._close_with(R.R421_TOO_MANY_ERRORS)

    def _close_with(self, reply: Reply) -> None:
        if self._closing:
            return
        self._abort_message(None)
        self._send(reply.format(hostname=self.config.hostname))
        self._closing = True
        self._in, self._pos = b"", 0


# Replies every session sends, the same for a listener: built and encoded once.
@functools.lru_cache(maxsize=64)
def greeting(lmtp: bool, hostname: str) -> Reply:
    return (R.R220_LMTP_GREETING if lmtp else R.R220_GREETING).format(hostname=hostname)
