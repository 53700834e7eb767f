"""The plan of one mail transaction: the MAIL and RCPT lines, DATA or BDAT, and what the
message needs from the server, decided before a byte of it is sent.

It enforces on our side what the server would refuse anyway, so that the caller gets
a precise, distinct error instead of a 5xx after the body:

- paths are valid RFC 5321 4.1.2 paths (the server's own parser checks them, so a CR or
  LF in an address can never inject a command); an IDN domain goes as its A-label
  (RFC 5890), so only a UTF-8 *local part* needs SMTPUTF8 (RFC 6531 3.2), as Postfix
  does it;
- SMTPUTF8 (RFC 6531), 8BITMIME (RFC 6152) and BINARYMIME + CHUNKING (RFC 3030) are
  used when the message needs them and refused (:class:`ExtensionUnsupported`) when
  the server lacks them;
- SIZE (RFC 1870 4): the size is declared, and a message larger than the server's
  announced maximum is refused before MAIL (:class:`MessageTooBig`);
- DSN parameters (RFC 3461 4) are sent when the server offers DSN, dropped otherwise
  (the server then sends no DSN; RFC 3461 leaves a relaying client to report
  "relayed", which is the caller's business).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from encodings import idna as _idna
from typing import Final

from maitred_tx.client.body import ContentScan
from maitred_tx.client.errors import (
    ExtensionUnsupported,
    InvalidAddress,
    MessageTooBig,
    SMTPClientError,
)
from maitred_tx.client.extensions import Extensions
from maitred_tx.smtp.address import AddressError, Mailbox, parse_forward_path
from maitred_tx.smtp.params import BodyType, Notify, Ret, xtext_encode

__all__ = ["DSN", "InvalidBody", "Recipient", "TransactionPlan", "plan_transaction"]

# RFC 3461 4.4: "The ENVID parameter MUST NOT exceed 100 characters" (as xtext).
MAX_ENVID: Final = 100
_RANK: Final = {BodyType.SEVEN_BIT: 0, BodyType.EIGHT_BIT_MIME: 1, BodyType.BINARY_MIME: 2}
# RFC 6533 3 QCHAR: printable ASCII but "+", "=" and "\".
_NOT_QCHAR: Final = re.compile(r"[^\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")


class InvalidBody(SMTPClientError, ValueError):
    """The body does not match what it was declared (or, for a stream, assumed) to
    be: e.g. a bare LF in a body sent as 8BITMIME.  Permanent; declare ``body_type``."""

    permanent = True


@dataclass(frozen=True, slots=True)
class Recipient:
    """A recipient with its own DSN parameters (RFC 3461 4.1 NOTIFY, 4.2 ORCPT)."""

    address: str
    notify: frozenset[Notify] | None = None  # None: the DSN() default
    orcpt: str | None = None  # the original recipient address (sent as rfc822/utf-8)

    def __post_init__(self) -> None:
        _check_notify(self.notify)


@dataclass(frozen=True, slots=True)
class DSN:
    """Delivery status notification requests (RFC 3461), sent when the server has DSN."""

    ret: Ret | None = None  # RET=FULL / HDRS: what a failure DSN returns
    envid: str | None = None  # ENVID: the sender's transaction id, printable ASCII
    notify: frozenset[Notify] | None = None  # NOTIFY for recipients that set none

    def __post_init__(self) -> None:
        _check_notify(self.notify)
        if self.envid is not None:
            if not self.envid or not all(" " < c <= "~" for c in self.envid):
                raise ValueError("ENVID must be printable ASCII without spaces")
            if len(xtext_encode(self.envid)) > MAX_ENVID:
                raise ValueError(f"ENVID longer than {MAX_ENVID} characters as xtext")


def _check_notify(notify: frozenset[Notify] | None) -> None:
    if notify is not None and (not notify or (Notify.NEVER in notify and len(notify) > 1)):
        raise ValueError("NOTIFY is NEVER alone or a non-empty set of the others")


@dataclass(frozen=True, slots=True)
class TransactionPlan:
    """What to send for one message and how."""

    mail: bytes  # the MAIL command line, CRLF included
    rcpts: tuple[bytes, ...]  # one RCPT line per recipient, in order
    recipients: tuple[str, ...]  # the addresses as the caller gave them
    bdat: bool  # BDAT chunks (RFC 3030) rather than DATA
    pipelined: bool  # RFC 2920: MAIL, RCPTs and DATA/BDAT in one write
    body_type: BodyType  # what the body is declared (or assumed) to be
    verify: bool  # check the body while sending (not scanned before)
    reset_first: bool  # RSET first: the server may hold a failed transaction


def plan_transaction(
    sender: str,
    recipients: Sequence[str | Recipient],
    extensions: Extensions,
    *,
    host: str,
    size: int | None = None,
    body_type: BodyType | None = None,
    scan: ContentScan | None = None,
    smtputf8: bool = False,
    dsn: DSN | None = None,
    chunking: bool = True,
    reset_first: bool = False,
) -> TransactionPlan:
    """Plan one message.  *scan* is what the body contains if it was scanned whole
    (a bytes body); None for a stream, which is then checked while it is sent.
    *chunking*: use BDAT whenever the server offers CHUNKING (Exim's default)."""
    if not recipients:
        raise ValueError("a message needs at least one recipient")
    rcpts = [r if isinstance(r, Recipient) else Recipient(r) for r in recipients]
    mail_path, utf8 = _path(sender, reverse=True)
    rcpt_paths = [_path(r.address, reverse=False) for r in rcpts]
    utf8 = smtputf8 or utf8 or any(u for _, u in rcpt_paths)
    if utf8 and not extensions.smtputf8:
        raise ExtensionUnsupported(
            "SMTPUTF8", f"{host} does not offer SMTPUTF8, which the message needs "
            "(an address with a non-ASCII local part)", host=host)
    if size is not None and extensions.max_size is not None and size > extensions.max_size:
        raise MessageTooBig(
            f"the message ({size} octets) is larger than {host} accepts "
            f"(SIZE {extensions.max_size})", host=host)
    kind = _body_type(body_type, scan, extensions, host)
    mail = [f"MAIL FROM:{mail_path}"]
    if extensions.size and size is not None:
        mail.append(f"SIZE={size}")
    if kind is not BodyType.SEVEN_BIT:
        mail.append(f"BODY={kind.value}")
    if utf8:
        mail.append("SMTPUTF8")
    if extensions.dsn and dsn is not None:
        mail += _dsn_mail_params(dsn)
    return TransactionPlan(
        mail=_line(mail),
        rcpts=_rcpt_lines(rcpts, [path for path, _ in rcpt_paths], extensions, dsn),
        recipients=tuple(r.address for r in rcpts),
        bdat=kind is BodyType.BINARY_MIME or (chunking and extensions.chunking),
        pipelined=extensions.pipelining,
        body_type=kind,
        verify=scan is None and kind is not BodyType.BINARY_MIME,
        reset_first=reset_first,
    )


def _rcpt_lines(
    rcpts: list[Recipient], paths: list[str], extensions: Extensions, dsn: DSN | None
) -> tuple[bytes, ...]:
    default_notify = dsn.notify if dsn is not None else None
    lines = []
    for recipient, path in zip(rcpts, paths, strict=True):
        words = [f"RCPT TO:{path}"]
        if extensions.dsn:
            words += _dsn_rcpt_params(recipient, default_notify)
        lines.append(_line(words))
    return tuple(lines)


def _line(words: list[str]) -> bytes:
    return (" ".join(words) + "\r\n").encode("utf-8")


def _body_type(
    declared: BodyType | None, scan: ContentScan | None, ext: Extensions, host: str
) -> BodyType:
    """The BODY= type to use (and the extensions it needs are there)."""
    if declared is None:
        # A stream cannot be scanned before MAIL: assume text, 8-bit if the server
        # takes it (declaring 8BITMIME for 7-bit text is harmless), and check on the way.
        kind = scan.needs if scan is not None else (
            BodyType.EIGHT_BIT_MIME if ext.eight_bit_mime else BodyType.SEVEN_BIT)
    else:
        kind = declared
        if scan is not None and _RANK[scan.needs] > _RANK[kind]:
            raise InvalidBody(_mismatch(kind, scan), host=host)
    why = f" ({scan.problem.value})" if scan is not None and scan.problem else ""
    if kind is BodyType.BINARY_MIME and not (ext.binary_mime and ext.chunking):
        raise ExtensionUnsupported(
            "BINARYMIME", f"the message is binary{why} and {host} does not offer "
            "BINARYMIME with CHUNKING (convert it to CRLF text lines of at most 998 "
            "octets, e.g. with email.policy.SMTP)", host=host)
    if kind is BodyType.EIGHT_BIT_MIME and not ext.eight_bit_mime:
        raise ExtensionUnsupported(
            "8BITMIME", f"the message has 8-bit octets and {host} does not offer 8BITMIME "
            "(encode it as quoted-printable or base64)", host=host)
    return kind


def _mismatch(kind: BodyType, scan: ContentScan) -> str:
    what = scan.problem.value if scan.problem is not None else "8-bit octets"
    return f"the body has {what} but was declared BODY={kind.value}"


@functools.lru_cache(maxsize=4096)
def _path(address: str, *, reverse: bool) -> tuple[str, bool]:
    """The wire path of *address* and whether it needs SMTPUTF8.  Cached: a sender
    sends from few addresses, and a relay sees the same recipients again and again."""
    text = address[1:-1] if address.startswith("<") and address.endswith(">") else address
    if reverse and not text:
        return "<>", False  # RFC 5321 4.5.5: the null reverse-path (bounces)
    try:
        mailbox = parse_forward_path(f"<{text}>", smtputf8=True)
    except AddressError as e:
        raise InvalidAddress(f"invalid address {address!r}: {e}") from None
    if mailbox.source_route:
        raise InvalidAddress(f"invalid address {address!r}: source routes are obsolete")
    return f"<{_wire_mailbox(mailbox)}>", not mailbox.local_part.isascii()


def _wire_mailbox(mailbox: Mailbox) -> str:
    """The mailbox with an IDN domain as A-labels (RFC 5890), so that only a UTF-8
    local part needs SMTPUTF8."""
    domain = mailbox.domain
    if domain and not domain.isascii():
        ascii_domain = ".".join(
            _idna.ToASCII(label).decode("ascii") for label in domain.split(".")
        )
        mailbox = Mailbox(mailbox.local_part, ascii_domain, mailbox.quoted)
    return str(mailbox)


def _dsn_mail_params(dsn: DSN) -> list[str]:
    words = []
    if dsn.ret is not None:
        words.append(f"RET={dsn.ret.value}")
    if dsn.envid is not None:
        words.append(f"ENVID={xtext_encode(dsn.envid)}")
    return words


def _dsn_rcpt_params(recipient: Recipient, default: frozenset[Notify] | None) -> list[str]:
    words = []
    notify = recipient.notify if recipient.notify is not None else default
    if notify is not None:
        order = [n for n in Notify if n in notify]  # a stable wire order
        words.append("NOTIFY=" + ",".join(n.value for n in order))
    if recipient.orcpt is not None:
        words.append("ORCPT=" + orcpt_value(recipient.orcpt))
    return words


def orcpt_value(address: str) -> str:
    """RFC 3461 4.2 ``rfc822;xtext`` for an ASCII address, RFC 6533 3
    ``utf-8;utf-8-addr-xtext`` (``\\x{HEX}`` escapes) for an international one."""
    if address.isascii():
        return "rfc822;" + xtext_encode(address)
    return "utf-8;" + _NOT_QCHAR.sub(lambda m: f"\\x{{{ord(m.group(0)):X}}}", address)
