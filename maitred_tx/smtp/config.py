"""Configuration of the pure core: limits and policy, with secure defaults.

Every default names its precedent (an RFC minimum or what Postfix ships) so that a
change to one is a deliberate decision, not a guess.  Anything that widens what the
server accepts (relaying, bigger limits, bare line endings) must be asked for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["AuthChecks", "AuthTempError", "BareLineEndings", "Config", "Limits"]


class Mode(enum.Enum):
    """What a listener is for; each has its own rules (issue: modes per listener)."""

    MX = "mx"  # mail from the world for the local domains; AUTH refused
    SUBMISSION = "submission"  # RFC 6409: authenticated users, any recipient domain
    LMTP = "lmtp"  # RFC 2033: LHLO, one reply per recipient after the body


class BareLineEndings(enum.Enum):
    """What to do with a bare CR or bare LF inside a message body.

    Neither ever ends the message or ends DATA mode: only CRLF.CRLF does (RFC 5321
    4.1.1.4), whatever this says.  ``REJECT`` (the default) refuses such a message after
    its end with 550 5.6.0 so that no downstream MTA that treats a bare LF as a line end
    can be fed a smuggled second message (the CVE-2023-51764 family; Postfix 3.9's
    ``smtpd_forbid_bare_newline = reject``).  ``REJECT`` also refuses a NUL in a text
    body (RFC 5322 2.3): an MTA that strips NULs would see CRLF NUL "." CRLF as an end
    of data.  ``ACCEPT`` stores the bytes as sent.
    """

    REJECT = "reject"
    ACCEPT = "accept"


class AuthTempError(enum.Enum):
    """What to do with a message whose authentication verdict hit a temporary DNS error
    that could change it (see ``AuthChecks``)."""

    ACCEPT = "accept"  # deliver; the Authentication-Results field says temperror
    DEFER = "defer"  # 451 4.7.0 after the body: the sender retries (RFC 7208 8.6)


@dataclass(frozen=True, slots=True)
class AuthChecks:
    """Inbound email authentication (SPF, DKIM, ARC, DMARC) on one listener (issue 5).

    The checks need a resolver and their own thread: ``SMTPService`` (and ``twistd
    maitred``) build them; a bare ``SMTPFactory`` checks only when given a checker.
    By default verdicts are only *recorded* in an Authentication-Results field: like
    OpenDMARC's RejectFailures=false and Postfix policyd-spf's defaults for DMARC, a
    receiver acts on them only when asked.  Authenticated (submission) sessions are never
    checked: the checks are about mail from strangers.
    """

    # None: on for MX and submission listeners, off for LMTP (an LMTP server sits behind
    # another MTA, which has checked already: RFC 8601 5 lets the border MTA vouch).
    enabled: bool | None = None
    # DEFER answers 451 4.7.0 when a temporary DNS error could change the verdict.
    temperror: AuthTempError = AuthTempError.ACCEPT
    # Refuse (550 5.7.1, after the body) a message whose DMARC result is fail and whose
    # author domain asks for p=reject (RFC 7489 6.7, 7.3 leave enforcement to us).
    dmarc_reject: bool = False
    # DKIM/ARC verification holds the whole message in memory (dkimpy): larger messages
    # get dkim=policy instead.  Postfix's message_size_limit, our default max size, so
    # every message a default server accepts is verified; raise max_message_size and
    # bigger ones are skipped rather than held in memory (SpamAssassin skips far sooner).
    max_dkim_size: int = 10_240_000

    def __post_init__(self) -> None:
        if self.max_dkim_size < 0:
            raise ValueError("max_dkim_size must not be negative")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one peer may make the server hold or do."""

    # RFC 5321 4.5.3.1.4 sets 512 octets; RFC 1869 lets extensions add to it (ORCPT,
    # ENVID, AUTH=).  Postfix's line_length_limit is 2048.
    max_command_line: int = 2048
    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.  Exim
    # rejects longer lines by default (message_linelength_limit 998) as we do.
    max_text_line: int = 1000
    # Postfix header_size_limit is 102400; one header block larger than this is abuse.
    max_header_block: int = 102_400
    # RFC 5321 4.5.3.1.8 requires at least 100; Postfix smtpd_recipient_limit is 1000.
    max_recipients: int = 1000
    # Postfix message_size_limit is 10240000.  Advertised in EHLO SIZE (RFC 1870).
    max_message_size: int = 10_240_000
    # Postfix smtpd_hard_error_limit is 20 and soft limit 10; we close at the soft one.
    max_errors: int = 10
    # RFC 5321 4.5.3.2.7: a server should wait at least 5 minutes for the next command.
    command_timeout: float = 300.0
    # RFC 5321 4.5.3.2.5/6 allow 3 and 10 minutes between data blocks; Postfix uses 300s.
    data_timeout: float = 300.0
    # A whole session may not last longer than this (Postfix smtpd_per_request_deadline
    # is the idea; no RFC sets one).  Ends slow-drip sessions that reset the idle timer.
    session_deadline: float = 1800.0
    # Failed AUTH attempts before 421 4.7.0 and close; each failure is answered later
    # and later (RFC 4954 4 leaves the limit to the server; Postfix closes after 20
    # errors, we are stricter because each guess is a password guess).
    max_auth_failures: int = 3
    # Simultaneous sessions from one client address (Postfix
    # smtpd_client_connection_count_limit is 50); 0 means no limit.
    max_client_connections: int = 50
    # New sessions and messages per client address per minute (Postfix's
    # *_rate_limit; off there by default, off here too); 0 means no limit.
    max_client_connection_rate: int = 0
    max_client_message_rate: int = 0
    # Loop detection (RFC 5321 6.3): more Received: fields than this in the header block
    # the client sent is refused with 554 5.4.6 after the body; 0 means no limit.  6.3:
    # "SMTP servers using this technique SHOULD use a large rejection threshold,
    # normally at least 100 Received entries."  Postfix's hopcount_limit is 50 (its own
    # Received: counted, and refused at 50), Exim's received_headers_max 30, sendmail's
    # MaxHopCount 25, qmail's 100: we follow the RFC's SHOULD (as qmail does), counting
    # only the client's fields; a loop still ends after 100 passes, within seconds.
    max_hops: int = 100

    def __post_init__(self) -> None:
        if self.max_recipients < 100:
            raise ValueError("max_recipients must be at least 100 (RFC 5321 4.5.3.1.8)")
        if self.max_command_line < 512:
            raise ValueError("max_command_line must be at least 512 (RFC 5321 4.5.3.1.4)")
        if self.max_text_line < 1000:
            raise ValueError("max_text_line must be at least 1000 (RFC 5321 4.5.3.1.6)")
        for name in ("max_header_block", "max_message_size", "max_errors", "max_auth_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_hops < 0:
            raise ValueError("max_hops must not be negative (0: no limit)")
        for name in ("command_timeout", "data_timeout", "session_deadline"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the pure core needs to decide; one object, secure defaults.

    ``local_domains`` are the domains mail is accepted for.  ``relay`` = True accepts
    mail for every domain: an open relay unless the listener is protected otherwise.
    """

    hostname: str = "localhost"
    local_domains: frozenset[str] = frozenset({"localhost"})
    limits: Limits = field(default_factory=Limits)
    bare_line_endings: BareLineEndings = BareLineEndings.REJECT
    relay: bool = False
    mode: Mode = Mode.MX
    # A certificate is configured: offer STARTTLS (RFC 3207) on this listener.
    starttls: bool = False
    # Refuse MAIL until the session is under TLS (RFC 3207 4: 530 5.7.0).
    require_tls: bool = False
    # A twisted.cred portal is configured: AUTH may be offered (never in MX or LMTP).
    auth: bool = False
    # DANGEROUS: offer AUTH on a cleartext session (passwords in the clear).
    insecure_auth: bool = False
    # Connections from trusted proxies on this listener start with a PROXY v1/v2 header
    # (HAProxy's send-proxy[-v2]); without one they are closed.  The PROXY spec forbids
    # guessing, so a listener either expects the header or never reads one (Postfix's
    # smtpd_upstream_proxy_protocol).  XCLIENT works either way.
    proxy_protocol: bool = False
    # SPF, DKIM, ARC and DMARC verdicts in an Authentication-Results field (issue 5).
    auth_checks: AuthChecks = field(default_factory=AuthChecks)

    @property
    def checks_messages(self) -> bool:
        """True when this listener runs the authentication checks (``AuthChecks``)."""
        enabled = self.auth_checks.enabled
        return self.mode is not Mode.LMTP if enabled is None else enabled

    @property
    def lmtp(self) -> bool:
        return self.mode is Mode.LMTP

    @property
    def submission(self) -> bool:
        return self.mode is Mode.SUBMISSION

    def __post_init__(self) -> None:
        from maitred_tx.smtp.address import normalize_domain

        domains = frozenset(normalize_domain(d) for d in self.local_domains)
        object.__setattr__(self, "local_domains", domains)

    def is_local_domain(self, domain: str) -> bool:
        """True when *domain* (already normalised by the address parser) is ours."""
        return domain in self.local_domains
