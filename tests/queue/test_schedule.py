"""RetryPolicy and DelayWarning: pure, no reactor."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.queue.schedule import DelayWarning, RetryPolicy

T0 = 1_700_000_000.0
DAY = 86400.0


def test_defaults_back_off_from_five_minutes_doubling_to_an_hour() -> None:
    policy = RetryPolicy()
    assert [policy.interval(n) for n in range(1, 8)] == [
        300, 600, 1200, 2400, 3600, 3600, 3600
    ]
    assert policy.give_up_after == 5 * DAY


def test_next_attempt_is_now_plus_interval() -> None:
    policy = RetryPolicy()
    assert policy.next_attempt(1, T0, T0 + 10) == T0 + 10 + 300
    assert policy.next_attempt(3, T0, T0 + 5000) == T0 + 5000 + 1200


def test_gives_up_at_the_deadline_and_pulls_the_last_try_in() -> None:
    policy = RetryPolicy(give_up_after=DAY)
    # 30 minutes before the deadline an hour's wait would overshoot: the last try is
    # at the deadline itself, and a failure then gives up.
    assert policy.next_attempt(20, T0, T0 + DAY - 1800) == T0 + DAY
    assert policy.next_attempt(21, T0, T0 + DAY) is None
    assert policy.next_attempt(1, T0, T0 + DAY + 1) is None
    assert policy.expires_at(T0) == T0 + DAY


def test_give_up_after_zero_never_retries() -> None:
    assert RetryPolicy(give_up_after=0).next_attempt(1, T0, T0) is None


def test_a_huge_attempt_count_does_not_overflow() -> None:
    assert RetryPolicy().interval(100_000) == 3600
    assert RetryPolicy(factor=1).interval(100_000) == 300


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first": 0},
        {"first": -1},
        {"first": math.nan},
        {"factor": 0.5},
        {"factor": math.inf},
        {"max_interval": 10, "first": 20},
        {"give_up_after": -1},
        {"give_up_after": math.inf},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_interval_needs_a_failed_attempt() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().interval(0)


@given(
    attempts=st.integers(1, 10_000),
    first=st.floats(1, 1000),
    factor=st.floats(1, 10),
    elapsed=st.floats(0, 10 * DAY),
)
def test_next_attempt_is_never_early_late_or_after_giving_up(
    attempts: int, first: float, factor: float, elapsed: float
) -> None:
    policy = RetryPolicy(first=first, factor=factor, max_interval=max(first, 3600))
    now = T0 + elapsed
    nxt = policy.next_attempt(attempts, T0, now)
    if elapsed >= policy.give_up_after:
        assert nxt is None
    else:
        assert nxt is not None
        assert now < nxt <= min(now + policy.max_interval, policy.expires_at(T0))


def test_intervals_never_decrease() -> None:
    policy = RetryPolicy(first=7, factor=1.7, max_interval=5000)
    intervals = [policy.interval(n) for n in range(1, 60)]
    assert intervals == sorted(intervals)
    assert intervals[-1] == 5000


# --- delay warnings ---------------------------------------------------------------


def test_delay_warning_only_when_asked_by_default() -> None:
    warning = DelayWarning()
    late = T0 + 4 * 3600
    assert warning.due(True, T0, late, already_sent=False)
    assert not warning.due(True, T0, late - 1, already_sent=False)
    assert not warning.due(True, T0, late, already_sent=True)  # once only
    assert not warning.due(False, T0, late + DAY, already_sent=False)  # NOTIFY w/o DELAY
    assert not warning.due(None, T0, late + DAY, already_sent=False)  # no NOTIFY: off


def test_delay_warning_without_notify_when_configured() -> None:
    warning = DelayWarning(after=3600, when_notify_absent=True)
    assert warning.due(None, T0, T0 + 3600, already_sent=False)
    assert not warning.due(False, T0, T0 + 3600, already_sent=False)


def test_delay_warnings_off() -> None:
    assert not DelayWarning(after=None).due(True, T0, T0 + 10 * DAY, already_sent=False)
    with pytest.raises(ValueError):
        DelayWarning(after=0)
