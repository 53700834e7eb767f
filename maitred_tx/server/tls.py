"""TLS for the listeners: the context for STARTTLS (RFC 3207) and what a delivery may
learn about a TLS session (version, cipher, client certificate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import ISSLTransport

__all__ = ["TLSFacts", "server_context", "tls_facts"]


def server_context(cert_path: str | Path, key_path: str | Path | None = None) -> Any:
    """A CertificateOptions for *cert_path* (PEM, may hold the chain) and *key_path*.

    TLS 1.2 is the floor (RFC 8996 retires 1.0/1.1; RFC 8314 4.1); Twisted's defaults
    pick the ciphers.  Client certificates are asked for but not required, so that a
    delivery can see one if the client presents it.
    """
    cert_pem = Path(cert_path).read_bytes()
    key_pem = Path(key_path).read_bytes() if key_path else cert_pem
    certificate = ssl.PrivateCertificate.loadPEM(key_pem + b"\n" + cert_pem)
    chain = [
        ssl.Certificate.loadPEM(block).original
        for block in _pem_blocks(cert_pem)[1:]
    ]
    options = ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        extraCertChain=chain or None,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        verify=False,
    )
    # verify=False alone never sends a CertificateRequest, so no client certificate
    # would ever be seen.  Ask for one (VERIFY_PEER without FAIL_IF_NO_PEER_CERT) and
    # accept whatever comes: judging it is the delivery's business, not the handshake's.
    # getContext() builds the context once and caches it, so this sticks.
    options.getContext().set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _any_certificate)
    return options


def _any_certificate(connection: Any, x509: Any, errno: int, depth: int, ok: int) -> bool:
    return True


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE" in block]


@dataclass(frozen=True, slots=True)
class TLSFacts:
    version: str  # e.g. "TLSv1.3"
    cipher: str
    client_certificate: str | None  # the subject, if the client presented one


def tls_facts(transport: Any) -> TLSFacts | None:
    """What the finished handshake negotiated, or None for a cleartext transport."""
    if not ISSLTransport.providedBy(transport):
        return None
    handle = transport.getHandle()  # type: ignore[attr-defined]
    if not isinstance(handle, SSL.Connection):
        return None
    version = handle.get_protocol_version_name() or "unknown"
    cipher = handle.get_cipher_name() or "unknown"
    peer = handle.get_peer_certificate(as_cryptography=True)
    subject = None if peer is None else peer.subject.rfc4514_string()
    return TLSFacts(version, cipher, subject)
