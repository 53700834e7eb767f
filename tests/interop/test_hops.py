"""Mail loop protection over real sockets (RFC 5321 6.3, ``--max-hops``): smtplib gets
554 5.4.6 for a message with too many Received: fields and the connection goes on; and
``twistd maitred --delivery queue`` whose smarthost is its own listener - a loop - stops
after the hop limit instead of relaying for ever."""

from __future__ import annotations

import io
import json
import re
import smtplib
import time
from pathlib import Path

import pytest
import pytest_twisted
from maitred_interop import (
    LOCALHOST,
    Client,
    config,
    free_port,
    twistd_maitred,
    wait_for_port,
)
from twisted.internet.threads import deferToThread
from twisted.python import usage

from maitred_tx.queue.cli import main as queue_cli
from maitred_tx.smtp.config import Config, Limits, Mode
from maitred_tx.tap import Options


def message(hops: int, subject: str) -> bytes:
    trace = b"".join(
        b"Received: from h%d.example ([192.0.2.%d])\r\n\tby mx%d.example with ESMTP;\r\n"
        b"\tMon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i, i)
        for i in range(hops)
    )
    return trace + f"From: a@b.org\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_smtplib_gets_554_5_4_6_and_the_connection_goes_on(serve):
    server = serve(config())  # the default limit: 100

    def send() -> tuple[int, bytes, dict[str, object]]:
        with smtplib.SMTP(LOCALHOST, server.port, local_hostname="client.test",
                          timeout=10) as s:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                s.sendmail("a@b.org", ["user@localhost"], message(101, "looping"))
            # smtplib sends RSET after a refused DATA; the same connection goes on.
            accepted = s.sendmail("a@b.org", ["user@localhost"], message(100, "far"))
            return refused.value.smtp_code, refused.value.smtp_error, accepted

    code, text, accepted = await deferToThread(send)
    assert (code, text) == (554, b"5.4.6 Too many hops (101 Received: header fields, limit 100)")
    assert accepted == {}
    [stored] = server.messages
    assert stored.body == message(100, "far")
    assert server.delivery.aborted == 1  # the refused message's sink was aborted


@pytest_twisted.ensureDeferred
async def test_lmtp_refuses_once_per_recipient(serve):
    """RFC 2033 4.2: after the body, one reply per accepted recipient, refusals too."""
    server = serve(Config(hostname="mx.test", mode=Mode.LMTP, limits=Limits(max_hops=3)))
    envelope = b"MAIL FROM:<a@b.org>\r\nRCPT TO:<one@localhost>\r\nRCPT TO:<two@localhost>\r\n"

    def session() -> list[list[tuple[int, str | None]]]:
        with Client(server.port) as c:
            c.greet("LHLO client.test")
            got = []
            for hops in (4, 3):
                c.send(envelope + b"DATA\r\n")
                assert [r.code for r in c.replies(4)] == [250, 250, 250, 354]
                c.send(message(hops, "lmtp") + b".\r\n")
                got.append([(r.code, r.status) for r in c.replies(2)])
            return got

    refused, accepted = await deferToThread(session)
    assert refused == [(554, "5.4.6")] * 2
    assert accepted == [(250, "2.0.0")] * 2
    assert [m.body for m in server.messages] == [message(3, "lmtp")]


@pytest.mark.parametrize(("argv", "limit"), [([], 100), (["--max-hops", "5"], 5),
                                             (["--max-hops", "0"], 0)])
def test_the_option(argv: list[str], limit: int) -> None:
    options = Options()
    options.parseOptions(["--no-auth-checks", *argv])
    assert options.make_config().limits.max_hops == limit


def test_the_option_is_not_negative() -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--max-hops", "-1"])


_MESSAGE_LINE = re.compile(r"message \S+ from <([^>]*)> to \[[^\]]*\]: (\d{3}) (\S+)")


def queued(spool: Path) -> list[object]:
    out = io.StringIO()
    assert queue_cli(["--spool", str(spool), "list", "--json"], out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_queue_relaying_to_itself_stops_at_the_hop_limit(tmp_path: Path) -> None:
    """A smarthost that is ourselves: each pass adds our Received: field, the pass that
    brings more than --max-hops is refused (554 5.4.6), the sender gets a bounce; the
    bounce loops the same way, is refused in turn and, being a bounce, is dropped.  The
    queue empties and nothing moves afterwards."""
    hops = 5
    loop_port = free_port()
    spool = tmp_path / "spool"
    args = [
        "--hostname", "loop.test", "--domain", "example.org", "--no-auth-checks",
        "--no-mta-sts", "--delivery", "queue", "--spool", str(spool),
        "--listen", f"tcp:{loop_port}:interface={LOCALHOST}",
        "--relay-host", f"[{LOCALHOST}]:{loop_port}", "--max-hops", str(hops),
    ]
    with twistd_maitred(tmp_path, args) as server:
        wait_for_port(loop_port, server.process)
        with smtplib.SMTP(LOCALHOST, server.port, local_hostname="client.test",
                          timeout=10) as s:
            assert s.sendmail("alice@example.org", ["bob@example.org"],
                              message(0, "loop")) == {}

        def outcomes() -> list[tuple[str, str, str]]:
            return _MESSAGE_LINE.findall(server.log_text())

        deadline = time.monotonic() + 60
        while len([o for o in outcomes() if o[1] == "554"]) < 2 or queued(spool):
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.1)
        settled = outcomes()
        time.sleep(1.0)  # no more passes: the loop has stopped
        assert outcomes() == settled
        log = server.log_text()
    # The message: taken from smtplib, then relayed to ourselves with 1..5 Received:
    # fields (accepted), and refused with 6.  The bounce the same, from <>.
    mine = [(code, status) for sender, code, status in settled if sender]
    bounces = [(code, status) for sender, code, status in settled if not sender]
    assert mine == [("250", "2.0.0")] * (hops + 1) + [("554", "5.4.6")], log
    assert bounces[-1] == ("554", "5.4.6") and len(bounces) <= hops + 2, log
    assert set(bounces[:-1]) == {("250", "2.0.0")}, log
    assert "554 5.4.6 Too many hops (6 Received: header fields, limit 5)" in log
