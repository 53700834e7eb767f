"""Test peers for MTA-STS: a private CA with leaf certificates (``cryptography``), and a
real HTTPS policy server (twisted.web on 127.0.0.1) that answers by Host header.

Every ``mta-sts.<domain>`` name is reached on 127.0.0.1 through the fetcher's
``connect_to`` hook, while SNI and certificate verification still use the real name.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server

from maitred_tx.mta_sts.fetch import PolicyFetcher

ONE_DAY = datetime.timedelta(days=1)
GOOD_POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmax_age: 86400\r\n"


@dataclass
class CA:
    """A certificate authority that issues leaf certificates for DNS names."""

    name: str
    key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    cert: Any = None

    def __post_init__(self) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - ONE_DAY)
            .not_valid_after(now + ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def trust_root(self) -> Any:
        """An IOpenSSLTrustRoot trusting only this CA."""
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(self.pem)])

    def issue(self, names: Sequence[str], *, expired: bool = False) -> ssl.PrivateCertificate:
        """A server certificate for the DNS ``names`` (the first is also the CN)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start = now - (3 if expired else 1) * ONE_DAY
        end = now + (-1 if expired else 1) * ONE_DAY
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self.key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return ssl.PrivateCertificate.loadPEM(pem)


# A handler writes the whole answer itself; it gets the request and returns the body
# (bytes) or server.NOT_DONE_YET.
Handler = Callable[[server.Request], Any]


def policy_handler(
    text: str | bytes, content_type: bytes | None = b"text/plain"
) -> Handler:
    body = text.encode() if isinstance(text, str) else text

    def handle(request: server.Request) -> bytes:
        if content_type is None:
            request.defaultContentType = None
        else:
            request.setHeader(b"content-type", content_type)
        return body

    return handle


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, policy_server: PolicyServer) -> None:
        super().__init__()
        self._server = policy_server

    def render(self, request: server.Request) -> Any:
        host = (request.getHeader(b"host") or b"").decode().split(":")[0]
        path = request.path.decode()
        self._server.requests[host] += 1
        self._server.headers.append(dict(request.requestHeaders.getAllRawHeaders()))
        handler = self._server.handlers.get(host) if path == "/.well-known/mta-sts.txt" else None
        if handler is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        return handler(request)


@dataclass
class PolicyServer:
    """An HTTPS server on 127.0.0.1 with one certificate; ``handlers`` map the Host
    name to the answer for ``/.well-known/mta-sts.txt``; ``requests`` counts requests
    per Host name (any path)."""

    listener: IListeningPort
    handlers: dict[str, Handler]
    requests: Counter[str] = field(default_factory=Counter)
    headers: list[dict[bytes, list[bytes]]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.listener.getHost().port)


def start_policy_server(
    reactor: Any, certificate: ssl.PrivateCertificate, handlers: dict[str, Handler] | None = None
) -> PolicyServer:
    policy_server = PolicyServer(listener=None, handlers=dict(handlers or {}))  # type: ignore[arg-type]
    site = server.Site(_Root(policy_server))
    site.displayTracebacks = False
    policy_server.listener = reactor.listenSSL(
        0, site, certificate.options(), interface="127.0.0.1"
    )
    return policy_server


def make_fetcher(reactor: Any, ca: CA, server: PolicyServer, **kw: Any) -> PolicyFetcher:
    """A fetcher trusting only ``ca`` and connecting every host to ``server``."""
    kw.setdefault("timeout", 5.0)
    port = server.port
    return PolicyFetcher(
        reactor,
        trust_root=ca.trust_root(),
        connect_to=lambda host, _: ("127.0.0.1", port),
        **kw,
    )
