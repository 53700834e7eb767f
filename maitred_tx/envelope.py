"""What a delivery is told about a session and a message, and the trace header.

These are plain values (no Twisted) so that deliveries and their tests can build them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.params import MailParams, RcptParams

__all__ = ["Envelope", "Recipient", "SessionContext", "received_header", "trace_headers"]


@dataclass(frozen=True, slots=True)
class SessionContext:
    """The connection as the delivery sees it; a new value after every EHLO/HELO."""

    session_id: str
    hostname: str  # ours, as in the greeting
    peer_host: str
    peer_port: int
    local_host: str = ""
    local_port: int = 0
    helo: str | None = None
    esmtp: bool = False
    lmtp: bool = False
    tls: bool = False
    tls_version: str | None = None  # e.g. "TLSv1.3", when known
    tls_cipher: str | None = None
    tls_client_certificate: str | None = None  # its subject, if one was presented
    authenticated: str | None = None  # the AUTH (or XCLIENT LOGIN=) identity
    proxied_by: str | None = None  # the trusted proxy's address when PROXY/XCLIENT was used


@dataclass(frozen=True, slots=True)
class Recipient:
    mailbox: Mailbox
    params: RcptParams = field(default_factory=RcptParams)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One transaction: who sent it to whom, with every MAIL/RCPT parameter parsed."""

    session: SessionContext
    message_id: str  # our queue id, unique per transaction; in Received: and logs
    sender: Mailbox | None  # None: the null reverse-path (a bounce)
    params: MailParams
    recipients: tuple[Recipient, ...]
    received_at: float = field(default_factory=time.time)
    chunked: bool = False  # the body arrived by BDAT
    # The SPF/DKIM/ARC/DMARC verdicts (a maitred_tx.auth.checks.AuthResults) when the
    # listener checks messages (issue 5); None when it does not.  Typed Any so that this
    # module stays free of the checks' imports.
    auth: Any = None

    def with_auth(self, auth: Any) -> Envelope:
        """``replace(self, auth=auth)``, for every checked message: dataclasses.replace
        inspects the fields on each call, at several times the cost of naming them."""
        return Envelope(self.session, self.message_id, self.sender, self.params,
                        self.recipients, self.received_at, self.chunked, auth)


def _protocol(env: Envelope) -> str:
    """RFC 3848 / RFC 6531 4.3 "with" keyword."""
    s = env.session
    if s.lmtp:
        base = "LMTP"
    elif not s.esmtp:
        base = "SMTP"
    elif env.params.smtputf8:
        base = "UTF8SMTP"
    else:
        base = "ESMTP"
    if s.tls:
        base += "S"
    if s.authenticated:
        base += "A"
    return base


def _clean(text: str) -> str:
    """Peer-supplied text in a header: printable, no structure characters."""
    return "".join(c if c.isprintable() and c not in "()[];\\" else "?" for c in text)[:255]


def received_header(env: Envelope, recipient: Mailbox | None = None) -> bytes:
    """The RFC 5321 4.4 Received: field, folded with CRLF, ending with CRLF."""
    s = env.session
    helo = _clean(s.helo or "unknown")
    lines = [
        f"Received: from {helo} ([{_clean(s.peer_host)}])",
        f"\tby {s.hostname} (maitred_tx) with {_protocol(env)} id {env.message_id}",
    ]
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>")
    lines[-1] += ";"
    lines.append(f"\t{formatdate(env.received_at)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def trace_headers(env: Envelope, recipient: Mailbox) -> bytes:
    """Return-Path:, Delivered-To: and Received:, as prepended at final delivery."""
    sender = "" if env.sender is None else str(env.sender)
    return (
        f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
        + received_header(env, recipient)
    )
