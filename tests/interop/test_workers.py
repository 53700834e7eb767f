"""``twistd maitred --workers N`` (issue 13): real processes sharing the listeners.

The supervisor binds, the workers accept on the inherited sockets; a stopped or killed
worker does not stop the service, a killed one is started again, SIGTERM to the
supervisor stops everything with 421, and workers do not outlive their supervisor.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from maitred_interop import LOCALHOST, Client, free_port, twistd_command

from maitred_tx.smtp.config import Limits
from maitred_tx.workers import _Worker, worker_limits


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def greets(port: int) -> bool:
    with Client(port, timeout=5) as c:
        return c.reply().code == 220


def ready(server, count: int) -> list[int]:
    """The workers' pids, once *count* run and the service greets."""
    wait_until(lambda: len(children(server.pid)) == count, what=f"{count} workers")
    wait_until(lambda: greets(server.port), what="a greeting")
    # Each worker logs its factory's start once it accepts.
    wait_until(lambda: server.log_text().count("SMTPFactory starting on") >= count,
               what="every worker listening")
    return children(server.pid)


def send(port: int, n: int = 1) -> list[int]:
    codes = []
    for i in range(n):
        with smtplib.SMTP(LOCALHOST, port, timeout=10) as s:
            s.ehlo("client.test")
            assert s.mail("a@example.org")[0] == 250
            assert s.rcpt("user@localhost")[0] == 250
            codes.append(s.data(f"Subject: {i}\r\n\r\nbody\r\n".encode())[0])
    return codes


def test_a_stopped_worker_leaves_the_others_serving(twistd):
    with twistd("--workers", "2", "--delivery", "discard", "--no-auth-checks") as server:
        first, second = ready(server, 2)
        os.kill(first, signal.SIGSTOP)
        try:
            assert send(server.port, 6) == [250] * 6  # all taken by the other worker
        finally:
            os.kill(first, signal.SIGCONT)
        assert alive(second)
    # Both workers' lines are in the supervisor's log file, whole.
    log = server.log_text()
    assert log.count(" message ") >= 6
    assert all(line[:4].isdigit() or line.startswith("\t") for line in log.splitlines())


def test_a_killed_worker_is_started_again(twistd):
    with twistd("--workers", "2", "--delivery", "discard", "--no-auth-checks") as server:
        workers = ready(server, 2)
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: len(children(server.pid)) == 2
                   and workers[0] not in children(server.pid), what="a new worker")
        assert send(server.port, 2) == [250, 250]
        assert "worker 0 ended" in server.log_text()
        assert "restarting in 1s" in server.log_text()


def test_sigterm_says_421_and_stops_every_process(twistd):
    with twistd("--workers", "2", "--delivery", "discard", "--no-auth-checks") as server:
        workers = ready(server, 2)
        with Client(server.port) as c:
            c.greet()
            server.process.send_signal(signal.SIGTERM)
            replies = c.rest(timeout=10)
        assert server.process.wait(20) in (0, -signal.SIGTERM)
        wait_until(lambda: not any(alive(w) for w in workers), what="workers gone")
    assert [(r.code, r.status) for r in replies] == [(421, "4.3.2")]
    assert "Traceback" not in server.log_text()


def test_workers_stop_when_the_supervisor_is_killed(twistd):
    with twistd("--workers", "2", "--delivery", "discard", "--no-auth-checks") as server:
        workers = ready(server, 2)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        wait_until(lambda: not any(alive(w) for w in workers), timeout=20,
                   what="orphaned workers to stop")


def test_per_client_limits_are_shared_out(twistd):
    """--max-client-connections 4 over 2 workers: 2 each, so one client never gets
    more than 4 sessions in all."""
    with twistd("--workers", "2", "--delivery", "discard", "--no-auth-checks",
                "--max-client-connections", "4") as server:
        ready(server, 2)
        clients = [Client(server.port, timeout=5) for _ in range(10)]
        try:
            codes = [c.reply().code for c in clients]
        finally:
            for c in clients:
                c.close()
    assert set(codes) <= {220, 421}
    assert 2 <= codes.count(220) <= 4


def test_worker_limits() -> None:
    limits = Limits(max_client_connections=50, max_client_connection_rate=0,
                    max_client_message_rate=7)
    shared = worker_limits(limits, 4)
    assert (shared.max_client_connections, shared.max_client_connection_rate,
            shared.max_client_message_rate) == (13, 0, 2)
    assert worker_limits(limits, 1) == limits
    assert worker_limits(Limits(max_client_connections=1), 8).max_client_connections == 1


def test_a_workers_stdout_and_stderr_lines_stay_whole() -> None:
    """Review fix: stdout and stderr shared one unfinished-line buffer, so a line on
    stderr (a traceback) was glued onto half a log line from stdout."""
    written: list[bytes] = []

    class Pool:
        write_log = staticmethod(written.append)

    worker = _Worker(Pool(), 0)  # type: ignore[arg-type]
    worker.childDataReceived(1, b"2025-01-01 [maitred] half of a ")
    worker.childDataReceived(2, b"Traceback (most recent call last):\n")
    worker.childDataReceived(1, b"line\nthe next")
    worker.childDataReceived(1, b" one\n")
    assert written == [b"Traceback (most recent call last):\n",
                       b"2025-01-01 [maitred] half of a line\n", b"the next one\n"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2", "--submission", "ssl:4650:interface=127.0.0.1"],
         "ssl: listeners need --tls-cert"),
        (["--inherited-fds", "3,4"], "one per listener"),
    ],
)
def test_worker_options_are_checked(tmp_path, args, message):
    result = subprocess.run([twistd_command(), "-n", "--pidfile=", "maitred", *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_the_supervisor_serves_the_workers_metrics(twistd, tmp_path: Path):
    """--metrics with --workers: the workers count into one directory, the supervisor
    serves the sum (scraped with curl); a dead worker's open sessions stop counting;
    the directory is removed when the supervisor stops."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_metrics import curl, parse, value

    port = free_port()
    temp = tmp_path / "temp"
    temp.mkdir()
    with twistd("--workers", "2", "--delivery", "discard", "--no-auth-checks",
                "--metrics", f"tcp:{port}:interface={LOCALHOST}",
                env={"TMPDIR": str(temp)}) as server:
        workers = ready(server, 2)
        (directory,) = temp.glob("maitred-metrics-*")
        assert any(directory.glob("*.db"))  # the workers count there
        assert send(server.port, 4) == [250] * 4
        held = Client(server.port)
        try:
            held.greet()
            url = f"http://{LOCALHOST}:{port}/metrics"
            status, text = curl(url)
            samples = parse(text)
            assert status == 200
            assert value(samples, "maitred_messages_total", mode="mx", result="accepted") == 4
            assert value(samples, "maitred_sessions_active", mode="mx") == 1
            for worker in workers:  # the open session dies with its worker
                os.kill(worker, signal.SIGKILL)
            wait_until(lambda: len(children(server.pid)) == 2
                       and not set(children(server.pid)) & set(workers), what="new workers")
            samples = parse(curl(url)[1])
            # No living process has the gauge yet: no sample, or 0.
            assert not value(samples, "maitred_sessions_active", mode="mx")
            assert value(samples, "maitred_messages_total", mode="mx", result="accepted") == 4
        finally:
            held.close()
    assert not directory.exists()


def test_the_supervisors_queue_length_is_served_with_the_workers_metrics(twistd):
    """--delivery queue with --workers: the supervisor runs the queue, so it counts the
    queue's length into the workers' directory.  (Review fix: it counted nowhere, and
    maitred_queue_messages was missing from the endpoint.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_metrics import curl, parse, value

    port, nowhere = free_port(), free_port()  # the relay host refuses: the message stays
    with twistd("--workers", "1", "--delivery", "queue", "--no-auth-checks",
                "--relay-host", f"[{LOCALHOST}]:{nowhere}",
                "--metrics", f"tcp:{port}:interface={LOCALHOST}") as server:
        ready(server, 1)
        assert send(server.port) == [250]
        url = f"http://{LOCALHOST}:{port}/metrics"
        wait_until(lambda: value(parse(curl(url)[1]), "maitred_queue_messages") == 1,
                   what="the queue gauge at 1")
