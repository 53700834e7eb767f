"""Who the client really is: PROXY v1/v2 headers from trusted proxies, XCLIENT, and
the per-client limits counted against that address (issue 4)."""

from __future__ import annotations

from dataclasses import replace

from maitred_tx.server.logevents import log
from maitred_tx.server.protocol_tls import StartTlsHandling
from maitred_tx.smtp import replies as R
from maitred_tx.smtp.events import XClientReceived
from maitred_tx.smtp.proxy import ProxyError, ProxyHeader, parse_proxy_header

__all__ = ["ProxiedClient"]

# The first bytes of a PROXY header: v1 text, or the v2 binary signature.
_PROXY_V1 = b"PROXY "
_PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


class ProxiedClient(StartTlsHandling):
    """The PROXY header, the XClientReceived event, and admission by client address."""

    def _admit(self, client: str, at_connect: bool = False) -> None:
        """Count the session against *client*'s limits; over them: 421 4.7.0."""
        self._client, self._counted = client, True
        limiter, session = self.factory.limiter, self.session
        assert session is not None
        refused = limiter.admit(client)
        if refused is not None:
            log.info("{peer} refused: {limit} limit", peer=client, limit=refused)
            self.factory.metrics.session_refused(refused)
            if at_connect:
                # The 421 replaces the greeting, not follows it (RFC 5321 3.1, as
                # Postfix answers): drop the 220 the session has queued but not sent.
                session.data_to_send()
            session.close_with(R.R421_CLIENT_RATE if refused == "rate" else R.R421_CLIENT_LIMIT)
            self._drive()

    def _proxy_header(self, data: bytes) -> bytes:
        """Take the PROXY header off the front of a trusted proxy's stream (HAProxy's
        send-proxy / send-proxy-v2).  No header where one is expected closes the
        connection: guessing would let a client forge one (the PROXY spec, 2.)."""
        buf = (self._proxy_buf or b"") + data
        sig = _PROXY_V2 if buf[:1] == b"\r" else _PROXY_V1
        if not (buf.startswith(sig) or sig.startswith(buf[: len(sig)])):
            log.info("{peer} sent no PROXY header: closing", peer=self._peer())
            self._proxy_buf = None
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return b""
        try:
            header = parse_proxy_header(buf)
        except ProxyError as e:
            log.info("{peer} bad PROXY header: {error}", peer=self._peer(), error=str(e))
            self._proxy_buf = None
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return b""
        if header is None:
            self._proxy_buf = buf
            return b""
        self._proxy_buf = None
        self._apply_proxy(header)
        return buf[header.length :]

    def _apply_proxy(self, header: ProxyHeader) -> None:
        policy, session = self.policy, self.session
        assert policy is not None and session is not None
        proxy = policy.context.peer_host
        if header.command == "PROXY" and header.source is not None:
            host, port = header.source
            policy.context = replace(policy.context, peer_host=host, peer_port=port,
                                     proxied_by=proxy)
        if header.tls is not None:
            # The proxy terminated TLS for us (PP2_TYPE_SSL): the session counts as TLS.
            tls = header.tls
            policy.context = replace(policy.context, tls=True, tls_version=tls.version,
                                     tls_cipher=tls.cipher,
                                     tls_client_certificate=tls.common_name)
            session.info = replace(session.info, tls=True)
            self.factory.metrics.tls_session("proxy")
        self._admit(policy.context.peer_host)

    def _on_xclient(self, event: XClientReceived) -> None:
        session, policy = self.session, self.policy
        assert session is not None and policy is not None
        x = event.attributes
        self._forget_client()
        context = policy.context
        policy.context = replace(
            context,
            peer_host=x.addr or context.peer_host,
            peer_port=x.port if x.port is not None else context.peer_port,
            helo=x.helo or context.helo,
            authenticated=x.login,
            proxied_by=context.proxied_by or context.peer_host,
        )
        if x.addr and x.addr != self._client:
            if self._counted:
                self.factory.limiter.connection_closed(self._client)
            self._admit(x.addr)
        session.xclient_applied()
