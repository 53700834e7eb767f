"""The twistd plugin end to end: `twistd maitred --help`, a twistd-launched server for
each kind of --delivery, the dropin's place, and what the wheel ships."""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

INTEROP = Path(__file__).resolve().parent / "interop"
sys.path.insert(0, str(INTEROP))

from maitred_interop import (  # noqa: E402
    ROOT,
    message_files,
    split_trace,
    twistd_command,
    twistd_maitred,
)

MESSAGE = (
    b"From: a@b.org\r\n"
    b"To: user@example.com\r\n"
    b"Subject: plugin\r\n"
    b"\r\n"
    b"Hello from smtplib.\r\n"
    b".a dotted line\r\n"
    b"\xe2\x82\xac in 8 bits\r\n"
)
OPTIONS = [
    "--listen",
    "--hostname",
    "--domain",
    "--maildir",
    "--delivery",
    "--max-size",
    "--max-recipients",
    "--max-line",
    "--max-command-line",
    "--max-header",
    "--max-hops",
    "--max-errors",
    "--command-timeout",
    "--data-timeout",
    "--session-deadline",
    "--bare-line-endings",
    "--relay",
    "--tls-reports",
    "--tls-reports-contact",
]


def send(port: int, recipients: list[str], message: bytes = MESSAGE) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as s:
        return s.sendmail("a@b.org", recipients, message)


def test_help_documents_every_option():
    result = subprocess.run(
        [twistd_command(), "maitred", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for option in OPTIONS:
        assert option in result.stdout, option
    assert "Usage: twistd [options] maitred [options]" in result.stdout


def test_bad_option_is_a_usage_error(tmp_path: Path):
    command = [twistd_command(), "-n", "--pidfile=", "maitred", "--max-recipients", "99"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    assert "max_recipients must be at least 100" in result.stdout + result.stderr


def test_twistd_maildir(tmp_path: Path):
    maildir = tmp_path / "mail"
    args = ["--maildir", str(maildir), "--domain", "example.com", "--hostname", "mx.test"]
    with twistd_maitred(tmp_path, args) as server:
        refused = send(server.port, ["user@example.com", "x@localhost", "Other@Example.COM"])
    assert refused == {"x@localhost": (550, b"5.7.1 Relaying denied")}  # not our domain
    for user in ("user", "other"):
        [path] = message_files(maildir / "example.com" / user)
        fields, body = split_trace(path.read_bytes())
        assert fields[0] == b"Return-Path: <a@b.org>"
        assert fields[1].lower() == f"delivered-to: {user}@example.com".encode()
        assert fields[2].startswith(b"Received: from client.test ([127.0.0.1])")
        assert b"by mx.test (maitred_tx) with ESMTP id " in fields[2]
        # twistd checks SPF, DKIM, ARC and DMARC by default: our one
        # Authentication-Results field comes first (its verdicts depend on this host's DNS)
        ours, _, sent = body.partition(MESSAGE)
        assert ours.startswith(b"Authentication-Results: mx.test;\r\n\tspf=")
        assert ours.count(b"Authentication-Results") == 1 and not sent
        assert all(line.startswith(b"\t") for line in ours.split(b"\r\n")[1:-1])
        assert body.endswith(MESSAGE)  # exactly the bytes sent, dot-unstuffed


def test_twistd_discard(tmp_path: Path):
    with (
        twistd_maitred(tmp_path, ["--delivery", "discard"]) as server,
        smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s,
    ):
        s.ehlo("client.test")
        s.mail("a@b.org")
        s.rcpt("user@localhost")
        assert s.data(MESSAGE) == (250, b"2.0.0 OK: discarded")
    assert not (tmp_path / "maildir").exists()
    # The per-message line in twistd's text format (maitred_tx.textlog formats it).
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
    line = (stamp + r" \[maitred_tx\.server\.protocol#info\] 127\.0\.0\.1 message "
            r"[0-9A-F]+ from <a@b\.org> to \['user@localhost'\]: 250 2\.0\.0 "
            r"\(spf=none dkim=none arc=none dmarc=none\)")  # the checks are on
    deadline = time.monotonic() + 10
    while not re.search("^" + line + "$", server.log_text(), re.M):
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.05)


@pytest.mark.parametrize("name", ["delivery", "FileDelivery"])  # object, 0-arg factory
def test_twistd_python_delivery_twisted_mail_style(tmp_path: Path, name: str):
    out = tmp_path / "out"
    out.mkdir()
    env = {"PYTHONPATH": str(INTEROP), "MAITRED_INTEROP_OUT": str(out)}
    args = ["--delivery", f"python:maitred_interop_delivery.{name}", "--domain", "example.com"]
    with twistd_maitred(tmp_path, args, env) as server:
        refused = send(server.port, ["user@example.com", "nobody@example.com"])
    assert list(refused) == ["nobody@example.com"]
    assert refused["nobody@example.com"][0] == 550
    [path] = sorted(out.glob("*.eml"))
    assert path.name.startswith("user.")
    stored = path.read_bytes()
    assert stored.startswith(b"Received: from client.test by FileDelivery\n")
    assert stored.endswith(MESSAGE.replace(b"\r\n", b"\n"))


def test_dropin_is_a_namespace_plugin():
    dropin = ROOT / "twisted" / "plugins" / "maitred_plugin.py"
    assert dropin.is_file()
    assert "maitred_tx.tap" in dropin.read_text()
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()


def test_wheel_ships_the_dropin(tmp_path: Path):
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path)]
    result = subprocess.run([*command, str(ROOT)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"cannot build a wheel here (offline?): {result.stderr[-500:]}")
    [wheel] = tmp_path.glob("maitred_tx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/maitred_plugin.py" in names
    assert "maitred_tx/__init__.py" in names
    assert "maitred_tx/tap.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/plugins/dropin.cache" not in names
    assert not any(n.startswith("tests/") for n in names)
