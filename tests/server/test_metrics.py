"""The Prometheus counters move exactly when they should: the real protocol, factory and
deliveries on FakeConnection + task.Clock, no sockets, a fresh CollectorRegistry per
test (so tests share no counts).  The endpoint, twistd and multiprocess mode are in
tests/interop/test_metrics.py.
"""

from __future__ import annotations

import base64
import socket
import struct
import subprocess
import sys
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from zope.interface import directlyProvides

from maitred_tx.auth.arc import ARCResult
from maitred_tx.auth.dkim import DKIMResult
from maitred_tx.auth.dmarc import DMARCVerdict
from maitred_tx.auth.spf import SPFResult, SPFVerdict
from maitred_tx.auth.verdicts import AuthResults
from maitred_tx.delivery.base import Delivery, MessageSink
from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.metrics import NO_METRICS, Metrics
from maitred_tx.outcomes import Outcome, PermanentFailure, TemporaryFailure
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.config import Config, Limits, Mode
from maitred_tx.tap import DeliveryRealm
from maitred_tx.testing import FakeConnection, TestTransport

LOCAL = frozenset({"example.com"})
BODY = b"From: a@b.org\r\nSubject: s\r\n\r\nhello\r\n"  # 35 octets: its stored size
MESSAGE = BODY + b".\r\n"
USER, PASSWORD = "alice@example.com", "pw-3c2b1a"


class Counts:
    """The sample values of one registry, by name and labels (0 for a series that is
    not there, so a test can say "did not move")."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def __call__(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def count(metrics: Metrics) -> Counts:
    return Counts(metrics.registry)


def mx(**kw: Any) -> Config:
    return Config(hostname="mx.test", local_domains=LOCAL, **kw)


def serve(metrics: Metrics, config: Config | None = None, delivery: Any = None,
          clock: Clock | None = None, **kw: Any) -> SMTPFactory:
    return SMTPFactory(clock or Clock(), config or mx(), delivery or MemoryDelivery(),
                       metrics=metrics, **kw)


def connect(factory: SMTPFactory, peer: tuple[str, int] = ("192.0.2.7", 40000)
            ) -> FakeConnection:
    conn = FakeConnection(factory=factory, clock=factory.reactor, peer=peer)  # type: ignore[arg-type]
    conn.replies()  # the greeting (or the limits' 421)
    return conn


class Refusing(Delivery):
    """Refuses what it is told to: MAIL or RCPT by outcome, or the message at close."""

    def __init__(self, *, mail: Outcome | None = None, rcpt: Outcome | None = None,
                 message: Outcome | None = None) -> None:
        self.mail, self.rcpt, self.message = mail, rcpt, message

    def mail_from(self, context: Any, sender: Any, params: Any) -> Outcome | None:
        return self.mail

    def rcpt_to(self, context: Any, envelope: Any, recipient: Any, params: Any
                ) -> Outcome | None:
        return self.rcpt

    def open_message(self, envelope: Any) -> Any:
        outcome = self.message

        class Sink(MessageSink):
            def close(self) -> Any:
                return outcome if outcome is not None else super().close()

        return Sink(envelope)


# --- sessions and messages ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["whole", "lines", "bytes"])
def test_accepted_message(metrics: Metrics, count: Counts, mode: str) -> None:
    conn = connect(serve(metrics))
    assert count("maitred_sessions_total", mode="mx") == 1
    assert count("maitred_sessions_active", mode="mx") == 1
    transcript = (b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\n"
                  b"DATA\r\n" + MESSAGE + b"QUIT\r\n")
    assert conn.codes(transcript, mode)[-2:] == [(250, "2.0.0"), (221, "2.0.0")]
    assert count("maitred_recipients_total", mode="mx", result="accepted") == 1
    assert count("maitred_messages_total", mode="mx", result="accepted") == 1
    assert count("maitred_received_bytes_total", mode="mx") == len(BODY)
    assert count("maitred_message_size_bytes_count", mode="mx") == 1
    assert count("maitred_message_size_bytes_sum", mode="mx") == len(BODY)
    assert count("maitred_message_size_bytes_bucket", mode="mx", le="1024.0") == 1
    for result in ("temporary", "permanent"):
        assert count("maitred_messages_total", mode="mx", result=result) == 0
        assert count("maitred_recipients_total", mode="mx", result=result) == 0
    assert not conn.connected
    assert count("maitred_sessions_active", mode="mx") == 0
    assert count("maitred_sessions_total", mode="mx") == 1


def test_sessions_active_counts_open_connections(metrics: Metrics, count: Counts) -> None:
    factory = serve(metrics)
    first, second = connect(factory), connect(factory, ("192.0.2.8", 1))
    assert count("maitred_sessions_active", mode="mx") == 2
    first.transport.loseConnection()
    assert count("maitred_sessions_active", mode="mx") == 1
    second.transport.loseConnection()
    assert count("maitred_sessions_active", mode="mx") == 0
    assert count("maitred_sessions_total", mode="mx") == 2


def test_refused_recipient_550(metrics: Metrics, count: Counts) -> None:
    conn = connect(serve(metrics))
    assert conn.codes(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@else.org>\r\n"
                      b"RCPT TO:<u@example.com>\r\n")[-2:] == [(550, "5.7.1"), (250, "2.1.5")]
    assert count("maitred_recipients_total", mode="mx", result="permanent") == 1
    assert count("maitred_recipients_total", mode="mx", result="accepted") == 1
    assert count("maitred_recipients_total", mode="mx", result="temporary") == 0
    assert count("maitred_senders_refused_total", mode="mx", result="permanent") == 0
    assert count("maitred_messages_total", mode="mx", result="accepted") == 0


def test_recipient_refused_by_the_delivery_451(metrics: Metrics, count: Counts) -> None:
    delivery = Refusing(rcpt=TemporaryFailure("Greylisted", 451, "4.7.1"))
    conn = connect(serve(metrics, delivery=delivery))
    assert conn.codes(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\n"
                      b"RCPT TO:<u@example.com>\r\n")[-1] == (451, "4.7.1")
    assert count("maitred_recipients_total", mode="mx", result="temporary") == 1
    assert count("maitred_recipients_total", mode="mx", result="accepted") == 0


def test_message_refused_451_after_the_body(metrics: Metrics, count: Counts) -> None:
    delivery = Refusing(message=TemporaryFailure("Try later", 451, "4.3.0"))
    conn = connect(serve(metrics, delivery=delivery))
    assert conn.codes(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\n"
                      b"DATA\r\n" + MESSAGE)[-1] == (451, "4.3.0")
    assert count("maitred_messages_total", mode="mx", result="temporary") == 1
    assert count("maitred_messages_total", mode="mx", result="accepted") == 0
    assert count("maitred_recipients_total", mode="mx", result="accepted") == 1
    assert count("maitred_received_bytes_total", mode="mx") == 0  # not accepted
    assert count("maitred_message_size_bytes_count", mode="mx") == 0


def test_message_refused_in_the_body_552(metrics: Metrics, count: Counts) -> None:
    conn = connect(serve(metrics, mx(limits=Limits(max_message_size=10_000))))
    big = b"x" * 998 + b"\r\n"
    assert conn.codes(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\n"
                      b"DATA\r\n" + big * 11 + b".\r\n")[-1] == (552, "5.3.4")
    assert count("maitred_messages_total", mode="mx", result="permanent") == 1
    assert count("maitred_received_bytes_total", mode="mx") == 0


def test_refused_senders_by_class(metrics: Metrics, count: Counts) -> None:
    conn = connect(serve(metrics, mx(require_tls=True)))
    assert conn.codes(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\n")[-1] == (530, "5.7.0")
    assert count("maitred_senders_refused_total", mode="mx", result="permanent") == 1
    delivery = Refusing(mail=TemporaryFailure("Later", 450, "4.7.1"))
    conn = connect(serve(metrics, delivery=delivery))
    assert conn.codes(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\n")[-1] == (450, "4.7.1")
    assert count("maitred_senders_refused_total", mode="mx", result="temporary") == 1
    assert count("maitred_recipients_total", mode="mx", result="permanent") == 0


def test_lmtp_message_counted_once_by_its_combined_reply(metrics: Metrics,
                                                         count: Counts) -> None:
    conn = connect(serve(metrics, mx(mode=Mode.LMTP)))
    replies = conn.codes(b"LHLO client.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\n"
                         b"RCPT TO:<v@example.com>\r\nDATA\r\n" + MESSAGE)
    assert replies[-2:] == [(250, "2.0.0"), (250, "2.0.0")]  # one per recipient
    assert count("maitred_sessions_total", mode="lmtp") == 1
    assert count("maitred_recipients_total", mode="lmtp", result="accepted") == 2
    assert count("maitred_messages_total", mode="lmtp", result="accepted") == 1
    assert count("maitred_sessions_total", mode="mx") == 0


# --- TLS, AUTH, per-client limits ------------------------------------------------------


def test_starttls(metrics: Metrics, count: Counts) -> None:
    conn = connect(serve(metrics, mx(starttls=True), tls=object()))
    started: list[Any] = []
    conn.transport.startTLS = started.append  # type: ignore[attr-defined]  # no handshake
    assert conn.codes(b"EHLO client.test\r\nSTARTTLS\r\n")[-1] == (220, "2.0.0")
    assert len(started) == 1
    assert count("maitred_tls_sessions_total", mode="mx", kind="starttls") == 1
    assert count("maitred_tls_sessions_total", mode="mx", kind="implicit") == 0


def test_implicit_tls(metrics: Metrics, count: Counts) -> None:
    factory = serve(metrics)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 465))
    transport = TestTransport(IPv4Address("TCP", "192.0.2.7", 40000))
    directlyProvides(transport, ISSLTransport)  # what an ssl: listener's transport is
    protocol.makeConnection(transport)
    assert count("maitred_tls_sessions_total", mode="mx", kind="implicit") == 1
    assert count("maitred_tls_sessions_total", mode="mx", kind="starttls") == 0


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def test_tls_terminated_by_a_trusted_proxy(metrics: Metrics, count: Counts) -> None:
    block = socket.inet_aton("198.51.100.9") + socket.inet_aton("192.0.2.25") + struct.pack(
        "!HH", 44322, 25)
    block += _tlv(0x20, b"\x01" + struct.pack("!I", 0) + _tlv(0x21, b"TLSv1.3"))
    header = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(block))
              + block)
    factory = serve(metrics, mx(proxy_protocol=True), trusted_proxies=["10.0.0.0/8"])
    conn = connect(factory, ("10.0.0.5", 51000))
    assert conn.codes(header + b"EHLO client.test\r\n") == [(250, None)]
    assert count("maitred_tls_sessions_total", mode="mx", kind="proxy") == 1


def _auth_factory(metrics: Metrics, clock: Clock) -> SMTPFactory:
    delivery = MemoryDelivery()
    users = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})
    config = Config(hostname="mx.test", local_domains=LOCAL, mode=Mode.SUBMISSION,
                    auth=True, insecure_auth=True)
    return serve(metrics, config, delivery, clock,
                 portal=Portal(DeliveryRealm(delivery), [users]))


def _plain(password: str) -> bytes:
    return base64.b64encode(f"\0{USER}\0{password}".encode())


def test_auth_failure_and_success(metrics: Metrics, count: Counts) -> None:
    clock = Clock()
    conn = connect(_auth_factory(metrics, clock))
    conn.send(b"EHLO client.test\r\n")
    assert conn.codes(b"AUTH PLAIN " + _plain("wrong") + b"\r\n") == []  # answered later
    clock.advance(1)  # failures are answered slowly (protocol_auth._AUTH_DELAYS)
    assert conn.codes(b"") == [(535, "5.7.8")]
    assert count("maitred_auth_failures_total", mode="submission") == 1
    assert count("maitred_auth_successes_total", mode="submission") == 0
    assert conn.codes(b"AUTH PLAIN " + _plain(PASSWORD) + b"\r\n") == [(235, "2.7.0")]
    assert count("maitred_auth_successes_total", mode="submission") == 1
    assert count("maitred_auth_failures_total", mode="submission") == 1


def test_per_client_connection_limit(metrics: Metrics, count: Counts) -> None:
    factory = serve(metrics, mx(limits=Limits(max_client_connections=1)))
    first = connect(factory)
    second = FakeConnection(factory=factory, clock=factory.reactor)  # type: ignore[arg-type]
    assert [(r.code, r.status) for r in second.replies()] == [(421, None)]
    assert count("maitred_sessions_refused_total", mode="mx", reason="connections") == 1
    assert count("maitred_sessions_refused_total", mode="mx", reason="rate") == 0
    assert count("maitred_sessions_total", mode="mx") == 2  # both were accepted first
    assert count("maitred_sessions_active", mode="mx") == 1  # the refused one is closed
    assert first.connected


def test_per_client_rate_limits(metrics: Metrics, count: Counts) -> None:
    factory = serve(metrics, mx(limits=Limits(max_client_connection_rate=1,
                                              max_client_message_rate=1)))
    conn = connect(factory)
    transaction = (b"MAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n" + MESSAGE)
    assert conn.codes(b"EHLO client.test\r\n" + transaction)[-1] == (250, "2.0.0")
    assert conn.codes(b"MAIL FROM:<a@b.org>\r\n") == [(421, "4.7.0")]
    assert count("maitred_sessions_refused_total", mode="mx", reason="message_rate") == 1
    again = FakeConnection(factory=factory, clock=factory.reactor)  # type: ignore[arg-type]
    assert [r.code for r in again.replies()] == [421]
    assert count("maitred_sessions_refused_total", mode="mx", reason="rate") == 1
    assert count("maitred_senders_refused_total", mode="mx", result="temporary") == 0


# --- checks, queue, and no metrics -----------------------------------------------------


def _results(dkim: tuple[str, ...], arc: str | None) -> AuthResults:
    return AuthResults(
        spf_helo=SPFVerdict(SPFResult.PASS, "helo", "client.test"),
        spf_mailfrom=SPFVerdict(SPFResult.SOFTFAIL, "mailfrom", "b.org"),
        mail_from="a@b.org",
        dkim=tuple(DKIMResult(r, "b.org", "s1", "abc", "rsa-sha256") for r in dkim),
        arc=None if arc is None else ARCResult(arc, 0),  # type: ignore[arg-type]
        dmarc=DMARCVerdict("fail", "b.org", None, "none", None, False, False),
    )


def test_check_verdicts(metrics: Metrics, count: Counts) -> None:
    listener = metrics.listener(Mode.MX)
    listener.checks(_results(("pass", "fail"), "none"))
    listener.checks(_results((), None))  # unsigned; ARC not evaluated (too large)
    assert count("maitred_checks_total", check="spf", result="softfail") == 2
    assert count("maitred_checks_total", check="dkim", result="pass") == 1
    assert count("maitred_checks_total", check="dkim", result="fail") == 1
    assert count("maitred_checks_total", check="dkim", result="none") == 1
    assert count("maitred_checks_total", check="arc", result="none") == 1
    assert count("maitred_checks_total", check="dmarc", result="fail") == 2


def test_checks_counted_from_the_sink_the_message_went_through(metrics: Metrics,
                                                               count: Counts) -> None:
    """The glue counts the verdicts CheckingSink leaves on itself (``sink.auth``)."""
    results = _results(("pass",), "pass")

    class Checked(Delivery):
        def open_message(self, envelope: Any) -> Any:
            sink = MessageSink(envelope)
            sink.auth = results  # type: ignore[attr-defined]
            return sink

    conn = connect(serve(metrics, delivery=Checked()))
    assert conn.codes(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\n"
                      b"DATA\r\n" + MESSAGE)[-1] == (250, "2.0.0")
    assert count("maitred_checks_total", check="dkim", result="pass") == 1
    assert count("maitred_checks_total", check="arc", result="pass") == 1


def test_queue_gauge_exists_only_once_a_queue_sets_it(metrics: Metrics,
                                                      count: Counts) -> None:
    names = {m.name for m in metrics.registry.collect()}
    assert "maitred_queue_messages" not in names

    class FakeQueue:
        """A value source standing in for the future queue: it reports each change."""

        def __init__(self, report: Any) -> None:
            self.items: list[str] = []
            self.report = report

        def put(self, item: str) -> None:
            self.items.append(item)
            self.report(len(self.items))

        def take(self) -> str:
            item = self.items.pop(0)
            self.report(len(self.items))
            return item

    queue = FakeQueue(metrics.set_queue_length)
    queue.put("a")
    queue.put("b")
    assert count("maitred_queue_messages") == 2
    queue.take()
    assert count("maitred_queue_messages") == 1


def test_one_series_set_per_mode(metrics: Metrics) -> None:
    assert metrics.listener(Mode.MX) is metrics.listener(Mode.MX)
    assert metrics.listener(Mode.MX) is not metrics.listener(Mode.SUBMISSION)


def test_no_metrics_by_default() -> None:
    assert SMTPFactory(Clock(), mx(), MemoryDelivery()).metrics is NO_METRICS


def test_a_server_without_metrics_never_imports_prometheus_client() -> None:
    script = (
        "import sys\n"
        "from maitred_tx.delivery.memory import MemoryDelivery\n"
        "from maitred_tx.smtp.config import Config\n"
        "from maitred_tx.testing import FakeConnection\n"
        "import maitred_tx.tap, maitred_tx.service\n"
        "c = FakeConnection(MemoryDelivery(), Config(local_domains=frozenset({'x.test'})))\n"
        "c.send(b'EHLO a\\r\\nMAIL FROM:<a@b>\\r\\nRCPT TO:<u@x.test>\\r\\nDATA\\r\\n"
        "x\\r\\n.\\r\\nQUIT\\r\\n')\n"
        "print(sorted(m for m in sys.modules if m.startswith('prometheus')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_multiproc_dir_set_too_late_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Any) -> None:
    # prometheus_client is imported (in memory mode) by now: the variable is too late.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="set after prometheus_client was imported"):
        Metrics(CollectorRegistry())


def test_a_registry_takes_the_names_once(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(metrics.registry)


def test_refusal_outcomes_are_permanent_by_default(metrics: Metrics, count: Counts) -> None:
    conn = connect(serve(metrics, delivery=Refusing(rcpt=PermanentFailure())))
    conn.codes(b"EHLO client.test\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\n")
    assert count("maitred_recipients_total", mode="mx", result="permanent") == 1
