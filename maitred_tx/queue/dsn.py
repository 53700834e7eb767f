"""Delivery Status Notifications: which are owed, and the message that carries one.

Pure: stdlib only, no clock, no I/O (the original is read by the caller, bounded, with
:func:`read_original`).  It enforces:

- who is told (RFC 3461 4.1, RFC 5321 6.2 / 4.5.5): never the null reverse-path - no
  bounce of a bounce; NOTIFY=NEVER: nothing; a NOTIFY list: only its conditions;
  no NOTIFY: failures only (and delays if :class:`DelayWarning` says so);
  SUCCESS: "relayed" when the next hop does not do DSN, "delivered" on a final
  delivery, nothing when the next hop announced DSN and was passed NOTIFY (it reports);
- the report (RFC 3464, RFC 6522 multipart/report): a human-readable part, a
  ``message/delivery-status`` part (per-message fields 2.2, per-recipient fields 2.3)
  and the original - its header block (``text/rfc822-headers``) or, for RET=FULL, the
  whole message (``message/rfc822``) up to :data:`MAX_RETURN_FULL` octets;
- RFC 6533 (SMTPUTF8): when an address is not ASCII, the report is
  ``message/global-delivery-status`` with ``utf-8`` address types, the original part
  ``message/global-headers`` / ``message/global`` when its header block is UTF-8,
  and the DSN's envelope asks for SMTPUTF8.

RET absent means headers only: RFC 3461 4.3 lets the MTA choose; Postfix returns the
whole message up to 50 kB, but a bounce is sent to an address that may be forged, and
content in it is backscatter and a leak of what the recipient's side never accepted.
A sender who wants the content back says RET=FULL.
"""

from __future__ import annotations

import datetime
import enum
import re
import secrets
from dataclasses import dataclass
from email.utils import format_datetime
from typing import BinaryIO, Final

from maitred_tx.queue.schedule import DelayWarning, RetryPolicy
from maitred_tx.queue.store import (
    QueuedMessage,
    QueuedRecipient,
    QueueEnvelope,
    RecipientState,
)
from maitred_tx.smtp.params import BodyType, Notify, Ret

__all__ = [
    "MAX_RETURN_FULL",
    "MAX_RETURN_HEADERS",
    "Action",
    "Notice",
    "NoticeKind",
    "build_dsn",
    "header_block",
    "notices",
    "read_original",
    "to_settle",
]

# RET=FULL returns the message up to this size; a larger one gets its header block
# only (truncating a message/rfc822 part would make it a different, broken message).
# Postfix's bounce_size_limit is 50 kB, Exim's bounce_return_size_limit 100 kB; the
# issue asks for 1 MB, which every mailbox provider takes.
MAX_RETURN_FULL: Final = 1024 * 1024
# The returned header block is cut (at a line end) beyond this: our own server
# accepts header blocks up to Limits.max_header_block (100 KiB) by default.
MAX_RETURN_HEADERS: Final = 128 * 1024
# A field value from a peer (a reply text) is cut here before folding.
_MAX_FIELD: Final = 900
_FOLD_AT: Final = 76
_LINE_ENDS: Final = re.compile(rb"\r\n|\r|\n")


class NoticeKind(enum.Enum):
    FAILURE = "failure"
    DELAY = "delay"
    SUCCESS = "success"


class Action(enum.Enum):
    """RFC 3464 2.3.3 action-value."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


@dataclass(frozen=True, slots=True)
class Notice:
    """One DSN owed: its kind and the recipients it reports on."""

    kind: NoticeKind
    recipients: tuple[QueuedRecipient, ...]


def _wants(notify: frozenset[Notify] | None, condition: Notify, default: bool) -> bool:
    return default if notify is None else condition in notify


def notices(
    message: QueuedMessage, now: float, warning: DelayWarning | None = None
) -> list[Notice]:
    """The DSNs owed for *message* now (at most one of each kind)."""
    if message.sender is None:  # RFC 5321 6.2 / RFC 3461 5.2: never bounce a bounce
        return []
    warning = warning or DelayWarning()
    owed: dict[NoticeKind, list[QueuedRecipient]] = {k: [] for k in NoticeKind}
    for r in message.recipients:
        if r.state is RecipientState.FAILED:
            if not r.notified and _wants(r.notify, Notify.FAILURE, True):
                owed[NoticeKind.FAILURE].append(r)
        elif r.state.final:
            if not r.notified and _action(r) is not None and _wants(r.notify, Notify.SUCCESS,
                                                                     False):
                owed[NoticeKind.SUCCESS].append(r)
        elif r.state is RecipientState.DEFERRED:
            requested = None if r.notify is None else Notify.DELAY in r.notify
            if warning.due(requested, message.created_at, now, r.delay_notified):
                owed[NoticeKind.DELAY].append(r)
    return [Notice(kind, tuple(rs)) for kind, rs in owed.items() if rs]


def to_settle(message: QueuedMessage) -> tuple[str, ...]:
    """The final recipients whose DSN is not settled yet (record_notified them once
    the owed DSNs, if any, are enqueued)."""
    return tuple(r.address for r in message.recipients if r.state.final and not r.notified)


def _action(r: QueuedRecipient) -> Action | None:
    if r.state is RecipientState.FAILED:
        return Action.FAILED
    if r.state is RecipientState.RELAYED:
        return Action.RELAYED
    if r.state is RecipientState.DELIVERED:
        # Passed on to a DSN-capable next hop with NOTIFY: success is theirs to report.
        return None if r.remote_dsn else Action.DELIVERED
    return Action.DELAYED


def header_block(data: bytes) -> bytes:
    """The header block at the start of *data*, its final empty line excluded; cut
    at the last line end when *data* holds no complete block."""
    for end, keep in ((b"\r\n\r\n", 2), (b"\n\n", 1)):
        i = data.find(end)
        if i >= 0:
            return data[: i + keep]
    i = data.rfind(b"\n")
    return data[: i + 1] if i >= 0 else data


def read_original(
    message: QueuedMessage,
    body: BinaryIO,
    *,
    max_full: int = MAX_RETURN_FULL,
    max_headers: int = MAX_RETURN_HEADERS,
) -> tuple[bytes, bool]:
    """What a failure DSN returns of *message* (from its stored *body*), and whether
    it is the whole message: only for RET=FULL, up to *max_full* octets, and never a
    BINARYMIME message (it could not travel inside a MIME part)."""
    full = (
        message.ret is Ret.FULL
        and message.size <= max_full
        and message.body_type is not BodyType.BINARY_MIME
    )
    data = body.read(max_full + 1 if full else max_headers)
    if full and len(data) <= max_full:
        return data, True
    return header_block(data[:max_headers]), False


# --- building the report -------------------------------------------------------------


def build_dsn(
    message: QueuedMessage,
    notice: Notice,
    *,
    reporting_mta: str,
    original: bytes,
    full: bool,
    now: float,
    policy: RetryPolicy | None = None,
) -> tuple[QueueEnvelope, bytes]:
    """The DSN for *notice*: the envelope (MAIL FROM:<> to the original sender) and
    the message bytes, ready for :meth:`QueueStore.add`.

    *original* and *full* come from :func:`read_original`; *reporting_mta* is our
    host name (an A-label is used in header fields when it is not ASCII).
    """
    if message.sender is None:
        raise ValueError("no DSN is ever sent to the null reverse-path")
    host = _ascii_host(reporting_mta)
    rcpts = notice.recipients
    utf8 = not message.sender.isascii() or any(_non_ascii(r) for r in rcpts)
    status = _status_part(message, notice, host, now, policy or RetryPolicy(), utf8)
    human = _human_part(message, notice, host, now, policy or RetryPolicy(), full)
    returned = _returned_part(original, full)
    boundary = _boundary(original)
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    eight_bit = not (human + status + returned).isascii() or not message.sender.isascii()
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{message.sender}>",
        f"Subject: {_SUBJECTS[notice.kind]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{message.id}.{notice.kind.value}.{secrets.token_hex(4)}@{host}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: a response to a message
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={report_type};",
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
    ]
    out = bytearray("\r\n".join(headers).encode() + b"\r\n\r\n")
    out += b"This is a MIME-encapsulated message.\r\n"
    for part in (human, status, returned):
        out += b"\r\n--" + boundary.encode() + b"\r\n" + part
    out += b"\r\n--" + boundary.encode() + b"--\r\n"
    envelope = QueueEnvelope(
        sender=None,
        recipients=(QueuedRecipient(message.sender),),
        smtputf8=not message.sender.isascii(),
        body_type=BodyType.EIGHT_BIT_MIME if eight_bit else None,
        received_at=now,
    )
    return envelope, bytes(out)


_SUBJECTS: Final = {
    NoticeKind.FAILURE: "Undelivered Mail Returned to Sender",
    NoticeKind.DELAY: "Delayed Mail (still being retried)",
    NoticeKind.SUCCESS: "Successful Mail Delivery Report",
}


def _human_part(
    message: QueuedMessage,
    notice: Notice,
    host: str,
    now: float,
    policy: RetryPolicy,
    full: bool,
) -> bytes:
    returned = "the message" if full else "its header fields"
    intro = {
        NoticeKind.FAILURE: "Your message could not be delivered to the recipients "
        f"below; the reasons are given beside each. {returned.capitalize()} "
        "follow this report.",
        NoticeKind.DELAY: "Your message has not been delivered yet to the recipients "
        "below. It is still being retried, until "
        f"{_date(policy.expires_at(message.created_at))}; you need not send it again.",
        NoticeKind.SUCCESS: "Your message was delivered to the recipients below, or "
        "handed on to systems that will not report on it further.",
    }[notice.kind]
    lines = [f"This is the mail system at host {host}.", "", *_wrap(intro), ""]
    for r in notice.recipients:
        reason = _reason(r) or "ok"
        lines.append(f"<{r.address}>: {_clean(reason, ascii_only=False)}")
    text = "\r\n".join(lines) + "\r\n"
    cte = "7bit" if text.isascii() else "8bit"
    head = (
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n"
    )
    return (head + text).encode()


def _status_part(
    message: QueuedMessage,
    notice: Notice,
    host: str,
    now: float,
    policy: RetryPolicy,
    utf8: bool,
) -> bytes:
    """The message/(global-)delivery-status body: RFC 3464 2.2 and 2.3 fields."""
    fields = [f"Reporting-MTA: dns; {host}", f"X-Maitred-Queue-ID: {message.id}"]
    if message.envid is not None:  # RFC 3464 2.2.1 (ASCII-only: smtp.params checked)
        fields.append(f"Original-Envelope-Id: {_clean(message.envid, ascii_only=True)}")
    fields.append(f"Arrival-Date: {_date(message.created_at)}")
    blocks = ["\r\n".join(fields)]
    for r in notice.recipients:
        blocks.append("\r\n".join(_recipient_fields(r, notice.kind, message, policy, utf8)))
    kind = "message/global-delivery-status" if utf8 else "message/delivery-status"
    body = "\r\n\r\n".join(blocks) + "\r\n"
    cte = "7bit" if body.isascii() else "8bit"
    head = (
        "Content-Description: Delivery report\r\n"
        f"Content-Type: {kind}\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n"
    )
    return (head + body).encode()


def _recipient_fields(
    r: QueuedRecipient,
    kind: NoticeKind,
    message: QueuedMessage,
    policy: RetryPolicy,
    utf8: bool,
) -> list[str]:
    action = Action.DELAYED if kind is NoticeKind.DELAY else _action(r) or Action.DELIVERED
    fields = []
    if r.orcpt is not None:  # RFC 3464 2.3.1: only when ORCPT was given
        addr_type, address = r.orcpt  # non-ASCII only in a global report (_non_ascii)
        fields.append(f"Original-Recipient: {addr_type}; {_clean(address, ascii_only=False)}")
    addr_type = "rfc822" if r.address.isascii() else "utf-8"  # RFC 6533 3
    fields.append(f"Final-Recipient: {addr_type}; {r.address}")
    fields.append(f"Action: {action.value}")
    fields.append(f"Status: {_status(r, action)}")
    if r.remote_mta:
        fields.append(f"Remote-MTA: dns; {_clean(r.remote_mta, ascii_only=True)}")
    if r.reply is not None:
        fields.append(f"Diagnostic-Code: smtp; {_clean(str(r.reply), ascii_only=not utf8)}")
    elif r.diagnostic:
        fields.append(f"Diagnostic-Code: X-maitred; {_clean(r.diagnostic, ascii_only=not utf8)}")
    if r.last_attempt_at is not None:
        fields.append(f"Last-Attempt-Date: {_date(r.last_attempt_at)}")
    if action is Action.DELAYED:
        fields.append(f"Will-Retry-Until: {_date(policy.expires_at(message.created_at))}")
    return [_fold(f) for f in fields]


_STATUS: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def _status(r: QueuedRecipient, action: Action) -> str:
    """RFC 3464 2.3.4: class 5 for failed (4 when we gave up on a temporary failure,
    as Postfix reports the last deferral), 4 for delayed, 2 for the rest."""
    status = r.status if r.status and _STATUS.fullmatch(r.status) else None
    if action is Action.FAILED:
        return status if status and status[0] in "45" else "5.0.0"
    if action is Action.DELAYED:
        return status if status and status[0] == "4" else "4.0.0"
    return status if status and status[0] == "2" else "2.0.0"


def _returned_part(original: bytes, full: bool) -> bytes:
    data = _LINE_ENDS.sub(b"\r\n", original)
    if not full:
        data = header_block(data)  # whatever the caller read: never more than headers
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    block = header_block(data) if full else data
    utf8_headers = False
    if not block.isascii():
        try:
            block.decode("utf-8")
            utf8_headers = True
        except UnicodeDecodeError:  # a legacy 8-bit charset: not a global message
            pass
    if full:
        kind = "message/global" if utf8_headers else "message/rfc822"
        description = "Undelivered Message"
    else:
        kind = "message/global-headers" if utf8_headers else "text/rfc822-headers"
        description = "Undelivered Message Headers"
    cte = "7bit" if data.isascii() else "8bit"
    head = (
        f"Content-Description: {description}\r\n"
        f"Content-Type: {kind}\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n"
    )
    return head.encode() + data


def _reason(r: QueuedRecipient) -> str | None:
    if r.reply is not None:
        return str(r.reply)
    return r.diagnostic or r.status


def _non_ascii(r: QueuedRecipient) -> bool:
    return not r.address.isascii() or (r.orcpt is not None and not r.orcpt[1].isascii())


def _boundary(original: bytes) -> str:
    while True:
        boundary = f"=_maitred_{secrets.token_hex(12)}"
        if boundary.encode() not in original:
            return boundary


def _date(t: float) -> str:
    """RFC 5322 3.3 date-time in UTC ("+0000")."""
    return format_datetime(datetime.datetime.fromtimestamp(t, datetime.UTC))


def _ascii_host(host: str) -> str:
    if host.isascii():
        return _clean(host, ascii_only=True) or "localhost"
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return "localhost"


def _clean(text: str, *, ascii_only: bool) -> str:
    """A peer's text made safe for one header field value: controls become spaces
    (no CR/LF can end the field), runs of spaces one, non-ASCII '?' if asked."""
    out = []
    for c in text[:_MAX_FIELD]:
        if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0:
            c = " "
        elif ascii_only and not c.isascii():
            c = "?"
        out.append(c)
    return " ".join("".join(out).split())


def _fold(field: str) -> str:
    """Fold a field at spaces so that lines stay near 78 octets (RFC 5322 2.2.3)."""
    if len(field) <= _FOLD_AT:
        return field
    lines: list[str] = []
    current = ""
    for word in field.split(" "):
        if current and len(current) + 1 + len(word) > _FOLD_AT:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n ".join(lines)


def _wrap(text: str) -> list[str]:
    return _fold(text).split("\r\n ")

