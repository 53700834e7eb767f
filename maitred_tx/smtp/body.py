"""Message body receivers: DATA (RFC 5321 4.1.1.4, 4.5.2) and BDAT chunks (RFC 3030).

The body is never handled line by line.  ``DataReceiver`` treats each buffer with
C-level passes — ``bytes.find`` for the end marker, ``bytes.split`` on ``CRLF "."``
(the only place where a line start matters) and a join for dot-unstuffing — and
passes the whole buffer on as one piece, so the Python work per buffer does not grow
with the number of lines or of dot lines.  Only the exact sequence CRLF "." CRLF ends
DATA (4.1.1.4); a bare CR or LF never does, whatever the bare-line-ending policy says,
which closes the SMTP smuggling family (CVE-2023-51764 and kin).

``ContentChecker`` enforces the content limits on the content as stored (bare line
endings, text line length, header block size, and the hop count: the ``Received:``
fields of the header block, RFC 5321 6.3) with whole-buffer operations too (for
DATA one ``splitlines()``, whose line lengths C code sums and compares; for the hop
count one ``lower().count()`` over the header block only).  Once
a limit is broken the receivers keep consuming — the end of the message must still be
found — but pass nothing on, and the session answers with the recorded reply at the end.
"""

from __future__ import annotations

from typing import Final

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.config import BareLineEndings, Limits
from maitred_tx.smtp.replies import Reply

__all__ = ["BdatReceiver", "ContentChecker", "DataReceiver"]

_END: Final = b"\r\n.\r\n"  # the end of DATA (RFC 5321 4.1.1.4)
_LINE_DOT: Final = b"\r\n."  # a line starting with a dot (4.5.2: the dot is dropped)
_CRLF: Final = b"\r\n"
# CR -> 1, LF -> 2, every other octet -> 0: the line-break map of _check_bare.
_BREAKS: Final = bytes(1 if b == 13 else 2 if b == 10 else 0 for b in range(256))
# Well below glibc's mmap threshold (128 KiB), so _check_bare's temporaries are reused.
_BARE_BLOCK: Final = 32 * 1024
_EMPTY: Final = b""
# A Received: field starts a line (RFC 5322 2.2: a folded line starts with WSP, so a
# continuation never matches); field names are case-insensitive (RFC 5322 1.2.2).
_RECEIVED: Final = b"\nreceived:"
# What the header scan keeps of the previous buffer: enough for a _RECEIVED cut
# anywhere (and for the 4-octet empty line), never a whole _RECEIVED, so that no
# field is counted twice.
_HEADER_TAIL: Final = len(_RECEIVED) - 1


class ContentChecker:
    """Limits on message content, fed the raw bytes in any chunking.

    Memory stays bounded: it keeps a few counters and at most nine bytes of the
    previous buffer (_HEADER_TAIL), however long a line or a header block is.
    """

    __slots__ = (
        "_bare",
        "_binary",
        "_block",
        "_check_lines",
        "_header_len",
        "_header_tail",
        "_hops",
        "_in_header",
        "_line_len",
        "_max_header",
        "_max_hops",
        "_max_line",
        "_prev_cr",
        "error",
    )

    def __init__(
        self, limits: Limits, bare: BareLineEndings, *, text: bool = True, lines: bool = True
    ) -> None:
        # BINARYMIME content (RFC 3030 3) has no lines: only the header check applies,
        # and it accepts a bare LF as the end of a header line (see _check_header).
        self._binary = not text
        self._bare = text and bare is BareLineEndings.REJECT
        # The text line limit (RFC 5321 4.5.3.1.6) belongs to the line-framed DATA
        # transfer; BDAT chunks are counted, not framed, so it is not applied to them.
        # It costs a full pass over the body, which BDAT is meant to avoid.
        self._check_lines = text and lines
        # Longest allowed line content, CR included, LF excluded (RFC 5321 4.5.3.1.6).
        self._max_line = limits.max_text_line - 1
        # Long-line probe step (_has_long_line): a line of >= 2*step-1 octets without LF
        # contains a whole aligned block of *step* octets without LF, so only those
        # blocks need a closer look.
        self._block = max(1, (self._max_line + 1) // 2)
        self._max_header = limits.max_header_block
        self._max_hops = limits.max_hops  # 0: not counted at all
        self.error: Reply | None = None
        self.reset()

    def reset(self) -> None:
        """Start over for a new message, with the same limits: a session reuses one
        checker rather than build one per message."""
        self._line_len = 0
        self._prev_cr = False
        self._in_header = True
        self._header_len = 0
        self._header_tail = b"\r\n"  # the header block may be empty: body starts CRLF
        self._hops = 0  # Received: fields of the header block so far
        self.error = None

    def feed(self, data: bytes) -> Reply | None:
        """Check one more piece; the first violation is kept in ``error``."""
        if self.error is None and data:
            if self._in_header:
                self._check_header(data)
            if self.error is None:
                if self._bare and self._check_lines:
                    self._check_lines_and_bare(data)  # the default for DATA
                elif self._bare:
                    self._check_bare(data)
                elif self._check_lines:
                    self._check_line_length(data)
        return self.error

    def _check_lines_and_bare(self, data: bytes) -> None:
        """Both checks from one split into lines: every break must be a CRLF (no bare
        CR or LF), and the lines' lengths are the line lengths.  Measured about a third
        cheaper than the two checks apart, which each need two passes."""
        limit = self._max_line  # octets before the LF, the CR included
        start, end, carried = 0, len(data), self._line_len
        if self._prev_cr:  # the previous piece ended in a CR: this must start with LF
            if data[0] != 10:
                self.error = R.R550_BARE_LINE_ENDING
                return
            if carried + 1 > limit:
                self.error = R.R554_LINE_TOO_LONG.format(limit=str(limit + 1))
                return
            start, carried = 1, 0
        if b"\0" in data:  # RFC 5322 2.3 / RFC 6152, as in _check_bare
            self.error = R.R550_NUL_CHARACTER
            return
        self._prev_cr = end > start and data[end - 1] == 13
        if self._prev_cr:
            end -= 1  # its LF, if any, starts the next piece
        text = data[start:end] if start or end < len(data) else data
        # bytes.splitlines() breaks at CRLF, lone CR and lone LF alike: all of them
        # CRLF exactly when two octets went per break.  (A piece that ends in a break
        # has no empty last line in the list: one break more than gaps between lines.)
        # Only the lines' lengths are needed from here on: one list of ints, read by
        # sum() and max() in C (a third cheaper per MiB than reading the lines again).
        lengths = list(map(len, text.splitlines())) or [0]
        final = text[-1] if text else 0  # 10 or 13: the piece ends in a line break
        breaks = len(lengths) - 1 + (final == 10 or final == 13)
        if len(text) - sum(lengths) != 2 * breaks:
            self.error = R.R550_BARE_LINE_ENDING
            return
        if final == 10:
            lengths.append(0)  # the (empty) unfinished line after the last CRLF
        pending = 1 if self._prev_cr else 0  # a trailing CR counts towards its line
        last = lengths[-1] + pending
        if len(lengths) == 1:
            last += carried
        elif carried + lengths[0] + 1 > limit or (  # the first line, then the inner ones
            max(lengths) + 1 > limit and len(lengths) > 2 and max(lengths[1:-1]) + 1 > limit
        ):
            self.error = R.R554_LINE_TOO_LONG.format(limit=str(limit + 1))
            return
        if last > limit:  # the unfinished last line is too long already
            self.error = R.R554_LINE_TOO_LONG.format(limit=str(limit + 1))
            return
        self._line_len = last - pending

    def finish(self) -> Reply | None:
        """The content is complete: a CR left dangling at the very end is bare too, and
        a message without an empty line is all header block (RFC 5322 2.1): its hop
        count is final only now."""
        if self.error is None:
            if self._bare and self._prev_cr:
                self.error = R.R550_BARE_LINE_ENDING
            elif self._in_header:
                self._check_hops()
        return self.error

    def _check_hops(self) -> None:
        # RFC 5321 6.3: a message that has been through more relays than this is looping.
        if self._max_hops and self._hops > self._max_hops:
            self.error = R.R554_TOO_MANY_HOPS.format(
                count=str(self._hops), limit=str(self._max_hops)
            )

    def _check_header(self, data: bytes) -> None:
        # RFC 5322 2.1: the header block ends at the first empty line.
        room = self._max_header - self._header_len
        probe = self._header_tail + data[: room + 4]
        end = probe.find(b"\r\n\r\n")
        stop = end + 2  # the block ends after its last line's CRLF
        if self._binary:
            # A BINARYMIME message is opaque octets (RFC 3030 3): its lines may end in a
            # bare LF, and refusing it as "header too big" because its empty line is
            # not a CRLF would be refusing it for its line endings.
            for empty in (b"\n\n", b"\n\r\n"):
                at = probe.find(empty)
                if at >= 0 and (end < 0 or at + 1 < stop):
                    end, stop = at, at + 1
        if self._max_hops:  # the header lines of this piece, with the tail before them
            self._hops += (probe[:stop] if end >= 0 else probe).lower().count(_RECEIVED)
        if end >= 0:
            self._in_header = False
            if stop - len(self._header_tail) > room:
                self.error = R.R552_HEADER_TOO_BIG
            else:
                self._check_hops()
            return
        self._header_len += len(data)
        self._header_tail = probe[-_HEADER_TAIL:]
        # A CR after the last line end may begin the empty line, which is not in the block.
        over = self._header_len - self._max_header
        pending = probe.endswith(b"\n\r" if self._binary else b"\r\n\r")
        if over > 1 or (over == 1 and not pending):
            self.error = R.R552_HEADER_TOO_BIG

    def _check_bare(self, data: bytes) -> None:
        # Every CR must be followed by LF and every LF preceded by CR: the CRs' places,
        # moved on by one, are the LFs' places.  One translate maps each block to its
        # line breaks (CR 1, LF 2, else 0); single-octet replace() finds its few marks
        # with memchr, and == is a memcmp.  Measured 1.4x the speed of translate(delete)
        # + count(CRLF), the check BDAT spends nearly all its time in.
        start, end = 0, len(data)
        if self._prev_cr:
            if data[0] != 10:  # the CR that ended the previous buffer was bare
                self.error = R.R550_BARE_LINE_ENDING
                return
            start = 1
        if b"\0" in data:
            # RFC 5322 2.3 / RFC 6152: no NUL in a text body.  A downstream MTA that
            # strips NULs would turn CRLF NUL "." CRLF into an end of data.
            self.error = R.R550_NUL_CHARACTER
            return
        self._prev_cr = end > start and data[end - 1] == 13
        if self._prev_cr:
            end -= 1  # its LF, if any, starts the next buffer
        if end <= start:
            return
        # The first octet may not be an LF (nothing before it here) nor the last a CR
        # (nothing after it: a CR at the very end was set aside above).
        if data[start] == 10 or data[end - 1] == 13:
            self.error = R.R550_BARE_LINE_ENDING
            return
        # Blocks of _BARE_BLOCK, each read with the first octet of the next: a whole
        # piece (up to 256 KiB) would make every temporary a fresh mmap, whose page
        # faults cost more than the check (measured: 88,000 faults per 100 MiB).
        for at in range(start, end - 1, _BARE_BLOCK):
            marks = data[at : min(at + _BARE_BLOCK + 1, end)].translate(_BREAKS)
            crs = marks[:-1].replace(b"\2", b"\0").replace(b"\1", b"\2")
            if crs != marks[1:].replace(b"\1", b"\0"):
                self.error = R.R550_BARE_LINE_ENDING
                return

    def _check_line_length(self, data: bytes) -> None:
        limit = self._max_line
        first = data.find(b"\n")
        if first < 0:
            self._line_len += len(data)
            if self._line_len > limit:
                self.error = R.R554_LINE_TOO_LONG.format(limit=str(limit + 1))
            return
        if self._line_len + first > limit:
            self.error = R.R554_LINE_TOO_LONG.format(limit=str(limit + 1))
            return
        last = data.rfind(b"\n")
        self._line_len = len(data) - last - 1
        if self._line_len > limit:  # the unfinished last line is too long already
            self.error = R.R554_LINE_TOO_LONG.format(limit=str(limit + 1))
            return
        if last - first > limit and self._has_long_line(data, first, last, limit):
            self.error = R.R554_LINE_TOO_LONG.format(limit=str(limit + 1))

    def _has_long_line(self, data: bytes, first: int, last: int, limit: int) -> bool:
        """True if a complete line between *first* and *last* (LF positions) is too long."""
        find, rfind, step = data.find, data.rfind, self._block
        for i in range(first + 1, last, step):
            if find(b"\n", i, i + step) < 0:  # a block without LF: measure its line
                start = rfind(b"\n", first, i)
                end = find(b"\n", i, last + 1)
                if end - start - 1 > limit:
                    return True
        return False


class DataReceiver:
    """The DATA body: end marker, dot-unstuffing, size limit, content checks.

    ``feed`` returns the unstuffed bytes it can pass on now (at most one piece per
    call) and, once CRLF.CRLF has been seen, the index in *data* just past it (what
    follows is pipelined commands).
    """

    __slots__ = ("_max_size", "_skip", "_tail", "checker", "error", "size")

    def __init__(self, limits: Limits, bare: BareLineEndings) -> None:
        self._max_size = limits.max_message_size
        self.checker = ContentChecker(limits, bare)
        self.error: Reply | None = None
        self.reset()

    def reset(self) -> None:
        """Start over for a new message (a session reuses one receiver for its DATA
        commands: about 1.5 us less per message than building one)."""
        # The CRLF that ended the DATA command line starts the first line (4.1.1.4), so
        # a body that starts with "." is unstuffed and ".CRLF" at once ends it.  It is
        # held like any other CRLF but never passed on: _skip counts such bytes.
        self._tail = b"\r\n"
        self._skip = 2
        self.checker.reset()
        self.error = None
        self.size = 0

    def feed(self, data: bytes) -> tuple[list[bytes], int | None]:
        if not data:
            return [], None
        tail = self._tail
        buf = tail + data if tail else data
        # The first CRLF "." CRLF is the end: a stuffed line never holds one, as the
        # dot it would need is doubled, so no earlier match can be a line's inside.
        marker = buf.find(_END)
        if marker >= 0:
            cut = marker + 2  # the CRLF before the final dot is content
            end: int | None = marker + len(_END) - len(tail)
        else:  # hold what may begin CRLF "." CRLF until the next buffer tells
            cut = len(buf) - _held(buf)
            end = None
        self._tail = buf[cut:]
        # 4.5.2: drop the first dot of every line, in C.  The held bytes are outside: a
        # CRLF "." they begin is judged with the bytes that follow.  split + join, not
        # replace(): replace() counts the matches in a pass of its own before copying,
        # and measured 1.7x slower on a body with a dotted line in sixteen.
        piece = _CRLF.join((buf if cut == len(buf) else buf[:cut]).split(_LINE_DOT))
        skip = min(self._skip, cut)  # the CRLF is unchanged by the unstuffing
        if skip:
            self._skip -= skip
            piece = piece[skip:]
        self.size += len(piece)
        self._check(piece)
        return ([piece] if piece and self.error is None else []), end

    def _check(self, piece: bytes) -> None:
        # The content checks see the message as it will be stored: dot-unstuffed, so a
        # line's duplicated leading dot does not count (RFC 5321 4.5.3.1.6).
        if self.error is None:
            if self.size > self._max_size:
                self.error = R.R552_TOO_BIG  # RFC 1870 6.3
            else:
                self.error = self.checker.feed(piece)

    def finish(self) -> Reply | None:
        """Called once the end marker has been seen: the final verdict on content."""
        if self.error is None:
            self.error = self.checker.finish()
        return self.error


def _held(buf: bytes) -> int:
    """How many bytes at the end of *buf* may begin CRLF "." CRLF."""
    for n in (4, 3, 2, 1):
        if buf.endswith(_END[:n]):
            return n
    return 0


class BdatReceiver:
    """One BDAT chunk: exactly *size* raw octets, binary-safe (RFC 3030 2).

    The chunk is consumed even when the command was refused (``discard``): the client
    sends it without waiting, and reading it as commands would be command injection.
    """

    __slots__ = ("discard", "remaining")

    def __init__(self, size: int, *, discard: bool = False) -> None:
        self.remaining = size
        self.discard = discard

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """The part of *data* that belongs to this chunk, and how much of it was taken."""
        take = min(self.remaining, len(data))
        self.remaining -= take
        if self.discard:
            return _EMPTY, take
        return (data if take == len(data) else data[:take]), take

    @property
    def done(self) -> bool:
        return self.remaining == 0
