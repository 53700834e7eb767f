"""AUTH exchanges: RFC 4954 4 and 6, RFC 4616 (PLAIN), draft-murchison-sasl-login (LOGIN)."""

from __future__ import annotations

import base64
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.smtp.sasl import (
    MAX_FIELD,
    MAX_RESPONSE_LINE,
    MECHANISMS,
    Challenge,
    Credentials,
    SaslError,
    SaslExchange,
    ehlo_keyword,
    parse_auth_command,
)


def b64(data: bytes | str) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def assert_reply(err: SaslError, code: int, status: str, text: str) -> None:
    assert (err.reply.code, err.reply.status, err.reply.text) == (code, status, (text,))


def start_error(mechanism: str, initial: str | None) -> SaslError:
    with pytest.raises(SaslError) as e:
        SaslExchange(mechanism).start(initial)
    return e.value


def respond_error(exchange: SaslExchange, line: str) -> SaslError:
    with pytest.raises(SaslError) as e:
        exchange.respond(line)
    assert exchange.done
    return e.value


# --- parse_auth_command ----------------------------------------------------------------


def test_mechanism_only() -> None:
    assert parse_auth_command("PLAIN") == ("PLAIN", None)
    assert parse_auth_command("LOGIN") == ("LOGIN", None)


def test_mechanism_is_case_insensitive() -> None:
    assert parse_auth_command("plain") == ("PLAIN", None)
    assert parse_auth_command("Login dXNlcg==") == ("LOGIN", "dXNlcg==")


def test_initial_response_is_returned_encoded() -> None:
    assert parse_auth_command("PLAIN AHVzZXIAcGFzcw==") == ("PLAIN", "AHVzZXIAcGFzcw==")


def test_equals_sign_is_an_empty_initial_response() -> None:
    # RFC 4954 4: initial-response = base64 / "="
    assert parse_auth_command("PLAIN =") == ("PLAIN", "")


@pytest.mark.parametrize(
    "argument",
    ["", " PLAIN", "PLAIN a b", "PLAIN ", "PL@IN", "A" * 21, "PLAIN  AAAA"],
)
def test_syntax_errors(argument: str) -> None:
    with pytest.raises(SaslError) as e:
        parse_auth_command(argument)
    assert_reply(e.value, 501, "5.5.4", "Syntax: AUTH <mechanism> [initial-response]")


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "GSSAPI", "SCRAM-SHA-256", "XOAUTH2"])
def test_unsupported_mechanism_is_504(mechanism: str) -> None:
    # RFC 4954 4: an unsupported mechanism is rejected with 504.
    with pytest.raises(SaslError) as e:
        parse_auth_command(f"{mechanism} AAAA")
    assert_reply(e.value, 504, "5.5.4", "Unrecognized authentication type")


def test_mechanisms_a_listener_does_not_offer_are_504() -> None:
    assert parse_auth_command("PLAIN", ("PLAIN",)) == ("PLAIN", None)
    with pytest.raises(SaslError) as e:
        parse_auth_command("LOGIN", ("PLAIN",))
    assert_reply(e.value, 504, "5.5.4", "Unrecognized authentication type")
    with pytest.raises(SaslError):
        parse_auth_command("XOAUTH2", ("XOAUTH2",))  # unknown to the parser: never offered


def test_mechanisms_and_ehlo_keyword() -> None:
    assert MECHANISMS == ("PLAIN", "LOGIN")
    assert ehlo_keyword() == "AUTH PLAIN LOGIN"
    assert ehlo_keyword(("PLAIN",)) == "AUTH PLAIN"


# --- challenges on the wire -------------------------------------------------------------


def test_challenge_encodings_are_byte_exact() -> None:
    assert Challenge("").encode() == b"334 \r\n"
    assert Challenge("Username:").encode() == b"334 VXNlcm5hbWU6\r\n"
    assert Challenge("Password:").encode() == b"334 UGFzc3dvcmQ6\r\n"


# --- PLAIN (RFC 4616) -------------------------------------------------------------------


def test_plain_with_initial_response() -> None:
    exchange = SaslExchange("PLAIN")
    result = exchange.start(b64("\0alice\0s3cret"))
    assert result == Credentials("", "alice", "s3cret")
    assert exchange.done


def test_plain_with_authzid() -> None:
    result = SaslExchange("plain").start(b64("bob\0alice\0s3cret"))
    assert result == Credentials("bob", "alice", "s3cret")


def test_plain_without_initial_response_sends_empty_challenge() -> None:
    exchange = SaslExchange("PLAIN")
    challenge = exchange.start(None)
    assert isinstance(challenge, Challenge)
    assert challenge.encode() == b"334 \r\n"
    assert not exchange.done
    assert exchange.respond(b64("\0alice\0s3cret")) == Credentials("", "alice", "s3cret")
    assert exchange.done


def test_plain_utf8_fields() -> None:
    result = SaslExchange("PLAIN").start(b64("\0jürgen\0pässwörd✓"))
    assert result == Credentials("", "jürgen", "pässwörd✓")


@pytest.mark.parametrize(
    "message",
    [
        b"",  # empty initial response ("=")
        b"alice\0s3cret",  # one NUL
        b"\0alice\0s3cret\0",  # three NULs
        b"\0\0s3cret",  # empty authcid
        b"\0alice\0",  # empty password
        b"\0al\xffice\0s3cret",  # not UTF-8
        b"\0" + b"a" * (MAX_FIELD + 1) + b"\0pw",  # authcid too long
        b"\0alice\0" + b"p" * (MAX_FIELD + 1),  # password too long
        b"z" * (MAX_FIELD + 1) + b"\0alice\0pw",  # authzid too long
    ],
)
def test_plain_malformed(message: bytes) -> None:
    assert_reply(
        start_error("PLAIN", b64(message)), 501, "5.5.2", "Malformed authentication response"
    )


def test_plain_fields_at_the_limit() -> None:
    big = "a" * MAX_FIELD
    assert SaslExchange("PLAIN").start(b64(f"{big}\0{big}\0{big}")) == Credentials(big, big, big)


def test_plain_malformed_after_challenge() -> None:
    exchange = SaslExchange("PLAIN")
    exchange.start(None)
    assert_reply(respond_error(exchange, b64("nonul")), 501, "5.5.2",
                 "Malformed authentication response")


# --- LOGIN ------------------------------------------------------------------------------


def test_login_full_exchange() -> None:
    exchange = SaslExchange("LOGIN")
    first = exchange.start(None)
    assert isinstance(first, Challenge)
    assert first.encode() == b"334 VXNlcm5hbWU6\r\n"
    second = exchange.respond(b64("alice"))
    assert isinstance(second, Challenge)
    assert second.encode() == b"334 UGFzc3dvcmQ6\r\n"
    assert exchange.respond(b64("s3cret")) == Credentials("", "alice", "s3cret")
    assert exchange.done


def test_login_initial_response_is_the_username() -> None:
    exchange = SaslExchange("LOGIN")
    challenge = exchange.start(b64("alice"))
    assert challenge == Challenge("Password:")
    assert exchange.respond(b64("s3cret")) == Credentials("", "alice", "s3cret")


@pytest.mark.parametrize("field", [b"", b"a\0b", b"\xff\xfe", b"x" * (MAX_FIELD + 1)])
def test_login_malformed_username(field: bytes) -> None:
    exchange = SaslExchange("LOGIN")
    exchange.start(None)
    assert_reply(respond_error(exchange, b64(field)), 501, "5.5.2",
                 "Malformed authentication response")


@pytest.mark.parametrize("field", [b"", b"a\0b", b"\xff\xfe", b"x" * (MAX_FIELD + 1)])
def test_login_malformed_password(field: bytes) -> None:
    exchange = SaslExchange("LOGIN")
    exchange.start(b64("alice"))
    assert_reply(respond_error(exchange, b64(field)), 501, "5.5.2",
                 "Malformed authentication response")


def test_login_empty_initial_response_is_an_empty_username() -> None:
    assert_reply(start_error("LOGIN", ""), 501, "5.5.2", "Malformed authentication response")


# --- errors common to every mechanism ---------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_cancel(mechanism: str) -> None:
    # RFC 4954 4: "*" cancels; the server MUST answer 501.
    exchange = SaslExchange(mechanism)
    exchange.start(None)
    assert_reply(respond_error(exchange, "*"), 501, "5.7.0", "Authentication canceled")


def test_cancel_on_login_password() -> None:
    exchange = SaslExchange("LOGIN")
    exchange.start(None)
    exchange.respond(b64("alice"))
    assert_reply(respond_error(exchange, "*"), 501, "5.7.0", "Authentication canceled")


@pytest.mark.parametrize(
    "line", ["!!!!", "YQ", "YQ=", "YQ===", "YQ==YQ==", "YW Jj", "YWJj\t", "ÿÿÿÿ", "="]
)
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_bad_base64(mechanism: str, line: str) -> None:
    # RFC 4954 4: a response that cannot be BASE64-decoded is rejected with 501.
    exchange = SaslExchange(mechanism)
    exchange.start(None)
    assert_reply(respond_error(exchange, line), 501, "5.5.2", "Invalid base64")
    assert_reply(start_error(mechanism, line), 501, "5.5.2", "Invalid base64")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_line_too_long(mechanism: str) -> None:
    # RFC 4954 4 and 6: longer than the authentication buffer -> 500 5.5.6.
    exchange = SaslExchange(mechanism)
    exchange.start(None)
    line = "A" * (MAX_RESPONSE_LINE + 4)
    assert_reply(respond_error(exchange, line), 500, "5.5.6",
                 "Authentication Exchange line is too long")
    assert_reply(start_error(mechanism, line), 500, "5.5.6",
                 "Authentication Exchange line is too long")


def test_line_at_the_limit_is_decoded() -> None:
    exchange = SaslExchange("PLAIN")
    exchange.start(None)
    line = "A" * MAX_RESPONSE_LINE  # valid base64, then malformed as PLAIN
    assert_reply(respond_error(exchange, line), 501, "5.5.2",
                 "Malformed authentication response")


def test_wire_form_of_errors() -> None:
    exchange = SaslExchange("PLAIN")
    exchange.start(None)
    err = respond_error(exchange, "*")
    assert err.reply.encode() == b"501 5.7.0 Authentication canceled\r\n"


# --- misuse by the caller is a bug ------------------------------------------------------


def test_unknown_mechanism_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        SaslExchange("CRAM-MD5")


def test_respond_before_start_is_a_caller_bug() -> None:
    with pytest.raises(RuntimeError):
        SaslExchange("PLAIN").respond("")


def test_start_twice_is_a_caller_bug() -> None:
    exchange = SaslExchange("LOGIN")
    exchange.start(None)
    with pytest.raises(RuntimeError):
        exchange.start(None)


def test_respond_after_the_end_is_a_caller_bug() -> None:
    exchange = SaslExchange("PLAIN")
    exchange.start(b64("\0a\0b"))
    with pytest.raises(RuntimeError):
        exchange.respond("")
    failed = SaslExchange("PLAIN")
    failed.start(None)
    respond_error(failed, "*")
    with pytest.raises(RuntimeError):
        failed.respond("")


# --- secrets ----------------------------------------------------------------------------

SECRET = "hunter2-Ünïcødé"


def test_password_not_in_repr_or_str() -> None:
    creds = SaslExchange("PLAIN").start(b64(f"\0alice\0{SECRET}"))
    assert isinstance(creds, Credentials)
    assert creds.password == SECRET
    assert SECRET not in repr(creds)
    assert SECRET not in str(creds)
    assert "alice" in repr(creds)


def test_login_exchange_never_shows_the_password() -> None:
    exchange = SaslExchange("LOGIN")
    exchange.start(b64("alice"))
    creds = exchange.respond(b64(SECRET))
    for obj in (exchange, creds, Challenge("Password:")):
        assert SECRET not in repr(obj)
        assert SECRET not in str(obj)
    assert b64(SECRET) not in repr(exchange)


@pytest.mark.parametrize(
    "payload",
    [
        "\0alice\0" + SECRET + "\0",  # malformed with the secret inside
        "\0alice\0" + SECRET + "x" * MAX_FIELD,  # too long
    ],
)
def test_errors_never_carry_the_password(payload: str) -> None:
    err = start_error("PLAIN", b64(payload))
    assert SECRET not in str(err) and SECRET not in repr(err)
    # No chained exception either: a logged traceback would show its arguments.
    assert err.__context__ is None and err.__cause__ is None


def test_undecodable_errors_have_no_context() -> None:
    assert start_error("PLAIN", "!!!!").__context__ is None
    assert start_error("PLAIN", b64(b"\0a\0\xff")).__context__ is None


# --- properties -------------------------------------------------------------------------

_FIELD = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
    min_size=1,
).filter(lambda s: len(s.encode("utf-8")) <= MAX_FIELD)


@given(authzid=st.one_of(st.just(""), _FIELD), authcid=_FIELD, password=_FIELD)
def test_plain_round_trip(authzid: str, authcid: str, password: str) -> None:
    encoded = b64(f"{authzid}\0{authcid}\0{password}")
    expected = Credentials(authzid, authcid, password)
    assert SaslExchange("PLAIN").start(encoded) == expected
    exchange = SaslExchange("PLAIN")
    exchange.start(None)
    assert exchange.respond(encoded) == expected
    # The repr is exactly the two identities: no password, whatever it is.
    assert repr(expected) == f"Credentials(authzid={authzid!r}, authcid={authcid!r})"


@given(authcid=_FIELD, password=_FIELD)
def test_login_round_trip(authcid: str, password: str) -> None:
    exchange = SaslExchange("LOGIN")
    assert exchange.start(b64(authcid)) == Challenge("Password:")
    assert exchange.respond(b64(password)) == Credentials("", authcid, password)


@given(st.text())
def test_parse_auth_command_raises_only_sasl_error(argument: str) -> None:
    try:
        mechanism, initial = parse_auth_command(argument)
    except SaslError:
        return
    assert mechanism in MECHANISMS
    assert initial is None or isinstance(initial, str)


@given(
    mechanism=st.sampled_from(MECHANISMS),
    initial=st.one_of(st.none(), st.text(), st.binary().map(b64)),
    lines=st.lists(st.one_of(st.text(), st.binary().map(b64), st.just("*")), max_size=4),
)
def test_exchange_raises_only_sasl_error(
    mechanism: str, initial: str | None, lines: list[str]
) -> None:
    exchange = SaslExchange(mechanism)
    try:
        result = exchange.start(initial)
        for line in lines:
            if isinstance(result, Credentials):
                break
            result = exchange.respond(line)
    except SaslError as e:
        assert e.reply.code in (500, 501)
        assert e.__context__ is None
        assert exchange.done


@given(st.binary(max_size=64))
def test_arbitrary_bytes_as_plain_message(message: bytes) -> None:
    try:
        creds = SaslExchange("PLAIN").start(b64(message))
    except SaslError as e:
        assert_reply(e, 501, "5.5.2", "Malformed authentication response")
        return
    assert isinstance(creds, Credentials)
    assert f"{creds.authzid}\0{creds.authcid}\0{creds.password}".encode() == message


def test_credentials_are_frozen_and_picklable() -> None:
    creds = Credentials("", "alice", "pw")
    with pytest.raises(AttributeError):
        creds.password = "other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(creds)) == creds
