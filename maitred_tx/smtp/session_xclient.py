"""XCLIENT (Postfix's XCLIENT_README) in the session: only from trusted proxies; once
the glue has applied the new client identity the session starts over with a greeting."""

from __future__ import annotations

from typing import Final

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.commands import XClientCommand
from maitred_tx.smtp.events import SessionInfo, XClientReceived
from maitred_tx.smtp.session_base import SessionBase, greeting
from maitred_tx.smtp.state import State

__all__ = ["XCLIENT_KEYWORD", "XClientVerb"]

# Postfix XCLIENT_README: the attributes we understand, as advertised in EHLO.
XCLIENT_KEYWORD: Final = "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT"


class XClientVerb(SessionBase):
    """XCLIENT and ``xclient_applied`` (the glue's answer)."""

    def _on_xclient(self, command: XClientCommand) -> None:
        if not self.info.trusted:
            self._error(R.R550_XCLIENT_DENIED)
        else:
            self._wait(command, XClientReceived(command.attributes))

    def xclient_applied(self) -> None:
        """The new client identity is in place: start over with a greeting, as Postfix
        does; LOGIN= counts as authenticated (the proxy did the authentication)."""
        command = self._pending
        if not isinstance(command, XClientCommand):
            raise RuntimeError("xclient_applied() without a pending XCLIENT")
        self._pending = None
        if self._closing:
            return
        self._end_transaction(None)
        self.state = State.CONNECTED
        login = command.attributes.login
        self.info = SessionInfo(
            lmtp=self.info.lmtp, tls=self.info.tls, trusted=True, authenticated=login
        )
        self._send(greeting(self.config.lmtp, self.config.hostname))
