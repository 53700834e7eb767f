"""AUTH (RFC 4954) in the session: who may authenticate where, the SASL exchange over
the following lines (``maitred_tx.smtp.sasl`` parses them), and the answer once the
glue has checked the credentials; failures are counted and, past the limit, close."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from maitred_tx.smtp import replies as R
from maitred_tx.smtp.commands import Auth
from maitred_tx.smtp.events import AuthRequested
from maitred_tx.smtp.sasl import (
    MAX_RESPONSE_LINE,
    Challenge,
    Credentials,
    SaslError,
    SaslExchange,
)
from maitred_tx.smtp.session_base import SessionBase

__all__ = ["AuthVerb"]


class AuthVerb(SessionBase):
    """AUTH, the SASL lines that follow it, and ``auth_result`` (the glue's answer)."""

    def _on_auth(self, command: Auth) -> None:
        if not (self.config.submission and self.config.auth):
            self._error(R.R503_AUTH_UNAVAILABLE)  # MX and LMTP listeners refuse AUTH
        elif self.info.authenticated is not None:
            self._error(R.R503_ALREADY_AUTHENTICATED)  # RFC 4954 4
        elif not self._auth_offered():
            self._error(R.R538_ENCRYPTION_REQUIRED)  # RFC 4954 6
        else:
            exchange = SaslExchange(command.mechanism)
            self._sasl_step(exchange, lambda: exchange.start(command.initial))

    def _sasl_step(
        self, exchange: SaslExchange, step: Callable[[], Challenge | Credentials]
    ) -> None:
        try:
            result = step()
        except SaslError as e:
            self._sasl = None
            self._error(e.reply)
            return
        if isinstance(result, Challenge):
            self._sasl = exchange
            self._out.append(result.encode())
        else:
            self._sasl = None
            self._wait(Auth(exchange.mechanism), AuthRequested(exchange.mechanism, result))

    def _read_sasl_line(self) -> bool:
        buf, pos = self._in, self._pos
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos > MAX_RESPONSE_LINE + 2:  # RFC 4954 4
                self._in, self._pos, self._sasl = b"", 0, None
                self._skip_line = True
                self._error(R.R500_AUTH_LINE_TOO_LONG)
                return True
            return False
        self._pos = nl + 1
        exchange = self._sasl
        assert exchange is not None
        line = buf[pos:nl].removesuffix(b"\r").decode("ascii", "replace")
        self._sasl_step(exchange, lambda: exchange.respond(line))
        return True

    def auth_result(self, identity: str | None) -> None:
        """Answer the pending AuthRequested: the authenticated identity, or None."""
        if not isinstance(self._pending, Auth):
            raise RuntimeError("auth_result() without a pending AUTH")
        self._pending = None
        if self._closing:
            return
        if identity is None:
            self.auth_failures += 1
            self._error(R.R535_AUTH_FAILED)
            if self.auth_failures >= self._limits.max_auth_failures:
                self._close_with(R.R421_TOO_MANY_AUTH_FAILURES)
            return
        self.info = replace(self.info, authenticated=identity)
        self._send(R.R235_AUTH_OK)

    def _auth_offered(self) -> bool:
        """AUTH is for submission only, and never in the clear unless told (issue 4)."""
        config, info = self.config, self.info
        return (
            config.submission
            and config.auth
            and info.authenticated is None
            and (info.tls or config.insecure_auth)
        )
