"""A throw-away Postfix instance for the client's interop tests.

Everything lives in one temporary directory outside pytest's tmp_path (whose parents
are mode 0700, which the unprivileged postfix daemons could not traverse):
``conf/main.cf`` and ``conf/master.cf`` (no chroot, smtpd on 127.0.0.1:PORT only,
STARTTLS with a test certificate), the queue, the data directory, the log
(``maillog_file``, so no syslog is needed) and ``mail/``, where a ``pipe`` transport
running ``tee`` as nobody writes every delivered message.  ``postfix -c DIR start``
needs root; the instance is stopped and removed after the tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from maitred_interop import free_port
from security_support import CertFiles, make_certificate

SERVICES = """\
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


@dataclass(frozen=True)
class Postfix:
    """A running instance: its smtpd port, directory and certificate."""

    port: int
    base: Path
    certs: CertFiles

    @property
    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def delivered(self, marker: bytes, timeout: float = 10.0) -> bytes:
        """The stored copy of the message containing *marker*, once Postfix has
        delivered it (bounded wait; blocking: call it in a thread)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in (self.base / "mail").iterdir():
                with contextlib.suppress(OSError):
                    data = path.read_bytes()
                    if marker in data:
                        return data
            time.sleep(0.05)
        raise AssertionError(f"no delivered message with {marker!r}\n{self.log[-3000:]}")

    def log_line(self, needle: str, timeout: float = 10.0) -> str:
        """The first log line with *needle* (bounded wait; blocking)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.splitlines():
                if needle in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line with {needle!r}\n{self.log[-3000:]}")


    def session(self, sender: str, timeout: float = 10.0) -> list[str]:
        """The log lines of the smtpd session (connect .. disconnect) that received the
        message from *sender* (bounded wait for its disconnect; blocking)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = _session_lines(self.log.splitlines(), sender)
            if lines and "disconnect from" in lines[-1]:
                return lines
            time.sleep(0.05)
        raise AssertionError(f"no finished session for {sender}\n{self.log[-3000:]}")


def _session_lines(log: list[str], sender: str) -> list[str]:
    """The smtpd process that logged "QUEUEID: client=" for the queue id whose qmgr line
    has from=<sender>; its lines from "connect from" to "disconnect from"."""
    qid = next((line.split("]: ", 1)[1].split(":", 1)[0] for line in log
                if f"from=<{sender}>" in line and "qmgr[" in line), None)
    if qid is None:
        return []
    start = next((i for i, line in enumerate(log) if f"]: {qid}: client=" in line), None)
    if start is None:
        return []
    tag = log[start].split("]: ", 1)[0].rsplit(" ", 1)[-1] + "]"  # "postfix/smtpd[123]"
    mine = [(i, line) for i, line in enumerate(log) if f" {tag}: " in line]
    first = max((i for i, line in mine if i <= start and "connect from" in line
                 and "disconnect" not in line), default=start)
    out = []
    for i, line in mine:
        if i >= first:
            out.append(line)
            if "disconnect from" in line:
                break
    return out


def _main_cf(base: Path, certs: CertFiles) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
mail_owner = postfix
setgid_group = postdrop
myhostname = pfx.test
mydestination = pfx.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
default_transport = keep
local_transport = keep
local_header_rewrite_clients =
smtpd_recipient_restrictions = check_recipient_access
    inline:{{ {{refused@pfx.test=550 5.1.1 No such user}} }}, permit_mynetworks, reject
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
smtpd_tls_cert_file = {certs.cert}
smtpd_tls_key_file = {certs.key}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
smtputf8_enable = yes
biff = no
"""


@contextlib.contextmanager
def postfix_instance() -> Iterator[Postfix]:
    """Start a Postfix instance; skip when postfix is missing or we are not root."""
    binary = shutil.which("postfix") or "/usr/sbin/postfix"
    if not Path(binary).exists() or not Path("/usr/lib/postfix/sbin/smtpd").exists():
        pytest.skip("postfix is not installed (CI installs it from Debian: .ci/run)")
    if os.geteuid() != 0:
        pytest.skip("a throw-away Postfix instance needs root (postfix -c DIR start)")
    base = Path(tempfile.mkdtemp(prefix="maitred-postfix-", dir="/tmp"))
    base.chmod(0o755)
    for name in ("conf", "queue", "data", "mail"):
        (base / name).mkdir()
    (base / "mail").chmod(0o777)  # the pipe transport writes here as nobody
    shutil.chown(base / "data", "postfix")
    certs = make_certificate(base)
    port = free_port()
    (base / "conf" / "main.cf").write_text(_main_cf(base, certs))
    (base / "conf" / "master.cf").write_text(
        f"127.0.0.1:{port} inet n - n - - smtpd\n" + SERVICES
        + "keep unix - n n - - pipe\n"
        + f"  user=nobody argv=/usr/bin/tee {base}/mail/${{queue_id}}\n")
    command = [binary, "-c", str(base / "conf")]
    started = subprocess.run([*command, "start"], capture_output=True, text=True, timeout=60)
    try:
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr}\n"
                               f"{(base / 'maillog').read_text(errors='replace')}")
        _wait(port, base)
        yield Postfix(port, base, certs)
    finally:
        # "abort" is "stop" without its one-second polling: we wait for master ourselves.
        subprocess.run([*command, "abort"], capture_output=True, timeout=60)
        _wait_stopped(base / "queue" / "pid" / "master.pid")
        shutil.rmtree(base, ignore_errors=True)


def _wait(port: int, base: Path, timeout: float = 20.0) -> None:
    """Until smtpd's port accepts (master opens it at once), or fail with the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"postfix: nothing listens on {port}\n"
                       f"{(base / 'maillog').read_text(errors='replace')}")


def _wait_stopped(pid_file: Path, timeout: float = 10.0) -> None:
    """Wait until the master process has exited (its children go with it)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
