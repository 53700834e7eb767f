"""twistd's text log at a fraction of its cost, line for line the same.

``twistd maitred`` writes one log line per message (issue 2).  Twisted's text observer
formats each line in about 50 us, most of it the timestamp: ``formatTime`` builds a
time zone object and two datetimes per event.  At a few thousand messages a second
that was a third of the server's CPU.  ``ClassicText`` is a drop-in for the observer's
``formatEvent`` that gives the same text as ``formatEventAsClassicLogText`` (the
test holds it to it, event by event) and formats the timestamp once per second.

``twistd_observer`` builds the observer twistd itself would build from its options
(``--logfile``, ``-n``, rotation on SIGUSR1), and only puts this formatter in it.  With
``--syslog`` or ``--logger`` it returns None and twistd keeps its own.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.logger import (
    FileLogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

from maitred_tx.server.logevents import SUMMARY_FORMAT

__all__ = ["ClassicText", "twistd_observer"]



class ClassicText:
    """``formatEventAsClassicLogText`` with twistd's time format, the timestamp cached
    for the second it names (a zone's offset changes only on a whole second)."""

    def __init__(self, time_format: str = timeFormatRFC3339) -> None:
        self._time_format = time_format
        self._second: int | None = None
        self._stamp = ""

    def __call__(self, event: LogEvent) -> str | None:
        if "log_failure" in event:  # a traceback: Twisted's own formatting, as it is
            return formatEventAsClassicLogText(event, formatTime=self._format_time)
        text = _text(event)
        if not text:
            return None
        line = f"{self._timestamp(event.get('log_time'))} [{_system(event)}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    def _format_time(self, when: float | None) -> str:
        return formatTime(when, self._time_format)

    def _timestamp(self, when: Any) -> str:
        if type(when) is not float or not when >= 0 or math.isinf(when):
            return formatTime(when, self._time_format)  # None, an int, odd values
        second = int(when)
        if when - second >= 0.999999:  # datetime rounds to the microsecond: maybe up
            return formatTime(when, self._time_format)
        if second != self._second:
            self._stamp = formatTime(when, self._time_format)
            self._second = second
        return self._stamp


def _text(event: LogEvent) -> str:
    """``formatEvent(event)``, calling our own events' text field directly rather than
    through Twisted's format-string machinery (~9 us)."""
    if event.get("log_format") == SUMMARY_FORMAT and "log_flattened" not in event:
        summary = event.get("summary")
        if callable(summary):
            try:
                text = summary()
            except Exception:
                return formatEvent(event)  # reported the way Twisted reports it
            if type(text) is str:
                return text
    return formatEvent(event)


def _system(event: LogEvent) -> str:
    """What ``formatEventAsClassicLogText`` puts in brackets."""
    system = event.get("log_system", None)
    if system is None:
        level = event.get("log_level", None)
        name = "-" if level is None else level.name
        return f"{event.get('log_namespace', '-')}#{name}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def twistd_observer(server_options: Any) -> FileLogObserver | None:
    """The file observer twistd would make from *server_options* (its own, the parent
    of the plugin's), with ``ClassicText`` formatting; None to leave twistd's.

    It is made by twistd's own code (``UnixAppLogger``), so the file, stdout under
    ``-n``, and SIGUSR1 rotation are exactly twistd's.  That code is private to
    twistd: if it moves, this returns None and twistd logs as it always did.
    """
    if server_options is None:
        return None
    try:
        if server_options.get("logger") or server_options.get("syslog"):
            return None
        from twisted.scripts._twistd_unix import UnixAppLogger

        observer = UnixAppLogger(server_options)._getLogObserver()
    except (ImportError, AttributeError, TypeError):
        return None
    if type(observer) is not FileLogObserver:
        return None
    observer.formatEvent = ClassicText()
    return observer
