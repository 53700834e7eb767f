"""maitred-queue: list, show, flush, hold/release, delete - in-process on a spool the
test fills, and as real processes (``python -m maitred_tx.queue``) beside a running
``twistd maitred --delivery queue``."""

from __future__ import annotations

import io
import json
import re
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maitred_tx.queue.cli import main
from maitred_tx.queue.spool import SpoolStore
from maitred_tx.queue.store import (
    AttemptResult,
    QueuedRecipient,
    QueueEnvelope,
    QueueReply,
    RecipientState,
)

INTEROP = Path(__file__).resolve().parent.parent / "interop"
sys.path.insert(0, str(INTEROP))

from maitred_interop import twistd_maitred  # noqa: E402

T0 = 1_700_000_000.0
BODY = b"Subject: cli\r\n\r\nhello\r\n"


def envelope(sender: str | None = "alice@origin.test", *rcpts: str) -> QueueEnvelope:
    return QueueEnvelope(sender, tuple(QueuedRecipient(r) for r in rcpts or ("bob@x.test",)),
                         received_at=T0)


@pytest.fixture
def server(tmp_path: Path) -> SpoolStore:
    """The running server's store (holds the spool lock and the index)."""
    store = SpoolStore(tmp_path / "spool")
    store.recover()
    yield store
    store.close()


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out), out.getvalue()


def test_list(server: SpoolStore) -> None:
    a = server.add(envelope("alice@origin.test", "bob@x.test", "carol@y.test"), [BODY])
    b = server.add(envelope(None), [BODY])
    server.record_attempt(a, [AttemptResult("bob@x.test", RecipientState.DEFERRED,
                                            QueueReply(451, "4.7.1", "greylisted"))], T0 + 5)
    server.hold(b)
    code, out = run("list", "--spool", server.root)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{a} ") and lines[0].endswith("<alice@origin.test>")
    assert "2023-11-14 22:13:20Z" in lines[0]
    assert lines[1] == ("    <bob@x.test> deferred, 1 attempt(s), next 2023-11-14 22:18:25Z: "
                        "451 4.7.1 greylisted")
    assert lines[2].startswith("    <carol@y.test> pending, next ")
    assert lines[3].startswith(f"{b} ") and lines[3].endswith("<>  [held]")
    assert lines[-1] == "-- 2 message(s), 3 recipient(s) pending"
    code, out = run("--spool", server.root, "list", "--json")
    assert code == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == [a, b]


def test_show(server: SpoolStore) -> None:
    a = server.add(envelope(), [BODY])
    code, out = run("show", a, "--spool", server.root)
    assert code == 0
    shown = json.loads(out)
    assert shown["id"] == a and shown["recipients"][0]["address"] == "bob@x.test"
    assert run("show", "1.M1P1Q1Rabcdef", "--spool", server.root)[0] == 1


def test_bad_input_is_a_usage_error(server: SpoolStore, tmp_path: Path) -> None:
    assert run("show", "../../etc/passwd", "--spool", server.root)[0] == 2
    assert run("list", "--spool", str(tmp_path / "nothing"))[0] == 2
    with pytest.raises(SystemExit) as e:
        run("frobnicate", "--spool", server.root)
    assert e.value.code == 2


def test_flush_reaches_the_server(server: SpoolStore) -> None:
    a = server.add(envelope(), [BODY])
    b = server.add(envelope(), [BODY])
    for message_id in (a, b):
        server.record_attempt(message_id, [AttemptResult(
            "bob@x.test", RecipientState.DEFERRED, QueueReply(451, None, "later"))], T0)
    assert server.due(T0 + 1) == []
    assert run("flush", a, "--spool", server.root) == (0, "1 message(s) due now\n")
    assert server.flush_requested()
    assert server.due(T0 + 1) == []  # the server's index changes when it takes the request
    assert server.consume_flush()
    assert server.due(T0 + 1) == [a]
    assert run("flush", "--spool", server.root) == (0, "2 message(s) due now\n")
    server.consume_flush()
    assert sorted(server.due(T0 + 1)) == sorted([a, b])
    assert run("flush", "1.M1P1Q1Rabcdef", "--spool", server.root)[0] == 1


def test_hold_and_release(server: SpoolStore) -> None:
    a = server.add(envelope(), [BODY])
    assert run("hold", a, "--spool", server.root) == (0, f"{a} held\n")
    server.consume_flush()
    assert server.due(T0 + 1) == []
    assert run("release", a, "--spool", server.root) == (0, f"{a} released\n")
    server.consume_flush()
    assert server.due(T0 + 1) == [a]


def test_delete(server: SpoolStore) -> None:
    a = server.add(envelope(), [BODY])
    b = server.add(envelope(), [BODY])
    code, out = run("delete", a, "1.M1P1Q1Rabcdef", "--spool", server.root)
    assert code == 1 and out == f"{a} deleted\n"
    assert server.load(a) is None and server.open_body(a) is None
    assert server.due(T0 + 1) == [b]
    assert [m.id for m in server.load_all()] == [b]


def test_console_script() -> None:
    script = shutil.which("maitred-queue")
    if script is None:
        pytest.skip("maitred-queue is not installed (pip install -e . installs it)")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "{list,show,flush,hold,release,delete}" in done.stdout


def test_as_processes_beside_a_running_server(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    # The queue runner sends to a smarthost that refuses connections (port 1 of
    # 127.0.0.1): the messages stay queued, deferred, for the CLI to see.
    with twistd_maitred(tmp_path, ["--delivery", "queue", "--spool", str(spool),
                                   "--domain", "example.com", "--no-auth-checks",
                                   "--relay-host", "[127.0.0.1]:1"]) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            client.ehlo("client.test")
            client.sendmail("alice@origin.test", ["bob@example.com"], BODY)
            client.sendmail("alice@origin.test", ["carol@example.com"], BODY)

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "maitred_tx.queue", *argv,
                                   "--spool", str(spool)], capture_output=True, text=True,
                                  timeout=60)

        listed = cli("list")
        assert listed.returncode == 0, listed.stderr
        # pending, or already deferred by the runner (its smarthost refuses)
        assert re.search(r"<bob@example\.com> (pending|deferred)", listed.stdout)
        assert listed.stdout.endswith("-- 2 message(s), 2 recipient(s) pending\n")
        first = listed.stdout.split()[0]
        deleted = cli("delete", first)
        assert (deleted.returncode, deleted.stdout) == (0, f"{first} deleted\n")
        attempts = next(SpoolStore(spool).load_all()).recipients[0].attempts
        assert cli("flush").stdout == "1 message(s) due now\n"  # the other one is left
        # The running server's runner takes the trigger and tries it again at once.
        deadline = time.monotonic() + 10
        while next(SpoolStore(spool).load_all()).recipients[0].attempts <= max(attempts, 1):
            assert time.monotonic() < deadline, "the runner did not take the flush"
            time.sleep(0.05)
        # The server goes on taking mail into the same spool.
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            client.ehlo("client.test")
            client.sendmail("alice@origin.test", ["dave@example.com"], BODY)
        assert len(list(SpoolStore(spool).load_all())) == 2
    assert "queue " in server.log_text() and " messages in " in server.log_text()
