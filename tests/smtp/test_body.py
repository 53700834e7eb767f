"""Body receivers: DATA end marker and dot-unstuffing (RFC 5321 4.1.1.4, 4.5.2), SMTP
smuggling, content limits (4.5.3.1.6, header block, bare CR/LF), BDAT chunks (RFC 3030)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.body import _BARE_BLOCK, BdatReceiver, ContentChecker, DataReceiver
from maitred_tx.smtp.config import BareLineEndings, Limits
from maitred_tx.smtp.replies import Reply

ACCEPT = BareLineEndings.ACCEPT
REJECT = BareLineEndings.REJECT
DEFAULT = Limits()
ROOMY = Limits(max_text_line=10**7, max_header_block=10**7, max_message_size=10**8)
TOO_LONG = R.R554_LINE_TOO_LONG.format(limit="1000")

Outcome = tuple[bytes, int | None, Reply | None]


def receive(
    chunks: list[bytes], bare: BareLineEndings = ACCEPT, limits: Limits = DEFAULT
) -> Outcome:
    """Feed *chunks* to one DataReceiver: (body, end offset in the input, final error)."""
    receiver = DataReceiver(limits, bare)
    out: list[bytes] = []
    consumed = 0
    for chunk in chunks:
        pieces, end = receiver.feed(chunk)
        assert all(pieces), "empty piece"
        out += pieces
        if end is not None:
            assert 0 < end <= len(chunk)
            return b"".join(out), consumed + end, receiver.finish()
        consumed += len(chunk)
    return b"".join(out), None, receiver.error


def two_parts(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(len(data) + 1)]


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def same_in_every_chunking(data: bytes, **kw: object) -> Outcome:
    """The outcome of feeding *data* whole, which must not depend on the chunking."""
    whole = receive([data], **kw)  # type: ignore[arg-type]
    for chunks in [*two_parts(data), byte_by_byte(data)]:
        got = receive(chunks, **kw)  # type: ignore[arg-type]
        if whole[2] is None:
            assert got == whole, chunks
        else:  # once an error is found nothing more is passed on: the body is cut short
            assert got[1:] == whole[1:], chunks
            if whole[1] is not None:
                assert unstuff(data[: whole[1]]).startswith(got[0]), chunks
    return whole


def stuff(message: bytes) -> bytes:
    """Dot-stuff *message* (which ends with CRLF) and add the end marker (RFC 5321 4.5.2)."""
    return (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def unstuff(stuffed: bytes) -> bytes:
    """The model: remove the dot after every CRLF (the DATA line's CRLF counts)."""
    return (b"\r\n" + stuffed).replace(b"\r\n.", b"\r\n")[2:]


# --- end marker and unstuffing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "body", "end"),
    [
        (b".\r\n", b"", 3),
        (b".\r\nNOOP\r\n", b"", 3),
        (b"hello\r\n.\r\nNOOP\r\n", b"hello\r\n", 10),
        (b"\r\n.\r\n", b"\r\n", 5),
        (b"..\r\n.\r\n", b".\r\n", 7),
        (b".x\r\n.\r\n", b"x\r\n", 7),
        (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n", 16),
        (b"a\r\n.\r\r\n.\r\n", b"a\r\n\r\r\n", 10),
        (b"a\r\n. \r\n.\r\n", b"a\r\n \r\n", 10),
        (b"a\r\n.\r\n.\r\n", b"a\r\n", 6),
    ],
)
def test_end_marker_and_unstuffing(data: bytes, body: bytes, end: int) -> None:
    assert same_in_every_chunking(data) == (body, end, None)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"abc",
        b"abc\r\n",
        b"abc\r\n.",
        b"abc\r\n.\r",
        b"a.\r\n",
        b"\n.\r\n",
        b"a\r\n.\n",
        b".\r",
        b".",
        b"..\r\n",
        b"a\r\n.\ra",
    ],
)
def test_no_end_yet(data: bytes) -> None:
    assert receive([data])[1] is None
    assert receive(byte_by_byte(data))[1] is None


def test_held_bytes_are_released() -> None:
    receiver = DataReceiver(DEFAULT, ACCEPT)
    assert receiver.feed(b"abc\r") == ([b"abc"], None)
    assert receiver.feed(b"\n") == ([], None)
    assert receiver.feed(b".") == ([], None)
    assert receiver.feed(b"x") == ([b"\r\nx"], None)  # one piece per feed
    assert receiver.feed(b"\r\n.\r\nNOOP") == ([b"\r\n"], 5)
    assert receiver.size == 8
    assert receiver.finish() is None


SMUGGLING = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\n.\r\r\n",
    b"\r.\r\n",
    b"\r.\n",
    b"\r\r\n.\r\r\n",
    b"\n\n.\n\n",
    b"\r\n.\r\r\n",
    b"\r\n.\n\r\n",
]
EVIL = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@localhost>\r\nDATA\r\n"


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_never_ends_data_accept(sequence: bytes) -> None:
    data = b"Subject: a\r\n\r\nhello" + sequence + EVIL + b"smuggled\r\n.\r\nNOOP\r\n"
    body, end, error = same_in_every_chunking(data, bare=ACCEPT)
    assert end == len(data) - len(b"NOOP\r\n")
    assert error is None
    assert body == unstuff(data[:end])[:-2]  # the model drops the dot, not the CRLF
    assert EVIL in body


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_never_ends_data_reject(sequence: bytes) -> None:
    data = b"Subject: a\r\n\r\nhello" + sequence + EVIL + b"smuggled\r\n.\r\nNOOP\r\n"
    body, end, error = same_in_every_chunking(data, bare=REJECT)
    assert end == len(data) - len(b"NOOP\r\n")
    assert error == R.R550_BARE_LINE_ENDING
    assert body == b""


SAMPLES = [
    b"a\r\n..b\r\n.\r\n",
    b"\r\n\r\n.\r\n",
    b"..\r\n...\r\n.x\r\n.\r\nrest",
    b"x\r.\r\n.\n\r\n.\r\n",
    b"Subject: s\r\n\r\n" + b"y" * 40 + b"\r\n.\r\n",
]


@pytest.mark.parametrize("data", SAMPLES)
def test_every_split_gives_the_same_result(data: bytes) -> None:
    body, end, error = same_in_every_chunking(data, bare=ACCEPT)
    assert end is not None and error is None
    assert body == unstuff(data[:end])[:-2]


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or CRLF lines rich in dots, ending with CRLF."""
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=300))
    else:
        lines = draw(
            st.lists(
                st.sampled_from([b"", b".", b"..", b".\r", b"x", b".x", b"\r", b"\n", b"a.b"])
            )
        )
        raw = b"\r\n".join(lines)
    return raw + b"\r\n"


@settings(max_examples=300, deadline=None)
@given(st.data(), messages())
def test_stuffing_round_trip(data: st.DataObject, message: bytes) -> None:
    wire = stuff(message) + b"NEXT COMMAND\r\n"
    chunks = data.draw(chunkings(wire))
    assert receive(chunks, ACCEPT, ROOMY) == (message, len(wire) - 14, None)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.binary(max_size=200))
def test_arbitrary_input_same_in_any_chunking(data: st.DataObject, raw: bytes) -> None:
    whole = receive([raw], ACCEPT, ROOMY)
    assert receive(data.draw(chunkings(raw)), ACCEPT, ROOMY) == whole
    if whole[1] is not None:  # ends exactly after the first CRLF "." CRLF
        assert (b"\r\n" + raw).find(b"\r\n.\r\n") + 3 == whole[1]
        assert whole[0] == unstuff(raw[: whole[1]])[:-2]


# --- message size -----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "error"), [(99, None), (100, None), (101, R.R552_TOO_BIG)])
def test_size_limit(size: int, error: Reply | None) -> None:
    limits = Limits(max_message_size=100)
    message = b"x" * (size - 2) + b"\r\n"
    body, end, got = same_in_every_chunking(stuff(message), limits=limits)
    assert (end, got) == (size + 3, error)
    assert body == (message if error is None else b"")
    for chunks in byte_by_byte(stuff(message)), [stuff(message)[:60], stuff(message)[60:]]:
        receiver = DataReceiver(limits, ACCEPT)
        passed = sum(len(p) for c in chunks for p in receiver.feed(c)[0])
        assert passed <= 100
        assert receiver.size == size  # counted on, after the limit


def test_size_counts_unstuffed_octets() -> None:
    limits = Limits(max_message_size=100)
    message = b".\r\n" * 33 + b"x\r\n"  # 102 octets of content
    assert len(message) == 102
    assert receive([stuff(message)], limits=limits)[2] == R.R552_TOO_BIG
    message = b".\r\n" * 32 + b"ab\r\n"  # 100 octets of content, 132 on the wire
    assert receive([stuff(message)], limits=limits) == (message, 135, None)


# --- text line length -------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "error"), [(997, None), (998, None), (999, TOO_LONG)])
def test_line_length(length: int, error: Reply | None) -> None:
    message = b"head\r\n" + b"x" * length + b"\r\nshort\r\n"
    _, end, got = same_in_every_chunking(stuff(message), bare=REJECT)
    assert (end, got) == (len(message) + 3, error)


@pytest.mark.parametrize("offset", [0, 1, 250, 499, 500, 501, 998, 999, 1500, 4321])
@pytest.mark.parametrize("length", [998, 999, 2000])
def test_long_line_in_a_big_buffer(offset: int, length: int) -> None:
    message = b"p" * offset + b"\r\n" + (b"s\r\n" * 700) + b"L" * length + b"\r\n"
    message += b"ab\r\n" * 900
    error = TOO_LONG if length > 998 or offset > 998 else None
    assert receive([stuff(message)], REJECT)[1:] == (len(message) + 3, error)
    assert receive([stuff(message)[:3000], stuff(message)[3000:]], REJECT)[2] == error


def test_dot_stuffed_line_may_be_1001_octets_on_the_wire() -> None:
    # RFC 5321 4.5.3.1.6: "not counting the leading dot duplicated for transparency".
    line = b"." + b"q" * 997  # 998 octets of content
    _, end, error = same_in_every_chunking(b"." + line + b"\r\n.\r\n", bare=REJECT)
    assert (end, error) == (1004, None)
    _, _, error = same_in_every_chunking(b".." + line + b"\r\n.\r\n", bare=REJECT)
    assert error == TOO_LONG


# --- ContentChecker -------------------------------------------------------------------------


def check(
    chunks: list[bytes], limits: Limits = ROOMY, bare: BareLineEndings = REJECT, text: bool = True
) -> Reply | None:
    checker = ContentChecker(limits, bare, text=text)
    for chunk in chunks:
        checker.feed(chunk)
    return checker.finish()


@pytest.mark.parametrize(
    ("chunks", "bare"),
    [
        ([b"a\r", b"\nb"], False),
        ([b"a\r", b"\n", b"b\r\n"], False),
        ([b"a\r\n", b"\r\n"], False),
        ([b"a", b"\r", b"\n", b"b"], False),
        ([b"a\r", b"b"], True),
        ([b"a\r", b"b", b"\n"], True),
        ([b"a\r", b"bcd", b"\r\n"], True),
        ([b"a\rb\n"], True),
        ([b"a\r.\n"], True),
        ([b"x\r\n\ra\nb\r\n"], True),
        ([b"a\r"], True),  # a CR dangling at the very end
        ([b"a\r", b""], True),
        ([b"a\n"], True),
        ([b"\n"], True),
        ([b"a\r\r\n"], True),
        ([b"a\r", b"\r\n"], True),
        ([b"a\n\r"], True),
    ],
)
def test_bare_line_endings_across_chunks(chunks: list[bytes], bare: bool) -> None:
    assert check(chunks) == (R.R550_BARE_LINE_ENDING if bare else None)
    assert check(chunks, bare=ACCEPT) is None
    assert check(chunks, bare=REJECT, text=False) is None  # BINARYMIME: no lines


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@settings(max_examples=300, deadline=None)
@given(st.data(), st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"bc"]), max_size=30))
def test_bare_line_ending_model(data: st.DataObject, parts: list[bytes]) -> None:
    content = b"".join(parts)
    expected = R.R550_BARE_LINE_ENDING if _BARE.search(content) else None
    assert check(data.draw(chunkings(content))) == expected


@settings(max_examples=400, deadline=None)
@given(st.data(), st.lists(st.sampled_from(
    [b"a", b"\r", b"\n", b"\r\n", b"bc", b"\0", b"\r\n" * 40]), max_size=30))
def test_bare_line_ending_model_for_bdat(data: st.DataObject, parts: list[bytes]) -> None:
    """BDAT's check (no line framing, ContentChecker(lines=False)).  With both a NUL
    and a bare line ending either refusal is right: which comes first can depend on
    where a read ends (a CR at the end of one, the NUL starting the next)."""
    content = b"".join(parts)
    nul, bare = b"\0" in content, _BARE.search(content) is not None
    expected = {R.R550_NUL_CHARACTER} if nul else set()
    expected |= {R.R550_BARE_LINE_ENDING} if bare else set()
    checker = ContentChecker(ROOMY, REJECT, lines=False)
    for chunk in data.draw(chunkings(content)):
        checker.feed(chunk)
    result = checker.finish()
    assert result in expected if expected else result is None
    if nul and not bare:
        assert result == R.R550_NUL_CHARACTER


@pytest.mark.parametrize("content", [b"\ra\n", b"x\ra\nb\r\n", b"a\nb\r", b"\n\r"])
def test_bdat_check_sees_a_cr_and_an_lf_apart(content: bytes) -> None:
    """A CR and an LF with octets between them are two bare line endings, though the
    CRs and LFs alone, in order, read as a CRLF (a shortcut that was tried and failed)."""
    checker = ContentChecker(ROOMY, REJECT, lines=False)
    checker.feed(content)
    assert checker.finish() == R.R550_BARE_LINE_ENDING


def test_bdat_check_with_many_line_breaks_in_one_read() -> None:
    many = b"\r\n" * 40000
    for tail, expected in ((b"", None), (b"\n", R.R550_BARE_LINE_ENDING),
                           (b"\0", R.R550_NUL_CHARACTER)):
        checker = ContentChecker(ROOMY, REJECT, lines=False)
        checker.feed(many + tail + many)
        assert checker.finish() == expected


def _around_blocks(size: int) -> list[int]:
    return sorted({p for b in range(0, size, _BARE_BLOCK) for p in range(b - 2, b + 3)
                   if 0 <= p < size - 2})


@pytest.mark.parametrize("after_cr", [False, True])
@pytest.mark.parametrize("defect", [b"\r\n", b"\n", b"\r", b"\rx\n", b"\n\r", b"\r\r\n"])
def test_bdat_check_across_its_blocks(after_cr: bool, defect: bytes) -> None:
    """One read of several of _check_bare's blocks, with a line break (or a bare CR/LF,
    or a CR and an LF apart) at every place around a block's edge, as the read's first
    octet too, after a read that ended in a CR or not."""
    size = 3 * _BARE_BLOCK + 5
    for at in _around_blocks(size):
        piece = b"x" * at + defect + b"x" * (size - at - len(defect))
        before = b"a\r" if after_cr else b"a\r\n"
        expected = R.R550_BARE_LINE_ENDING if _BARE.search(before + piece) else None
        checker = ContentChecker(ROOMY, REJECT, lines=False)
        checker.feed(before)
        checker.feed(piece)
        assert checker.finish() == expected, (at, defect, after_cr)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.lists(st.integers(0, 1200), min_size=1, max_size=8), st.booleans())
def test_line_length_model(data: st.DataObject, lengths: list[int], terminated: bool) -> None:
    content = b"\r\n".join(b"w" * n for n in lengths) + (b"\r\n" if terminated else b"")
    limits = Limits(max_header_block=10**7)
    # Octets per line, CR included: at most 999 (1000 with the LF, RFC 5321 4.5.3.1.6).
    sizes = [n + 1 for n in lengths[:-1]] + [lengths[-1] + terminated]
    expected = TOO_LONG if max(sizes) > 999 else None
    assert check(data.draw(chunkings(content)), limits, ACCEPT) == expected


def test_unterminated_last_line_is_checked() -> None:
    limits = Limits(max_header_block=10**7)
    assert check([b"a\r\n" + b"b" * 1000], limits) == TOO_LONG
    assert check([b"a\r\n", b"b" * 1000], limits) == TOO_LONG
    assert check([b"a\r\n" + b"b" * 999], limits) is None


@pytest.mark.parametrize("size", [58, 59, 60, 61, 62])
def test_header_block_limit(size: int) -> None:
    limits = Limits(max_header_block=60)
    header = b"h: " + b"v" * (size - 5) + b"\r\n"
    assert len(header) == size
    content = header + b"\r\nbody\r\n"
    expected = R.R552_HEADER_TOO_BIG if size > 60 else None
    for chunks in [[content], *two_parts(content), byte_by_byte(content)]:
        assert check(chunks, limits) == expected, chunks


def test_header_block_without_body_and_empty_header() -> None:
    limits = Limits(max_header_block=60)
    assert check([b"h: " + b"v" * 60], limits) == R.R552_HEADER_TOO_BIG
    assert check([b"h: v\r\n" * 10], limits) is None
    assert check([b"h: v\r\n" * 11], limits) == R.R552_HEADER_TOO_BIG
    assert check([b"\r\n" + b"b" * 500 + b"\r\n"], limits) is None  # empty header block
    assert check([b"\r\n", b"b" * 500 + b"\r\n"], limits) is None
    assert check([b"h: v\r\n\r\n" + b"b" * 500 + b"\r\n"], limits) is None


_EMPTY_LINE_CRLF = re.compile(rb"\r\n\r\n")
_EMPTY_LINE_ANY = re.compile(rb"\n\r?\n")


def _header_block_model(content: bytes, binary: bool) -> int:
    """Octets of the header block: up to its last line's end, the empty line not
    counted; a text message's lines end in CRLF, a BINARYMIME one's may end in LF."""
    probe = b"\r\n" + content  # an empty header block: the content starts with a break
    found = (_EMPTY_LINE_ANY if binary else _EMPTY_LINE_CRLF).search(probe)
    if found is not None:
        return found.start() + (1 if binary else 2) - 2
    # No end yet: a final CR may begin the empty line and is not counted.
    return len(content) - probe.endswith(b"\n\r" if binary else b"\r\n\r")


@settings(max_examples=400, deadline=None)
@given(
    st.data(),
    st.booleans(),
    st.lists(st.sampled_from([b"h: v", b"\r\n", b"\n", b"\r", b"x" * 17, b"\0"]),
             max_size=24),
)
def test_header_block_model(data: st.DataObject, binary: bool, parts: list[bytes]) -> None:
    """The header block limit in any chunking; a BINARYMIME message's header block may
    end with a bare LF empty line (RFC 3030 3: its content is opaque, and refusing it
    as too big because its lines end in LF is refusing it for its line endings)."""
    content = b"".join(parts)
    limits = Limits(max_header_block=40, max_text_line=10**7)
    expected = R.R552_HEADER_TOO_BIG if _header_block_model(content, binary) > 40 else None
    checker = ContentChecker(limits, ACCEPT, text=not binary)
    for chunk in data.draw(chunkings(content)):
        checker.feed(chunk)
    assert checker.finish() == expected


@pytest.mark.parametrize("empty", [b"\n", b"\r\n"])
def test_binarymime_header_block_may_end_in_lf(empty: bytes) -> None:
    """A 200 KB BINARYMIME message with LF line ends (was: 552 5.3.4 header too big)."""
    message = b"Subject: x\nFrom: a@b.test\n" + empty + b"x" * 200_000
    for chunks in [[message], [message[:20], message[20:]], [message[:27], message[27:]]]:
        assert check(chunks, DEFAULT, REJECT, text=False) is None
        assert check(chunks, DEFAULT, ACCEPT, text=True) == R.R552_HEADER_TOO_BIG


def test_header_limit_through_data_receiver() -> None:
    limits = Limits(max_header_block=60)
    message = b"h: " + b"v" * 60 + b"\r\n\r\nbody\r\n"
    assert same_in_every_chunking(stuff(message), limits=limits)[2] == R.R552_HEADER_TOO_BIG


def test_first_error_is_kept() -> None:
    checker = ContentChecker(ROOMY, REJECT)
    assert checker.feed(b"a\nb") == R.R550_BARE_LINE_ENDING
    assert checker.feed(b"\r\n") == R.R550_BARE_LINE_ENDING
    assert checker.finish() == R.R550_BARE_LINE_ENDING


# --- BDAT -------------------------------------------------------------------------------------


def test_bdat_receiver_exact_counts() -> None:
    receiver = BdatReceiver(5)
    assert not receiver.done
    assert receiver.feed(b"ab") == (b"ab", 2)
    assert receiver.remaining == 3
    assert receiver.feed(b"\r\n.\r\nQUIT\r\n") == (b"\r\n.", 3)
    assert receiver.done
    assert receiver.feed(b"more") == (b"", 0)


def test_bdat_receiver_discard_and_zero() -> None:
    receiver = BdatReceiver(4, discard=True)
    assert receiver.feed(b"abcdef") == (b"", 4)
    assert receiver.done
    assert BdatReceiver(0).done


@settings(max_examples=200, deadline=None)
@given(st.data(), st.binary(max_size=100), st.binary(max_size=20))
def test_bdat_receiver_any_chunking(data: st.DataObject, chunk: bytes, after: bytes) -> None:
    receiver = BdatReceiver(len(chunk))
    got, rest = [], []
    for piece in data.draw(chunkings(chunk + after)):
        taken_piece, taken = receiver.feed(piece)
        assert taken == len(taken_piece)
        got.append(taken_piece)
        rest.append(piece[taken:])
    assert b"".join(got) == chunk
    assert b"".join(rest) == after
    assert receiver.done


class _Sequential(ContentChecker):
    """The checker as it was: the bare line ending and line length checks one after
    the other, two passes each; the reference for the one-split version."""

    def _check_lines_and_bare(self, data: bytes) -> None:
        self._check_bare(data)
        if self.error is None:
            self._check_line_length(data)


@settings(max_examples=400, deadline=None)
@given(st.data(), st.lists(st.sampled_from(
    [b"a" * 400, b"b" * 599, b"c", b"\r", b"\n", b"\r\n", b"\0", b".", b"\r\n\r\n"]),
    max_size=14))
def test_one_split_agrees_with_the_two_checks(data: st.DataObject, parts: list[bytes]) -> None:
    content = b"".join(parts)
    limits = Limits(max_header_block=10**7)
    chunks = data.draw(chunkings(content))
    one = ContentChecker(limits, REJECT)
    two = _Sequential(limits, REJECT)
    for chunk in chunks:
        assert one.feed(chunk) == two.feed(chunk)
    assert one.finish() == two.finish()


@settings(max_examples=200, deadline=None)
@given(st.data(), st.lists(st.integers(0, 1200), min_size=1, max_size=8), st.booleans())
def test_line_length_model_with_bare_checks_on(
    data: st.DataObject, lengths: list[int], terminated: bool
) -> None:
    content = b"\r\n".join(b"w" * n for n in lengths) + (b"\r\n" if terminated else b"")
    limits = Limits(max_header_block=10**7)
    sizes = [n + 1 for n in lengths[:-1]] + [lengths[-1] + terminated]
    expected = TOO_LONG if max(sizes) > 999 else None
    assert check(data.draw(chunkings(content)), limits, REJECT) == expected


def _feed_all(receiver: DataReceiver, chunks: list[bytes]) -> Outcome:
    out: list[bytes] = []
    consumed = 0
    for chunk in chunks:
        pieces, end = receiver.feed(chunk)
        out += pieces
        if end is not None:
            return b"".join(out), consumed + end, receiver.finish()
        consumed += len(chunk)
    return b"".join(out), None, receiver.error


SAMPLES = [
    [b"Subject: a\r\n\r\n..dot\r\n.\r\n"],
    [b"Subject: a\r\n\r\nbare\nLF\r\n.\r\n"],  # refused (REJECT), a clean start after
    [b"x" * 1200 + b"\r\n.\r\n"],  # too long a line
    [b"Subject: b\r\n\r\nend with CR\r", b"\n.\r\n"],
    [b".\r\n"],
    [b"NUL\0\r\n.\r\n"],
    [b"Subject: " + b"h" * 300 + b"\r\n", b"\r\nbody\r\n.\r\n"],
]


@pytest.mark.parametrize("bare", [ACCEPT, REJECT])
def test_reset_receiver_is_like_a_new_one(bare: BareLineEndings) -> None:
    """The session reuses one DataReceiver: after reset() it answers every body as a
    new one would, whatever the previous body left behind (errors, a held CR, header
    state)."""
    limits = Limits(max_header_block=200)
    reused = DataReceiver(limits, bare)
    for first, second in itertools.product(SAMPLES, repeat=2):
        reused.reset()
        assert _feed_all(reused, first) == _feed_all(DataReceiver(limits, bare), first)
        reused.reset()
        assert _feed_all(reused, second) == _feed_all(DataReceiver(limits, bare), second)
