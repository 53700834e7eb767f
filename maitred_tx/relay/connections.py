"""The relay's idle connections, kept a few seconds for the next message to the same
place (Postfix's connection cache): one TCP and TLS handshake, and one AUTH, serve a
run's messages for a destination."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.defer import Deferred

from maitred_tx.client import SMTPClient

__all__ = ["IDLE_SECONDS", "ConnectionCache", "quit_later"]

# An idle connection is kept this long for the next message to the same place:
# Postfix's smtp_connection_cache_time_limit is 2 s; a queue run that finds several
# messages for one domain sends them one after another well within it.
IDLE_SECONDS: Final = 5.0


@dataclass(slots=True)
class _Idle:
    client: SMTPClient
    timer: Any


class ConnectionCache:
    """Open connections, by (address, port, TLS settings), each kept ``IDLE_SECONDS``
    after its last message for the next one to the same place; at most ``per_key``
    idle connections per key (the runner's per-destination concurrency)."""

    def __init__(self, reactor: Any, idle: float = IDLE_SECONDS, per_key: int = 4) -> None:
        self._reactor = reactor
        self._idle = idle
        self._per_key = per_key
        self._open: dict[tuple[Any, ...], list[_Idle]] = {}

    def take(self, key: tuple[Any, ...]) -> SMTPClient | None:
        idle_ones = self._open.get(key)
        while idle_ones:
            idle = idle_ones.pop()
            if idle.timer.active():
                idle.timer.cancel()
            if idle.client.connected:
                return idle.client
        self._open.pop(key, None)
        return None

    def put(self, key: tuple[Any, ...], client: SMTPClient) -> None:
        if not client.connected:
            return
        idle_ones = self._open.setdefault(key, [])
        if len(idle_ones) >= self._per_key:  # enough kept for this place already
            quit_later(client)
            return
        entry = _Idle(client, None)
        entry.timer = self._reactor.callLater(self._idle, self._expire, key, entry)
        idle_ones.append(entry)

    def _expire(self, key: tuple[Any, ...], entry: _Idle) -> None:
        idle_ones = self._open.get(key, [])
        if entry in idle_ones:
            idle_ones.remove(entry)
            if not idle_ones:
                del self._open[key]
            quit_later(entry.client)

    def close(self) -> None:
        """QUIT every idle connection (at shutdown)."""
        for idle_ones in self._open.values():
            for entry in idle_ones:
                if entry.timer.active():
                    entry.timer.cancel()
                quit_later(entry.client)
        self._open.clear()

    def __len__(self) -> int:
        return sum(len(v) for v in self._open.values())


def quit_later(client: SMTPClient) -> None:
    """QUIT *client* without waiting for it: a connection we are done with, whose
    answer (or failure) changes nothing."""
    Deferred.fromCoroutine(client.quit()).addErrback(lambda f: None)
