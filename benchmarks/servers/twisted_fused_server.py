"""A reference, not a peer: what maitred_tx's hot-path checks cost in Twisted when
parsing, state and checks are fused into one class.

It receives mail as the benchmark's load generators send it, and checks on the way what
maitred_tx checks for those commands: CRLF line endings and the 512-octet command line
(RFC 5321 2.3.8, 4.5.3.1.4), the command sequence, the syntax of the HELO name and of
both paths, SIZE against the limit (RFC 1870), local recipient domains (no relaying),
the recipient limit; in the DATA body the end marker, dot-unstuffing, the size limit,
NUL, bare CR or LF and the 1000-octet line, carried across reads, and the header
block's size.  Each message gets an id and goes to a sink object (write, close), each
connection one idle timer.  Every reply carries its enhanced status code.

What it leaves out is what a product adds around that: an application interface
(decisions, envelopes, outcomes), a log event per message, limits per client, BDAT,
AUTH, STARTTLS, SMTPUTF8, DSN, LMTP, PROXY.  It is not a server anyone should run.

twisted-floor (no checks at all) is the least any Twisted server spends on the
benchmark's I/O; the difference between this one and the floor is what the SMTP work
itself must cost at least, written this way (benchmarks/README.md, "Where targets are
missed").  ``FusedWithInterfaces`` adds what maitred_tx's interfaces cost on top (the
delivery's hooks, the envelope, the outcome, the log event); benchmarks/inprocess.py
shows both beside maitred_tx and twisted.mail.

Run as ``python benchmarks/servers/twisted_fused_server.py --port N [--stats FILE]``;
it listens on 127.0.0.1 only and behaves like twisted_mail_server.py (READY, stats).
"""

from __future__ import annotations

import itertools
import re
import time
from functools import partial
from typing import Any

from twisted.internet import protocol, reactor
from twisted_mail_server import Counter, CountingFactory, main

from maitred_tx.delivery.discard import DiscardDelivery
from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.server.logevents import emit_info as _emit_info
from maitred_tx.server.logevents import message_summary as _message_summary
from maitred_tx.server.policy import message_reply, new_id
from maitred_tx.server.protocol_base import _write
from maitred_tx.smtp.address import plain_mailbox
from maitred_tx.smtp.params import NO_MAIL_PARAMS, NO_RCPT_PARAMS

MAX_SIZE = 64 * 1024 * 1024
MAX_COMMAND_LINE = 512  # CRLF included
MAX_TEXT_LINE = 1000  # CRLF included
MAX_HEADER = 1024 * 1024
MAX_RCPTS = 100
MAX_ERRORS = 20
IDLE_TIMEOUT = 300.0
LOCAL_DOMAINS = frozenset({"localhost"})

_END = b"\r\n.\r\n"
_ATOM = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = _LABEL + rb"(?:\." + _LABEL + rb")*"
_HELLO_NAME = _DOMAIN + rb"|\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45})\]"  # or a literal
_PATH = rb"<(" + _ATOM + rb"(?:\." + _ATOM + rb")*)@(" + _DOMAIN + rb")>"
_COMMAND = re.compile(
    rb"MAIL FROM:" + _PATH + rb"(?: SIZE=([0-9]{1,20}))?"
    rb"|RCPT TO:" + _PATH + rb"|(EHLO|HELO) (" + _HELLO_NAME + rb")",
    re.IGNORECASE,
)
_EHLO = (
    b"250-localhost\r\n250-PIPELINING\r\n250-SIZE 67108864\r\n250-8BITMIME\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
_IDS = itertools.count(1)
# The session's states: before HELO, after it, after MAIL, after an accepted RCPT.
CONNECTED, GREETED, MAIL, RCPT = range(4)


class Sink:
    """The delivery's side of one message: counts what it is given."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def close(self) -> None:
        self.counter.messages += 1
        self.counter.bytes += self.size


class Fused(protocol.Protocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.buf = b""
        self.state = CONNECTED
        self.errors = 0
        self.sender: Any = None
        self.recipients: list[Any] = []
        self.sink: Any = None  # a DATA body is being read
        self.message_id = ""
        self.tail = b""  # what may begin CRLF "." CRLF, held for the next read
        self.skip = 0  # the DATA line's CRLF, held as the first line's start
        self.size = 0
        self.refusal: bytes | None = None  # the body's first violation
        self.line = 0  # the length of the body's unfinished last line
        self.header = 0  # header octets seen; -1 once the header block ended
        self.header_tail = b""  # the last octets before this piece, where CRLF CRLF may start
        self.timer: Any = None
        self.last_read = 0.0

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.setTcpNoDelay(True)
        self.peer = transport.getPeer().host
        self.local = transport.getHost().host
        self.last_read = reactor.seconds()  # type: ignore[attr-defined]
        self.timer = reactor.callLater(IDLE_TIMEOUT, self._idle)  # type: ignore[attr-defined]
        _write(transport, b"220 localhost ESMTP fused reference\r\n")

    def connectionLost(self, reason: Any = None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def _idle(self) -> None:
        # One timer, as maitred_tx's: a read only notes its time, and the timer sleeps
        # on when it fires after one.
        left = self.last_read + IDLE_TIMEOUT - reactor.seconds()  # type: ignore[attr-defined]
        if left > 0:
            self.timer = reactor.callLater(left, self._idle)  # type: ignore[attr-defined]
            return
        _write(self.transport, b"421 4.4.2 localhost idle too long\r\n")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.last_read = reactor.seconds()  # type: ignore[attr-defined]
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        while buf:
            if self.sink is not None:
                buf = self._body(buf, out)
                if self.sink is not None:
                    break
                continue
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_COMMAND_LINE:
                    self._error(out, b"500 5.5.6 Line too long\r\n")
                    buf = b""
                break
            if nl == 0 or buf[nl - 1] != 13:
                self._error(out, b"500 5.5.2 Line must end with CRLF\r\n")
            elif nl + 1 > MAX_COMMAND_LINE:
                self._error(out, b"500 5.5.6 Line too long\r\n")
            elif self._command(buf[: nl - 1], out):
                self.state = -1  # QUIT
            if self.state < 0:  # QUIT, or too many errors
                _write(self.transport, b"".join(out))
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            buf = buf[nl + 1 :]
        self.buf = buf
        if out:
            _write(self.transport, b"".join(out))

    def _error(self, out: list[bytes], reply: bytes) -> None:
        out.append(reply)
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            out.append(b"421 4.7.0 localhost Too many errors\r\n")
            self.state = -1

    def _command(self, line: bytes, out: list[bytes]) -> bool:
        """Answer one command line (without its CRLF); True when the session ends."""
        verb = line[:4].upper()
        if len(line) == 4:
            if verb == b"DATA":
                if self.state != RCPT:
                    self._error(out, b"503 5.5.1 Error: need RCPT command\r\n")
                    return self.state < 0
                self.sink = self._open()
                self.tail, self.skip, self.size, self.line, self.header = b"\r\n", 2, 0, 0, 0
                self.header_tail = b"\r\n"  # a body that starts with CRLF has no header
                self.refusal = None
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                return False
            if verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                return True
            if verb == b"RSET":
                self.state = min(self.state, GREETED)
                self.recipients = []
                out.append(b"250 2.0.0 Reset\r\n")
                return False
            if verb == b"NOOP":
                out.append(b"250 2.0.0 OK\r\n")
                return False
        match = _COMMAND.fullmatch(line)
        if match is None:
            self._error(out, b"500 5.5.2 Syntax error or unknown command\r\n")
            return self.state < 0
        mail_local, mail_domain, size, rcpt_local, rcpt_domain, hello, name = match.groups()
        if hello is not None:
            self.helo = name.decode("ascii")
            self.state, self.recipients = GREETED, []
            out.append(_EHLO if hello.upper() == b"EHLO" else b"250 localhost\r\n")
        elif mail_local is not None:
            if self.state != GREETED:
                self._error(out, b"503 5.5.1 Error: send HELO/EHLO first\r\n")
            elif size is not None and int(size) > MAX_SIZE:
                self._error(out, b"552 5.3.4 Message size exceeds fixed limit\r\n")
            else:
                self.sender = self._sender(mail_local, mail_domain)
                self.state, self.recipients = MAIL, []
                out.append(b"250 2.1.0 Sender OK\r\n")
        else:
            domain = rcpt_domain.decode("ascii").lower()
            if self.state < MAIL:
                self._error(out, b"503 5.5.1 Error: need MAIL command\r\n")
            elif len(self.recipients) >= MAX_RCPTS:
                out.append(b"452 4.5.3 Too many recipients\r\n")
            elif domain not in LOCAL_DOMAINS:
                self._error(out, b"550 5.7.1 Relay access denied\r\n")
            else:
                self.recipients.append(self._recipient(rcpt_local, domain))
                self.state = RCPT
                out.append(b"250 2.1.5 Recipient OK\r\n")
        return self.state < 0

    # --- what a delivery sees: the hooks FusedWithInterfaces replaces -----------------------

    def _sender(self, local: bytes, domain: bytes) -> Any:
        return (local.decode("ascii"), domain.decode("ascii").lower())

    def _recipient(self, local: bytes, domain: str) -> Any:
        return (local.decode("ascii"), domain)

    def _open(self) -> Any:
        self.message_id = f"F{next(_IDS):09X}"
        return Sink(self.counter)

    def _close(self, sink: Any) -> bytes:
        sink.close()
        return b"250 2.0.0 OK: queued as %s\r\n" % self.message_id.encode()

    def _body(self, data: bytes, out: list[bytes]) -> bytes:
        """Take the body's part of *data*; return what follows its end (commands)."""
        buf = self.tail + data if self.tail else data
        marker = buf.find(_END)
        if marker >= 0:
            cut, rest = marker + 2, buf[marker + len(_END) :]
        else:
            cut, rest = len(buf) - _held(buf), None
        self.tail = buf[cut:] if rest is None else b""
        piece = b"\r\n".join(buf[:cut].split(b"\r\n."))  # dot-unstuffing (4.5.2)
        if self.skip:
            skip = min(self.skip, len(piece))
            piece, self.skip = piece[skip:], self.skip - skip
        self.size += len(piece)
        if self.refusal is None and piece:
            self.refusal = self._check(piece)
            if self.refusal is None:
                assert self.sink is not None
                self.sink.write(piece)
        if rest is None:
            return b""
        sink, self.sink = self.sink, None
        if self.refusal is not None:
            self._error(out, self.refusal)
        else:
            out.append(self._close(sink))
        self.state, self.recipients = GREETED, []
        return rest

    def _check(self, piece: bytes) -> bytes | None:
        """The first violation in this piece of the unstuffed body, or None."""
        if self.size > MAX_SIZE:
            return b"552 5.3.4 Message size exceeds fixed limit\r\n"
        if self.header >= 0:  # RFC 5322 2.1: the header block ends at the first empty line
            probe = self.header_tail + piece
            end = probe.find(b"\r\n\r\n")
            if end >= 0:  # the block, its last CRLF included
                size, self.header = self.header + end + 2 - len(self.header_tail), -1
            else:
                size = self.header = self.header + len(piece)
                self.header_tail = probe[-3:]
            if size > MAX_HEADER:
                return b"552 5.3.4 Header block too big\r\n"
        if b"\0" in piece:
            return b"550 5.6.0 NUL character not allowed\r\n"
        # A piece never ends inside a CRLF (the held tail keeps a final CR), so every
        # break must be a CRLF: two octets per break that splitlines() found.
        lengths = list(map(len, piece.splitlines())) or [0]
        final = piece[-1]
        breaks = len(lengths) - 1 + (final == 10)
        if len(piece) - sum(lengths) != 2 * breaks:
            return b"550 5.6.0 Bare CR or LF not allowed\r\n"
        if final == 10:
            lengths.append(0)
        lengths[0] += self.line  # the line the previous piece left unfinished
        if max(lengths) + 2 > MAX_TEXT_LINE:
            return b"554 5.6.0 Line too long\r\n"
        self.line = lengths[-1]
        return None


def _held(buf: bytes) -> int:
    """How many octets at the end of *buf* may begin CRLF "." CRLF."""
    for n in (4, 3, 2, 1):
        if buf.endswith(_END[:n]):
            return n
    return 0


class FusedWithInterfaces(Fused):
    """The same, with what maitred_tx's interfaces cost on top of the fused checks: a
    SessionContext per connection, Mailbox values, the delivery's hooks called
    (mail_from, rcpt_to, open_message with an Envelope, the sink's write and close),
    the outcome mapped to its reply, and the per-message log event (to whatever
    observers there are).  Only benchmarks/inprocess.py uses it: it estimates what a
    fused design would cost that keeps the application's side unchanged."""

    def __init__(self, counter: Counter) -> None:
        super().__init__(counter)
        self.delivery = DiscardDelivery()
        self.started = 0.0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.context = SessionContext(
            session_id=new_id(), hostname="localhost", peer_host=self.peer, peer_port=0,
            local_host=self.local, local_port=0,
        )

    def _sender(self, local: bytes, domain: bytes) -> Any:
        sender = plain_mailbox(local.decode("ascii"), domain.decode("ascii"))
        self.message_id = new_id()  # the transaction's, as maitred_tx names it at MAIL
        self.delivery.mail_from(self.context, sender, NO_MAIL_PARAMS)
        return sender

    def _recipient(self, local: bytes, domain: str) -> Any:
        recipient = Recipient(plain_mailbox(local.decode("ascii"), domain), NO_RCPT_PARAMS)
        self.delivery.rcpt_to(self.context, self._envelope(), recipient.mailbox, NO_RCPT_PARAMS)
        return recipient

    def _envelope(self) -> Envelope:
        return Envelope(self.context, self.message_id, self.sender, NO_MAIL_PARAMS,
                        tuple(self.recipients), time.time(), False)

    def _open(self) -> Any:
        self.started = time.monotonic()
        return self.delivery.open_message(self._envelope())

    def _close(self, sink: Any) -> bytes:
        reply = message_reply(sink.close(), len(self.recipients))[0]
        context, sender = self.context, str(self.sender)
        recipients = [str(r.mailbox) for r in self.recipients]
        _emit_info({
            "summary": partial(_message_summary, context.peer_host, self.message_id, sender,
                               recipients, reply.code, reply.status, None),
            "peer": context.peer_host, "session_id": context.session_id,
            "message_id": self.message_id, "sender": sender, "recipients": recipients,
            "size": self.size, "code": reply.code, "status": reply.status, "auth": None,
            "duration": time.monotonic() - self.started,
        })
        return reply.encode(True)


class FusedFactory(CountingFactory):
    protocol_class = Fused


class FusedWithInterfacesFactory(CountingFactory):
    protocol_class = FusedWithInterfaces


if __name__ == "__main__":
    main(FusedFactory)
