"""ServerSession: the whole server side of one SMTP or LMTP session, without I/O.

Bytes go in with ``receive_data``; ``next_event`` hands out what the caller must act
on; replies accumulate for ``data_to_send``.  Where the answer belongs to the
application (accept this EHLO, sender, recipient, message?) the session emits an event
and *waits*: ``next_event`` returns ``PAUSED`` until ``decide`` is called, so replies
always leave in command order, however late a decision comes (RFC 2920 3.1; this is
what twisted.mail gets wrong, twisted/twisted#8126).

Everything a peer can get wrong ends here as a Reply; only misuse of this class by
its caller raises.

This module holds the transaction (HELO/EHLO/LHLO, MAIL, RCPT, DATA, BDAT, RSET, QUIT
and the simple verbs) and the body; the state they share is ``session_base``, and
STARTTLS, AUTH and XCLIENT are ``session_tls``, ``session_auth`` and ``session_xclient``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Final

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.body import BdatReceiver, ContentChecker, DataReceiver
from maitred_tx.smtp.commands import (
    Auth,
    Bdat,
    Command,
    CommandError,
    Data,
    Ehlo,
    Expn,
    Helo,
    Help,
    HttpRequest,
    Lhlo,
    MailFrom,
    Noop,
    NotImplementedVerb,
    Quit,
    RcptTo,
    Rset,
    StartTls,
    Vrfy,
    XClientCommand,
    parse_command,
)
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
    _Sentinel,
)
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.sasl import ehlo_keyword as sasl_ehlo_keyword
from maitred_tx.smtp.session_auth import AuthVerb
from maitred_tx.smtp.session_tls import StartTlsVerb
from maitred_tx.smtp.session_xclient import XCLIENT_KEYWORD, XClientVerb
from maitred_tx.smtp.state import State, next_state, sequence_error

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "CloseConnection",
    "Event",
    "HelloReceived",
    "MailReceived",
    "MessageAborted",
    "MessageComplete",
    "MessageData",
    "MessageStarted",
    "RcptReceived",
    "AuthRequested",
    "Refused",
    "ServerSession",
    "StartTlsRequested",
    "XClientReceived",
    "SessionInfo",
    "Transaction",
]


class ServerSession(StartTlsVerb, AuthVerb, XClientVerb):
    """One session's protocol state; see the module docstring for the calling pattern."""

    # --- events -----------------------------------------------------------------------------

    def next_event(self) -> Event | _Sentinel:
        """The next thing to act on, NEED_DATA, or PAUSED while a decision is pending."""
        while True:
            if self._events:
                return self._events.pop(0)
            if self._closing:
                if self._closed:
                    return NEED_DATA
                self._closed = True
                return CloseConnection()
            if self._pending is not None:
                return PAUSED
            if self._pos >= len(self._in):
                self._in, self._pos = b"", 0
                return NEED_DATA
            if self._receiver is not None:
                self._feed_body()
            elif self._sasl is not None:
                if not self._read_sasl_line():
                    return NEED_DATA
            elif not self._read_command():
                return NEED_DATA

    # --- decisions --------------------------------------------------------------------------

    def decide(self, reply: Reply | None = None) -> None:
        """Answer the pending Hello/Mail/Rcpt/MessageComplete event."""
        command = self._pending
        if command is None:
            raise RuntimeError("decide() without a pending decision")
        self._pending = None
        if self._closing:
            return
        decided = _DECIDED.get(type(command))
        if decided is not None:
            decided(self, command, reply)
        else:  # DATA or BDAT
            self._decided_message([reply or R.R250_QUEUED])

    def decide_each(self, replies: Sequence[Reply]) -> None:
        """LMTP (RFC 2033 4.2): one reply per accepted recipient, in RCPT order."""
        if self._pending is None or not isinstance(self._pending, (Data, Bdat)):
            raise RuntimeError("decide_each() without a pending message")
        txn = self.transaction
        assert txn is not None
        if len(replies) != len(txn.recipients):
            raise ValueError("one reply per accepted recipient is required")
        self._pending = None
        if not self._closing:
            self._decided_message(list(replies))

    def timed_out(self) -> None:
        """The caller's idle timer fired (RFC 5321 4.5.3.2.7)."""
        self._close_with(R.R421_TIMEOUT)

    def deadline_expired(self) -> None:
        self._close_with(R.R421_SESSION_TOO_LONG)

    def shutdown(self) -> None:
        """The server is stopping: 421 4.3.2 (RFC 5321 3.8)."""
        self._close_with(R.R421_SHUTTING_DOWN)

    def connection_lost(self) -> None:
        """The peer went away: abort a started body so the sink is discarded."""
        self._abort_message(None)
        self._closing = self._closed = True

    # --- command mode -----------------------------------------------------------------------

    def _read_command(self) -> bool:
        buf, pos = self._in, self._pos
        nl = buf.find(b"\n", pos)
        if self._skip_line:
            if nl < 0:
                self._in, self._pos = b"", 0
                return False
            self._skip_line = False
            self._pos = nl + 1
            return True
        if nl < 0:
            if len(buf) - pos > self._limits.max_command_line:  # no end in sight: drop it
                self._in, self._pos = b"", 0
                self._skip_line = True
                self._error(R.R500_LINE_TOO_LONG)
                return True
            return False
        self._pos = nl + 1
        if nl + 1 - pos > self._limits.max_command_line:
            self._error(R.R500_LINE_TOO_LONG)  # RFC 5321 4.5.3.1.4
        elif nl == pos or buf[nl - 1] != 13:  # RFC 5321 2.3.8: lines end with CRLF
            self._error(R.R500_BARE_LF)
        else:
            try:
                command = parse_command(buf[pos : nl - 1])
            except CommandError as e:
                self._error(e.reply)
                if e.fatal:
                    self._closing = True
            else:
                self._dispatch(command)
        return True

    def _dispatch(self, command: Command) -> None:
        lmtp = self.info.lmtp
        if next_state(lmtp, self.state, command) is None:
            if isinstance(command, Bdat):  # the chunk follows regardless: swallow it
                reply = sequence_error(lmtp, self.state, command)
                self._start_chunk(command, discard=True, reply=reply)
                return
            self._error(sequence_error(lmtp, self.state, command))
            return
        handler = _HANDLERS.get(type(command))
        if handler is None:
            raise RuntimeError(f"no handler for {command!r}")  # a table/handler mismatch
        handler(self, command)

    def _on_hello(self, command: Ehlo | Helo | Lhlo) -> None:
        self._wait(command, HelloReceived(command))

    def _on_mail(self, command: MailFrom) -> None:
        params = command.params
        if self.config.require_tls and not self.info.tls:
            self._refuse(command, R.R530_TLS_REQUIRED)  # RFC 3207 4
        elif self.config.submission and self.info.authenticated is None:
            self._refuse(command, R.R530_AUTH_REQUIRED)  # RFC 4954 6, RFC 6409 4.1
        elif params.size is not None and params.size > self._limits.max_message_size:
            self._refuse(command, R.R552_TOO_BIG)  # RFC 1870 6.2
        elif command.sender is not None and command.sender.is_utf8 and not params.smtputf8:
            self._refuse(command, R.R553_NEEDS_SMTPUTF8)  # RFC 6531 3.4
        else:
            self._wait(command, MailReceived(command))

    def _on_rcpt(self, command: RcptTo) -> None:
        txn = self.transaction
        assert txn is not None
        rcpt = command.recipient
        if len(txn.recipients) >= self._limits.max_recipients:
            self._send(R.R452_TOO_MANY_RCPTS)  # RFC 5321 4.5.3.1.10; not a peer error
        elif rcpt.is_utf8 and not txn.smtputf8:
            self._refuse(command, R.R553_NEEDS_SMTPUTF8)
        elif not self._may_relay() and (rcpt.has_relay_syntax or not self._is_local(rcpt)):
            self._refuse(command, R.R550_RELAY_DENIED)
        else:
            self._wait(command, RcptReceived(command, txn))

    def _on_data(self, command: Data) -> None:
        txn = self.transaction
        assert txn is not None
        if txn.binary:
            self._error(R.R503_BINARYMIME_NEEDS_BDAT)  # RFC 3030 3
            return
        self._start_message(txn)
        self._send(R.R354_START_DATA)
        receiver = self._data_receiver
        if receiver is None:
            receiver = DataReceiver(self._limits, self.config.bare_line_endings)
            self._data_receiver = receiver
        else:
            receiver.reset()
        self._receiver = receiver
        self._bdat = None

    def _on_bdat(self, command: Bdat) -> None:
        txn = self.transaction
        assert txn is not None
        if txn.size + command.size > self._limits.max_message_size:
            self._start_chunk(command, discard=True, reply=R.R552_TOO_BIG, abort=True)
            return
        if not txn.started:
            self._start_message(txn)
            txn.chunked = True
            self._checker = ContentChecker(
                self._limits, self.config.bare_line_endings, text=not txn.binary, lines=False
            )
        self._start_chunk(command, discard=False, reply=None)

    def _on_rset(self, command: Rset) -> None:
        self._end_transaction(None)
        self._send(R.R250_RESET)

    def _on_quit(self, command: Quit) -> None:
        self._end_transaction(None)
        self._send(R.R221_BYE)
        self._closing = True

    def _on_simple(self, command: Command) -> None:
        if isinstance(command, Vrfy):
            self._send(R.R252_CANNOT_VRFY)  # RFC 5321 3.5.3: never confirms an address
        elif isinstance(command, Expn):
            self._error(R.R502_EXPN_DISABLED)  # 7.3: lists are not disclosed
        elif isinstance(command, Help):
            self._send(R.R214_HELP)
        elif isinstance(command, NotImplementedVerb):
            self._error(R.R502_NOT_IMPLEMENTED)
        elif isinstance(command, HttpRequest):
            self._close_with(R.R221_HTTP)
        else:
            self._send(R.R250_OK)  # NOOP

    # --- decisions applied ------------------------------------------------------------------

    def _decided_hello(self, command: Ehlo | Helo | Lhlo, reply: Reply | None) -> None:
        if reply is not None and not reply.is_positive:
            self._error(reply)
            return
        self._end_transaction(None)
        esmtp = not isinstance(command, Helo)
        self.info = _info_with_hello(self.info, command.domain, esmtp)
        self.state = State.GREETED
        self._send(reply or self._hello_reply(esmtp))

    def _hello_reply(self, esmtp: bool) -> Reply:
        host = self.config.hostname
        if not esmtp:
            return _helo_reply(host)
        return _ehlo_reply(host, self.capabilities())

    def capabilities(self) -> tuple[str, ...]:
        """The EHLO keywords; each one is implemented, not just advertised."""
        return (
            "PIPELINING",  # RFC 2920
            f"SIZE {self._limits.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "BINARYMIME",  # RFC 3030
            "CHUNKING",  # RFC 3030
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "DSN",  # RFC 3461
            *self._security_capabilities(),
        )

    def _security_capabilities(self) -> list[str]:
        extra = []
        if self.config.starttls and not self.info.tls:
            extra.append("STARTTLS")  # RFC 3207
        if self._auth_offered():
            extra.append(sasl_ehlo_keyword())  # RFC 4954 3
        if self.info.trusted:
            extra.append(XCLIENT_KEYWORD)
        return extra

    def _decided_mail(self, command: MailFrom, reply: Reply | None) -> None:
        if reply is not None and not reply.is_positive:
            self._refuse(command, reply)
            return
        self.transaction = Transaction(command.sender, command.params)
        self.state = State.MAIL
        self._send(reply or R.R250_SENDER_OK)

    def _decided_rcpt(self, command: RcptTo, reply: Reply | None) -> None:
        if reply is not None and not reply.is_positive:
            self._refuse(command, reply)
            return
        txn = self.transaction
        assert txn is not None
        txn.recipients.append((command.recipient, command.params))
        self.state = State.RCPT
        self._send(reply or R.R250_RCPT_OK)

    def _decided_message(self, replies: list[Reply]) -> None:
        for reply in replies:
            self._send(reply)
        self.transaction = None
        self.state = State.GREETED

    # --- body mode --------------------------------------------------------------------------

    def _start_message(self, txn: Transaction) -> None:
        txn.started = True
        self._events.append(MessageStarted(txn))

    def _start_chunk(
        self, command: Bdat, *, discard: bool, reply: Reply | None, abort: bool = False
    ) -> None:
        if abort:
            self._end_transaction(reply)
        self._bdat = command if reply is None else None
        self._chunk_reply = reply
        self._receiver = BdatReceiver(command.size, discard=discard)
        if command.size == 0:
            self._chunk_done()

    def _feed_body(self) -> None:
        receiver = self._receiver
        data = self._in[self._pos :] if self._pos else self._in
        self._pos = 0
        if isinstance(receiver, DataReceiver):
            pieces, end = receiver.feed(data)
            self._in = data[end:] if end is not None else b""
            txn = self.transaction
            assert txn is not None
            txn.size = receiver.size
            self._events.extend(MessageData(p) for p in pieces)
            if end is not None:
                self._receiver = None
                self._body_done(receiver.finish())
            return
        assert receiver is not None
        piece, taken = receiver.feed(data)
        self._in = data[taken:]
        if piece:
            self._chunk_data(piece)
        if receiver.done:
            self._chunk_done()

    def _chunk_data(self, piece: bytes) -> None:
        txn, checker = self.transaction, self._checker
        assert txn is not None and checker is not None
        txn.size += len(piece)
        if checker.error is None and checker.feed(piece) is None:
            self._events.append(MessageData(piece))

    def _chunk_done(self) -> None:
        self._receiver = None
        command, reply = self._bdat, self._chunk_reply
        if command is None:  # a refused chunk, now swallowed
            if reply is not None:
                self._error(reply)
            return
        checker = self._checker
        assert checker is not None
        self.state = State.BDAT
        if checker.error is not None:
            self._body_done(checker.error)
        elif command.last:
            self._body_done(checker.finish())
        else:
            self._send(R.R250_CHUNK_OK.format(size=str(command.size)))

    def _body_done(self, error: Reply | None) -> None:
        """The whole body is in: an error ends the transaction, else ask for delivery."""
        txn = self.transaction
        assert txn is not None
        if error is not None:
            # LMTP answers the end of the body once per accepted recipient (RFC 2033
            # 4.2), a refusal too; a BDAT chunk before LAST gets one reply (RFC 3030 2).
            bdat = self._bdat
            whole = self.info.lmtp and (bdat is None or bdat.last)
            self._end_transaction(error)
            for _ in range(len(txn.recipients) - 1 if whole else 0):
                self._send(error)
            self._error(error)  # one peer error, however many replies
            return
        self._wait(self._bdat or Data(), MessageComplete(txn))


def _info_with_hello(i: SessionInfo, helo: str, esmtp: bool) -> SessionInfo:
    """``replace(i, helo=helo, esmtp=esmtp)``, for every EHLO: each field named, at half
    the cost of dataclasses.replace.  (tests/server/test_protocol.py holds it to
    replace(), field by field.)"""
    return SessionInfo(helo=helo, esmtp=esmtp, lmtp=i.lmtp, tls=i.tls,
                       authenticated=i.authenticated, trusted=i.trusted)


# What decide() applies, by the pending command's type; the rest are messages.
_DECIDED: Final[dict[type[Command], Callable[[ServerSession, Any, Reply | None], None]]] = {
    Ehlo: ServerSession._decided_hello,
    Helo: ServerSession._decided_hello,
    Lhlo: ServerSession._decided_hello,
    MailFrom: ServerSession._decided_mail,
    RcptTo: ServerSession._decided_rcpt,
}

_HANDLERS: Final[dict[type[Command], Callable[[ServerSession, Any], None]]] = {
    Ehlo: ServerSession._on_hello,
    Helo: ServerSession._on_hello,
    Lhlo: ServerSession._on_hello,
    MailFrom: ServerSession._on_mail,
    RcptTo: ServerSession._on_rcpt,
    Data: ServerSession._on_data,
    Bdat: ServerSession._on_bdat,
    Rset: ServerSession._on_rset,
    Quit: ServerSession._on_quit,
    StartTls: ServerSession._on_starttls,
    Auth: ServerSession._on_auth,
    XClientCommand: ServerSession._on_xclient,
    **{
        c: ServerSession._on_simple
        for c in (Noop, Vrfy, Expn, Help, NotImplementedVerb, HttpRequest)
    },
}


# Replies every session sends, the same for a listener: built and encoded once.
@functools.lru_cache(maxsize=64)
def _helo_reply(hostname: str) -> Reply:
    return R.R250_HELO.format(hostname=hostname)


@functools.lru_cache(maxsize=256)
def _ehlo_reply(hostname: str, capabilities: tuple[str, ...]) -> Reply:
    return Reply(250, None, (hostname, *capabilities))
