"""STARTTLS (RFC 3207) on the connection: the 220 goes out in the clear, the handshake
starts, and whatever the client said before it is forgotten (4.2)."""

from __future__ import annotations

from typing import Any

from maitred_tx.server.protocol_auth import AuthHandling
from maitred_tx.smtp.events import StartTlsRequested

__all__ = ["StartTlsHandling"]


class StartTlsHandling(AuthHandling):
    """The StartTlsRequested event."""

    def _on_starttls(self, event: StartTlsRequested) -> None:
        session = self.session
        assert session is not None
        self._flush()  # the 220 goes out in the clear, then the handshake starts
        transport: Any = self.transport
        transport.startTLS(self.factory.tls)
        session.tls_started()
        self.factory.metrics.tls_session("starttls")
        # RFC 3207 4.2: forget what the client told us in the clear (EHLO, AUTH).
        self._forget_client(tls=True)
