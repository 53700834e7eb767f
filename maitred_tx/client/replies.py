"""Server replies as the client reads them: an incremental, bounded parser.

This module owns the client's reading of RFC 5321 4.2 (reply lines, ``code-`` for every
line but the last, ``code SP`` or ``code`` alone for the last), RFC 2034 / RFC 3463
(the enhanced status code that starts each line once the server announced
ENHANCEDSTATUSCODES) and the limits that keep a hostile or broken server from making
the client buffer without end.  It does no I/O: ``feed()`` stores bytes and
``next_reply()`` parses one reply, h11-style, so that the caller can change how the
next reply is read (``enhanced``) between two replies of one read.

Like Postfix's smtp client it reads a bare LF as a line end (servers that send one
exist, and nothing is ambiguous about it in a reply), truncates an overlong line
instead of failing (the text is for humans), and takes the code of the last line when
the lines of one reply disagree.  What cannot be read as SMTP at all (no three-digit
code, a reply that never ends) is a :class:`ReplyError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_REPLY_LINE", "MAX_REPLY_LINES", "ReplyError", "ReplyParser", "ServerReply"]

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line (CRLF included) and asks for
# tolerance; Postfix's smtp client reads up to line_length_limit = 2048 and truncates
# the rest, which we do too.
MAX_REPLY_LINE: Final = 2048
# No RFC bounds the lines of a reply.  Real EHLO replies have 10 to 30; 200 leaves
# room for verbose multi-line 5xx texts and still bounds one reply to ~400 KiB.
MAX_REPLY_LINES: Final = 200

# RFC 3463 2: status-code = class "." subject "." detail; class 2/4/5, 1-3 digits each.
_STATUS: Final = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")


class ReplyError(ValueError):
    """What the server sent cannot be read as an SMTP reply (the session is broken)."""


@dataclass(frozen=True, slots=True)
class ServerReply:
    """One reply from the server.

    ``status`` is the RFC 3463 enhanced status code (``"5.1.1"``) when the server
    announced ENHANCEDSTATUSCODES and put one on the last line; it is then removed
    from the start of every line of ``lines`` that has it.
    """

    code: int
    status: str | None
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The lines joined by newlines (for messages and logs)."""
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        """2xx: done (RFC 5321 4.2.1)."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3xx: go on (354 for DATA, 334 for AUTH)."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: temporary, the same request may succeed later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx: permanent, the same request will fail again."""
        return self.code >= 500

    def __str__(self) -> str:
        status = f"{self.status} " if self.status else ""
        return f"{self.code} {status}{' / '.join(self.lines)}".rstrip()


class ReplyParser:
    """Bytes in, :class:`ServerReply` values out, with bounded memory.

    It holds at most one partial line (truncated to ``max_line`` octets) and the lines
    of one unfinished reply (at most ``max_lines``), whatever the server sends.  Lines
    are found with ``bytearray.find`` from a read position, and the buffer is compacted
    once per call, not once per line.
    """

    __slots__ = ("_buffer", "_dropping", "_lines", "_pos", "enhanced", "max_line", "max_lines")

    def __init__(self, *, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES):
        self.max_line = max_line
        self.max_lines = max_lines
        # Read RFC 2034 enhanced codes: set once the EHLO reply announced them.
        self.enhanced = False
        self._buffer = bytearray()
        self._pos = 0  # where the unread part of _buffer starts
        self._lines: list[bytes] = []
        self._dropping = False  # inside an overlong line: skipping to its end

    @property
    def pending(self) -> int:
        """Octets received and not yet part of a returned reply."""
        return len(self._buffer) - self._pos + sum(len(line) for line in self._lines)

    def feed(self, data: bytes) -> None:
        """Store *data*; nothing is parsed yet beyond bounding the partial line."""
        if self._dropping:
            end = data.find(b"\n")
            if end < 0:
                return
            self._dropping = False
            self._buffer += b"\n"  # the truncated line ends here
            data = data[end + 1 :]
        self._buffer += data
        if len(self._buffer) - self._pos > self.max_line:
            self._bound()

    def _bound(self) -> None:
        """An endless line: keep its start, drop the rest up to its end."""
        buffer = self._buffer
        if buffer.find(b"\n", self._pos) < 0:
            del buffer[: self._pos]
            self._pos = 0
            del buffer[self.max_line :]
            self._dropping = True

    def clear(self) -> bytes:
        """Forget everything held (STARTTLS: RFC 3207 4.2); return what was dropped."""
        dropped = b"".join(self._lines) + bytes(self._buffer[self._pos :])
        self._buffer.clear()
        self._pos = 0
        self._lines.clear()
        self._dropping = False
        return dropped

    def next_reply(self) -> ServerReply | None:
        """The next complete reply, or None until more data comes.  ReplyError if what
        was received is not SMTP."""
        buffer, pos = self._buffer, self._pos
        while True:
            end = buffer.find(b"\n", pos)
            if end < 0:
                del buffer[:pos]  # compact once per call
                self._pos = 0
                if len(buffer) > self.max_line:  # several lines came in one feed()
                    self._bound()
                return None
            stop = end - 1 if end > pos and buffer[end - 1] == 13 else end  # CRLF or LF
            line = bytes(buffer[pos : min(stop, pos + self.max_line)])
            pos = self._pos = end + 1
            # RFC 5321 4.2: Reply-code = %x32-35 %x30-35 %x30-39, then SP, "-" or the end.
            if (len(line) < 3 or not 50 <= line[0] <= 53 or not 48 <= line[1] <= 53
                    or not 48 <= line[2] <= 57 or line[3:4] not in (b"", b" ", b"-")):
                raise ReplyError(f"not an SMTP reply line: {line[:80]!r}")
            if line[3:4] != b"-":
                if not self._lines:  # the usual one-line reply
                    return self._finish([line])
                self._lines.append(line)
                lines, self._lines = self._lines, []
                return self._finish(lines)
            self._lines.append(line)
            if len(self._lines) >= self.max_lines:
                raise ReplyError(f"reply longer than {self.max_lines} lines")

    def _finish(self, raw: list[bytes]) -> ServerReply:
        code = int(raw[-1][:3])  # Postfix takes the last line's code too
        texts = [line[4:].decode("utf-8", "replace") for line in raw]
        status = None
        # RFC 2034 3: no enhanced code on 3xx (354, 334).
        if self.enhanced and not 300 <= code < 400 and texts[-1][1:2] == ".":
            status, texts = _split_status(code, texts)
        return ServerReply(code, status, tuple(texts))


def _split_status(code: int, texts: list[str]) -> tuple[str | None, list[str]]:
    """Take the enhanced code off the lines (RFC 2034 3: it starts every line).  The
    last line decides, as it does for the basic code; the same code is removed from
    the lines before it that carry it."""
    match = _STATUS.match(texts[-1])
    if match is None or match.group(1) != str(code)[0]:  # RFC 3463 2: classes agree
        return None, texts
    status = match.group(0).rstrip(" ")
    prefix = status + " "
    return status, [
        t[len(prefix) :] if t.startswith(prefix) else ("" if t == status else t) for t in texts
    ]
