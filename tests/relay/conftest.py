"""Real peers for the relay: dnsmasq with the test domains' MX and MTA-STS records, an
HTTPS policy server with a private CA, receiving maitred_tx servers (STARTTLS with a
certificate from that CA for the MX names), and a queue runner on a spool in tmp_path."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # dnsmasq_support
sys.path.insert(0, str(HERE.parent / "mta_sts"))  # mta_sts_support
sys.path.insert(0, str(HERE.parent / "interop"))  # maitred_interop

from dnsmasq_support import Dnsmasq, run_dnsmasq  # noqa: E402
from mta_sts_support import CA, make_fetcher, policy_handler, start_policy_server  # noqa: E402

from maitred_tx.delivery.memory import MemoryDelivery  # noqa: E402
from maitred_tx.mta_sts import PolicyStore  # noqa: E402
from maitred_tx.queue.spool import SpoolStore  # noqa: E402
from maitred_tx.queue.store import QueuedRecipient, QueueEnvelope  # noqa: E402
from maitred_tx.queue.threaded import ThreadedQueue  # noqa: E402
from maitred_tx.relay.connections import ConnectionCache  # noqa: E402
from maitred_tx.relay.runner import QueueRunner  # noqa: E402
from maitred_tx.relay.sender import OutboundSender  # noqa: E402
from maitred_tx.service import SMTPService  # noqa: E402
from maitred_tx.smtp.config import AuthChecks, Config, Mode  # noqa: E402

# Every MX name below resolves to 127.0.0.1 but mx1.down.test (127.0.0.2, where nothing
# listens: connection refused).  The receiver's certificate is for the "good" names.
MX_NAMES = ("mx.good.test", "mx.sts.test", "mx.wrongcert.test", "mx.testing.test",
            "mx2.down.test", "mx.bad-sts.test", "mx.sender.test")
CERT_NAMES = ("mx.good.test", "mx.sts.test", "mx.testing.test", "mx.sender.test",
              "mx2.down.test", "mx.bad-sts.test")
TLSRPT_NAME = "_smtp._tls.sts.test"
TLSRPT_RUA = "tlsrpt@sts.test"
POLICIES = {
    "sts.test": "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n",
    "bad-sts.test": "version: STSv1\nmode: enforce\nmx: other.bad-sts.test\nmax_age: 86400\n",
    "wrongcert.test": "version: STSv1\nmode: enforce\nmx: *.wrongcert.test\nmax_age: 86400\n",
    "testing.test": "version: STSv1\nmode: testing\nmx: mx.example.net\nmax_age: 86400\n",
}


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    records = [f"--host-record={name},127.0.0.1" for name in MX_NAMES]
    records += ["--host-record=mx1.down.test,127.0.0.2", "--mx-host=nullmx.test,.,0",
                "--mx-host=down.test,mx1.down.test,10", "--mx-host=down.test,mx2.down.test,20"]
    for domain in ("good.test", "sts.test", "wrongcert.test", "testing.test", "bad-sts.test",
                   "sender.test"):
        records.append(f"--mx-host={domain},mx.{domain},10")
    records += [f"--txt-record=_mta-sts.{domain},v=STSv1; id=1;" for domain in POLICIES]
    # RFC 8460 3: sts.test asks for TLS reports by mail, its record in two strings
    # (dnsmasq splits the text at the comma) that the resolver joins.
    records.append(f"--txt-record={TLSRPT_NAME},v=TLSRPTv1;,rua=mailto:{TLSRPT_RUA}")
    yield from run_dnsmasq(tmp_path_factory.mktemp("relay-dns"), records, local=("test",))


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("relay test CA")


@pytest.fixture
def policies(ca: CA) -> Iterator[Any]:
    server = start_policy_server(
        reactor, ca.issue([f"mta-sts.{d}" for d in POLICIES]),
        {f"mta-sts.{d}": policy_handler(text) for d, text in POLICIES.items()})
    yield server
    pytest_twisted.blockon(server.listener.stopListening())


@dataclass
class Receiver:
    service: SMTPService
    delivery: MemoryDelivery
    port: int
    sessions: list[Any] = field(default_factory=list)

    @property
    def messages(self) -> list[Any]:
        return self.delivery.messages


@pytest.fixture
def receiver(ca: CA, tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """``receiver(tls=True)``: an MX on 127.0.0.1 accepting mail for every domain, with
    STARTTLS under a certificate for CERT_NAMES from the test CA (or from *issuer*).
    With a *portal*: a submission server (AUTH, then MAIL); *implicit*: TLS from the
    first byte (an ssl: listener) rather than STARTTLS."""
    from maitred_interop import free_port

    from maitred_tx.server.tls import server_context

    started: list[Receiver] = []

    def start(*, tls: bool = True, delivery: Any = None, portal: Any = None,
              implicit: bool = False, issuer: CA | None = None) -> Receiver:
        context = None
        if tls:
            certificate = (issuer or ca).issue(list(CERT_NAMES))
            pem = tmp_path / f"mx{len(started)}.pem"
            pem.write_bytes(certificate.dumpPEM())
            context = server_context(pem)
        config = Config(hostname="mx.good.test", relay=True,
                        mode=Mode.MX if portal is None else Mode.SUBMISSION,
                        auth_checks=AuthChecks(enabled=False))
        delivery = delivery or MemoryDelivery()
        service = SMTPService(reactor, config, delivery, (), tls=context, portal=portal)
        port = free_port()
        kind = "ssl" if implicit else "tcp"
        factory = service.listen(f"{kind}:{port}:interface=127.0.0.1", config)
        service.startService()
        running = Receiver(service, delivery, port)
        original = factory.buildProtocol

        def counting(addr: Any) -> Any:
            protocol = original(addr)
            running.sessions.append(protocol)
            return protocol

        factory.buildProtocol = counting  # type: ignore[method-assign]
        started.append(running)
        return running

    yield start
    for running in started:
        pytest_twisted.blockon(running.service.stopService())


@dataclass
class Relay:
    store: SpoolStore
    queue: ThreadedQueue
    sender: OutboundSender
    runner: QueueRunner
    mta_sts: Any

    def add(self, sender: str | None, recipients: list[str], body: bytes, **kw: Any) -> str:
        envelope = QueueEnvelope(sender, tuple(QueuedRecipient(r) for r in recipients), **kw)
        message_id = self.store.add(envelope, [body])
        self.runner.notify()
        return message_id


@pytest.fixture
def relay(dns: Dnsmasq, ca: CA, tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """``relay(port=receiver.port, mta_sts=policies, relay_host=None)``: a started runner
    over a fresh spool, its MX port moved to *port*."""
    made: list[Relay] = []

    def start(*, port: int, policy_server: Any = None, relay_host: Any = None,
              signer: Any = None, **runner: Any) -> Relay:
        store = SpoolStore(str(tmp_path / f"spool{len(made)}"))
        store.recover()
        queue = ThreadedQueue(store, reactor)
        resolver = dns.resolver()
        mta_sts = None
        if policy_server is not None:
            mta_sts = PolicyStore(reactor, resolver, make_fetcher(reactor, ca, policy_server),
                                  cache_dir=str(tmp_path / f"sts{len(made)}"))
        sender = OutboundSender(reactor, resolver, helo="relay.test", relay=relay_host,
                                mta_sts=mta_sts, signer=signer, trust_root=ca.trust_root(),
                                port=port, connect_timeout=2.0,
                                connections=ConnectionCache(reactor, idle=1.0))
        runner.setdefault("poll", 0.1)
        queue_runner = QueueRunner(reactor, queue, sender, hostname="relay.test", **runner)
        queue_runner.startService()
        made.append(Relay(store, queue, sender, queue_runner, mta_sts))
        return made[-1]

    yield start
    for r in made:
        pytest_twisted.blockon(Deferred.fromCoroutine(_stop(r)))


async def _stop(r: Relay) -> None:
    stopped = r.runner.stopService()
    if stopped is not None:
        await stopped
    r.store.close()
