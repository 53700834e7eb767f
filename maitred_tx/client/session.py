"""The client side of one SMTP/LMTP connection, without I/O.

:class:`ClientSession` holds what is true of the connection (the greeting, what the
last EHLO/LHLO offered, TLS, the authenticated user, whether the server may still hold
a transaction) and makes the operations that change it.  Each operation is a small
state machine with the same shape: ``start()`` gives the bytes to write, ``on_reply()``
reads one reply and gives the next bytes, ``done`` says it is over and ``result`` what
came of it; a refusal that ends the operation raises a :mod:`~maitred_tx.client.errors`
class.  ``phase`` names the reply awaited, for its timeout.  The glue owns sockets,
time and TLS; nothing here blocks or reads a clock.

RFC 5321 4.1.1.1 and 3.2 (EHLO, then HELO when EHLO is refused with 5xx), RFC 2033 4.1
(LHLO, no fallback), RFC 3207 4.2 (after STARTTLS everything learned before is
forgotten and EHLO is sent again), RFC 4954 4 and RFC 4616 (AUTH PLAIN with an initial
response; LOGIN), RFC 5321 4.1.1.10 (QUIT).
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Sequence
from typing import Final

from maitred_tx.client.body import ContentScan
from maitred_tx.client.errors import (
    AuthenticationFailed,
    AuthenticationUnavailable,
    CleartextAuthRefused,
    ProtocolViolation,
    ServerRefused,
    TLSUnavailable,
)
from maitred_tx.client.extensions import NO_EXTENSIONS, Extensions, parse_ehlo
from maitred_tx.client.message import DSN, Recipient, plan_transaction
from maitred_tx.client.replies import ReplyError, ReplyParser, ServerReply
from maitred_tx.client.timeouts import Phase
from maitred_tx.client.transaction import Transaction
from maitred_tx.smtp.params import BodyType

__all__ = ["ClientSession", "TLSMode"]

# SASL mechanisms we can do, in order of preference (PLAIN is one round trip).
MECHANISMS: Final = ("PLAIN", "LOGIN")
# Verbs a custom command may not use: their replies change the session's state, which
# only the dedicated operations track (XCLIENT restarts the session with a 220).
_MANAGED: Final = frozenset(
    {"EHLO", "HELO", "LHLO", "MAIL", "RCPT", "DATA", "BDAT", "STARTTLS", "AUTH", "QUIT",
     "XCLIENT", "BURL"})
# RFC 5321 4.5.3.1.4 allows 512 octets; extensions may add (Postfix reads 2048).
MAX_COMMAND_LINE: Final = 2048
_VERB: Final = re.compile(r"[A-Za-z][A-Za-z0-9-]*")


class TLSMode(enum.Enum):
    """How the connection gets TLS."""

    NONE = "none"  # never: cleartext only
    # STARTTLS when offered, cleartext otherwise or when refused (RFC 7435 opportunistic
    # security; Postfix's "may").  The certificate is not verified unless asked for.
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"  # STARTTLS or fail (Postfix's "encrypt"/"verify")
    IMPLICIT = "implicit"  # TLS from the first byte (RFC 8314 3.3, port 465)


class ClientSession:
    """Connection-level state; makes the operations (see the module docstring)."""

    def __init__(self, *, host: str, helo: str, lmtp: bool = False) -> None:
        self.host = host  # for error messages: whom we talk to
        self.helo = helo
        self.lmtp = lmtp
        self.parser = ReplyParser()
        self.greeting: ServerReply | None = None
        self.extensions: Extensions = NO_EXTENSIONS
        self.hello_reply: ServerReply | None = None
        self.tls = False
        self.authenticated: str | None = None
        self.closing = False  # the server said 421 or we sent QUIT
        self.closing_reply: ServerReply | None = None  # the 421, if that was it
        self._last: Transaction | None = None

    # --- reading ---------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self.parser.feed(data)

    def next_reply(self) -> ServerReply | None:
        """The next complete reply; ProtocolViolation if it is not SMTP."""
        try:
            reply = self.parser.next_reply()
        except ReplyError as e:
            raise ProtocolViolation(f"{self.host}: {e}", host=self.host) from None
        if reply is not None and reply.code == 421:
            self.closing = True  # RFC 5321 3.8: the server closes after a 421
            self.closing_reply = reply
        return reply

    # --- state -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Greeted and introduced: transactions may start."""
        return self.hello_reply is not None and not self.closing

    @property
    def needs_rset(self) -> bool:
        """The last transaction may still be open at the server."""
        return self._last is not None and self._last.needs_rset

    def tls_started(self) -> None:
        """STARTTLS was accepted and the handshake begins: forget everything learned
        in the clear (RFC 3207 4.2).  Bytes the server sent after its 220 would be
        read as if they came over TLS (CVE-2011-0411's mirror): they are an error."""
        dropped = self.parser.clear()
        if dropped:
            raise ProtocolViolation(
                f"{self.host} sent data after its STARTTLS reply: {dropped[:40]!r}",
                host=self.host)
        self.tls = True
        self.extensions = NO_EXTENSIONS
        self.hello_reply = None
        self.authenticated = None
        self.parser.enhanced = False

    def wants_starttls(self, mode: TLSMode) -> bool:
        """Whether to send STARTTLS now under *mode*; TLSUnavailable if it is required
        and the server does not offer it (a downgrade, or a server without TLS)."""
        if self.tls or mode in (TLSMode.NONE, TLSMode.IMPLICIT):
            return False
        if self.extensions.starttls:
            return True
        if mode is TLSMode.REQUIRED:
            raise TLSUnavailable(
                f"TLS is required, but {self.host} does not offer STARTTLS", host=self.host)
        return False

    # --- operations ------------------------------------------------------------------
    def greet(self) -> Greet:
        return Greet(self)

    def hello(self) -> Hello:
        return Hello(self)

    def starttls(self, *, required: bool) -> StartTLS:
        return StartTLS(self, required)

    def authenticate(
        self, username: str, password: str, *, mechanism: str | None = None,
        allow_cleartext: bool = False,
    ) -> Auth:
        """AUTH, after the checks that need no round trip."""
        if self.authenticated is not None:
            raise RuntimeError("already authenticated (RFC 4954 4: AUTH once per session)")
        if not self.tls and not allow_cleartext:
            raise CleartextAuthRefused(
                f"refusing to send a password to {self.host} without TLS "
                "(allow_cleartext_auth=True to do it anyway)", host=self.host)
        offered = self.extensions.auth
        wanted = (mechanism.upper(),) if mechanism else MECHANISMS
        usable = [m for m in wanted if m in offered and m in MECHANISMS]
        if not usable:
            names = " ".join(sorted(offered)) or "no AUTH"
            raise AuthenticationUnavailable(
                f"{self.host} offers {names}; we can do {' '.join(wanted)}", host=self.host)
        return Auth(self, usable[0], username, password)

    def transaction(
        self,
        sender: str,
        recipients: Sequence[str | Recipient],
        *,
        size: int | None = None,
        body_type: BodyType | None = None,
        scan: ContentScan | None = None,
        smtputf8: bool = False,
        dsn: DSN | None = None,
        chunking: bool = True,
    ) -> Transaction:
        """Plan and make one mail transaction (the plan's errors are raised here)."""
        if not self.ready:
            raise RuntimeError("the session is not ready for a transaction")
        plan = plan_transaction(
            sender, recipients, self.extensions, host=self.host, size=size,
            body_type=body_type, scan=scan, smtputf8=smtputf8, dsn=dsn,
            chunking=chunking, reset_first=self.needs_rset)
        self._last = Transaction(plan, lmtp=self.lmtp)
        return self._last

    def command(self, line: str) -> Command:
        """A command we do not know: any single-reply command that leaves the
        session's state alone (NOOP, RSET, VRFY, ETRN, XFORWARD, ...)."""
        if any(c in line for c in "\r\n\0") or len(line) > MAX_COMMAND_LINE - 2:
            raise ValueError("a command is one line without CR, LF or NUL")
        verb = line.split(" ", 1)[0]
        if not _VERB.fullmatch(verb):
            raise ValueError(f"not a command verb: {verb!r}")
        if verb.upper() in _MANAGED:
            raise ValueError(f"{verb.upper()} has its own method: it changes the session")
        return Command(self, line)

    def quit(self) -> Quit:
        return Quit(self)

    def _reset_done(self) -> None:
        self._last = None


class _Step:
    """A one-command operation; subclasses read the reply."""

    phase: Phase | None = Phase.COMMAND

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.done = False

    def _refused(self, what: str, reply: ServerReply) -> ServerRefused:
        self.done = True
        return ServerRefused(
            f"{self.session.host} refused {what}: {reply}", reply=reply, host=self.session.host)


class Greet(_Step):
    """Wait for the 220 greeting (RFC 5321 3.1, 4.3.2: 220, or 554 "no service")."""

    phase = Phase.GREETING

    def start(self) -> bytes:
        return b""

    def on_reply(self, reply: ServerReply) -> bytes:
        if not reply.is_positive:
            raise self._refused("the connection", reply)
        self.session.greeting = reply
        self.done = True
        return b""


class Hello(_Step):
    """EHLO (LHLO for LMTP); HELO when EHLO gets a 5xx (RFC 5321 3.2)."""

    phase = Phase.HELLO

    def __init__(self, session: ClientSession) -> None:
        super().__init__(session)
        self._helo = False

    def start(self) -> bytes:
        verb = "LHLO" if self.session.lmtp else "EHLO"
        return f"{verb} {self.session.helo}\r\n".encode()

    def on_reply(self, reply: ServerReply) -> bytes:
        session = self.session
        if reply.is_positive:
            session.extensions = NO_EXTENSIONS if self._helo else parse_ehlo(reply)
            session.parser.enhanced = session.extensions.enhanced_status_codes
            session.hello_reply = reply
            self.done = True
            return b""
        if reply.is_permanent and not self._helo and not session.lmtp:
            self._helo = True  # an old server: no extensions at all
            return f"HELO {session.helo}\r\n".encode()
        raise self._refused("HELO" if self._helo else "LHLO" if session.lmtp else "EHLO", reply)


class StartTLS(_Step):
    """STARTTLS (RFC 3207).  ``result`` True: start the handshake now; False: refused
    and TLS not required, go on in the clear."""

    phase = Phase.STARTTLS

    def __init__(self, session: ClientSession, required: bool) -> None:
        super().__init__(session)
        self.required = required
        self.result = False
        self.reply: ServerReply | None = None

    def start(self) -> bytes:
        return b"STARTTLS\r\n"

    def on_reply(self, reply: ServerReply) -> bytes:
        self.done = True
        self.reply = reply
        if reply.code == 220:
            self.session.tls_started()
            self.result = True
        elif self.required or reply.code == 421:
            raise TLSUnavailable(
                f"TLS is required, but {self.session.host} refused STARTTLS: {reply}",
                reply=reply, host=self.session.host, permanent=False)
        return b""


class Auth(_Step):
    """AUTH PLAIN (RFC 4616, initial response: one round trip) or LOGIN."""

    phase = Phase.AUTH

    def __init__(self, session: ClientSession, mechanism: str, user: str, password: str):
        super().__init__(session)
        self.mechanism = mechanism
        self._user = user
        self._password = password
        self._answers: list[str] = []
        self._cancelled = False

    def start(self) -> bytes:
        if self.mechanism == "PLAIN":
            if "\0" in self._user or "\0" in self._password:
                raise ValueError("PLAIN credentials cannot contain NUL (RFC 4616 2)")
            response = _b64(f"\0{self._user}\0{self._password}")
            self._answers = [response]  # if the server asks again with an empty 334
            return f"AUTH PLAIN {response}\r\n".encode()
        self._answers = [_b64(self._user), _b64(self._password)]
        return b"AUTH LOGIN\r\n"

    def on_reply(self, reply: ServerReply) -> bytes:
        host = self.session.host
        if reply.code == 334 and not self._cancelled:
            if self._answers:
                return self._answers.pop(0).encode() + b"\r\n"
            self._cancelled = True  # RFC 4954 4: "*" cancels; the server answers 501
            return b"*\r\n"
        self.done = True
        self._password = ""
        if self._cancelled:
            raise AuthenticationFailed(
                f"{host} asked for more than {self.mechanism} has to say: {reply}",
                reply=reply, host=host, permanent=True)
        if not reply.is_positive:
            raise AuthenticationFailed(
                f"{host} refused AUTH {self.mechanism}: {reply}", reply=reply, host=host)
        self.session.authenticated = self._user
        return b""


class Command(_Step):
    """A custom command; ``result`` is the reply, whatever its code."""

    def __init__(self, session: ClientSession, line: str) -> None:
        super().__init__(session)
        self.line = line
        self.result: ServerReply | None = None

    def start(self) -> bytes:
        return self.line.encode("utf-8") + b"\r\n"

    def on_reply(self, reply: ServerReply) -> bytes:
        self.done = True
        self.result = reply
        if reply.is_positive and self.line.split(" ", 1)[0].upper() == "RSET":
            self.session._reset_done()
        return b""


class Quit(_Step):
    """QUIT (RFC 5321 4.1.1.10); ``result`` is the reply (221 normally)."""

    phase = Phase.QUIT

    def __init__(self, session: ClientSession) -> None:
        super().__init__(session)
        self.result: ServerReply | None = None

    def start(self) -> bytes:
        return b"QUIT\r\n"

    def on_reply(self, reply: ServerReply) -> bytes:
        self.done = True
        self.result = reply
        self.session.closing = True  # RFC 5321 4.1.1.10: the server closes now
        return b""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
