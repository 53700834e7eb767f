"""STARTTLS (RFC 3207) in the session: the 220, then nothing from before the handshake
survives it: buffered input, the transaction, the EHLO (4.2, CVE-2011-0411)."""

from __future__ import annotations

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.commands import StartTls
from maitred_tx.smtp.events import SessionInfo, StartTlsRequested
from maitred_tx.smtp.session_base import SessionBase
from maitred_tx.smtp.state import State

__all__ = ["StartTlsVerb"]


class StartTlsVerb(SessionBase):
    """STARTTLS and ``tls_started`` (the glue's answer once the handshake began)."""

    def _on_starttls(self, command: StartTls) -> None:
        if not self.config.starttls:
            self._error(R.R502_STARTTLS_UNAVAILABLE)
        elif self.info.tls:
            self._error(R.R503_TLS_ACTIVE)
        else:
            self._send(R.R220_READY_TLS)
            # RFC 3207 4.2 / CVE-2011-0411: nothing the client sent before the handshake
            # may be read as a command afterwards.
            self._in, self._pos = b"", 0
            self._wait(command, StartTlsRequested())

    def tls_started(self) -> None:
        """The handshake is under way: forget everything from before it (RFC 3207 4.2)."""
        if not isinstance(self._pending, StartTls):
            raise RuntimeError("tls_started() without a pending STARTTLS")
        self._pending = None
        self._in, self._pos = b"", 0
        self._end_transaction(None)
        self.state = State.CONNECTED
        self.info = SessionInfo(lmtp=self.info.lmtp, tls=True, trusted=self.info.trusted)
