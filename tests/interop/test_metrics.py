"""The Prometheus endpoint, scraped with curl and parsed with prometheus_client's own
text parser: ``twistd -n maitred --metrics ...`` after real mail (smtplib with STARTTLS,
the checks against a dnsmasq on loopback), and the multiprocess mode: two processes
count into one directory and the endpoint built by ``metrics_resource(multiproc_dir=)``
sums them.
"""

from __future__ import annotations

import base64
import os
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from maitred_interop import LOCALHOST, free_port, require
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from maitred_tx.metrics import (
    metrics_resource,
    metrics_service,
    prepare_multiproc_dir,
    worker_exited,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsmasq_support import Dnsmasq, run_dnsmasq

# Sent as is (CRLF, final CRLF): its size on the wire after DATA is what the server
# counts in maitred_received_bytes_total.
MESSAGE = (b"From: alice@example.test\r\nTo: bob@example.com\r\nSubject: metrics\r\n\r\n"
           b"counted\r\n")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def curl_args(url: str) -> list[str]:
    return ["-sS", "--max-time", "10", "-w", "\n%{http_code}", url]


def curl(url: str) -> tuple[int, str]:
    """GET *url* with curl: (HTTP status, body)."""
    done = subprocess.run([require("curl"), *curl_args(url)], capture_output=True,
                          text=True, timeout=20, check=True)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Dnsmasq]:
    """SPF for the HELO and MAIL FROM domain and DMARC for the From: domain."""
    yield from run_dnsmasq(tmp_path, [
        "--txt-record=example.test,v=spf1 ip4:127.0.0.1 -all",
        "--txt-record=_dmarc.example.test,v=DMARC1; p=none",
    ])


def test_twistd_metrics_endpoint(twistd, tmp_path: Path, dns: Dnsmasq) -> None:
    """One message through STARTTLS to one accepted and one refused recipient, its
    checks against dnsmasq, a failed and a good AUTH on a submission listener; then
    every counter they moved, scraped."""
    from security_support import make_certificate

    require("curl")
    certs = make_certificate(tmp_path)
    port, submission = free_port(), free_port()
    args = ["--delivery", "discard", "--domain", "example.com", "--hostname", "mx.test",
            "--submission", f"tcp:{submission}:interface={LOCALHOST}",
            "--auth", "memory:alice@example.com:pw-5e4d3c",
            "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
            "--dns-server", f"127.0.0.1:{dns.port}",
            "--metrics", f"tcp:{port}:interface={LOCALHOST}"]
    with twistd(*args) as server:
        context = ssl.create_default_context(cafile=str(certs.cert))
        with smtplib.SMTP(LOCALHOST, server.port, local_hostname="example.test",
                          timeout=10) as s:
            s.starttls(context=context)
            refused = s.sendmail("alice@example.test", ["bob@example.com", "eve@else.org"],
                                 MESSAGE)
        assert list(refused) == ["eve@else.org"] and refused["eve@else.org"][0] == 550
        with smtplib.SMTP(LOCALHOST, submission, local_hostname="example.test",
                          timeout=10) as s:
            s.starttls(context=context)
            s.ehlo()
            wrong = base64.b64encode(b"\0alice@example.com\0wrong").decode()
            code, text = s.docmd("AUTH", "PLAIN " + wrong)  # answered after 1 s
            assert (code, text[:5]) == (535, b"5.7.8")
            assert s.login("alice@example.com", "pw-5e4d3c")[0] == 235
        url = f"http://{LOCALHOST}:{port}/metrics"
        deadline = time.monotonic() + 10
        while True:  # the server sees the QUIT's close a moment after smtplib does
            status, text = curl(url)
            samples = parse(text)
            if (value(samples, "maitred_sessions_active", mode="mx") == 0
                    and value(samples, "maitred_sessions_active", mode="submission") == 0):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert status == 200
        assert curl(f"http://{LOCALHOST}:{port}/")[0] == 404
        assert server.log_text().count("/metrics") == 0  # scrapes are not logged

    def m(name: str, **labels: str) -> float | None:
        return value(samples, name, **labels)

    # The probe that waited for the port, and smtplib's session.
    assert m("maitred_sessions_total", mode="mx") == 2
    assert m("maitred_tls_sessions_total", mode="mx", kind="starttls") == 1
    assert m("maitred_tls_sessions_total", mode="mx", kind="implicit") == 0
    assert m("maitred_recipients_total", mode="mx", result="accepted") == 1
    assert m("maitred_recipients_total", mode="mx", result="permanent") == 1
    assert m("maitred_recipients_total", mode="mx", result="temporary") == 0
    assert m("maitred_messages_total", mode="mx", result="accepted") == 1
    assert m("maitred_messages_total", mode="mx", result="permanent") == 0
    assert m("maitred_received_bytes_total", mode="mx") == len(MESSAGE)
    assert m("maitred_message_size_bytes_count", mode="mx") == 1
    assert m("maitred_message_size_bytes_bucket", mode="mx", le="1024.0") == 1
    assert m("maitred_senders_refused_total", mode="mx", result="permanent") == 0
    assert m("maitred_auth_failures_total", mode="mx") == 0
    assert m("maitred_sessions_total", mode="submission") == 1
    assert m("maitred_tls_sessions_total", mode="submission", kind="starttls") == 1
    assert m("maitred_auth_failures_total", mode="submission") == 1
    assert m("maitred_auth_successes_total", mode="submission") == 1
    assert m("maitred_messages_total", mode="submission", result="accepted") == 0
    assert m("maitred_checks_total", check="spf", result="pass") == 1
    assert m("maitred_checks_total", check="dkim", result="none") == 1
    assert m("maitred_checks_total", check="arc", result="none") == 1
    assert m("maitred_checks_total", check="dmarc", result="pass") == 1
    # The single-process endpoint serves the default registry: the process collector too.
    assert m("process_cpu_seconds_total") is not None
    assert m("maitred_queue_messages") is None  # no queue, no series


# --- several processes ---------------------------------------------------------------------

# A worker stand-in: counts *messages* accepted through the real protocol into the
# directory its environment names, leaves one session open, prints its pid and exits.
WORKER = """
import os, sys
from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.metrics import default_metrics
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.config import Config
from maitred_tx.testing import FakeConnection
from twisted.internet.task import Clock

metrics = default_metrics()
assert metrics.multiprocess
clock = Clock()
factory = SMTPFactory(clock, Config(local_domains=frozenset({"example.com"})),
                      MemoryDelivery(), metrics=metrics)
for _ in range(int(sys.argv[1])):
    conn = FakeConnection(factory=factory, clock=clock)
    replies = conn.codes(b"EHLO a.test\\r\\nMAIL FROM:<a@b.org>\\r\\n"
                         b"RCPT TO:<u@example.com>\\r\\nDATA\\r\\nhi\\r\\n.\\r\\nQUIT\\r\\n")
    assert replies[-2:] == [(250, "2.0.0"), (221, "2.0.0")], replies
FakeConnection(factory=factory, clock=clock)  # still open when the process ends
print(os.getpid())
"""


def run_worker(directory: Path, messages: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run([sys.executable, "-c", WORKER, str(messages)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


async def scrape(url: str) -> Samples:
    """curl as a child process of the reactor, which serves the endpoint meanwhile."""
    out, err, code = await getProcessOutputAndValue(
        require("curl"), curl_args(url), env=dict(os.environ))
    assert code == 0, err
    body, _, status = out.decode().rpartition("\n")
    assert status == "200", body
    return parse(body)


@pytest_twisted.ensureDeferred
async def test_multiprocess_endpoint_sums_the_workers(tmp_path: Path) -> None:
    require("curl")
    directory = tmp_path / "multiproc"
    prepare_multiproc_dir(str(directory))
    first, second = run_worker(directory, 2), run_worker(directory, 3)
    port = free_port()
    service = metrics_service(reactor, f"tcp:{port}:interface={LOCALHOST}",
                              metrics_resource(reactor, multiproc_dir=str(directory)))
    service.startService()
    try:
        url = f"http://{LOCALHOST}:{port}/metrics"
        samples = await scrape(url)
        assert value(samples, "maitred_messages_total", mode="mx", result="accepted") == 5
        assert value(samples, "maitred_recipients_total", mode="mx", result="accepted") == 5
        assert value(samples, "maitred_sessions_total", mode="mx") == 7  # 2 + 1 + 3 + 1
        assert value(samples, "maitred_received_bytes_total", mode="mx") == 5 * len(b"hi\r\n")
        assert value(samples, "maitred_message_size_bytes_count", mode="mx") == 5
        # livesum: one session left open in each process, until the process is known dead.
        assert value(samples, "maitred_sessions_active", mode="mx") == 2
        worker_exited(first, str(directory))
        samples = await scrape(url)
        assert value(samples, "maitred_sessions_active", mode="mx") == 1
        assert value(samples, "maitred_messages_total", mode="mx", result="accepted") == 5
        worker_exited(second, str(directory))
        samples = await scrape(url)
        assert value(samples, "maitred_sessions_active", mode="mx") in (None, 0)
        # The next run starts from nothing.
        prepare_multiproc_dir(str(directory))
        samples = await scrape(url)
        assert value(samples, "maitred_messages_total", mode="mx", result="accepted") is None
    finally:
        await service.stopService()
