"""The command grammar (RFC 5321 4.1.1, RFC 3030 2, RFC 2033 4.1): one frozen
dataclass per verb and ``parse_command``, which turns one command line into one of
them or raises ``CommandError`` carrying the reply for the peer.

Parsing knows nothing about the session: whether a command is allowed now is the
state table's business (``state.py``), and whether an address is acceptable is policy.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.address import (
    PLAIN_PATH,
    AddressError,
    Mailbox,
    parse_forward_path,
    parse_reverse_path,
    plain_mailbox,
    split_path_argument,
)
from maitred_tx.smtp.params import (
    NO_MAIL_PARAMS,
    NO_RCPT_PARAMS,
    MailParams,
    ParamError,
    RcptParams,
    parse_mail_params,
    parse_rcpt_params,
)
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.sasl import SaslError, parse_auth_command
from maitred_tx.smtp.xclient import XClient, XClientError, parse_xclient

__all__ = [
    "Auth",
    "Bdat",
    "Command",
    "CommandError",
    "Data",
    "Ehlo",
    "Expn",
    "Helo",
    "Help",
    "HttpRequest",
    "Lhlo",
    "MailFrom",
    "Noop",
    "NotImplementedVerb",
    "Quit",
    "RcptTo",
    "Rset",
    "StartTls",
    "Vrfy",
    "XClientCommand",
    "parse_command",
]


class CommandError(Exception):
    """The peer sent a line that is not a valid command; ``reply`` says why."""

    def __init__(self, reply: Reply, *, fatal: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        # fatal: the stream can no longer be trusted (a BDAT whose size we cannot read).
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class Command:
    """Base of every command."""


@dataclass(frozen=True, slots=True)
class Ehlo(Command):
    domain: str


@dataclass(frozen=True, slots=True)
class Helo(Command):
    domain: str


@dataclass(frozen=True, slots=True)
class Lhlo(Command):
    domain: str


@dataclass(frozen=True, slots=True)
class MailFrom(Command):
    sender: Mailbox | None  # None: the null reverse-path <> (RFC 5321 4.5.5)
    params: MailParams


@dataclass(frozen=True, slots=True)
class RcptTo(Command):
    recipient: Mailbox
    params: RcptParams


@dataclass(frozen=True, slots=True)
class Data(Command):
    pass


@dataclass(frozen=True, slots=True)
class Bdat(Command):
    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class Rset(Command):
    pass


@dataclass(frozen=True, slots=True)
class Noop(Command):
    pass


@dataclass(frozen=True, slots=True)
class Quit(Command):
    pass


@dataclass(frozen=True, slots=True)
class Help(Command):
    topic: str


@dataclass(frozen=True, slots=True)
class Vrfy(Command):
    argument: str


@dataclass(frozen=True, slots=True)
class Expn(Command):
    argument: str


@dataclass(frozen=True, slots=True)
class StartTls(Command):
    """RFC 3207."""


@dataclass(frozen=True, slots=True)
class Auth(Command):
    """RFC 4954 4: AUTH mechanism [initial-response]; "=" is an empty response."""

    mechanism: str
    initial: str | None = field(default=None, repr=False)  # may carry a password


@dataclass(frozen=True, slots=True)
class XClientCommand(Command):
    """Postfix XCLIENT (from trusted proxies only; the session decides)."""

    attributes: XClient


@dataclass(frozen=True, slots=True)
class NotImplementedVerb(Command):
    """A verb we know and deliberately do not offer (ETRN, TURN, ...): 502 5.5.1."""

    verb: str


@dataclass(frozen=True, slots=True)
class HttpRequest(Command):
    """An HTTP request line sent to the SMTP port: cross-protocol abuse, closed at once."""

    verb: str


# ETRN (RFC 1985), ATRN (RFC 2645), BURL (RFC 4468), TURN (RFC 821): never offered.
_NOT_IMPLEMENTED: Final = frozenset({"ETRN", "ATRN", "BURL", "TURN"})
# Postfix's smtpd_forbidden_commands idea: the first word of an HTTP request, or a
# header line, means a browser or proxy was pointed at us.
_HTTP_VERBS: Final = frozenset(
    {"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "PATCH", "TRACE"}
)
_HEADER_LIKE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9-]*:")
# Any control character but HT has no business in a command line.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BDAT: Final = re.compile(r"(?i)([0-9]{1,20})(?: +(LAST))? *")
_VERB: Final = re.compile(r"[A-Za-z]{1,16}")


def _decode(line: bytes) -> str:
    try:
        # RFC 6531 3.3: UTF-8 is allowed in paths once SMTPUTF8 is declared; whether it
        # was declared is the session's check, the grammar only needs valid UTF-8.
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(R.R500_BAD_CHARACTER) from None
    if _CONTROL.search(text):
        raise CommandError(R.R500_BAD_CHARACTER)
    return text


# The lines nearly every session sends, answered without the general grammar:
# argument-less verbs in upper case (the value is immutable, so one is shared), MAIL /
# RCPT with a plain path (address.PLAIN_PATH) and at most SIZE=n, and EHLO / HELO /
# LHLO with one printable ASCII word, matched on the raw bytes.  A match is printable
# ASCII, so it needs no decoding or control check; the result is what the full parser
# gives for the same line (tests/smtp/test_commands.py checks both against each other),
# and anything else takes the full parser.
_EXACT: Final[dict[bytes, Command]] = {}  # filled below, once the classes exist
_FAST_PATH: Final = re.compile(
    rb"MAIL FROM:(?:<>|" + PLAIN_PATH.encode() + rb")(?: SIZE=([0-9]{1,20}))?"
    rb"|RCPT TO:" + PLAIN_PATH.encode()
    + rb"|(EHLO|HELO|LHLO) ([!-~]+)",
    re.IGNORECASE,  # on bytes: ASCII letters only
)
_HELLOS: Final[dict[str, type[Ehlo | Helo | Lhlo]]] = {"EHLO": Ehlo, "HELO": Helo, "LHLO": Lhlo}


def parse_command(line: bytes) -> Command:
    """Parse one command line, without its CRLF."""
    command = _EXACT.get(line)
    if command is not None:
        return command
    fast = _FAST_PATH.fullmatch(line)
    if fast is not None:
        try:
            return _fast_path(*fast.groups())
        except AddressError:
            pass  # e.g. a bad IDN label: the full parser gives the reply
    return _parse_full(line)


def _fast_path(
    mail_local: bytes | None,
    mail_domain: bytes | None,
    size: bytes | None,
    rcpt_local: bytes | None,
    rcpt_domain: bytes | None,
    hello: bytes | None = None,
    name: bytes | None = None,
) -> Command:
    if hello is not None and name is not None:  # LHLO too: the session says who may
        return _HELLOS[hello.upper().decode("ascii")](name.decode("ascii"))
    if rcpt_local is not None and rcpt_domain is not None:
        return RcptTo(_plain_mailbox(rcpt_local, rcpt_domain), NO_RCPT_PARAMS)
    sender = None
    if mail_local is not None and mail_domain is not None:
        sender = _plain_mailbox(mail_local, mail_domain)
    return MailFrom(sender, NO_MAIL_PARAMS if size is None else MailParams(size=int(size)))


# A server sees the same few recipients (its own users) and senders over and over; a
# Mailbox is immutable, so one value per path serves every command that names it.
@functools.lru_cache(maxsize=4096)
def _plain_mailbox(local_part: bytes, domain: bytes) -> Mailbox:
    return plain_mailbox(local_part.decode("ascii"), domain.decode("ascii"))


def _parse_full(line: bytes) -> Command:
    """parse_command without the shortcuts: the whole grammar."""
    # RFC 5321 4.1.1: servers SHOULD tolerate trailing white space before the CRLF, and
    # clients send both SP and HT there (as Postfix, which strips both).
    text = _decode(line).rstrip(" \t")
    verb, _, arg = text.partition(" ")
    upper = verb.upper()
    parser = _PARSERS.get(upper)
    if parser is not None:
        return parser(arg.strip(" "), upper)
    if upper in _HTTP_VERBS and arg:
        return HttpRequest(upper)
    if _HEADER_LIKE.match(text) and upper.rstrip(":") in ("HOST", "USER-AGENT"):
        return HttpRequest(upper.rstrip(":"))
    if upper in _NOT_IMPLEMENTED:
        return NotImplementedVerb(upper)
    raise CommandError(R.R500_UNKNOWN_COMMAND)


def _hello(arg: str, verb: str) -> Command:
    # RFC 5321 4.1.1.1: a domain or address literal.  Like Postfix's default, we take
    # what the client says (the name goes into Received: only); it must not be empty.
    name = arg.split(" ", 1)[0] if arg else ""
    if not name:
        raise CommandError(R.R501_HELO_SYNTAX.format(verb=verb))
    return _HELLOS[verb](name)


def _prefixed(arg: str, prefix: str, reply: Reply) -> str:
    if arg[: len(prefix)].upper() != prefix:
        raise CommandError(reply)
    return arg[len(prefix) :]


def _mail(arg: str, verb: str) -> Command:
    rest = _prefixed(arg, "FROM:", R.R501_MAIL_SYNTAX)
    try:
        path, param_text = split_path_argument(rest)
    except AddressError:
        raise CommandError(R.R501_MAIL_SYNTAX) from None
    params = _params(parse_mail_params, param_text)
    try:
        sender = parse_reverse_path(path, smtputf8=params.smtputf8)
    except AddressError:
        raise CommandError(R.R501_PATH_SYNTAX) from None
    return MailFrom(sender, params)


def _rcpt(arg: str, verb: str) -> Command:
    rest = _prefixed(arg, "TO:", R.R501_RCPT_SYNTAX)
    try:
        path, param_text = split_path_argument(rest)
    except AddressError:
        raise CommandError(R.R501_RCPT_SYNTAX) from None
    params = _params(parse_rcpt_params, param_text)
    try:
        recipient = parse_forward_path(path, smtputf8=True)
    except AddressError:
        raise CommandError(R.R501_RCPT_PATH_SYNTAX) from None
    return RcptTo(recipient, params)


_P = TypeVar("_P", MailParams, RcptParams)
_Parser = Callable[[str, str], Command]


def _params(parse: Callable[[str], _P], text: str) -> _P:
    try:
        return parse(text)
    except ParamError as e:
        raise CommandError(e.reply) from None


def _bdat(arg: str, verb: str) -> Command:
    m = _BDAT.fullmatch(arg)
    if m is None:
        # RFC 3030 2: without a size we cannot tell where the chunk ends, so whatever
        # follows could be message bytes read as commands; the session is closed.
        raise CommandError(R.R501_BDAT_SYNTAX, fatal=True)
    return Bdat(int(m.group(1)), m.group(2) is not None)


def _no_argument(cls: type[Command]) -> _Parser:
    def parse(arg: str, verb: str) -> Command:
        if arg:
            raise CommandError(R.R501_NO_ARGUMENTS.format(verb=verb))
        return cls()

    return parse


def _auth(arg: str, verb: str) -> Command:
    try:
        return Auth(*parse_auth_command(arg))
    except SaslError as e:
        raise CommandError(e.reply) from None


def _xclient(arg: str, verb: str) -> Command:
    try:
        return XClientCommand(parse_xclient(arg))
    except XClientError as e:
        raise CommandError(e.reply) from None


def _noop(arg: str, verb: str) -> Command:
    return Noop()  # RFC 5321 4.1.1.9: a parameter string is ignored


def _help(arg: str, verb: str) -> Command:
    return Help(arg)


def _vrfy(arg: str, verb: str) -> Command:
    if not arg:
        raise CommandError(R.R501_SYNTAX)
    return Vrfy(arg)


def _expn(arg: str, verb: str) -> Command:
    if not arg:
        raise CommandError(R.R501_SYNTAX)
    return Expn(arg)


_PARSERS: Final[dict[str, _Parser]] = {
    "EHLO": _hello,
    "HELO": _hello,
    "LHLO": _hello,
    "MAIL": _mail,
    "RCPT": _rcpt,
    "DATA": _no_argument(Data),
    "BDAT": _bdat,
    "RSET": _no_argument(Rset),
    "NOOP": _noop,
    "QUIT": _no_argument(Quit),
    "STARTTLS": _no_argument(StartTls),
    "AUTH": _auth,
    "XCLIENT": _xclient,
    "HELP": _help,
    "VRFY": _vrfy,
    "EXPN": _expn,
}
_EXACT.update({b"DATA": Data(), b"RSET": Rset(), b"NOOP": Noop(), b"QUIT": Quit()})
