"""The README's "Sending mail (client)" example runs as written: its openssl command
makes the certificate, its twistd command starts the submission server (on a free port
instead of 5870, and with the default MX listener moved off 2525), and its Python block,
saved as send.py, delivers the message with STARTTLS and AUTH."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from maitred_interop import free_port, stop_process, twistd_command, wait_for_port

ROOT = Path(__file__).resolve().parent.parent.parent


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Sending mail (client)")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), re.S)


def commands(block: str) -> list[list[str]]:
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line]


def test_readme_client_example_sends_with_starttls_and_auth(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    [shell] = blocks("sh")
    [python] = blocks("python")
    make_cert, serve = commands(shell)
    assert make_cert[0] == "openssl" and serve[:3] == ["twistd", "-n", "maitred"]
    subprocess.run(make_cert, cwd=tmp_path, check=True, capture_output=True, timeout=60)

    port = free_port()
    argv = [twistd_command(), "-n", "--pidfile=", "--logfile", str(tmp_path / "twistd.log"),
            *[a.replace("5870", str(port)) for a in serve[2:]],
            "--listen", f"tcp:{free_port()}:interface=127.0.0.1"]
    server = subprocess.Popen(argv, cwd=tmp_path, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        (tmp_path / "send.py").write_text(python.replace("5870", str(port)))
        sent = subprocess.run([sys.executable, "send.py"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
    finally:
        stop_process(server)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.startswith("bob@example.org DELIVERED 250 2.0.0"), sent.stdout
    [stored] = (tmp_path / "maildir").glob("*/bob/new/*")
    content = stored.read_bytes()
    assert b"Sent with STARTTLS and AUTH." in content
    assert b"with ESMTPSA" in content  # the Received: field: TLS and AUTH were used
