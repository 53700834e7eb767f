"""How we talk to a smarthost (``--relay-host``): the TLS level and the credentials we
AUTH with (RFC 4954), as Postfix's ``smtp_tls_security_level`` and
``smtp_sasl_password_maps``; pure (the password file is read with ``os`` only).

- ``RelayTLS.OPPORTUNISTIC``: STARTTLS when offered, certificate not checked (Postfix's
  ``may``, RFC 7435); what a smarthost got before these options existed.
- ``RelayTLS.VERIFY``: STARTTLS required (RFC 3207) and the certificate verified
  against the smarthost's name (RFC 6125; Postfix's ``verify``/``secure`` against a
  ``[host]``); the default with credentials.
- ``RelayTLS.IMPLICIT``: TLS from the first byte (port 465, RFC 8314 3), verified.

Credentials never go out without verified TLS: ``RelayHost`` refuses them with
``OPPORTUNISTIC`` (an active attacker could strip STARTTLS or present any certificate
and read the password).  The password file holds one ``USER:PASSWORD`` line (split at
the first colon: passwords may contain colons) and must be readable by its owner only.
"""

from __future__ import annotations

import enum
import os
import stat
from dataclasses import dataclass, field
from typing import Final

__all__ = ["RelayCredentials", "RelayTLS", "parse_credentials", "read_credentials"]

# A user name and a password fit in far less; a larger file is not a password file
# (a wrong path, say a CA bundle) and is refused before it is read whole.
MAX_PASSWORD_FILE: Final = 4096


class RelayTLS(enum.Enum):
    """``--relay-tls``: how a smarthost's connection is protected."""

    OPPORTUNISTIC = "opportunistic"
    VERIFY = "verify"
    IMPLICIT = "implicit"


@dataclass(frozen=True, slots=True)
class RelayCredentials:
    """A user name and password to AUTH (PLAIN, else LOGIN) to the smarthost with.
    The password is left out of ``repr``: these objects may end up in a log line."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.username or not self.password:
            raise ValueError("a user name and a password are needed")
        if "\0" in self.username or "\0" in self.password:
            raise ValueError("NUL cannot be sent in AUTH PLAIN (RFC 4616 2)")


def parse_credentials(data: bytes, source: str = "the password file") -> RelayCredentials:
    """One ``USER:PASSWORD`` line of UTF-8 (blank lines and ``#`` comment lines are
    ignored; a CRLF line end is fine).  Errors name *source*, never the content: a
    malformed line may well be the password."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{source} is not UTF-8 text") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    lines = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{source} is empty: write USER:PASSWORD on one line")
    if len(lines) > 1:
        raise ValueError(f"{source} has {len(lines)} lines: one USER:PASSWORD line expected")
    username, colon, password = lines[0].partition(":")
    username = username.strip()
    if not colon or not username or not password:
        raise ValueError(f"{source}: expected USER:PASSWORD (a user, ':', a password)")
    try:
        return RelayCredentials(username, password)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_credentials(path: str) -> RelayCredentials:
    """The credentials in the file at *path*.  Refused (ValueError, saying what to do)
    when it cannot be read, is not a regular file, or is open to its group or others:
    Postfix does not check ``sasl_passwd``'s mode, but a password others can read is no
    secret, and saying so at startup costs one ``chmod 600``."""
    try:
        with open(path, "rb", opener=_open_nonblocking) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path} is not a regular file")
            if st.st_mode & 0o077:
                raise ValueError(
                    f"{path} is accessible to its group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):03o}): chmod 600 {path}")
            data = f.read(MAX_PASSWORD_FILE + 1)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_PASSWORD_FILE:
        raise ValueError(f"{path} is larger than {MAX_PASSWORD_FILE} octets: "
                         "one USER:PASSWORD line expected")
    return parse_credentials(data, path)


def _open_nonblocking(path: str, flags: int) -> int:
    # A FIFO named by mistake must not hang the startup: its type is checked once open.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
