"""The smarthost's credentials and TLS level, without a reactor: the password file's
format and mode checks, and that credentials never go with opportunistic TLS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maitred_tx.relay.route import RelayHost
from maitred_tx.relay.smarthost import (
    MAX_PASSWORD_FILE,
    RelayCredentials,
    RelayTLS,
    parse_credentials,
    read_credentials,
)

SECRET = "s3cret:with:colons and spaces "


def password_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "relay-password"
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("content", [
    b"relay@example.net:" + SECRET.encode(),
    b"relay@example.net:" + SECRET.encode() + b"\n",
    b"relay@example.net:" + SECRET.encode() + b"\r\n",
    b"# for smtp.example.net\n\nrelay@example.net:" + SECRET.encode() + b"\n\n",
    b"  relay@example.net :" + SECRET.encode(),
])
def test_one_line_split_at_the_first_colon(content: bytes) -> None:
    credentials = parse_credentials(content)
    assert credentials == RelayCredentials("relay@example.net", SECRET)


def test_a_utf8_password() -> None:
    assert parse_credentials("bob:pässwörd\n".encode()).password == "pässwörd"


@pytest.mark.parametrize(("content", "why"), [
    (b"", "is empty"),
    (b"\n# nothing\n", "is empty"),
    (b"bob:" + SECRET.encode() + b"\ncarol:other\n", "has 2 lines"),
    (SECRET.replace(":", "").encode(), "expected USER:PASSWORD"),
    (b":" + SECRET.encode(), "expected USER:PASSWORD"),
    (b"bob:", "expected USER:PASSWORD"),
    (b"bob:" + SECRET.encode() + b"\0", "NUL"),
    (b"bob:\xff" + SECRET.encode(), "not UTF-8"),
])
def test_a_malformed_file_is_refused_without_echoing_it(content: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why) as caught:
        parse_credentials(content, "/etc/maitred/relay-password")
    assert "/etc/maitred/relay-password" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_the_password_stays_out_of_repr() -> None:
    credentials = RelayCredentials("bob", SECRET)
    relay = RelayHost("smtp.example.net", 587, tls=RelayTLS.VERIFY, credentials=credentials)
    assert "s3cret" not in repr(credentials) and "s3cret" not in repr(relay)
    assert "bob" in repr(relay)


def test_credentials_need_verified_tls() -> None:
    credentials = RelayCredentials("bob", SECRET)
    with pytest.raises(ValueError, match="verified TLS"):
        RelayHost("smtp.example.net", 587, credentials=credentials)
    assert RelayHost("smtp.example.net", 465, tls=RelayTLS.IMPLICIT,
                     credentials=credentials).credentials is credentials
    assert RelayHost("smtp.example.net").tls is RelayTLS.OPPORTUNISTIC  # as before


def test_read_a_private_file(tmp_path: Path) -> None:
    path = password_file(tmp_path, b"bob:" + SECRET.encode() + b"\n")
    assert read_credentials(path) == RelayCredentials("bob", SECRET)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644, 0o660])
def test_a_file_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    path = password_file(tmp_path, b"bob:" + SECRET.encode(), mode)
    with pytest.raises(ValueError, match=f"mode {mode:03o}") as caught:
        read_credentials(path)
    assert f"chmod 600 {path}" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_missing_unreadable_and_odd_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read .*No such file"):
        read_credentials(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=r"cannot read|not a regular file"):
        read_credentials(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ValueError, match="not a regular file"):
        read_credentials(str(fifo))  # and does not hang waiting for a writer
    big = password_file(tmp_path, b"bob:" + b"x" * MAX_PASSWORD_FILE)
    with pytest.raises(ValueError, match="larger than"):
        read_credentials(big)
    if os.geteuid() != 0:  # root reads anything
        unreadable = password_file(tmp_path, b"bob:x", 0o200)
        with pytest.raises(ValueError, match="Permission denied"):
            read_credentials(unreadable)
