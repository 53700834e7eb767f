"""Helpers for the end-to-end tests: a blocking raw SMTP client, free ports and a
``twistd -n maitred`` subprocess that is always stopped.

Imported by tests/interop/conftest.py and tests/test_plugin.py (which put this
directory on sys.path).  Blocking code here must run in a thread
(``deferToThread``) when the server under test lives in the test's own reactor.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from maitred_tx.smtp.config import BareLineEndings, Config, Limits

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LOCALHOST = "127.0.0.1"
# maitred_tx.delivery.maildir's base names: seconds, microseconds, pid, counter.
_MAILDIR_NAME = re.compile(r"(\d+)\.M(\d+)P\d+Q(\d+)\.")


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) SMTP reply as read from the wire."""

    code: int
    lines: tuple[str, ...]

    @property
    def status(self) -> str | None:
        """The enhanced status code of the last line, if there is one (RFC 2034)."""
        words = self.lines[-1].split(" ", 1) if self.lines else []
        if words and words[0].count(".") == 2 and words[0][0] in "245":
            return words[0]
        return None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class Client:
    """A deliberately dumb SMTP client: sends exactly the bytes it is given and parses
    replies, so a test controls every byte on the wire.  Every read has a timeout."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((LOCALHOST, port), timeout=timeout)
        self._buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def read_once(self) -> bytes:
        """One recv(): the bytes it brought (they stay buffered for reply())."""
        before = len(self._buf)
        if not self._fill():
            raise EOFError("connection closed")
        return self._buf[before:]

    def reply(self) -> Reply:
        """The next complete reply; EOFError if the server closed first."""
        lines: list[str] = []
        while True:
            nl = self._buf.find(b"\r\n")
            if nl < 0:
                if not self._fill():
                    raise EOFError(f"connection closed; partial reply {lines!r} {self._buf!r}")
                continue
            raw, self._buf = self._buf[:nl], self._buf[nl + 2 :]
            line = raw.decode("utf-8", "replace")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return Reply(int(line[:3]), tuple(lines))

    def replies(self, count: int) -> list[Reply]:
        return [self.reply() for _ in range(count)]

    def command(self, line: str | bytes) -> Reply:
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def greet(self, helo: str = "EHLO client.test") -> Reply:
        """Read the greeting and say EHLO; returns the EHLO reply."""
        greeting = self.reply()
        assert greeting.code == 220, greeting
        reply = self.command(helo)
        assert reply.code == 250, reply
        return reply

    def rest(self, timeout: float = 5.0) -> list[Reply]:
        """Every reply until the server closes the connection (bounded by *timeout*)."""
        deadline = time.monotonic() + timeout
        out: list[Reply] = []
        while time.monotonic() < deadline:
            try:
                out.append(self.reply())
            except EOFError:
                return out
        raise AssertionError(f"server did not close within {timeout}s; got {out}")

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection with no more bytes to read."""
        self.sock.settimeout(timeout)
        try:
            return not self._buf and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def config(*, bare: BareLineEndings | None = None, **limits: Any) -> Config:
    """Config(hostname="mx.test") with some limits (and optionally the bare-line policy)
    changed."""
    extra: dict[str, Any] = {} if bare is None else {"bare_line_endings": bare}
    return Config(hostname="mx.test", limits=Limits(**limits), **extra)


def require(program: str) -> str:
    """The path of an external client, or skip the test saying what is missing."""
    for candidate in (shutil.which(program), f"/usr/sbin/{program}", f"/usr/bin/{program}"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip(f"{program} is not installed (CI installs it from Debian: .ci/run)")


def twistd_command() -> str:
    """The ``twistd`` script of this interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / "twistd"
    found = str(beside) if beside.exists() else shutil.which("twistd")
    if found is None:
        raise RuntimeError("twistd is not installed")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"twistd exited with {process.returncode}")
        try:
            with socket.create_connection((LOCALHOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: a server subprocess never outlives its test."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@dataclass(slots=True)
class Twistd:
    """A running ``twistd -n maitred`` and where it writes its log."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def status(self, field: str) -> int:
        """A kB field of /proc/PID/status (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)


@contextlib.contextmanager
def twistd_maitred(
    workdir: Path, args: Sequence[str], env: dict[str, str] | None = None
) -> Iterator[Twistd]:
    """Start ``twistd -n maitred ARGS --listen tcp:PORT:interface=127.0.0.1`` in
    *workdir*; yield once it accepts connections; always stop it."""
    port = free_port()
    log = workdir / "twistd.log"
    command = [twistd_command(), "-n", "--pidfile=", "--logfile", str(log), "maitred"]
    command += ["--listen", f"tcp:{port}:interface={LOCALHOST}", *args]
    environment = {**os.environ, **(env or {})}
    quiet = subprocess.DEVNULL
    process = subprocess.Popen(
        command, cwd=workdir, env=environment, stdin=quiet, stdout=quiet, stderr=quiet
    )
    server = Twistd(process, port, log)
    try:
        try:
            wait_for_port(port, process)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{server.log_text()}") from None
        yield server
    finally:
        stop_process(process)


def message_files(maildir: Path) -> list[Path]:
    """The delivered files of one Maildir (its new/), oldest first: by the time in the
    name, read as numbers ("T.M<usec>P<pid>Q<n>", usec not zero-padded: sorted as text,
    a message at .M95 would come after one at .M123456 of the same second)."""
    new = maildir / "new"
    return sorted(new.iterdir(), key=_delivery_order) if new.is_dir() else []


def _delivery_order(path: Path) -> tuple[int, int, int, str]:
    match = _MAILDIR_NAME.match(path.name)
    if match is None:
        return (0, 0, 0, path.name)
    seconds, micro, counter = (int(g) for g in match.groups())
    return (seconds, micro, counter, path.name)


def split_trace(stored: bytes) -> tuple[list[bytes], bytes]:
    """Split a stored Maildir file into its three trace fields (each unfolded to one
    bytes value, CRLF excluded) and the body bytes that follow them."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 3:
        end = stored.index(b"\r\n", pos)
        while stored[end + 2 : end + 3] == b"\t":  # a folded continuation line
            end = stored.index(b"\r\n", end + 2)
        fields.append(stored[pos:end])
        pos = end + 2
    return fields, stored[pos:]


async def until(condition: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait, without blocking the reactor, until *condition()* holds; fail after
    *timeout* seconds naming *what*."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)
