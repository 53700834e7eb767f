"""Mail loop protection (RFC 5321 6.3; Limits.max_hops, Postfix's hopcount_limit): the
``Received:`` fields of the header block the client sent are counted in the body scan,
and more than the limit ends the transaction with 554 5.4.6 after the body (LMTP: one
per accepted recipient, RFC 2033 4.2)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transcript import EHLO, Step, run

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.body import ContentChecker, DataReceiver
from maitred_tx.smtp.config import BareLineEndings, Config, Limits, Mode
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.session import MailReceived, MessageAborted, MessageComplete

ACCEPT = BareLineEndings.ACCEPT
REJECT = BareLineEndings.REJECT
DEFAULT = Limits()
LIMIT = DEFAULT.max_hops


def too_many(count: int, limit: int = LIMIT) -> Reply:
    return R.R554_TOO_MANY_HOPS.format(count=str(count), limit=str(limit))


def received(n: int, end: bytes = b"\r\n") -> bytes:
    """*n* Received: fields, each folded over two lines as MTAs write them."""
    return b"".join(
        b"Received: from h%d.example ([192.0.2.%d])" % (i, i % 250) + end
        + b"\tby mx.example with ESMTP id X%d; Mon, 1 Jan 2024 00:00:00 +0000" % i + end
        for i in range(n)
    )


def message(n: int, end: bytes = b"\r\n") -> bytes:
    return received(n, end) + b"Subject: hops" + end + end + b"Body." + end


def check(
    chunks: list[bytes],
    limits: Limits = DEFAULT,
    bare: BareLineEndings = REJECT,
    *,
    text: bool = True,
) -> Reply | None:
    """Feed *chunks* to one ContentChecker as BDAT does (no line-length check)."""
    checker = ContentChecker(limits, bare, text=text, lines=False)
    for chunk in chunks:
        checker.feed(chunk)
    return checker.finish()


def chunkings(content: bytes) -> list[list[bytes]]:
    """Whole, every cut in two, and byte by byte."""
    return [
        [content],
        *([content[:i], content[i:]] for i in range(1, len(content))),
        [content[i : i + 1] for i in range(len(content))],
    ]


def data(chunks: list[bytes], limits: Limits = DEFAULT) -> tuple[bytes, Reply | None]:
    """Feed DATA's wire bytes in *chunks*: (what was passed on, the verdict at the end)."""
    receiver = DataReceiver(limits, REJECT)
    out = []
    for chunk in chunks:
        pieces, end = receiver.feed(chunk)
        out += pieces
        if end is not None:
            return b"".join(out), receiver.finish()
    raise AssertionError("no end of data")


# --- the count --------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "refused"), [(0, False), (1, False), (LIMIT, False),
                                                (LIMIT + 1, True), (LIMIT + 30, True)])
def test_the_limit_itself_passes_one_more_is_refused(count: int, refused: bool) -> None:
    content = message(count)
    expected = too_many(count) if refused else None
    assert check([content]) == expected
    wire = content + b".\r\n"
    assert data([wire]) == (b"" if refused else content, expected)


def test_the_reply() -> None:
    reply = too_many(101)
    assert (reply.code, reply.status) == (554, "5.4.6")  # RFC 3463 3.5: routing loop
    assert reply.encode() == (
        b"554 5.4.6 Too many hops (101 Received: header fields, limit 100)\r\n")


def test_split_anywhere_in_data_and_bdat() -> None:
    """Every cut of the message, in DATA and as BDAT chunks: a Received: cut anywhere
    (inside its name, between CR and LF, at a fold) is counted once, never twice."""
    for count in (LIMIT, LIMIT + 1):
        content = message(count)
        expected = too_many(count) if count > LIMIT else None
        for chunks in chunkings(content):
            assert check(chunks) == expected, chunks
        wire = content + b".\r\n"
        for chunks in chunkings(wire):
            assert data(chunks)[1] == expected, chunks


def test_small_limit_in_every_chunking() -> None:
    limits = Limits(max_hops=2)
    for n, expected in ((2, None), (3, too_many(3, 2))):
        for chunks in chunkings(message(n)):
            assert check(chunks, limits) == expected, chunks
            assert check(chunks, limits, text=False) == expected, chunks


@pytest.mark.parametrize("name", [b"received:", b"RECEIVED:", b"rEcEiVeD:", b"Received:"])
def test_the_field_name_in_any_case_counts(name: bytes) -> None:
    limits = Limits(max_hops=2)
    header = b"Received: a\r\n" * 2 + name + b" b\r\n"
    assert check([header + b"\r\nbody\r\n"], limits) == too_many(3, 2)
    assert check([header[:-8], header[-8:] + b"\r\nbody\r\n"], limits) == too_many(3, 2)


def test_folded_lines_count_once() -> None:
    limits = Limits(max_hops=1)
    folded = b"Received: from a\r\n by b\r\n\tReceived: not a field\r\n Received: no\r\n"
    assert check([folded + b"\r\nbody\r\n"], limits) is None
    assert check([folded + b"Received: x\r\n\r\nbody\r\n"], limits) == too_many(2, 1)


@pytest.mark.parametrize(
    "line",
    [b"X-Received: x", b"ARC-Received: x", b"Subject: Received: x", b"Receivedx: y",
     b"Received x", b" Received: folded"],
)
def test_other_fields_do_not_count(line: bytes) -> None:
    limits = Limits(max_hops=1)
    assert check([b"Received: a\r\n" + line + b"\r\n\r\nbody\r\n"], limits) is None


@pytest.mark.parametrize("empty", [b"\r\n", b"\r\n" + (b"x" * 78 + b"\r\n") * 64],
                         ids=["short", "long"])
def test_received_in_the_body_does_not_count(empty: bytes) -> None:
    body = b"Received: from a forwarded message\r\n" * (LIMIT + 5)
    content = received(LIMIT) + empty + body
    for chunks in ([content], [content[:3000], content[3000:]], [content[:-40], content[-40:]]):
        assert check(chunks) is None
    assert data([content + b".\r\n"]) == (content, None)
    assert check([b"\r\n" + body]) is None  # an empty header block: all of it is body


def test_a_message_without_an_empty_line_is_all_header() -> None:
    """RFC 5322 2.1: the body is optional; without the empty line every line is a
    header line, and the count is final at the end of the message."""
    limits = Limits(max_hops=3)
    for n, expected in ((3, None), (4, too_many(4, 3))):
        content = b"Received: x\r\n" * n
        for chunks in chunkings(content):
            assert check(chunks, limits) == expected, chunks
        assert data([content + b".\r\n"], limits)[1] == expected
    assert check([b"Received: x\r\n" * 3 + b"Received: unterminated"], limits) == too_many(4, 3)


def test_data_counts_the_unstuffed_content() -> None:
    """A header line starting with a dot is doubled on the wire (RFC 5321 4.5.2):
    ".Received:" as sent is "Received:" as stored, "..Received:" is ".Received:"."""
    limits = Limits(max_hops=1)
    assert data([b"Received: a\r\n..Received: b\r\n\r\nx\r\n.\r\n"], limits)[1] is None
    assert data([b"Received: a\r\n.Received: b\r\n\r\nx\r\n.\r\n"], limits)[1] == too_many(2, 1)


@pytest.mark.parametrize("empty", [b"\n", b"\r\n"])
def test_binarymime_header_block_may_end_with_a_bare_lf(empty: bytes) -> None:
    """RFC 3030 3: a BINARYMIME message's lines may end in LF; its header block ends at
    the first empty line either way, and what follows is body."""
    header = received(LIMIT, b"\n")
    body = b"Received: in the body\n" * 10 + bytes(range(256))
    content = header + empty + body
    for chunks in ([content], *([content[:i], content[i:]] for i in range(0, len(content), 97))):
        assert check(chunks, text=False) is None, chunks
    over = b"Received: one more\n" + content
    assert check([over], text=False) == too_many(LIMIT + 1)
    assert check([over[:5], over[5:]], text=False) == too_many(LIMIT + 1)


def test_no_limit() -> None:
    limits = Limits(max_hops=0)
    assert check([message(2000)], Limits(max_hops=0, max_header_block=10**6)) is None
    assert check([b"Received: x\r\n" * 100], limits) is None


def test_the_limit_is_not_negative() -> None:
    with pytest.raises(ValueError, match="max_hops"):
        Limits(max_hops=-1)


def test_a_header_block_too_big_is_that_first() -> None:
    limits = Limits(max_hops=1, max_header_block=100)
    assert check([b"Received: x\r\n" * 20 + b"\r\nbody\r\n"], limits) == R.R552_HEADER_TOO_BIG


def test_reset_forgets_the_count() -> None:
    checker = ContentChecker(Limits(max_hops=1), REJECT, lines=False)
    checker.feed(b"Received: a\r\n")
    checker.reset()
    checker.feed(b"Received: b\r\n\r\nx")
    assert checker.finish() is None


_EMPTY_LINE_CRLF = re.compile(rb"\r\n\r\n")
_EMPTY_LINE_ANY = re.compile(rb"\n\r?\n")


def _hops_model(content: bytes, binary: bool) -> int:
    """Received: fields of the header block, line by line: the block ends at the first
    empty line (a text message's lines end in CRLF; a BINARYMIME one's may end in LF)."""
    found = (_EMPTY_LINE_ANY if binary else _EMPTY_LINE_CRLF).search(b"\r\n" + content)
    block = content if found is None else content[: found.start() + (1 if binary else 2) - 2]
    return sum(line.lower().startswith(b"received:") for line in block.split(b"\n"))


@settings(max_examples=500, deadline=None)
@given(
    st.data(),
    st.booleans(),
    st.lists(
        st.sampled_from([b"Received: x", b"rECEIVED:", b"received", b":", b"\r\n", b"\n",
                         b"\r", b" ", b"\t", b"X-", b"y"]),
        max_size=30,
    ),
)
def test_count_model(data: st.DataObject, binary: bool, parts: list[bytes]) -> None:
    """The count in any chunking is the line-by-line count of the header block."""
    content = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(content)), max_size=8)))
    chunks = [content[a:b] for a, b in itertools.pairwise([0, *cuts, len(content)])]
    limits = Limits(max_hops=2)
    count = _hops_model(content, binary)
    expected = too_many(count, 2) if count > 2 else None
    assert check(chunks, limits, ACCEPT, text=not binary) == expected


# --- the session: DATA, BDAT, LMTP -------------------------------------------------------

ENVELOPE: list[Step] = [
    *EHLO,
    "MAIL FROM:<sender@remote.example>",
    (250, "2.1.0"),
    "RCPT TO:<rcpt@localhost>",
    (250, "2.1.5"),
]
NEXT: list[Step] = [*ENVELOPE[2:], "DATA", (354, None), b"Subject: next\r\n\r\nok\r\n.\r\n",
                    (250, "2.0.0")]


def test_data_refused_then_the_next_message_is_accepted() -> None:
    result = run([*ENVELOPE, "DATA", (354, None), message(LIMIT + 1) + b".\r\n",
                  (554, "5.4.6"), *NEXT])
    assert result.replies[5].lines == ("Too many hops (101 Received: header fields, limit 100)",)
    assert result.bodies == [b"Subject: next\r\n\r\nok\r\n"]
    assert result.aborted == [b""]  # nothing was passed on
    assert result.of(MessageAborted) == [MessageAborted(too_many(LIMIT + 1))]
    assert result.session.errors == 1


def test_data_with_the_limit_is_delivered() -> None:
    result = run([*ENVELOPE, "DATA", (354, None), message(LIMIT) + b".\r\n", (250, "2.0.0")])
    assert result.bodies == [message(LIMIT)]


def test_bdat_chunks_cut_inside_received_fields() -> None:
    content = message(LIMIT + 1)
    cut = content.index(b"\r\nReceived:", 1000) + 6  # between "\r\nRec" and "eived:"
    a, b = content[:cut], content[cut:]
    result = run([*ENVELOPE, f"BDAT {len(a)}", a, (250, "2.0.0"),
                  f"BDAT {len(b)} LAST", b, (554, "5.4.6"), *NEXT])
    assert result.bodies == [b"Subject: next\r\n\r\nok\r\n"]
    assert result.of(MessageAborted) == [MessageAborted(too_many(LIMIT + 1))]
    end = content.index(b"\r\n\r\n")  # a first chunk without all of it: refused at LAST
    for cut in (1, end, end + 1, end + 3):  # (each run is whole, by line and by byte)
        a, b = content[:cut], content[cut:]
        run([*ENVELOPE, f"BDAT {len(a)}", a, (250, "2.0.0"),
             f"BDAT {len(b)} LAST", b, (554, "5.4.6")])
    a, b = content[: end + 4], content[end + 4 :]  # the whole header block in the first
    run([*ENVELOPE, f"BDAT {len(a)}", a, (554, "5.4.6"), f"BDAT {len(b)} LAST", b, (503, "5.5.1")])


def test_bdat_refused_at_the_chunk_that_ends_the_header_block() -> None:
    """Like every content refusal of a BDAT message, at the chunk where it is known
    (RFC 3030 2 lets any chunk be refused); the rest of the message is refused too."""
    content = message(LIMIT + 1)
    result = run([*ENVELOPE, f"BDAT {len(content)}", content, (554, "5.4.6"),
                  "BDAT 3 LAST", b"end", (503, "5.5.1"), *NEXT])
    assert result.bodies == [b"Subject: next\r\n\r\nok\r\n"]


def test_binarymime_bdat() -> None:
    header = received(LIMIT + 1, b"\n") + b"\n"
    result = run([*EHLO, "MAIL FROM:<a@b.example> BODY=BINARYMIME", (250, "2.1.0"),
                  "RCPT TO:<rcpt@localhost>", (250, "2.1.5"),
                  f"BDAT {len(header) + 3} LAST", header + b"\0\r\n", (554, "5.4.6")])
    assert result.bodies == []
    assert len(result.of(MailReceived)) == 1


LMTP = Config(mode=Mode.LMTP)
LMTP_ENVELOPE: list[Step] = [
    "LHLO c.example", (250, None), "MAIL FROM:<a@b.example>", (250, "2.1.0"),
    "RCPT TO:<one@localhost>", (250, "2.1.5"), "RCPT TO:<x@other.example>", (550, "5.7.1"),
    "RCPT TO:<two@localhost>", (250, "2.1.5"), "RCPT TO:<three@localhost>", (250, "2.1.5"),
]


def test_lmtp_one_refusal_per_accepted_recipient() -> None:
    """RFC 2033 4.2: after the body one reply per recipient accepted, a refusal too."""
    content = message(LIMIT + 1)
    result = run(
        [*LMTP_ENVELOPE, "DATA", (354, None), content + b".\r\n", *[(554, "5.4.6")] * 3,
         *LMTP_ENVELOPE[2:], f"BDAT {len(content)} LAST", content, *[(554, "5.4.6")] * 3,
         *LMTP_ENVELOPE[2:], "DATA", (354, None), b"x\r\n.\r\n", *[(250, "2.0.0")] * 3],
        LMTP,
    )
    assert result.bodies == [b"x\r\n"]
    assert result.session.errors == 3 + 2  # 3 relay refusals, 1 per refused body
    assert len(result.of(MessageComplete)) == 1


def test_lmtp_a_chunk_before_last_gets_one_reply() -> None:
    content = message(LIMIT + 1)
    run([*LMTP_ENVELOPE, f"BDAT {len(content)}", content, (554, "5.4.6"),
         "BDAT 0 LAST", (503, "5.5.1")], LMTP)


def test_lmtp_every_body_refusal_is_per_recipient() -> None:
    """Not only the hop count: the size limit too (it was one reply for all)."""
    config = Config(mode=Mode.LMTP, limits=Limits(max_message_size=100))
    run([*LMTP_ENVELOPE, "DATA", (354, None), b"x" * 200 + b"\r\n.\r\n",
         *[(552, "5.3.4")] * 3, "NOOP", (250, "2.0.0")], config)
