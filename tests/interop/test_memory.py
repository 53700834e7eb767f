"""An endless line must not grow the server: 50 MB without a newline, in command mode
and inside a DATA body, against a ``twistd -n maitred`` process whose resident memory
(/proc/PID/status) is watched while the bytes flow."""

from __future__ import annotations

import sys

import pytest
from maitred_interop import Client

TOTAL = 50 * 1024 * 1024
CHUNK = 64 * 1024
MAX_GROWTH_KB = 20 * 1024

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/PID/status (Linux only)"
)


def flood(c: Client, server) -> int:
    """Send TOTAL octets of 'x' (never a CR or LF); the largest RSS seen, in kB."""
    block = b"x" * CHUNK
    peak = 0
    for i in range(TOTAL // CHUNK):  # bounded: 800 sends of 64 KiB
        c.send(block)
        if i % 16 == 0:  # every MiB
            peak = max(peak, server.status("VmRSS"))
    return max(peak, server.status("VmRSS"))


def warm_up(c: Client) -> None:
    """One whole transaction first, so that lazily imported code is already resident."""
    c.greet()
    c.send(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n")
    assert [r.code for r in c.replies(3)] == [250, 250, 354]
    assert c.command(b"Subject: warm\r\n\r\nup\r\n.").code == 250


@pytest.mark.parametrize("where", ["command", "data"])
def test_endless_line_keeps_memory_bounded(twistd, where):
    with (
        twistd("--delivery", "discard", "--hostname", "mx.test") as server,
        Client(server.port, timeout=30) as c,
    ):
        warm_up(c)
        before = server.status("VmRSS")
        if where == "command":
            c.send(b"NOOP ")
            peak = flood(c, server)
            c.send(b"\r\nNOOP\r\n")
            first, second = c.replies(2)
            assert (first.code, first.status) == (500, "5.5.2")  # line too long, once
            assert second.code == 250  # and the session goes on
        else:
            c.send(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n")
            assert [r.code for r in c.replies(3)] == [250, 250, 354]
            c.send(b"Subject: endless\r\n\r\n")
            peak = flood(c, server)
            reply = c.command(b"\r\n.")
            assert (reply.code, reply.status) == (554, "5.6.0")  # the first limit broken
            assert c.command("NOOP").code == 250
        peak = max(peak, server.status("VmHWM"))
        growth = peak - before
        assert growth < MAX_GROWTH_KB, f"RSS grew by {growth} kB ({before} -> {peak})"
