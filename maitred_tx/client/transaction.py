"""One mail transaction as a pure state machine: commands out, replies in, a result per
recipient.

The transaction is a queue of expected replies.  With PIPELINING (RFC 2920 3.1) the
MAIL, every RCPT and the DATA (or the first BDAT chunk with its data, RFC 3030 4.2)
go in one write and the replies are matched in order; without it one command is sent
per reply.  Either way the same rules read the replies:

- a failed MAIL fails every recipient with its reply; a failed RCPT fails its
  recipient; a failed DATA or BDAT fails the recipients accepted so far;
- RFC 2920 3.1: when no RCPT was accepted but the pipelined DATA got 354 anyway, the
  client sends a lone "." (an empty message, as Postfix does) and delivers to nobody;
- RFC 3030 2: after a failed BDAT no more chunks are sent, and the server's
  transaction must be cleared by RSET (which the next transaction sends first);
- the final reply of SMTP applies to every accepted recipient; LMTP (RFC 2033 4.2)
  answers once per accepted recipient, in RCPT order;
- 421 at any point means the server is closing: every recipient without an answer
  gets it (RFC 5321 3.8); a lost connection or a timeout leaves them temporary.

With BDAT the body is not streamed until the MAIL/RCPT replies have come, so a large
message is not sent to a server that refused every recipient: one chunk at most.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from maitred_tx.client.body import BodyScanner, DotStuffer
from maitred_tx.client.errors import ProtocolViolation, ServerRefused, SMTPClientError
from maitred_tx.client.message import InvalidBody, TransactionPlan
from maitred_tx.client.replies import ServerReply
from maitred_tx.client.timeouts import Phase
from maitred_tx.smtp.params import BodyType

__all__ = ["Outcome", "RecipientResult", "SendResult", "Transaction"]


class Outcome(enum.Enum):
    """What became of one recipient, in the terms a sender acts on."""

    DELIVERED = "delivered"  # the server took responsibility (2xx after the body)
    TEMPORARY = "temporary"  # 4xx, connection lost, timeout: keep it and retry later
    PERMANENT = "permanent"  # 5xx: give up (bounce)


def outcome_of(reply: ServerReply | None) -> Outcome:
    if reply is None or reply.is_transient or reply.is_intermediate:
        return Outcome.TEMPORARY
    return Outcome.PERMANENT if reply.is_permanent else Outcome.DELIVERED


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """One recipient: its outcome, the reply that decided it (None when the connection
    ended first) and its RCPT reply (None when RCPT was never answered)."""

    recipient: str
    outcome: Outcome
    reply: ServerReply | None
    rcpt_reply: ServerReply | None

    @property
    def delivered(self) -> bool:
        return self.outcome is Outcome.DELIVERED


@dataclass(frozen=True, slots=True)
class SendResult:
    """The result of one message: one :class:`RecipientResult` per recipient, in order."""

    recipients: tuple[RecipientResult, ...]
    mail_reply: ServerReply | None
    # SMTP: the reply after the body; a refused DATA's reply; else (LMTP) None.
    data_reply: ServerReply | None
    error: SMTPClientError | None = None  # what ended the connection, if anything did

    @property
    def delivered(self) -> tuple[RecipientResult, ...]:
        return self._having(Outcome.DELIVERED)

    @property
    def temporary(self) -> tuple[RecipientResult, ...]:
        return self._having(Outcome.TEMPORARY)

    @property
    def permanent(self) -> tuple[RecipientResult, ...]:
        return self._having(Outcome.PERMANENT)

    @property
    def all_delivered(self) -> bool:
        return all(r.delivered for r in self.recipients)

    def __getitem__(self, recipient: str) -> RecipientResult:
        """The result for *recipient* (the first, if it was given twice)."""
        for result in self.recipients:
            if result.recipient == recipient:
                return result
        raise KeyError(recipient)

    def _having(self, outcome: Outcome) -> tuple[RecipientResult, ...]:
        return tuple(r for r in self.recipients if r.outcome is outcome)


class _Kind(enum.Enum):
    """What an expected reply answers; the value is the phase whose timeout applies."""

    RSET = ("rset", Phase.COMMAND)
    MAIL = ("mail", Phase.MAIL)
    RCPT = ("rcpt", Phase.RCPT)
    DATA = ("data", Phase.DATA_INIT)
    BDAT = ("bdat", Phase.DATA_BLOCK)  # a chunk that is not the last
    END = ("end", Phase.DATA_DONE)  # after the body: SMTP's reply, or LMTP's only one
    LMTP = ("lmtp", Phase.DATA_DONE)  # LMTP: the reply for one accepted recipient
    EMPTY = ("empty", Phase.DATA_DONE)  # the lone "." after 354 with no recipient

    @property
    def phase(self) -> Phase:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class _Expect:
    kind: _Kind
    index: int = -1  # the recipient, for RCPT and LMTP


class Transaction:
    """Drives one message.  The glue calls :meth:`start` with the body's first chunk,
    writes what each method returns, feeds replies to :meth:`on_reply`, sends the
    other chunks through :meth:`body_chunk` while :attr:`wants_body`, and stops when
    :attr:`done`; :attr:`result` is then the outcome per recipient."""

    def __init__(self, plan: TransactionPlan, *, lmtp: bool = False) -> None:
        self.plan = plan
        self.lmtp = lmtp
        count = len(plan.recipients)
        self._rcpt_replies: list[ServerReply | None] = [None] * count
        self._final: list[ServerReply | None] = [None] * count
        # Recipients failed by a positive reply that answered nothing we asked (250 to
        # DATA, a reply in the middle of the body): not delivered, so temporary.
        self._out_of_step: set[int] = set()
        self._accepted: list[int] = []
        self._expect: deque[_Expect] = deque()
        self._unsent: deque[tuple[bytes, _Expect]] = deque()  # without PIPELINING
        self._first = b""
        self._first_last = True
        self._stuffer = DotStuffer()
        self._scanner = BodyScanner() if plan.verify else None
        self.mail_reply: ServerReply | None = None
        self.data_reply: ServerReply | None = None
        self.error: SMTPClientError | None = None
        self.wants_body = False  # the glue may send the next chunk now
        self.done = False
        self.must_close = False  # the server closes (421), or a DATA body was cut short
        self._mail_ok = False
        self._started = False  # start() wrote its commands (RSET first if owed)
        self._go_sent = False  # DATA or the first BDAT went out
        self._failed = False  # DATA/BDAT refused or the body aborted: send no more
        self._completed = False  # the server's transaction ended with its final reply

    # --- what the glue asks ------------------------------------------------------------
    @property
    def phase(self) -> Phase | None:
        """The kind of reply awaited now (for its timeout), or None."""
        return self._expect[0].kind.phase if self._expect else None

    @property
    def needs_rset(self) -> bool:
        """The server may still hold this transaction, or the one before it when this
        one never started (its body failed before a byte was sent): RSET before the
        next MAIL (RFC 3030 2 requires it after a failed BDAT)."""
        owed = self.plan.reset_first and not self._started
        return owed or (self._mail_ok and not self._completed)

    @property
    def result(self) -> SendResult:
        results = tuple(
            RecipientResult(
                address,
                Outcome.TEMPORARY if i in self._out_of_step else outcome_of(final),
                final, rcpt)
            for i, (address, final, rcpt) in enumerate(zip(
                self.plan.recipients, self._final, self._rcpt_replies, strict=True))
        )
        return SendResult(results, self.mail_reply, self.data_reply, self.error)

    # --- inputs --------------------------------------------------------------------------
    def start(self, first: bytes, last: bool) -> bytes:
        """The first write: everything up to DATA/BDAT when pipelining, else MAIL (or
        RSET).  *first* is the body's first chunk, *last* if it is the whole body;
        InvalidBody if it fails the content check (nothing is sent then)."""
        self._check_content(first, last)
        self._started = True
        self._first, self._first_last = first, last
        steps: list[tuple[bytes, _Expect]] = []
        if self.plan.reset_first:
            steps.append((b"RSET\r\n", _Expect(_Kind.RSET)))
        steps.append((self.plan.mail, _Expect(_Kind.MAIL)))
        steps += [(line, _Expect(_Kind.RCPT, i)) for i, line in enumerate(self.plan.rcpts)]
        if not self.plan.pipelined:
            self._unsent.extend(steps)
            return self._send_next()
        steps.append(self._go())
        self._expect.extend(expect for _, expect in steps)
        return b"".join(data for data, _ in steps)

    def on_reply(self, reply: ServerReply) -> bytes:
        """Read one reply; what to write next."""
        if not self._expect:
            self._unexpected(reply)
            return b""
        expect = self._expect.popleft()
        if reply.code == 421:  # RFC 5321 3.8: the server is closing the channel
            self._closing(reply)
            return b""
        out = self._read(expect, reply)
        if not self._expect:
            out += self._send_next()
        self._settle()
        return out

    def body_chunk(self, chunk: bytes, last: bool) -> bytes:
        """The next chunk of the body as it goes on the wire.  InvalidBody if it fails
        the content check: then call :meth:`abort`."""
        if not self.wants_body:
            raise RuntimeError("the transaction does not want body data now")
        self._check_content(chunk, last)
        if self.plan.bdat:
            command, expect = self._bdat_command(len(chunk), last)
            self._expect.append(expect)
            out = command + chunk
        else:
            out = self._stuffer.feed(chunk)
            if last:
                out += self._stuffer.finish()
                self._expect.append(_Expect(_Kind.END))
        # Without PIPELINING every BDAT waits for its reply (RFC 3030 4.2).
        self.wants_body = not last and (self.plan.pipelined or not self.plan.bdat)
        self._settle()
        return out

    def abort(self, error: SMTPClientError) -> None:
        """Send no more of the body (it failed its check, or its source failed).  BDAT:
        the chunks in flight are still answered, then the next transaction's RSET
        clears the rest; DATA can only be ended by closing (RFC 5321 has no cancel)."""
        self.wants_body = False
        self._failed = True
        if self.error is None:
            self.error = error
        if not self.plan.bdat:
            self.must_close = True
        self._settle()

    def connection_lost(self, error: SMTPClientError) -> None:
        """The connection ended: whatever was not answered stays temporary."""
        if self.error is None:
            self.error = error
        self._expect.clear()
        self._unsent.clear()
        self.wants_body = False
        self.done = True

    # --- the rules -----------------------------------------------------------------------
    def _go(self) -> tuple[bytes, _Expect]:
        """DATA, or the first BDAT with its chunk."""
        self._go_sent = True
        if not self.plan.bdat:
            return b"DATA\r\n", _Expect(_Kind.DATA)
        first, self._first = self._first, b""
        command, expect = self._bdat_command(len(first), self._first_last)
        return command + first, expect

    @staticmethod
    def _bdat_command(size: int, last: bool) -> tuple[bytes, _Expect]:
        if last:
            return f"BDAT {size} LAST\r\n".encode(), _Expect(_Kind.END)
        return f"BDAT {size}\r\n".encode(), _Expect(_Kind.BDAT)

    def _send_next(self) -> bytes:
        """Without PIPELINING: the next command once the last one is answered."""
        if self._unsent:
            data, expect = self._unsent.popleft()
            self._expect.append(expect)
            return data
        if self._go_sent or self._failed or not self._accepted:
            return b""
        data, expect = self._go()
        self._expect.append(expect)
        return data

    def _read(self, expect: _Expect, reply: ServerReply) -> bytes:
        kind = expect.kind
        if kind is _Kind.MAIL:
            self.mail_reply = reply
            self._mail_ok = reply.is_positive
            if not self._mail_ok:
                self._fail_open(reply)
                self._unsent.clear()  # no RCPT after a refused MAIL
        elif kind is _Kind.RCPT:
            self._read_rcpt(expect.index, reply)
        elif kind is _Kind.DATA:
            return self._read_data(reply)
        elif kind is _Kind.BDAT:
            if not reply.is_positive:
                self._fail_open(reply)
                self._failed = True
                self.wants_body = False
            elif not self.plan.pipelined and not self._failed:
                self.wants_body = True  # RFC 3030 4.2: the next chunk after the reply
        elif kind is not _Kind.RSET:
            self._read_final(kind, expect.index, reply)
        return b""

    def _read_rcpt(self, index: int, reply: ServerReply) -> None:
        self._rcpt_replies[index] = reply
        if reply.is_positive and self._mail_ok:
            self._accepted.append(index)
        elif self._final[index] is None:
            self._final[index] = reply
        last = index == len(self._final) - 1
        if last and self.plan.pipelined and self.plan.bdat and not self._first_last:
            # Every RCPT is answered: the rest of the body flows if someone takes it.
            self.wants_body = bool(self._accepted) and not self._failed

    def _read_data(self, reply: ServerReply) -> bytes:
        if reply.code != 354:
            self.data_reply = reply
            self._fail_open(reply)
            self._failed = True
            return b""
        if not self._accepted:
            # RFC 2920 3.1: 354 although no RCPT succeeded: send an empty message.
            self._expect.append(_Expect(_Kind.EMPTY))
            return b".\r\n"
        first, self._first = self._first, b""
        out = self._stuffer.feed(first)
        if self._first_last:
            self._expect.append(_Expect(_Kind.END))
            return out + self._stuffer.finish()
        self.wants_body = True
        return out

    def _read_final(self, kind: _Kind, index: int, reply: ServerReply) -> None:
        # RFC 5321 4.1.1.4: the end of DATA clears the server's transaction whatever its
        # reply; a refused BDAT ... LAST does not (RFC 3030 2: the state is
        # indeterminate, RSET first; maitred's own server keeps the MAIL after a BDAT
        # with no recipient, and takes the next message's RCPTs and body into it).
        refused_chunk = self.plan.bdat and kind is _Kind.END and not reply.is_positive
        if not self._expect and not self._failed and not refused_chunk:
            self._completed = True
        if kind is _Kind.LMTP:
            self._final[index] = reply
        elif kind is _Kind.END:
            if not self.lmtp or not self._accepted:
                self.data_reply = reply
            for i in self._accepted:
                if self._final[i] is None:
                    self._final[i] = reply

    def _fail_open(self, reply: ServerReply) -> None:
        """Every recipient without a final reply fails with *reply* (temporarily if
        the server was out of step and *reply* is positive)."""
        for i, final in enumerate(self._final):
            if final is None:
                self._final[i] = reply
                if reply.is_positive:
                    self._out_of_step.add(i)

    def _closing(self, reply: ServerReply) -> None:
        self._fail_open(reply)
        self.must_close = True
        self.connection_lost(ServerRefused(f"the server is closing: {reply}", reply=reply))

    def _unexpected(self, reply: ServerReply) -> None:
        """A reply nothing asked for: a server that answers in the middle of the
        body (some do on a size limit) or one that is out of step.  Either way the
        stream is no longer known: fail what is open and close."""
        self._fail_open(reply)
        self.must_close = True
        self.connection_lost(
            ProtocolViolation(f"unexpected reply during the transaction: {reply}", reply=reply))

    def _settle(self) -> None:
        """Expand LMTP's per-recipient replies; notice the end."""
        head = self._expect[0] if self._expect else None
        if head is not None and head.kind is _Kind.END and self.lmtp and not self._failed:
            open_ = [i for i in self._accepted if self._final[i] is None]
            if open_:  # RFC 2033 4.2: one reply per accepted RCPT, in RCPT order
                self._expect.popleft()
                self._expect.extendleft(_Expect(_Kind.LMTP, i) for i in reversed(open_))
        if not self._expect and not self._unsent and not self.wants_body:
            self.done = True

    def _check_content(self, chunk: bytes, last: bool) -> None:
        scanner = self._scanner
        if scanner is None:
            return
        scan = scanner.feed(chunk)
        if last:
            scan = scanner.finish()
        if scan.problem is not None or (
            scan.eight_bit and self.plan.body_type is BodyType.SEVEN_BIT
        ):
            what = scan.problem.value if scan.problem is not None else "8-bit octets"
            raise InvalidBody(
                f"the body has {what}, which BODY={self.plan.body_type.value} cannot "
                "carry; pass body_type= to declare what it is")
