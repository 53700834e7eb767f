"""maitred_tx.textlog: the same lines as Twisted's text observer, and twistd's own file."""

from __future__ import annotations

import io
from functools import partial
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.application.service import Application
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from maitred_tx import tap
from maitred_tx.server.logevents import SUMMARY_FORMAT
from maitred_tx.server.logevents import message_summary as _message_summary
from maitred_tx.server.logevents import session_summary as _session_summary
from maitred_tx.textlog import ClassicText, twistd_observer


def twisted_text(event: dict[str, Any]) -> str | None:
    """What twistd's observer (textFileLogObserver) writes for *event*."""
    return formatEventAsClassicLogText(
        event, formatTime=lambda when: formatTime(when, timeFormatRFC3339)
    )


def _raises() -> str:
    raise ValueError("no text")


def _failure() -> Failure:
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        return Failure()


def events(when: Any) -> list[dict[str, Any]]:
    base = {"log_time": when, "log_namespace": "maitred_tx.server.protocol",
            "log_level": LogLevel.info}
    return [
        {**base, "log_format": SUMMARY_FORMAT, "summary": partial(
            _message_summary, "127.0.0.1", "ID1", "a@b.example", ["c@d.example"], 250,
            "2.0.0", "spf=pass dkim=none arc=none dmarc=pass")},
        {**base, "log_format": SUMMARY_FORMAT,
         "summary": partial(_session_summary, "::1", "ID2", 0.25, 3, 1)},
        {**base, "log_format": SUMMARY_FORMAT, "summary": _raises},  # unformattable
        {**base, "log_format": SUMMARY_FORMAT, "summary": lambda: 42},  # not a str
        {**base, "log_format": SUMMARY_FORMAT, "summary": "not callable"},
        {**base, "log_format": "{peer} refused: {limit} limit", "peer": "10.0.0.1",
         "limit": "rate"},
        {**base, "log_format": "two\nlines {x}", "x": "and\nthree"},
        {**base, "log_format": "{x}", "x": "{not a field}"},
        {**base, "log_format": ""},  # no text: no line
        {**base, "log_format": None},
        {"log_time": when, "log_format": "no namespace or level"},
        {**base, "log_format": "system given", "log_system": "-"},
        {**base, "log_format": "system given", "log_system": 1234},
        {**base, "log_format": "odd\nsystem", "log_system": "a\nb"},
        {**base, "log_format": "failed {what}", "what": "close()",
         "log_failure": _failure()},
        {**base, "log_level": LogLevel.critical, "log_format": "critical"},
    ]


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.floats(min_value=0, max_value=4_102_444_800),  # up to 2100
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10, 4_102_444_800),
    st.none(),
))
def test_same_text_as_twisteds_observer(when: Any) -> None:
    text = ClassicText()
    for event in events(when):
        try:
            expected = twisted_text(event)
        except Exception as e:  # NaN, infinities, year 10000: Twisted raises, so do we
            with pytest.raises(type(e)):
                text(event)
            continue
        assert text(event) == expected, event


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=1.7e9, max_value=1.7e9 + 5), min_size=2, max_size=30))
@example([1700000004.0, 1700000004.9999998])  # datetime rounds this up to :05
def test_cached_timestamp_follows_the_second(times: list[float]) -> None:
    """One formatter sees many times, as a log does (also out of order, and within
    the same second twice): each line has its own event's second."""
    text = ClassicText()
    for when in times:
        event = {"log_time": when, "log_format": "x", "log_namespace": "n",
                 "log_level": LogLevel.info}
        assert text(event) == twisted_text(event)


def test_no_observer_for_syslog_logger_or_no_options() -> None:
    assert twistd_observer(None) is None
    assert twistd_observer({"syslog": True, "logfile": "", "nodaemon": True}) is None
    assert twistd_observer({"logger": lambda: None, "logfile": "", "nodaemon": True}) is None


def test_twistd_observer_writes_where_twistd_would(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    observer = twistd_observer({"logfile": "", "nodaemon": True, "logger": None})
    assert type(observer) is FileLogObserver
    assert isinstance(observer.formatEvent, ClassicText)
    event = events(1_700_000_000.5)[0]
    observer(event)
    assert out.getvalue() == twisted_text(event)


def _twistd_application(argv: list[str]) -> Application:
    """The application twistd builds for ``twistd ARGV`` (the service not started)."""
    config = ServerOptions()
    config.parseOptions(argv)
    application = Application("maitred")
    tap.makeService(config.subOptions).setServiceParent(application)
    return application


def test_twistd_maitred_gives_the_application_its_observer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stdout", io.StringIO())
    application = _twistd_application(["-n", "--pidfile=", "maitred", "--listen",
                                       "tcp:0:interface=127.0.0.1", "--delivery", "discard"])
    observer = application.getComponent(ILogObserver)
    assert type(observer) is FileLogObserver
    assert isinstance(observer.formatEvent, ClassicText)


def test_twistd_maitred_keeps_an_observer_given_by_logger() -> None:
    application = _twistd_application(
        ["-n", "--pidfile=", "--logger", "twisted.logger.LogPublisher", "maitred",
         "--listen", "tcp:0:interface=127.0.0.1"])
    assert application.getComponent(ILogObserver, None) is None


@pytest.mark.parametrize("fraction", [0.0, 0.4999995, 0.5, 0.999998, 0.9999989, 0.999999,
                                      0.9999994, 0.9999995, 0.9999996, 0.99999999])
def test_timestamp_near_the_next_second(fraction: float) -> None:
    """Around the microsecond datetime rounds to, after a cached earlier time."""
    text = ClassicText()
    for when in (1_700_000_004.25, 1_700_000_004 + fraction, 1_700_000_005 + fraction):
        event = {"log_time": when, "log_format": "x", "log_namespace": "n",
                 "log_level": LogLevel.info}
        assert text(event) == twisted_text(event), when
