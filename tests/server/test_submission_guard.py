"""FromGuard: the From: ownership check of authenticated submission."""

from __future__ import annotations

from typing import Any

import pytest

from maitred_tx.outcomes import Accepted
from maitred_tx.server.submission import NOT_OWNED, FromGuard
from maitred_tx.testing import pieces


class Sink:
    def __init__(self) -> None:
        self.envelope: Any = None
        self.data = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> Accepted:
        return Accepted()

    def abort(self) -> None:
        self.aborted = True


ALLOWED = frozenset({"alice@example.com"})


def guard(message: bytes, mode: str, max_header: int = 1000) -> tuple[Any, Sink]:
    sink = Sink()
    g = FromGuard(sink, ALLOWED, max_header)
    for piece in pieces(message, mode):
        g.write(piece)
    return g.close(), sink


@pytest.mark.parametrize("mode", ["whole", "lines", "bytes"])
def test_own_address_passes_the_body_through_unchanged(mode: str) -> None:
    message = b"Subject: x\r\nFrom: Alice <ALICE@example.com>\r\n\r\nFrom: mallory@evil\r\n"
    outcome, sink = guard(message, mode)
    assert outcome == Accepted() and sink.data == message and not sink.aborted


@pytest.mark.parametrize("mode", ["whole", "bytes"])
@pytest.mark.parametrize("from_", [
    b"From: mallory@evil.example\r\n",
    b"From: alice@example.com\r\nFrom: mallory@evil.example\r\n",
    # Two parsers read this field differently; every address either sees must be ours.
    b"From: alice@example.com <mallory@evil.example>\r\n",
    b"From: alice@example.com,\r\n mallory@evil.example\r\n",
    b"Subject: no author at all\r\n",
])
def test_foreign_or_missing_author_is_refused(mode: str, from_: bytes) -> None:
    outcome, sink = guard(from_ + b"\r\nbody\r\n", mode)
    assert outcome == NOT_OWNED and (outcome.code, outcome.status) == (550, "5.7.1")
    assert sink.aborted


def test_header_beyond_the_bound_is_not_read() -> None:
    # The From: field after max_header octets is never seen: refused, memory bounded.
    message = b"X-Pad: " + b"p" * 2000 + b"\r\nFrom: alice@example.com\r\n\r\nb\r\n"
    outcome, _ = guard(message, "lines", max_header=1000)
    assert outcome == NOT_OWNED
