"""The embedded queue store: one spool directory on the local file system.

Layout (every directory 0o700, every file 0o600)::

    SPOOL/tmp/          files being written; whatever is here at start is deleted
    SPOOL/msg/ID        a message body (with our Received: field), never changed
    SPOOL/env/ID.json   its envelope and state (maitred_tx.queue.codec), replaced
                        atomically (write tmp/, fsync, rename, fsync env/)
    SPOOL/corrupt/      files quarantined at start or on read, for an operator
    SPOOL/lock          held (flock) by the one server process using the spool
    SPOOL/flush         exists while a flush asked from outside is not yet taken
    SPOOL/new           exists while messages a --workers worker added are not indexed
    SPOOL/journal       attempts noted before their envelope's rewrite (journal_attempt)

The durability protocol and what a crash can do are in :mod:`maitred_tx.queue.store`.
Here: a body is fsync'd and renamed into ``msg/`` and ``msg/`` is fsync'd before its
envelope is written, so that after any crash an envelope never names a body that is
not there; the envelope's rename (then ``env/``'s fsync) is the commit point.

Concurrency: the server and the CLI (``maitred-queue``, another process) may change a
message at the same time, so every read-modify-write of an envelope holds an
exclusive ``flock`` on the message's body file - per message, so the CLI never stalls
deliveries of other messages; a deleted message's body is gone, and so is the lock.
The in-memory index (id -> next attempt, held) is the server's own; the CLI touches
``SPOOL/flush`` after a change and the server's :meth:`SpoolStore.consume_flush`
rereads the envelopes.

Recovery (:meth:`SpoolStore.recover`, once at the server's start): ``tmp/`` is
emptied; a body without an envelope never got its 250 and is deleted; an envelope
without its body, one that cannot be parsed, or whose body has another size is moved
to ``corrupt/`` with its body and logged - never a crash; a message that is done is
removed.  Every other method is blocking and meant for a thread
(:class:`maitred_tx.queue.threaded.ThreadedQueue`), or for the CLI and tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, BinaryIO, Final

from maitred_tx.queue.codec import (
    CodecError,
    Summary,
    decode,
    decode_attempt,
    encode,
    encode_attempt,
    summary,
)
from maitred_tx.queue.files import (
    SpoolWriter,
    check_id,
    counter,
    fsync_dir,
    listdir,
    move,
    new_id,
    valid_id,
    write_all,
)
from maitred_tx.queue.schedule import RetryPolicy
from maitred_tx.queue.store import (
    AttemptResult,
    QueuedMessage,
    QueueEnvelope,
    QueueStore,
    apply_attempt,
    new_message,
    with_flush,
    with_held,
    with_notified,
)

__all__ = ["RecoveryReport", "SpoolLocked", "SpoolStore", "valid_id"]

# Buffer for the streamed body: coalesces small chunks into few write(2) calls, and
# bounds the memory one message in flight takes (as maitred_tx.delivery.maildir).
_WRITE_BUFFER: Final = 64 * 1024
_READ_BLOCK: Final = 64 * 1024
_SUBDIRS: Final = ("tmp", "msg", "env", "corrupt")


class SpoolLocked(RuntimeError):
    """Another process already serves this spool (it holds SPOOL/lock)."""


@dataclass(slots=True)
class RecoveryReport:
    """What :meth:`SpoolStore.recover` found and did (for the server's log)."""

    loaded: int = 0
    seconds: float = 0.0
    removed_tmp: list[str] = field(default_factory=list)
    removed_orphans: list[str] = field(default_factory=list)  # bodies without envelope
    removed_done: list[str] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    errors: list[str] = field(default_factory=list)
    replayed: list[str] = field(default_factory=list)  # attempts taken from the journal


class SpoolStore:
    """A :class:`~maitred_tx.queue.store.QueueStore` on the directory *root*.

    *sync* = False skips every fsync: only for tests and benchmarks that fill a
    spool; a crash of the machine may then lose messages that got their 250.
    *clock* gives the commit time of a message that has no ``received_at``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        policy: RetryPolicy | None = None,
        sync: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.policy = policy or RetryPolicy()
        self.sync = sync
        self._clock = clock
        self._tmp, self._msg, self._env, self._corrupt = (
            os.path.join(self.root, d) for d in _SUBDIRS
        )
        self._new_path = os.path.join(self.root, "new")
        # The attempt journal (journal_attempt): appended to on the runner's thread the
        # moment an attempt's results are known, emptied when nothing is in flight.
        self._journal_path = os.path.join(self.root, "journal")
        self._journal_fd: int | None = None
        self._journal_pending = 0
        self._journal_lock = threading.Lock()
        self._flush_path = os.path.join(self.root, "flush")
        # id -> (next attempt or None when done, held); the server's view.
        self._index: dict[str, tuple[float | None, bool]] = {}
        self._index_lock = threading.Lock()
        self._lock_fd: int | None = None
        self.recovered = False

    # --- start and stop ----------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Create the spool if needed, take its lock, clean up after a crash and
        build the index.  Raises SpoolLocked if another process serves the spool."""
        started = time.monotonic()
        self._make_dirs()
        self._take_lock()
        report = RecoveryReport()
        for name in listdir(self._tmp):
            self._try(report, name, partial(os.unlink, os.path.join(self._tmp, name)))
            report.removed_tmp.append(name)
        env_names = listdir(self._env)
        envs = {n[: -len(".json")] for n in env_names if n.endswith(".json") and valid_id(n[:-5])}
        for name in env_names:
            if not (name.endswith(".json") and valid_id(name[: -len(".json")])):
                self._quarantine(report, name, None, "not an envelope name")
        bodies = set(listdir(self._msg))
        for orphan in sorted(bodies - envs):  # never got its 250 (store.py)
            self._try(report, orphan, partial(os.unlink, os.path.join(self._msg, orphan)))
            report.removed_orphans.append(orphan)
        index: dict[str, tuple[float | None, bool]] = {}
        for message_id in sorted(envs):
            entry = self._recover_one(report, message_id, message_id in bodies)
            if entry is None:
                continue
            if entry.next_attempt_at is None:  # done: crashed before remove()
                self._try(report, message_id, partial(self._unlink_message, message_id))
                report.removed_done.append(message_id)
                continue
            index[message_id] = (entry.next_attempt_at, entry.held)
        with self._index_lock:
            self._index = index
        self.recovered = True
        self._replay_journal(report)
        report.loaded = len(self._index)
        report.seconds = time.monotonic() - started
        return report

    def _recover_one(
        self, report: RecoveryReport, message_id: str, has_body: bool
    ) -> Summary | None:
        if not has_body:
            self._quarantine(report, message_id + ".json", None, "envelope without body")
            return None
        try:
            with open(self._env_path(message_id), "rb") as f:
                entry = summary(f.read())
            size = os.stat(self._body_path(message_id)).st_size
        except (OSError, CodecError) as e:
            self._quarantine(report, message_id + ".json", message_id, str(e))
            return None
        if entry.id != message_id or entry.size != size:
            reason = f"envelope says id {entry.id}, size {entry.size}; body has {size}"
            self._quarantine(report, message_id + ".json", message_id, reason)
            return None
        return entry

    def prepare(self) -> None:
        """Create the spool directories if needed; no recovery, no lock.  For a
        process that only adds messages beside the one that recovered the spool."""
        self._make_dirs()

    # --- the attempt journal -------------------------------------------------------

    def journal_attempt(
        self, message_id: str, results: Sequence[AttemptResult], now: float
    ) -> None:
        """Note an attempt's *results* at once, before :meth:`record_attempt` makes them
        durable in the envelope (pass it ``journaled=True`` then).

        One ``write`` to a file opened for appending, no fsync: cheap enough for the
        reactor thread, and once it returned the line is in the kernel, so a process
        killed at any moment after it (kill -9, a crash) has its results replayed at
        the next start and resends nothing the remote acknowledged.  The envelope's
        fsync'd rewrite still follows, for power losses: this shrinks the window of the
        store.py docstring for a crashed process from an fsync'd rewrite to the time
        between reading the remote's reply and this call."""
        line = encode_attempt(message_id, now, tuple(results))
        with self._journal_lock:
            if self._journal_fd is None:
                self._journal_fd = os.open(
                    self._journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                    0o600)
            os.write(self._journal_fd, line)
            self._journal_pending += 1

    def _apply(self, results: tuple[AttemptResult, ...], now: float,
               message: QueuedMessage) -> QueuedMessage:
        return apply_attempt(message, results, now, self.policy)

    def _journal_done(self) -> None:
        """An attempt journaled earlier is in its envelope now; when none is left in
        flight the journal is emptied (under the lock the appends take)."""
        with self._journal_lock:
            self._journal_pending -= 1
            if self._journal_pending <= 0 and self._journal_fd is not None:
                self._journal_pending = 0
                os.ftruncate(self._journal_fd, 0)

    def _replay_journal(self, report: RecoveryReport) -> None:
        """At start: apply every journaled attempt its envelope does not show yet (the
        process died between the two), durably, then empty the journal."""
        try:
            with open(self._journal_path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                message_id, now, results = decode_attempt(line)
            except CodecError:
                continue  # a line cut short by the crash: its attempt is simply redone
            message = self.load(message_id) if valid_id(message_id) else None
            if message is None:
                continue
            # What the envelope shows already, and addresses it does not have (a damaged
            # line: apply_attempt would raise, and the spool could not be started).
            skip = {r.address for r in message.recipients
                    if r.state.final or (r.last_attempt_at or 0.0) >= now}
            known = {r.address for r in message.recipients}
            missing = tuple(r for r in results if r.address in known - skip)
            if missing:
                self._update(message_id, partial(self._apply, missing, now))
                report.replayed.append(message_id)
        with open(self._journal_path, "wb") as f:
            if self.sync:
                os.fsync(f.fileno())

    def close(self) -> None:
        """Release the spool lock (the kernel does it too when the process dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _make_dirs(self) -> None:
        for path in (self.root, self._tmp, self._msg, self._env, self._corrupt):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            self._fsync_dir(os.path.dirname(path))

    def _take_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"{self.root} is in use by another process") from None
        self._lock_fd = fd

    def _quarantine(
        self, report: RecoveryReport, env_name: str, body: str | None, reason: str
    ) -> None:
        """Move an envelope file (and *body*, if any) to corrupt/; record why."""
        report.quarantined.append((env_name, reason))
        self._try(report, env_name, lambda: move(os.path.join(self._env, env_name),
                                                   self._corrupt))
        if body is not None:
            self._try(report, body, lambda: move(self._body_path(body), self._corrupt))

    @staticmethod
    def _try(report: RecoveryReport, name: str, action: Callable[[], object]) -> None:
        try:
            action()
        except FileNotFoundError:
            pass
        except OSError as e:  # never crash the server for one bad file
            report.errors.append(f"{name}: {e}")

    # --- adding -------------------------------------------------------------------

    def create(self, prefix: bytes = b"") -> SpoolWriter:
        """A new message file in tmp/, starting with *prefix*."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        while True:
            message_id = new_id()
            path = os.path.join(self._tmp, message_id)
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:  # a reused pid within the same microsecond
                continue
            break
        file = open(fd, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115 - the writer owns it
        writer = SpoolWriter(self._commit, message_id, path, file)
        writer.write(prefix)
        return writer

    def add(self, envelope: QueueEnvelope, source: BinaryIO | Iterable[bytes]) -> str:
        """Store a whole message from a binary file or an iterable of chunks."""
        writer = self.create()
        try:
            if hasattr(source, "read"):
                while chunk := source.read(_READ_BLOCK):
                    writer.write(chunk)
            else:
                for chunk in source:
                    writer.write(chunk)
            return writer.commit(envelope).id
        except BaseException:
            writer.abort()
            raise

    def _commit(self, writer: SpoolWriter, envelope: QueueEnvelope) -> QueuedMessage:
        """Body: flush, fsync, rename into msg/, fsync msg/; then the envelope."""
        file = writer.file
        file.flush()
        if self.sync:
            os.fsync(file.fileno())
        size = os.fstat(file.fileno()).st_size
        file.close()
        body = self._body_path(writer.message_id)
        os.rename(writer.path, body)
        try:
            self._fsync_dir(self._msg)
            message = new_message(writer.message_id, envelope, size, self._clock())
            self._write_env(message)
        except BaseException:
            # Not known to be durable: withdraw it whole (the client retries).
            with contextlib.suppress(OSError):
                os.unlink(self._env_path(writer.message_id))
            with contextlib.suppress(OSError):
                os.unlink(body)
            raise
        self._set_index(message)
        return message

    def _write_env(self, message: QueuedMessage) -> None:
        """Atomically replace env/ID.json: tmp/, fsync, rename, fsync env/."""
        tmp = os.path.join(self._tmp, f"{message.id}.{os.getpid()}.{next(counter)}.json")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                write_all(fd, encode(message))
                if self.sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._env_path(message.id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fsync_dir(self._env)

    # --- reading ------------------------------------------------------------------

    def due(self, now: float, limit: int | None = None) -> list[str]:
        self._require_recovered()
        with self._index_lock:
            items = [
                (at, mid) for mid, (at, held) in self._index.items()
                if at is not None and at <= now and not held
            ]
        items.sort()
        return [mid for _, mid in items[:limit]]

    def next_due(self) -> float | None:
        self._require_recovered()
        with self._index_lock:
            times = [at for at, held in self._index.values() if at is not None and not held]
        return min(times, default=None)

    def ids(self) -> list[str]:
        """Every message id in the spool now, oldest first (read from the disk)."""
        return sorted(n[:-5] for n in listdir(self._env) if n.endswith(".json")
                      and valid_id(n[:-5]))

    def load(self, message_id: str) -> QueuedMessage | None:
        """The message as on disk now; None if it is gone (deleted or done)."""
        check_id(message_id)
        message = self._read_env(message_id)
        if message is None:
            self._drop_index(message_id)
        return message

    def load_all(self) -> Iterator[QueuedMessage]:
        for message_id in self.ids():
            message = self._read_env(message_id, quarantine=False)
            if message is not None:
                yield message

    def open_body(self, message_id: str) -> BinaryIO | None:
        check_id(message_id)
        try:
            return open(self._body_path(message_id), "rb")
        except FileNotFoundError:
            return None

    def _read_env(self, message_id: str, *, quarantine: bool = True) -> QueuedMessage | None:
        try:
            with open(self._env_path(message_id), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            return decode(raw)
        except CodecError as e:
            # Written by rename only, so never half-written: damaged.  Out of the way.
            if quarantine:
                report = RecoveryReport()
                self._quarantine(report, message_id + ".json", message_id, str(e))
                self._drop_index(message_id)
            return None

    # --- changing -----------------------------------------------------------------

    def record_attempt(
        self, message_id: str, results: Sequence[AttemptResult], now: float, *,
        journaled: bool = False, remove_if: Callable[[QueuedMessage], bool] | None = None,
    ) -> QueuedMessage | None:
        """See QueueStore.record_attempt.  With *remove_if* true of the message after
        the attempt, the record is the removal: env/ID.json unlinked, env/ fsync'd
        (the commit point, as the rewrite's would be), then the body - one new file,
        one freed inode and the file's fsync fewer than a rewrite and a removal."""
        try:
            return self._update(message_id,
                                lambda m: apply_attempt(m, results, now, self.policy),
                                remove_if=remove_if)
        finally:
            if journaled:
                self._journal_done()

    def record_notified(
        self, message_id: str, addresses: Iterable[str], *, delay: bool = False
    ) -> QueuedMessage | None:
        wanted = tuple(addresses)
        return self._update(message_id, lambda m: with_notified(m, wanted, delay=delay))

    def hold(self, message_id: str, held: bool = True) -> bool:
        return self._update(message_id, lambda m: with_held(m, held)) is not None

    def flush(self, message_id: str | None = None) -> int:
        """Make messages due now (next attempt 0); a held one stays held."""
        ids = self.ids() if message_id is None else [message_id]
        return sum(self._update(i, with_flush) is not None for i in ids)

    def remove(self, message_id: str) -> None:
        check_id(message_id)
        with self._locked(message_id):
            self._unlink_message(message_id)
        self._drop_index(message_id)

    def delete(self, message_id: str) -> bool:
        """Remove a message in any state, under its lock.  A delivery attempt already
        under way cannot be recalled: its record_attempt then finds the message gone."""
        check_id(message_id)
        with self._locked(message_id) as present:
            if present:
                present = os.path.exists(self._env_path(message_id))
                self._unlink_message(message_id)
        self._drop_index(message_id)
        return present

    def request_flush(self) -> None:
        """Ask the server to reread the envelopes (after a CLI change)."""
        fd = os.open(self._flush_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def flush_requested(self) -> bool:
        return os.path.exists(self._flush_path)

    def notify_new(self) -> None:
        """Tell the process that recovered the spool (and runs its queue) that this one
        added messages: a worker of ``--workers`` does, after each commit."""
        fd = os.open(self._new_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def take_new(self) -> int:
        """Index the envelopes other processes added (after ``notify_new``); how many.
        One directory listing, and a read of each envelope not yet in the index."""
        try:
            os.unlink(self._new_path)
        except FileNotFoundError:
            return 0
        self._require_recovered()
        with self._index_lock:
            known = set(self._index)
        found = 0
        for name in listdir(self._env):
            message_id = name[: -len(".json")]
            if not name.endswith(".json") or message_id in known or not valid_id(message_id):
                continue
            message = self.load(message_id)
            if message is not None and not message.done:
                self._set_index(message)
                found += 1
        return found

    def count(self) -> int:
        """Messages in the queue (the index's size; for the metrics)."""
        with self._index_lock:
            return len(self._index)

    def consume_flush(self) -> bool:
        """Take a flush request: remove the trigger, then reread every envelope (a
        request made during the reread leaves a new trigger, so none is lost)."""
        try:
            os.unlink(self._flush_path)
        except FileNotFoundError:
            return False
        self._reindex()
        return True

    def _update(
        self, message_id: str, change: Callable[[QueuedMessage], QueuedMessage], *,
        remove_if: Callable[[QueuedMessage], bool] | None = None,
    ) -> QueuedMessage | None:
        """Read, change and atomically rewrite one envelope under the message's lock;
        or remove the message durably if *remove_if* is true of the changed one."""
        check_id(message_id)
        with self._locked(message_id) as present:
            message = self._read_env(message_id) if present else None
            if message is not None:
                changed = change(message)
                if remove_if is not None and remove_if(changed):
                    self._unlink_message(message_id, durable=True)
                    self._drop_index(message_id)
                    return changed
                if changed != message:  # e.g. a flush of a message already due
                    self._write_env(changed)
                message = changed
        if message is None:
            self._drop_index(message_id)
        else:
            self._set_index(message)
        return message

    @contextlib.contextmanager
    def _locked(self, message_id: str) -> Iterator[bool]:
        """Hold the flock of the message's body; yields False if there is no body."""
        try:
            fd = os.open(self._body_path(message_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)

    def _unlink_message(self, message_id: str, *, durable: bool = False) -> None:
        """Envelope first (the commit point of removal), then the body.  No fsync
        unless *durable*: if the unlink is lost in a crash, the message comes back
        done, and is removed again at start.  *durable* (the removal records an
        attempt's results, record_attempt's remove_if): env/ is fsync'd before the
        body goes, so a crash never leaves an envelope without its body either."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._env_path(message_id))
        if durable:
            self._fsync_dir(self._env)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._body_path(message_id))

    # --- the index ----------------------------------------------------------------

    def _set_index(self, message: QueuedMessage) -> None:
        with self._index_lock:
            if message.done:
                self._index.pop(message.id, None)
            else:
                self._index[message.id] = (message.next_attempt_at, message.held)

    def _drop_index(self, message_id: str) -> None:
        with self._index_lock:
            self._index.pop(message_id, None)

    def _reindex(self) -> None:
        """Rebuild the index from the envelopes; keep entries added meanwhile."""
        scanned: dict[str, tuple[float | None, bool]] = {}
        for message in self.load_all():
            if not message.done:
                scanned[message.id] = (message.next_attempt_at, message.held)
        with self._index_lock:
            for message_id, entry in self._index.items():
                if message_id not in scanned and os.path.exists(self._env_path(message_id)):
                    scanned[message_id] = entry  # committed after the listing
            self._index = scanned

    def _require_recovered(self) -> None:
        if not self.recovered:
            raise RuntimeError("SpoolStore.recover() must run before the index is used")

    # --- paths and helpers --------------------------------------------------------

    def _body_path(self, message_id: str) -> str:
        return os.path.join(self._msg, message_id)

    def _env_path(self, message_id: str) -> str:
        return os.path.join(self._env, message_id + ".json")

    def _fsync_dir(self, path: str) -> None:
        if self.sync:
            fsync_dir(path)


if TYPE_CHECKING:  # mypy holds SpoolStore to the QueueStore protocol here

    def _is_a_queue_store(store: SpoolStore) -> QueueStore:
        return store
