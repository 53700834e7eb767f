"""Dot-stuffing and content scanning (pure), across every chunk split.

The stuffed body is read back by the server's own DATA receiver
(``maitred_tx.smtp.body.DataReceiver``): what it stores must be the original body."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.client.body import (
    MAX_TEXT_LINE,
    BodyScanner,
    DotStuffer,
    Problem,
    scan_body,
)
from maitred_tx.smtp.body import DataReceiver
from maitred_tx.smtp.config import BareLineEndings, Limits
from maitred_tx.smtp.params import BodyType


def stuff(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(c for c in cuts if 0 <= c <= len(data))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def unstuff_with_server(wire: bytes) -> bytes:
    receiver = DataReceiver(Limits(max_message_size=1 << 30), BareLineEndings.ACCEPT)
    pieces, end = receiver.feed(wire)
    assert end == len(wire), "the end marker must be the last thing on the wire"
    return b"".join(pieces)


@pytest.mark.parametrize(("body", "wire"), [
    (b"", b".\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\n..x", b"a\r\n...x\r\n.\r\n"),
    (b"no final crlf", b"no final crlf\r\n.\r\n"),
    (b"a.b\r\n", b"a.b\r\n.\r\n"),
])
def test_examples(body, wire):
    assert stuff([body]) == wire


def test_a_dot_line_split_at_every_position_is_stuffed():
    body = b"x\r\n.\r\n.y\r\n"
    whole = stuff([body])
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            assert stuff([body[:i], body[i:j], body[j:]]) == whole, (i, j)


_LINE = st.text(alphabet=".ab\t é", max_size=12).map(lambda t: t.encode())
_TEXT = st.builds(
    lambda lines, end: b"\r\n".join(lines) + (b"\r\n" if end else b""),
    st.lists(_LINE, max_size=12), st.booleans())


@given(_TEXT, st.lists(st.integers(0, 200), max_size=8))
def test_stuffing_does_not_depend_on_chunks_and_the_server_reads_it_back(body, cuts):
    wire = stuff(split(body, cuts))
    assert wire == stuff([body])
    stored = unstuff_with_server(wire)
    assert stored == (body if body.endswith(b"\r\n") or not body else body + b"\r\n")


def reference_scan(body: bytes) -> tuple[bool, Problem | None]:
    """What a slow, obviously right scan finds (the first problem in the order the
    scanner checks: NUL, bare CR, bare LF, long line)."""
    eight_bit = any(b > 127 for b in body)
    if b"\0" in body:
        return eight_bit, Problem.NUL
    stripped = body.replace(b"\r\n", b"")
    if b"\r" in stripped:
        return eight_bit, Problem.BARE_CR
    if b"\n" in stripped:
        return eight_bit, Problem.BARE_LF
    if any(len(line) > MAX_TEXT_LINE for line in body.split(b"\r\n")):
        return eight_bit, Problem.LONG_LINE
    return eight_bit, None


def test_scan_examples():
    assert scan_body(b"plain\r\ntext\r\n").needs is BodyType.SEVEN_BIT
    assert scan_body("é\r\n".encode()).needs is BodyType.EIGHT_BIT_MIME
    for body, problem in [(b"a\nb", Problem.BARE_LF), (b"a\rb", Problem.BARE_CR),
                          (b"a\r", Problem.BARE_CR), (b"\0", Problem.NUL),
                          (b"x" * 999, Problem.LONG_LINE),
                          (b"x" * 998 + b"\r\n" + b"y" * 999 + b"\r\n", Problem.LONG_LINE)]:
        scan = scan_body(body)
        assert (scan.problem, scan.needs) == (problem, BodyType.BINARY_MIME), body[:20]
    assert scan_body(b"x" * 998 + b"\r\n" + b"y" * 998).problem is None


_RAW = st.lists(
    st.sampled_from([b"a", b"\r\n", b"\r", b"\n", b".", b"\xc3\xa9", b"\0",
                     b"x" * 500, b"y" * 997]),
    max_size=12).map(b"".join)


@given(_RAW, st.lists(st.integers(0, 3000), max_size=6))
def test_scanner_agrees_with_a_reference_in_every_split(body, cuts):
    scanner = BodyScanner()
    for chunk in split(body, cuts):
        scanner.feed(chunk)
    scan = scanner.finish()
    eight_bit, problem = reference_scan(body)
    assert scan.eight_bit == eight_bit
    if problem is None or scan.problem is None:
        assert scan.problem == problem
    else:
        # Which problem is named first may depend on where a chunk ends; that there is
        # one may not.
        assert scan.needs is BodyType.BINARY_MIME
