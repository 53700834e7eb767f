"""The message body on its way out: dot-stuffing for DATA and what a body needs.

- :class:`DotStuffer` encodes a body for DATA as a stream (RFC 5321 4.5.2: a line that
  starts with "." gets one more; 4.1.1.4: the body ends with CRLF "." CRLF).  Chunks may
  split anywhere, even inside CRLF "."; the state carried across chunks is the last
  two octets, so ``stuff(chunks) == stuff(whole)`` for every split.
- :class:`BodyScanner` finds, chunk by chunk, what a body needs from the server: 8-bit
  octets need 8BITMIME (RFC 6152); a NUL, a bare CR or LF or a line longer than
  998 octets (RFC 5321 4.5.3.1.6) is not text at all and needs BINARYMIME, so BDAT
  (RFC 3030 3).  A bare CR or LF is never sent by DATA: a server that reads it as a
  line end could be fed a second message (SMTP smuggling, CVE-2023-51764).

Both work on whole buffers with C-level bytes operations, never a Python call per line.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from maitred_tx.smtp.params import BodyType

__all__ = ["MAX_TEXT_LINE", "BodyScanner", "ContentScan", "DotStuffer", "scan_body"]

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
MAX_TEXT_LINE: Final = 998
_CRLF: Final = b"\r\n"
_LINE_DOT: Final = b"\r\n."
_LINE_DOTS: Final = b"\r\n.."
_END: Final = b".\r\n"


class DotStuffer:
    """DATA encoding of a body given in chunks: stuffed bytes out, end marker last."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        # The CRLF that ends the DATA command line starts the first line (4.1.1.4):
        # a body that starts with "." is stuffed, and an empty body ends with ".CRLF".
        self._tail = _CRLF

    def feed(self, chunk: bytes) -> bytes:
        """The stuffed form of *chunk*."""
        if not chunk:
            return b""
        # Prefix the context that can complete a CRLF "." across the split: the last
        # CRLF, or a lone CR.  One replace() in C then does the whole chunk.
        tail = self._tail
        context = tail if tail == _CRLF else (b"\r" if tail.endswith(b"\r") else b"")
        self._tail = chunk[-2:] if len(chunk) >= 2 else tail[-1:] + chunk
        if b"." not in chunk:
            return chunk
        if not context:
            return chunk.replace(_LINE_DOT, _LINE_DOTS)
        return (context + chunk).replace(_LINE_DOT, _LINE_DOTS)[len(context) :]

    def finish(self) -> bytes:
        """The end of data: CRLF "." CRLF, adding the CRLF the body may lack."""
        return _END if self._tail == _CRLF else _CRLF + _END


class Problem(enum.Enum):
    """Why a body is not text (each needs BINARYMIME)."""

    NUL = "a NUL octet"
    BARE_CR = "a bare CR"
    BARE_LF = "a bare LF"
    LONG_LINE = f"a line longer than {MAX_TEXT_LINE} octets"


@dataclass(frozen=True, slots=True)
class ContentScan:
    """What a body contains that matters for transport."""

    eight_bit: bool = False
    problem: Problem | None = None  # the first reason it is not text, if any

    @property
    def needs(self) -> BodyType:
        """The least BODY= type that can carry the body."""
        if self.problem is not None:
            return BodyType.BINARY_MIME
        return BodyType.EIGHT_BIT_MIME if self.eight_bit else BodyType.SEVEN_BIT


class BodyScanner:
    """:class:`ContentScan` of a body given in chunks, with O(1) state."""

    __slots__ = ("_cr", "_eight_bit", "_line", "_problem")

    def __init__(self) -> None:
        self._eight_bit = False
        self._problem: Problem | None = None
        self._cr = False  # the last chunk ended with CR: bare unless LF comes first
        self._line = 0  # octets of the current (unfinished) line

    @property
    def scan(self) -> ContentScan:
        """What was seen so far (a trailing CR is not yet judged)."""
        return ContentScan(self._eight_bit, self._problem)

    def feed(self, chunk: bytes) -> ContentScan:
        """Scan *chunk*; the result so far."""
        if not chunk:
            return self.scan
        if not self._eight_bit and not chunk.isascii():
            self._eight_bit = True
        if self._problem is None:
            self._problem = self._find_problem(chunk)
        return self.scan

    def finish(self) -> ContentScan:
        """The verdict on the whole body."""
        if self._problem is None and self._cr:
            self._problem = Problem.BARE_CR
        self._cr = False
        return self.scan

    def _find_problem(self, chunk: bytes) -> Problem | None:
        if b"\0" in chunk:
            return Problem.NUL
        joined = self._cr and chunk[0] == 0x0A  # a CRLF split across the chunks
        if self._cr and not joined:
            return Problem.BARE_CR
        body = chunk[1:] if joined else chunk
        self._cr = body.endswith(b"\r")
        if self._cr:
            body = body[:-1]
        pairs = body.count(_CRLF)
        if body.count(b"\r") != pairs:
            return Problem.BARE_CR
        if body.count(b"\n") != pairs:
            return Problem.BARE_LF
        return self._check_lines(body, joined)

    def _check_lines(self, body: bytes, joined: bool) -> Problem | None:
        """Line lengths; *body* has only CRLF line ends (bare ones were refused)."""
        if joined:
            self._line = 0  # the CRLF split across chunks ended the line
        last = body.rfind(b"\n")
        if last < 0:  # no line ends here: the current line grows
            self._line += len(body)
            return Problem.LONG_LINE if self._line > MAX_TEXT_LINE else None
        if self._line + len(body) > MAX_TEXT_LINE:  # else no line here can be too long
            first = body.find(b"\n")
            if self._line + first - 1 > MAX_TEXT_LINE:  # the line that began before
                return Problem.LONG_LINE
            inner = body[first + 1 : last - 1]  # the whole lines between, CRLF-separated
            if last > first and max(map(len, inner.split(_CRLF))) > MAX_TEXT_LINE:
                return Problem.LONG_LINE
        self._line = len(body) - last - 1
        return Problem.LONG_LINE if self._line > MAX_TEXT_LINE else None


def scan_body(body: bytes) -> ContentScan:
    """The :class:`ContentScan` of a whole body."""
    scanner = BodyScanner()
    scanner.feed(body)
    return scanner.finish()
