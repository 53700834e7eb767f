"""The pure grammar of RFC 8461: TXT records (3.1), policies (3.2), MX matching (4.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maitred_tx.mta_sts.policy import (
    MAX_MAX_AGE,
    MAX_POLICY_SIZE,
    Mode,
    NoStsRecord,
    Policy,
    StsError,
    StsRecord,
    parse_policy,
    parse_txt_record,
    select_record,
)

# RFC 8461 3.1 / Appendix A: the indicator record.
RFC_TXT = "v=STSv1; id=20160831085700Z;"
# RFC 8461 3.2: the example policy.
RFC_POLICY = (
    "version: STSv1\r\n"
    "mode: enforce\r\n"
    "mx: mail.example.com\r\n"
    "mx: *.example.net\r\n"
    "mx: backupmx.example.com\r\n"
    "max_age: 604800\r\n"
)
# RFC 8461 Appendix A: the example policy in testing mode.
RFC_APPENDIX_POLICY = (
    "version: STSv1\n"
    "mode: testing\n"
    "mx: mx1.example.com\n"
    "mx: mx2.example.com\n"
    "mx: mx.backup-example.com\n"
    "max_age: 604800\n"
)


def policy(*lines: str, end: str = "\n") -> str:
    return "".join(line + end for line in lines)


BASE = ("version: STSv1", "mode: enforce", "mx: mx.example.com", "max_age: 86400")


# ---------------------------------------------------------------- TXT record (3.1)


def test_rfc_txt_record() -> None:
    assert parse_txt_record(RFC_TXT) == StsRecord("20160831085700Z")
    assert select_record([RFC_TXT]) == StsRecord("20160831085700Z")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=STSv1; id=abc", StsRecord("abc")),  # the trailing ";" is optional
        ("v=STSv1;id=abc;", StsRecord("abc")),
        ("v=STSv1 ;\tid=abc ; ", StsRecord("abc")),  # *WSP ";" *WSP
        ("v=STSv1; id=" + "a" * 32, StsRecord("a" * 32)),
        ("v=STSv1; id=x1; ext.a-b_c=some:value", StsRecord("x1", (("ext.a-b_c", "some:value"),))),
        ("v=STSv1; foo=bar; id=x1", StsRecord("x1", (("foo", "bar"),))),  # id need not be 2nd
        ("v=STSv1; id=first; id=second", StsRecord("first")),  # the first of a repeated id
        ("v=STSv1; id=first; id=!!", StsRecord("first")),  # a repeated one is ignored
    ],
)
def test_txt_record_variants(text: str, expected: StsRecord) -> None:
    assert parse_txt_record(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("v=STSv1", "no id"),
        ("v=STSv1;", "no id"),
        ("v=STSv1; id=", "not 1 to 32"),
        ("v=STSv1; id=" + "a" * 33, "not 1 to 32"),  # over-long id
        ("v=STSv1; id=2016-08-31", "not 1 to 32"),
        ("v=STSv1; id=a b", "not 1 to 32"),
        ("v=STSv2; id=1", "must start"),
        ("v=stsv1; id=1", "must start"),  # %s: case-sensitive
        (" v=STSv1; id=1", "must start"),
        ("id=1; v=STSv1", "must start"),
        ("v=STSv1;; id=1", "not name=value"),
        ("v=STSv1; id=1; junk", "not name=value"),
        ("v=STSv1; id=1; _x=1", "not name=value"),  # a name starts with ALPHA / DIGIT
        ("v=STSv1; id=1; x=a=b", "invalid value"),
        ("v=STSv1; id=1; x=caf\xe9", "invalid value"),
    ],
)
def test_txt_record_errors(text: str, why: str) -> None:
    with pytest.raises(StsError, match=why):
        parse_txt_record(text)


def test_record_selection() -> None:
    spf = "v=spf1 -all"
    assert select_record([spf, "v=STSv1; id=one"]) == StsRecord("one")
    with pytest.raises(NoStsRecord):
        select_record([])
    with pytest.raises(NoStsRecord):
        select_record([spf, "v=STSv1", "v=STSv10; id=1", "V=STSv1; id=1"])
    # two STSv1 records: "no policy", but not NoStsRecord (a misconfiguration, logged)
    with pytest.raises(StsError, match="2 v=STSv1 TXT records") as raised:
        select_record(["v=STSv1; id=one", "v=STSv1; id=two"])
    assert not isinstance(raised.value, NoStsRecord)
    with pytest.raises(StsError, match="not 1 to 32"):  # the one record is broken
        select_record([spf, "v=STSv1; id=!"])


# ---------------------------------------------------------------- policy (3.2)


def test_rfc_example_policy() -> None:
    parsed = parse_policy(RFC_POLICY)
    assert parsed == Policy(
        Mode.ENFORCE, ("mail.example.com", "*.example.net", "backupmx.example.com"), 604800
    )
    appendix = parse_policy(RFC_APPENDIX_POLICY)
    assert appendix.mode is Mode.TESTING
    assert appendix.mx == ("mx1.example.com", "mx2.example.com", "mx.backup-example.com")


@pytest.mark.parametrize("end", ["\n", "\r\n"])
@pytest.mark.parametrize("final", [True, False])
def test_line_endings(end: str, final: bool) -> None:
    text = end.join(BASE) + (end if final else "")
    assert parse_policy(text) == Policy(Mode.ENFORCE, ("mx.example.com",), 86400)
    assert parse_policy(text.encode()) == parse_policy(text)


def test_mixed_line_endings_whitespace_and_blank_lines() -> None:
    text = (
        "version:STSv1\r\nmode:\t enforce \nmx:  mx.example.com\t\r\n\r\n  \n"
        "max_age: 86400  \r\n"
    )
    assert parse_policy(text) == Policy(Mode.ENFORCE, ("mx.example.com",), 86400)


def test_unknown_keys_are_ignored_and_kept() -> None:
    text = policy(*BASE, "contact: postmaster@example.com", "x-note: caf\xe9 ok")
    assert parse_policy(text).extensions == (
        ("contact", "postmaster@example.com"),
        ("x-note", "caf\xe9 ok"),
    )


def test_repeated_keys_first_wins_except_mx() -> None:
    text = policy(
        *BASE, "mode: testing", "max_age: 5", "version: STSv2", "mx: mx2.example.com"
    )
    parsed = parse_policy(text)
    assert (parsed.mode, parsed.max_age) == (Mode.ENFORCE, 86400)
    assert parsed.mx == ("mx.example.com", "mx2.example.com")


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy(policy("version: STSv1", "mode: none", "max_age: 0")) == Policy(
        Mode.NONE, (), 0
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (policy("mode: enforce", "mx: a.example", "max_age: 1"), "no 'version'"),
        (policy("version: STSv2", "mode: enforce", "mx: a.example", "max_age: 1"), "STSv2"),
        (policy("Version: STSv1", "mode: enforce", "mx: a.example", "max_age: 1"), "no 'version'"),
        (policy("version: STSv1", "mx: a.example", "max_age: 1"), "no 'mode'"),
        (policy("version: STSv1", "mode: Enforce", "mx: a.example", "max_age: 1"), "mode"),
        (policy("version: STSv1", "mode: strict", "mx: a.example", "max_age: 1"), "mode"),
        (policy("version: STSv1", "mode: enforce", "max_age: 1"), "no 'mx'"),
        (policy("version: STSv1", "mode: testing", "max_age: 1"), "no 'mx'"),
        (policy("version: STSv1", "mode: enforce", "mx: a.example"), "no 'max_age'"),
        (policy(*BASE[:3], f"max_age: {MAX_MAX_AGE + 1}"), "exceeds"),
        (policy(*BASE[:3], "max_age: 12345678901"), "1 to 10 digits"),
        (policy(*BASE[:3], "max_age: -1"), "1 to 10 digits"),
        (policy(*BASE[:3], "max_age: 1d"), "1 to 10 digits"),
        (policy(*BASE[:3], "max_age: 1e3"), "1 to 10 digits"),
        (policy(*BASE[:3], "max_age: \u0661"), "1 to 10 digits"),  # Arabic-Indic one
        (policy(*BASE[:3], "max_age:"), "no value"),
        (policy(*BASE, "no colon here"), "expected 'key: value'"),
        (policy(*BASE, " mode: testing"), "expected 'key: value'"),  # no leading space
        (policy(*BASE, "_x: y"), "expected 'key: value'"),
        (policy(*BASE, "x" * 33 + ": y"), "expected 'key: value'"),
        (policy(*BASE, "note: a\x00b"), "control character"),
        (policy(*BASE, "note: a\rb"), "control character"),  # a bare CR is no line end
        (policy(*BASE, "mx: *"), "'\\*' only"),
        (policy(*BASE, "mx: mx*.example.com"), "'\\*' only"),
        (policy(*BASE, "mx: *.*.example.com"), "'\\*' only"),
        (policy(*BASE, "mx: *."), "empty domain"),
        (policy(*BASE, "mx: [192.0.2.1]"), "not a domain name"),
        (policy(*BASE, "mx: a..example"), "not a domain name"),
        (policy(*BASE, "mx: -a.example"), "not a domain name"),
        (policy(*BASE, "mx: " + "a" * 64 + ".example"), "not a domain name"),
    ],
)
def test_policy_errors(text: str, why: str) -> None:
    with pytest.raises(StsError, match=why):
        parse_policy(text)


def test_errors_name_the_line() -> None:
    with pytest.raises(StsError, match="policy line 3"):
        parse_policy(policy("version: STSv1", "mode: enforce", "oops", "max_age: 1"))


def test_size_limit() -> None:
    head = policy(*BASE, "pad: ")
    filler = "x" * (MAX_POLICY_SIZE - len(head))
    at_limit = head[:-1] + filler + "\n"
    assert len(at_limit.encode()) == MAX_POLICY_SIZE
    assert parse_policy(at_limit).mode is Mode.ENFORCE
    with pytest.raises(StsError, match="exceeds the 65536 limit"):
        parse_policy(at_limit + "\n")
    with pytest.raises(StsError, match="exceeds"):
        parse_policy((at_limit + "\n").encode())
    # the limit counts octets, not characters
    with pytest.raises(StsError, match="exceeds"):
        parse_policy(head[:-1] + "\xe9" * (MAX_POLICY_SIZE // 2) + "\n")


def test_body_must_be_utf8() -> None:
    with pytest.raises(StsError, match="not UTF-8"):
        parse_policy(policy(*BASE, "note: caf").encode() + b"\xe9\n")


def test_idn_mx_patterns_become_a_labels() -> None:
    parsed = parse_policy(policy(*BASE, "mx: *.B\xfccher.example", "mx: MX.Example.COM."))
    assert parsed.mx == ("mx.example.com", "*.xn--bcher-kva.example", "mx.example.com")


# ---------------------------------------------------------------- MX matching (4.1)


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("mail.example.com", True),
        ("MAIL.Example.Com", True),  # case-insensitive
        ("mail.example.com.", True),  # the MX record's trailing dot
        ("backupmx.example.com", True),
        ("mx1.example.net", True),  # *.example.net
        ("MX1.EXAMPLE.NET.", True),
        ("example.net", False),  # the wildcard needs a label
        ("a.b.example.net", False),  # ... exactly one
        ("mail.example.com.evil.test", False),
        ("evilmail.example.com", False),
        ("ail.example.com", False),
        ("mx1.example.network", False),
        ("", False),
        (".", False),
        ("[192.0.2.1]", False),
        ("mx..example.net", False),
    ],
)
def test_rfc_policy_matching(host: str, matches: bool) -> None:
    assert parse_policy(RFC_POLICY).matches(host) is matches


def test_idn_matching() -> None:
    parsed = parse_policy(policy(*BASE, "mx: *.xn--bcher-kva.example"))
    assert parsed.matches("mx.b\xfccher.example")
    assert parsed.matches("MX.XN--BCHER-KVA.EXAMPLE.")
    assert not parsed.matches("mx.bucher.example")


# ---------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("vV=STs1;:id xa\t\r\n.*-_é0\x00"), max_size=80))
def test_any_input_is_a_policy_or_a_clear_error(text: str) -> None:
    for parse in (parse_policy, parse_txt_record):
        try:
            parse(text)
        except StsError as exc:
            assert str(exc)


def outcome(parse: Callable[[Any], object], data: str | bytes) -> object:
    """The parse result, or the StsError (with a message); anything else fails."""
    try:
        return parse(data)
    except StsError as exc:
        assert str(exc)
        return exc


@settings(max_examples=200, deadline=None)
@given(st.text() | st.binary())
def test_arbitrary_text_and_octets(data: str | bytes) -> None:
    assert isinstance(outcome(parse_policy, data), Policy | StsError)
    if isinstance(data, str):
        assert isinstance(outcome(parse_txt_record, data), StsRecord | StsError)
        pair = outcome(lambda t: select_record([t, t]), data)
        assert isinstance(pair, StsError)  # the same record twice is two records


_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_LABEL = st.text(_ALNUM, min_size=1, max_size=3) | st.just("a-b")
_DOMAIN = st.lists(_LABEL, min_size=2, max_size=4).map(".".join)
_PATTERN = st.tuples(st.booleans(), _DOMAIN).map(lambda t: ("*." if t[0] else "") + t[1])
_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(Mode),
    st.lists(_PATTERN, min_size=1, max_size=4).map(tuple),
    st.integers(0, MAX_MAX_AGE),
    st.lists(
        st.tuples(st.text(_ALNUM + "_.-", max_size=6).map(lambda k: "x" + k), _VALUE),
        max_size=3,
    ).map(tuple),
)
def test_round_trip(
    mode: Mode, mx: tuple[str, ...], max_age: int, extensions: tuple[tuple[str, str], ...]
) -> None:
    original = Policy(mode, mx, max_age, extensions)
    assert parse_policy(original.to_text()) == original
    for pattern in mx:
        host = "mx." + pattern[2:] if pattern.startswith("*.") else pattern
        assert original.matches(host)
        assert not original.matches("a.b." + host) or any(p.startswith("*.") for p in mx)
