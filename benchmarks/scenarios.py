"""The benchmark scenarios (a)-(e) and how one measurement of one server is taken.

One measurement = start the server, wait until it answers, send one warm-up message,
read its CPU time and RSS, run the load, read them again, stop it, check its own count.
A transaction that did not get its 250 is a failure, never a slow sample.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import loadgen
from serverproc import RunningServer, ServerError, ServerSpec

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Counts:
    """How much load each scenario sends; every loop is bounded by ``deadline_s`` too."""

    seq_messages: int = 2000
    par_connections: int = 50
    par_per_connection: int = 100
    large_size: int = 20 * MIB
    # (c): that many such messages one after another on one connection, the rate over
    # all of them.  One 20 MiB transfer takes 50-150 ms here, and a single one swung
    # by 2x with the VM's noise between repetitions.
    large_messages: int = 5
    idle_connections: int = 2000
    opc_parallel: int = 20
    opc_per_worker: int = 100  # 2,000 connections: (e) was too short to measure well
    message_size: int = KIB
    deadline_s: float = 120.0
    start_timeout_s: float = 30.0
    settle_s: float = 0.5  # (d): wait after the last EHLO before reading VmRSS
    one_server_per_run: bool = False  # quick mode: start each server once per repetition


FULL = Counts()
QUICK = Counts(
    seq_messages=20,
    par_connections=5,
    par_per_connection=4,
    large_size=256 * KIB,
    large_messages=1,
    idle_connections=50,
    opc_parallel=4,
    opc_per_worker=2,
    deadline_s=20.0,
    start_timeout_s=20.0,
    settle_s=0.1,
    one_server_per_run=True,
)


@dataclass(slots=True)
class Outcome:
    """What a scenario's load produced, before the common metrics are added."""

    result: loadgen.LoadResult
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Variant:
    """One scenario with one load generator."""

    key: str
    letter: str
    title: str  # str.format()-ed with the Counts fields
    generator: str  # "py" or "smtp-source"
    kind: str  # "messages", "large" or "idle"
    run: Callable[[RunningServer, Counts, float], Outcome]
    needs_chunking: bool = False


@dataclass(slots=True)
class Sample:
    """One measurement of one server in one variant."""

    variant: str
    server: str
    repetition: int
    planned: int = 0
    ok: int = 0
    failed: int = 0
    session_errors: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def clean(self) -> bool:
        return self.skipped is not None or (
            self.failed == 0 and self.session_errors == 0 and not self.errors
        )


# --------------------------------------------------------------------------- loads


def _messages(connections: int, per_connection: int) -> Callable[..., Outcome]:
    def run(server: RunningServer, counts: Counts, deadline: float) -> Outcome:
        message = loadgen.Message.of_size(counts.message_size)
        result = asyncio.run(
            loadgen.run_connections(
                server.port,
                message,
                connections=connections or counts.par_connections,
                per_connection=per_connection or counts.par_per_connection,
                deadline=deadline,
            )
        )
        return Outcome(result)

    return run


def run_sequential(server: RunningServer, counts: Counts, deadline: float) -> Outcome:
    return _messages(1, counts.seq_messages)(server, counts, deadline)


def run_parallel(server: RunningServer, counts: Counts, deadline: float) -> Outcome:
    return _messages(counts.par_connections, counts.par_per_connection)(server, counts, deadline)


def run_one_per_connection(server: RunningServer, counts: Counts, deadline: float) -> Outcome:
    message = loadgen.Message.of_size(counts.message_size)
    result = asyncio.run(
        loadgen.run_one_per_connection(
            server.port,
            message,
            parallel=counts.opc_parallel,
            per_worker=counts.opc_per_worker,
            deadline=deadline,
        )
    )
    return Outcome(result)


def _smtp_source(kind: str) -> Callable[[RunningServer, Counts, float], Outcome]:
    def run(server: RunningServer, counts: Counts, deadline: float) -> Outcome:
        if kind == "a":
            sessions, messages, keep = 1, counts.seq_messages, True
        elif kind == "b":
            sessions = counts.par_connections
            messages, keep = sessions * counts.par_per_connection, True
        else:
            sessions = counts.opc_parallel
            messages, keep = sessions * counts.opc_per_worker, False
        result = loadgen.run_smtp_source(
            server.port,
            sessions=sessions,
            messages=messages,
            size=counts.message_size,
            keep_open=keep,
            deadline=deadline,
        )
        return Outcome(result)

    return run


class PeakSampler(threading.Thread):
    """Polls the server's VmRSS every few milliseconds and keeps the maximum."""

    def __init__(self, server: RunningServer, interval: float = 0.003) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.peak_kib = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.peak_kib = max(self.peak_kib, self.server.rss_kib())
            except (OSError, ValueError):
                return
            self.halt.wait(self.interval)


def _large(bdat: bool) -> Callable[[RunningServer, Counts, float], Outcome]:
    def run(server: RunningServer, counts: Counts, deadline: float) -> Outcome:
        message = loadgen.Message.of_size(counts.large_size, tag="large")
        before_kib = server.rss_kib()
        hwm_reset = server.reset_peak()
        sampler = PeakSampler(server)
        sampler.start()
        try:
            result = asyncio.run(
                loadgen.run_connections(
                    server.port,
                    message,
                    connections=1,
                    per_connection=counts.large_messages,
                    deadline=deadline,
                    bdat=bdat,
                )
            )
        finally:
            sampler.halt.set()
            sampler.join()
        peak_kib = sampler.peak_kib
        if hwm_reset:
            peak_kib = max(peak_kib, server.status_kib("VmHWM"))
        return Outcome(
            result,
            {
                "mib_per_s": result.payload_bytes / MIB / max(result.elapsed, 1e-9),
                "peak_rss_growth_mib": max(peak_kib - before_kib, 0) / KIB,
            },
        )

    return run


def run_idle(server: RunningServer, counts: Counts, deadline: float) -> Outcome:
    before_kib = server.rss_kib()
    after: list[int] = []

    async def sample() -> None:
        await asyncio.sleep(counts.settle_s)  # let the server finish replying, settle
        after.append(server.rss_kib())

    result = asyncio.run(
        loadgen.run_idle(
            server.port,
            count=counts.idle_connections,
            deadline=deadline,
            on_established=sample,
        )
    )
    metrics = {"conns_per_s": result.ok / max(result.elapsed, 1e-9)}
    if after and result.ok:
        metrics["rss_per_conn_kib"] = (after[0] - before_kib) / result.ok
    return Outcome(result, metrics)


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "a/py",
        "a",
        "(a) {message_size} B messages, one connection, sequential, {seq_messages} msgs",
        "py",
        "messages",
        run_sequential,
    ),
    Variant(
        "a/smtp-source",
        "a",
        "(a) {message_size} B payload, one connection, sequential, {seq_messages} msgs",
        "smtp-source",
        "messages",
        _smtp_source("a"),
    ),
    Variant(
        "b/py",
        "b",
        "(b) {message_size} B messages, {par_connections} connections x "
        "{par_per_connection}, pipelined where advertised",
        "py",
        "messages",
        run_parallel,
    ),
    Variant(
        "b/smtp-source",
        "b",
        "(b) {message_size} B payload, {par_connections} connections x "
        "{par_per_connection}, no pipelining",
        "smtp-source",
        "messages",
        _smtp_source("b"),
    ),
    Variant(
        "c/data",
        "c",
        "(c) {large_size} B messages through DATA, {large_messages} in turn on one connection",
        "py",
        "large",
        _large(bdat=False),
    ),
    Variant(
        "c/bdat",
        "c",
        "(c) {large_size} B messages through BDAT (servers advertising CHUNKING), "
        "{large_messages} in turn on one connection",
        "py",
        "large",
        _large(bdat=True),
        needs_chunking=True,
    ),
    Variant(
        "d",
        "d",
        "(d) {idle_connections} idle connections after EHLO",
        "py",
        "idle",
        run_idle,
    ),
    Variant(
        "e/py",
        "e",
        "(e) one message per connection, {opc_parallel} in parallel x {opc_per_worker}",
        "py",
        "messages",
        run_one_per_connection,
    ),
    Variant(
        "e/smtp-source",
        "e",
        "(e) one message per connection, {opc_parallel} in parallel x {opc_per_worker}",
        "smtp-source",
        "messages",
        _smtp_source("e"),
    ),
)


# --------------------------------------------------------------------------- measuring


def measure(
    variants: Sequence[Variant],
    spec: ServerSpec,
    counts: Counts,
    repetition: int,
    known_extensions: dict[str, dict[str, str]],
) -> list[Sample]:
    """Start ``spec``'s server, run each of ``variants`` against it once, stop it.

    The full run passes one variant at a time (a fresh server per measurement); the
    quick mode passes them all, to start each server only once.  ``known_extensions``
    remembers what each server advertised, so that a BDAT variant for a server without
    CHUNKING is skipped without starting it.
    """
    samples = [Sample(v.key, spec.name, repetition) for v in variants]
    todo: list[tuple[Variant, Sample]] = []
    for variant, sample in zip(variants, samples, strict=True):
        ext = known_extensions.get(spec.name)
        if variant.needs_chunking and ext is not None and "CHUNKING" not in ext:
            sample.skipped = "does not advertise CHUNKING"
        else:
            todo.append((variant, sample))
    if todo:
        _measure_on_one_server(todo, spec, counts, known_extensions)
    return samples


def _measure_on_one_server(
    todo: Sequence[tuple[Variant, Sample]],
    spec: ServerSpec,
    counts: Counts,
    known_extensions: dict[str, dict[str, str]],
) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{spec.name}-"))
    server: RunningServer | None = None
    expected = 0
    current = todo[0][1]
    try:
        server = RunningServer(spec, workdir)
        server.wait_ready(counts.start_timeout_s)
        known_extensions[spec.name] = server.extensions
        for variant, sample in todo:
            current = sample
            if variant.needs_chunking and "CHUNKING" not in server.extensions:
                sample.skipped = "does not advertise CHUNKING"
                continue
            expected += _take(sample, variant, server, counts)
            if server.proc.poll() is not None:
                raise ServerError(f"{spec.name} died: {server.log_tail()}")
    except Exception as exc:
        current.errors.append(f"{type(exc).__name__}: {exc}")
        if server is not None:
            current.errors.append(f"server log tail: {server.log_tail()}")
    finally:
        if server is not None:
            server.stop()
            if not current.errors:
                _check_server_count(current, server, expected)
        shutil.rmtree(workdir, ignore_errors=True)


def _take(sample: Sample, variant: Variant, server: RunningServer, counts: Counts) -> int:
    """Measure one variant on a running server; return the messages it must have got."""
    warmup = asyncio.run(
        loadgen.run_connections(
            server.port,
            loadgen.Message.of_size(counts.message_size, tag="warmup"),
            connections=1,
            per_connection=1,
            deadline=time.monotonic() + counts.start_timeout_s,
        )
    )
    if not warmup.clean:
        raise RuntimeError(f"warm-up message failed: {warmup.errors}")
    deadline = time.monotonic() + counts.deadline_s
    cpu_before, main_before = server.cpu_seconds(), server.main_thread_cpu_seconds()
    outcome = variant.run(server, counts, deadline)
    server_cpu = server.cpu_seconds() - cpu_before
    main_cpu = server.main_thread_cpu_seconds() - main_before
    result = outcome.result
    sample.planned, sample.ok = result.planned, result.ok
    sample.failed, sample.session_errors = result.failed, result.session_errors
    sample.errors.extend(result.errors)
    sample.metrics.update(outcome.metrics)
    sample.metrics["server_cpu_s"] = server_cpu
    sample.metrics["client_cpu_s"] = result.client_cpu
    sample.metrics["elapsed_s"] = result.elapsed
    if variant.kind == "messages" and result.ok:
        sample.metrics["msgs_per_s"] = result.ok / max(result.elapsed, 1e-9)
        sample.metrics["server_cpu_us_per_msg"] = server_cpu / result.ok * 1e6
        sample.metrics["main_cpu_us_per_msg"] = main_cpu / result.ok * 1e6
        sample.metrics["client_cpu_us_per_msg"] = result.client_cpu / result.ok * 1e6
    elif variant.kind == "large" and result.payload_bytes:
        mib = result.payload_bytes / MIB
        sample.metrics["server_cpu_ms_per_mib"] = server_cpu / mib * 1e3
    return warmup.ok + (result.ok if variant.kind != "idle" else 0)


def _check_server_count(sample: Sample, server: RunningServer, expected: int) -> None:
    """The server's own count (peers, Maildir) must equal the confirmed transactions."""
    counted = server.message_count()
    if counted is not None and counted != expected:
        sample.errors.append(
            f"server counted {counted} messages, the client had {expected} confirmed"
        )
