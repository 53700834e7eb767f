"""How long the client waits for each reply: RFC 5321 4.5.3.2, configurable.

Every wait the client does has a :class:`Phase`; :class:`Timeouts` gives its length.
The defaults are the RFC's minimums where it sets one and Postfix's smtp client
settings where it does not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

__all__ = ["Phase", "Timeouts"]


class Phase(enum.Enum):
    """What the client is waiting for."""

    GREETING = "greeting"
    HELLO = "hello"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA_INIT = "data_init"
    DATA_BLOCK = "data_block"
    DATA_DONE = "data_done"
    COMMAND = "command"
    QUIT = "quit"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait, per phase."""

    # RFC 5321 4.5.3.2.1: "Initial 220 Message: 5 Minutes".
    greeting: float = 300.0
    # No RFC value; Postfix smtp_helo_timeout = 300s.
    hello: float = 300.0
    # No RFC value; Postfix smtp_starttls_timeout = 300s (the reply and the handshake).
    starttls: float = 300.0
    # No RFC value; the whole SASL exchange, as Postfix's smtp_sasl timeouts (300s).
    auth: float = 300.0
    # RFC 5321 4.5.3.2.2: "MAIL Command: 5 Minutes".
    mail: float = 300.0
    # RFC 5321 4.5.3.2.3: "RCPT Command: 5 Minutes".
    rcpt: float = 300.0
    # RFC 5321 4.5.3.2.4: "DATA Initiation: 2 Minutes" (the 354).
    data_init: float = 120.0
    # RFC 5321 4.5.3.2.5: "Data Block: 3 Minutes": a write that does not complete
    # (the server stopped reading), and the reply to a BDAT chunk that is not the last.
    data_block: float = 180.0
    # RFC 5321 4.5.3.2.6: "DATA Termination: 10 Minutes" (the reply after the body;
    # for BDAT ... LAST too, and every LMTP per-recipient reply).
    data_done: float = 600.0
    # RSET, NOOP and custom commands: Postfix smtp_rset_timeout is 20s, but RFC 5321
    # 4.5.3.2.7 gives servers 5 minutes for any command; we wait as long.
    command: float = 300.0
    # Postfix smtp_quit_timeout = 300s; nothing waits on QUIT, so a shorter wait.
    quit: float = 60.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"timeout {f.name} must be positive")

    def __getitem__(self, phase: Phase) -> float:
        """The timeout for *phase*."""
        value: float = getattr(self, phase.value)
        return value
