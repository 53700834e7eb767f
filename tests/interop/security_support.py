"""Helpers for the issue-4 real-socket tests (TLS, AUTH, LMTP, proxies): certificates
made with ``cryptography``, client TLS contexts, an in-process SMTPService on fresh
127.0.0.1 ports, HAProxy and swaks runners.

Blocking helpers here must run in a thread (``deferToThread``) when the server under
test lives in the test's own reactor.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from maitred_interop import LOCALHOST, free_port, require, stop_process
from twisted.cred.checkers import AllowAnonymousAccess, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.service import SMTPService
from maitred_tx.smtp.config import Config, Mode
from maitred_tx.tap import DeliveryRealm

USER, PASSWORD = "alice@example.com", "s3cret-Pa55"
LOCAL = frozenset({"example.com"})


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert: Path
    key: Path

    @property
    def pem(self) -> Path:
        """Certificate and key in one file (HAProxy's ``ssl crt``)."""
        combined = self.cert.with_suffix(".both.pem")
        if not combined.exists():
            combined.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        return combined


def make_certificate(directory: Path, name: str = "server", cn: str = "localhost") -> CertFiles:
    """A self-signed EC P-256 certificate for *cn* (SAN DNS:localhost, IP 127.0.0.1)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = CertFiles(directory / f"{name}.crt", directory / f"{name}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def client_context(ca: Path | None = None, client: CertFiles | None = None) -> ssl.SSLContext:
    """A client context that trusts *ca* (verifying the name "localhost"), or trusts
    anything when *ca* is None; presents *client*'s certificate if given."""
    if ca is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def portal_for(delivery: Any, anonymous: bool = False) -> Portal:
    checkers: list[Any] = [InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})]
    if anonymous:
        checkers.append(AllowAnonymousAccess())
    return Portal(DeliveryRealm(delivery), checkers)


def submission_config(**kw: Any) -> Config:
    return Config(hostname="mx.test", local_domains=LOCAL, mode=Mode.SUBMISSION, **kw)


def mx_config(**kw: Any) -> Config:
    return Config(hostname="mx.test", local_domains=LOCAL, **kw)


@dataclass(slots=True)
class Running:
    """An in-process SMTPService: its listeners' ports (in listen order) and delivery."""

    service: SMTPService
    delivery: Any
    ports: list[int] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def messages(self) -> list[Any]:
        return self.delivery.messages  # type: ignore[no-any-return]


def start_service(
    reactor: Any,
    listeners: Sequence[tuple[str, Config]],
    *,
    delivery: Any = None,
    portal: Portal | None = None,
    tls: Any = None,
    trusted_proxies: Sequence[str] = (),
) -> Running:
    """Start SMTPService with one listener per (endpoint template, config); "{port}" in a
    template is replaced by a free port on 127.0.0.1."""
    delivery = MemoryDelivery() if delivery is None else delivery
    service = SMTPService(
        reactor, listeners[0][1], delivery, (), portal=portal, tls=tls,
        trusted_proxies=trusted_proxies,
    )
    running = Running(service, delivery)
    for template, config in listeners:
        port = free_port()
        service.listen(template.format(port=port), config)
        running.ports.append(port)
    service.startService()
    return running


def running_services() -> Iterator[Any]:
    """The body of the ``service`` fixture (tests/interop and tests/client):
    ``service([(endpoint template, config), ...], portal=, tls=, trusted_proxies=,
    delivery=)`` starts an in-process SMTPService (``start_service``); every one is
    stopped after the test."""
    import pytest_twisted
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    started: list[Running] = []

    def start(listeners: Any, **kw: Any) -> Running:
        running = start_service(reactor, listeners, **kw)
        started.append(running)
        return running

    yield start
    for running in started:
        d = running.service.stopService()
        if isinstance(d, Deferred):
            pytest_twisted.blockon(d)


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


@contextlib.contextmanager
def haproxy(
    directory: Path, backend_port: int, *, send: str = "send-proxy-v2",
    terminate_tls: Path | None = None,
) -> Iterator[int]:
    """HAProxy (mode tcp) on a free 127.0.0.1 port in front of *backend_port*, sending
    a PROXY header (*send*); with *terminate_tls* (a cert+key PEM) it terminates TLS.
    Yields the frontend port once it accepts; always stopped."""
    binary = require("haproxy")
    port = free_port()
    ssl_bind = f" ssl crt {terminate_tls}" if terminate_tls is not None else ""
    cfg = directory / f"haproxy-{port}.cfg"
    cfg.write_text(
        "global\n"
        "  maxconn 100\n"
        "defaults\n"
        "  mode tcp\n"
        "  timeout connect 5s\n"
        "  timeout client 30s\n"
        "  timeout server 30s\n"
        "frontend smtp\n"
        f"  bind {LOCALHOST}:{port}{ssl_bind}\n"
        "  default_backend maitred\n"
        "backend maitred\n"
        f"  server s1 {LOCALHOST}:{backend_port} {send}\n"
    )
    log = directory / f"haproxy-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "-f", str(cfg), "-db"], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        try:
            wait_for_port(port, process)
        except RuntimeError as e:
            raise RuntimeError(f"haproxy: {e}\n{log.read_text(errors='replace')}") from None
        yield port
    finally:
        stop_process(process)


def swaks(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run swaks (blocking: call it in a thread); stdout and stderr captured."""
    binary = require("swaks")
    return subprocess.run(
        [binary, "--server", LOCALHOST, "--helo", "client.test", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
