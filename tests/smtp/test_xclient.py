"""XCLIENT (https://www.postfix.org/XCLIENT_README.html), as nginx's mail proxy sends it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.smtp.params import xtext_encode
from maitred_tx.smtp.xclient import ATTRIBUTES, XClient, XClientError, parse_xclient


def error(argument: str) -> XClientError:
    with pytest.raises(XClientError) as e:
        parse_xclient(argument)
    return e.value


def assert_reply(err: XClientError, text: str) -> None:
    assert (err.reply.code, err.reply.status, err.reply.text) == (501, "5.5.4", (text,))


# --- what nginx and Postfix send ----------------------------------------------------------


def test_nginx_first_command() -> None:
    # ngx_mail_proxy_module: ADDR, LOGIN and NAME first ...
    x = parse_xclient("ADDR=192.0.2.7 LOGIN=alice NAME=client.example.org")
    assert x == XClient(
        name="client.example.org",
        addr="192.0.2.7",
        login="alice",
        given=frozenset({"ADDR", "LOGIN", "NAME"}),
    )


def test_nginx_second_command() -> None:
    # ... then PROTO and HELO, which must not erase the first command's facts.
    x = parse_xclient("PROTO=ESMTP HELO=laptop")
    assert (x.proto, x.helo, x.addr) == ("ESMTP", "laptop", None)
    assert x.given == frozenset({"PROTO", "HELO"})


def test_all_attributes() -> None:
    x = parse_xclient(
        "NAME=mx.example ADDR=IPV6:2001:db8::7 PORT=40123 PROTO=SMTP HELO=[192.0.2.1] "
        "LOGIN=bob DESTADDR=198.51.100.25 DESTPORT=25"
    )
    assert x == XClient(
        name="mx.example",
        addr="2001:db8::7",
        port=40123,
        proto="SMTP",
        helo="[192.0.2.1]",
        login="bob",
        destaddr="198.51.100.25",
        destport=25,
        given=frozenset(ATTRIBUTES),
    )


def test_attribute_names_are_case_insensitive() -> None:
    assert parse_xclient("addr=10.0.0.1 Proto=esmtp").proto == "ESMTP"
    assert parse_xclient("addr=10.0.0.1").addr == "10.0.0.1"


def test_extra_spaces_are_tolerated() -> None:
    assert parse_xclient("  ADDR=10.0.0.1   PORT=1 ").port == 1


# --- values -------------------------------------------------------------------------------


def test_values_are_xtext_decoded() -> None:
    x = parse_xclient("LOGIN=j+C3+BCrgen HELO=my+20box")
    assert (x.login, x.helo) == ("jürgen", "my box")
    assert parse_xclient("LOGIN=a+2Bb+3Dc").login == "a+b=c"


@pytest.mark.parametrize("attribute", ATTRIBUTES)
@pytest.mark.parametrize("special", ["[UNAVAILABLE]", "[unavailable]", "[Unavailable]"])
def test_unavailable_is_none(attribute: str, special: str) -> None:
    x = parse_xclient(f"{attribute}={special}")
    assert getattr(x, attribute.lower()) is None
    assert x.given == frozenset({attribute})
    assert x.temporary == frozenset()


def test_tempunavail_is_none_and_recorded() -> None:
    x = parse_xclient("NAME=[TEMPUNAVAIL] ADDR=192.0.2.1")
    assert (x.name, x.addr) == (None, "192.0.2.1")
    assert x.temporary == frozenset({"NAME"})
    assert parse_xclient("NAME=[tempunavail]").temporary == frozenset({"NAME"})


def test_special_values_may_be_xtext_encoded() -> None:
    assert parse_xclient("NAME=+5BUNAVAILABLE+5D").name is None


def test_absent_attributes_are_none() -> None:
    x = parse_xclient("PORT=25")
    assert x == XClient(port=25, given=frozenset({"PORT"}))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("IPV6:2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("ipv6:::1", "::1"),
        ("IPv6:::ffff:192.0.2.1", "::ffff:c000:201"),
        ("2001:db8::2", "2001:db8::2"),  # without the prefix: unambiguous, accepted
    ],
)
def test_addresses(value: str, expected: str) -> None:
    assert parse_xclient(f"ADDR={value}").addr == expected
    assert parse_xclient(f"DESTADDR={value}").destaddr == expected


@pytest.mark.parametrize(
    "value",
    ["192.0.2", "192.0.2.256", "192.000.2.1", "IPV6:192.0.2.1", "IPV6:", "fe80::1%25eth0",
     "[192.0.2.1]", "host.example", "IPV6:fe80::1+25eth0"],
)
@pytest.mark.parametrize("attribute", ["ADDR", "DESTADDR"])
def test_bad_addresses(attribute: str, value: str) -> None:
    assert_reply(error(f"{attribute}={value}"), f"Bad XCLIENT {attribute} value")


@pytest.mark.parametrize(("value", "port"), [("0", 0), ("25", 25), ("65535", 65535),
                                             ("00025", 25)])
def test_ports(value: str, port: int) -> None:
    assert parse_xclient(f"PORT={value}").port == port
    assert parse_xclient(f"DESTPORT={value}").destport == port


@pytest.mark.parametrize("value", ["65536", "-1", "+2B1", "1e3", "123456", "٣"])
@pytest.mark.parametrize("attribute", ["PORT", "DESTPORT"])
def test_bad_ports(attribute: str, value: str) -> None:
    assert_reply(error(f"{attribute}={value}"), f"Bad XCLIENT {attribute} value")


@pytest.mark.parametrize("value", ["HTTP", "LMTP", "ESMTPS", "SMTP+20"])
def test_bad_proto(value: str) -> None:
    assert_reply(error(f"PROTO={value}"), "Bad XCLIENT PROTO value")


@pytest.mark.parametrize(
    "value", ["mx.example.", "a", "host_name.example", "123.example", "xn--bcher-kva.example"]
)
def test_names(value: str) -> None:
    assert parse_xclient(f"NAME={value}").name == value


@pytest.mark.parametrize(
    "value",
    ["-bad.example", "bad-.example", "a..b", ".example", "exa+20mple", "[192.0.2.1]",
     "a" * 64 + ".example", "b+C3+BCcher.example"],
)
def test_bad_names(value: str) -> None:
    assert_reply(error(f"NAME={value}"), "Bad XCLIENT NAME value")


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_empty_values_are_refused(attribute: str) -> None:
    assert_reply(error(f"{attribute}="), f"Bad XCLIENT {attribute} value")


@pytest.mark.parametrize("attribute", ["HELO", "LOGIN", "NAME"])
def test_values_longer_than_255_are_refused(attribute: str) -> None:
    # XCLIENT_README: NAME and HELO values "can be up to 255 characters long".
    long = ".".join(["a" * 63] * 4)  # 255 characters, a valid host name
    assert len(long) == 255
    assert getattr(parse_xclient(f"{attribute}={long}"), attribute.lower()) == long
    assert_reply(error(f"{attribute}={long}a"), f"Bad XCLIENT {attribute} value")


@pytest.mark.parametrize("encoded", ["+0D+0AX", "+00", "+7F", "+C2+85"])
def test_control_characters_are_refused(encoded: str) -> None:
    # A decoded CR LF would forge lines in Received fields and logs.
    assert_reply(error(f"HELO=a{encoded}"), "Bad XCLIENT HELO value")
    assert_reply(error(f"LOGIN=a{encoded}"), "Bad XCLIENT LOGIN value")


@pytest.mark.parametrize("value", ["a+2", "a+ZZ", "a=b", "a\x7fb", "+FF", "é"])
def test_bad_xtext(value: str) -> None:
    assert_reply(error(f"LOGIN={value}"), "Bad XCLIENT LOGIN value")


# --- command-level errors -------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["", "   ", "ADDR", "ADDR 192.0.2.1", "=x", "A_B=1",
                                      "ADDR=1.2.3.4 PORT"])
def test_syntax_errors(argument: str) -> None:
    assert_reply(error(argument), "Syntax: XCLIENT attribute=value ...")


@pytest.mark.parametrize("argument", ["FOO=bar", "ADDR=1.2.3.4 TTL=5", "CCERT=x"])
def test_unknown_attribute(argument: str) -> None:
    name = argument.split(" ")[-1].split("=")[0]
    assert_reply(error(argument), f"Unknown XCLIENT attribute {name}")


def test_unknown_attribute_is_upper_cased_in_the_reply() -> None:
    assert_reply(error("foo=bar"), "Unknown XCLIENT attribute FOO")


def test_duplicate_attribute() -> None:
    assert_reply(error("ADDR=1.2.3.4 addr=5.6.7.8"), "XCLIENT attribute ADDR given twice")


def test_wire_form() -> None:
    assert error("FOO=1").reply.encode() == b"501 5.5.4 Unknown XCLIENT attribute FOO\r\n"


# --- properties -----------------------------------------------------------------------------


@given(st.text())
def test_arbitrary_text_raises_only_xclient_error(argument: str) -> None:
    try:
        x = parse_xclient(argument)
    except XClientError as e:
        assert e.reply.code == 501
        return
    assert x.given and x.given <= frozenset(ATTRIBUTES)


_PRINTABLE = st.text(
    alphabet=st.characters(min_codepoint=0x20, exclude_categories=("Cs", "Cc")),
    min_size=1,
    max_size=100,
).filter(lambda s: s.upper() not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"))


@given(helo=_PRINTABLE, login=_PRINTABLE)
def test_xtext_round_trip(helo: str, login: str) -> None:
    x = parse_xclient(f"HELO={xtext_encode(helo)} LOGIN={xtext_encode(login)}")
    assert (x.helo, x.login) == (helo, login)


@given(
    st.lists(st.sampled_from(ATTRIBUTES), unique=True, min_size=1),
)
def test_given_is_exactly_the_named_attributes(names: list[str]) -> None:
    x = parse_xclient(" ".join(f"{n.lower()}=[UNAVAILABLE]" for n in names))
    assert x.given == frozenset(names)
    assert all(getattr(x, n.lower()) is None for n in ATTRIBUTES)
