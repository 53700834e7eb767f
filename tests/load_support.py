"""Submitting clients for the kill -9 tests (tests/queue/test_crash.py,
tests/relay/test_relay_crash.py): smtplib threads that send numbered messages until
told to stop or until the server is gone, and a ledger of what got its 250."""

from __future__ import annotations

import contextlib
import itertools
import smtplib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Ledger:
    """What the clients know: which messages got their 250, and how many were cut off
    in flight (the server died during their transaction)."""

    acked: set[int] = field(default_factory=set)
    cut_off: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


def submit(
    port: int, ledger: Ledger, stop: threading.Event, first: threading.Event, *,
    message: Callable[[int], bytes], recipients: Callable[[int], Sequence[str]],
    limit: int, sender: str = "load@origin.test",
) -> None:
    """Send messages numbered from *ledger* over one connection, at most *limit*, until
    *stop* is set or the server goes away; *first* is set after the first 250."""
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=20)
        client.ehlo("load.test")
    except OSError:
        return
    try:
        for _ in range(limit):
            if stop.is_set():
                return
            with ledger.lock:
                seq = next(ledger.numbers)
            try:
                client.sendmail(sender, list(recipients(seq)), message(seq))
            except (smtplib.SMTPException, OSError):
                with ledger.lock:
                    ledger.cut_off += 1
                return  # the server is gone
            with ledger.lock:
                ledger.acked.add(seq)
            first.set()
    finally:
        with contextlib.suppress(OSError):
            client.close()
