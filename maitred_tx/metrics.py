"""Prometheus metrics (issue 13): what the server counts, and the ``/metrics`` endpoint.

The glue counts through a ``ListenerMetrics`` (``SMTPFactory.metrics``), one per
listener, its label values bound once: each event is one attribute lookup and one call
that increments a child that already exists, with no ``labels()`` lookup per message.
Without metrics the factory holds ``NO_METRICS``, whose methods do nothing, and
prometheus_client is never imported.

Several processes (``--workers``) use prometheus_client's multiprocess mode:
``PROMETHEUS_MULTIPROC_DIR`` is set in each process's environment *before*
prometheus_client is first imported there (the library picks its value storage at
import), each process counts into its own files in that directory, and the process that
serves the endpoint sums them (``metrics_resource(reactor, multiproc_dir=...)``).  The
gauges say how the processes' values combine (``livesum``: the sum over the live
processes; ``worker_exited`` forgets a dead one's).

The endpoint is prometheus_client's WSGI app (text or OpenMetrics, gzip, ``name[]``
filters) in a ``twisted.web`` ``WSGIResource`` on the reactor's thread pool: reading the
values (files, in multiprocess mode) never blocks the reactor.  It is what
``prometheus_client.twisted.MetricsResource`` builds, except that the reactor is a
parameter: that module imports the global reactor, which library code never does.

Metric names follow Prometheus' conventions (``_total`` counters, base units); every
series is labelled with the listener's ``mode`` (mx, submission, lmtp) except the
checks' and the queue's.  README.md's "Metrics" section lists them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from maitred_tx.smtp.config import Mode

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from twisted.application.service import IService
    from twisted.web.resource import IResource

    from maitred_tx.auth.verdicts import AuthResults
    from maitred_tx.smtp.replies import Reply

__all__ = [
    "MULTIPROC_ENV",
    "NO_METRICS",
    "SIZE_BUCKETS",
    "ListenerMetrics",
    "Metrics",
    "default_metrics",
    "metrics_resource",
    "metrics_service",
    "prepare_multiproc_dir",
    "worker_exited",
]

# The environment variable prometheus_client reads at import for multiprocess mode.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# Message sizes (octets) of the size histogram: 1 KiB to 64 MiB by fours, covering a
# short notification, the median message (tens of kB), attachments, and the largest
# limits in use (Postfix's message_size_limit default is 10 MB; Gmail takes 25 MB).
SIZE_BUCKETS: Final = (1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
                       16777216.0, 67108864.0)
# A reply's class (its first digit) as a label value.
_RESULTS: Final = {2: "accepted", 4: "temporary", 5: "permanent"}
# Why a session was refused by the per-client limits: ClientLimiter.admit's answers,
# and the message rate (421 at MAIL).
_REFUSALS: Final = ("connections", "rate", "message_rate")
# How a session came to use TLS: STARTTLS, an ssl: listener, or a trusted proxy that
# terminated TLS (PROXY v2 PP2_TYPE_SSL).
_TLS_KINDS: Final = ("starttls", "implicit", "proxy")


class ListenerMetrics:
    """The counters of one listener mode, children bound once.  The glue calls one
    method per event; ``NO_METRICS`` is the same interface doing nothing."""

    __slots__ = ("_accepted_rcpt", "_active", "_auth_failures", "_auth_successes",
                 "_bytes", "_messages", "_parent", "_recipients", "_refused", "_senders",
                 "_sessions", "_sizes", "_tls")

    def __init__(self, parent: Metrics, mode: Mode) -> None:
        m = mode.value
        self._parent = parent
        self._sessions = parent.sessions.labels(m)
        self._active = parent.sessions_active.labels(m)
        self._refused = {r: parent.sessions_refused.labels(m, r) for r in _REFUSALS}
        self._messages = {c: parent.messages.labels(m, r) for c, r in _RESULTS.items()}
        self._recipients = {c: parent.recipients.labels(m, r) for c, r in _RESULTS.items()}
        self._accepted_rcpt = self._recipients[2]
        self._senders = {c: parent.senders_refused.labels(m, r)
                         for c, r in _RESULTS.items() if c != 2}
        self._bytes = parent.received_bytes.labels(m)
        self._sizes = parent.message_sizes.labels(m)
        self._tls = {k: parent.tls_sessions.labels(m, k) for k in _TLS_KINDS}
        self._auth_failures = parent.auth_failures.labels(m)
        self._auth_successes = parent.auth_successes.labels(m)

    def session_started(self, implicit_tls: bool) -> None:
        """A connection was accepted (and, on an ssl: listener, is TLS)."""
        self._sessions.inc()
        self._active.inc()
        if implicit_tls:
            self._tls["implicit"].inc()

    def session_ended(self) -> None:
        """A connection counted by ``session_started`` is gone."""
        self._active.dec()

    def session_refused(self, reason: str) -> None:
        """A per-client limit answered 421: "connections", "rate" or "message_rate"."""
        self._refused[reason].inc()

    def tls_session(self, kind: str) -> None:
        """The session uses TLS from now on: "starttls" (the 220 went out and the
        handshake starts) or "proxy" (a trusted proxy terminated it)."""
        self._tls[kind].inc()

    def auth_failed(self) -> None:
        self._auth_failures.inc()

    def auth_succeeded(self) -> None:
        self._auth_successes.inc()

    def sender_refused(self, reply: Reply) -> None:
        """A MAIL FROM got a 4xx or 5xx (policy, delivery or the core's rules)."""
        child = self._senders.get(reply.code // 100)
        if child is not None:
            child.inc()

    def recipient_accepted(self) -> None:
        self._accepted_rcpt.inc()

    def recipient_refused(self, reply: Reply) -> None:
        """An RCPT TO got a 4xx or 5xx that the session reported as a refusal."""
        child = self._recipients.get(reply.code // 100)
        if child is not None:
            child.inc()

    def message(self, reply: Reply, size: int) -> None:
        """A message's final reply (SMTP's one reply; LMTP's replies combined as SMTP
        would answer them): accepted ones also count their *size* in octets."""
        kind = reply.code // 100
        child = self._messages.get(kind)
        if child is not None:
            child.inc()
        if kind == 2:
            self._bytes.inc(size)
            self._sizes.observe(size)

    def checks(self, results: AuthResults) -> None:
        """The SPF, DKIM, ARC and DMARC verdicts of one message."""
        self._parent.checks(results)


class _NoListenerMetrics(ListenerMetrics):
    """What a listener without metrics counts with: nothing, at the cost of a call."""

    __slots__ = ()

    def __init__(self) -> None:
        pass

    def session_started(self, implicit_tls: bool) -> None:
        pass

    def session_ended(self) -> None:
        pass

    def session_refused(self, reason: str) -> None:
        pass

    def tls_session(self, kind: str) -> None:
        pass

    def auth_failed(self) -> None:
        pass

    def auth_succeeded(self) -> None:
        pass

    def sender_refused(self, reply: Reply) -> None:
        pass

    def recipient_accepted(self) -> None:
        pass

    def recipient_refused(self, reply: Reply) -> None:
        pass

    def message(self, reply: Reply, size: int) -> None:
        pass

    def checks(self, results: AuthResults) -> None:
        pass


NO_METRICS: Final[ListenerMetrics] = _NoListenerMetrics()


class Metrics:
    """Every metric family of the server, registered in *registry* (default:
    prometheus_client's default registry, which the endpoint serves by default).  A
    registry takes each name once: one Metrics per registry (``default_metrics()``
    gives the default registry's).  ``listener(mode)`` gives what a listener counts
    with."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        self.multiprocess = _check_multiprocess()
        self.registry = reg = REGISTRY if registry is None else registry
        self.sessions = Counter("maitred_sessions_total", "Connections accepted.",
                                ["mode"], registry=reg)
        self.sessions_active = Gauge("maitred_sessions_active", "Connections open now.",
                                     ["mode"], registry=reg, multiprocess_mode="livesum")
        self.sessions_refused = Counter(
            "maitred_sessions_refused_total",
            "Sessions closed with 421 by a per-client limit (reason: connections, rate, "
            "message_rate).", ["mode", "reason"], registry=reg)
        self.messages = Counter(
            "maitred_messages_total",
            "Messages by the class of their final reply (accepted 2xx, temporary 4xx, "
            "permanent 5xx).", ["mode", "result"], registry=reg)
        self.recipients = Counter(
            "maitred_recipients_total",
            "RCPT TO commands by the class of their reply.", ["mode", "result"],
            registry=reg)
        self.senders_refused = Counter(
            "maitred_senders_refused_total",
            "MAIL FROM commands refused, by the class of the reply.", ["mode", "result"],
            registry=reg)
        self.received_bytes = Counter(
            "maitred_received_bytes_total", "Octets of the messages accepted.", ["mode"],
            registry=reg)
        self.message_sizes = Histogram(
            "maitred_message_size_bytes", "Sizes of the messages accepted, in octets.",
            ["mode"], registry=reg, buckets=SIZE_BUCKETS)
        self.tls_sessions = Counter(
            "maitred_tls_sessions_total",
            "Sessions that turned to TLS (kind: starttls, implicit, proxy).",
            ["mode", "kind"], registry=reg)
        self.auth_failures = Counter("maitred_auth_failures_total", "Failed AUTH attempts.",
                                     ["mode"], registry=reg)
        self.auth_successes = Counter("maitred_auth_successes_total",
                                      "Successful AUTH logins.", ["mode"], registry=reg)
        self.checks_total = Counter(
            "maitred_checks_total",
            "Authentication check verdicts (check: spf, dkim, arc, dmarc); one per DKIM "
            "signature, dkim=none for an unsigned message.", ["check", "result"],
            registry=reg)
        self._check_children: dict[tuple[str, str], Any] = {}
        self._listeners: dict[Mode, ListenerMetrics] = {}
        self._queue: Any = None

    def listener(self, mode: Mode) -> ListenerMetrics:
        """What the listeners of *mode* count with (one per mode: they share series)."""
        found = self._listeners.get(mode)
        if found is None:
            found = self._listeners[mode] = ListenerMetrics(self, mode)
        return found

    def checks(self, results: AuthResults) -> None:
        """Count one message's verdicts: SPF (the MAIL FROM identity, or HELO's for the
        null path), each DKIM signature (none if unsigned), ARC and DMARC.  A check that
        did not run (SPF without an IP address, ARC on an oversized message) is not
        counted.  The result values come from our own enums, so the series are few."""
        count = self._check
        if results.spf_mailfrom is not None:
            count("spf", results.spf_mailfrom.result.value)
        for signature in results.dkim:
            count("dkim", signature.result)
        if not results.dkim:
            count("dkim", "none")
        if results.arc is not None:
            count("arc", results.arc.result)
        count("dmarc", results.dmarc.result)

    def _check(self, check: str, result: str) -> None:
        key = (check, result)
        child = self._check_children.get(key)
        if child is None:
            child = self._check_children[key] = self.checks_total.labels(check, result)
        child.inc()

    def set_queue_length(self, length: int) -> None:
        """The hook for a queue: call it with the number of messages queued whenever it
        changes.  ``maitred_queue_messages`` is registered at the first call (a server
        without a queue has no such series).  With several processes each sets the
        length of the queue it owns, and the endpoint shows the live processes' sum.
        (A callback gauge would be read from the scrape's thread, and never from the
        other processes in multiprocess mode: hence a value the queue sets.)"""
        if self._queue is None:
            from prometheus_client import Gauge

            self._queue = Gauge("maitred_queue_messages", "Messages in the queue.",
                                registry=self.registry, multiprocess_mode="livesum")
        self._queue.set(length)


_DEFAULT: list[Metrics] = []


def default_metrics() -> Metrics:
    """The one Metrics of prometheus_client's default registry in this process (what
    ``twistd maitred --metrics`` counts with, and what ``metrics_resource`` serves)."""
    if not _DEFAULT:
        _DEFAULT.append(Metrics())
    return _DEFAULT[0]


def _check_multiprocess() -> bool:
    """True in multiprocess mode.  The environment variable set after prometheus_client
    was imported would be silently ignored (each process would count only in memory,
    and the endpoint would sum nothing): that is a precise error instead."""
    from prometheus_client import values

    wanted = MULTIPROC_ENV in os.environ or MULTIPROC_ENV.lower() in os.environ
    active = bool(getattr(values.ValueClass, "_multiprocess", False))
    if wanted and not active:
        raise RuntimeError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported in this "
            "process: set it in the process's environment before it starts"
        )
    return active


def metrics_resource(
    reactor: Any, *, multiproc_dir: str | None = None, registry: CollectorRegistry | None = None
) -> IResource:
    """The ``/metrics`` resource.  With *multiproc_dir*: the sum over every process
    counting into that directory (the endpoint of a server with several worker
    processes, built in the process that serves it); else *registry*, by default
    prometheus_client's default registry (a single process: ours, and the process and
    platform collectors).  Served from *reactor*'s thread pool."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import make_wsgi_app
    from twisted.web.wsgi import WSGIResource

    if multiproc_dir is not None:
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiproc_dir)
    elif registry is None:
        registry = REGISTRY
    return WSGIResource(reactor, reactor.getThreadPool(), make_wsgi_app(registry))


def metrics_service(reactor: Any, description: str, resource: IResource | None = None
                    ) -> IService:
    """A service listening on the endpoint string *description* and serving *resource*
    (default: ``metrics_resource(reactor)``) at ``/metrics``; every other path is 404.
    Keep it on loopback or a private network: it tells anyone who asks how much mail
    flows and how many logins fail."""
    from twisted.application import strports
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class _QuietSite(Site):
        """A scrape every 15 s is no event worth a log line."""

        def log(self, request: Any) -> None:
            pass

    root = Resource()
    root.putChild(b"metrics", resource or metrics_resource(reactor))
    return strports.service(description, _QuietSite(root, reactor=reactor), reactor=reactor)


def prepare_multiproc_dir(path: str) -> None:
    """Create *path*, or empty it of an earlier run's files (prometheus_client's rule:
    the directory is wiped between runs, or old counts add to the new ones).  Call it in
    the parent before any worker starts."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.db"):
        old.unlink()


def worker_exited(pid: int, multiproc_dir: str) -> None:
    """A worker process is gone: its live gauges (sessions open, queue length) no longer
    count.  Its counters stay: they are totals."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, multiproc_dir)
