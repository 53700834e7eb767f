"""What the client's outcomes mean for the queue: per-recipient attempt results and
the enhanced status of an error, and the DSN parameters passed on.  Kept apart from
the sending itself so that both read as what they are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from twisted.logger import Logger

from maitred_tx.client import (
    DSN,
    AuthenticationFailed,
    AuthenticationUnavailable,
    CleartextAuthRefused,
    ConnectionLost,
    Recipient,
    SendResult,
    SMTPClient,
    SMTPClientError,
    TLSUnavailable,
    TLSVerificationFailed,
)
from maitred_tx.client.transaction import Outcome
from maitred_tx.queue.store import AttemptResult, QueuedMessage, QueuedRecipient, QueueReply
from maitred_tx.queue.store import RecipientState as S

__all__ = ["AUTH_ERRORS", "TLS_ERRORS", "attempt_results", "dsn_of", "recipient_of",
           "stale", "status_of_error"]

_log = Logger()

# The errors of a smarthost's AUTH and of TLS: configuration problems, deferred.
AUTH_ERRORS: Final = (AuthenticationFailed, AuthenticationUnavailable, CleartextAuthRefused)
TLS_ERRORS: Final = (TLSUnavailable, TLSVerificationFailed)


def dsn_of(message: QueuedMessage) -> DSN:
    """RET and ENVID for the next hop.  Our server takes any printable ENVID (a space
    too, as xtext "+20"), the client sends none with a space: such an ENVID is left
    out rather than the message kept from delivery."""
    try:
        return DSN(ret=message.ret, envid=message.envid)
    except ValueError as e:
        _log.info("{id}: ENVID not passed on: {why}", id=message.id, why=str(e))
        return DSN(ret=message.ret)


def recipient_of(r: QueuedRecipient) -> Recipient:
    """The client's Recipient for a queued one, with its RFC 3461 NOTIFY and ORCPT."""
    orcpt = r.orcpt[1] if r.orcpt is not None else None
    return Recipient(r.address, notify=r.notify, orcpt=orcpt)


def attempt_results(result: SendResult, recipients: Sequence[QueuedRecipient], host: str,
                    client: SMTPClient) -> list[AttemptResult]:
    """The client's per-recipient outcomes as the queue's attempt results.  A next hop
    that announced DSN got our NOTIFY and reports success itself (DELIVERED with
    remote_dsn); one that did not is RELAYED (RFC 3461 4.1, RFC 3464 2.3.3)."""
    remote_dsn = "DSN" in client.extensions
    out = []
    for r, rr in zip(recipients, result.recipients, strict=True):
        reply = rr.reply or rr.rcpt_reply
        queue_reply = None if reply is None else QueueReply(
            reply.code, reply.status, " ".join(reply.lines)[:500])
        if rr.outcome is Outcome.DELIVERED:
            state = S.DELIVERED if remote_dsn else S.RELAYED
        elif rr.outcome is Outcome.PERMANENT:
            state = S.FAILED
        else:
            state = S.DEFERRED
        diagnostic = None
        if reply is None and result.error is not None:
            diagnostic = f"{host}: {result.error}"
        out.append(AttemptResult(r.address, state, reply=queue_reply, diagnostic=diagnostic,
                                 status=None if reply is not None else "4.4.2",
                                 remote_mta=host, remote_dsn=remote_dsn and r.notify
                                 is not None))
    return out


def stale(outcome: SendResult | SMTPClientError | None) -> bool:
    """A transaction that found its (reused) connection gone before MAIL was answered."""
    if isinstance(outcome, ConnectionLost):
        return True
    return (isinstance(outcome, SendResult) and outcome.mail_reply is None
            and isinstance(outcome.error, ConnectionLost))


def status_of_error(e: SMTPClientError) -> str:
    """The enhanced status (RFC 3463) a recipient gets for an error that kept the
    transaction from running: the server's own where it gave one."""
    if isinstance(e, AUTH_ERRORS):
        # Deferred whatever the code (Postfix's smtp_sasl_auth_soft_bounce): 535 5.7.8
        # is reported as 4.7.8 (RFC 4954 6); 454, or no usable mechanism, as 4.7.0.
        code, status = (0, None) if e.reply is None else (e.reply.code, e.reply.status)
        return "4" + status[1:] if status else "4.7.8" if code == 535 else "4.7.0"
    reply = getattr(e, "reply", None)
    if reply is not None and getattr(reply, "status", None):
        return str(reply.status)
    if isinstance(e, TLSUnavailable | TLSVerificationFailed):
        return "4.7.5" if not e.permanent else "5.7.5"
    return "5.0.0" if e.permanent else "4.4.1"
