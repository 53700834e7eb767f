"""The client's public API: :class:`SMTPClient` (one connection, several messages) and
:func:`send_message` (connect, send one message, quit).

Every method is a coroutine for Twisted's ``Deferred.fromCoroutine`` /
``pytest_twisted.ensureDeferred`` / ``inlineCallbacks`` world; the reactor is always
passed in.  Operations on one client are serialized: concurrent ``send()`` calls on
the same client queue up rather than interleave on the wire.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import DeferredLock
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.protocol import Factory

from maitred_tx.client.body import scan_body
from maitred_tx.client.errors import ConnectionLost, SMTPClientError
from maitred_tx.client.extensions import Extensions
from maitred_tx.client.message import DSN, Recipient
from maitred_tx.client.protocol import ClientProtocol
from maitred_tx.client.replies import ServerReply
from maitred_tx.client.session import ClientSession, TLSMode
from maitred_tx.client.source import DEFAULT_CHUNK, BodySource
from maitred_tx.client.timeouts import Timeouts
from maitred_tx.client.transaction import SendResult
from maitred_tx.smtp.params import BodyType

__all__ = ["SMTPClient", "send_message", "tls_options"]


def tls_options(
    hostname: str | None,
    *,
    trust_root: Any = None,
    verify: bool = True,
    client_certificate: ssl.PrivateCertificate | None = None,
) -> Any:
    """Client TLS settings: TLS 1.2 at least (RFC 8996), and unless *verify* is False
    the certificate chain checked against *trust_root* and the name against
    *hostname* (service_identity, RFC 6125).  *trust_root*: None for the platform's
    CAs, a PEM file path (one or more CA certificates) or an ``IOpenSSLTrustRoot``."""
    if not verify:
        extra: dict[str, Any] = {}
        if client_certificate is not None:
            extra = {"privateKey": client_certificate.privateKey.original,
                     "certificate": client_certificate.original}
        return ssl.CertificateOptions(
            verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2, **extra)
    if not hostname:
        raise ValueError("tls_hostname is needed to verify the server's certificate")
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=_trust_root(trust_root),
        clientCertificate=client_certificate,
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
    )


def _trust_root(trust_root: Any) -> Any:
    if trust_root is None:
        return ssl.platformTrust()
    if isinstance(trust_root, str | os.PathLike):
        with open(trust_root, "rb") as f:
            pem = f.read()
        marker = b"-----END CERTIFICATE-----"
        certificates = [
            ssl.Certificate.loadPEM(block + marker)
            for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block
        ]
        if not certificates:
            raise ValueError(f"no PEM certificate in {os.fspath(trust_root)!r}")
        return ssl.trustRootFromCertificates(certificates)
    return trust_root


class _ClientFactory(Factory):
    def __init__(self, session: ClientSession, clock: Any, timeouts: Timeouts) -> None:
        self.session, self.clock, self.timeouts = session, clock, timeouts

    def buildProtocol(self, addr: IAddress | None) -> ClientProtocol:
        return ClientProtocol(self.session, self.clock, self.timeouts)


class SMTPClient:
    """One SMTP or LMTP connection: greeted, introduced and (as asked) under TLS."""

    def __init__(
        self, protocol: ClientProtocol, *, tls_settings: Any = None,
        chunking: bool = True, chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.protocol = protocol
        self.session = protocol.session
        self._tls_settings = tls_settings
        self._chunking = chunking
        self._chunk_size = chunk_size
        self._lock = DeferredLock()

    @classmethod
    async def connect(
        cls,
        reactor: Any,
        endpoint: str | IStreamClientEndpoint,
        *,
        helo: str | None = None,
        tls: TLSMode = TLSMode.REQUIRED,
        tls_hostname: str | None = None,
        trust_root: Any = None,
        verify_certificate: bool | None = None,
        client_certificate: ssl.PrivateCertificate | None = None,
        lmtp: bool = False,
        timeouts: Timeouts | None = None,
        chunking: bool = True,
        chunk_size: int = DEFAULT_CHUNK,
        clock: Any = None,
    ) -> SMTPClient:
        """Connect to *endpoint* (a Twisted client endpoint string such as
        ``"tcp:mail.example.com:587"``, or an endpoint), read the greeting, EHLO (LHLO
        with *lmtp*), and STARTTLS as *tls* says, verifying the certificate against
        *tls_hostname* (default: the endpoint's host).  OPPORTUNISTIC does not verify
        unless *verify_certificate* is True; the other modes verify unless it is False.
        *helo* defaults to our address as an address literal (RFC 5321 4.1.4).
        *chunking*: send with BDAT whenever the server offers CHUNKING.
        *clock*: where timeouts are scheduled (default: the reactor)."""
        if isinstance(endpoint, str) and endpoint.split(":", 1)[0].lower() in ("tls", "ssl"):
            raise ValueError("give a tcp: endpoint and tls=TLSMode.IMPLICIT: the client does "
                             "the TLS itself (verification, errors that name the host)")
        host = tls_hostname or _endpoint_host(endpoint)
        verify = (tls is not TLSMode.OPPORTUNISTIC) if verify_certificate is None \
            else verify_certificate
        settings: Any = None if tls is TLSMode.NONE else tls_options(
            host, trust_root=trust_root, verify=verify, client_certificate=client_certificate)
        target = clientFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
        if tls is TLSMode.IMPLICIT:
            target = wrapClientTLS(settings, target)
        session = ClientSession(host=host or "server", helo=helo or "", lmtp=lmtp)
        session.tls = tls is TLSMode.IMPLICIT  # TLS from the first byte: AUTH may go
        factory = _ClientFactory(session, clock or reactor, timeouts or Timeouts())
        try:
            protocol: ClientProtocol = await target.connect(factory)  # type: ignore[assignment]
        except Exception as e:
            raise ConnectionLost(f"cannot connect to {session.host}: {e}",
                                 host=session.host, permanent=False) from e
        protocol.tls_handshake_pending = tls is TLSMode.IMPLICIT
        if not helo:
            session.helo = _address_literal(protocol.transport.getHost())
        client = cls(protocol, tls_settings=settings, chunking=chunking, chunk_size=chunk_size)
        try:
            await client._open(tls)
        except BaseException as e:
            if isinstance(e, SMTPClientError) and e.local_ip is None:
                e.local_ip = protocol.local_ip  # e.g. no STARTTLS: a TLS report names it
            client.abort()
            raise
        return client

    async def _open(self, mode: TLSMode) -> None:
        session = self.session
        await self.protocol.run(session.greet())
        await self.protocol.run(session.hello())
        if session.wants_starttls(mode):
            op = await self.protocol.run(session.starttls(required=mode is TLSMode.REQUIRED))
            if op.result:
                self.protocol.start_tls(self._tls_settings)
                await self.protocol.run(session.hello())  # RFC 3207 4.2: EHLO again

    # --- what the connection knows ---------------------------------------------------
    @property
    def host(self) -> str:
        return self.session.host

    @property
    def extensions(self) -> Extensions:
        """What the last EHLO/LHLO reply offered."""
        return self.session.extensions

    @property
    def greeting(self) -> ServerReply | None:
        return self.session.greeting

    @property
    def tls(self) -> bool:
        return self.session.tls

    @property
    def authenticated(self) -> str | None:
        return self.session.authenticated

    @property
    def connected(self) -> bool:
        return self.protocol.lost is None and not self.session.closing

    # --- operations ------------------------------------------------------------------
    async def authenticate(
        self, username: str, password: str, *, mechanism: str | None = None,
        allow_cleartext_auth: bool = False,
    ) -> None:
        """AUTH PLAIN (or LOGIN if that is all the server offers, or *mechanism*).
        Refused without TLS unless *allow_cleartext_auth*: the password would be
        readable on the network."""
        await self._locked(self._run_step, self.session.authenticate(
            username, password, mechanism=mechanism, allow_cleartext=allow_cleartext_auth))

    async def send(
        self,
        sender: str,
        recipients: str | Sequence[str | Recipient],
        body: Any,
        *,
        dsn: DSN | None = None,
        size: int | None = None,
        body_type: BodyType | None = None,
        smtputf8: bool = False,
    ) -> SendResult:
        """Send one message; the result has one entry per recipient.

        *body*: bytes, a binary file, an ``email.message.Message``, or an (async)
        iterable of bytes; streamed in chunks.  *size*: its size when the source
        cannot tell (for SIZE=, RFC 1870).  *body_type*: what the body is; by default
        a bytes body is scanned (8-bit: 8BITMIME; binary: BINARYMIME by BDAT) and a
        stream is sent as 8-bit text and checked on the way.  *sender* ``""`` is the
        null reverse-path of a bounce.  A recipient may be a :class:`Recipient` with
        its own DSN parameters."""
        if isinstance(recipients, str):
            recipients = [recipients]
        return await self._locked(self._send, sender, recipients, body, dsn, size,
                                  body_type, smtputf8)

    async def _send(
        self, sender: str, recipients: Sequence[str | Recipient], body: Any,
        dsn: DSN | None, size: int | None, body_type: BodyType | None, smtputf8: bool,
    ) -> SendResult:
        self._check_connected()
        source = BodySource(body, self._chunk_size, smtputf8=smtputf8)
        scan = None
        if source.whole is not None and body_type is not BodyType.BINARY_MIME:
            scan = scan_body(source.whole)
        tx = self.session.transaction(
            sender, recipients, size=size if size is not None else source.size,
            body_type=body_type, scan=scan, smtputf8=smtputf8, dsn=dsn,
            chunking=self._chunking)
        return await self.protocol.transact(tx, source)

    async def command(self, line: str) -> ServerReply:
        """Send one command the client does not know and return its reply, whatever
        its code (``NOOP``, ``RSET``, ``VRFY x``, ``XFORWARD ...``)."""
        op = await self._locked(self._run_step, self.session.command(line))
        reply: ServerReply = op.result
        return reply

    async def quit(self) -> ServerReply | None:
        """QUIT and close; the server's reply, or None if there was none.  Never raises
        for the server's sake: the connection is closed either way."""
        if self.protocol.lost is not None:
            return None
        reply = None
        try:
            op = await self._locked(self._run_step, self.session.quit())
            reply = op.result
        except SMTPClientError:
            pass
        await self._close()
        return reply

    def abort(self) -> None:
        """Drop the connection now (recipients of a message in flight: temporary)."""
        transport = self.protocol.transport
        if transport is not None and self.protocol.lost is None:
            transport.abortConnection()

    async def __aenter__(self) -> SMTPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.quit()

    # --- internals -------------------------------------------------------------------
    async def _run_step(self, op: Any) -> Any:
        self._check_connected()
        return await self.protocol.run(op)

    async def _locked(self, function: Any, *args: Any) -> Any:
        await self._lock.acquire()
        try:
            return await function(*args)
        finally:
            self._lock.release()

    def _check_connected(self) -> None:
        if self.protocol.lost is not None:
            raise self.protocol.lost
        if self.session.closing:
            reply = self.session.closing_reply
            said = f": {reply}" if reply is not None else ""
            raise ConnectionLost(f"{self.host} is closing the connection{said}",
                                 host=self.host, reply=reply, permanent=False)

    async def _close(self) -> None:
        """Close, and wait (a bounded time) until the connection is gone."""
        protocol = self.protocol
        if protocol.lost is not None:
            return
        protocol.close()
        deadline = protocol.clock.callLater(protocol.timeouts.quit, self.abort)
        await protocol.closed
        if deadline.active():
            deadline.cancel()


async def send_message(
    reactor: Any,
    endpoint: str | IStreamClientEndpoint,
    sender: str,
    recipients: str | Sequence[str | Recipient],
    body: Any,
    *,
    auth: tuple[str, str] | None = None,
    allow_cleartext_auth: bool = False,
    dsn: DSN | None = None,
    body_type: BodyType | None = None,
    smtputf8: bool = False,
    **connect: Any,
) -> SendResult:
    """Connect, AUTH if *auth* = (user, password), send one message, QUIT.  The other
    keyword arguments go to :meth:`SMTPClient.connect`."""
    client = await SMTPClient.connect(reactor, endpoint, **connect)
    try:
        if auth is not None:
            await client.authenticate(*auth, allow_cleartext_auth=allow_cleartext_auth)
        return await client.send(sender, recipients, body, dsn=dsn, body_type=body_type,
                                 smtputf8=smtputf8)
    finally:
        await client.quit()


def _endpoint_host(endpoint: str | IStreamClientEndpoint) -> str | None:
    """The host of a ``tcp:``/``tls:``/``tcp6:`` endpoint string (positional or
    ``host=``), the path of a ``unix:`` one; None for anything else."""
    if not isinstance(endpoint, str):
        return None
    parts, part, escaped = [], "", False
    for c in endpoint:  # Twisted's syntax: ":" separates, "\:" is a literal colon
        if escaped:
            part, escaped = part + c, False
        elif c == "\\":
            escaped = True
        elif c == ":":
            parts.append(part)
            part = ""
        else:
            part += c
    parts.append(part)
    kind, args = parts[0].lower(), parts[1:]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    positional = [a for a in args if "=" not in a]
    if kind in ("tcp", "tcp6", "tls", "ssl"):
        return named.get("host") or (positional[0] if positional else None)
    if kind == "unix":
        return named.get("path") or (positional[0] if positional else None)
    return None


def _address_literal(address: Any) -> str:
    """Our own address as an EHLO argument (RFC 5321 4.1.4: an address literal when
    the client has no meaningful name)."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return "localhost"  # a UNIX socket: the name hardly matters
    return f"[IPv6:{host}]" if ":" in host else f"[{host}]"
