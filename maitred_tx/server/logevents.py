"""The protocol's log events: one per message and one per session, and how they are
emitted cheaply.

Every event of the protocol's parts is logged under one namespace,
``maitred_tx.server.protocol``, whichever module it is written in: that is the name
operators filter on.  The per-message and per-session events carry their text as one
field, ``summary``, built only when an observer formats the event (``SUMMARY_FORMAT``;
``maitred_tx.textlog`` calls it directly).
"""

from __future__ import annotations

import time

from twisted.logger import Logger, LogLevel

__all__ = ["SUMMARY_FORMAT", "emit_info", "log", "message_summary", "session_summary"]

log = Logger(namespace="maitred_tx.server.protocol")
# The log_format of the per-message and end-of-session events.
SUMMARY_FORMAT = "{summary()}"


def message_summary(
    peer: str, message_id: str, sender: str, recipients: list[str], code: int, status: object,
    auth: str | None = None,
) -> str:
    """The text of the per-message log event; the checks' verdicts last, when made."""
    text = f"{peer} message {message_id} from <{sender}> to {recipients}: {code} {status}"
    return text if auth is None else f"{text} ({auth})"


def session_summary(peer: str, session_id: str, duration: float, messages: int,
                    errors: int) -> str:
    """The text of the end-of-session log event."""
    return (f"{peer} session {session_id} ended after {duration:.3f}s: "
            f"{messages} messages, {errors} errors")


def emit_info(event: dict[str, object]) -> None:
    """``log.info(SUMMARY_FORMAT, **event)`` for the per-message and per-session events:
    the same event, without Logger.emit's check of the level (constantly sorts every
    level on each call) and its keyword arguments (a dict built twice): a few
    microseconds per message.  The keys added are those Logger.emit adds."""
    event["log_logger"] = log
    event["log_level"] = LogLevel.info
    event["log_namespace"] = log.namespace
    event["log_source"] = log.source
    event["log_format"] = SUMMARY_FORMAT
    event["log_time"] = time.time()
    log.observer(event)
