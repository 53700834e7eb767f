"""The glue of the per-message authentication checks (issue 5): when they start, where
they run, and the sink that holds the body until their verdict is known.

The checks themselves (SPF, DKIM, ARC, DMARC, the Authentication-Results field) are
pure coroutines in ``maitred_tx.auth.verdicts``; they run on the checks thread
(``maitred_tx.auth.offthread``), never on the reactor.  How one message goes:

1. The body streams into a ``CheckingSink``: a ``Spool`` that keeps ``SPOOL_MEMORY``
   octets in memory and the rest on disk, so a 50 MB message costs the
   same memory as a 1 MB one.  The delivery's sink is not opened yet.
2. At the end of the body the spool is handed to the checks thread (the one hand-over
   per message), which reads the header block and, concurrently, checks SPF for the
   HELO and MAIL FROM identities of the real client address (RFC 7208 2.3, 2.4;
   ``peer_host`` is already the one behind a trusted proxy) and verifies DKIM (every
   signature, RFC 6376) and ARC (RFC 8617), dkimpy's CPU work in a bounded executor;
   then DMARC (RFC 7489) and the listener's policy (``verdicts.decide``): record only
   (default), 451 4.7.0 when a temporary DNS error could change the verdict, 550 5.7.1
   for a DMARC failure under p=reject when asked.  A message over
   ``AuthChecks.max_dkim_size`` gets ``dkim=policy`` unread.
3. Back on the reactor, once: accepted, the delivery's sink is opened with
   ``Envelope.auth`` set and gets our one Authentication-Results field, the header block
   without any field that claims our authserv-id (RFC 8601 5: forgeries), then the rest
   of the message from the spool in chunks, honouring ``write()``'s back-pressure.

SPF starts at the end of the body rather than at MAIL FROM: its answers usually come
from the DNS cache, and one hand-over per message costs the reactor less than two.

Most messages need no hand-over at all.  An unsigned message's verdicts depend only on
the client address, HELO, MAIL FROM, From: field and DNS answers; once computed they are
kept for as long as every answer they used stays cached (``maitred_tx.auth.verdictcache``)
and the next such message is judged on the reactor thread from that cache: a dictionary
lookup, a scan of its header block for signatures and From: fields, and the field.

A bug in the checks never loses mail: the message is delivered without our field (the
forged ones still removed) and the failure is logged.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from maitred_tx.auth.authresults import strip_forged
from maitred_tx.auth.headers import header_end
from maitred_tx.auth.offthread import CPU_THREADS, BridgedResolver, CheckThread
from maitred_tx.auth.resolver import Record, Resolver
from maitred_tx.auth.verdictcache import Expiring, VerdictCache, VerdictKey, verdict_key
from maitred_tx.auth.verdicts import (
    SPF_TIMEOUT,
    AuthResults,
    SPFRequest,
    Verdict,
    check_message,
    decide,
)
from maitred_tx.envelope import Envelope
from maitred_tx.interfaces import IMessageSink
from maitred_tx.outcomes import Outcome, PermanentFailure, TemporaryFailure
from maitred_tx.server.calls import is_later
from maitred_tx.smtp.config import AuthChecks
from maitred_tx.smtp.replies import Reply

__all__ = ["SPF_TIMEOUT", "SPOOL_MEMORY", "AuthChecker", "AuthResults", "CheckingSink",
           "decide"]

_log = Logger()

# Octets of a message kept in memory before the spool moves to a temporary file: most
# mail is far smaller (the median message is a few tens of kB), so it never touches disk.
SPOOL_MEMORY: Final = 1024 * 1024
# Replaying the spool into the delivery: read this much at a time, and give the reactor
# a turn after this much written without back-pressure, so one big message does not
# hold up every other session.
_REPLAY_CHUNK: Final = 256 * 1024
_REPLAY_SLICE: Final = 4 * 1024 * 1024
# Verdicts kept (maitred_tx.auth.verdictcache): one per recent (client, HELO, MAIL
# FROM, From:) combination; each holds a few hundred octets.
VERDICT_CACHE_SIZE: Final = 10000



def _outcome(reply: Reply) -> Outcome:
    text = " ".join(reply.text)
    assert reply.status is not None
    if reply.is_transient:
        return TemporaryFailure(text, reply.code, reply.status)
    return PermanentFailure(text, reply.code, reply.status)


async def _settled(value: Any) -> Any:
    """``value``, or what it resolves to when it is a Deferred or an awaitable."""
    return await value if is_later(value) else value


class Spool:
    """A message being received: its pieces in memory up to ``SPOOL_MEMORY`` octets,
    then all of it in an anonymous temporary file.  Cheaper per write than a
    SpooledTemporaryFile (a list append), and read by offset, so the checks thread
    and the replay share no file position."""

    __slots__ = ("_dir", "_file", "_pieces", "size")

    def __init__(self, directory: str | None = None) -> None:
        self._dir = directory
        self._pieces: list[bytes] = []
        self._file: Any = None
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._pieces.append(data)
        if self.size > SPOOL_MEMORY:  # too big for memory: to disk, from now on
            self._file = tempfile.TemporaryFile(dir=self._dir)  # noqa: SIM115 (close())
            self._file.writelines(self._pieces)
            self._pieces = []

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def read(self, offset: int = 0, size: int = -1) -> bytes:
        """``size`` octets (all with -1) from ``offset`` on."""
        if self._file is None:
            if len(self._pieces) > 1:
                self._pieces = [b"".join(self._pieces)]
            whole = self._pieces[0] if self._pieces else b""
            if offset == 0 and (size < 0 or size >= len(whole)):
                return whole
            return whole[offset : None if size < 0 else offset + size]
        self._file.seek(offset)
        data: bytes = self._file.read(size)
        return data

    def close(self) -> None:
        self._pieces = []
        if self._file is not None:
            self._file.close()


class _Recording:
    """The checks' resolver for one message, noting what was asked and whether every
    answer came (an SPF evaluation cut short by its timeout leaves lookups pending):
    the verdict cache needs both."""

    __slots__ = ("_inner", "asked", "futures")

    def __init__(self, inner: BridgedResolver) -> None:
        self._inner = inner
        self.asked: set[tuple[str, str]] = set()
        self.futures: list[asyncio.Future[Sequence[Record]]] = []

    def lookup(self, name: str, rtype: str) -> asyncio.Future[Sequence[Record]]:
        self.asked.add((name, rtype))
        future = self._inner.lookup(name, rtype)
        self.futures.append(future)
        return future

    @property
    def complete(self) -> bool:
        return all(f.done() and not f.cancelled() for f in self.futures)


class AuthChecker:
    """Runs the checks of every message of the listeners it is given to.

    ``resolver``: every DNS lookup (``maitred_tx.auth.dns.TwistedResolver`` in
    production); it is asked on the reactor thread, its cache read from the checks
    thread.  ``cpu_threads``: the executor for dkimpy's RSA and hashing.  The checks
    thread starts on first use; ``stop()`` ends it (``SMTPService`` does both with the
    service).
    """

    def __init__(
        self,
        reactor: Any,
        resolver: Resolver,
        *,
        cpu_threads: int = CPU_THREADS,
        spf_timeout: float = SPF_TIMEOUT,
        spool_dir: str | None = None,
    ) -> None:
        self._reactor = reactor
        self.resolver = resolver
        self.thread = CheckThread(reactor, cpu_threads=cpu_threads)
        self._bridged = BridgedResolver(reactor, resolver)
        self._spf_timeout = spf_timeout
        self.spool_dir = spool_dir
        # Only a resolver that says how long its answers stay cached lets verdicts be
        # kept (maitred_tx.auth.dns.TwistedResolver does).
        self._expiring: Expiring | None = (
            cast(Expiring, resolver) if callable(getattr(resolver, "expires", None)) else None)
        self.verdicts = VerdictCache(VERDICT_CACHE_SIZE if self._expiring else 0,
                                     reactor.seconds)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    def spf_request(self, envelope: Envelope) -> SPFRequest:
        """The HELO and MAIL FROM checks (RFC 7208 2.3, 2.4) for the real client
        address (``peer_host``, already the one behind a trusted proxy)."""
        context = envelope.session
        sender = envelope.sender
        return SPFRequest(context.peer_host, None if sender is None else str(sender),
                          context.helo or "", context.hostname, self._spf_timeout)

    def cached_verdict(self, spool: Spool, envelope: Envelope, settings: AuthChecks,
                       max_header: int) -> tuple[Verdict | None, VerdictKey | None]:
        """On the reactor: the verdict from the verdict cache when it holds one for
        this message, and the message's key there (None when its verdict may not be
        kept: signed, or large From: fields)."""
        if self._expiring is None:
            return None, None
        first = spool.read(0, max_header + 4)
        end = header_end(first)
        if end is None:  # no body: all of it is header when it fits (check_message)
            end = len(first) if len(first) == spool.size else 0
        head = first[:end]
        context = envelope.session
        sender = envelope.sender
        key = verdict_key(head, context.peer_host, context.helo or "",
                          None if sender is None else str(sender), context.hostname)
        hit = None if key is None else self.verdicts.get(key)
        if hit is None:
            return None, key
        prefix = hit.header + strip_forged(head, context.hostname)
        refusal = decide(hit.results, settings, hit.temporary)
        return Verdict(hit.results, refusal, prefix, end), key

    def verdict(self, spool: Spool, envelope: Envelope, settings: AuthChecks,
                max_header: int, key: VerdictKey | None = None) -> Deferred[Verdict]:
        """The verdict on a spooled message, computed on the checks thread and fired on
        the reactor: the one hand-over per message.  With a *key*, the verdict is kept
        in the verdict cache as long as the DNS answers it used."""
        sender = envelope.sender
        recording = _Recording(self._bridged)
        hostname = envelope.session.hostname
        d = self.thread.submit(self._verdict(
            spool, self.spf_request(envelope), None if sender is None else str(sender),
            settings, hostname, max_header, recording,
        ))
        if key is not None:
            d.addCallback(self._keep, key, hostname, recording)
        return d

    def _keep(self, verdict: Verdict, key: VerdictKey, authserv_id: str,
              recording: _Recording) -> Verdict:
        """On the reactor, when a message's verdict is back: keep it for the next."""
        results = verdict.results
        if results is not None and self._expiring is not None and recording.complete:
            self.verdicts.put(key, results, authserv_id, recording.asked, self._expiring)
        return verdict

    async def _verdict(self, spool: Spool, spf: SPFRequest, mail_from: str | None,
                       settings: AuthChecks, authserv_id: str, max_header: int,
                       resolver: Resolver) -> Verdict:
        """On the checks thread, which owns the spool until the verdict is back."""

        async def read() -> bytes:
            if spool.in_memory:
                return spool.read()
            return await self.thread.run_cpu(spool.read)  # from disk: not on the loop

        return await check_message(
            resolver, self.thread.run_cpu, first=spool.read(0, max_header + 4),
            size=spool.size, read=read, spf=spf, mail_from=mail_from, settings=settings,
            authserv_id=authserv_id,
        )

    def sink(
        self,
        envelope: Envelope,
        settings: AuthChecks,
        open_sink: Callable[[Envelope], Any],
        max_header: int,
    ) -> CheckingSink:
        """The sink the glue streams the body into when the checks apply."""
        return CheckingSink(self, envelope, settings, open_sink, max_header)

    async def pause(self) -> None:
        """Give the reactor a turn (between replayed chunks)."""
        await deferLater(self._reactor, 0, lambda: None)


@implementer(IMessageSink)
class CheckingSink:
    """Spools the body; at ``close()`` has it checked, then delivers it (or refuses it)
    through the sink ``open_sink(envelope)`` gives, with our header prepended."""

    def __init__(
        self,
        checker: AuthChecker,
        envelope: Envelope,
        settings: AuthChecks,
        open_sink: Callable[[Envelope], Any],
        max_header: int,
    ) -> None:
        self.envelope = envelope
        self._checker = checker
        self._settings = settings
        self._open = open_sink
        self._max_header = max_header
        self._spool = Spool(checker.spool_dir)
        self.auth: AuthResults | None = None  # the verdicts, once known

    def write(self, data: bytes) -> None:
        self._spool.write(data)

    def abort(self) -> None:
        self._spool.close()

    def close(self) -> Any:
        checker = self._checker
        try:
            verdict, key = checker.cached_verdict(self._spool, self.envelope,
                                                  self._settings, self._max_header)
        except Exception:  # a bug in the cache's path: the checks thread's path decides
            _log.failure("{peer} message {message_id}: the verdict cache failed",
                         peer=self.envelope.session.peer_host,
                         message_id=self.envelope.message_id)
            verdict, key = None, None
        if verdict is not None:  # judged from the verdict cache, on this thread
            try:
                outcome = self._deliver(verdict)
            except BaseException:
                self._spool.close()
                raise
            if isinstance(outcome, Deferred):
                return outcome.addBoth(self._closed)
            return self._closed(outcome)
        d = checker.verdict(self._spool, self.envelope, self._settings, self._max_header,
                            key)
        return d.addCallback(self._deliver).addBoth(self._closed)

    def _closed(self, result: Any) -> Any:
        self._spool.close()
        return result

    def _deliver(self, verdict: Verdict) -> Any:
        """Back on the reactor: log the verdict, then refuse, or deliver.  Plain calls
        while the delivery answers at once (the usual case); coroutines only for a
        delivery that answers later or a message too large to hand over in one write."""
        results = verdict.results
        session = self.envelope.session
        if results is None:
            _log.error(
                "{peer} message {message_id}: authentication checks failed, "
                "delivering without a verdict\n{error}",
                peer=session.peer_host, session_id=session.session_id,
                message_id=self.envelope.message_id, error=verdict.error,
            )
        else:
            self.auth = results  # the glue logs it with the message's outcome
            spf_bug = results.spf_helo.error if results.spf_helo is not None else None
            if spf_bug is not None:
                _log.error(
                    "{peer} message {message_id}: SPF check failed: temperror\n{error}",
                    peer=session.peer_host, session_id=session.session_id,
                    message_id=self.envelope.message_id, error=spf_bug,
                )
            if verdict.refusal is not None:
                return _outcome(verdict.refusal)
        sink = self._open(self.envelope.with_auth(results))
        if is_later(sink) or self._spool.size - verdict.offset > _REPLAY_CHUNK:
            return ensureDeferred(self._deliver_later(sink, verdict))
        spool = self._spool
        try:
            written = sink.write(verdict.prefix + spool.read(verdict.offset))
        except BaseException:
            sink.abort()
            raise
        if is_later(written):
            return ensureDeferred(self._close_later(sink, written))
        closed = sink.close()  # may be a coroutine (async def close): awaited, not returned
        return ensureDeferred(_settled(closed)) if is_later(closed) else closed

    async def _deliver_later(self, opened: Any, verdict: Verdict) -> Any:
        sink = await _settled(opened)
        try:
            await self._replay(sink, verdict.prefix, verdict.offset)
        except BaseException:
            sink.abort()
            raise
        return await _settled(sink.close())

    async def _close_later(self, sink: Any, written: Any) -> Any:
        try:
            await written  # back-pressure: the delivery is not ready for more
        except BaseException:
            sink.abort()
            raise
        return await _settled(sink.close())

    async def _replay(self, sink: Any, prefix: bytes, offset: int) -> None:
        spool = self._spool
        if not prefix:
            prefix = spool.read(offset, _REPLAY_CHUNK)
            offset += len(prefix)
        chunk, unpaused = prefix, 0
        while chunk:
            result = sink.write(chunk)
            if is_later(result):
                await result  # back-pressure: the delivery is not ready for more
                unpaused = 0
            else:
                unpaused += len(chunk)
                if unpaused >= _REPLAY_SLICE:
                    await self._checker.pause()
                    unpaused = 0
            chunk = spool.read(offset, _REPLAY_CHUNK)
            offset += len(chunk)
