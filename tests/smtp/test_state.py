"""The state table (RFC 5321 4.1.4, RFC 3030 2, RFC 2033 4.1): totality over State x
every command class, transitions only from the table, the precise 503s."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.commands import (
    Auth,
    Bdat,
    Command,
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
    XClientCommand,
)
from maitred_tx.smtp.params import MailParams, RcptParams
from maitred_tx.smtp.state import (
    SEQUENCE_ERRORS,
    TRANSITIONS,
    State,
    next_state,
    sequence_error,
)
from maitred_tx.smtp.xclient import XClient

COMMANDS: list[Command] = [
    Ehlo("c.example"),
    Helo("c.example"),
    Lhlo("c.example"),
    MailFrom(None, MailParams()),
    MailFrom(Mailbox("a", "b.example"), MailParams(size=10)),
    RcptTo(Mailbox("r", "localhost"), RcptParams()),
    Data(),
    Bdat(0, False),
    Bdat(10, True),
    Rset(),
    Noop(),
    Quit(),
    Help(""),
    Vrfy("x"),
    Expn("x"),
    NotImplementedVerb("ETRN"),
    HttpRequest("GET"),
    Auth("PLAIN", None),
    StartTls(),
    XClientCommand(XClient()),
    Command(),  # not a verb at all: never in the table
]
COMMAND_TYPES = {type(c) for c in COMMANDS}
ANYTIME = (Noop, Help, Vrfy, Expn, Quit, NotImplementedVerb, HttpRequest)


@settings(max_examples=300)
@given(st.booleans(), st.sampled_from(list(State)), st.sampled_from(COMMANDS))
def test_next_state_is_total_and_follows_the_table(
    lmtp: bool, state: State, command: Command
) -> None:
    new = next_state(lmtp, state, command)
    table = TRANSITIONS[lmtp].get((state, type(command)))
    if isinstance(command, Bdat) and command.last and table is State.BDAT:
        assert new is State.GREETED  # BDAT LAST ends the transaction
    else:
        assert new is table
    assert new is None or isinstance(new, State)


@settings(max_examples=300)
@given(st.booleans(), st.sampled_from(list(State)), st.sampled_from(COMMANDS))
def test_sequence_error_is_always_a_5xx_with_enhanced_code(
    lmtp: bool, state: State, command: Command
) -> None:
    reply = sequence_error(lmtp, state, command)
    assert 500 <= reply.code <= 599
    assert reply.status is not None and reply.status.startswith("5.5.")
    assert reply.code in (500, 503)


def test_table_mentions_only_known_states_and_commands() -> None:
    for table in TRANSITIONS.values():
        for (state, kind), new in table.items():
            assert isinstance(state, State) and isinstance(new, State)
            assert kind in COMMAND_TYPES
    for state, kind in SEQUENCE_ERRORS:
        assert (state, kind) not in TRANSITIONS[False]  # a precise 503 is for refused pairs


def test_smtp_and_lmtp_differ_only_in_greeting_verbs() -> None:
    smtp, lmtp = TRANSITIONS[False], TRANSITIONS[True]
    assert {k for k in smtp if k[1] not in (Ehlo, Helo)} == {k for k in lmtp if k[1] is not Lhlo}
    assert all(k[1] is not Lhlo for k in smtp)
    assert all(k[1] not in (Ehlo, Helo) for k in lmtp)


@pytest.mark.parametrize("lmtp", [False, True])
@pytest.mark.parametrize("state", list(State))
def test_anytime_commands_keep_the_state(lmtp: bool, state: State) -> None:
    for command in COMMANDS:
        if isinstance(command, ANYTIME):
            assert next_state(lmtp, state, command) is state


@pytest.mark.parametrize(
    ("lmtp", "state", "command", "expected"),
    [
        (False, State.CONNECTED, Ehlo("x"), State.GREETED),
        (False, State.CONNECTED, Helo("x"), State.GREETED),
        (False, State.RCPT, Ehlo("x"), State.GREETED),
        (False, State.BDAT, Helo("x"), State.GREETED),
        (True, State.CONNECTED, Lhlo("x"), State.GREETED),
        (False, State.GREETED, MailFrom(None, MailParams()), State.MAIL),
        (False, State.MAIL, RcptTo(Mailbox("r", "x"), RcptParams()), State.RCPT),
        (False, State.RCPT, RcptTo(Mailbox("r", "x"), RcptParams()), State.RCPT),
        (False, State.RCPT, Data(), State.GREETED),
        (False, State.RCPT, Bdat(5, False), State.BDAT),
        (False, State.RCPT, Bdat(5, True), State.GREETED),
        (False, State.BDAT, Bdat(5, False), State.BDAT),
        (False, State.BDAT, Bdat(0, True), State.GREETED),
        (False, State.CONNECTED, Rset(), State.CONNECTED),
        (False, State.BDAT, Rset(), State.GREETED),
        (True, State.MAIL, Rset(), State.GREETED),
    ],
)
def test_transitions(lmtp: bool, state: State, command: Command, expected: State) -> None:
    assert next_state(lmtp, state, command) is expected


MAIL = MailFrom(None, MailParams())
RCPT = RcptTo(Mailbox("r", "x"), RcptParams())


@pytest.mark.parametrize(
    ("lmtp", "state", "command", "reply"),
    [
        (False, State.CONNECTED, MAIL, R.R503_NEED_HELO),
        (False, State.CONNECTED, RCPT, R.R503_NEED_HELO),
        (False, State.CONNECTED, Data(), R.R503_NEED_HELO),
        (False, State.CONNECTED, Bdat(1, False), R.R503_NEED_HELO),
        (False, State.GREETED, RCPT, R.R503_NEED_MAIL),
        (False, State.GREETED, Data(), R.R503_NEED_MAIL),
        (False, State.GREETED, Bdat(1, True), R.R503_NEED_MAIL),
        (False, State.MAIL, MAIL, R.R503_NESTED_MAIL),
        (False, State.RCPT, MAIL, R.R503_NESTED_MAIL),
        (False, State.BDAT, MAIL, R.R503_NESTED_MAIL),
        (False, State.MAIL, Data(), R.R503_NEED_RCPT),
        (False, State.MAIL, Bdat(1, False), R.R503_NEED_RCPT),
        (False, State.BDAT, Data(), R.R503_DATA_AFTER_BDAT),
        (False, State.BDAT, RCPT, R.R503_BAD_SEQUENCE),
        (False, State.GREETED, Lhlo("x"), R.R500_UNKNOWN_COMMAND),
        (True, State.GREETED, Ehlo("x"), R.R500_UNKNOWN_COMMAND),
        (True, State.CONNECTED, Helo("x"), R.R500_UNKNOWN_COMMAND),
        (True, State.CONNECTED, MAIL, R.R503_NEED_LHLO),
        (True, State.CONNECTED, Data(), R.R503_NEED_LHLO),
        (True, State.MAIL, Data(), R.R503_NEED_RCPT),
        (False, State.GREETED, Command(), R.R503_BAD_SEQUENCE),
    ],
)
def test_sequence_errors(lmtp: bool, state: State, command: Command, reply: object) -> None:
    assert next_state(lmtp, state, command) is None
    assert sequence_error(lmtp, state, command) == reply


def test_connected_refuses_every_transaction_command() -> None:
    for lmtp in (False, True):
        for command in (MAIL, RCPT, Data(), Bdat(0, True)):
            assert next_state(lmtp, State.CONNECTED, command) is None
