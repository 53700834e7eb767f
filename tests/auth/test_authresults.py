"""Authentication-Results (RFC 8601): the field we write, and removing forged ones."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.auth.authresults import (
    ARCEntry,
    DKIMEntry,
    DMARCEntry,
    SPFEntry,
    authserv_id_of,
    format_authentication_results,
    strip_forged,
)
from maitred_tx.auth.headers import iter_fields

ID = "mx.example.net"


def test_nothing_checked_is_none() -> None:
    assert format_authentication_results(ID) == b"Authentication-Results: mx.example.net; none\r\n"


def test_the_typical_field() -> None:
    field = format_authentication_results(
        ID,
        spf=SPFEntry("pass", "example.org"),
        dkim=[DKIMEntry("pass", "example.org", "sel1", "abcdefghijklmnop")],
        arc=ARCEntry("pass"),
        dmarc=DMARCEntry("pass", "example.org", "reject"),
    )
    assert field == (
        b"Authentication-Results: mx.example.net;\r\n"
        b"\tspf=pass smtp.mailfrom=example.org;\r\n"
        b"\tdkim=pass header.d=example.org header.s=sel1 header.b=abcdefgh;\r\n"
        b"\tarc=pass;\r\n"
        b"\tdmarc=pass (p=reject) header.from=example.org\r\n"
    )


def test_spf_alone_with_an_address_and_helo_scope() -> None:
    assert format_authentication_results(
        ID, spf=SPFEntry("softfail", "bounce+x=y@example.org")) == (
        b"Authentication-Results: mx.example.net;\r\n"
        b"\tspf=softfail smtp.mailfrom=bounce+x=y@example.org\r\n")
    assert format_authentication_results(
        ID, spf=SPFEntry("none", "mail.example.org", "helo")) == (
        b"Authentication-Results: mx.example.net;\r\n\tspf=none smtp.helo=mail.example.org\r\n")


def test_failures_and_missing_properties() -> None:
    field = format_authentication_results(
        ID,
        spf=SPFEntry("fail", None),
        dkim=[DKIMEntry("none")],
        arc=ARCEntry("fail", 2),
        dmarc=DMARCEntry("fail", "example.org", "quarantine"),
    )
    assert field == (
        b"Authentication-Results: mx.example.net;\r\n"
        b"\tspf=fail;\r\n"
        b"\tdkim=none;\r\n"
        b"\tarc=fail header.oldest-pass=2;\r\n"
        b"\tdmarc=fail (p=quarantine) header.from=example.org\r\n"
    )


def test_dmarc_without_a_policy_has_no_comment() -> None:
    assert format_authentication_results(ID, dmarc=DMARCEntry("none", "example.org")) == (
        b"Authentication-Results: mx.example.net;\r\n\tdmarc=none header.from=example.org\r\n")


def test_values_that_are_not_tokens_are_quoted() -> None:
    field = format_authentication_results(
        "mail/relay",  # "/" is a tspecial (RFC 2045 5.1)
        spf=SPFEntry("pass", '"odd local"@example.org'),
        dkim=[DKIMEntry("pass", "example.org", "s", "ab/c+d=e fghij")],
    )
    assert field == (
        b'Authentication-Results: "mail/relay";\r\n'
        b'\tspf=pass smtp.mailfrom="\\"odd local\\"@example.org";\r\n'
        b'\tdkim=pass header.d=example.org header.s=s header.b="ab/c+d=e"\r\n'
    )


def test_header_b_is_long_enough_to_be_unique() -> None:
    # RFC 6008 2: at least 8 characters, and enough to tell the signatures apart.
    field = format_authentication_results(ID, dkim=[
        DKIMEntry("pass", "example.org", "a", "AAAAAAAAxyz1"),
        DKIMEntry("fail", "example.org", "b", "AAAAAAAAxyz2"),
        DKIMEntry("pass", "example.net", "c", "BBBBBBBBxyz2"),
    ])
    assert b"header.b=AAAAAAAAxyz1;" in field
    assert b"header.b=AAAAAAAAxyz2;" in field
    assert b"header.b=BBBBBBBB\r\n" in field


class Result(enum.Enum):
    PASS = "pass"
    TEMPERROR = "temperror"


@dataclass(frozen=True)
class TheirDKIM:  # the shape of the dkim module's results
    result: Result
    domain: str
    selector: str
    b: str
    algorithm: str


@dataclass(frozen=True)
class TheirARC:
    result: Result
    instances: int
    oldest_pass: int | None


@dataclass(frozen=True)
class TheirDMARC:
    result: str
    from_domain: str
    policy: str | None


def test_other_modules_results_are_accepted_as_they_are() -> None:
    field = format_authentication_results(
        ID,
        spf=SPFEntry(Result.TEMPERROR, "example.org"),
        dkim=[TheirDKIM(Result.PASS, "example.org", "s", "12345678", "rsa-sha256")],
        arc=TheirARC(Result.PASS, 1, 0),
        dmarc=TheirDMARC("pass", "example.org", None),
    )
    assert field == (
        b"Authentication-Results: mx.example.net;\r\n"
        b"\tspf=temperror smtp.mailfrom=example.org;\r\n"
        b"\tdkim=pass header.d=example.org header.s=s header.b=12345678;\r\n"
        b"\tarc=pass;\r\n"
        b"\tdmarc=pass header.from=example.org\r\n"
    )


@pytest.mark.parametrize("entry", [
    SPFEntry("pass", "a@example.org\r\nX-Injected: 1"),
    SPFEntry("pa ss", "example.org"),
    SPFEntry("", "example.org"),
])
def test_values_that_would_break_the_field_raise(entry: SPFEntry) -> None:
    with pytest.raises(ValueError):
        format_authentication_results(ID, spf=entry)


def test_non_ascii_values_are_utf8() -> None:
    field = format_authentication_results(ID, dmarc=DMARCEntry("none", "m\u00fcnchen.example"))
    assert field.endswith(b'header.from="m\xc3\xbcnchen.example"\r\n')


# --- Reading the authserv-id --------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (b" mx.example.net; none", "mx.example.net"),
    (b" mx.example.net 1; spf=pass", "mx.example.net"),
    (b"mx.example.net;spf=pass", "mx.example.net"),
    (b" (comment (nested) \\) still) mx.example.net; none", "mx.example.net"),
    (b"\r\n\t(folded)\r\n mx.example.net\r\n 1;\r\n none\r\n", "mx.example.net"),
    (b' "quoted \\"id\\""; none', 'quoted "id"'),
    (b" ; none", None),
    (b"", None),
    (b" (unterminated mx.example.net; none", None),
])
def test_authserv_id_of(value: bytes, expected: str | None) -> None:
    assert authserv_id_of(value) == expected


@given(st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?", fullmatch=True)
       | st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1))
def test_our_own_field_round_trips(authserv_id: str) -> None:
    field = format_authentication_results(authserv_id, spf=SPFEntry("pass", "example.org"))
    (parsed,) = list(iter_fields(field))
    assert parsed.is_named(b"Authentication-Results")
    assert authserv_id_of(parsed.value) == authserv_id
    assert strip_forged(field, authserv_id.upper()) == b""


# --- Removing forged fields (RFC 8601 5) ---------------------------------------------------

BLOCK = (
    b"Received: from relay.example by mx.example.net\r\n"
    b"Authentication-Results: MX.Example.NET;\r\n"
    b"\tspf=pass smtp.mailfrom=victim.example;\r\n"
    b"\tdmarc=pass header.from=victim.example\r\n"
    b"authentication-results : (sneaky) mx.example.net 1; dkim=pass\r\n"
    b"Authentication-Results: relay.example; spf=fail smtp.mailfrom=x.example\r\n"
    b"ARC-Authentication-Results: i=1; mx.example.net; spf=pass\r\n"
    b"Authentication-Results: mx.example.net.evil.example; none\r\n"
    b"Authentication-Results: \"mx.example.net\"; none\r\n"
    b"X-Note: Authentication-Results: mx.example.net; none\r\n"
    b"Subject: hello\r\n"
)


def test_forged_fields_are_removed_and_the_rest_kept_byte_for_byte() -> None:
    assert strip_forged(BLOCK, "mx.example.net") == (
        b"Received: from relay.example by mx.example.net\r\n"
        b"Authentication-Results: relay.example; spf=fail smtp.mailfrom=x.example\r\n"
        b"ARC-Authentication-Results: i=1; mx.example.net; spf=pass\r\n"
        b"Authentication-Results: mx.example.net.evil.example; none\r\n"
        b"X-Note: Authentication-Results: mx.example.net; none\r\n"
        b"Subject: hello\r\n"
    )


def test_nothing_to_remove_is_identity() -> None:
    assert strip_forged(BLOCK, "other.example") == BLOCK
    assert strip_forged(b"", ID) == b""


def test_the_body_is_never_touched() -> None:
    message = (b"Authentication-Results: mx.example.net; none\r\nSubject: s\r\n\r\n"
               b"Authentication-Results: mx.example.net; none\r\n  indented\r\n")
    assert strip_forged(message, ID) == message[message.index(b"Subject"):]


def test_bare_lf_and_a_version_glued_by_a_comment() -> None:
    block = b"Authentication-Results: mx.example.net(c)1; none\nX: y\n"
    assert strip_forged(block, ID) == b"X: y\n"


def test_lenient_readers_are_not_fooled() -> None:
    # Not a token by RFC 2045 ("/" ends it), but the token reading is ours: removed.
    assert strip_forged(b"Authentication-Results: mx.example.net/x; none\r\n", ID) == b""


@given(st.lists(st.sampled_from([
    b"Authentication-Results: mx.example.net; none\r\n",
    b"Authentication-Results: other.example;\r\n\tspf=pass\r\n",
    b"Received: x\r\n y\r\n",
    b"Subject: Authentication-Results: mx.example.net\r\n",
])))
def test_strip_forged_keeps_exactly_the_other_fields(fields: list[bytes]) -> None:
    expected = b"".join(f for f in fields if not f.startswith(
        b"Authentication-Results: mx.example.net;"))
    assert strip_forged(b"".join(fields), ID) == expected
