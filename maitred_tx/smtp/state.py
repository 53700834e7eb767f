"""The session state machine (RFC 5321 4.1.4, RFC 3030 2, RFC 2033 4.2), as tables.

``TRANSITIONS`` maps (state, command type) to the state after a *positive* reply; a
pair missing from it is a sequence error, answered from ``SEQUENCE_ERRORS`` (or the
generic 503).  Facts that are not states — the HELO name, ESMTP or not, SMTPUTF8 for
this transaction — live beside the state in the session, not in it.
"""

from __future__ import annotations

import enum
from typing import Final

from maitred_tx.smtp import replies as R
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
from maitred_tx.smtp.replies import Reply

__all__ = ["SEQUENCE_ERRORS", "TRANSITIONS", "State", "next_state", "sequence_error"]


class State(enum.Enum):
    CONNECTED = "connected"  # greeting sent, no EHLO/HELO yet
    GREETED = "greeted"  # no transaction
    MAIL = "mail"  # MAIL accepted, no recipient accepted yet
    RCPT = "rcpt"  # at least one recipient accepted
    BDAT = "bdat"  # at least one BDAT chunk received (RFC 3030: DATA now illegal)

    # Members are singletons compared by identity, so the identity hash is a valid one,
    # and it is computed in C: Enum's own hashes the name in Python, for every
    # TRANSITIONS lookup (one per command).
    __hash__ = object.__hash__


_ALL: Final = tuple(State)
_TRANSACTION: Final = (State.MAIL, State.RCPT, State.BDAT)
# Commands that change nothing and are legal at any time (RFC 5321 4.1.4).
_ANYTIME: Final = (Noop, Help, Vrfy, Expn, Quit, NotImplementedVerb, HttpRequest)

CommandType = type[Command]

_SMTP: dict[tuple[State, CommandType], State] = {}
for _s in _ALL:
    for _c in _ANYTIME:
        _SMTP[_s, _c] = _s
    # 4.1.4: RSET and a new EHLO/HELO abort any transaction.
    _SMTP[_s, Rset] = State.CONNECTED if _s is State.CONNECTED else State.GREETED
_SMTP[State.GREETED, MailFrom] = State.MAIL
# RFC 4954 4: AUTH after EHLO, outside a transaction; RFC 3207 4.2: STARTTLS resets the
# session to before EHLO.
_SMTP[State.GREETED, Auth] = State.GREETED
_SMTP[State.GREETED, StartTls] = State.CONNECTED
# XCLIENT (Postfix) replaces the client's identity and restarts the session.
_SMTP[State.CONNECTED, XClientCommand] = State.CONNECTED
_SMTP[State.GREETED, XClientCommand] = State.CONNECTED
_SMTP[State.MAIL, RcptTo] = State.RCPT
_SMTP[State.RCPT, RcptTo] = State.RCPT
_SMTP[State.RCPT, Data] = State.GREETED
# BDAT: the state after a non-LAST chunk; LAST returns to GREETED (see next_state).
_SMTP[State.RCPT, Bdat] = State.BDAT
_SMTP[State.BDAT, Bdat] = State.BDAT

_LMTP = dict(_SMTP)
for _s in _ALL:
    _SMTP[_s, Ehlo] = State.GREETED
    _SMTP[_s, Helo] = State.GREETED
    _LMTP[_s, Lhlo] = State.GREETED  # RFC 2033 4.1: LHLO replaces EHLO and HELO

TRANSITIONS: Final[dict[bool, dict[tuple[State, CommandType], State]]] = {
    False: _SMTP,
    True: _LMTP,
}

# The precise 503 for the sequence errors a real client makes; others get the generic.
SEQUENCE_ERRORS: Final[dict[tuple[State, CommandType], Reply]] = {
    **{(State.CONNECTED, c): R.R503_NEED_HELO for c in (MailFrom, RcptTo, Data, Bdat)},
    **{(s, MailFrom): R.R503_NESTED_MAIL for s in _TRANSACTION},
    (State.GREETED, RcptTo): R.R503_NEED_MAIL,
    (State.BDAT, RcptTo): R.R503_BAD_SEQUENCE,
    (State.GREETED, Data): R.R503_NEED_MAIL,
    (State.MAIL, Data): R.R503_NEED_RCPT,
    (State.BDAT, Data): R.R503_DATA_AFTER_BDAT,  # RFC 3030 2
    (State.GREETED, Bdat): R.R503_NEED_MAIL,
    (State.MAIL, Bdat): R.R503_NEED_RCPT,
    (State.CONNECTED, Auth): R.R503_NEED_HELO,
    **{(s, Auth): R.R503_AUTH_IN_TRANSACTION for s in _TRANSACTION},
    (State.CONNECTED, StartTls): R.R503_NEED_HELO,
}


def next_state(lmtp: bool, state: State, command: Command) -> State | None:
    """The state after a positive reply to *command*, or None if it is out of order."""
    new = TRANSITIONS[lmtp].get((state, type(command)))
    if new is State.BDAT and isinstance(command, Bdat) and command.last:
        return State.GREETED
    return new


def sequence_error(lmtp: bool, state: State, command: Command) -> Reply:
    """The reply for a command that ``next_state`` refused."""
    if isinstance(command, (Ehlo, Helo)) and lmtp:
        return R.R500_UNKNOWN_COMMAND  # RFC 2033 4.1: an LMTP server knows only LHLO
    if isinstance(command, Lhlo) and not lmtp:
        return R.R500_UNKNOWN_COMMAND
    if state is State.CONNECTED and lmtp:
        return R.R503_NEED_LHLO
    return SEQUENCE_ERRORS.get((state, type(command)), R.R503_BAD_SEQUENCE)
