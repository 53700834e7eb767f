"""Maildir delivery: one Maildir per recipient, ``ROOT/<domain>/<local part>/``.

This module owns the mapping from an envelope mailbox to a directory and the Maildir
delivery protocol (https://cr.yp.to/proto/maildir.html): a unique file is created in
``tmp/``, written, fsync'd, renamed into ``new/`` and the ``new/`` directory is fsync'd;
only then is the recipient's outcome Accepted (RFC 5321 4.1.1.4 / 6.1: a 250 after DATA
means the server has taken responsibility for the message).

Each stored copy starts with the trace fields of :func:`maitred_tx.envelope.trace_headers`
(Return-Path:, Delivered-To:, Received:) followed by exactly the body bytes the sink
received, binary-safe and with CRLF line ends left as they are.

One copy for all recipients: the body is streamed into the ``tmp/`` file of the first
recipient whose Maildir can be opened; at close, in a thread, that file is committed and
its body part (the bytes after its own trace fields) is copied with ``copy_file_range``
into one file per further distinct Maildir.  If the first recipient's Maildir cannot be
opened, that recipient gets 451 4.3.0 and the next one carries the stream; no spool
directory is needed, and the common single-recipient case is never copied.

Blocking work - creating directories, fsync, rename, copying - runs in a thread pool;
only buffered appends of the streamed chunks happen on the reactor thread.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Final, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from maitred_tx.delivery.base import Delivery
from maitred_tx.envelope import Envelope, SessionContext, trace_headers
from maitred_tx.interfaces import IMessageSink
from maitred_tx.outcomes import Accepted, Outcome, PermanentFailure, TemporaryFailure
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.params import RcptParams

__all__ = ["MaildirDelivery", "maildir_components"]

_log = Logger()
_P = ParamSpec("_P")
_R = TypeVar("_R")

# The answer for a copy that is not on disk: the sender keeps the message and retries.
STORE_FAILED: Final = TemporaryFailure("Could not store message, try again later", 451, "4.3.0")
# RFC 3463 X.1.3 "Bad destination mailbox address syntax": the address is fine for SMTP
# but has no safe name in this store (empty, too long, unencodable, escapes ROOT).
NAME_REFUSED: Final = PermanentFailure("Mailbox name not allowed", 553, "5.1.3")

# POSIX NAME_MAX on every common Linux/BSD file system: one path component, in octets.
_NAME_MAX: Final = 255
# Characters percent-encoded anywhere in a component: the path separators of POSIX and
# Windows, and "%" itself so that the encoding is injective.  Control characters
# (Unicode category Cc: NUL, C0, DEL, C1) are encoded too; a leading "." is encoded
# so that no component is ".", "..", or a hidden name.
_UNSAFE: Final = frozenset("/\\%")
# Buffer for the streamed appends: coalesces small chunks into few write(2) calls;
# chunks larger than it go straight to the kernel.  Bounds the sink's memory.
_WRITE_BUFFER: Final = 64 * 1024
# Fallback copy block when copy_file_range cannot be used (e.g. EXDEV across mounts).
_COPY_BLOCK: Final = 1024 * 1024
_COPY_FALLBACK_ERRNOS: Final = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
)

_counter = itertools.count(1)  # Maildir "Q" part: unique within this process


def _encode_component(text: str) -> str | None:
    """One safe path component for *text*, or None when there is none.

    NFC, lower case, NFC again (lower-casing can decompose, e.g. U+0130); UTF-8 is kept
    as it is, unsafe characters become %XX of their UTF-8 octets.
    """
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())
    out = []
    for i, c in enumerate(text):
        if c in _UNSAFE or (i == 0 and c == ".") or unicodedata.category(c) == "Cc":
            out.append("".join(f"%{b:02X}" for b in c.encode("utf-8")))
        else:
            out.append(c)
    name = "".join(out)
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: not text any file system stores
        return None
    if not 0 < size <= _NAME_MAX:
        return None
    return name


def maildir_components(
    mailbox: Mailbox, postmaster_domain: str = "localhost"
) -> tuple[str, str] | None:
    """``(domain, local part)`` directory names for *mailbox*, or None if it has none.

    The bare ``<Postmaster>`` (domain ``""``, RFC 5321 4.5.1) uses *postmaster_domain*.
    Neither name is ever empty, ".", "..", nor contains a path separator.
    """
    domain = _encode_component(mailbox.domain or postmaster_domain)
    local = _encode_component(mailbox.local_part)
    if domain is None or local is None:
        return None
    return domain, local


def _hostname() -> str:
    """The Maildir host part: "/" and ":" replaced as the Maildir spec asks."""
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


@dataclass(slots=True)
class _Target:
    """One distinct Maildir of the envelope and what became of its copy."""

    mailbox: Mailbox  # the first envelope recipient that maps here (for Delivered-To:)
    maildir: str
    outcome: Outcome | None = None  # None: not decided yet
    errors: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Stream:
    """The tmp/ file the body is streamed into, and where its body part starts."""

    target: _Target
    name: str
    path: str
    file: IO[bytes]
    body_offset: int


class MaildirDelivery(Delivery):
    """Store every accepted message in ``root/<domain>/<local part>/`` (a Maildir).

    *reactor* provides the thread pool (``reactor.getThreadPool()``) unless *threadpool*
    is given; the global reactor is never imported.  Directories are created on demand
    with mode 0o700 and files with 0o600.  Names are lower-cased after NFC
    normalisation, so ``Bob@Example.COM`` and ``bob@example.com`` share a Maildir.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        reactor: IReactorThreads,
        *,
        postmaster_domain: str = "localhost",
        threadpool: ThreadPool | None = None,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        # Resolved once: containment is checked against the root as configured.
        self._real_root = os.path.realpath(self.root)
        self._reactor = reactor
        self._threadpool = threadpool
        self.postmaster_domain = postmaster_domain
        self._hostname = _hostname()

    def maildir_for(self, mailbox: Mailbox) -> str | None:
        """The Maildir path of *mailbox* (pure: no file system access), or None."""
        names = maildir_components(mailbox, self.postmaster_domain)
        return None if names is None else os.path.join(self.root, *names)

    def rcpt_to(
        self,
        context: SessionContext,
        envelope: Envelope,
        recipient: Mailbox,
        params: RcptParams,
    ) -> Outcome | None:
        """Refuse (553 5.1.3) an address that has no safe Maildir name."""
        return NAME_REFUSED if self.maildir_for(recipient) is None else None

    def open_message(self, envelope: Envelope) -> Deferred[_MaildirSink]:
        """Open the stream file in a thread; the Deferred fires with the sink."""
        targets: dict[str, _Target] = {}
        slots: list[_Target] = []
        for recipient in envelope.recipients:
            maildir = self.maildir_for(recipient.mailbox)
            if maildir is None:  # refused at RCPT normally; a hand-built envelope may not be
                slots.append(_Target(recipient.mailbox, "", NAME_REFUSED))
                continue
            if maildir not in targets:
                targets[maildir] = _Target(recipient.mailbox, maildir)
            slots.append(targets[maildir])
        d = self._in_thread(self._open_stream, envelope, list(targets.values()))
        return d.addCallback(lambda stream: _MaildirSink(envelope, self, slots, stream))

    def _in_thread(self, f: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_R]:
        pool = self._threadpool or self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, f, *args, **kwargs)

    # --- everything below runs in the thread pool -------------------------------------

    def _open_stream(self, envelope: Envelope, targets: list[_Target]) -> _Stream | None:
        """Create the first openable recipient's tmp/ file with its trace fields."""
        for target in targets:
            try:
                name, fd, path = self._create_tmp(target, os.O_RDWR)
            except OSError as e:
                target.errors.append(f"open: {e}")
                target.outcome = target.outcome or STORE_FAILED
                continue
            file = open(fd, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115 - owned by _Stream
            try:
                headers = trace_headers(envelope, target.mailbox)
                file.write(headers)
            except OSError as e:
                _discard(file, path)
                target.errors.append(f"write: {e}")
                target.outcome = STORE_FAILED
                continue
            return _Stream(target, name, path, file, len(headers))
        return None

    def _create_tmp(self, target: _Target, access: int) -> tuple[str, int, str]:
        """Make the Maildir if needed and create a new unique file in its tmp/."""
        if not self._inside_root(target.maildir):
            # A symbolic link leads out of ROOT: refused like a bad name (553 5.1.3), and
            # the OSError makes the caller skip this target like any other failure.
            target.outcome = NAME_REFUSED
            raise OSError(errno.EPERM, "Maildir escapes the root", target.maildir)
        self._make_maildir(target.maildir)
        flags = access | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:
            name = self._unique_name()
            path = os.path.join(target.maildir, "tmp", name)
            try:
                return name, os.open(path, flags, 0o600), path
            except FileExistsError:  # a stale file from a reused pid: pick the next Q
                continue

    def _inside_root(self, path: str) -> bool:
        """True if *path*, symbolic links resolved, is strictly inside the root."""
        real = os.path.realpath(path)
        return real != self._real_root and (
            os.path.commonpath([real, self._real_root]) == self._real_root
        )

    def _make_maildir(self, maildir: str) -> None:
        """mkdir -p the Maildir with tmp/ new/ cur/, fsyncing each new entry's parent."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        domain_dir = os.path.dirname(maildir)
        for path in (domain_dir, maildir, *(os.path.join(maildir, s) for s in _SUBDIRS)):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            _fsync_dir(os.path.dirname(path))

    def _unique_name(self) -> str:
        """A Maildir base name: time, microseconds, pid, counter, host."""
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micro}P{os.getpid()}Q{next(_counter)}.{self._hostname}"

    def _store_copy(self, envelope: Envelope, target: _Target, src: _Stream, size: int) -> None:
        """Write one further recipient's copy: its own trace fields, then the body."""
        name, fd, path = self._create_tmp(target, os.O_WRONLY)
        try:
            headers = trace_headers(envelope, target.mailbox)
            _write_all(fd, headers)
            _copy_range(src.file.fileno(), fd, src.body_offset, size - src.body_offset)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        _commit(target.maildir, name, path, len(headers) + size - src.body_offset)

    def _finish(self, envelope: Envelope, stream: _Stream, targets: list[_Target]) -> None:
        """Commit the stream file, then copy its body to every other target."""
        committed = False
        try:
            stream.file.flush()
            fd = stream.file.fileno()
            os.fsync(fd)
            size = os.fstat(fd).st_size
        except OSError as e:
            # The body itself may be incomplete on disk: nobody gets a copy of it.
            for target in targets:
                target.errors.append(f"stream: {e}")
                target.outcome = target.outcome or STORE_FAILED
            _discard(stream.file, stream.path)
            return
        try:
            _commit(stream.target.maildir, stream.name, stream.path, size)
            committed = True
            stream.target.outcome = Accepted()
        except OSError as e:
            stream.target.errors.append(f"commit: {e}")
            stream.target.outcome = STORE_FAILED
        for target in targets:
            if target.outcome is not None:
                continue
            try:
                self._store_copy(envelope, target, stream, size)
                target.outcome = Accepted()
            except OSError as e:
                target.errors.append(f"copy: {e}")
                target.outcome = target.outcome or STORE_FAILED
        if committed:
            stream.file.close()
        else:
            _discard(stream.file, stream.path)


_SUBDIRS: Final = ("tmp", "new", "cur")


@implementer(IMessageSink)
class _MaildirSink:
    """Appends the body to the stream file; commits everything at close.

    ``write`` returns None: the appends go to the page cache through a bounded buffer
    and never wait for the disk (the kernel throttles a writer that dirties pages faster
    than they are written back by briefly blocking it, which bounds memory there too),
    so there is nothing a Deferred could usefully wait for.
    """

    def __init__(
        self,
        envelope: Envelope,
        owner: MaildirDelivery,
        slots: list[_Target],
        stream: _Stream | None,
    ) -> None:
        self.envelope = envelope
        self._owner = owner
        self._slots = slots  # one per envelope recipient; distinct Maildirs share one
        self._stream = stream
        self._state = "open"  # -> "closing" -> "closed", or -> "aborted"

    def _targets(self) -> list[_Target]:
        """The distinct targets in envelope order (the stream's first)."""
        seen: dict[int, _Target] = {}
        for t in self._slots:
            seen.setdefault(id(t), t)
        return list(seen.values())

    def write(self, data: bytes) -> None:
        if self._state != "open" or self._stream is None:
            return
        try:
            self._stream.file.write(data)
        except OSError as e:  # e.g. ENOSPC: the copy is lost for every recipient
            self._fail_stream(f"write: {e}")

    def _fail_stream(self, error: str) -> None:
        assert self._stream is not None
        for target in self._targets():
            target.errors.append(error)
            target.outcome = target.outcome or STORE_FAILED
        _discard(self._stream.file, self._stream.path)
        self._stream = None

    def close(self) -> Deferred[Sequence[Outcome]]:
        """Make every copy durable in a thread; fire with one outcome per recipient."""
        if self._state != "open":
            raise RuntimeError(f"close() on a sink that is {self._state}")
        self._state = "closing"
        targets = self._targets()
        if self._stream is None:
            for target in targets:
                target.outcome = target.outcome or STORE_FAILED
            d: Deferred[None] = Deferred()
            d.callback(None)
        else:
            d = self._owner._in_thread(self._owner._finish, self.envelope, self._stream, targets)
        return d.addCallback(self._outcomes)

    def _outcomes(self, _: None) -> list[Outcome]:
        self._state = "closed"
        self._stream = None
        for target in self._targets():
            for error in target.errors:
                _log.warn(
                    "maildir {maildir}: {message_id} not stored: {error}",
                    maildir=target.maildir,
                    message_id=self.envelope.message_id,
                    error=error,
                )
        return [t.outcome or STORE_FAILED for t in self._slots]

    def abort(self) -> None:
        """Close and remove the tmp/ file; nothing reaches new/.  Idempotent."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._stream is not None:
            _discard(self._stream.file, self._stream.path)
            self._stream = None


def _commit(maildir: str, name: str, tmp_path: str, size: int) -> None:
    """Rename an fsync'd tmp/ file into new/ and fsync new/; undo on failure."""
    final = os.path.join(maildir, "new", f"{name},S={size}")
    try:
        os.rename(tmp_path, final)
    except OSError:
        _unlink(tmp_path)
        raise
    try:
        _fsync_dir(os.path.join(maildir, "new"))
    except OSError:
        # Not known to be durable: withdraw it, the sender will retry.
        _unlink(final)
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy *count* bytes of *src* from *offset* to *dst*'s current position."""
    copy_file_range = getattr(os, "copy_file_range", None)
    while count > 0 and copy_file_range is not None:
        try:
            n = copy_file_range(src, dst, count, offset)
        except OSError as e:
            if e.errno not in _COPY_FALLBACK_ERRNOS:
                raise
            break  # not supported here (e.g. across file systems): copy by hand
        if n == 0:
            raise OSError(errno.EIO, "stream file shorter than expected")
        offset += n
        count -= n
    while count > 0:
        block = os.pread(src, min(count, _COPY_BLOCK), offset)
        if not block:
            raise OSError(errno.EIO, "stream file shorter than expected")
        _write_all(dst, block)
        offset += len(block)
        count -= len(block)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _discard(file: IO[bytes], path: str) -> None:
    """Close *file* without caring about unflushed data, and remove it."""
    # An OSError here is the buffered tail failing to reach a file being thrown away.
    with contextlib.suppress(OSError):
        file.close()
    _unlink(path)
