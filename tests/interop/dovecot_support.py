"""A real, throw-away Dovecot LMTP server for tests (Debian's dovecot-lmtpd).

``run_dovecot(users)`` writes a dovecot.conf in a fresh directory - base_dir,
state_dir, log and Maildirs all inside it, ``protocols = lmtp`` only, an LMTP UNIX
socket and a TCP listener on 127.0.0.1, users from a passwd-file - starts ``dovecot
-F -c dovecot.conf`` in its own process group, waits for its start-up line, and kills
the group afterwards.  It never touches a system Dovecot (its own ``instance_name``,
base_dir and PID file).

Run as root, Dovecot's internal and login processes run as the ``dovecot`` and
``dovenull`` users the package creates (``nobody`` without them) and mail is written
as ``nobody:nogroup`` (Dovecot refuses to deliver as root), so the directory is made
under /tmp with mode 0755 rather than in pytest's 0700 tmp_path.  Run as another user,
everything is that user's; if Dovecot will not start that way the test is skipped.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DOVECOT = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/sbin")
LMTP = Path("/usr/lib/dovecot/lmtp")

needs_dovecot = pytest.mark.skipif(
    DOVECOT is None or not LMTP.exists(),
    reason="Dovecot's LMTP server is not installed "
           "(apt-get install --no-install-recommends dovecot-lmtpd)")

CONFIG = """\
instance_name = maitred-test-{token}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
hostname = lmtp.test
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:{root}/mail/%n
# LMTP recipients are addresses; the passwd-file has bare user names.
auth_username_format = %Ln
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
service lmtp {{
  unix_listener {root}/lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


@dataclass
class Dovecot:
    """A running Dovecot: its LMTP socket and port, log and mailboxes."""

    root: Path
    port: int
    users: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.root / "lmtp"

    @property
    def unix_endpoint(self) -> str:
        return f"unix:{self.socket}:timeout=5"

    @property
    def tcp_endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}:timeout=5"

    @property
    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def connections(self) -> int:
        """LMTP connections Dovecot has logged ("Connect from local" / "from 127.0.0.1")."""
        return sum(" Info: Connect from " in line for line in self.log.splitlines())

    def messages(self, user: str) -> list[bytes]:
        """The messages in *user*'s INBOX (Maildir new/ and cur/), oldest first."""
        files = [f for d in ("new", "cur") if (self.root / "mail" / user / d).is_dir()
                 for f in (self.root / "mail" / user / d).iterdir()]
        return [f.read_bytes() for f in sorted(files, key=lambda f: f.name)]

    def start(self) -> None:
        """Start (again); wait until it has logged its start-up (10 s at most)."""
        assert DOVECOT is not None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a killed Dovecot leaves its socket behind
        before = self.log.count("starting up")
        with open(self.root / "stderr", "ab") as stderr:  # start-up errors land here
            self.proc = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")],
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + 10
        while self.log.count("starting up") == before or not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                errors = (self.root / "stderr").read_text(errors="replace")
                raise RuntimeError(f"dovecot did not start:\n{errors[-2000:]}"
                                   f"{self.log[-2000:]}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill the whole process group at once (a graceful stop takes a second)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accounts() -> tuple[str, str, int, int]:
    """Internal user, login user, mail uid and gid."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        return me, me, os.geteuid(), os.getegid()

    def user(name: str) -> str:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            return "nobody"

    nobody = pwd.getpwnam("nobody")
    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        gid = nobody.pw_gid
    return user("dovecot"), user("dovenull"), nobody.pw_uid, gid


def make_dovecot(users: Sequence[str] = ("bob", "carol")) -> Dovecot:
    """Write the configuration (not started yet)."""
    if DOVECOT is None or not LMTP.exists():
        pytest.skip("Dovecot's LMTP server is not installed "
                    "(apt-get install --no-install-recommends dovecot-lmtpd)")
    internal, login, uid, gid = _accounts()
    root = Path(tempfile.mkdtemp(prefix="maitred-dovecot-"))
    root.chmod(0o755)
    (root / "mail").mkdir()
    if os.geteuid() == 0:
        os.chown(root / "mail", uid, gid)
    (root / "users").write_text("".join(
        f"{u}:{{PLAIN}}secret:{uid}:{gid}::{root}/mail/{u}::\n" for u in users))
    port = _free_port()
    (root / "dovecot.conf").write_text(CONFIG.format(
        token=root.name.rsplit("-", 1)[-1], root=root, internal=internal, login=login,
        uid=uid, gid=gid, port=port))
    return Dovecot(root, port, tuple(users))


def run_dovecot(users: Sequence[str] = ("bob", "carol")) -> Iterator[Dovecot]:
    """A started Dovecot for the duration of the generator (``yield from`` it in a
    fixture); removed with its directory afterwards."""
    dovecot = make_dovecot(users)
    try:
        for attempt in range(3):  # another process may take the free port first
            try:
                dovecot.start()
                break
            except RuntimeError as e:
                if "Address already in use" in str(e) and attempt < 2:
                    _rebind(dovecot)
                    continue
                if os.geteuid() != 0:
                    pytest.skip(f"Dovecot would not start as a non-root user: {e}")
                raise
        yield dovecot
    finally:
        dovecot.stop()
        shutil.rmtree(dovecot.root, ignore_errors=True)


def _rebind(dovecot: Dovecot) -> None:
    conf = dovecot.root / "dovecot.conf"
    port = _free_port()
    conf.write_text(conf.read_text().replace(f"port = {dovecot.port}", f"port = {port}"))
    dovecot.port = port
