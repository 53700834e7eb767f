"""Per-client-address limits: simultaneous sessions, and sessions and messages per
minute.  Keyed by the real client address (after PROXY / XCLIENT)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["ClientLimiter"]

_WINDOW = 60.0


class ClientLimiter:
    """Counts per address; every count is bounded, and idle addresses are forgotten."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        max_connections: int = 0,
        max_connection_rate: int = 0,
        max_message_rate: int = 0,
    ) -> None:
        self._clock = clock
        self._max_connections = max_connections
        self._max_connection_rate = max_connection_rate
        self._max_message_rate = max_message_rate
        self._open: dict[str, int] = {}
        self._connections: dict[str, deque[float]] = {}
        self._messages: dict[str, deque[float]] = {}

    def connection_allowed(self, address: str) -> bool:
        """Record a new session from *address*; False if it is over a limit (the caller
        answers 421 4.7.0 and closes, and must still call ``connection_closed``)."""
        return self.admit(address) is None

    def admit(self, address: str) -> str | None:
        """Like ``connection_allowed``, but says which limit refused the session:
        None (admitted), "connections" (too many at once) or "rate" (too many new ones
        this minute), so that the 421 can say which."""
        self._open[address] = self._open.get(address, 0) + 1
        if self._max_connections and self._open[address] > self._max_connections:
            return "connections"
        if not self._within_rate(self._connections, address, self._max_connection_rate):
            return "rate"
        return None

    def connection_closed(self, address: str) -> None:
        left = self._open.get(address, 0) - 1
        if left > 0:
            self._open[address] = left
        else:
            self._open.pop(address, None)

    def message_allowed(self, address: str) -> bool:
        """Record a MAIL from *address*; False if it is over the message rate."""
        return self._within_rate(self._messages, address, self._max_message_rate)

    def _within_rate(self, table: dict[str, deque[float]], address: str, limit: int) -> bool:
        if not limit:
            return True
        now = self._clock()
        times = table.setdefault(address, deque())
        while times and times[0] <= now - _WINDOW:
            times.popleft()
        if not times and len(table) > 100_000:  # forget idle addresses
            for key in [k for k, v in table.items() if not v]:
                del table[key]
            table[address] = times
        if len(times) >= limit:
            return False
        times.append(now)
        return True
