"""ServerSession transcripts: every reply checked for code and enhanced code, every
transcript fed whole, line by line and byte by byte (see transcript.py)."""

from __future__ import annotations

import pytest
from transcript import EHLO, Step, parse_replies, run

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.config import BareLineEndings, Config, Limits, Mode
from maitred_tx.smtp.params import BodyType, MailParams, Notify, RcptParams, Ret
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
    Refused,
    ServerSession,
)
from maitred_tx.smtp.state import State

ENVELOPE: list[Step] = [
    *EHLO,
    "MAIL FROM:<sender@remote.example>",
    (250, "2.1.0"),
    "RCPT TO:<rcpt@localhost>",
    (250, "2.1.5"),
]


def codes(data: bytes) -> list[tuple[int, str | None]]:
    return [r.codes for r in parse_replies(data)]


def drain(session: ServerSession) -> list[object]:
    """next_event until NEED_DATA or PAUSED (included); no decisions taken."""
    events: list[object] = []
    while True:
        event = session.next_event()
        events.append(event)
        if event is NEED_DATA or event is PAUSED:
            return events


# --- greeting and EHLO ------------------------------------------------------------------


def test_greeting_has_no_enhanced_code() -> None:
    session = ServerSession(Config(hostname="mx.example"))
    assert session.data_to_send() == b"220 mx.example ESMTP maitred_tx\r\n"
    assert session.next_event() is NEED_DATA


def test_lmtp_greeting() -> None:
    session = ServerSession(Config(hostname="mx.example", mode=Mode.LMTP))
    assert session.data_to_send() == b"220 mx.example LMTP maitred_tx\r\n"


def test_ehlo_capabilities() -> None:
    config = Config(hostname="mx.example", limits=Limits(max_message_size=12345))
    result = run(EHLO, config)
    ehlo = result.replies[1]
    assert ehlo.codes == (250, None)
    assert ehlo.lines == (
        "mx.example",
        "PIPELINING",
        "SIZE 12345",
        "8BITMIME",
        "BINARYMIME",
        "CHUNKING",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
    )
    [hello] = result.of(HelloReceived)
    assert hello.command.domain == "client.example"
    assert result.session.info.helo == "client.example"
    assert result.session.info.esmtp is True


def test_helo_gives_no_enhanced_codes_and_ehlo_does() -> None:
    result = run(
        [
            "HELO client.example",
            (250, None),
            "MAIL FROM:<a@remote.example>",
            (250, None),
            "RCPT TO:<b@other.example>",
            (550, None),
            "FOO",
            (500, None),
            "EHLO client.example",
            (250, None),
            "MAIL FROM:<a@remote.example>",
            (250, "2.1.0"),
            "RCPT TO:<b@other.example>",
            (550, "5.7.1"),
            "HELO again.example",
            (250, None),
            "NOOP",
            (250, None),
        ]
    )
    assert result.replies[1].lines == ("localhost",)
    assert result.session.info.esmtp is False
    assert result.session.info.helo == "again.example"


def test_rejected_ehlo_keeps_state() -> None:
    def decide(event: Event) -> Reply | None:
        if isinstance(event, HelloReceived) and event.command.domain == "bad.example":
            return R.R550_SENDER_REJECTED
        return None

    result = run(
        ["EHLO bad.example", (550, None), "MAIL FROM:<a@b.example>", (503, None), *EHLO],
        decide=decide,
    )
    assert result.session.state is State.GREETED


# --- every verb ----------------------------------------------------------------------------


def test_trailing_space_and_tab_are_tolerated_on_every_command() -> None:
    # RFC 5321 4.1.1: "SHOULD tolerate trailing white space"; a TAB after RCPT's path
    # was once refused with 501.
    result = run(
        [
            "EHLO client.example \t",
            (250, None),
            "MAIL FROM:<a@remote.example> SIZE=20\t",
            (250, "2.1.0"),
            "RCPT TO:<rcpt@localhost>\t",
            (250, "2.1.5"),
            "RCPT TO:<rcpt2@localhost> \t ",
            (250, "2.1.5"),
            "DATA\t",
            (354, None),
            "Subject: hi",
            "",
            ".",
            (250, "2.0.0"),
            "MAIL FROM:<>\t",
            (250, "2.1.0"),
            "RCPT TO:<rcpt@localhost>\t",
            (250, "2.1.5"),
            "BDAT 5 LAST\t",
            b"hello",
            (250, "2.0.0"),
            "NOOP\t",
            (250, "2.0.0"),
            "RSET \t",
            (250, "2.0.0"),
            "QUIT\t",
            (221, "2.0.0"),
        ]
    )
    assert result.bodies == [b"Subject: hi\r\n\r\n", b"hello"]
    assert result.session.errors == 0




def test_every_verb() -> None:
    result = run(
        [
            *EHLO,
            "NOOP",
            (250, "2.0.0"),
            "NOOP ignored parameters",
            (250, "2.0.0"),
            "HELP",
            (214, "2.0.0"),
            "HELP MAIL",
            (214, "2.0.0"),
            "VRFY rcpt@localhost",
            (252, "2.5.0"),
            "VRFY nobody-at-all@nowhere.example",
            (252, "2.5.0"),
            "VRFY Postmaster",
            (252, "2.5.0"),
            "EXPN staff",
            (502, "5.5.1"),
            "ETRN localhost",
            (502, "5.5.1"),
            "ATRN",
            (502, "5.5.1"),
            "BURL imap://x",
            (502, "5.5.1"),
            "TURN",
            (502, "5.5.1"),
            "XYZZY",
            (500, "5.5.2"),
            "MAIL FROM:<a@remote.example>",
            (250, "2.1.0"),
            "RCPT TO:<rcpt@localhost>",
            (250, "2.1.5"),
            "DATA",
            (354, None),
            "Subject: hi",
            "",
            "body",
            ".",
            (250, "2.0.0"),
            "MAIL FROM:<a@remote.example>",
            (250, "2.1.0"),
            "RCPT TO:<rcpt@localhost>",
            (250, "2.1.5"),
            "BDAT 5 LAST",
            b"hello",
            (250, "2.0.0"),
            "RSET",
            (250, "2.0.0"),
            "HELO client.example",
            (250, None),
            "EHLO client.example",
            (250, None),
            "QUIT",
            (221, "2.0.0"),
        ]
    )
    assert result.bodies == [b"Subject: hi\r\n\r\nbody\r\n", b"hello"]
    assert result.closed
    assert result.session.errors == 6
    assert result.replies[4].lines == (
        "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY",
        "See RFC 5321",
    )


@pytest.mark.parametrize("verb", ["ETRN", "ATRN", "BURL", "TURN", "STARTTLS", "etrn"])
def test_not_implemented_verbs(verb: str) -> None:
    # STARTTLS too: no certificate is configured by default.
    run([*EHLO, verb, (502, "5.5.1"), "NOOP", (250, "2.0.0")])


def test_auth_is_refused_on_an_mx_listener() -> None:
    run([*EHLO, "AUTH PLAIN", (503, "5.5.1"), "AUTH", (501, "5.5.4"),
         "AUTH CRAM-MD5", (504, "5.5.4"), "NOOP", (250, "2.0.0")])


@pytest.mark.parametrize("line", ["FOO", "MAILX FROM:<a@b>", "", " NOOP", "DATA2", "GET"])
def test_unknown_verb(line: str) -> None:
    run([*EHLO, line, (500, "5.5.2"), "NOOP", (250, "2.0.0")])


# --- sequence errors -----------------------------------------------------------------------


def test_mail_before_ehlo_and_the_rest_before_ehlo() -> None:
    # No enhanced code before EHLO (RFC 2034 3): the 503 has none either.
    result = run(
        [
            "MAIL FROM:<a@b.example>",
            (503, None),
            "RCPT TO:<rcpt@localhost>",
            (503, None),
            "DATA",
            (503, None),
            "RSET",
            (250, None),
            "NOOP",
            (250, None),
            *EHLO,
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
        ]
    )
    assert result.replies[1].lines == ("Send EHLO or HELO first",)


def test_wrong_order() -> None:
    result = run(
        [
            *EHLO,
            "RCPT TO:<rcpt@localhost>",
            (503, "5.5.1"),
            "DATA",
            (503, "5.5.1"),
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
            "MAIL FROM:<a@b.example>",
            (503, "5.5.1"),
            "DATA",
            (503, "5.5.1"),
            "RCPT TO:<nobody@other.example>",
            (550, "5.7.1"),
            "DATA",  # no valid recipient
            (503, "5.5.1"),
            "RCPT TO:<rcpt@localhost>",
            (250, "2.1.5"),
            "MAIL FROM:<c@d.example>",
            (503, "5.5.1"),
            "DATA",
            (354, None),
            ".",
            (250, "2.0.0"),
        ]
    )
    texts = [r.lines[0] for r in result.replies[2:5]]
    assert texts == ["Need MAIL command first", "Need MAIL command first", "Sender OK"]
    assert result.replies[5].lines == ("Sender already specified",)
    assert result.replies[6].lines == ("Need RCPT command first",)
    assert result.bodies == [b""]
    [done] = result.of(MessageComplete)
    assert done.transaction.sender == Mailbox("a", "b.example")


# --- MAIL / RCPT parameters and paths --------------------------------------------------------


def test_params_reach_events() -> None:
    result = run(
        [
            *EHLO,
            "MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2B1",
            (250, "2.1.0"),
            "RCPT TO:<rcpt@localhost> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40y.example",
            (250, "2.1.5"),
            "RCPT TO:<rcpt2@localhost>",
            (250, "2.1.5"),
        ]
    )
    [mail] = result.of(MailReceived)
    assert mail.command.params == MailParams(
        size=1000, body=BodyType.EIGHT_BIT_MIME, ret=Ret.HDRS, envid="QQ+1"
    )
    first, second = result.of(RcptReceived)
    assert first.command.params == RcptParams(
        notify=frozenset({Notify.SUCCESS, Notify.FAILURE}), orcpt=("rfc822", "x@y.example")
    )
    assert second.command.params == RcptParams()
    txn = result.session.transaction
    assert txn is not None
    assert [m for m, _ in txn.recipients] == [
        Mailbox("rcpt", "localhost"),
        Mailbox("rcpt2", "localhost"),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("MAIL FROM:<a@b.example> FOO=1", (555, "5.5.4")),
        ("MAIL FROM:<a@b.example> NOTIFY=NEVER", (555, "5.5.4")),
        ("MAIL FROM:<a@b.example> SIZE=abc", (501, "5.5.4")),
        ("MAIL FROM:<a@b.example> SIZE=1 SIZE=2", (501, "5.5.4")),
        ("MAIL FROM:<a@b.example> =x", (501, "5.5.4")),
        ("MAIL FROM:<a@b.example> BODY=9BIT", (501, "5.5.4")),
        ("MAIL FROM:<a@b.example>SIZE=1", (501, "5.5.4")),
        ("MAIL FROM:a@b.example", (501, "5.5.4")),
        ("MAIL FROM: a@b.example", (501, "5.5.4")),
        ("MAIL FROM:<a@b.example", (501, "5.5.4")),
        ("MAIL <a@b.example>", (501, "5.5.4")),
        ("MAIL FROM:<a@@b.example>", (501, "5.1.7")),
    ],
)
def test_mail_syntax_errors(line: str, expected: tuple[int, str]) -> None:
    run([*EHLO, line, expected, "MAIL FROM:<a@b.example>", (250, "2.1.0")])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("RCPT TO:<rcpt@localhost> SIZE=1", (555, "5.5.4")),
        ("RCPT TO:<rcpt@localhost> NOTIFY=BOGUS", (501, "5.5.4")),
        ("RCPT TO:<rcpt@localhost> NOTIFY=NEVER,SUCCESS", (501, "5.5.4")),
        ("RCPT TO:<rcpt@localhost> ORCPT=rfc822", (501, "5.5.4")),
        ("RCPT TO:rcpt@localhost", (501, "5.5.4")),
        ("RCPT TO:<>", (501, "5.1.3")),
        ("RCPT TO:<rcpt@>", (501, "5.1.3")),
        ("RCPT <rcpt@localhost>", (501, "5.5.4")),
    ],
)
def test_rcpt_syntax_errors(line: str, expected: tuple[int, str]) -> None:
    result = run([*ENVELOPE, line, expected, "DATA", (354, None), ".", (250, "2.0.0")])
    assert len(result.of(RcptReceived)) == 1


@pytest.mark.parametrize(
    ("size", "expected"),
    [(10_240_000, (250, "2.1.0")), (10_240_001, (552, "5.3.4")), (10**20 - 1, (552, "5.3.4"))],
)
def test_size_at_mail(size: int, expected: tuple[int, str]) -> None:
    result = run([*EHLO, f"MAIL FROM:<a@b.example> SIZE={size}", expected])
    assert len(result.of(MailReceived)) == (1 if expected[0] == 250 else 0)


# --- DATA ------------------------------------------------------------------------------------


def test_data_body_dot_stuffing() -> None:
    result = run(
        [
            *ENVELOPE,
            "DATA",
            (354, None),
            "Subject: x",
            "",
            "..leading dot",
            "..",
            ".x",
            "end",
            ".",
            (250, "2.0.0"),
            "NOOP",
            (250, "2.0.0"),
        ]
    )
    assert result.bodies == [b"Subject: x\r\n\r\n.leading dot\r\n.\r\nx\r\nend\r\n"]
    started, done = result.of(MessageStarted)[0], result.of(MessageComplete)[0]
    assert started.transaction is done.transaction
    assert done.transaction.size == len(result.bodies[0])
    assert result.session.state is State.GREETED
    assert result.session.transaction is None


SMALL = Config(limits=Limits(max_message_size=100, max_text_line=10_000))


@pytest.mark.parametrize(("size", "ok"), [(99, True), (100, True), (101, False), (5000, False)])
def test_data_size_limit(size: int, ok: bool) -> None:
    body = b"x" * (size - 2) + b"\r\n"
    reply = (250, "2.0.0") if ok else (552, "5.3.4")
    result = run(
        [*ENVELOPE, "DATA", (354, None), body + b".\r\n", reply, "NOOP", (250, "2.0.0")], SMALL
    )
    if ok:
        assert result.bodies == [body]
        assert result.aborted == []
    else:
        assert result.bodies == []
        assert result.of(MessageAborted) == [MessageAborted(R.R552_TOO_BIG)]
        for mode in result.modes.values():
            [partial] = mode.aborted
            assert len(partial) <= 100, "body bytes beyond the limit were passed on"
            assert body.startswith(partial)
        assert result.modes["whole"].aborted == [b""]
        # Byte by byte, all but the byte that broke the limit (or a held-back CR) got out.
        assert len(result.modes["byte"].aborted[0]) >= 99
    assert result.session.state is State.GREETED


def test_data_line_too_long_and_header_too_big() -> None:
    config = Config(limits=Limits(max_header_block=200))
    long_line = b"x" * 999 + b"\r\n"
    result = run(
        [
            *ENVELOPE,
            "DATA",
            (354, None),
            b"a: b\r\n\r\n" + long_line + b".\r\n",
            (554, "5.6.0"),
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
            "RCPT TO:<rcpt@localhost>",
            (250, "2.1.5"),
            "DATA",
            (354, None),
            b"h: " + b"v" * 300 + b"\r\n\r\nbody\r\n.\r\n",
            (552, "5.3.4"),
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
            "RCPT TO:<rcpt@localhost>",
            (250, "2.1.5"),
            "DATA",
            (354, None),
            b"a: b\r\n\r\n" + long_line[1:] + b".\r\n",
            (250, "2.0.0"),
        ],
        config,
    )
    assert result.replies[5].lines == ("Message contains a line longer than 1000 octets",)
    assert result.replies[9].lines == ("Message header block too large",)
    assert [a.reply for a in result.of(MessageAborted)] == [
        R.R554_LINE_TOO_LONG.format(limit="1000"),
        R.R552_HEADER_TOO_BIG,
    ]
    assert result.bodies == [b"a: b\r\n\r\n" + long_line[1:]]


def test_dot_stuffed_line_of_1001_octets_is_allowed() -> None:
    # RFC 5321 4.5.3.1.6: 1000 octets including CRLF, "not counting the leading dot
    # duplicated for transparency".  This line is 998 octets + CRLF once unstuffed.
    line = b"." + b"z" * 997
    result = run([*ENVELOPE, "DATA", (354, None), b"." + line + b"\r\n.\r\n", (250, "2.0.0")])
    assert result.bodies == [line + b"\r\n"]


@pytest.mark.parametrize(("size", "reply"), [(60, (250, "2.0.0")), (61, (552, "5.3.4"))])
def test_header_block_limit_in_every_chunking(size: int, reply: tuple[int, str]) -> None:
    # The limit must not move with TCP segmentation: a CR that may start the empty line
    # after the header block is not counted in it.
    header = b"h: " + b"v" * (size - 5) + b"\r\n"
    config = Config(limits=Limits(max_header_block=60))
    result = run([*ENVELOPE, "DATA", (354, None), header + b"\r\nbody\r\n.\r\n", reply], config)
    assert result.bodies == ([header + b"\r\nbody\r\n"] if reply[0] == 250 else [])


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
]
EVIL = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@localhost>\r\nDATA\r\n"


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_rejected(sequence: bytes) -> None:
    body = b"Subject: a\r\n\r\nhello" + sequence + EVIL + b"smuggled\r\n"
    result = run(
        [*ENVELOPE, "DATA", (354, None), body + b".\r\n", (550, "5.6.0"), "NOOP", (250, "2.0.0")]
    )
    assert len(result.of(MailReceived)) == 1  # the smuggled MAIL was never a command
    assert result.of(MessageAborted) == [MessageAborted(R.R550_BARE_LINE_ENDING)]
    assert result.bodies == []


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_accepted_is_stored_as_sent(sequence: bytes) -> None:
    config = Config(bare_line_endings=BareLineEndings.ACCEPT)
    body = b"Subject: a\r\n\r\nhello" + sequence + EVIL + b"smuggled\r\n"
    result = run(
        [*ENVELOPE, "DATA", (354, None), body + b".\r\n", (250, "2.0.0"), "NOOP", (250, "2.0.0")],
        config,
    )
    assert len(result.of(MailReceived)) == 1
    # Only CRLF "." is unstuffed: the body comes back with just those dots removed.
    assert result.bodies == [(b"\r\n" + body).replace(b"\r\n.", b"\r\n")[2:]]
    assert b"MAIL FROM:<evil@x.example>" in result.bodies[0]


def test_data_then_pipelined_commands() -> None:
    result = run(
        [
            *ENVELOPE,
            "DATA",
            (354, None),
            b"one\r\n.\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<rcpt@localhost>\r\nDATA\r\n",
            (250, "2.0.0"),
            (250, "2.1.0"),
            (250, "2.1.5"),
            (354, None),
            b"two\r\n.\r\n",
            (250, "2.0.0"),
        ]
    )
    assert result.bodies == [b"one\r\n", b"two\r\n"]


def test_message_decision_reply_is_sent() -> None:
    def decide(event: Event) -> Reply | None:
        return R.R451_DELIVERY_FAILED if isinstance(event, MessageComplete) else None

    result = run([*ENVELOPE, "DATA", (354, None), ".", (451, "4.3.0")], decide=decide)
    assert result.bodies == [b""]
    assert result.session.state is State.GREETED


# --- BDAT ------------------------------------------------------------------------------------


def test_bdat_chunks_are_raw() -> None:
    chunk = b"a\r\n.\r\nQUIT\r\n..b\r\n"
    result = run(
        [
            *ENVELOPE,
            f"BDAT {len(chunk)}",
            chunk,
            (250, "2.0.0"),
            "BDAT 4",
            b"RSET",
            (250, "2.0.0"),
            "BDAT 0 LAST",
            (250, "2.0.0"),
            "NOOP",
            (250, "2.0.0"),
        ]
    )
    assert result.bodies == [chunk + b"RSET"]
    assert result.replies[4].lines == (f"{len(chunk)} octets received",)
    assert not result.closed
    [done] = result.of(MessageComplete)
    assert done.transaction.chunked is True
    assert done.transaction.size == len(chunk) + 4


def test_bdat_binary() -> None:
    chunk = bytes(range(256)) * 2
    result = run(
        [
            *EHLO,
            "MAIL FROM:<a@b.example> BODY=BINARYMIME",
            (250, "2.1.0"),
            "RCPT TO:<rcpt@localhost>",
            (250, "2.1.5"),
            "DATA",
            (503, "5.5.1"),
            f"BDAT {len(chunk)} LAST",
            chunk,
            (250, "2.0.0"),
        ]
    )
    assert result.bodies == [chunk]
    assert result.replies[4].lines == ("BODY=BINARYMIME requires BDAT",)


def test_bdat_then_data_is_refused() -> None:
    result = run(
        [
            *ENVELOPE,
            "BDAT 3",
            b"abc",
            (250, "2.0.0"),
            "DATA",
            (503, "5.5.1"),
            "RCPT TO:<more@localhost>",
            (503, "5.5.1"),
            "bdat 3 last",
            b"def",
            (250, "2.0.0"),
        ]
    )
    assert result.replies[5].lines == ("DATA not allowed after BDAT",)
    assert result.bodies == [b"abcdef"]


def test_bdat_zero_last() -> None:
    result = run([*ENVELOPE, "BDAT 0 LAST", (250, "2.0.0"), "NOOP", (250, "2.0.0")])
    assert result.bodies == [b""]


@pytest.mark.parametrize(
    "prefix",
    [
        [],  # before EHLO: no enhanced code
        EHLO,
        [*EHLO, "MAIL FROM:<a@b.example>", (250, "2.1.0")],
        [
            *EHLO,
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
            "RCPT TO:<x@other.example>",
            (550, "5.7.1"),
        ],
    ],
)
def test_refused_bdat_swallows_its_chunk(prefix: list[Step]) -> None:
    status = "5.5.1" if prefix else None
    chunk = b"QUIT\r\nMAIL FROM:<e@x.com>"
    result = run(
        [
            *prefix,
            f"BDAT {len(chunk)}",
            chunk,
            (503, status),
            "NOOP",
            (250, "2.0.0" if prefix else None),
        ]
    )
    assert not result.closed
    assert len(result.of(MailReceived)) == (1 if len(prefix) > 2 else 0)
    assert result.of(MessageStarted) == []


@pytest.mark.parametrize(
    "line", ["BDAT", "BDAT x", "BDAT -1", "BDAT 1 LASTX", "BDAT 1 2", "BDAT " + "9" * 21]
)
def test_malformed_bdat_closes(line: str) -> None:
    result = run([*ENVELOPE, line, (501, "5.5.4"), "NOOP"])
    assert result.closed


def test_bdat_over_size_limit() -> None:
    result = run(
        [
            *ENVELOPE,
            "BDAT 60",
            b"x" * 58 + b"\r\n",
            (250, "2.0.0"),
            "BDAT 50 LAST",
            b"y" * 50,
            (552, "5.3.4"),
            "NOOP",
            (250, "2.0.0"),
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
        ],
        SMALL,
    )
    assert result.aborted == [b"x" * 58 + b"\r\n"]
    assert result.of(MessageAborted) == [MessageAborted(R.R552_TOO_BIG)]


def test_bdat_bare_lf_rejected_in_text_chunks() -> None:
    result = run(
        [*ENVELOPE, "BDAT 4", b"a\nb\n", (550, "5.6.0"), "BDAT 1 LAST", b"x", (503, "5.5.1")]
    )
    assert result.of(MessageAborted) == [MessageAborted(R.R550_BARE_LINE_ENDING)]


def test_bdat_has_no_text_line_limit() -> None:
    # BDAT chunks are counted, not line-framed: the 1000-octet text line limit of
    # RFC 5321 4.5.3.1.6 is left to DATA (a deliberate choice, see ContentChecker).
    chunk = b"a\r\n" + b"b" * 1500 + b"\r\n" + b"c" * 1500
    result = run([*ENVELOPE, f"BDAT {len(chunk)} LAST", chunk, (250, "2.0.0")])
    assert result.bodies == [chunk]


def test_bdat_bare_cr_split_across_chunks() -> None:
    result = run(
        [
            *ENVELOPE,
            "BDAT 2",
            b"a\r",
            (250, "2.0.0"),
            "BDAT 1",
            b"b",
            (550, "5.6.0"),
        ]
    )
    assert result.bodies == []


def test_bdat_crlf_split_across_chunks_is_fine() -> None:
    result = run(
        [*ENVELOPE, "BDAT 2", b"a\r", (250, "2.0.0"), "BDAT 3 LAST", b"\nb\n", (550, "5.6.0")]
    )
    assert result.bodies == []
    result = run(
        [*ENVELOPE, "BDAT 2", b"a\r", (250, "2.0.0"), "BDAT 3 LAST", b"\nb\r", (550, "5.6.0")]
    )
    result = run(
        [*ENVELOPE, "BDAT 2", b"a\r", (250, "2.0.0"), "BDAT 4 LAST", b"\nb\r\n", (250, "2.0.0")]
    )
    assert result.bodies == [b"a\r\nb\r\n"]


# --- SMTPUTF8 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender", ["pelé@example.com", "a@münchen.example", "δοκιμή@παράδειγμα.δοκιμή"]
)
def test_utf8_sender_needs_smtputf8(sender: str) -> None:
    result = run(
        [
            *EHLO,
            f"MAIL FROM:<{sender}>",
            (553, "5.6.7"),
            f"MAIL FROM:<{sender}> SMTPUTF8",
            (250, "2.1.0"),
        ]
    )
    [mail] = result.of(MailReceived)
    assert mail.command.params.smtputf8 is True


def test_utf8_recipient_needs_smtputf8() -> None:
    config = Config(local_domains=frozenset({"münchen.example"}))
    result = run(
        [
            *EHLO,
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
            "RCPT TO:<jösé@münchen.example>",
            (553, "5.6.7"),
            "RCPT TO:<jose@münchen.example>",
            (553, "5.6.7"),
            "RCPT TO:<jose@xn--mnchen-3ya.example>",  # the A-label is ASCII: no SMTPUTF8
            (250, "2.1.5"),
            "RSET",
            (250, "2.0.0"),
            "MAIL FROM:<a@b.example> SMTPUTF8",
            (250, "2.1.0"),
            "RCPT TO:<jösé@münchen.example>",
            (250, "2.1.5"),
            "RCPT TO:<jose@MÜNCHEN.example.>",
            (250, "2.1.5"),
        ],
        config,
    )
    assert [e.command.recipient.domain for e in result.of(RcptReceived)] == ["münchen.example"] * 3


# --- relaying --------------------------------------------------------------------------------

LOCAL = Config(local_domains=frozenset({"example.org"}))


@pytest.mark.parametrize(
    "path",
    [
        "<user%other.example@example.org>",
        "<other.example!user@example.org>",
        '<"user@other.example"@example.org>',
        "<@a.example,@b.example:user@example.org>",
        "<user@[127.0.0.1]>",
        "<user@[IPv6:::1]>",
        "<user@other.com>",
        "<user@example.org.evil.com>",
        "<user@sub.example.org>",
    ],
)
def test_relay_tricks_denied(path: str) -> None:
    result = run(
        [*EHLO, "MAIL FROM:<a@b.example>", (250, "2.1.0"), f"RCPT TO:{path}", (550, "5.7.1")],
        LOCAL,
    )
    assert result.of(RcptReceived) == []
    assert result.replies[-1].lines == ("Relaying denied",)


@pytest.mark.parametrize(
    ("path", "mailbox"),
    [
        ("<user@example.org>", Mailbox("user", "example.org")),
        ("<user@EXAMPLE.ORG>", Mailbox("user", "example.org")),
        ("<user@Example.Org.>", Mailbox("user", "example.org")),
        ("<Postmaster>", Mailbox("Postmaster", "")),
        ("<postmaster>", Mailbox("Postmaster", "")),
        ('<"us er"@example.org>', Mailbox("us er", "example.org", quoted=True)),
    ],
)
def test_local_recipients_accepted(path: str, mailbox: Mailbox) -> None:
    result = run(
        [*EHLO, "MAIL FROM:<a@b.example>", (250, "2.1.0"), f"RCPT TO:{path}", (250, "2.1.5")],
        LOCAL,
    )
    [rcpt] = result.of(RcptReceived)
    assert rcpt.command.recipient == mailbox


def test_relay_config_accepts_other_domains() -> None:
    config = Config(local_domains=frozenset({"example.org"}), relay=True)
    result = run(
        [
            *EHLO,
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
            "RCPT TO:<user@other.com>",
            (250, "2.1.5"),
            "RCPT TO:<user@[192.0.2.1]>",
            (250, "2.1.5"),
        ],
        config,
    )
    assert [e.command.recipient.domain for e in result.of(RcptReceived)] == [
        "other.com",
        "[192.0.2.1]",
    ]


def test_rejected_recipient_by_decision() -> None:
    def decide(event: Event) -> Reply | None:
        if isinstance(event, RcptReceived) and event.command.recipient.local_part == "nobody":
            return R.R550_NO_SUCH_USER
        return None

    result = run(
        [
            *ENVELOPE,
            "RCPT TO:<nobody@localhost>",
            (550, "5.1.1"),
            "DATA",
            (354, None),
            ".",
            (250, "2.0.0"),
        ],
        decide=decide,
    )
    [done] = result.of(MessageComplete)
    assert [m.local_part for m, _ in done.transaction.recipients] == ["rcpt"]


# --- limits --------------------------------------------------------------------------------


def test_max_recipients() -> None:
    steps: list[Step] = [*EHLO, "MAIL FROM:<a@b.example>", (250, "2.1.0")]
    for i in range(100):
        steps += [f"RCPT TO:<r{i}@localhost>", (250, "2.1.5")]
    for i in range(15):  # more than max_errors: a 452 is not a peer error
        steps += [f"RCPT TO:<x{i}@localhost>", (452, "4.5.3")]
    steps += ["DATA", (354, None), ".", (250, "2.0.0")]
    result = run(steps, Config(limits=Limits(max_recipients=100)))
    [done] = result.of(MessageComplete)
    assert len(done.transaction.recipients) == 100
    assert result.session.errors == 0
    assert not result.closed


def test_max_errors() -> None:
    config = Config(limits=Limits(max_errors=3))
    result = run(
        [
            *EHLO,
            "FOO",
            (500, "5.5.2"),
            "DATA",
            (503, "5.5.1"),
            "EXPN x",
            (502, "5.5.1"),
            (421, "4.7.0"),
            "NOOP",
        ],
        config,
    )
    assert result.closed
    assert result.replies[-1].lines == ("localhost Too many errors, closing",)
    assert result.events[-1] == CloseConnection()


def test_max_errors_default_is_ten() -> None:
    steps: list[Step] = list(EHLO)
    for _ in range(9):
        steps += ["FOO", (500, "5.5.2")]
    steps += ["NOOP", (250, "2.0.0"), "FOO", (500, "5.5.2"), (421, "4.7.0"), "NOOP"]
    assert run(steps).closed


def test_max_errors_aborts_a_started_body() -> None:
    config = Config(limits=Limits(max_errors=1))
    result = run(
        [*ENVELOPE, "BDAT 3", b"abc", (250, "2.0.0"), "DATA", (503, "5.5.1"), (421, "4.7.0")],
        config,
    )
    assert result.of(MessageAborted) == [MessageAborted(None)]
    assert result.aborted == [b"abc"]


def test_command_line_limit() -> None:
    ok = "NOOP " + "x" * (2048 - 7)  # 2048 octets with CRLF
    assert len(ok) + 2 == 2048
    result = run(
        [
            *EHLO,
            ok,
            (250, "2.0.0"),
            ok + "x",
            (500, "5.5.2"),
            "NOOP " + "y" * 5000,
            (500, "5.5.2"),
            "NOOP",
            (250, "2.0.0"),
            "MAIL FROM:<a@b.example> ENVID=" + "z" * 3000,
            (500, "5.5.2"),
            "RCPT TO:<rcpt@localhost>",  # the over-long MAIL was not executed
            (503, "5.5.1"),
        ]
    )
    assert result.replies[3].lines == ("Command line too long",)
    assert result.session.errors == 4


def test_long_line_memory_is_bounded() -> None:
    session = ServerSession(Config())
    session.data_to_send()
    piece = b"A" * 65536
    peak = 0
    for _ in range(160):  # 10 MiB without a line end
        session.receive_data(piece)
        assert drain(session) == [NEED_DATA]
        peak = max(peak, len(session._in))
    assert peak == 0
    assert codes(session.data_to_send()) == [(500, None)]
    session.receive_data(b"tail of the line\r\nNOOP\r\n")
    assert drain(session) == [NEED_DATA]
    assert codes(session.data_to_send()) == [(250, None)]
    assert session.errors == 1


@pytest.mark.parametrize("line", [b"NOOP\n", b"\n", b"NOOP \n", b"QUIT\n"])
def test_bare_lf_command_line(line: bytes) -> None:
    result = run([*EHLO, line, (500, "5.5.2"), "NOOP", (250, "2.0.0")])
    assert result.replies[2].lines == ("Command line must end with <CR><LF>",)
    assert not result.closed


@pytest.mark.parametrize(
    "line", [b"NOOP\rQUIT\r\n", b"NO\x00OP\r\n", b"NOOP \xff\r\n", b"QUIT\x1b\r\n"]
)
def test_bad_characters_in_command_line(line: bytes) -> None:
    result = run([*EHLO, line, (500, "5.5.2"), "NOOP", (250, "2.0.0")])
    assert not result.closed


# --- HTTP, QUIT, RSET, EHLO mid-transaction ----------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "GET / HTTP/1.1",
        "POST /submit HTTP/1.0",
        "CONNECT mx.example:443 HTTP/1.1",
        "Host: mx.example",
        "User-Agent: curl/8",
        "head / HTTP/1.1",
    ],
)
def test_http_request_closes(line: str) -> None:
    result = run([line, (221, None), "QUIT"])
    assert result.closed
    assert result.replies[1].lines == ("Not an HTTP server, goodbye",)
    result = run([*EHLO, line, (221, "2.7.0"), "NOOP"])
    assert result.closed


def test_quit() -> None:
    result = run([*ENVELOPE, "QUIT", (221, "2.0.0"), "NOOP", "RSET"])
    assert result.closed
    assert result.events[-1] == CloseConnection()
    assert result.session.next_event() is NEED_DATA


def test_rset_mid_transaction() -> None:
    result = run(
        [
            *ENVELOPE,
            "RSET",
            (250, "2.0.0"),
            "RCPT TO:<rcpt@localhost>",
            (503, "5.5.1"),
            "DATA",
            (503, "5.5.1"),
            "MAIL FROM:<b@c.example>",
            (250, "2.1.0"),
            "RCPT TO:<rcpt@localhost>",
            (250, "2.1.5"),
            "BDAT 2",
            b"ab",
            (250, "2.0.0"),
            "RSET",
            (250, "2.0.0"),
            "BDAT 2 LAST",
            b"cd",
            (503, "5.5.1"),
        ]
    )
    assert result.of(MessageAborted) == [MessageAborted(None)]
    assert result.aborted == [b"ab"]
    assert result.session.state is State.GREETED


def test_ehlo_mid_transaction_resets() -> None:
    result = run(
        [*ENVELOPE, *EHLO, "DATA", (503, "5.5.1"), "RCPT TO:<rcpt@localhost>", (503, "5.5.1")]
    )
    assert result.session.transaction is None
    assert result.replies[-1].lines == ("Need MAIL command first",)


# --- timers and shutdown -----------------------------------------------------------------------


def _session_after(lines: bytes, config: Config | None = None) -> ServerSession:
    session = ServerSession(config or Config())
    session.receive_data(lines)
    while (event := session.next_event()) is not NEED_DATA:
        assert event is not PAUSED
        if isinstance(event, (HelloReceived, MailReceived, RcptReceived, MessageComplete)):
            session.decide()
    session.data_to_send()
    return session


@pytest.mark.parametrize(
    ("method", "status", "text"),
    [
        ("timed_out", "4.4.2", "mx Timeout, closing connection"),
        ("deadline_expired", "4.4.2", "mx Session too long, closing"),
        ("shutdown", "4.3.2", "mx Service shutting down"),
    ],
)
def test_close_from_the_caller(method: str, status: str, text: str) -> None:
    session = _session_after(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n", Config(hostname="mx"))
    getattr(session, method)()
    getattr(session, method)()  # twice: still one reply
    [reply] = parse_replies(session.data_to_send())
    assert (reply.codes, reply.lines) == ((421, status), (text,))
    assert session.next_event() == CloseConnection()
    assert session.next_event() is NEED_DATA
    session.receive_data(b"NOOP\r\n")
    assert session.next_event() is NEED_DATA
    assert session.data_to_send() == b""

    fresh = ServerSession(Config(hostname="mx"))
    fresh.data_to_send()
    getattr(fresh, method)()
    assert codes(fresh.data_to_send()) == [(421, None)]


def test_timeout_during_data_aborts_the_message() -> None:
    session = _session_after(
        b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<r@localhost>\r\nDATA\r\npartial body\r\n"
    )
    session.timed_out()
    assert codes(session.data_to_send()) == [(421, "4.4.2")]
    assert drain(session) == [MessageAborted(None), CloseConnection(), NEED_DATA]


def test_timeout_while_a_decision_is_pending() -> None:
    session = ServerSession(Config())
    session.data_to_send()
    session.receive_data(b"EHLO c\r\nNOOP\r\n")
    [hello, paused] = drain(session)
    assert isinstance(hello, HelloReceived) and paused is PAUSED
    session.timed_out()
    assert drain(session) == [CloseConnection(), NEED_DATA]
    session.decide()  # a late decision is ignored
    assert codes(session.data_to_send()) == [(421, None)]


def test_connection_lost_aborts() -> None:
    session = _session_after(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<r@localhost>\r\nDATA\r\n")
    session.connection_lost()
    assert drain(session) == [MessageAborted(None), NEED_DATA]
    assert session.data_to_send() == b""


# --- pipelining ------------------------------------------------------------------------------


def test_pipelined_batch_waits_for_each_decision() -> None:
    session = ServerSession(Config())
    session.data_to_send()
    session.receive_data(b"EHLO c\r\n")
    [hello, paused] = drain(session)
    assert isinstance(hello, HelloReceived) and paused is PAUSED
    session.decide()
    assert drain(session) == [NEED_DATA]
    session.data_to_send()

    session.receive_data(
        b"NOOP\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\n"
        b"RCPT TO:<y@localhost>\r\nNOOP\r\nDATA\r\nbody\r\n.\r\nNOOP\r\n"
    )
    [mail, paused] = drain(session)
    assert isinstance(mail, MailReceived) and paused is PAUSED
    assert session.paused
    assert codes(session.data_to_send()) == [(250, "2.0.0")]  # the NOOP before MAIL
    session.receive_data(b"RSET\r\n")  # more bytes while paused: still nothing
    assert session.next_event() is PAUSED
    assert session.next_event() is PAUSED
    assert session.data_to_send() == b""
    session.decide()
    assert codes(session.data_to_send()) == [(250, "2.1.0")]

    [rcpt_x, paused] = drain(session)
    assert isinstance(rcpt_x, RcptReceived) and paused is PAUSED
    assert rcpt_x.command.recipient == Mailbox("x", "localhost")
    assert session.data_to_send() == b""
    session.decide(R.R550_NO_SUCH_USER)
    [refused, rcpt_y, paused] = drain(session)
    assert isinstance(refused, Refused) and refused.reply == R.R550_NO_SUCH_USER
    assert isinstance(rcpt_y, RcptReceived) and paused is PAUSED
    session.decide()
    events = drain(session)
    assert [type(e) for e in events] == [
        MessageStarted,
        MessageData,
        MessageComplete,
        type(PAUSED),
    ]
    assert events[1] == MessageData(b"body\r\n")
    assert codes(session.data_to_send()) == [
        (550, "5.1.1"),
        (250, "2.1.5"),
        (250, "2.0.0"),
        (354, None),
    ]
    session.decide()
    assert drain(session) == [NEED_DATA]
    assert codes(session.data_to_send()) == [(250, "2.0.0"), (250, "2.0.0"), (250, "2.0.0")]
    assert not session.paused


def test_decide_misuse_raises() -> None:
    session = ServerSession(Config())
    with pytest.raises(RuntimeError):
        session.decide()
    with pytest.raises(RuntimeError):
        session.decide_each([])


# --- LMTP --------------------------------------------------------------------------------------

LMTP = Config(mode=Mode.LMTP)


def test_lmtp_one_reply_per_recipient() -> None:
    def decide(event: Event) -> list[Reply] | None:
        if isinstance(event, MessageComplete) and not event.transaction.chunked:
            return [R.R250_QUEUED, R.R452_NO_STORAGE, R.R550_NO_SUCH_USER]
        return None  # the runner answers one 250 per recipient

    result = run(
        [
            "EHLO c.example",
            (500, None),
            "HELO c.example",
            (500, None),
            "MAIL FROM:<a@b.example>",
            (503, None),
            "LHLO c.example",
            (250, None),
            "EHLO c.example",
            (500, "5.5.2"),
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
            "RCPT TO:<one@localhost>",
            (250, "2.1.5"),
            "RCPT TO:<x@other.example>",
            (550, "5.7.1"),
            "RCPT TO:<two@localhost>",
            (250, "2.1.5"),
            "RCPT TO:<three@localhost>",
            (250, "2.1.5"),
            "DATA",
            (354, None),
            "hi",
            ".",
            (250, "2.0.0"),
            (452, "4.3.1"),
            (550, "5.1.1"),
            "MAIL FROM:<a@b.example>",
            (250, "2.1.0"),
            "RCPT TO:<one@localhost>",
            (250, "2.1.5"),
            "BDAT 2 LAST",
            b"ok",
            (250, "2.0.0"),
        ],
        LMTP,
        decide=decide,
    )
    assert result.bodies == [b"hi\r\n", b"ok"]
    assert result.replies[1].lines == ("Command unrecognized",)
    assert result.replies[3].lines == ("Send LHLO first",)
    assert result.replies[4].lines[1:] == (
        "PIPELINING",
        "SIZE 10240000",
        "8BITMIME",
        "BINARYMIME",
        "CHUNKING",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
    )


def test_lmtp_decide_each_count_must_match() -> None:
    session = _session_after(b"LHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<r@localhost>\r\n", LMTP)
    session.receive_data(b"DATA\r\n.\r\n")
    assert [type(e) for e in drain(session)] == [MessageStarted, MessageComplete, type(PAUSED)]
    with pytest.raises(ValueError):
        session.decide_each([])
    session.decide_each([R.R250_QUEUED])
    assert codes(session.data_to_send()) == [(354, None), (250, "2.0.0")]


def test_smtp_rejects_lhlo() -> None:
    run(["LHLO c.example", (500, None), *EHLO, "LHLO c.example", (500, "5.5.2")])
