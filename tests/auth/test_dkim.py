"""DKIM verification: keys served by ZoneResolver, crypto run through an inline run_cpu.

Messages are signed in the test with fresh keys (dkimpy's signer, or dkimpy's header
builder where a tag dkimpy will not write is needed: x=, an oversize l=), plus outside
vectors: RFC 8463 Appendix A.3, dkimpy's own signed sample, and, where the tools are
installed, signatures made by Mail::DKIM (dkimproxy-sign) and OpenDKIM (opendkim-testmsg).
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import HASH_ALGORITHMS, parse_pem_private_key

from maitred_tx.auth.dkim import DKIMResult, verify_dkim
from maitred_tx.auth.resolver import Record, ZoneResolver

DATA = Path(__file__).resolve().parent / "data" / "dkim"
T = TypeVar("T")

MESSAGE = (
    b"From: Joe <joe@example.org>\r\n"
    b"To: Suzie <suzie@example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
)
SIGNED_AT = 1_700_000_000
NOW = SIGNED_AT + 60


async def inline(fn: Callable[[], T]) -> T:
    return fn()


class CountingRunner:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, fn: Callable[[], T]) -> T:
        self.calls += 1
        return fn()


# -- keys -----------------------------------------------------------------------------


class Keys:
    """One RSA 2048 and one Ed25519 key pair, made once per test session."""

    def __init__(self) -> None:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.rsa_txt = "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()
        ed = ed25519.Ed25519PrivateKey.generate()
        seed = ed.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        raw = ed.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.ed_seed = base64.b64encode(seed)
        self.ed_txt = "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys()


def zone(keys: Keys, **extra: Sequence[Record]) -> ZoneResolver:
    data: dict[tuple[str, str], Sequence[Record]] = {
        ("rsa._domainkey.example.org", "TXT"): [keys.rsa_txt],
        ("ed._domainkey.example.org", "TXT"): [keys.ed_txt],
        ("example.org", "MX"): [],
    }
    for selector, records in extra.items():
        data[(f"{selector}._domainkey.example.org", "TXT")] = records
    return ZoneResolver(data)


# -- signing helpers ---------------------------------------------------------------


def sign(
    message: bytes,
    keys: Keys,
    algorithm: bytes = b"rsa-sha256",
    selector: bytes | None = None,
    **kwargs: Any,
) -> bytes:
    """dkimpy's own signer (t= is the real clock)."""
    key = keys.rsa_pem if algorithm.startswith(b"rsa") else keys.ed_seed
    selector = selector or (b"rsa" if algorithm.startswith(b"rsa") else b"ed")
    header = dkim.sign(
        message,
        selector,
        b"example.org",
        key,
        signature_algorithm=algorithm,
        canonicalize=(b"relaxed", b"relaxed"),
        **kwargs,
    )
    return bytes(header) + message


def sign_with_tags(
    message: bytes, keys: Keys, extra: Sequence[tuple[bytes, bytes]], selector: bytes = b"rsa"
) -> bytes:
    """An rsa-sha256 relaxed/relaxed signature with tags dkimpy's signer will not
    write (x=, an l= of our choosing), built with dkimpy's header builder."""
    signer = dkim.DKIM(message, signature_algorithm=b"rsa-sha256")
    signer.hasher = HASH_ALGORITHMS[b"rsa-sha256"]
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    body_hash = base64.b64encode(signer.hasher(canon.canonicalize_body(signer.body)).digest())
    include = [b"from", b"to", b"subject", b"date", b"message-id"]
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", b"example.org"),
        (b"s", selector),
        (b"t", str(SIGNED_AT).encode()),
        *extra,
        (b"h", b":".join(include)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),
    ]
    value = signer.gen_header(
        fields, include, canon, b"DKIM-Signature", parse_pem_private_key(keys.rsa_pem)
    )
    return b"DKIM-Signature: " + value + message


def verify(message: bytes, resolver: ZoneResolver, **kwargs: Any) -> list[DKIMResult]:
    kwargs.setdefault("now", None)
    return asyncio.run(verify_dkim(message, resolver, inline, **kwargs))


def only(results: list[DKIMResult]) -> DKIMResult:
    assert len(results) == 1
    return results[0]


# -- outcomes ------------------------------------------------------------------------


def test_rsa_sha256_passes(keys: Keys) -> None:
    message = sign(MESSAGE, keys)
    result = only(verify(message, zone(keys)))
    assert (result.result, result.domain, result.selector, result.algorithm, result.reason) == (
        "pass",
        "example.org",
        "rsa",
        "rsa-sha256",
        None,
    )
    b_value = dkim.util.parse_tag_value(dkim.DKIM(message).headers[0][1])[b"b"]
    assert len(result.b) >= 8
    assert b"".join(b_value.split()).startswith(result.b.encode())


def test_ed25519_sha256_passes(keys: Keys) -> None:
    result = only(verify(sign(MESSAGE, keys, b"ed25519-sha256"), zone(keys)))
    assert (result.result, result.selector, result.algorithm) == ("pass", "ed", "ed25519-sha256")


def test_unsigned_message_gives_no_results_and_no_lookups(keys: Keys) -> None:
    resolver = zone(keys)
    assert verify(MESSAGE, resolver) == []
    assert resolver.lookups == []


def test_tampered_body_fails(keys: Keys) -> None:
    message = sign(MESSAGE, keys).replace(b"hungry", b"angry")
    result = only(verify(message, zone(keys)))
    assert (result.result, result.reason) == ("fail", "body hash mismatch")


def test_tampered_signed_header_fails(keys: Keys) -> None:
    message = sign(MESSAGE, keys).replace(b"Subject: Is dinner", b"Subject: Was dinner")
    result = only(verify(message, zone(keys)))
    assert (result.result, result.reason) == ("fail", "signature did not verify")


def test_ed25519_tampered_header_fails(keys: Keys) -> None:
    message = sign(MESSAGE, keys, b"ed25519-sha256").replace(b"To: Suzie", b"To: Susan")
    assert only(verify(message, zone(keys))).result == "fail"


def test_missing_key_nxdomain_is_permerror(keys: Keys) -> None:
    message = sign(MESSAGE, keys)
    result = only(verify(message, ZoneResolver({})))
    assert result.result == "permerror"
    assert result.reason is not None and "no key for signature" in result.reason


def test_wrong_selector_is_permerror(keys: Keys) -> None:
    # The key is published, but under another selector than the signature names.
    message = sign(MESSAGE, keys, selector=b"other")
    result = only(verify(message, zone(keys)))
    assert (result.result, result.selector) == ("permerror", "other")


def test_name_without_txt_record_is_permerror(keys: Keys) -> None:
    resolver = ZoneResolver({("rsa._domainkey.example.org", "A"): ["192.0.2.1"]})
    result = only(verify(sign(MESSAGE, keys), resolver))
    assert result.result == "permerror"
    assert result.reason is not None and "no TXT record" in result.reason


def test_revoked_key_fails(keys: Keys) -> None:
    message = sign(MESSAGE, keys, selector=b"revoked")
    result = only(verify(message, zone(keys, revoked=["v=DKIM1; k=rsa; p="])))
    assert (result.result, result.reason) == ("fail", "key revoked")


def test_expired_signature_fails_and_now_is_injectable(keys: Keys) -> None:
    expires = SIGNED_AT + 3600
    message = sign_with_tags(MESSAGE, keys, [(b"x", str(expires).encode())])
    before = only(verify(message, zone(keys), now=expires - 10))
    after = only(verify(message, zone(keys), now=expires + 86400))
    assert before.result == "pass"
    assert (after.result, after.reason) == ("fail", "signature expired")


def test_signature_from_the_future_is_permerror(keys: Keys) -> None:
    message = sign_with_tags(MESSAGE, keys, [])
    result = only(verify(message, zone(keys), now=SIGNED_AT - 86400))
    assert (result.result, result.reason) == ("permerror", "t= is in the future")


def test_oversize_body_length_is_permerror(keys: Keys) -> None:
    message = sign_with_tags(MESSAGE, keys, [(b"l", b"100000")])
    result = only(verify(message, zone(keys), now=NOW))
    assert (result.result, result.reason) == ("permerror", "l= is larger than the body")


def test_body_length_lets_appended_text_pass(keys: Keys) -> None:
    message = sign(MESSAGE, keys, length=True) + b"-- \r\nList footer\r\n"
    assert only(verify(message, zone(keys))).result == "pass"


def test_temporary_dns_failure_is_temperror(keys: Keys) -> None:
    resolver = ZoneResolver({("example.org", "MX"): []}, temporary=["rsa._domainkey.example.org"])
    result = only(verify(sign(MESSAGE, keys), resolver))
    assert result.result == "temperror"


def test_two_signatures_two_results_in_header_order(keys: Keys) -> None:
    # Signed by rsa first, then ed on top: the ed signature is the first header field.
    message = sign(sign(MESSAGE, keys, selector=b"gone"), keys, b"ed25519-sha256")
    results = verify(message, zone(keys))
    assert [(r.result, r.selector) for r in results] == [("pass", "ed"), ("permerror", "gone")]
    assert results[0].b != results[1].b and all(len(r.b) >= 8 for r in results)


def test_rsa_sha1_is_refused_as_policy(keys: Keys) -> None:
    result = only(verify(sign(MESSAGE, keys, b"rsa-sha1"), zone(keys)))
    assert result.result == "policy"
    assert result.reason is not None and "RFC 8301" in result.reason


def test_key_type_that_does_not_fit_the_algorithm_is_permerror(keys: Keys) -> None:
    message = sign(MESSAGE, keys, b"ed25519-sha256", selector=b"rsa")
    assert only(verify(message, zone(keys))).result == "permerror"


def test_unparseable_signature_is_permerror(keys: Keys) -> None:
    message = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=rsa; junk\r\n" + MESSAGE
    result = only(verify(message, zone(keys)))
    assert (result.result, result.domain, result.selector) == ("permerror", "example.org", "rsa")


def test_signature_missing_required_tags_is_permerror(keys: Keys) -> None:
    message = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=rsa; b=AAAA\r\n" + MESSAGE
    result = only(verify(message, zone(keys)))
    assert result.result == "permerror"


def test_from_not_signed_is_permerror(keys: Keys) -> None:
    message = sign(MESSAGE, keys, include_headers=[b"from", b"to"])
    message = message.replace(b"h=from : to", b"h=to : to", 1)
    result = only(verify(message, zone(keys)))
    assert result.result == "permerror"


def test_signatures_past_the_limit_are_policy_and_not_looked_up(keys: Keys) -> None:
    message = sign(sign(sign(MESSAGE, keys, selector=b"a"), keys, selector=b"b"), keys)
    resolver = zone(keys)
    results = verify(message, resolver, max_signatures=2)
    assert [r.result for r in results] == ["pass", "permerror", "policy"]
    assert sorted(resolver.lookups) == [
        ("b._domainkey.example.org", "TXT"),
        ("rsa._domainkey.example.org", "TXT"),
    ]


def test_one_cpu_job_per_message_and_one_lookup_per_key(keys: Keys) -> None:
    message = sign(sign(MESSAGE, keys), keys)
    resolver, runner = zone(keys), CountingRunner()
    results = asyncio.run(verify_dkim(message, resolver, runner))
    assert [r.result for r in results] == ["pass", "pass"]
    assert runner.calls == 1
    assert resolver.lookups == [("rsa._domainkey.example.org", "TXT")]


def test_lf_line_ends_verify_too(keys: Keys) -> None:
    message = sign(MESSAGE, keys).replace(b"\r\n", b"\n")
    assert only(verify(message, zone(keys))).result == "pass"


# -- outside vectors ------------------------------------------------------------------


def rfc8463_zone() -> ZoneResolver:
    data: dict[tuple[str, str], Sequence[Record]] = {}
    for line in (DATA / "rfc8463-a2.zone").read_text().splitlines():
        name, txt = line.split(" ", 1)
        data[(name, "TXT")] = [txt]
    return ZoneResolver(data)


def test_rfc8463_appendix_a3_both_signatures_pass() -> None:
    message = (DATA / "rfc8463-a3.eml").read_bytes()
    results = verify(message, rfc8463_zone())
    assert [(r.result, r.selector, r.algorithm) for r in results] == [
        ("pass", "brisbane", "ed25519-sha256"),
        ("pass", "test", "rsa-sha256"),
    ]
    assert results[0].b.startswith("/gCrinpc") and results[1].b.startswith("F45dVWDf")


def test_rfc8463_appendix_a3_tampered_body_fails() -> None:
    message = (DATA / "rfc8463-a3.eml").read_bytes().replace(b"lost", b"won")
    assert [r.result for r in verify(message, rfc8463_zone())] == ["fail", "fail"]


def test_dkimpy_sample_simple_simple_both_signatures_pass() -> None:
    message = (DATA / "dkimpy-rfc6376.signed.msg").read_bytes()
    assert [r.result for r in verify(message, rfc8463_zone())] == ["pass", "pass"]


# -- independent signers (Debian packages) ------------------------------------------


def rsa_key_file(keys: Keys, tmp_path: Path) -> Path:
    path = tmp_path / "private.key"
    path.write_bytes(keys.rsa_pem)
    return path


@pytest.mark.skipif(
    shutil.which("dkimproxy-sign") is None,
    reason="dkimproxy-sign (Debian libmail-dkim-perl, Mail::DKIM) not installed",
)
@pytest.mark.parametrize("method", ["relaxed", "simple", "relaxed/simple", "simple/relaxed"])
def test_mail_dkim_signature_passes(keys: Keys, tmp_path: Path, method: str) -> None:
    signed = subprocess.run(
        [
            "dkimproxy-sign",
            "--domain",
            "example.org",
            "--selector",
            "rsa",
            "--key",
            str(rsa_key_file(keys, tmp_path)),
            "--method",
            method,
            "--timestamp",
            str(SIGNED_AT),
        ],
        input=MESSAGE,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    header = signed.rstrip(b"\r\n").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
    assert header.startswith(b"DKIM-Signature:")
    message = header + MESSAGE
    assert only(verify(message, zone(keys), now=NOW)).result == "pass"
    tampered = message.replace(b"hungry", b"angry")
    assert only(verify(tampered, zone(keys), now=NOW)).result == "fail"


@pytest.mark.skipif(
    shutil.which("opendkim-testmsg") is None,
    reason="opendkim-testmsg (Debian opendkim-tools) not installed",
)
def test_opendkim_signature_is_read_and_its_rsa_sha1_refused(keys: Keys, tmp_path: Path) -> None:
    # opendkim-testmsg 2.11 signs with rsa-sha1 only, which RFC 8301 forbids
    # verifiers to accept: the independent signature must parse and come out policy.
    message = subprocess.run(
        [
            "opendkim-testmsg",
            "-C",
            "-d",
            "example.org",
            "-s",
            "rsa",
            "-k",
            str(rsa_key_file(keys, tmp_path)),
        ],
        input=MESSAGE,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    result = only(verify(message, zone(keys)))
    assert (result.result, result.domain, result.selector, result.algorithm) == (
        "policy",
        "example.org",
        "rsa",
        "rsa-sha1",
    )


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        (b"", "message format: Unexpected characters in RFC822 header: b'junk line'"),
        (b" continued\r\n", "message format: continuation line before the first header field"),
    ],
)
def test_unreadable_header_block_is_permerror(keys: Keys, prefix: bytes, reason: str) -> None:
    signed = sign(MESSAGE, keys)
    message = (
        prefix + signed.replace(b"To: ", b"junk line\r\nTo: ", 1)
        if not prefix
        else (prefix + signed)
    )
    result = only(verify(message, zone(keys)))
    assert (result.result, result.reason) == ("permerror", reason)
