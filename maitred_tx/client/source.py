"""Where a message body comes from: bytes, a binary file, an ``email.message.Message``,
or an (async) iterable of bytes, read in chunks of bounded size.

The reader keeps one chunk of look-ahead so that it can tell the last chunk apart
(``BDAT n LAST`` goes with the last data, RFC 3030 2) and never holds more than two
chunks of a stream: a 50 MB file costs what 128 KiB cost.
"""

from __future__ import annotations

import email.message
import email.policy
import io
import os
import stat
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, Protocol

__all__ = ["DEFAULT_CHUNK", "Body", "BodySource"]

# 64 KiB: Twisted's transport buffer and a TCP window's order of size; Exim's
# BDAT chunks are of this order too.  Bounds what one chunk holds in memory.
DEFAULT_CHUNK = 64 * 1024


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


Body = (
    bytes | bytearray | memoryview | email.message.Message | _Readable
    | Iterable[bytes] | AsyncIterable[bytes]
)


class BodySource:
    """A body, as chunks of at most *chunk_size* octets and a last-chunk flag."""

    def __init__(self, body: Any, chunk_size: int = DEFAULT_CHUNK, *, smtputf8: bool = False):
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.chunk_size = chunk_size
        self.whole: bytes | None = None  # the body, when it is in memory anyway
        self.size: int | None = None  # its size in octets, when known before reading
        self._ahead: bytes | None = None
        self._pieces: Iterator[bytes] | None = None
        self._apieces: AsyncIterator[bytes] | None = None
        self._file: _Readable | None = None
        self._buffer = bytearray()
        self._offset = 0
        if isinstance(body, email.message.Message):
            # RFC 5322 wants CRLF line ends: the SMTP policies write them.
            policy = email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP
            body = body.as_bytes(policy=policy)
        if isinstance(body, str):
            raise TypeError("the body must be bytes (encode the message, e.g. with "
                            "as_bytes(policy=email.policy.SMTP))")
        if isinstance(body, bytes | bytearray | memoryview):
            self.whole = bytes(body)
            self.size = len(self.whole)
        elif hasattr(body, "read"):
            self._file = body
            self.size = _remaining_size(body)
        elif hasattr(body, "__aiter__"):
            self._apieces = aiter(body)
        elif hasattr(body, "__iter__"):
            self._pieces = iter(body)
        else:
            raise TypeError(f"cannot send a body of type {type(body).__name__}")

    async def next(self) -> tuple[bytes, bool]:
        """The next chunk and whether it is the last (an empty body: ``(b"", True)``)."""
        current = self._ahead if self._ahead is not None else await self._read()
        self._ahead = await self._read() if current else b""
        return current, not self._ahead

    async def _read(self) -> bytes:
        """Up to chunk_size octets, b"" at the end."""
        size = self.chunk_size
        if self.whole is not None:
            start = self._offset
            self._offset = min(start + size, len(self.whole))
            return self.whole[start : self._offset]
        if self._file is not None:
            data = self._file.read(size)
            if not isinstance(data, bytes | bytearray):
                raise TypeError("the body file must be opened in binary mode")
            return bytes(data)
        return await self._gather(size)

    async def _gather(self, size: int) -> bytes:
        """From an iterable: join small pieces, split big ones, into chunks."""
        buffer = self._buffer
        while len(buffer) < size:
            piece = await self._piece()
            if piece is None:
                break
            if not isinstance(piece, bytes | bytearray | memoryview):
                raise TypeError(f"the body yielded {type(piece).__name__}, not bytes")
            buffer += piece
        chunk = bytes(buffer[:size])
        del buffer[:size]
        return chunk

    async def _piece(self) -> bytes | None:
        if self._apieces is not None:
            try:
                return await self._apieces.__anext__()
            except StopAsyncIteration:
                return None
        assert self._pieces is not None
        return next(self._pieces, None)


def _remaining_size(file: Any) -> int | None:
    """The octets left in a regular file from its position, or None if unknown."""
    try:
        status = os.fstat(file.fileno())
        if stat.S_ISREG(status.st_mode):  # a pipe's st_size says nothing
            return max(status.st_size - file.tell(), 0)
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    if isinstance(file, io.BytesIO):
        return len(file.getbuffer()) - file.tell()
    return None
