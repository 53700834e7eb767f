"""Transcript tests for ServerSession: client bytes in, (code, enhanced code) replies out.

A transcript is a list of steps:

- ``str``: one client command line; CRLF is appended;
- ``bytes``: raw client bytes, sent as is (body lines, BDAT chunks, bare line endings);
- ``(code, enhanced)``: the next reply the server must send, e.g. ``(250, "2.1.0")``;
  ``enhanced`` is None when the reply must carry no enhanced status code.

Expected replies follow the client step that causes them.  ``run`` plays the transcript
three times — all client bytes in one ``receive_data``, one call per line, one call per
byte — answering every decision at once (``accept`` unless a ``decide`` function is
given), and checks that all three give the same replies, the same events and the same
delivered bodies.  In the line and byte modes it also checks that the replies listed
after a step are out by the time that step has been fed: nothing is late, nothing early.

The greeting is checked by ``run`` itself (``greeting=``) and is not part of the steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.config import Config
from maitred_tx.smtp.events import AuthRequested, StartTlsRequested, XClientReceived
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.session import (
    NEED_DATA,
    PAUSED,
    CloseConnection,
    Event,
    HelloReceived,
    MailReceived,
    MessageAborted,
    MessageComplete,
    MessageData,
    MessageStarted,
    RcptReceived,
    ServerSession,
)

Expected = tuple[int, str | None]
Step = str | bytes | Expected
Answer = Reply | None | Sequence[Reply] | str  # str: the identity an AUTH logs in as
Decider = Callable[[Event], Answer]

GREETING: Expected = (220, None)
# The usual opening: EHLO, whose reply carries no enhanced code (RFC 2034 3).
EHLO: list[Step] = ["EHLO client.example", (250, None)]
HELO: list[Step] = ["HELO client.example", (250, None)]


# --- the wire form of replies ---------------------------------------------------------


@dataclass(frozen=True)
class WireReply:
    """One reply as read back from the wire."""

    code: int
    status: str | None
    lines: tuple[str, ...]  # text of each line, without code, separator and status

    @property
    def codes(self) -> Expected:
        return (self.code, self.status)


_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)")
_STATUS = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3}) (.*)")


def parse_replies(data: bytes) -> list[WireReply]:
    """Split server output into replies; multi-line replies use ``code-`` continuation."""
    assert data == b"" or data.endswith(b"\r\n"), data
    replies: list[WireReply] = []
    current: list[tuple[int, str]] = []
    for raw in data.split(b"\r\n")[:-1]:
        m = _LINE.fullmatch(raw)
        assert m is not None, f"malformed reply line {raw!r}"
        code = int(m[1])
        if current:
            assert code == current[0][0], f"code changes inside a multi-line reply: {raw!r}"
        current.append((code, m[3].decode("utf-8")))
        if m[2] == b" ":
            replies.append(_wire_reply(current))
            current = []
    assert not current, "unterminated multi-line reply"
    return replies


def _wire_reply(lines: list[tuple[int, str]]) -> WireReply:
    code = lines[0][0]
    matches = [_STATUS.fullmatch(text) for _, text in lines]
    if all(m is not None for m in matches):
        statuses = {m[1] for m in matches if m is not None}
        assert len(statuses) == 1, f"enhanced code changes inside a reply: {lines}"
        status = statuses.pop()
        assert status[0] == str(code)[0], f"enhanced code {status} does not match {code}"
        return WireReply(code, status, tuple(m[2] for m in matches if m is not None))
    assert not any(matches), f"enhanced code on some lines only: {lines}"
    return WireReply(code, None, tuple(text for _, text in lines))


# --- deciding -------------------------------------------------------------------------


PASSWORD = "secret"  # the one password ``accept`` takes for AUTH


def accept(event: Event) -> Answer:
    """Accept every EHLO, sender, recipient and message, and AUTH with PASSWORD."""
    if isinstance(event, AuthRequested):
        creds = event.credentials
        return creds.authcid if creds.password == PASSWORD else None
    return None


def answer(session: ServerSession, event: Event, decide: Decider) -> None:
    """Apply *decide*'s answer to a decision event (LMTP messages get decide_each)."""
    if isinstance(event, StartTlsRequested):
        session.tls_started()  # the handshake itself is the glue's business
        return
    if isinstance(event, XClientReceived):
        session.xclient_applied()
        return
    reply = decide(event)
    if isinstance(event, AuthRequested):
        assert reply is None or isinstance(reply, str)
        session.auth_result(reply)
        return
    if isinstance(event, MessageComplete) and session.info.lmtp:
        if reply is None:
            reply = [R.R250_QUEUED] * len(event.transaction.recipients)
        assert not isinstance(reply, Reply), "LMTP wants one reply per recipient"
        session.decide_each(reply)
        return
    assert reply is None or isinstance(reply, Reply)
    session.decide(reply)


_DECISIONS = (
    HelloReceived,
    MailReceived,
    RcptReceived,
    MessageComplete,
    AuthRequested,
    StartTlsRequested,
    XClientReceived,
)


# --- running --------------------------------------------------------------------------


@dataclass
class Result:
    """What one run produced."""

    session: ServerSession
    replies: list[WireReply] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)  # MessageData merged per message
    bodies: list[bytes] = field(default_factory=list)  # completed messages, in order
    aborted: list[bytes] = field(default_factory=list)  # what was passed on before aborts
    closed: bool = False
    modes: dict[str, Result] = field(default_factory=dict)  # whole, line, byte

    @property
    def codes(self) -> list[Expected]:
        return [r.codes for r in self.replies]

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


class _Runner:
    def __init__(self, config: Config, decide: Decider) -> None:
        self.session = ServerSession(config)
        self.decide = decide
        self.result = Result(self.session)
        self._raw_events: list[Event] = []
        self._body: list[bytes] | None = None
        self._out = bytearray(self.session.data_to_send())

    def feed(self, data: bytes) -> None:
        if not self.result.closed:
            self.session.receive_data(data)
            self.pump()

    def pump(self) -> None:
        session = self.session
        while True:
            event = session.next_event()
            if event is NEED_DATA:
                break
            assert event is not PAUSED, "PAUSED although every decision was answered"
            assert isinstance(event, Event)
            self._record(event)
            if isinstance(event, _DECISIONS):
                answer(session, event, self.decide)
            elif isinstance(event, CloseConnection):
                self.result.closed = True
        self._out += session.data_to_send()

    def _record(self, event: Event) -> None:
        self._raw_events.append(event)
        res = self.result
        if isinstance(event, MessageStarted):
            assert self._body is None, "MessageStarted inside a message"
            self._body = []
        elif isinstance(event, MessageData):
            assert self._body is not None, "MessageData outside a message"
            assert event.data, "empty MessageData"
            self._body.append(event.data)
        elif isinstance(event, (MessageComplete, MessageAborted)):
            assert self._body is not None, f"{type(event).__name__} outside a message"
            body = b"".join(self._body)
            (res.bodies if isinstance(event, MessageComplete) else res.aborted).append(body)
            self._body = None
        if not isinstance(event, MessageData):
            res.events.append(event)

    def replies(self) -> list[WireReply]:
        return parse_replies(bytes(self._out))


def _split_lines(data: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        nl = data.find(b"\n", start)
        end = len(data) if nl < 0 else nl + 1
        yield data[start:end]
        start = end


def _segments(steps: Sequence[Step]) -> list[tuple[bytes, list[Expected]]]:
    """Group the steps as (client bytes, replies expected once they have been fed)."""
    segments: list[tuple[bytes, list[Expected]]] = []
    for step in steps:
        if isinstance(step, tuple):
            assert segments, "a reply expected before any client step (greeting is implicit)"
            segments[-1][1].append(step)
        elif isinstance(step, str):
            segments.append((step.encode("utf-8") + b"\r\n", []))
        else:
            segments.append((step, []))
    return segments


def _play(mode: str, config: Config, decide: Decider, steps: Sequence[Step], greeting: Expected):
    segments = _segments(steps)
    runner = _Runner(config, decide)
    expected: list[Expected] = [greeting]
    assert [r.codes for r in runner.replies()] == expected, "greeting"
    if mode == "whole":
        runner.feed(b"".join(data for data, _ in segments))
        expected += [e for _, exp in segments for e in exp]
    else:
        for i, (data, exp) in enumerate(segments):
            pieces = (
                _split_lines(data)
                if mode == "line"
                else (data[j : j + 1] for j in range(len(data)))
            )
            for piece in pieces:
                runner.feed(piece)
            expected += exp
            got = [r.codes for r in runner.replies()]
            assert got == expected, (
                f"{mode} mode, after step {i} {data[:60]!r}:\n got {got}\n expected {expected}"
            )
    result = runner.result
    result.replies = runner.replies()
    assert result.codes == expected, f"{mode} mode:\n got {result.codes}\n expected {expected}"
    return result


def run(
    steps: Sequence[Step],
    config: Config | None = None,
    decide: Decider = accept,
    *,
    greeting: Expected = GREETING,
) -> Result:
    """Play *steps* whole, line by line and byte by byte; return the whole-mode Result."""
    config = config or Config()
    results = {
        mode: _play(mode, config, decide, steps, greeting) for mode in ("whole", "line", "byte")
    }
    whole = results["whole"]
    for mode, other in results.items():
        assert [(r.codes, r.lines) for r in other.replies] == [
            (r.codes, r.lines) for r in whole.replies
        ], mode
        assert other.bodies == whole.bodies, mode
        assert other.closed == whole.closed, mode
        assert [type(e) for e in other.events] == [type(e) for e in whole.events], mode
        for a, b in zip(other.events, whole.events, strict=True):
            if not isinstance(a, (MessageStarted, MessageComplete)):
                assert a == b, mode
    whole.modes = results
    return whole
