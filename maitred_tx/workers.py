"""``twistd maitred --workers N``: N processes serving the same listeners.

CPython runs one thread of Python at a time, so one process uses one core.  With
``--workers N`` the twistd process becomes a supervisor: it binds every listener itself
(as root, if it started as root, before twistd drops privileges), never accepts on
them, and starts N worker processes that inherit the listening sockets and accept on
them (``SMTPService.adopt``); the kernel gives each new connection to one of the
workers waiting for it.  A worker that dies is started again (after 1 s, doubling up
to 30 s while it keeps dying young); its connections are lost but nothing in the
listen queue is, because the socket stays open in the supervisor.

Why shared sockets rather than SO_REUSEPORT: with a socket per worker the kernel
spreads connections by a hash, and the connections already queued on a dying
worker's socket are reset; a shared socket loses none and needs no kernel option.

Logging: workers write their log lines to a pipe; the supervisor writes them, as they
are, into its own log (file, stdout, rotation on SIGUSR1 all stay twistd's).  Under
``--syslog`` or ``--logger`` each worker uses that itself.

Per-client limits are counted by each worker for the connections it accepted; see
``worker_limits`` for how the configured limits are shared out.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Final

from twisted.application.service import MultiService
from twisted.internet import abstract, defer, endpoints, fdesc, main
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from maitred_tx.service import default_backlog, implicit_tls_as_tcp, with_backlog
from maitred_tx.smtp.config import Limits

__all__ = ["WorkerPool", "become_worker", "worker_command", "worker_limits"]

_log = Logger()

# Restarting a worker that died: the first delay, doubled while workers keep dying
# within _YOUNG seconds of their start, never more than _MAX_DELAY.
_FIRST_DELAY: Final = 1.0
_MAX_DELAY: Final = 30.0
_YOUNG: Final = 10.0
# At shutdown: how long workers get to say 421 and finish before SIGKILL.
_STOP_GRACE: Final = 30.0
# The file descriptor of the first inherited listener in a worker.
FIRST_FD: Final = 3


def worker_limits(limits: Limits, workers: int) -> Limits:
    """Each worker's share of the per-client limits.

    Each worker counts only the connections it accepted, and the kernel hands a
    client's connections to whichever worker is waiting, so each worker gets the
    configured limit divided by the number of workers (rounded up): all of a client's
    connections together stay within the configured limit (plus at most N - 1).  A
    client whose connections happen to gather on one worker meets that worker's share
    early; with limits well above what clients use this is rare, and one worker keeps
    the limits exact.  Limits of 0 (none) stay 0.
    """

    def share(value: int) -> int:
        return 0 if value == 0 else max(1, math.ceil(value / workers))

    return replace(
        limits,
        max_client_connections=share(limits.max_client_connections),
        max_client_connection_rate=share(limits.max_client_connection_rate),
        max_client_message_rate=share(limits.max_client_message_rate),
    )


class _NoConnections(Factory):
    """The supervisor's listening ports never accept: reading is stopped at once."""

    def buildProtocol(self, addr: Any) -> None:
        return None


class _Worker(ProcessProtocol):
    """One worker process: its output goes to the supervisor's log, its end to the pool."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.started = 0.0
        self.pid: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial: dict[int, bytes] = {}  # stdout's and stderr's unfinished lines

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Whole lines only, so that two workers' lines, or one worker's stdout and
        # stderr lines, never interleave mid-line.
        data = self._partial.pop(childFD, b"") + data
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self._partial[childFD] = data[end:]
        if end:
            self.pool.write_log(data[:end])

    def processEnded(self, reason: Failure) -> None:
        for rest in self._partial.values():
            self.pool.write_log(rest + b"\n")
        self._partial.clear()
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(MultiService):
    """The supervisor of ``--workers N``.

    *listeners*: the endpoint descriptions the workers serve, in the order their
    sockets are passed (file descriptors ``FIRST_FD``, ``FIRST_FD + 1``, ...).
    *worker_argv*: the command line of a worker, given those descriptors.
    *log_file*: where worker output goes (a file object with ``write``; bytes are
    decoded as UTF-8), None to log each line as an event.  *implicit_tls*: the ``ssl:``
    listeners are bound as TCP and the workers wrap them in TLS themselves.  *env*: the
    workers' environment (default: this process's); *on_exit*: called with the pid of
    each worker that ended (the metrics forget its live gauges).
    """

    def __init__(
        self,
        reactor: Any,
        listeners: Sequence[str],
        count: int,
        worker_argv: Callable[[list[int]], list[str]],
        *,
        log_file: Any = None,
        implicit_tls: bool = False,
        env: dict[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        if count < 1:
            raise ValueError("at least one worker")
        self.reactor = reactor
        self.listeners = list(listeners)
        self.count = count
        self.worker_argv = worker_argv
        self.log_file = log_file
        self.implicit_tls = implicit_tls
        self.env = dict(os.environ if env is None else env)
        self.on_exit = on_exit  # told the pid of every worker that ended
        self.ports: list[Any] = []
        self.workers: dict[int, tuple[_Worker, Any]] = {}  # index -> (protocol, process)
        self._delays = [_FIRST_DELAY] * count
        self._pending: dict[int, Any] = {}  # index -> the DelayedCall of a restart
        self._stopping = False

    # --- listening ---------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every listener now, before twistd gives up root: port 25 needs it."""
        backlog = default_backlog()
        for description in self.listeners:
            if self.implicit_tls:
                description = implicit_tls_as_tcp(description) or description
            endpoint = endpoints.serverFromString(self.reactor,
                                                  with_backlog(description, backlog))
            result: list[Any] = []
            endpoint.listen(_NoConnections()).addBoth(result.append)
            if not result:
                raise RuntimeError(f"{description}: the endpoint did not listen at once")
            if isinstance(result[0], Failure):
                result[0].raiseException()
            port = result[0]
            port.stopReading()  # the workers accept; this process never does
            self.ports.append(port)
        super().privilegedStartService()

    # --- workers -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        if self._stopping:
            return
        fds = [port.fileno() for port in self.ports]
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        child_fds.update({FIRST_FD + i: fd for i, fd in enumerate(fds)})
        argv = self.worker_argv(list(range(FIRST_FD, FIRST_FD + len(fds))))
        worker = _Worker(self, index)
        worker.started = self.reactor.seconds()
        env = {**self.env, "MAITRED_WORKER": str(index)}
        process = self.reactor.spawnProcess(worker, argv[0], argv, env=env,
                                            path=os.getcwd(), childFDs=child_fds)
        worker.pid = process.pid
        self.workers[index] = (worker, process)
        _log.info("worker {index} started: pid {pid}", index=index, pid=process.pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker exited: start another unless the pool is stopping."""
        index = worker.index
        if self.workers.get(index, (None,))[0] is worker:
            del self.workers[index]
        if self.on_exit is not None and worker.pid is not None:
            self.on_exit(worker.pid)
        if self._stopping:
            return
        lived = self.reactor.seconds() - worker.started
        delay = self._delays[index] if lived < _YOUNG else _FIRST_DELAY
        self._delays[index] = min(delay * 2, _MAX_DELAY)
        _log.warn("worker {index} ended ({reason}) after {lived:.1f}s: restarting in "
                  "{delay:g}s", index=index, reason=reason.getErrorMessage(), lived=lived,
                  delay=delay)
        self._pending[index] = self.reactor.callLater(delay, self._spawn, index)

    def write_log(self, data: bytes) -> None:
        """Worker output into the supervisor's log, line for line as written."""
        text = data.decode("utf-8", "replace")
        if self.log_file is not None:
            self.log_file.write(text)
            flush = getattr(self.log_file, "flush", None)
            if flush is not None:
                flush()
            return
        for line in text.splitlines():
            _log.info("{line}", line=line)

    # --- stopping ----------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        """SIGTERM every worker (each says 421 to its sessions and exits), SIGKILL the
        ones still there after the grace period, then close the listening sockets."""
        self._stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        waits = []
        for worker, process in list(self.workers.values()):
            waits.append(worker.ended)
            _signal(process, signal.SIGTERM)
        killer = self.reactor.callLater(_STOP_GRACE, self._kill_all)
        d: defer.Deferred[Any] = defer.DeferredList(waits, consumeErrors=True)

        def stopped(_: object) -> defer.Deferred[Any]:
            if killer.active():
                killer.cancel()
            closing = [defer.maybeDeferred(port.stopListening) for port in self.ports]
            self.ports = []
            return defer.DeferredList(closing, consumeErrors=True)

        d.addCallback(stopped)
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    def _kill_all(self) -> None:
        for _, process in list(self.workers.values()):
            _log.warn("worker pid {pid} did not stop: killing it", pid=process.pid)
            _signal(process, signal.SIGKILL)


def _signal(process: Any, signum: int) -> None:
    with contextlib.suppress(ProcessExitedAlready, OSError):  # already gone
        process.signalProcess(signum)


class _ParentWatch(abstract.FileDescriptor):
    """A worker's end of the pipe on its stdin, which only the supervisor holds open:
    when the supervisor is gone (even by SIGKILL) it reads end of file, and the worker
    stops rather than serve on unsupervised."""

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        super().__init__(reactor)
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return main.CONNECTION_DONE
        return None

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        reactor: Any = self.reactor
        if reactor.running:
            _log.warn("the supervisor is gone: stopping")
            reactor.stop()


def become_worker(reactor: Any) -> None:
    """Set up this process as a worker: its own process group, so that a signal for
    the supervisor's group (Ctrl-C in a terminal, ``timeout``) reaches the supervisor
    alone, which then stops the workers; and stop when the supervisor is gone."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    fdesc.setNonBlocking(0)
    watch = _ParentWatch(reactor)
    reactor.callWhenRunning(watch.startReading)


def worker_command(twistd_args: Sequence[str], maitred_args: Sequence[str],
                   fds: Sequence[int]) -> list[str]:
    """The command line of one worker: this interpreter running twistd in the
    foreground with *twistd_args* (the supervisor's --syslog or --logger; not its
    --reactor, which tap._supervisor does not pass on: workers run the default one),
    then ``maitred`` with the supervisor's own arguments and the inherited sockets."""
    boot = "from twisted.scripts.twistd import run; run()"
    return [sys.executable, "-c", boot, "-n", "--pidfile=", *twistd_args, "maitred",
            *maitred_args, "--inherited-fds", ",".join(map(str, fds))]
