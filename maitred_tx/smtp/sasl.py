"""AUTH exchanges (RFC 4954): the parse half of Stalwart's "parse vs verify" split.

This module owns what happens between ``AUTH <mechanism>`` and the moment the server
knows *which* credentials the client claims: the AUTH argument, the 334 challenges, the
client's base64 response lines, cancellation, and the message grammar of each
mechanism.  It never decides whether the credentials are right; the glue hands the
:class:`Credentials` to twisted.cred and answers 235 / 535 itself.

Enforced here:

- RFC 4954 4: ``AUTH SP sasl-mech [SP initial-response]``, ``=`` for an empty initial
  response, ``*`` cancels (501), undecodable base64 (501), 504 for a mechanism the
  server does not offer, 500 5.5.6 for a line longer than the authentication buffer;
- RFC 4422 3.1: the sasl-mech grammar (1..20 of upper-case letters, digits, "-", "_");
- RFC 4616 2: PLAIN, ``[authzid] NUL authcid NUL passwd`` in UTF-8;
- draft-murchison-sasl-login-00: LOGIN, "Username:" then "Password:".

Secrets: :class:`Credentials` keeps the password out of its repr, and no exception
raised here carries decoded client data, not even as ``__context__`` (decoding errors
are caught and the :class:`SaslError` is raised outside the ``except`` block), so a
logged traceback cannot leak a password.  SASLprep (RFC 4013) is left to the verifier,
which knows how its passwords are stored.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass, field
from typing import Final, NoReturn

from maitred_tx.smtp.replies import (
    R500_AUTH_LINE_TOO_LONG,
    R501_AUTH_BASE64,
    R501_AUTH_CANCELED,
    R501_AUTH_MALFORMED,
    R501_AUTH_SYNTAX,
    R504_AUTH_MECHANISM,
    Reply,
)

__all__ = [
    "MAX_FIELD",
    "MAX_RESPONSE_LINE",
    "MECHANISMS",
    "Challenge",
    "Credentials",
    "SaslError",
    "SaslExchange",
    "ehlo_keyword",
    "parse_auth_command",
]

MECHANISMS: Final = ("PLAIN", "LOGIN")

# RFC 4954 4: "12288 octets is considered to be a sufficient line length limit for
# handling of deployed authentication mechanisms"; longer -> 500 5.5.6.  Counted on the
# line without its CRLF.  PLAIN at 3 x 255 octets needs 1,024 base64 characters.
MAX_RESPONSE_LINE: Final = 12288
# RFC 4616 2: "The server MUST be capable of accepting authzid, authcid, and passwd
# inputs of up to 255 octets."  That is a floor; we also make it the ceiling, for PLAIN
# and LOGIN alike: identities are mailbox-sized (RFC 5321 4.5.3.1.3: a path is at most
# 256 octets), and a longer field is refused as malformed before it reaches the
# verifier.  Raise it (it bounds nothing else) if passwords are long tokens.
MAX_FIELD: Final = 255

# RFC 4422 3.1: sasl-mech = 1*20mech-char; mech-char = UPPER-ALPHA / DIGIT / "-" / "_".
# Matched case-insensitively: clients send "auth plain" and RFC 5321 2.4 makes SMTP
# arguments of this kind case-insensitive in practice.
_MECH: Final = re.compile(r"[A-Za-z0-9_-]{1,20}")

_CANCEL: Final = "*"  # RFC 4954 4: cancel-response = "*"


class SaslError(ValueError):
    """The exchange failed on the client's side; ``reply`` is the answer to send.

    The exchange is over after this: the glue answers and returns to command mode.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(" ".join(reply.text))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Challenge:
    """A server challenge, sent as ``334 <base64(text)>`` (RFC 4954 4)."""

    text: str

    def encode(self) -> bytes:
        """The wire form; an empty challenge is ``b"334 \\r\\n"`` (RFC 4954 4)."""
        encoded = base64.b64encode(self.text.encode("utf-8"))
        return b"334 " + encoded + b"\r\n"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client claims: authorize as *authzid* ("" if none), prove *authcid*.

    The password is excluded from ``repr`` (and so from ``str``), so logging the object
    or an assertion failure never shows it.
    """

    authzid: str
    authcid: str
    password: str = field(repr=False)


def ehlo_keyword(mechanisms: tuple[str, ...] = MECHANISMS) -> str:
    """The EHLO keyword line, e.g. ``AUTH PLAIN LOGIN`` (RFC 4954 3)."""
    return " ".join(("AUTH", *mechanisms))


def parse_auth_command(
    argument: str, mechanisms: tuple[str, ...] = MECHANISMS
) -> tuple[str, str | None]:
    """Split the AUTH argument into (mechanism upper-cased, initial response or None).

    The initial response is returned still base64-encoded, for :meth:`SaslExchange.start`;
    ``=`` becomes ``""`` (RFC 4954 4: "=" is an empty initial response).  *mechanisms*
    are those this listener offers (a subset of :data:`MECHANISMS`); others get 504.
    """
    words = argument.split(" ")
    if len(words) > 2 or not words[0]:
        raise SaslError(R501_AUTH_SYNTAX)  # RFC 4954 4: AUTH SP sasl-mech [SP initial-response]
    if not _MECH.fullmatch(words[0]):
        raise SaslError(R501_AUTH_SYNTAX)  # RFC 4422 3.1
    mechanism = words[0].upper()
    if mechanism not in mechanisms or mechanism not in MECHANISMS:
        raise SaslError(R504_AUTH_MECHANISM)  # RFC 4954 4: unsupported mechanism -> 504
    if len(words) == 1:
        return mechanism, None
    initial = words[1]
    if not initial:
        raise SaslError(R501_AUTH_SYNTAX)  # "AUTH PLAIN " with nothing after the space
    return mechanism, "" if initial == "=" else initial


class _Step(enum.Enum):
    """Where an exchange is; the next client line is interpreted accordingly."""

    NEW = enum.auto()
    PLAIN_MESSAGE = enum.auto()  # waiting for the PLAIN message after an empty 334
    LOGIN_USERNAME = enum.auto()  # "Username:" sent
    LOGIN_PASSWORD = enum.auto()  # "Password:" sent
    DONE = enum.auto()  # Credentials returned or SaslError raised


_USERNAME: Final = Challenge("Username:")  # draft-murchison-sasl-login-00 2
_PASSWORD: Final = Challenge("Password:")
_EMPTY: Final = Challenge("")  # RFC 4616 2 / RFC 4954 4: PLAIN without initial response


class SaslExchange:
    """One AUTH exchange for one mechanism: ``start`` once, then ``respond`` per line.

    Each call returns the next :class:`Challenge` to send or, at the end, the
    :class:`Credentials` to verify; a client mistake raises :class:`SaslError`.  Calling
    it out of turn (``respond`` before ``start``, anything after the end) is a bug of
    the caller and raises :class:`RuntimeError`.
    """

    __slots__ = ("_step", "_username", "mechanism")

    def __init__(self, mechanism: str) -> None:
        mechanism = mechanism.upper()
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
        self.mechanism = mechanism
        self._step = _Step.NEW
        self._username = ""  # LOGIN: the identity between the two challenges

    @property
    def done(self) -> bool:
        """True once credentials were returned or the exchange failed."""
        return self._step is _Step.DONE

    def start(self, initial: str | None) -> Challenge | Credentials:
        """Begin with the initial response of the AUTH command (base64, "" or None)."""
        if self._step is not _Step.NEW:
            raise RuntimeError("SaslExchange.start called twice")
        if self.mechanism == "PLAIN":
            if initial is None:
                self._step = _Step.PLAIN_MESSAGE
                return _EMPTY
            return self._plain(self._decode(initial))
        if initial is None:
            self._step = _Step.LOGIN_USERNAME
            return _USERNAME
        # LOGIN: the initial response, when given, is the user name.
        return self._login_username(self._decode(initial))

    def respond(self, line: str) -> Challenge | Credentials:
        """Take the client's response line (CRLF removed) to the last challenge."""
        step = self._step
        if step is _Step.NEW or step is _Step.DONE:
            raise RuntimeError(f"SaslExchange.respond called in step {step.name}")
        if line == _CANCEL:
            self._fail(R501_AUTH_CANCELED)  # RFC 4954 4: "*" -> 501
        data = self._decode(line)
        if step is _Step.PLAIN_MESSAGE:
            return self._plain(data)
        if step is _Step.LOGIN_USERNAME:
            return self._login_username(data)
        return self._login_password(data)

    # --- mechanisms ----------------------------------------------------------------------

    def _plain(self, data: bytes) -> Credentials:
        """RFC 4616 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd."""
        parts = data.split(b"\0")
        if len(parts) != 3:
            self._fail(R501_AUTH_MALFORMED)
        authzid, authcid, password = (self._text(p) for p in parts)
        # RFC 4616 2: authcid = 1*SAFE, passwd = 1*SAFE; an empty authzid means "none".
        if not authcid or not password:
            self._fail(R501_AUTH_MALFORMED)
        self._step = _Step.DONE
        return Credentials(authzid, authcid, password)

    def _login_username(self, data: bytes) -> Challenge:
        username = self._text(data)
        if not username or "\0" in username:
            self._fail(R501_AUTH_MALFORMED)
        self._username = username
        self._step = _Step.LOGIN_PASSWORD
        return _PASSWORD

    def _login_password(self, data: bytes) -> Credentials:
        password = self._text(data)
        if not password or "\0" in password:
            self._fail(R501_AUTH_MALFORMED)
        self._step = _Step.DONE
        return Credentials("", self._username, password)

    # --- helpers -------------------------------------------------------------------------

    def _fail(self, reply: Reply) -> NoReturn:
        # The exchange ends with the error; the username is dropped with it.
        self._step = _Step.DONE
        self._username = ""
        raise SaslError(reply)

    def _decode(self, line: str) -> bytes:
        """Strict base64 of one response line (RFC 4954 4), bounded in length."""
        # A longer line has more octets too; a shorter non-ASCII one is not base64 (501).
        if len(line) > MAX_RESPONSE_LINE:
            self._fail(R500_AUTH_LINE_TOO_LONG)  # RFC 4954 4, 6: 500 5.5.6
        data = _b64decode(line)
        if data is None:
            self._fail(R501_AUTH_BASE64)  # RFC 4954 4: undecodable -> 501
        return data

    def _text(self, octets: bytes) -> str:
        """One field as UTF-8 text (RFC 4616 2), at most MAX_FIELD octets."""
        text = _utf8(octets) if len(octets) <= MAX_FIELD else None
        if text is None:
            self._fail(R501_AUTH_MALFORMED)
        return text


def _b64decode(line: str) -> bytes | None:
    """Decode strictly (alphabet and padding checked); None if it is not base64.

    Returning None instead of raising keeps binascii's exception, and the line it
    describes, out of the ``__context__`` of the SaslError raised by the caller.
    """
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def _utf8(octets: bytes) -> str | None:
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        return None
