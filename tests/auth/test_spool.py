"""The checks' spool: memory up to SPOOL_MEMORY, then a temporary file; read by offset."""

from __future__ import annotations

import os

from maitred_tx.auth.checks import SPOOL_MEMORY, Spool


def test_small_message_stays_in_memory_and_reads_by_offset() -> None:
    spool = Spool()
    for piece in (b"Subject: x\r\n", b"\r\n", b"body\r\n"):
        spool.write(piece)
    assert spool.in_memory and spool.size == 20
    assert spool.read() == b"Subject: x\r\n\r\nbody\r\n"
    assert spool.read(0, 12) == b"Subject: x\r\n"
    assert spool.read(14) == b"body\r\n"
    assert spool.read(14, 2) == b"bo" and spool.read(20) == b""
    spool.close()


def test_large_message_moves_to_a_file_with_nothing_lost(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    piece = os.urandom(64 * 1024)
    count = SPOOL_MEMORY // len(piece) + 3
    for _ in range(count):
        spool.write(piece)
    assert not spool.in_memory and spool.size == count * len(piece)
    whole = spool.read()
    assert whole == piece * count
    assert spool.read(len(piece) - 5, 10) == piece[-5:] + piece[:5]
    assert os.listdir(tmp_path) == []  # anonymous: nothing left behind, even now
    spool.close()


def test_empty_spool() -> None:
    spool = Spool()
    assert spool.read() == b"" and spool.read(0, 10) == b"" and spool.size == 0
    spool.close()
