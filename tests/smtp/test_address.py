"""Envelope path parsing: RFC 5321 4.1.2 / 4.1.3 / 4.5.3.1.3, RFC 6531, IDNA."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from maitred_tx.smtp.address import (
    AddressError,
    Mailbox,
    normalize_domain,
    parse_forward_path,
    parse_reverse_path,
    split_path_argument,
)

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"


def fwd(path: str, smtputf8: bool = False) -> Mailbox:
    return parse_forward_path(path, smtputf8=smtputf8)


# --- split_path_argument -------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<a@b>", ("<a@b>", "")),
        (" <a@b>", ("<a@b>", "")),
        ("   <a@b>   ", ("<a@b>", "")),
        ("<a@b> SIZE=10 BODY=8BITMIME", ("<a@b>", "SIZE=10 BODY=8BITMIME")),
        ("<a@b>   SIZE=10  ", ("<a@b>", "SIZE=10")),
        ("<>", ("<>", "")),
        ("<> SIZE=1", ("<>", "SIZE=1")),
        ('<"a>b"@c> X=1', ('<"a>b"@c>', "X=1")),
        ('<"a\\"> x"@c>', ('<"a\\"> x"@c>', "")),
        ("<@a,@b:u@c>", ("<@a,@b:u@c>", "")),
    ],
)
def test_split_path_argument(arg: str, expected: tuple[str, str]) -> None:
    assert split_path_argument(arg) == expected


@pytest.mark.parametrize(
    "arg",
    [
        "a@b",  # missing brackets
        "a@b SIZE=1",
        "",
        "   ",
        "<a@b",  # unbalanced
        '<"a@b>',  # unterminated quote hides the '>'
        "<a@b>SIZE=1",  # no space before the parameters
        "<a@b>>",
        "\t<a@b>",
    ],
)
def test_split_path_argument_rejects(arg: str) -> None:
    with pytest.raises(AddressError):
        split_path_argument(arg)


# --- plain mailboxes --------------------------------------------------------------------


def test_simple_mailbox() -> None:
    m = fwd("<user@example.com>")
    assert m == Mailbox("user", "example.com", quoted=False, source_route=False)
    assert str(m) == "user@example.com"
    assert not m.is_utf8
    assert not m.is_address_literal
    assert not m.has_relay_syntax


def test_local_part_case_kept_domain_lowered() -> None:
    m = fwd("<John.Doe@Example.COM>")
    assert m.local_part == "John.Doe"
    assert m.domain == "example.com"


def test_trailing_dot_dropped() -> None:
    assert fwd("<a@example.com.>").domain == "example.com"


def test_all_atext_local_part() -> None:
    assert fwd(f"<{ATEXT}@x.org>").local_part == ATEXT


def test_long_local_part_accepted() -> None:
    # RFC 5321 4.5.3.1.1 says 64, but VERP/SRS addresses exceed it: only the path counts.
    local = "SRS0=" + "a" * 150
    assert fwd(f"<{local}@example.com>").local_part == local


def test_quoted_local_part() -> None:
    m = fwd('<"john smith"@example.com>')
    assert m == Mailbox("john smith", "example.com", quoted=True)
    assert str(m) == '"john smith"@example.com'


def test_quoted_pairs_resolved_and_requoted() -> None:
    m = fwd('<"a\\"b\\\\c\\d"@x.org>')
    assert m.local_part == 'a"b\\cd'
    assert str(m) == '"a\\"b\\\\cd"@x.org'
    assert fwd(f"<{m}>").local_part == m.local_part


def test_needlessly_quoted_local_part_is_plain() -> None:
    # RFC 5321 4.1.2: "joe"@x and joe@x are the same mailbox; str() uses the plain form.
    m = fwd('<"joe"@x.org>')
    assert m.local_part == "joe"
    assert m.quoted is True
    assert str(m) == "joe@x.org"


def test_postmaster() -> None:
    for path in ("<Postmaster>", "<postmaster>", "<POSTMASTER>"):
        m = fwd(path)
        assert m == Mailbox("Postmaster", "")
        assert str(m) == "Postmaster"
        assert not m.has_relay_syntax
    assert fwd("<postmaster@example.com>") == Mailbox("postmaster", "example.com")


def test_postmaster_without_domain_is_not_a_sender() -> None:
    with pytest.raises(AddressError):
        parse_reverse_path("<Postmaster>", smtputf8=False)


def test_null_reverse_path() -> None:
    assert parse_reverse_path("<>", smtputf8=False) is None
    assert parse_reverse_path("<>", smtputf8=True) is None
    assert parse_reverse_path("<a@b.c>", smtputf8=False) == Mailbox("a", "b.c")


def test_null_forward_path_rejected() -> None:
    with pytest.raises(AddressError):
        fwd("<>")


# --- relay tricks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "local", "domain", "quoted", "route"),
    [
        ("<user%other.net@local.org>", "user%other.net", "local.org", False, False),
        ("<other.net!user@local.org>", "other.net!user", "local.org", False, False),
        ('<"user@other.net"@local.org>', "user@other.net", "local.org", True, False),
        ("<@a.net,@b.net:user@local.org>", "user", "local.org", False, True),
        ("<@a.net:user@local.org>", "user", "local.org", False, True),
        ("<user@[127.0.0.1]>", "user", "[127.0.0.1]", False, False),
        ("<user@[IPv6:::1]>", "user", "[IPv6:::1]", False, False),
    ],
)
def test_relay_tricks(path: str, local: str, domain: str, quoted: bool, route: bool) -> None:
    m = fwd(path)
    assert (m.local_part, m.domain, m.quoted, m.source_route) == (local, domain, quoted, route)
    assert m.has_relay_syntax


def test_source_route_dropped_from_str() -> None:
    assert str(fwd("<@a.net,@b.net:user@local.org>")) == "user@local.org"


def test_bad_source_route() -> None:
    for path in ("<@a.net,b.net:u@c>", "<@a_b:u@c>", "<@:u@c>", "<@a.net,:u@c>"):
        with pytest.raises(AddressError):
            fwd(path)


# --- address literals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "domain"),
    [
        ("<u@[192.0.2.1]>", "[192.0.2.1]"),
        ("<u@[IPv6:2001:DB8:0:0:0:0:0:1]>", "[IPv6:2001:db8::1]"),
        ("<u@[ipv6:2001:db8::1]>", "[IPv6:2001:db8::1]"),
        ("<u@[IPv6:::ffff:192.0.2.1]>", "[IPv6:::ffff:c000:201]"),
    ],
)
def test_address_literals(path: str, domain: str) -> None:
    m = fwd(path)
    assert m.domain == domain
    assert m.is_address_literal
    assert str(m) == f"u@{domain}"


@pytest.mark.parametrize(
    "path",
    [
        "<u@[256.0.0.1]>",
        "<u@[1.2.3]>",
        "<u@[01.2.3.4]>",
        "<u@[1.2.3.4>",
        "<u@[]>",
        "<u@[IPv6:]>",
        "<u@[IPv6:1.2.3.4]>",
        "<u@[IPv6:fe80::1%eth0]>",
        "<u@[IPv6:12345::]>",
        "<u@[x400:c=gb]>",  # General-address-literal
        "<u@[ 1.2.3.4]>",
        "<u@[1.2.3.4].com>",
    ],
)
def test_bad_address_literals(path: str) -> None:
    with pytest.raises(AddressError):
        fwd(path)


# --- IDN and UTF-8 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain", ["MÜNCHEN.de", "münchen.de.", "xn--mnchen-3ya.de", "XN--MNCHEN-3YA.DE", "münchen.de"]
)
def test_normalize_domain_idn_forms(domain: str) -> None:
    assert normalize_domain(domain) == "münchen.de"


def test_normalize_domain_nfc() -> None:
    decomposed = "mu\u0308nchen.de"  # u + combining diaeresis
    assert normalize_domain(decomposed) == "münchen.de"


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("localhost", "localhost"),
        ("a-b.c0", "a-b.c0"),
        ("1.2.3.4", "1.2.3.4"),
        ("例え.JP", "例え.jp"),
        ("x" * 63 + ".com", "x" * 63 + ".com"),
    ],
)
def test_normalize_domain(domain: str, expected: str) -> None:
    assert normalize_domain(domain) == expected


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "example.com..",  # only ONE trailing dot is dropped
        ".example.com",
        "a..b",
        "-a.com",
        "a-.com",
        "a_b.com",
        "a b.com",
        "a@b.com",
        "[1.2.3.4]",
        "x" * 64 + ".com",
        ".".join(["a" * 63] * 4),  # 255 > 253
        "xn--zz.com",  # bad punycode
        "xn--abc-.com",  # decodes to ASCII: not a canonical A-label
        "例え。jp",  # ideographic full stop is not a separator in SMTP
        "a\x00b.com",
        "münchen\u200b.de\t",
    ],
)
def test_normalize_domain_rejects(domain: str) -> None:
    with pytest.raises(AddressError):
        normalize_domain(domain)


def test_long_domain_boundary() -> None:
    ok = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
    assert len(ok) == 253
    assert normalize_domain(ok) == ok
    with pytest.raises(AddressError):
        normalize_domain(ok + "d")


def test_u_label_counts_in_a_label_form() -> None:
    # 62 x "ü" is short as text but its A-label is far longer than 63 octets.
    with pytest.raises(AddressError):
        normalize_domain("ü" * 62 + ".de")


def test_idn_domain_in_path() -> None:
    a = fwd("<user@xn--mnchen-3ya.de>")
    u = fwd("<user@münchen.de>", smtputf8=True)
    assert a == u == Mailbox("user", "münchen.de")
    assert not a.is_utf8  # sent as ASCII: no SMTPUTF8 needed
    assert u.is_utf8


def test_utf8_local_part() -> None:
    m = fwd("<jöran.ü@example.com>", smtputf8=True)
    assert m == Mailbox("jöran.ü", "example.com")
    assert m.is_utf8
    assert str(m) == "jöran.ü@example.com"


def test_utf8_parsed_without_smtputf8() -> None:
    # The core answers 553 5.6.7 from is_utf8; parsing must not turn it into a 501.
    m = parse_reverse_path("<用户@例え.jp>", smtputf8=False)
    assert m is not None
    assert (m.local_part, m.domain, m.is_utf8) == ("用户", "例え.jp", True)


def test_utf8_in_source_route_only() -> None:
    m = fwd("<@münchen.de:user@example.com>")
    assert m == Mailbox("user", "example.com", source_route=True)
    assert m.is_utf8


def test_utf8_quoted_local_part() -> None:
    m = fwd('<"ö ü"@x.org>')
    assert (m.local_part, m.quoted, m.is_utf8) == ("ö ü", True, True)


def test_is_utf8_ignored_by_equality() -> None:
    assert Mailbox("a", "münchen.de", _sent_utf8=True) == Mailbox("a", "münchen.de")
    assert Mailbox("ä", "x").is_utf8  # built by hand: the local part still tells


# --- syntax errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "a@b",  # missing brackets
        "<a@b",
        "a@b>",
        "<",
        "",
        "<a@>",
        "<@b>",
        "<a>",  # no domain (only Postmaster may do that)
        "<@>",
        "<a..b@c>",
        "<.a@c>",
        "<a.@c>",
        "<a b@c>",
        "< a@c>",
        "<a@c >",
        "<a@ c>",
        '<"a@c>',  # unbalanced quote
        '<"a"b@c>',  # text after the quoted string
        '<a"b"@c>',
        '<""@c>',  # empty local part
        "<@c>",
        "<a@b@c>",
        "<a\x00@c>",
        "<a\r\n@c>",
        "<a\x7f@c>",
        "<a\x85@c>",  # C1 control
        '<"a\x01"@c>',  # control inside quotes
        '<"a\\\x01"@c>',  # control in a quoted-pair
        '<"a\\',
        "<a\udcff@c>",  # invalid UTF-8 decoded with surrogateescape
        "<a(comment)@c>",
        "<a,b@c>",
        "<a:b@c>",
        "<a@b,c>",
        "<<a@c>>",
        "<a@c>x",
        "<>x",
        "<a@[1.2.3.4]x>",
    ],
)
def test_bad_syntax(path: str) -> None:
    with pytest.raises(AddressError):
        fwd(path)
    with pytest.raises(AddressError):
        parse_reverse_path(path, smtputf8=True)


def test_path_length_limit() -> None:
    domain = ".".join(["a" * 60] * 3) + ".com"  # 184 characters
    local = "x" * (256 - 3 - len(domain))
    path = f"<{local}@{domain}>"
    assert len(path) == 256
    assert fwd(path).local_part == local
    with pytest.raises(AddressError, match="too long"):
        fwd(f"<{local}x@{domain}>")


def test_path_length_counts_octets() -> None:
    local = "ü" * 100  # 200 octets
    assert fwd(f"<{local}@example.com>").local_part == local
    with pytest.raises(AddressError, match="too long"):
        fwd(f"<{'ü' * 125}@example.com>")


def test_error_is_value_error_with_reason() -> None:
    with pytest.raises(ValueError, match="double dot"):
        fwd("<a..b@c>")


# --- properties -------------------------------------------------------------------------------

atoms = st.text(alphabet=ATEXT, min_size=1, max_size=12)
dot_atoms = st.lists(atoms, min_size=1, max_size=4).map(".".join)
utf8_chars = st.characters(min_codepoint=0xA0, codec="utf-8")
utf8_atoms = st.text(
    alphabet=st.one_of(st.sampled_from(ATEXT), utf8_chars), min_size=1, max_size=8
)
quoted_locals = st.text(
    alphabet=st.one_of(st.characters(min_codepoint=32, max_codepoint=126), utf8_chars),
    min_size=1,
    max_size=40,
)
ldh_labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)
domains = st.lists(ldh_labels, min_size=1, max_size=4).map(".".join)


@given(local=st.one_of(dot_atoms, st.lists(utf8_atoms, min_size=1, max_size=3).map(".".join)))
def test_dot_string_round_trip(local: str) -> None:
    m = Mailbox(local, "example.com")
    assert str(m) == f"{local}@example.com"
    assert fwd(f"<{m}>") == m


@given(local=quoted_locals, domain=domains)
def test_quoted_round_trip(local: str, domain: str) -> None:
    m = Mailbox(local, normalize_domain(domain))
    parsed = fwd(f"<{m}>")
    assert (parsed.local_part, parsed.domain) == (m.local_part, m.domain)
    assert str(parsed) == str(m)


@given(domain=domains)
def test_normalize_domain_idempotent_ascii(domain: str) -> None:
    once = normalize_domain(domain)
    assert once == domain.lower()
    assert normalize_domain(once) == once
    assert normalize_domain(once + ".") == once


@given(
    labels=st.lists(
        st.text(
            alphabet=st.characters(categories=("Ll", "Lu", "Lo", "Nd")), min_size=1, max_size=10
        ),
        min_size=1,
        max_size=3,
    )
)
def test_normalize_domain_idempotent_unicode(labels: list[str]) -> None:
    try:
        once = normalize_domain(".".join(labels))
    except AddressError:
        assume(False)
        return
    assert normalize_domain(once) == once
    # The A-label form normalises to the same name.
    assert normalize_domain(once.encode("idna").decode("ascii")) == once


@given(text=st.text(max_size=80))
def test_arbitrary_path_only_raises_address_error(text: str) -> None:
    for path in (text, f"<{text}>"):
        try:
            m = fwd(path)
        except AddressError:
            continue
        again = fwd(f"<{m}>")
        assert (again.local_part, again.domain) == (m.local_part, m.domain)


@given(text=st.text(max_size=80))
def test_arbitrary_argument_only_raises_address_error(text: str) -> None:
    try:
        path, rest = split_path_argument(text)
    except AddressError:
        return
    assert path.startswith("<") and path.endswith(">")
    assert rest == rest.strip(" ")
