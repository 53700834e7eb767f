"""The client's reply parser (pure): multi-line replies, enhanced status codes, every
sample fed whole, line by line and byte by byte, and the bounds a hostile server meets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.client.replies import (
    MAX_REPLY_LINE,
    ReplyError,
    ReplyParser,
    ServerReply,
)
from maitred_tx.smtp.replies import Reply
from maitred_tx.testing import pieces

MODES = ["whole", "lines", "bytes"]


def parse(data: bytes, mode: str = "whole", *, enhanced: bool = True) -> list[ServerReply]:
    parser = ReplyParser()
    parser.enhanced = enhanced
    out: list[ServerReply] = []
    for piece in pieces(data, mode):
        parser.feed(piece)
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
    assert parser.pending == 0
    return out


@pytest.mark.parametrize("mode", MODES)
def test_single_and_multi_line_replies(mode):
    data = (b"220 mx.test ESMTP ready\r\n"
            b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 CHUNKING\r\n"
            b"550-5.1.1 No such\r\n550-5.1.1 user here\r\n550 5.1.1 sorry\r\n")
    first, ehlo, refusal = parse(data, mode)
    assert (first.code, first.status, first.lines) == (220, None, ("mx.test ESMTP ready",))
    assert ehlo.lines == ("mx.test", "PIPELINING", "SIZE 1000", "CHUNKING")
    assert (refusal.code, refusal.status) == (550, "5.1.1")
    assert refusal.lines == ("No such", "user here", "sorry")
    assert refusal.is_permanent and not refusal.is_transient and not refusal.is_positive
    assert str(refusal) == "550 5.1.1 No such / user here / sorry"


@pytest.mark.parametrize("mode", MODES)
def test_enhanced_codes_only_when_announced(mode):
    data = b"451 4.3.0 Try later\r\n"
    [with_status] = parse(data, mode, enhanced=True)
    [without] = parse(data, mode, enhanced=False)
    assert (with_status.status, with_status.lines) == ("4.3.0", ("Try later",))
    assert (without.status, without.lines) == (None, ("4.3.0 Try later",))
    assert with_status.is_transient


def test_no_status_on_3xx_and_on_class_mismatch():
    # 354 and 334 never carry one (RFC 2034 3); "5.1.1" on a 250 is text, not a status.
    replies = parse(b"354 2.0.0 go ahead\r\n334 VXNlcm5hbWU6\r\n250 5.1.1 odd\r\n")
    assert [(r.code, r.status) for r in replies] == [(354, None), (334, None), (250, None)]
    assert replies[0].lines == ("2.0.0 go ahead",) and replies[0].is_intermediate


def test_code_alone_bare_lf_and_utf8_text():
    replies = parse("250\r\n250 ok\n250 2.0.0 reçu\r\n".encode())
    assert [(r.code, r.lines) for r in replies] == [
        (250, ("",)), (250, ("ok",)), (250, ("reçu",))]


def test_the_last_line_gives_the_code():
    [reply] = parse(b"250-first\r\n251 last\r\n", enhanced=False)
    assert reply.code == 251 and reply.lines == ("first", "last")


@pytest.mark.parametrize("bad", [b"hello\r\n", b"25\r\n", b"2500 x\r\n", b"650 x\r\n",
                                 b"250_x\r\n", b"HTTP/1.1 400\r\n"])
def test_what_is_not_smtp_is_an_error(bad):
    parser = ReplyParser()
    parser.feed(bad)
    with pytest.raises(ReplyError):
        parser.next_reply()


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_an_endless_line_is_truncated_and_memory_stays_bounded(mode):
    parser = ReplyParser()
    high = 0
    data = b"250 " + b"x" * (MAX_REPLY_LINE * 5) + b"\r\n250 next\r\n"
    replies = []
    step = 1 if mode == "bytes" else len(data)
    for i in range(0, len(data), step):
        parser.feed(data[i : i + step])
        high = max(high, parser.pending)
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    assert high <= MAX_REPLY_LINE + step
    assert [r.lines[0][:3] for r in replies] == ["xxx", "nex"]
    assert len(replies[0].lines[0]) == MAX_REPLY_LINE - 4


def test_a_reply_that_never_ends_is_an_error():
    parser = ReplyParser(max_lines=10)
    parser.feed(b"250-x\r\n" * 10)
    with pytest.raises(ReplyError, match="longer than 10 lines"):
        parser.next_reply()


def test_clear_returns_what_was_held():
    parser = ReplyParser()
    parser.feed(b"250-part\r\n250 more")
    assert parser.next_reply() is None
    assert parser.clear() == b"250-part250 more"
    assert parser.pending == 0


_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
_REPLY = st.builds(
    lambda code, status, lines: Reply(code, f"{str(code)[0]}.{status[0]}.{status[1]}", lines),
    st.sampled_from([220, 221, 250, 251, 421, 450, 451, 452, 500, 501, 550, 552, 554]),
    st.tuples(st.integers(0, 999), st.integers(0, 999)),
    st.lists(_TEXT.map(lambda t: t.strip() or "x"), min_size=1, max_size=5).map(tuple),
)


@given(st.lists(_REPLY, min_size=1, max_size=8), st.data())
def test_server_replies_read_back_in_any_split(replies, data):
    """What maitred_tx's server encodes, the client reads back: codes, enhanced codes
    and lines, however the bytes are split."""
    wire = b"".join(r.encode(True) for r in replies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    parser = ReplyParser()
    parser.enhanced = True
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        parser.feed(wire[start:end])
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
    assert [(r.code, r.status, r.lines) for r in out] == [
        (r.code, r.status, r.text) for r in replies]
