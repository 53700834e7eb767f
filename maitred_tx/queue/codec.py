"""The on-disk form of a :class:`~maitred_tx.queue.store.QueuedMessage`: JSON.

Pure (stdlib only).  JSON because an operator can read it with any tool, it is as
fast to parse as anything else the stdlib has for a file this small (~0.5 KiB), and
every value here is a string, number, boolean or list.  Version 1; a file with
another version, or anything that does not fit the model, is a :class:`CodecError`
(the spool quarantines it rather than guessing).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

from maitred_tx.queue.store import (
    AttemptResult,
    QueuedMessage,
    QueuedRecipient,
    QueueReply,
    RecipientState,
)
from maitred_tx.smtp.params import BodyType, Notify, Ret

__all__ = ["VERSION", "CodecError", "Summary", "decode", "decode_attempt", "encode",
           "encode_attempt", "summary"]

VERSION: Final = 1


class CodecError(ValueError):
    """The bytes are not a version-1 queue envelope."""


def encode(message: QueuedMessage) -> bytes:
    """Compact UTF-8 JSON, newline-terminated."""
    data = {
        "v": VERSION,
        "id": message.id,
        "sender": message.sender,
        "created_at": message.created_at,
        "size": message.size,
        "envid": message.envid,
        "ret": None if message.ret is None else message.ret.value,
        "smtputf8": message.smtputf8,
        "body": None if message.body_type is None else message.body_type.value,
        "transaction_id": message.transaction_id,
        "held": message.held,
        "recipients": [_encode_recipient(r) for r in message.recipients],
    }
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _encode_recipient(r: QueuedRecipient) -> dict[str, Any]:
    return {
        "address": r.address,
        "orcpt": None if r.orcpt is None else list(r.orcpt),
        "notify": None if r.notify is None else sorted(n.value for n in r.notify),
        "state": r.state.value,
        "attempts": r.attempts,
        "next_attempt_at": r.next_attempt_at,
        "last_attempt_at": r.last_attempt_at,
        "status": r.status,
        "reply": None if r.reply is None else [r.reply.code, r.reply.status, r.reply.text],
        "diagnostic": r.diagnostic,
        "remote_mta": r.remote_mta,
        "remote_dsn": r.remote_dsn,
        "notified": r.notified,
        "delay_notified": r.delay_notified,
    }


def decode(raw: bytes) -> QueuedMessage:
    """Parse what :func:`encode` wrote; anything else raises CodecError."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("v") != VERSION:
        raise CodecError("not a version-1 queue envelope")
    try:
        recipients = tuple(_decode_recipient(r) for r in _list(data["recipients"]))
        if not recipients:
            raise CodecError("no recipients")
        return QueuedMessage(
            id=_str(data["id"]),
            sender=_opt_str(data["sender"]),
            recipients=recipients,
            created_at=_time(data["created_at"]),
            size=_int(data["size"]),
            envid=_opt_str(data["envid"]),
            ret=None if data["ret"] is None else Ret(data["ret"]),
            smtputf8=_bool(data["smtputf8"]),
            body_type=None if data["body"] is None else BodyType(data["body"]),
            transaction_id=_opt_str(data["transaction_id"]),
            held=_bool(data["held"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CodecError):
            raise
        raise CodecError(f"bad field: {e!r}") from None


@dataclass(frozen=True, slots=True)
class Summary:
    """What the spool's index needs of an envelope: read at start for every message,
    so it skips building the dataclasses (half the cost of :func:`decode`)."""

    id: str
    size: int
    held: bool
    next_attempt_at: float | None  # QueuedMessage.next_attempt_at: None when done


_FINAL_STATES: Final = frozenset(s.value for s in RecipientState if s.final)
_STATES: Final = frozenset(s.value for s in RecipientState)


def summary(raw: bytes) -> Summary:
    """The index fields of an envelope, with the checks they need; the rest of the
    file is checked when the message is loaded."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("v") != VERSION:
        raise CodecError("not a version-1 queue envelope")
    try:
        due_now = False
        times: list[float] = []
        recipients = _list(data["recipients"])
        for r in recipients:
            state = r["state"]
            if state not in _STATES:
                raise ValueError(f"unknown state {state!r}")
            if state in _FINAL_STATES:
                due_now = due_now or not _bool(r["notified"])
            else:
                at = _opt_time(r["next_attempt_at"])
                times.append(0.0 if at is None else at)
        if not recipients:
            raise ValueError("no recipients")
        next_at = 0.0 if due_now else min(times, default=None)
        return Summary(_str(data["id"]), _int(data["size"]), _bool(data["held"]), next_at)
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"bad field: {e!r}") from None


def _decode_recipient(r: Any) -> QueuedRecipient:
    if not isinstance(r, dict):
        raise TypeError("recipient is not an object")
    orcpt = r["orcpt"]
    notify = r["notify"]
    reply = r["reply"]
    if orcpt is not None:
        kind, address = _list(orcpt)
        orcpt = (_str(kind), _str(address))
    if reply is not None:
        code, status, text = _list(reply)
        reply = QueueReply(_int(code), _opt_str(status), _str(text))
    return QueuedRecipient(
        address=_str(r["address"]),
        orcpt=orcpt,
        notify=None if notify is None else frozenset(Notify(n) for n in _list(notify)),
        state=RecipientState(r["state"]),
        attempts=_int(r["attempts"]),
        next_attempt_at=_opt_time(r["next_attempt_at"]),
        last_attempt_at=_opt_time(r["last_attempt_at"]),
        status=_opt_str(r["status"]),
        reply=reply,
        diagnostic=_opt_str(r["diagnostic"]),
        remote_mta=_opt_str(r["remote_mta"]),
        remote_dsn=_bool(r["remote_dsn"]),
        notified=_bool(r["notified"]),
        delay_notified=_bool(r["delay_notified"]),
    )


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, not {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, not {type(value).__name__}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, not {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a natural number, not {value!r}")
    return value


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"expected a time, not {value!r}")
    return float(value)


def _opt_time(value: Any) -> float | None:
    return None if value is None else _time(value)


def encode_attempt(message_id: str, now: float, results: tuple[AttemptResult, ...]) -> bytes:
    """One line of the spool's attempt journal: what an attempt gave, as JSON."""
    data = [message_id, now, [
        [r.address, r.state.value,
         None if r.reply is None else [r.reply.code, r.reply.status, r.reply.text],
         r.status, r.diagnostic, r.remote_mta, r.remote_dsn]
        for r in results]]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def decode_attempt(line: bytes) -> tuple[str, float, tuple[AttemptResult, ...]]:
    """A journal line back; CodecError for anything else (a line cut by a crash)."""
    try:
        message_id, now, raw = json.loads(line)
        results = []
        for address, state, reply, status, diagnostic, remote_mta, remote_dsn in _list(raw):
            results.append(AttemptResult(
                _str(address), RecipientState(state),
                None if reply is None else QueueReply(_int(reply[0]), _opt_str(reply[1]),
                                                      _str(reply[2])),
                _opt_str(status), _opt_str(diagnostic), _opt_str(remote_mta),
                _bool(remote_dsn)))
        return _str(message_id), _time(now), tuple(results)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise CodecError(f"bad journal line: {e}") from None
