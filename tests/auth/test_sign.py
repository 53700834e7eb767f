"""DKIM signing without a reactor: key files, configuration errors, key choice, the
signature field, and every signature checked by our verifier (ZoneResolver keys,
inline CPU).  The independent verifiers (OpenDKIM, Mail::DKIM) over DNS on loopback
are in tests/interop/test_dkim_sign.py.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim.util import parse_tag_value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs

from maitred_tx.auth.dkim import DKIMResult, verify_dkim
from maitred_tx.auth.resolver import ZoneResolver
from maitred_tx.auth.sign import (
    DKIMKey,
    DKIMKeyError,
    Signer,
    load_key,
    parse_dkim_key_option,
)

T = TypeVar("T")
NOW = 1_700_000_000
MESSAGE = (
    b"From: Joe <joe@example.org>\r\n"
    b"To: Suzie <suzie@example.net>\r\n"
    b"Received: from a by b; Fri, 11 Jul 2003 21:00:37 -0700\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"X-Mailer: not signed\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
)


async def inline(fn: Callable[[], T]) -> T:
    return fn()


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
        fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
        encryption: serialization.KeySerializationEncryption | None = None) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt,
                             encryption or serialization.NoEncryption())


class KeyFiles:
    """RSA 2048 (PKCS#1), RSA 1024, Ed25519 (PKCS#8 and dkimpy's seed file), made once."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.rsa = self._write("rsa.pem", pem(
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            serialization.PrivateFormat.TraditionalOpenSSL))
        self.rsa1024 = self._write("rsa1024.pem", pem(
            rsa.generate_private_key(public_exponent=65537, key_size=1024)))
        ed = ed25519.Ed25519PrivateKey.generate()
        self.ed = self._write("ed.pem", pem(ed))
        seed = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        self.ed_seed = self._write("ed.key", base64.b64encode(seed) + b"\n")

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return KeyFiles(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def rsa_key(files: KeyFiles) -> DKIMKey:
    return load_key("rsa", "example.org", files.rsa)


@pytest.fixture(scope="module")
def ed_key(files: KeyFiles) -> DKIMKey:
    return load_key("ed", "example.org", files.ed)


def zone(*keys: DKIMKey) -> ZoneResolver:
    return ZoneResolver({(k.dns_name, "TXT"): [k.dns_record] for k in keys})


def verify(message: bytes, *keys: DKIMKey) -> list[DKIMResult]:
    return asyncio.run(verify_dkim(message, zone(*keys), inline, now=NOW + 60))


def results(message: bytes, *keys: DKIMKey) -> list[tuple[str, str]]:
    return [(r.result, r.algorithm) for r in verify(message, *keys)]


def tags(signed: bytes, index: int = 0) -> dict[bytes, bytes]:
    headers, _ = dkim.rfc822_parse(signed)
    values = [v for n, v in headers if n.lower() == b"dkim-signature"]
    return dict(parse_tag_value(values[index]))


# -- loading keys -------------------------------------------------------------------


def test_loads_every_supported_key_file(files: KeyFiles) -> None:
    rsa2048 = load_key("s1", "Example.ORG.", files.rsa)
    assert (rsa2048.domain, rsa2048.algorithm, rsa2048.bits, rsa2048.warnings) == (
        "example.org", "rsa-sha256", 2048, ())
    assert rsa2048.dns_name == "s1._domainkey.example.org"
    assert rsa2048.dns_record.startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    from_pem = load_key("s2", "example.org", files.ed)
    from_seed = load_key("s3", "example.org", files.ed_seed)
    assert from_pem.algorithm == from_seed.algorithm == "ed25519-sha256"
    # RFC 8463 4.2: p= is the raw 32-octet public key (44 base64 characters)
    assert from_pem.dns_record == from_seed.dns_record
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", from_pem.dns_record)
    assert "private_key" not in repr(from_pem)


def test_short_rsa_key_warns_and_too_short_refused(files: KeyFiles, tmp_path: Path) -> None:
    key = load_key("old", "example.org", files.rsa1024)
    assert key.warnings == (f"{files.rsa1024}: 1024-bit RSA key; RFC 8301 3.2 asks for 2048",)
    if shutil.which("openssl") is None:
        pytest.skip("openssl (to make a 512-bit key) not installed")
    short = tmp_path / "512.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(short), "512"], check=True,
                   capture_output=True, timeout=30)
    with pytest.raises(DKIMKeyError, match="512-bit RSA key is too short"):
        load_key("s", "example.org", short)


def test_readable_key_file_warns(files: KeyFiles, tmp_path: Path) -> None:
    path = tmp_path / "open.pem"
    path.write_bytes(files.rsa.read_bytes())
    path.chmod(0o644)
    (warning,) = load_key("s", "example.org", path).warnings
    assert warning == f"{path}: private key readable by group or others (mode 644; chmod 600)"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "neither a PEM private key nor a base64 Ed25519 seed"),
        (b"hello world", "neither a PEM private key nor a base64 Ed25519 seed"),
        (b"AAAA\n", "neither a PEM private key nor a base64 Ed25519 seed"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
         "not a usable PEM private key"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
         "not a usable PEM private key"),
    ],
)
def test_unusable_key_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(DKIMKeyError, match=re.escape(f"{path}: {message}")):
        load_key("s", "example.org", path)


def test_encrypted_ec_missing_and_oversized_files(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(pem(rsa_key, encryption=serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(DKIMKeyError, match="passphrase-protected"):
        load_key("s", "example.org", encrypted)
    ecdsa = tmp_path / "ec.pem"
    ecdsa.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(DKIMKeyError, match=r"an EC \(secp256r1\) key; DKIM signs with RSA"):
        load_key("s", "example.org", ecdsa)
    with pytest.raises(DKIMKeyError, match=f"{tmp_path / 'none'}: cannot read the key file: "
                                           "No such file or directory"):
        load_key("s", "example.org", tmp_path / "none")
    with pytest.raises(DKIMKeyError, match="cannot read the key file: Is a directory"):
        load_key("s", "example.org", tmp_path)
    big = tmp_path / "big.pem"
    big.write_bytes(b"-----BEGIN" + b"A" * 70_000)
    with pytest.raises(DKIMKeyError, match="larger than 65536 octets"):
        load_key("s", "example.org", big)


@pytest.mark.parametrize("selector", ["", "sel_1", "-sel", "sel-", "a..b", "s.", "é", "a" * 64,
                                      "sel:x"])
def test_bad_selectors(files: KeyFiles, selector: str) -> None:
    with pytest.raises(DKIMKeyError, match="is not a DNS name of letters, digits and hyphens"):
        load_key(selector, "example.org", files.ed)


@pytest.mark.parametrize("domain", ["", "exa mple.org", "[127.0.0.1]", "a..org", "-a.org",
                                    "a_b.org", "x" * 64 + ".org"])
def test_bad_domains(files: KeyFiles, domain: str) -> None:
    with pytest.raises(DKIMKeyError, match="is not a valid domain name"):
        load_key("s", domain, files.ed)


def test_good_selectors_and_idn_domain(files: KeyFiles) -> None:
    key = load_key("2024-01.mail", "Bücher.Example", files.ed)
    assert (key.selector, key.domain) == ("2024-01.mail", "xn--bcher-kva.example")
    with pytest.raises(DKIMKeyError, match="longer than a DNS name can be"):
        load_key("a" * 63, ".".join(["b" * 60] * 3), files.ed)


def test_parse_dkim_key_option(files: KeyFiles, tmp_path: Path) -> None:
    colon = tmp_path / "with:colon.key"
    colon.write_bytes(files.ed_seed.read_bytes())
    colon.chmod(0o600)
    key = parse_dkim_key_option(f"sel:example.org:{colon}")
    assert (key.selector, key.domain, key.source) == ("sel", "example.org", str(colon))
    for value in ("sel:example.org", "sel::file", ":example.org:file", "just-a-file"):
        with pytest.raises(DKIMKeyError, match="is not selector:domain:keyfile"):
            parse_dkim_key_option(value)


# -- signer configuration -----------------------------------------------------------


def test_signer_configuration_errors(files: KeyFiles, rsa_key: DKIMKey,
                                     ed_key: DKIMKey) -> None:
    with pytest.raises(DKIMKeyError, match="no signing keys"):
        Signer([])
    other_rsa = load_key("rsa2", "example.org", files.rsa1024)
    with pytest.raises(DKIMKeyError, match=r"two rsa-sha256 keys for example.org "
                                           r"\(selectors rsa and rsa2\): one per algorithm"):
        Signer([rsa_key, other_rsa])
    with pytest.raises(DKIMKeyError, match=r"two keys for rsa\._domainkey\.example\.org"):
        Signer([rsa_key, load_key("rsa", "example.org", files.ed)])
    with pytest.raises(DKIMKeyError, match=r"sign_all: no key for example\.com"):
        Signer([rsa_key], sign_all="example.com")
    with pytest.raises(DKIMKeyError, match="headers must include From"):
        Signer([rsa_key], headers=("to", "subject"))
    with pytest.raises(DKIMKeyError, match="received, bcc cannot be signed"):
        Signer([rsa_key], headers=("from", "Received", "Bcc"))
    with pytest.raises(DKIMKeyError, match="expire must be a positive"):
        Signer([rsa_key], expire=0)
    assert Signer([rsa_key, ed_key]).keys == (rsa_key, ed_key)


# -- which key signs ------------------------------------------------------------------


def from_(address: bytes) -> bytes:
    return MESSAGE.replace(b"From: Joe <joe@example.org>", b"From: " + address)


@pytest.mark.parametrize(
    ("author", "selectors"),
    [
        (b"Joe <joe@example.org>", ["rsa", "ed"]),
        (b"joe@EXAMPLE.org (Joe)", ["rsa", "ed"]),
        (b"\"Doe, Joe\" <joe@news.example.org>", ["rsa", "ed"]),  # parent domain's keys
        (b"joe@deep.sub.example.net", ["sub"]),  # the closest parent with keys wins
        (b"joe@sub.example.net", ["sub"]),
        (b"joe@example.net", ["net"]),
        (b"=?utf-8?q?J=C3=B6?= <joe@b\xc3\xbccher.example>", ["idn"]),  # U-label From:
        (b"joe@xn--bcher-kva.example", ["idn"]),
        (b"a@example.org, b@example.net", ["rsa", "ed", "net"]),  # every author domain
    ],
)
def test_key_follows_the_from_domain(files: KeyFiles, rsa_key: DKIMKey, ed_key: DKIMKey,
                                     author: bytes, selectors: list[str]) -> None:
    keys = [rsa_key, ed_key, load_key("sub", "sub.example.net", files.rsa1024),
            load_key("net", "example.net", files.ed_seed),
            load_key("idn", "bücher.example", files.ed_seed)]
    signed = Signer(keys).signature(from_(author), now=NOW)
    assert [k.selector for k in signed.keys] == selectors
    assert [tags(signed.apply(from_(author)), i)[b"s"].decode()
            for i in range(len(selectors))] == selectors
    assert {r for r, _ in results(signed.apply(from_(author)), *keys)} == {"pass"}


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (from_(b"joe@example.com"), "no key for From: domain example.com"),
        (from_(b"joe@notexample.org"), "no key for From: domain notexample.org"),
        (from_(b"undisclosed-recipients:;"), "no address with a domain in From:"),
        (from_(b"joe"), "no address with a domain in From:"),
        (MESSAGE.replace(b"From: Joe <joe@example.org>\r\n", b""), "no From: field"),
        (b"From: a@example.org\r\n" + MESSAGE, "2 From: fields"),
        (b"bad header line\r\n" + MESSAGE, "header block unreadable: Unexpected characters in "
                                           "RFC822 header: b'bad header line'"),
        (b" folded\r\n" + MESSAGE, "header block unreadable: continuation line first"),
    ],
)
def test_unsigned_messages_say_why(rsa_key: DKIMKey, message: bytes, reason: str) -> None:
    signed = Signer([rsa_key]).signature(message, now=NOW)
    assert (signed.fields, signed.keys, signed.skipped) == (b"", (), reason)
    assert signed.apply(message) is message


def test_sign_all_signs_other_domains(files: KeyFiles, rsa_key: DKIMKey) -> None:
    relay = load_key("relay", "relay.example", files.ed)
    signer = Signer([rsa_key, relay], sign_all="relay.example")
    assert [k.selector for k in signer.signature(from_(b"x@other.test")).keys] == ["relay"]
    assert [k.selector for k in signer.signature(MESSAGE).keys] == ["rsa"]  # own key first
    assert results(signer.sign_bytes(from_(b"x@other.test"), now=NOW), relay) == [
        ("pass", "ed25519-sha256")]


def test_too_large_message_is_not_signed_and_logged(rsa_key: DKIMKey) -> None:
    signer = Signer([rsa_key], max_size=len(MESSAGE) - 1)
    with capturedLogs() as events:
        assert signer.sign_bytes(MESSAGE) is MESSAGE
    (event,) = [e for e in events if e.get("log_namespace") == "maitred_tx.auth.sign"]
    assert event["log_level"] == LogLevel.info
    assert event["reason"] == (f"{len(MESSAGE)} octets is more than the "
                               f"{len(MESSAGE) - 1} octets signing is limited to")
    assert Signer([rsa_key], max_size=len(MESSAGE)).signature(MESSAGE).keys == (rsa_key,)


# -- the signature field --------------------------------------------------------------


def test_dual_signature_fields(rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    signed = Signer([ed_key, rsa_key], expire=86400).sign_bytes(MESSAGE, now=NOW)
    assert signed.endswith(MESSAGE)
    fields = signed[: -len(MESSAGE)]
    assert fields.count(b"DKIM-Signature:") == 2 and fields.endswith(b"\r\n")
    # unfolded lines are at most 76 columns, continuation lines start with a tab
    for line in fields.split(b"\r\n")[:-1]:
        assert len(line) <= 76 and (line.startswith((b"DKIM-Signature: ", b"\t")))
    for index, algorithm in enumerate([b"rsa-sha256", b"ed25519-sha256"]):  # RSA on top
        t = tags(signed, index)
        assert t[b"a"] == algorithm
        assert (t[b"v"], t[b"c"], t[b"d"], t[b"t"], t[b"x"]) == (
            b"1", b"relaxed/relaxed", b"example.org", b"%d" % NOW, b"%d" % (NOW + 86400))
        # present fields, From over-signed; Received and X-Mailer not signed
        assert re.sub(rb"\s", b"", t[b"h"]) == b"from:from:to:subject:date:message-id"
        assert b"l" not in t and b"i" not in t
    assert results(signed, rsa_key, ed_key) == [("pass", "rsa-sha256"),
                                                 ("pass", "ed25519-sha256")]


def test_repeated_fields_are_signed_each_time(rsa_key: DKIMKey) -> None:
    message = b"Cc: a@example.net\r\nCc: b@example.net\r\n" + MESSAGE.replace(
        b"\r\n\r\n", b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n", 1)
    signed = Signer([rsa_key]).sign_bytes(message, now=NOW)
    assert re.sub(rb"\s", b"", tags(signed)[b"h"]) == (
        b"from:from:to:cc:cc:subject:date:message-id:mime-version:content-type")
    assert results(signed, rsa_key) == [("pass", "rsa-sha256")]
    assert results(signed.replace(b"Cc: b@", b"Cc: c@"), rsa_key) == [("fail", "rsa-sha256")]


def test_no_expiry_by_default_and_the_clock(rsa_key: DKIMKey) -> None:
    signed = Signer([rsa_key], clock=lambda: NOW + 0.9).sign_bytes(MESSAGE)
    assert tags(signed)[b"t"] == b"%d" % NOW and b"x" not in tags(signed)


def test_lf_only_message_gets_lf_fields(ed_key: DKIMKey) -> None:
    message = MESSAGE.replace(b"\r\n", b"\n")
    signed = Signer([ed_key]).sign_bytes(message, now=NOW)
    assert b"\r" not in signed and signed.endswith(message)
    assert results(signed, ed_key) == [("pass", "ed25519-sha256")]


def test_long_names_fold_and_verify(files: KeyFiles) -> None:
    key = load_key("s" * 63, ("d" * 60 + ".") * 2 + "example", files.rsa1024)
    signed = Signer([key]).sign_bytes(from_(b"x@" + key.domain.encode()), now=NOW)
    fields = signed.split(b"\r\nFrom:")[0].split(b"\r\n")
    d_tag = b"\td=" + key.domain.encode() + b";"
    assert d_tag in fields  # a tag longer than a line gets a line of its own
    assert all(len(line) <= 76 for line in fields if line != d_tag)
    assert results(signed, key) == [("pass", "rsa-sha256")]


def test_signatures_are_deterministic_and_sign_uses_the_runner(rsa_key: DKIMKey,
                                                                ed_key: DKIMKey) -> None:
    calls = []

    async def runner(fn: Callable[[], T]) -> T:
        calls.append(fn)
        return fn()

    signer = Signer([rsa_key, ed_key])
    with pytest.raises(RuntimeError, match="needs a run_cpu runner"):
        asyncio.run(signer.sign(MESSAGE))
    signed = asyncio.run(signer.with_runner(runner).sign(MESSAGE, now=NOW))
    assert len(calls) == 1
    # RSASSA-PKCS1-v1_5 and Ed25519 are deterministic: same input, same bytes
    assert signed == signer.sign_bytes(MESSAGE, now=NOW)


# -- what the signature protects --------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rsa", "ed"])
def test_changed_body_or_signed_field_fails(rsa_key: DKIMKey, ed_key: DKIMKey,
                                            algorithm: str) -> None:
    key = rsa_key if algorithm == "rsa" else ed_key
    signed = Signer([key]).sign_bytes(MESSAGE, now=NOW)
    assert results(signed, key)[0][0] == "pass"
    assert results(signed.replace(b"hungry", b"angry"), key)[0][0] == "fail"
    assert results(signed.replace(b"dinner", b"lunch"), key)[0][0] == "fail"
    # relaxed/relaxed: re-folding and trailing white space do not matter
    refolded = signed.replace(b"Subject: Is dinner ready?", b"Subject: Is dinner\r\n  ready?  ")
    assert results(refolded.replace(b"game.", b"game.   "), key)[0][0] == "pass"
    # unsigned fields may be added or changed
    assert results(signed.replace(b"X-Mailer: not signed", b"X-Mailer: x"), key)[0][0] == "pass"


@pytest.mark.parametrize("where", ["top", "bottom"])
def test_added_from_fails_because_from_is_oversigned(rsa_key: DKIMKey, where: str) -> None:
    evil = b"From: Mallory <ceo@example.org>\r\n"

    def add_from(signed: bytes) -> bytes:
        if where == "top":  # above the signature, where many readers show the first From:
            return evil + signed
        return signed.replace(b"\r\n\r\n", b"\r\n" + evil[:-2] + b"\r\n\r\n", 1)

    oversigned = Signer([rsa_key]).sign_bytes(MESSAGE, now=NOW)
    assert re.sub(rb"\s", b"", tags(oversigned)[b"h"]).startswith(b"from:from:to:")
    assert results(oversigned, rsa_key) == [("pass", "rsa-sha256")]
    assert results(add_from(oversigned), rsa_key) == [("fail", "rsa-sha256")]
    # (dkimpy, under our verifier, over-signs From itself when verifying, so the
    # contrast - a From: added on top of a signature that is not over-signed still
    # verifies - shows with Mail::DKIM, in tests/interop/test_dkim_sign.py.)


# -- any message we sign verifies ------------------------------------------------------

_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=_TEXT,
    extra=st.lists(st.tuples(st.sampled_from(["To", "Cc", "Subject", "Date", "X-A",
                                              "Content-Type", "References", "Message-ID"]),
                             _TEXT), max_size=6),
    body=st.binary(max_size=400),
    fold=st.booleans(),
)
def test_any_message_verifies(rsa_key: DKIMKey, ed_key: DKIMKey, subject: str,
                              extra: list[tuple[str, str]], body: bytes, fold: bool) -> None:
    header = b"From: a@example.org\r\nSubject: " + subject.encode("utf-8") + b"\r\n"
    for name, value in extra:
        encoded = value.encode("utf-8")
        if fold and b" " in encoded:
            encoded = encoded.replace(b" ", b"\r\n ", 1)
        header += name.encode() + b": " + encoded + b"\r\n"
    body = body.replace(b"\r", b"").replace(b"\n", b"\r\n")  # a body as DATA delivers it
    message = header + b"\r\n" + body
    signed = Signer([rsa_key, ed_key]).sign_bytes(message, now=NOW)
    assert results(signed, rsa_key, ed_key) == [("pass", "rsa-sha256"),
                                                ("pass", "ed25519-sha256")]



# -- twistd maitred --dkim-key ------------------------------------------------------------


def test_twistd_dkim_key_options(files: KeyFiles) -> None:
    from twisted.python.usage import UsageError

    from maitred_tx.tap import Options

    options = Options()
    options.parseOptions(["--dkim-key", f"rsa:example.org:{files.rsa}",
                          "--dkim-key", f"ed:example.org:{files.ed_seed}",
                          "--dkim-sign-all", "example.org"])
    signer = options.dkim_signer
    assert [(k.selector, k.algorithm) for k in signer.keys] == [
        ("rsa", "rsa-sha256"), ("ed", "ed25519-sha256")]
    assert signer.sign_all == "example.org"
    assert [k.selector for k in signer.signature(from_(b"x@elsewhere.test")).keys] == [
        "rsa", "ed"]
    unset = Options()
    unset.parseOptions([])
    assert unset.dkim_signer is None
    for argv, message in [
        (["--dkim-key", "rsa:example.org"], "--dkim-key: 'rsa:example.org' is not "
                                            "selector:domain:keyfile"),
        (["--dkim-key", f"bad_sel:example.org:{files.rsa}"], "--dkim-key: selector "),
        (["--dkim-key", "s:example.org:/nonexistent/key"], "--dkim-key: /nonexistent/key: "
                                                           "cannot read the key file"),
        (["--dkim-key", f"rsa:example.org:{files.rsa}", "--dkim-sign-all", "other.org"],
         "--dkim-key: sign_all: no key for other.org"),
        (["--dkim-sign-all", "example.org"], "--dkim-sign-all needs --dkim-key"),
    ]:
        with pytest.raises(UsageError) as e:
            Options().parseOptions(argv)
        assert str(e.value).startswith(message), str(e.value)


def test_signing_never_imports_the_reactor() -> None:
    # import-linter cannot forbid a subpackage of Twisted: the module's own imports are
    # read here.  Logging is the only Twisted it uses; the runner brings the threads.
    import ast

    import maitred_tx.auth.sign as sign_module

    tree = ast.parse(Path(sign_module.__file__).read_text())
    twisted = sorted({node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                      and node.module and node.module.split(".")[0] == "twisted"}
                     | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for a in node.names if a.name.split(".")[0] == "twisted"})
    assert twisted == ["twisted.logger"]
