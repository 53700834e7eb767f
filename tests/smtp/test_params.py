"""MAIL / RCPT parameters: RFC 5321 4.1.2, RFC 1870, 6152, 3030, 6531, 3461, 6533, 4954."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.smtp.params import (
    BodyType,
    MailParams,
    Notify,
    ParamError,
    RcptParams,
    Ret,
    parse_mail_params,
    parse_rcpt_params,
    xtext_decode,
    xtext_encode,
)


def mail_error(text: str) -> ParamError:
    with pytest.raises(ParamError) as e:
        parse_mail_params(text)
    return e.value


def rcpt_error(text: str) -> ParamError:
    with pytest.raises(ParamError) as e:
        parse_rcpt_params(text)
    return e.value


def assert_reply(err: ParamError, code: int, status: str, text: str) -> None:
    assert (err.reply.code, err.reply.status, err.reply.text) == (code, status, (text,))


# --- MAIL: valid ---------------------------------------------------------------------------


def test_mail_empty() -> None:
    assert parse_mail_params("") == MailParams()
    assert parse_mail_params("   ") == MailParams()


def test_mail_all_parameters() -> None:
    params = parse_mail_params(
        "SIZE=12345 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ314159+2Bx AUTH=<>"
    )
    assert params == MailParams(
        size=12345,
        body=BodyType.EIGHT_BIT_MIME,
        smtputf8=True,
        ret=Ret.HDRS,
        envid="QQ314159+x",
        auth="<>",
    )


def test_mail_case_insensitive_and_extra_spaces() -> None:
    params = parse_mail_params("  size=0   body=binarymime  smtputf8 ret=full  ")
    assert params == MailParams(size=0, body=BodyType.BINARY_MIME, smtputf8=True, ret=Ret.FULL)


@pytest.mark.parametrize(
    ("value", "body"),
    [
        ("7BIT", BodyType.SEVEN_BIT),
        ("8bitmime", BodyType.EIGHT_BIT_MIME),
        ("BinaryMIME", BodyType.BINARY_MIME),
    ],
)
def test_mail_body(value: str, body: BodyType) -> None:
    assert parse_mail_params(f"BODY={value}").body is body


def test_mail_size_is_kept_whatever_its_value() -> None:
    assert parse_mail_params("SIZE=" + "9" * 20).size == 10**20 - 1
    assert parse_mail_params("SIZE=007").size == 7


def test_mail_auth_mailbox_decoded() -> None:
    assert parse_mail_params("AUTH=e+3Dmc2@example.com").auth == "e=mc2@example.com"
    assert parse_mail_params("AUTH=j+C3+B6rg@example.com").auth == "jörg@example.com"


def test_mail_envid_length_limit() -> None:
    assert parse_mail_params("ENVID=" + "a" * 100).envid == "a" * 100
    # The limit counts the xtext as sent: 34 "+2B" are 102 characters.
    assert_reply(mail_error("ENVID=" + "+2B" * 34), 501, "5.5.4", "Bad value for parameter ENVID")


# --- MAIL: errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("NOTIFY=NEVER", "NOTIFY"),  # a RCPT parameter on MAIL
        ("ORCPT=rfc822;a@b", "ORCPT"),
        ("FOO", "FOO"),
        ("x-foo=bar", "X-FOO"),
        ("SIZE=1 REQUIRETLS", "REQUIRETLS"),
        ("MT-PRIORITY=3", "MT-PRIORITY"),
    ],
)
def test_mail_unknown_keyword_555(text: str, keyword: str) -> None:
    err = mail_error(text)
    assert_reply(err, 555, "5.5.4", f"Unsupported parameter {keyword}")
    assert str(err) == f"Unsupported parameter {keyword}"


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("SIZE=abc", "SIZE"),
        ("SIZE", "SIZE"),
        ("SIZE=", "SIZE"),
        ("SIZE=-1", "SIZE"),
        ("SIZE=1.5", "SIZE"),
        ("SIZE=" + "1" * 21, "SIZE"),
        ("SIZE=\u0661\u0662", "SIZE"),  # Arabic-Indic digits are not DIGIT
        ("BODY=FOO", "BODY"),
        ("BODY", "BODY"),
        ("BODY=8BIT", "BODY"),
        ("SMTPUTF8=x", "SMTPUTF8"),
        ("SMTPUTF8=", "SMTPUTF8"),
        ("RET=x", "RET"),
        ("RET", "RET"),
        ("RET=HDRS=1", "RET"),
        ("ENVID", "ENVID"),
        ("ENVID=a+2", "ENVID"),  # truncated hexchar
        ("ENVID=a+ZZ", "ENVID"),
        ("ENVID=" + "a" * 101, "ENVID"),
        ("ENVID=a+0Db", "ENVID"),  # decoded CR: header injection in a DSN
        ("ENVID=+C3+BC", "ENVID"),  # RFC 3461 4.4: printable US-ASCII only
        ("ENVID=\u00fc", "ENVID"),  # raw UTF-8 is not xtext
        ("ENVID=+FF", "ENVID"),  # not UTF-8
        ("AUTH", "AUTH"),
        ("AUTH=a+0A@b", "AUTH"),
        ("AUTH=a+@b", "AUTH"),
        ("SIZE=1\x00", "SIZE"),  # control character in an esmtp-value
        ("SIZE=1\tBODY=7BIT", "SIZE"),  # only SP separates parameters
    ],
)
def test_mail_bad_value_501(text: str, keyword: str) -> None:
    assert_reply(mail_error(text), 501, "5.5.4", f"Bad value for parameter {keyword}")


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("SIZE=1 SIZE=2", "SIZE"),
        ("SIZE=1 size=1", "SIZE"),
        ("SMTPUTF8 SMTPUTF8", "SMTPUTF8"),
        ("BODY=7BIT RET=FULL body=8BITMIME", "BODY"),
    ],
)
def test_mail_duplicate_501(text: str, keyword: str) -> None:
    assert_reply(mail_error(text), 501, "5.5.4", f"Parameter {keyword} given twice")


@pytest.mark.parametrize(
    "text",
    ["=1", "-SIZE=1", "SI_ZE=1", "SIZE\t=1", "\u00dcBER=1", "SIZE;1", "<a@b>"],
)
def test_mail_bad_keyword_syntax_501(text: str) -> None:
    assert_reply(mail_error(text), 501, "5.5.4", "Syntax error in parameters or arguments")


def test_rcpt_bad_keyword_syntax_501() -> None:
    # The space splits the value: "822;a@b" is read as a keyword, and a malformed one.
    assert_reply(
        rcpt_error("ORCPT=rfc 822;a@b"), 501, "5.5.4", "Syntax error in parameters or arguments"
    )


# --- RCPT -----------------------------------------------------------------------------------


def test_rcpt_empty() -> None:
    assert parse_rcpt_params("") == RcptParams()


def test_rcpt_all_parameters() -> None:
    params = parse_rcpt_params("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx@example.com")
    assert params == RcptParams(
        notify=frozenset({Notify.SUCCESS, Notify.FAILURE}),
        orcpt=("rfc822", "Bob+x@example.com"),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("NEVER", {Notify.NEVER}),
        ("never", {Notify.NEVER}),
        ("SUCCESS", {Notify.SUCCESS}),
        ("delay,Failure,SUCCESS", {Notify.DELAY, Notify.FAILURE, Notify.SUCCESS}),
        ("FAILURE,FAILURE", {Notify.FAILURE}),
    ],
)
def test_rcpt_notify(value: str, expected: set[Notify]) -> None:
    assert parse_rcpt_params(f"NOTIFY={value}").notify == frozenset(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("rfc822;a@example.com", ("rfc822", "a@example.com")),
        ("RFC822;a@example.com", ("rfc822", "a@example.com")),
        ("rfc822;+22a+20b+22@example.com", ("rfc822", '"a b"@example.com')),
        ("x400;/c+3Dgb/", ("x400", "/c=gb/")),
        # RFC 6533 3: utf-8-addr-xtext, utf-8-addr-unitext, and xtext escapes.
        ("utf-8;j\\x{F6}rg@example.com", ("utf-8", "jörg@example.com")),
        ("UTF-8;j\\x{f6}rg@example.com", ("utf-8", "jörg@example.com")),
        ("utf-8;jörg@例え.jp", ("utf-8", "jörg@例え.jp")),
        ("utf-8;\\x{7528}\\x{6237}@x.cn", ("utf-8", "用户@x.cn")),
        ("utf-8;\\x{1F600}@x", ("utf-8", "\U0001f600@x")),
        ("utf-8;a\\x{2B}b\\x{5C}@x", ("utf-8", "a+b\\@x")),
        ("utf-8;a+2Bb@x", ("utf-8", "a+b@x")),
        ("utf-8;j+C3+B6rg@x", ("utf-8", "jörg@x")),
    ],
)
def test_rcpt_orcpt(value: str, expected: tuple[str, str]) -> None:
    assert parse_rcpt_params(f"ORCPT={value}").orcpt == expected


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("NOTIFY=NEVER,SUCCESS", "NOTIFY"),
        ("NOTIFY=SUCCESS,NEVER", "NOTIFY"),
        ("NOTIFY=NEVER,NEVER", "NOTIFY"),
        ("NOTIFY=SOMETIMES", "NOTIFY"),
        ("NOTIFY=SUCCESS,", "NOTIFY"),
        ("NOTIFY=,SUCCESS", "NOTIFY"),
        ("NOTIFY", "NOTIFY"),
        ("NOTIFY=", "NOTIFY"),
        ("ORCPT=a@example.com", "ORCPT"),  # no ';'
        ("ORCPT=rfc822;", "ORCPT"),
        ("ORCPT=;a@b", "ORCPT"),
        ("ORCPT=rfc(822);a@b", "ORCPT"),
        ("ORCPT", "ORCPT"),
        ("ORCPT=rfc822;a+4@b", "ORCPT"),
        ("ORCPT=x400;/c=gb/", "ORCPT"),  # "=" is not allowed in an esmtp-value
        ("ORCPT=rfc822;a+0D+0AX-Evil:+201@b", "ORCPT"),
        ("ORCPT=rfc822;j+C3+B6rg@x", "ORCPT"),  # RFC 3461 4.2: US-ASCII for rfc822
        ("ORCPT=rfc822;j\u00f6rg@x", "ORCPT"),
        ("ORCPT=utf-8;a\\b@x", "ORCPT"),  # lone backslash
        ("ORCPT=utf-8;a\\x{}@x", "ORCPT"),
        ("ORCPT=utf-8;a\\x{110000}@x", "ORCPT"),
        ("ORCPT=utf-8;a\\x{D800}@x", "ORCPT"),
        ("ORCPT=utf-8;a\\x{0}@x", "ORCPT"),
        ("ORCPT=utf-8;a\\x{A}@x", "ORCPT"),  # LF
        ("ORCPT=utf-8;a+FF@x", "ORCPT"),  # not UTF-8
        ("ORCPT=rfc822;" + "a" * 494, "ORCPT"),  # 501 characters
    ],
)
def test_rcpt_bad_value_501(text: str, keyword: str) -> None:
    assert_reply(rcpt_error(text), 501, "5.5.4", f"Bad value for parameter {keyword}")


def test_rcpt_orcpt_length_boundary() -> None:
    value = "rfc822;" + "a" * 493
    assert len(value) == 500
    assert parse_rcpt_params(f"ORCPT={value}").orcpt == ("rfc822", "a" * 493)


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("SIZE=1", "SIZE"),  # a MAIL parameter on RCPT
        ("SMTPUTF8", "SMTPUTF8"),
        ("RET=FULL", "RET"),
        ("X", "X"),
    ],
)
def test_rcpt_unknown_keyword_555(text: str, keyword: str) -> None:
    assert_reply(rcpt_error(text), 555, "5.5.4", f"Unsupported parameter {keyword}")


def test_rcpt_duplicate_501() -> None:
    assert_reply(
        rcpt_error("NOTIFY=NEVER notify=DELAY"), 501, "5.5.4", "Parameter NOTIFY given twice"
    )
    assert_reply(
        rcpt_error("ORCPT=rfc822;a@b ORCPT=rfc822;c@d"),
        501,
        "5.5.4",
        "Parameter ORCPT given twice",
    )


def test_unknown_reported_before_duplicate() -> None:
    assert mail_error("FOO FOO").reply.code == 555


# --- xtext ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("", ""),
        ("abc", "abc"),
        ("a+2Bb", "a+b"),
        ("a+3Db", "a=b"),
        ("a+20b", "a b"),
        ("+2b", "+"),  # lower-case hex accepted (Postel; "+" is always an escape)
        ("+C3+BC", "ü"),
        ("!~", "!~"),
    ],
)
def test_xtext_decode(encoded: str, decoded: str) -> None:
    assert xtext_decode(encoded) == decoded


@pytest.mark.parametrize(
    "encoded", ["a=b", "a b", "+", "+2", "+G0", "a\x00", "\u00fc", "+C3", "+80"]
)
def test_xtext_decode_rejects(encoded: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(encoded)


def test_xtext_encode() -> None:
    assert xtext_encode("a+b=c d\r\nü") == "a+2Bb+3Dc+20d+0D+0A+C3+BC"
    assert xtext_encode("<>") == "<>"


@given(text=st.text(alphabet=st.characters(codec="utf-8")))
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert all("!" <= c <= "~" and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


@given(text=st.text(alphabet=st.characters(codec="utf-8")))
def test_xtext_lower_case_hex_decodes_the_same(text: str) -> None:
    encoded = re.sub(r"\+[0-9A-F]{2}", lambda m: m.group(0).lower(), xtext_encode(text))
    assert xtext_decode(encoded) == text


@given(text=st.text(max_size=60))
def test_arbitrary_mail_params_only_raise_param_error(text: str) -> None:
    try:
        parse_mail_params(text)
    except ParamError as e:
        assert e.reply.code in (501, 555)
        assert e.reply.status == "5.5.4"


@given(text=st.text(max_size=60))
def test_arbitrary_rcpt_params_only_raise_param_error(text: str) -> None:
    try:
        parse_rcpt_params(text)
    except ParamError as e:
        assert e.reply.code in (501, 555)
        assert e.reply.status == "5.5.4"


@given(
    notify=st.sets(st.sampled_from([Notify.SUCCESS, Notify.FAILURE, Notify.DELAY]), min_size=1),
    # At most 3 characters each once encoded: always within the 500 of ORCPT.
    address=st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=150
    ),
)
def test_rcpt_params_round_trip(notify: set[Notify], address: str) -> None:
    text = f"NOTIFY={','.join(n.value for n in notify)} ORCPT=rfc822;{xtext_encode(address)}"
    params = parse_rcpt_params(text)
    assert params == RcptParams(notify=frozenset(notify), orcpt=("rfc822", address))
