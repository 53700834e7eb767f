"""DKIM signing of outgoing mail (RFC 6376 5), rsa-sha256 and ed25519-sha256 (RFC 8463).

This module owns the signing keys (loading and checking them at startup), the choice of
key for a message, and the DKIM-Signature header fields.

dkimpy does the format work that must agree with every verifier - header parsing,
relaxed canonicalization (RFC 6376 3.4.2, 3.4.4), hashing the ``h=`` fields (3.7) - the
code our inbound checker verifies with.  The key operation is OpenSSL's, through
``cryptography``: dkimpy's RSA is pure Python (13 ms per 2048-bit signature here against
1 ms, and not constant-time).  RSASSA-PKCS1-v1_5 (3.3.1) and Ed25519's PureEdDSA (RFC
8463 3) both sign the SHA-256 digest of the header hash input.

Choices (README, "DKIM signing"): relaxed/relaxed, which survives re-folding; the
``SIGNED_HEADERS`` present, each instance, and From: once more than it occurs (over-
signing, RFC 6376 5.4.2 / 8.15: an added From: breaks the signature); ``t=``, and
``x=`` with ``expire``; no ``l=`` (8.2) and no ``i=`` (its default ``@d`` is meant); the
keys of the From: domain or of its closest parent with keys (DMARC relaxed alignment,
RFC 7489 3.1.1), else those of ``sign_all``; every key of that domain, so an RSA and an
Ed25519 key sign twice (RFC 8463 6, for the transition), RSA on top for verifiers that
read only the first signature.

Signing is CPU work: ``sign_bytes`` is for a worker thread, ``sign`` hands the work to
the ``run_cpu`` runner (``functools.partial(deferToThreadPool, reactor, pool)`` under
Twisted); this module never touches a reactor.  dkimpy needs the whole message in
memory, so messages over ``max_size`` are not signed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Final, Literal, TypeAlias

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy
from twisted.logger import Logger

from maitred_tx.auth.dkim import CPURunner
from maitred_tx.smtp.address import AddressError, normalize_domain
from maitred_tx.smtp.config import AuthChecks

__all__ = ["OVERSIGNED_HEADERS", "SIGNED_HEADERS", "DKIMKey", "DKIMKeyError", "Signed",
           "Signer", "load_key", "parse_dkim_key_option"]

_log = Logger()

Algorithm: TypeAlias = Literal["rsa-sha256", "ed25519-sha256"]
_PrivateKey: TypeAlias = "rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey"

# The header fields signed when present: RFC 6376 5.4.1's list of fields that carry the
# message's meaning, cut to those that relays leave alone (no Sender:/List-*: that
# mailing lists rewrite).  The order is the order of h=.
SIGNED_HEADERS: Final = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version",
    "content-type", "content-transfer-encoding", "in-reply-to", "references",
    # RFC 8460 5.3: a TLS report's fields "SHOULD be included in the DKIM signature"
    "tls-report-domain", "tls-report-submitter",
)
# Signed once more than they occur (RFC 6376 5.4.2): adding one breaks the signature.
OVERSIGNED_HEADERS: Final = ("from",)
# RFC 6376 5.4.1: fields a signer SHOULD NOT sign (changed or added in transit), as
# dkimpy's DKIM.SHOULD_NOT lists them.  Asking for them is refused at configuration.
_NEVER_SIGNED: Final = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)
# RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048;
# verifiers MUST handle up to 4096 (larger ones may not verify anywhere).
_MIN_RSA_BITS: Final = 1024
_GOOD_RSA_BITS: Final = 2048
_MAX_RSA_BITS: Final = 4096
# A key file larger than this is not a key (a 4096-bit RSA PEM is about 3.3 KB).
_MAX_KEY_FILE: Final = 64 * 1024
# Where a line of the signature field is folded (RFC 5322 2.1.1: SHOULD be <= 78).
_LINE: Final = 76
_HEADER_NAME: Final = b"DKIM-Signature"
_RELAXED: Final = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
# RFC 6376 3.1 selector = sub-domain *("." sub-domain), sub-domain per RFC 5321 4.1.2.
_SELECTOR_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class DKIMKeyError(ValueError):
    """A signing key or signer configuration that cannot be used; str(e) says why and
    names the file or option."""


@dataclass(frozen=True, slots=True)
class DKIMKey:
    """One private key and where its public half is published
    (``<selector>._domainkey.<domain>``)."""

    selector: str
    domain: str  # d=: lower-case A-label form
    algorithm: Algorithm
    bits: int  # RSA modulus size; 256 for Ed25519
    private_key: _PrivateKey = field(repr=False, compare=False)
    source: str = ""  # the file it came from, for messages
    warnings: tuple[str, ...] = ()  # usable, but not what it should be (logged at load)

    @property
    def dns_name(self) -> str:
        """The TXT record's owner name (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def dns_record(self) -> str:
        """The TXT record value to publish (RFC 6376 3.6.1; RFC 8463 4.2 for Ed25519:
        ``p=`` is the raw 32-octet public key, not a SubjectPublicKeyInfo)."""
        public = self.private_key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
        spki = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode("ascii")

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature (``b=`` before base64) of a SHA-256 digest."""
        key = self.private_key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(digest)
        return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


# -- loading and checking keys (startup) ------------------------------------------------


def check_selector(selector: str) -> str:
    """The selector if it is RFC 6376 3.1 syntax, else DKIMKeyError."""
    labels = selector.split(".")
    if not selector or len(selector) > 63 or not all(_SELECTOR_LABEL.fullmatch(x) for x in labels):
        raise DKIMKeyError(
            f"selector {selector!r} is not a DNS name of letters, digits and hyphens "
            "(RFC 6376 3.1)"
        )
    return selector


def check_domain(domain: str) -> str:
    """The domain in lower-case A-label form (what ``d=`` carries), else DKIMKeyError."""
    try:
        unicode_form = normalize_domain(domain)
        a_label = unicode_form.encode("idna").decode("ascii")
    except (AddressError, UnicodeError) as e:
        raise DKIMKeyError(f"domain {domain!r} is not a valid domain name: {e}") from None
    return a_label


def load_key(selector: str, domain: str, path: str | os.PathLike[str]) -> DKIMKey:
    """Read and check one signing key.

    The file holds a PEM private key (PKCS#1 ``RSA PRIVATE KEY`` or PKCS#8 ``PRIVATE
    KEY``, as ``openssl genpkey -algorithm rsa|ed25519`` writes), or an Ed25519 key as
    dkimpy's ``dknewkey --ktype ed25519`` writes it: the base64 of the 32-octet seed.
    Passphrase-protected keys are refused (a daemon has nobody to ask).
    """
    selector = check_selector(selector)
    d = check_domain(domain)
    if len(selector) + len("._domainkey.") + len(d) > 253:  # RFC 1035 2.3.4
        raise DKIMKeyError(f"{selector}._domainkey.{d} is longer than a DNS name can be")
    name = os.fspath(path)
    data = _read_key_file(name)
    key = _parse_private_key(data, name)
    warnings = []
    algorithm: Algorithm = "ed25519-sha256"
    bits = 256
    if isinstance(key, rsa.RSAPrivateKey):
        bits, algorithm = key.key_size, "rsa-sha256"
        if bits < _MIN_RSA_BITS:
            raise DKIMKeyError(
                f"{name}: a {bits}-bit RSA key is too short to sign with "
                f"(RFC 8301 3.2: at least {_MIN_RSA_BITS}, better {_GOOD_RSA_BITS})"
            )
        if bits < _GOOD_RSA_BITS:
            warnings.append(f"{name}: {bits}-bit RSA key; RFC 8301 3.2 asks for {_GOOD_RSA_BITS}")
        if bits > _MAX_RSA_BITS:
            warnings.append(f"{name}: {bits}-bit RSA key; verifiers need only handle "
                            f"{_MAX_RSA_BITS} (RFC 8301 3.2)")
    mode = _file_mode(name)
    if mode & 0o077:
        warnings.append(f"{name}: private key readable by group or others "
                        f"(mode {stat.S_IMODE(mode):o}; chmod 600)")
    return DKIMKey(selector, d, algorithm, bits, key, name, tuple(warnings))


def parse_dkim_key_option(value: str) -> DKIMKey:
    """``selector:domain:keyfile`` (the ``--dkim-key`` option) -> a checked DKIMKey.
    The key file is the rest of the value, so it may contain ``:``."""
    parts = value.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise DKIMKeyError(f"{value!r} is not selector:domain:keyfile")
    return load_key(*parts)


def _read_key_file(name: str) -> bytes:
    try:
        with open(name, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise DKIMKeyError(f"{name}: cannot read the key file: {e.strerror or e}") from None
    if len(data) > _MAX_KEY_FILE:
        raise DKIMKeyError(f"{name}: larger than {_MAX_KEY_FILE} octets, not a key file")
    return data


def _file_mode(name: str) -> int:
    try:
        return os.stat(name).st_mode
    except OSError:
        return 0


def _parse_private_key(data: bytes, name: str) -> _PrivateKey:
    if b"-----BEGIN" not in data:
        return _parse_seed(data, name)
    if b"ENCRYPTED" in data:
        raise DKIMKeyError(f"{name}: the private key is passphrase-protected; store it "
                           "without one (openssl pkey -in KEY -out KEY.plain), mode 600")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise DKIMKeyError(f"{name}: not a usable PEM private key: {e}") from None
    if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return key
    raise DKIMKeyError(f"{name}: {_kind(key)} key; DKIM signs with RSA (rsa-sha256) or "
                       "Ed25519 (ed25519-sha256) keys only")


def _kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC ({key.curve.name})"
    return "a DSA" if isinstance(key, dsa.DSAPrivateKey) else f"a {type(key).__name__}"


def _parse_seed(data: bytes, name: str) -> ed25519.Ed25519PrivateKey:
    """dkimpy's Ed25519 key file: base64 of the 32-octet private seed."""
    try:
        seed = base64.b64decode(b"".join(data.split()), validate=True)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise DKIMKeyError(f"{name}: neither a PEM private key nor a base64 Ed25519 seed "
                           "(32 octets)")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


# -- signing (CPU work: a worker thread) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Signed:
    """What signing one message gave: the header fields to put in front of it (empty
    when it is not signed), the keys that signed, or why it was not signed."""

    fields: bytes
    keys: tuple[DKIMKey, ...] = ()
    skipped: str | None = None

    def apply(self, message: bytes) -> bytes:
        """The signed message."""
        return self.fields + message if self.fields else message


class Signer:
    """Signs messages with the configured keys; see the module docstring for the
    choices.  ``sign_bytes`` (a worker thread) and ``await sign`` (through ``run_cpu``)
    give the signed message; ``signature`` gives the fields and the reason when none.

    ``expire``: seconds until ``x=`` (None: no ``x=``).  ``max_size``: larger messages
    are not signed (dkimpy holds the whole message, several times over; the default is
    the inbound checker's ``max_dkim_size``).  ``clock``: seconds since the epoch.
    """

    __slots__ = ("_by_domain", "_clock", "_headers", "_oversign", "_run_cpu", "expire",
                 "keys", "max_size", "sign_all")

    def __init__(
        self,
        keys: Iterable[DKIMKey],
        *,
        sign_all: str | None = None,
        expire: int | None = None,
        max_size: int = AuthChecks().max_dkim_size,
        headers: Sequence[str] = SIGNED_HEADERS,
        oversign: Sequence[str] = OVERSIGNED_HEADERS,
        run_cpu: CPURunner | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = tuple(keys)
        self._by_domain = _index(self.keys)
        self.sign_all = None if sign_all is None else check_domain(sign_all)
        if self.sign_all is not None and normalize_domain(self.sign_all) not in self._by_domain:
            raise DKIMKeyError(f"sign_all: no key for {sign_all}")
        if expire is not None and expire <= 0:
            raise DKIMKeyError("expire must be a positive number of seconds")
        self.expire = expire
        self.max_size = max_size
        self._headers = _header_names(headers, "headers")
        self._oversign = _header_names(oversign, "oversign")
        if "from" not in self._headers:
            raise DKIMKeyError("headers must include From (RFC 6376 5.4)")
        self._run_cpu = run_cpu
        self._clock = clock

    def with_runner(self, run_cpu: CPURunner) -> Signer:
        """The same signer, whose ``sign`` runs in ``run_cpu``."""
        return Signer(self.keys, sign_all=self.sign_all, expire=self.expire,
                      max_size=self.max_size, headers=self._headers,
                      oversign=self._oversign, run_cpu=run_cpu, clock=self._clock)

    def keys_for(self, author_domains: Iterable[str]) -> tuple[DKIMKey, ...]:
        """The keys for messages from these From: domains: for each in turn, the keys
        of the domain or of its closest parent that has keys (RSA first); when none has
        any, the ``sign_all`` keys."""
        chosen: dict[int, DKIMKey] = {}
        for domain in author_domains:
            labels = domain.split(".")
            for i in range(len(labels)):
                found = self._by_domain.get(".".join(labels[i:]))
                if found:
                    chosen.update((id(k), k) for k in found)
                    break
        if not chosen and self.sign_all is not None:
            return self._by_domain[normalize_domain(self.sign_all)]
        return tuple(chosen.values())

    async def sign(self, message: bytes, *, now: float | None = None) -> bytes:
        """``sign_bytes`` in the ``run_cpu`` runner (never on the caller's thread)."""
        if self._run_cpu is None:
            raise RuntimeError("Signer.sign needs a run_cpu runner (see with_runner); "
                               "call sign_bytes from a worker thread instead")

        def work() -> tuple[Signed, bytes]:
            signed = self.signature(message, now=now)
            return signed, signed.apply(message)

        signed, result = await self._run_cpu(work)
        _log_skipped(signed)  # on the caller's thread, where its log observers run
        return result

    def sign_bytes(self, message: bytes, *, now: float | None = None) -> bytes:
        """The signed message (unchanged when it is not signed, which is logged).  CPU
        bound: call it from a worker thread."""
        signed = self.signature(message, now=now)
        _log_skipped(signed)
        return signed.apply(message)

    def signature(self, message: bytes, *, now: float | None = None) -> Signed:
        """The DKIM-Signature fields for ``message`` (the whole message, CRLF line ends
        as on the wire; LF-only messages get LF-ended fields).  ``now`` is ``t=``."""
        if len(message) > self.max_size:
            return Signed(b"", skipped=f"{len(message)} octets is more than the "
                                       f"{self.max_size} octets signing is limited to")
        try:
            headers, body = dkim.rfc822_parse(message)
        except (dkim.MessageFormatError, IndexError) as e:
            reason = "continuation line first" if isinstance(e, IndexError) else str(e)
            return Signed(b"", skipped=f"header block unreadable: {reason}")
        authors = _author_domains(headers)
        if isinstance(authors, str):
            return Signed(b"", skipped=authors)
        keys = self.keys_for(authors)
        if not keys:
            return Signed(b"", skipped=f"no key for From: domain {', '.join(authors)}")
        when = int(self._clock() if now is None else now)
        linesep = b"\n" if _lf_only(message) else b"\r\n"
        include = self._include(headers)
        canonical = _RELAXED.canonicalize_headers(headers)
        bh = base64.b64encode(hashlib.sha256(_RELAXED.canonicalize_body(body)).digest())
        fields = [_sign_one(key, canonical, include, bh, when, self.expire, linesep)
                  for key in keys]
        return Signed(b"".join(fields), keys)

    def _include(self, headers: Sequence[Sequence[bytes]]) -> list[bytes]:
        """h=: each signed name once per instance, over-signed names once more."""
        counts = Counter(h[0].lower() for h in headers)
        include = []
        for name in self._headers:
            n = counts.get(name.encode("ascii"), 0) + (name in self._oversign)
            include.extend([name.encode("ascii")] * n)
        return include


def _log_skipped(signed: Signed) -> None:
    if signed.skipped is not None:
        _log.info("DKIM: message not signed: {reason}", reason=signed.skipped)


def _index(keys: Sequence[DKIMKey]) -> dict[str, tuple[DKIMKey, ...]]:
    """Keys by domain (Unicode form, the form From: domains are compared in); one key
    per algorithm and domain, and no selector twice."""
    if not keys:
        raise DKIMKeyError("no signing keys")
    by_domain: dict[str, list[DKIMKey]] = {}
    names = set()
    for key in keys:
        if key.dns_name in names:
            raise DKIMKeyError(f"two keys for {key.dns_name}")
        names.add(key.dns_name)
        same = by_domain.setdefault(normalize_domain(key.domain), [])
        clash = [k for k in same if k.algorithm == key.algorithm]
        if clash:
            raise DKIMKeyError(f"two {key.algorithm} keys for {key.domain} (selectors "
                               f"{clash[0].selector} and {key.selector}): one per algorithm")
        same.append(key)
    return {d: _rsa_first(ks) for d, ks in by_domain.items()}


def _rsa_first(keys: Iterable[DKIMKey]) -> tuple[DKIMKey, ...]:
    return tuple(sorted(keys, key=lambda k: (k.algorithm != "rsa-sha256", k.domain)))


def _header_names(names: Sequence[str], what: str) -> tuple[str, ...]:
    lowered = tuple(dict.fromkeys(n.strip().lower() for n in names))
    bad = [n for n in lowered if n in _NEVER_SIGNED or not re.fullmatch(r"[!-9;-~]+", n)]
    if bad:
        raise DKIMKeyError(f"{what}: {', '.join(bad)} cannot be signed (RFC 6376 5.4.1)")
    return lowered


def _author_domains(headers: Sequence[Sequence[bytes]]) -> list[str] | str:
    """The From: domains in Unicode form, or why there are none to sign for."""
    values = [h[1] for h in headers if h[0].lower() == b"from"]
    if len(values) != 1:
        # RFC 5322 3.6: exactly one From:; DMARC (RFC 7489 6.6.1) rejects the others.
        return "no From: field" if not values else f"{len(values)} From: fields"
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    domains: list[str] = []
    for _, address in getaddresses([text]):
        _, at, domain = address.rpartition("@")
        try:
            d = normalize_domain(domain) if at else None
        except AddressError:
            d = None
        if d is not None and d not in domains:
            domains.append(d)
    return domains or "no address with a domain in From:"


def _lf_only(message: bytes) -> bool:
    end = message.find(b"\n")
    return end > 0 and message[end - 1 : end] != b"\r"


def _sign_one(
    key: DKIMKey,
    canonical_headers: Sequence[Sequence[bytes]],
    include: Sequence[bytes],
    bh: bytes,
    when: int,
    expire: int | None,
    linesep: bytes,
) -> bytes:
    """One DKIM-Signature field (RFC 6376 3.5, 3.7): the tags up to an empty ``b=`` are
    hashed after the signed fields, exactly as they will be sent; ``b=`` is appended."""
    tags = [b"v=1;", b"a=%s;" % key.algorithm.encode(), b"c=relaxed/relaxed;",
            b"d=%s;" % key.domain.encode(), b"s=%s;" % key.selector.encode(), b"t=%d;" % when]
    if expire is not None:
        tags.append(b"x=%d;" % (when + expire))
    tokens = [(b" ", tag) for tag in tags]
    # h= names joined by ":" with no space; a fold may fall after a colon (FWS, 3.5 h=).
    names = [name + b":" for name in include]
    names[-1] = names[-1][:-1] + b";"
    tokens += [(b" ", b"h=" + names[0]), *((b"", n) for n in names[1:])]
    tokens += [(b" ", b"bh=" + bh + b";"), (b" ", b"b=")]
    lines = _fill([], tokens)
    fold = linesep + b"\t"
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, _RELAXED, canonical_headers, list(include),
                      (_HEADER_NAME, b" " + fold.join(lines)), None)
    b = base64.b64encode(key.sign_digest(hasher.digest()))
    lines = _fill(lines, [(b"", b[i : i + 64]) for i in range(0, len(b), 64)])
    return _HEADER_NAME + b": " + fold.join(lines) + linesep


def _fill(lines: list[bytes], tokens: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """Append (glue, token) pairs to the last line while it stays within _LINE
    columns, else start a new (folded) line.  Folds fall only where RFC 6376 allows
    FWS: between tags, after an h= colon, inside base64 (3.2, 3.5)."""
    for glue, token in tokens:
        if not lines:
            lines.append(token)
            continue
        # the first line follows "DKIM-Signature: "; folded lines start with a tab
        used = len(lines[-1]) + (len(_HEADER_NAME) + 2 if len(lines) == 1 else 1)
        if used + len(glue) + len(token) <= _LINE:
            lines[-1] += glue + token
        else:
            lines.append(token)
    return lines
