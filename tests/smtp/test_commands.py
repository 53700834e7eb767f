"""parse_command: the command grammar (RFC 5321 4.1.1, RFC 3030 2, RFC 2033 4.1)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.commands import (
    Auth,
    Bdat,
    Command,
    CommandError,
    Data,
    Ehlo,
    Expn,
    Helo,
    Help,
    HttpRequest,
    Lhlo,
    MailFrom,
    Noop,
    NotImplementedVerb,
    Quit,
    RcptTo,
    Rset,
    StartTls,
    Vrfy,
    _parse_full,
    parse_command,
)
from maitred_tx.smtp.params import BodyType, MailParams, Notify, RcptParams
from maitred_tx.smtp.replies import Reply


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"EHLO client.example", Ehlo("client.example")),
        (b"ehlo client.example", Ehlo("client.example")),
        (b"EhLo [192.0.2.1]", Ehlo("[192.0.2.1]")),
        (b"EHLO  client.example  extra", Ehlo("client.example")),
        (b"HELO client.example", Helo("client.example")),
        (b"LHLO client.example", Lhlo("client.example")),
        (b"MAIL FROM:<a@b.example>", MailFrom(Mailbox("a", "b.example"), MailParams())),
        (b"mail from:<a@B.Example>", MailFrom(Mailbox("a", "b.example"), MailParams())),
        (b"MAIL FROM: <a@b.example>", MailFrom(Mailbox("a", "b.example"), MailParams())),
        (b"MAIL FROM:<>", MailFrom(None, MailParams())),
        (
            b"MAIL FROM:<a@b.example> size=10 body=8bitmime",
            MailFrom(Mailbox("a", "b.example"), MailParams(size=10, body=BodyType.EIGHT_BIT_MIME)),
        ),
        (
            b"MAIL FROM:<\xc3\xa9@b.example> SMTPUTF8",
            MailFrom(Mailbox("\u00e9", "b.example"), MailParams(smtputf8=True)),
        ),
        (b"RCPT TO:<r@localhost>", RcptTo(Mailbox("r", "localhost"), RcptParams())),
        (b"rcpt to:<Postmaster>", RcptTo(Mailbox("Postmaster", ""), RcptParams())),
        (
            b"RCPT TO:<r@localhost> NOTIFY=NEVER",
            RcptTo(Mailbox("r", "localhost"), RcptParams(notify=frozenset({Notify.NEVER}))),
        ),
        (b"DATA", Data()),
        (b"data", Data()),
        (b"BDAT 0", Bdat(0, False)),
        (b"BDAT 10 LAST", Bdat(10, True)),
        (b"bdat 10 last", Bdat(10, True)),
        (b"BDAT 007", Bdat(7, False)),
        (b"BDAT 10 LAST ", Bdat(10, True)),
        (b"BDAT " + b"9" * 20, Bdat(10**20 - 1, False)),
        (b"RSET", Rset()),
        (b"NOOP", Noop()),
        (b"NOOP anything at all", Noop()),
        (b"QUIT", Quit()),
        (b"quit", Quit()),
        (b"HELP", Help("")),
        (b"HELP mail", Help("mail")),
        (b"VRFY user", Vrfy("user")),
        (b"VRFY <user@localhost>", Vrfy("<user@localhost>")),
        (b"EXPN staff", Expn("staff")),
        (b"ETRN example.org", NotImplementedVerb("ETRN")),
        (b"atrn", NotImplementedVerb("ATRN")),
        (b"BURL imap://x LAST", NotImplementedVerb("BURL")),
        (b"TURN", NotImplementedVerb("TURN")),
        (b"AUTH PLAIN", Auth("PLAIN", None)),
        (b"auth login =", Auth("LOGIN", "")),
        (b"STARTTLS", StartTls()),
        (b"GET / HTTP/1.1", HttpRequest("GET")),
        (b"post /x HTTP/1.0", HttpRequest("POST")),
        (b"CONNECT mx.example:443 HTTP/1.1", HttpRequest("CONNECT")),
        (b"Host: mx.example", HttpRequest("HOST")),
        (b"User-Agent: curl/8.0", HttpRequest("USER-AGENT")),
    ],
)
def test_parse(line: bytes, command: Command) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"", R.R500_UNKNOWN_COMMAND),
        (b"FOO", R.R500_UNKNOWN_COMMAND),
        (b" EHLO x", R.R500_UNKNOWN_COMMAND),
        (b"EHLOx", R.R500_UNKNOWN_COMMAND),
        (b"GET", R.R500_UNKNOWN_COMMAND),  # a bare verb is not an HTTP request line
        (b"Accept: */*", R.R500_UNKNOWN_COMMAND),
        (b"EHLO", R.R501_HELO_SYNTAX.format(verb="EHLO")),
        (b"HELO ", R.R501_HELO_SYNTAX.format(verb="HELO")),
        (b"lhlo", R.R501_HELO_SYNTAX.format(verb="LHLO")),
        (b"MAIL", R.R501_MAIL_SYNTAX),
        (b"MAIL TO:<a@b>", R.R501_MAIL_SYNTAX),
        (b"MAIL FROM:a@b.example", R.R501_MAIL_SYNTAX),
        (b"MAIL FROM:<a@b.example>SIZE=1", R.R501_MAIL_SYNTAX),
        (b"MAIL FROM:<a@@b.example>", R.R501_PATH_SYNTAX),
        (b"MAIL FROM:<a@b.example> FOO", R.R555_UNKNOWN_PARAM.format(keyword="FOO")),
        (b"MAIL FROM:<a@b.example> SIZE=x", R.R501_BAD_PARAM_VALUE.format(keyword="SIZE")),
        (b"RCPT FROM:<a@b>", R.R501_RCPT_SYNTAX),
        (b"RCPT TO:r@localhost", R.R501_RCPT_SYNTAX),
        (b"RCPT TO:<>", R.R501_RCPT_PATH_SYNTAX),
        (b"RCPT TO:<r@localhost> SIZE=1", R.R555_UNKNOWN_PARAM.format(keyword="SIZE")),
        (b"DATA now", R.R501_NO_ARGUMENTS.format(verb="DATA")),
        (b"RSET x", R.R501_NO_ARGUMENTS.format(verb="RSET")),
        (b"QUIT now", R.R501_NO_ARGUMENTS.format(verb="QUIT")),
        (b"VRFY", R.R501_SYNTAX),
        (b"EXPN ", R.R501_SYNTAX),
    ],
)
def test_errors(line: bytes, reply: Reply) -> None:
    with pytest.raises(CommandError) as e:
        parse_command(line)
    assert e.value.reply == reply
    assert not e.value.fatal


@pytest.mark.parametrize(
    "line",
    [
        b"BDAT",
        b"BDAT x",
        b"BDAT -1",
        b"BDAT 1 LASTX",
        b"BDAT 1 2",
        b"BDAT 1x",
        b"BDAT " + b"9" * 21,
        b"BDAT \xd9\xa1",
    ],
)
def test_malformed_bdat_is_fatal(line: bytes) -> None:
    with pytest.raises(CommandError) as e:
        parse_command(line)
    if line.isascii():
        assert (e.value.reply, e.value.fatal) == (R.R501_BDAT_SYNTAX, True)
    else:  # Arabic-Indic digit one: valid UTF-8, but not a size
        assert (e.value.reply.code, e.value.reply.status) == (501, "5.5.4")


@pytest.mark.parametrize(
    "line",
    [
        b"NOOP \xff",
        b"EHLO \xc3",  # truncated UTF-8
        b"MAIL FROM:<\xed\xa0\x80@x>",  # an encoded surrogate is not UTF-8
        b"NO\x00OP",
        b"NOOP\r",
        b"NOOP\rQUIT",
        b"NOOP\n",
        b"QUIT\x1b[0m",
        b"HELP \x7f",
        b"VRFY a\x08b",
    ],
)
def test_bad_characters(line: bytes) -> None:
    with pytest.raises(CommandError) as e:
        parse_command(line)
    assert e.value.reply == R.R500_BAD_CHARACTER
    assert (e.value.reply.code, e.value.reply.status) == (500, "5.5.2")


def test_tab_is_not_a_separator() -> None:
    with pytest.raises(CommandError) as e:
        parse_command(b"NOOP\tx")
    assert e.value.reply == R.R500_UNKNOWN_COMMAND
    assert parse_command(b"HELP \tx") == Help("\tx")


# RFC 5321 4.1.1: trailing white space is tolerated on every command.
_TRAILING = [b" ", b"\t", b" \t", b"\t ", b"  \t\t "]
_ANY_VERB = [
    b"EHLO client.example",
    b"HELO client.example",
    b"LHLO client.example",
    b"MAIL FROM:<a@example.org>",
    b"MAIL FROM:<>",
    b"MAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME",
    b"RCPT TO:<user@example.test>",
    b"RCPT TO:<user@example.test> NOTIFY=NEVER",
    b"DATA",
    b"BDAT 100",
    b"BDAT 100 LAST",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"HELP",
    b"HELP MAIL",
    b"VRFY someone",
    b"EXPN staff",
    b"STARTTLS",
    b"AUTH PLAIN",
    b"AUTH PLAIN AHVzZXIAcGFzcw==",
    b"ETRN example.org",
]


@pytest.mark.parametrize("suffix", _TRAILING, ids=repr)
@pytest.mark.parametrize("line", _ANY_VERB, ids=lambda b: b.decode())
def test_trailing_white_space_is_tolerated(line: bytes, suffix: bytes) -> None:
    assert parse_command(line + suffix) == parse_command(line)


@settings(max_examples=300)
@given(
    st.sampled_from(_ANY_VERB),
    st.lists(st.sampled_from([b" ", b"\t"]), min_size=1, max_size=6).map(b"".join),
)
def test_trailing_white_space_never_changes_the_command(line: bytes, suffix: bytes) -> None:
    assert parse_command(line + suffix) == parse_command(line)


VERBS = [
    b"EHLO",
    b"HELO",
    b"LHLO",
    b"MAIL",
    b"RCPT",
    b"DATA",
    b"BDAT",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"HELP",
    b"VRFY",
    b"EXPN",
    b"GET",
    b"HOST:",
    b"ETRN",
]


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_never_raises_anything_but_command_error(line: bytes) -> None:
    try:
        command = parse_command(line)
    except CommandError as e:
        assert 500 <= e.reply.code <= 555 and e.reply.status is not None
    else:
        assert isinstance(command, Command)


@settings(max_examples=500)
@given(
    st.sampled_from(VERBS),
    st.sampled_from([b"", b" ", b"  "]),
    st.one_of(
        st.binary(max_size=60),
        st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from(
            [b"FROM:<", b"TO:<", b"FROM:<a@b> ", b"TO:<r@x> NOTIFY=", b"1 LAST"]
        ).flatmap(
            lambda p: st.text(max_size=40).map(lambda t: p + t.encode("utf-8", "surrogatepass"))
        ),
    ),
)
def test_verbs_with_arbitrary_arguments(verb: bytes, sep: bytes, arg: bytes) -> None:
    try:
        command = parse_command(verb + sep + arg)
    except CommandError as e:
        assert e.reply.status is not None and e.reply.code in (500, 501, 504, 553, 555)
        assert e.fatal == (verb == b"BDAT" and e.reply == R.R501_BDAT_SYNTAX)
    else:
        assert isinstance(command, Command)


# --- the fast path agrees with the whole grammar ----------------------------------------

_LOCAL = st.text("aZ09.-_+=!%'~", min_size=1, max_size=70)
_DOMAIN = st.one_of(
    st.text("aZ09.-", min_size=1, max_size=80),
    st.sampled_from(["xn--mnchen-3ya.de", "xn--bad.de", "x" * 64 + ".org", "a.b.", "-a.b"]),
    st.builds(lambda n: ".".join(["a" * 63] * n), st.integers(1, 5)),
)


def _outcome(parse: Any, line: bytes) -> Any:
    try:
        command = parse(line)
    except CommandError as e:
        return ("error", e.reply, e.fatal)
    # Mailbox._sent_utf8 is not part of equality: compare it too.
    boxes = [getattr(command, name, None) for name in ("sender", "recipient")]
    return ("ok", command, [b._sent_utf8 for b in boxes if isinstance(b, Mailbox)])


@settings(max_examples=1000)
@given(
    st.sampled_from([b"MAIL FROM:", b"mail from:", b"RCPT TO:", b"Rcpt To:", b"MAIL FROM: "]),
    _LOCAL,
    _DOMAIN,
    st.sampled_from([b"", b" SIZE=1076", b" size=0", b" SIZE=", b" SIZE=123456789012345678901",
                     b" SIZE=12 ", b"  SIZE=12", b" BODY=8BITMIME", b" NOTIFY=NEVER"]),
    st.booleans(),
)
def test_fast_path_matches_the_full_parser(
    prefix: bytes, local: str, domain: str, params: bytes, null: bool
) -> None:
    path = b"<>" if null else f"<{local}@{domain}>".encode()
    line = prefix + path + params
    assert _outcome(parse_command, line) == _outcome(_parse_full, line)


@settings(max_examples=1000)
@given(
    st.sampled_from([b"EHLO", b"ehlo", b"HELO", b"Helo", b"LHLO", b"HHLO", b"EHLOX", b"MAIL"]),
    st.sampled_from([b" ", b"  ", b"\t", b""]),
    st.one_of(
        st.text(st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=20).map(str.encode),
        st.text(max_size=8).map(str.encode),
        st.sampled_from([b"mx.example.org", b"[192.0.2.1]", b"a b", b"x\xff", b"caf\xc3\xa9"]),
    ),
)
def test_hello_fast_path_matches_the_full_parser(verb: bytes, sep: bytes, name: bytes) -> None:
    line = verb + sep + name
    assert _outcome(parse_command, line) == _outcome(_parse_full, line)


@pytest.mark.parametrize("line", [b"DATA", b"RSET", b"NOOP", b"QUIT"])
def test_exact_lines_match_the_full_parser(line: bytes) -> None:
    assert parse_command(line) == _parse_full(line)
    assert parse_command(line.lower()) == _parse_full(line.lower())
