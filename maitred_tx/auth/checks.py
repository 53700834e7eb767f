"""The per-message authentication pipeline (issue 5): SPF, DKIM, ARC and DMARC verdicts
for one message, the Authentication-Results field (RFC 8601) that carries them, and the
sink that holds the body until they are known.

The only auth module besides ``dns`` that touches Twisted.  How one message goes:

1. MAIL FROM: ``AuthChecker.start_spf`` starts the HELO and MAIL FROM checks (RFC 7208
   2.3, 2.4) for the real client address (``SessionContext.peer_host``, already the one
   behind a trusted proxy); they run while RCPT and the body arrive.
2. The body streams into a ``CheckingSink``: a ``SpooledTemporaryFile`` that keeps
   ``SPOOL_MEMORY`` octets in memory and the rest on disk, so a 50 MB message costs the
   same memory as a 1 MB one.  The delivery's sink is not opened yet.
3. At the end of the body: DKIM (every signature, RFC 6376) and ARC (RFC 8617) read the
   spooled message, their CPU work in the checker's bounded thread pool; DMARC (RFC
   7489) takes the RFC5322.From domains, the SPF domain and result, and the d= of the
   passing signatures.  Unsigned messages never leave the reactor thread; a message
   over ``AuthChecks.max_dkim_size`` gets ``dkim=policy`` unread.
4. ``decide`` applies the listener's policy: record only (default), 451 4.7.0 when a
   temporary DNS error could change the verdict (``AuthTempError.DEFER``), 550 5.7.1
   for a DMARC failure under p=reject (``dmarc_reject``).
5. Accepted: the delivery's sink is opened with ``Envelope.auth`` set, and gets our one
   Authentication-Results field, then the header block without any field that claims
   our authserv-id (RFC 8601 5: forgeries), then the rest of the message from the spool
   in chunks, honouring ``write()``'s back-pressure Deferreds.

A bug in the checks never loses mail: the message is delivered without our field (the
forged ones still removed) and the failure is logged.
"""

from __future__ import annotations

import ipaddress
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from inspect import isawaitable
from typing import Any, Final, TypeVar, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from maitred_tx.auth import spf
from maitred_tx.auth.arc import ARCResult, verify_arc
from maitred_tx.auth.authresults import (
    DKIMEntry,
    SPFEntry,
    format_authentication_results,
    strip_forged,
)
from maitred_tx.auth.dkim import DKIMResult, header_fields, lenient_tags, verify_dkim
from maitred_tx.auth.dmarc import DMARCVerdict, check_dmarc_authors
from maitred_tx.auth.headers import from_domains, header_end
from maitred_tx.auth.resolver import Record, Resolver
from maitred_tx.envelope import Envelope, SessionContext
from maitred_tx.interfaces import IMessageSink
from maitred_tx.outcomes import Outcome, PermanentFailure, TemporaryFailure
from maitred_tx.smtp import replies as R
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.config import AuthChecks, AuthTempError
from maitred_tx.smtp.replies import Reply

__all__ = ["SPOOL_MEMORY", "AuthChecker", "AuthResults", "CheckingSink", "decide"]

_log = Logger()
_T = TypeVar("_T")

# Octets of a message kept in memory before the spool moves to a temporary file: most
# mail is far smaller (the median message is a few tens of kB), so it never touches disk.
SPOOL_MEMORY: Final = 1024 * 1024
# Replaying the spool into the delivery: read this much at a time, and give the reactor
# a turn after this much written without back-pressure, so one big message does not
# hold up every other session.
_REPLAY_CHUNK: Final = 256 * 1024
_REPLAY_SLICE: Final = 4 * 1024 * 1024
# The SPF evaluation as a whole (up to 10 DNS-querying terms, RFC 7208 4.6.4, each with
# the resolver's own timeout): RFC 7208 4.6.4 asks for an overall limit "at least 20
# seconds"; past it the result is temperror.
SPF_TIMEOUT: Final = 20.0

SPFPair = tuple[spf.SPFVerdict, spf.SPFVerdict]  # (helo, mailfrom)


@dataclass(frozen=True, slots=True)
class AuthResults:
    """Every verdict about one message, handed to the delivery as ``Envelope.auth``.

    ``spf_helo`` / ``spf_mailfrom``: None when SPF could not run (the client address is
    no IP address, e.g. a UNIX socket).  ``mail_from``: the reverse-path, None for the
    null path (then the MAIL FROM check is the HELO one, RFC 7208 2.4, and only
    ``smtp.helo`` is reported).  ``dkim``: one result per DKIM-Signature, in header
    order.  ``arc``: None when not evaluated (message too large).  ``dkim_skipped``:
    why signatures were not verified, None when they were.
    """

    spf_helo: spf.SPFVerdict | None
    spf_mailfrom: spf.SPFVerdict | None
    mail_from: str | None
    dkim: tuple[DKIMResult, ...]
    arc: ARCResult | None
    dmarc: DMARCVerdict
    dkim_skipped: str | None = None

    def header(self, authserv_id: str) -> bytes:
        """Our one Authentication-Results field, CRLF-terminated (RFC 8601 2.2)."""
        entries: list[SPFEntry] = []
        if self.spf_mailfrom is not None and self.mail_from:
            entries.append(SPFEntry(self.spf_mailfrom.result, self.mail_from, "mailfrom"))
        if self.spf_helo is not None:
            entries.append(SPFEntry(self.spf_helo.result, _printable(self.spf_helo.domain),
                                    "helo"))
        dkim = [
            DKIMEntry(r.result, _printable(r.domain), _printable(r.selector), _printable(r.b))
            for r in self.dkim
        ] or [DKIMEntry("none")]
        return format_authentication_results(
            authserv_id, spf=entries, dkim=dkim, arc=self.arc, dmarc=self.dmarc
        )

    def temporary(self) -> list[str]:
        """The checks whose temporary DNS error could change the verdict: DMARC's own,
        or, when DMARC did not pass, SPF (MAIL FROM) and DKIM temperrors (a pass among
        them could have made DMARC pass).  A HELO temperror alone never matters."""
        if self.dmarc.result == "pass":
            return []
        found = []
        mailfrom = self.spf_mailfrom
        if mailfrom is not None and mailfrom.result is spf.SPFResult.TEMPERROR:
            found.append("spf")
        if any(r.result == "temperror" for r in self.dkim):
            found.append("dkim")
        if self.dmarc.result == "temperror":
            found.append("dmarc")
        return found

    def summary(self) -> str:
        """One line for the log: ``spf=pass dkim=pass,fail arc=none dmarc=pass``."""
        spf_result = self.spf_mailfrom.result.value if self.spf_mailfrom else "-"
        dkim = ",".join(r.result for r in self.dkim) or "none"
        arc = self.arc.result if self.arc else "-"
        return f"spf={spf_result} dkim={dkim} arc={arc} dmarc={self.dmarc.result}"


def _printable(text: str | None) -> str | None:
    """A value from the message for the header, or None when it holds control
    characters (which would let it forge header lines, RFC 8601 2.2)."""
    if text is None or any(ord(c) < 32 or ord(c) == 127 for c in text):
        return None
    return text


def decide(results: AuthResults, settings: AuthChecks) -> Reply | None:
    """The listener's policy: a refusal for the message, or None to deliver it.

    A temporary error that could change the verdict is deferred (451) when asked; a
    DMARC failure under p=reject is refused (550) when asked, but only when no
    temporary error and no unverified (oversized) signature could have made it pass.
    """
    temporary = results.temporary()
    if temporary and settings.temperror is AuthTempError.DEFER:
        return R.R451_AUTH_TEMPERROR.format(checks=", ".join(temporary))
    dmarc = results.dmarc
    if (settings.dmarc_reject and dmarc.result == "fail" and dmarc.disposition == "reject"
            and not temporary and results.dkim_skipped is None):
        return R.R550_DMARC_REJECT.format(domain=dmarc.from_domain)
    return None


def _outcome(reply: Reply) -> Outcome:
    text = " ".join(reply.text)
    assert reply.status is not None
    if reply.is_transient:
        return TemporaryFailure(text, reply.code, reply.status)
    return PermanentFailure(text, reply.code, reply.status)


async def _settled(value: Any) -> Any:
    """``value``, or what it resolves to when it is a Deferred or an awaitable."""
    if isinstance(value, Deferred) or isawaitable(value):
        return await value
    return value


class AuthChecker:
    """Runs the checks of every message of the listeners it is given to.

    ``resolver``: every DNS lookup (``maitred_tx.auth.dns.TwistedResolver`` in
    production).  ``threadpool``: where dkimpy's CPU work runs.  ``SMTPService`` gives
    a dedicated pool of 2 threads started and stopped with the service, rather than the
    reactor's pool: RSA and hashing are CPU-bound, so more threads than cores only
    queue on the GIL; each verification holds a message in memory, so the pool size
    bounds that memory too; and the reactor's pool (10 threads) stays free for what
    must not wait behind a burst of signatures: the Maildir's fsyncs and renames, and
    host name lookups.  Without one, the reactor's pool is used.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: Resolver,
        *,
        threadpool: ThreadPool | None = None,
        spf_timeout: float = SPF_TIMEOUT,
        spool_dir: str | None = None,
    ) -> None:
        self._reactor = reactor
        self.resolver: Resolver = cast(Resolver, _Started(resolver))
        self._pool = threadpool
        self._spf_timeout = spf_timeout
        self.spool_dir = spool_dir

    # --- the parts ---------------------------------------------------------------------

    def run_cpu(self, fn: Callable[[], _T]) -> Awaitable[_T]:
        """``fn()`` in the thread pool (dkimpy's CPURunner)."""
        reactor: IReactorThreads = self._reactor
        pool = self._pool if self._pool is not None else reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, fn)

    def start_spf(self, context: SessionContext, sender: Mailbox | None) -> Deferred[Any]:
        """The HELO and MAIL FROM checks, started at MAIL time; fires with an SPFPair
        (None when the client address is no IP address), never fails."""
        try:
            ipaddress.ip_address(context.peer_host)
        except ValueError:
            return succeed(None)
        helo = context.helo or ""
        mail_from = None if sender is None else str(sender)
        d = ensureDeferred(spf.check(self.resolver, context.peer_host, mail_from, helo,
                                     receiver=context.hostname))
        clock: IReactorTime = self._reactor
        d.addTimeout(self._spf_timeout, clock)
        return d.addErrback(self._spf_failed, helo, mail_from)

    def _spf_failed(self, failure: Failure, helo: str, mail_from: str | None) -> SPFPair:
        if failure.check(defer.TimeoutError):
            reason = f"SPF evaluation took longer than {self._spf_timeout:g}s"
        else:
            _log.failure("SPF check failed: temperror", failure)
            reason = f"SPF evaluation failed: {type(failure.value).__name__}"
        domain = mail_from.rpartition("@")[2] if mail_from else helo
        temp = spf.SPFResult.TEMPERROR
        return (spf.SPFVerdict(temp, "helo", helo, reason=reason),
                spf.SPFVerdict(temp, "mailfrom", domain, reason=reason))

    async def verify(
        self,
        spool: Any,
        size: int,
        head: bytes,
        spf_pair: Deferred[Any],
        mail_from: str | None,
        settings: AuthChecks,
    ) -> AuthResults:
        """DKIM, ARC and DMARC for the spooled message (``size`` octets, header block
        ``head``), with the SPF verdicts of ``spf_pair``."""
        names = {name.lower() for name, _ in header_fields(head)}
        signed = b"dkim-signature" in names
        sealed = any(n.startswith(b"arc-") for n in names)
        skipped = None
        dkim_results: Sequence[DKIMResult] = ()
        arc: ARCResult | None = ARCResult("none", 0, None, "message is not ARC signed")
        if (signed or sealed) and size > settings.max_dkim_size:
            skipped = f"message larger than {settings.max_dkim_size} octets: not verified"
            dkim_results = _unverified(head, skipped)
            arc = None
        elif signed or sealed:
            message = await self._read(spool, size)
            dkim_d = ensureDeferred(verify_dkim(message, self.resolver, self.run_cpu))
            if sealed:
                arc = await verify_arc(message, self.resolver, self.run_cpu)
            dkim_results = await dkim_d
            del message
        pair = await spf_pair
        helo_verdict, mail_verdict = pair if pair is not None else (None, None)
        dmarc = await check_dmarc_authors(
            self.resolver,
            from_domains(head),
            spf_domain=mail_verdict.domain if mail_verdict else None,
            spf_pass=mail_verdict is not None and mail_verdict.result is spf.SPFResult.PASS,
            dkim_pass_domains=[r.domain for r in dkim_results if r.result == "pass"],
        )
        return AuthResults(helo_verdict, mail_verdict, mail_from, tuple(dkim_results), arc,
                           dmarc, skipped)

    async def _read(self, spool: Any, size: int) -> bytes:
        """The whole spooled message: from memory on this thread, from disk in the pool."""

        def read() -> bytes:
            spool.seek(0)
            data: bytes = spool.read()
            return data

        if size <= SPOOL_MEMORY:
            return read()
        return await self.run_cpu(read)

    def sink(
        self,
        envelope: Envelope,
        settings: AuthChecks,
        spf_pair: Deferred[Any],
        open_sink: Callable[[Envelope], Any],
        max_header: int,
    ) -> CheckingSink:
        """The sink the glue streams the body into when the checks apply."""
        return CheckingSink(self, envelope, settings, spf_pair, open_sink, max_header)

    async def pause(self) -> None:
        """Give the reactor a turn (between replayed chunks)."""
        await deferLater(self._reactor, 0, lambda: None)


class _Started:
    """A Resolver whose ``lookup()`` starts the query at the call (a Deferred) instead
    of when first awaited (a coroutine): the DKIM/ARC key lookups of a message, asked
    for together, then run concurrently (maitred_tx.auth.dkim.fetch_keys)."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    def lookup(self, name: str, rtype: str) -> Deferred[Sequence[Record]]:
        return ensureDeferred(self._resolver.lookup(name, rtype))


def _unverified(head: bytes, reason: str) -> list[DKIMResult]:
    """``policy`` for every signature of a message too large to verify (RFC 8601
    2.7.1: signed, but some aspect was not acceptable to the ADMD)."""
    results = []
    for name, value in header_fields(head):
        if name.lower() == b"dkim-signature":
            tags = lenient_tags(value)
            b = "".join(tags.get("b", "").split())
            results.append(DKIMResult("policy", tags.get("d", ""), tags.get("s", ""), b,
                                      tags.get("a", ""), reason))
    return results


@implementer(IMessageSink)
class CheckingSink:
    """Spools the body; at ``close()`` checks it, then delivers it (or refuses it)
    through the sink ``open_sink(envelope)`` gives, with our header prepended."""

    def __init__(
        self,
        checker: AuthChecker,
        envelope: Envelope,
        settings: AuthChecks,
        spf_pair: Deferred[Any],
        open_sink: Callable[[Envelope], Any],
        max_header: int,
    ) -> None:
        self.envelope = envelope
        self._checker = checker
        self._settings = settings
        self._spf = spf_pair
        self._open = open_sink
        self._max_header = max_header
        self._spool: Any = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed in close/abort)
            max_size=SPOOL_MEMORY, dir=checker.spool_dir
        )
        self._size = 0

    def write(self, data: bytes) -> None:
        self._spool.write(data)
        self._size += len(data)

    def abort(self) -> None:
        self._spool.close()

    def close(self) -> Deferred[Any]:
        return ensureDeferred(self._finish())

    async def _finish(self) -> Any:
        spool = self._spool
        try:
            spool.seek(0)
            first: bytes = spool.read(self._max_header + 4)
            end = header_end(first)
            if end is None:  # no body: all of it is header when it fits
                end = len(first) if len(first) == self._size else 0
            head = first[:end]
            results = await self._results(head)
            if results is not None:
                reply = decide(results, self._settings)
                if reply is not None:
                    self._log(results, reply)
                    return _outcome(reply)
                self._log(results, None)
            authserv_id = self.envelope.session.hostname
            ours = results.header(authserv_id) if results is not None else b""
            sink = await _settled(self._open(replace(self.envelope, auth=results)))
            try:
                await self._replay(sink, ours + strip_forged(head, authserv_id), end)
            except BaseException:
                sink.abort()
                raise
            return await _settled(sink.close())
        finally:
            spool.close()

    async def _results(self, head: bytes) -> AuthResults | None:
        sender = self.envelope.sender
        try:
            return await self._checker.verify(
                self._spool, self._size, head, self._spf,
                None if sender is None else str(sender), self._settings,
            )
        except Exception:
            _log.failure("authentication checks failed: delivering without a verdict")
            return None

    async def _replay(self, sink: Any, prefix: bytes, offset: int) -> None:
        spool = self._spool
        spool.seek(offset)
        chunk, unpaused = prefix or spool.read(_REPLAY_CHUNK), 0
        while chunk:
            result = sink.write(chunk)
            if isinstance(result, Deferred) or isawaitable(result):
                await result  # back-pressure: the delivery is not ready for more
                unpaused = 0
            else:
                unpaused += len(chunk)
                if unpaused >= _REPLAY_SLICE:
                    await self._checker.pause()
                    unpaused = 0
            chunk = spool.read(_REPLAY_CHUNK)

    def _log(self, results: AuthResults, reply: Reply | None) -> None:
        session = self.envelope.session
        _log.info(
            "{peer} message {message_id} auth: {verdicts}{action}",
            peer=session.peer_host,
            session_id=session.session_id,
            message_id=self.envelope.message_id,
            verdicts=results.summary(),
            action="" if reply is None else f" -> {reply.code} {reply.status}",
            dmarc_domain=results.dmarc.from_domain,
        )
