"""File-level pieces of the spool: message ids, the streaming writer, small helpers.

Stdlib only.  The writer is the :class:`~maitred_tx.queue.store.MessageWriter` of
:class:`~maitred_tx.queue.spool.SpoolStore`: it appends to a buffered file in
``tmp/`` and hands itself to the store's commit function at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import IO, Final

from maitred_tx.queue.store import QueuedMessage, QueueEnvelope

__all__ = [
    "SpoolWriter",
    "check_id",
    "counter",
    "fsync_dir",
    "listdir",
    "move",
    "new_id",
    "valid_id",
    "write_all",
]

# An id is a single safe file name: no "/", no leading ".", bounded.  Ours look like
# "1700000000.M123456P4242Q17Rab12cd" (time, microseconds, pid, counter, random: the
# Maildir recipe, unique across restarts and processes without coordination).
_ID: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")
counter = itertools.count(1)  # unique within this process


def valid_id(message_id: str) -> bool:
    """True if *message_id* could name a message (a safe single file name)."""
    return bool(_ID.fullmatch(message_id)) and not message_id.endswith(".json")


def check_id(message_id: str) -> None:
    if not valid_id(message_id):
        raise ValueError(f"not a queue id: {message_id!r}")


def new_id() -> str:
    """Time, microseconds, pid, counter and 24 random bits: unique without a lock
    file, across restarts (time), processes (pid) and a reused pid (random)."""
    now = time.time()
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micro:06d}P{os.getpid()}Q{next(counter)}R{secrets.token_hex(3)}"


class SpoolWriter:
    """A message being streamed into tmp/ (see MessageWriter)."""

    def __init__(
        self,
        commit: Callable[[SpoolWriter, QueueEnvelope], QueuedMessage],
        message_id: str,
        path: str,
        file: IO[bytes],
    ) -> None:
        self._commit = commit
        self.message_id = message_id
        self.path = path
        self.file = file
        self._state = "open"  # -> "committed" | "aborted"
        self._error: OSError | None = None

    def write(self, data: bytes) -> None:
        if self._state != "open" or self._error is not None:
            return
        try:
            self.file.write(data)
        except OSError as e:  # e.g. ENOSPC: remembered, raised by commit()
            self._error = e

    def commit(self, envelope: QueueEnvelope) -> QueuedMessage:
        if self._state != "open":
            raise RuntimeError(f"commit() on a writer that is {self._state}")
        if self._error is not None:
            self.abort()
            raise self._error
        self._state = "committed"
        try:
            return self._commit(self, envelope)
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        if self._state == "open":
            self._state = "aborted"
            self._discard()

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def move(path: str, directory: str) -> None:
    """Rename *path* into *directory*, never over an existing file."""
    base = os.path.basename(path)
    for n in itertools.count():
        target = os.path.join(directory, base if n == 0 else f"{base}.{n}")
        if not os.path.exists(target):
            os.rename(path, target)
            return


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: str) -> None:
    """fsync a directory: makes the renames and unlinks in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
