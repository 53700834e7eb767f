"""When to try a queued message again, when to give up, when to warn of a delay.

Pure: stdlib only, no clock (every function is given ``now``), no I/O.

- :class:`RetryPolicy`: exponential back-off between attempts, capped, and a give-up
  time measured from the message's arrival (RFC 5321 4.5.4.1: retry at least 30
  minutes apart, give up after at least 4-5 days).
- :class:`DelayWarning`: when a "delayed" DSN (RFC 3464 2.3.3, RFC 3461 4.1) is sent,
  at most once per recipient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DelayWarning", "RetryPolicy"]


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Back-off: *first* seconds after the first failed attempt, times *factor* after
    each further one, never more than *max_interval*; give up *give_up_after* seconds
    after arrival.

    The defaults (5 min doubling to 1 h, 5 days) are the issue's and sit between
    Postfix (minimal_backoff_time 300 s, maximal_backoff_time 4000 s,
    maximal_queue_lifetime 5 d) and RFC 5321 4.5.4.1 (30 min between tries "in
    general", give up after 4-5 days).  The first retry sooner than 30 minutes is
    Postfix's choice too: most temporary failures (greylisting, a busy server) clear
    within minutes, and the cap keeps a dead host from being hammered.
    """

    first: float = 300.0
    factor: float = 2.0
    max_interval: float = 3600.0
    give_up_after: float = 5 * 86400.0

    def __post_init__(self) -> None:
        _check_positive("first", self.first)
        _check_positive("max_interval", self.max_interval)
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"factor must be at least 1, not {self.factor!r}")
        if self.max_interval < self.first:
            raise ValueError("max_interval must be at least first")
        if not (math.isfinite(self.give_up_after) and self.give_up_after >= 0):
            raise ValueError("give_up_after must be a finite number of seconds >= 0")

    def interval(self, attempts: int) -> float:
        """The wait after the *attempts*-th failed attempt (attempts >= 1)."""
        if attempts < 1:
            raise ValueError("attempts counts the failed attempts so far: at least 1")
        # Compare exponents rather than computing factor ** n: no overflow for a
        # message retried thousands of times.
        if self.factor == 1 or (attempts - 1) * math.log(self.factor) < math.log(
            self.max_interval / self.first
        ):
            return min(self.first * self.factor ** (attempts - 1), self.max_interval)
        return self.max_interval

    def expires_at(self, created_at: float) -> float:
        """When the retry period of a message that arrived at *created_at* ends (the
        DSN's Will-Retry-Until, RFC 3464 2.3.9)."""
        return created_at + self.give_up_after

    def next_attempt(self, attempts: int, created_at: float, now: float) -> float | None:
        """When to try again after the *attempts*-th attempt failed at *now*; None:
        give up (the message is older than ``give_up_after``).

        The last retry is pulled in to the give-up time itself, so that a message is
        given up on when it says it will be, not up to ``max_interval`` later.
        """
        deadline = self.expires_at(created_at)
        if now >= deadline:
            return None
        return min(now + self.interval(attempts), deadline)


@dataclass(frozen=True, slots=True)
class DelayWarning:
    """When a recipient still being retried gets its one "delayed" DSN.

    RFC 3461 4.1: NOTIFY=DELAY says the sender is willing to receive "delayed" DSNs,
    sent after a delay the MTA judges unusual; a NOTIFY without DELAY asks for none;
    with no NOTIFY at all the MTA may act as for FAILURE or for FAILURE,DELAY.

    Our choice: a sender who *asked* (NOTIFY includes DELAY) is warned once after
    *after* seconds (default 4 h, the value Postfix users set for
    delay_warning_time); without NOTIFY, no warning unless *when_notify_absent* -
    Postfix's default (delay_warning_time = 0, off), since warnings for mail that is
    then delivered anyway are mostly noise, and backscatter when the sender was
    forged.  ``after=None`` turns delay warnings off altogether.
    """

    after: float | None = 4 * 3600.0
    when_notify_absent: bool = False

    def __post_init__(self) -> None:
        if self.after is not None:
            _check_positive("after", self.after)

    def due(
        self, requested: bool | None, created_at: float, now: float, already_sent: bool
    ) -> bool:
        """Whether to send the "delayed" DSN now.

        *requested*: True when NOTIFY includes DELAY, False when NOTIFY was given
        without it (or is NEVER), None when NOTIFY was not given.
        """
        if self.after is None or already_sent or requested is False:
            return False
        if requested is None and not self.when_notify_absent:
            return False
        return now - created_at >= self.after
