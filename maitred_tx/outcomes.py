"""What a delivery answers for a recipient or a message: accepted, or a failure the
sender should retry (4xx) or give up on (5xx).  The server turns each into the reply
with its enhanced status code; a delivery never writes reply lines itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from maitred_tx.smtp.replies import Reply

__all__ = ["Accepted", "Outcome", "PermanentFailure", "TemporaryFailure", "to_reply"]


@dataclass(frozen=True, slots=True)
class Accepted:
    """Yes.  *text* replaces the default reply text (the codes stay)."""

    text: str | None = None


@dataclass(frozen=True, slots=True)
class TemporaryFailure:
    """Not now: the sender keeps the message and retries (RFC 5321 4.2.1, 4xx).

    421 is not allowed here: it closes the connection, which is the server's call.
    """

    text: str = "Temporary failure, try again later"
    code: int = 451
    status: str = "4.3.0"

    def __post_init__(self) -> None:
        _check(self.code, self.status, 450, 459, "4")


@dataclass(frozen=True, slots=True)
class PermanentFailure:
    """No: the sender bounces the message (5xx).  The default is a policy refusal."""

    text: str = "Rejected"
    code: int = 550
    status: str = "5.7.1"

    def __post_init__(self) -> None:
        _check(self.code, self.status, 550, 559, "5")


Outcome = Accepted | TemporaryFailure | PermanentFailure


def _check(code: int, status: str, low: int, high: int, cls: str) -> None:
    if not low <= code <= high:
        raise ValueError(f"reply code {code} is not in {low}..{high}")
    parts = status.split(".")
    if len(parts) != 3 or parts[0] != cls or not all(p.isdigit() for p in parts):
        raise ValueError(f"enhanced status {status!r} must look like {cls}.X.Y")


def to_reply(outcome: Outcome, accepted: Reply) -> Reply:
    """The reply for *outcome*; *accepted* is the positive reply used for Accepted."""
    if isinstance(outcome, Accepted):
        return accepted if outcome.text is None else _with_text(accepted, outcome.text)
    return Reply(outcome.code, outcome.status, (outcome.text,))


# A delivery usually answers every message with the same text: build that reply once.
@functools.lru_cache(maxsize=256)
def _with_text(accepted: Reply, text: str) -> Reply:
    return accepted.with_text(text)
