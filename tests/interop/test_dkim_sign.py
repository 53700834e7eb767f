"""DKIM signing checked by independent verifiers through real DNS on loopback.

A dnsmasq on 127.0.0.1 publishes the keys: the RSA key made by OpenDKIM's own
``opendkim-genkey`` with the TXT record that tool wrote, and an Ed25519 key made by
``openssl genpkey`` with the record our ``DKIMKey.dns_record`` gives.  Messages signed by
``maitred_tx.auth.sign.Signer`` are then verified by:

- OpenDKIM 2.11 (``opendkim -t``, test mode of the Debian ``opendkim`` package) - RSA
  and Ed25519; it resolves through libunbound, pointed at dnsmasq's port by an unbound
  configuration (``ResolverConfiguration``);
- Mail::DKIM (Debian libmail-dkim-perl, Net::DNS pointed at dnsmasq) - RSA only: the
  1.20230212 release Debian bookworm ships has no ed25519-sha256 (it reports such a
  signature "invalid (unsupported algorithm)", which a test pins);
- ``opendkim-testkey`` (opendkim-tools): the published RSA record matches the key file;
- our inbound checker ``verify_dkim`` over ``TwistedResolver``, as a third opinion.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool

from maitred_tx.auth.dkim import verify_dkim
from maitred_tx.auth.sign import DKIMKey, Signer, load_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsmasq_support import Dnsmasq, run_dnsmasq

T = TypeVar("T")
DOMAIN = "example.test"
OPENDKIM = shutil.which("opendkim", path="/usr/sbin:/usr/bin:/sbin")
TESTKEY = shutil.which("opendkim-testkey", path="/usr/sbin:/usr/bin:/sbin")
GENKEY = shutil.which("opendkim-genkey", path="/usr/sbin:/usr/bin:/sbin")
PERL_DKIM = (shutil.which("perl") is not None and subprocess.run(
    ["perl", "-MMail::DKIM::Verifier", "-MNet::DNS", "-e", "1"], capture_output=True,
    timeout=30).returncode == 0)
needs_opendkim = pytest.mark.skipif(
    OPENDKIM is None, reason="opendkim (Debian package opendkim) not installed")
needs_mail_dkim = pytest.mark.skipif(
    not PERL_DKIM, reason="Mail::DKIM (Debian libmail-dkim-perl) not installed")

MESSAGE = (
    b"From: Alice Example <alice@news.example.test>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Date: Thu, 04 Dec 2025 10:00:00 +0000\r\n"
    b"Message-ID: <q4@news.example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"The numbers are up.\r\n"
    b"\r\n"
    b"-- \r\n"
    b"Alice\r\n"
)
EVIL_FROM = b"From: Alice Example <ceo@example.test>\r\n"

# Mail::DKIM reading the message on stdin, asking dnsmasq (port in ARGV[0]).
MAIL_DKIM = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
my $res = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0],
                                  udp_timeout => 5, tcp_timeout => 5, retry => 2);
Mail::DKIM::DNS::resolver($res);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (<STDIN>) { s/\015?\012/\015\012/; $dkim->PRINT($_); }
$dkim->CLOSE;
print "message ", $dkim->result, "\n";
for my $sig ($dkim->signatures) {
    print join(" ", "signature", $sig->algorithm, $sig->selector, $sig->result_detail), "\n";
}
"""


@dataclass
class World:
    """The keys, the dnsmasq that publishes them, and how to ask each verifier."""

    dir: Path
    dns: Dnsmasq
    rsa: DKIMKey  # made by opendkim-genkey
    ed: DKIMKey  # made by openssl genpkey
    genkey_record: str  # the TXT record opendkim-genkey wrote

    def opendkim(self, message: bytes) -> list[tuple[str, str, str]]:
        """(result, algorithm, selector) per signature, from the Authentication-Results
        field OpenDKIM's test mode prints (-vv)."""
        assert OPENDKIM is not None
        path = self.dir / "message.eml"
        path.write_bytes(message)
        out = subprocess.run([OPENDKIM, "-x", str(self.dir / "opendkim.conf"), "-vv",
                              "-t", str(path)], capture_output=True, timeout=60)
        text = out.stdout.decode() + out.stderr.decode()
        assert out.returncode == 0, text
        found = re.findall(r"\tdkim=(\w+) [^\n]*?header\.a=(\S+) header\.s=(\S+)", text)
        assert found, text
        return [(r, a, s.rstrip(";")) for r, a, s in found]

    def mail_dkim(self, message: bytes) -> list[str]:
        """Mail::DKIM's overall result line, then one line per signature."""
        out = subprocess.run(["perl", "-e", MAIL_DKIM, str(self.dns.port)], input=message,
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        return out.stdout.decode().splitlines()


def _txt_option(name: str, record: str) -> str:
    """dnsmasq's --txt-record with the value cut into 255-octet strings (RFC 1035 3.3)."""
    chunks = [record[i : i + 255] for i in range(0, len(record), 255)]
    return f"--txt-record={name}," + ",".join(chunks)


def _make_keys(directory: Path) -> tuple[DKIMKey, DKIMKey, str]:
    if GENKEY is not None:
        subprocess.run([GENKEY, "--bits=2048", f"--domain={DOMAIN}", "--selector=og",
                        f"--directory={directory}"], check=True, timeout=60)
        record = "".join(re.findall(r'"([^"]*)"', (directory / "og.txt").read_text()))
        rsa_key = load_key("og", DOMAIN, directory / "og.private")
    else:  # the verifiers still run; only the key file is ours then
        from cryptography.hazmat.primitives.asymmetric import rsa

        path = directory / "og.private"
        path.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048)
                         .private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        path.chmod(0o600)
        rsa_key = load_key("og", DOMAIN, path)
        record = rsa_key.dns_record
    ed_path = directory / "ed.pem"
    if shutil.which("openssl") is not None:
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(ed_path)],
                       check=True, timeout=60)
    else:
        ed_path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    ed_path.chmod(0o600)
    return rsa_key, load_key("ed", DOMAIN, ed_path), record


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("dkim-sign")
    rsa_key, ed_key, record = _make_keys(directory)
    records = [_txt_option(rsa_key.dns_name, record), _txt_option(ed_key.dns_name,
                                                                  ed_key.dns_record)]
    for dns in run_dnsmasq(directory, records, local=(DOMAIN,)):
        # libunbound (OpenDKIM's resolver) refuses .test (RFC 6761) and localhost by
        # default; both are allowed here, and every question goes to dnsmasq.
        (directory / "unbound.conf").write_text(
            "server:\n  do-not-query-localhost: no\n  local-zone: \"test.\" nodefault\n"
            f"forward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.1@{dns.port}\n")
        (directory / "opendkim.conf").write_text(
            f"Mode v\nSyslog no\nResolverConfiguration {directory / 'unbound.conf'}\n")
        yield World(directory, dns, rsa_key, ed_key, record)


def signer(*keys: DKIMKey, **kw: Any) -> Signer:
    return Signer(keys, **kw)


# -- keys and records made by other tools ----------------------------------------------


@pytest.mark.skipif(GENKEY is None, reason="opendkim-genkey (opendkim-tools) not installed")
def test_opendkim_genkey_key_and_record_match_ours(world: World) -> None:
    assert world.rsa.bits == 2048 and world.rsa.warnings == ()
    theirs = dict(t.strip().split("=", 1) for t in world.genkey_record.split(";") if t.strip())
    ours = dict(t.strip().split("=", 1) for t in world.rsa.dns_record.split(";"))
    assert (theirs["k"], theirs["p"]) == (ours["k"], ours["p"])


def test_dknewkey_ed25519_seed_file_and_record(tmp_path: Path) -> None:
    tool = shutil.which("dknewkey")
    if tool is None:
        pytest.skip("dknewkey (dkimpy's key generator) not on PATH")
    subprocess.run([tool, "--ktype", "ed25519", str(tmp_path / "k")], check=True,
                   capture_output=True, timeout=60)
    key = load_key("k", DOMAIN, tmp_path / "k.key")
    assert key.dns_record == (tmp_path / "k.dns").read_text().strip()


@pytest.mark.skipif(TESTKEY is None, reason="opendkim-testkey (opendkim-tools) not installed")
def test_opendkim_testkey_finds_the_published_rsa_key(world: World) -> None:
    assert TESTKEY is not None
    out = subprocess.run([TESTKEY, "-x", str(world.dir / "opendkim.conf"), "-d", DOMAIN,
                          "-s", "og", "-k", world.rsa.source, "-vvv"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # "not secure": the answer was not DNSSEC-signed (dnsmasq here signs nothing)
    assert out.stderr.splitlines()[-1] == "opendkim-testkey: key not secure"
    assert out.stdout == "opendkim-testkey: key OK\n"


# -- signatures the independent verifiers accept ---------------------------------------


@needs_opendkim
@pytest.mark.parametrize("which", ["rsa", "ed25519", "both"])
def test_opendkim_verifies_our_signatures(world: World, which: str) -> None:
    keys = {"rsa": [world.rsa], "ed25519": [world.ed], "both": [world.ed, world.rsa]}[which]
    signed = signer(*keys, expire=3600).sign_bytes(MESSAGE)
    expected = [("pass", k.algorithm, k.selector) for k in sorted(
        keys, key=lambda k: k.algorithm != "rsa-sha256")]
    assert world.opendkim(signed) == expected


@needs_mail_dkim
def test_mail_dkim_verifies_rsa_and_does_not_know_ed25519(world: World) -> None:
    assert world.mail_dkim(signer(world.rsa).sign_bytes(MESSAGE)) == [
        "message pass", "signature rsa-sha256 og pass"]
    assert world.mail_dkim(signer(world.rsa, world.ed).sign_bytes(MESSAGE)) == [
        "message pass", "signature rsa-sha256 og pass",
        "signature ed25519-sha256 ed invalid (unsupported algorithm ed25519-sha256)"]


@pytest_twisted.ensureDeferred
async def test_our_verifier_through_dnsmasq(world: World) -> None:
    async def inline(fn: Callable[[], T]) -> T:
        return fn()

    signed = signer(world.rsa, world.ed).sign_bytes(MESSAGE)
    results = await verify_dkim(signed, world.dns.resolver(), inline)
    assert [(r.result, r.algorithm, r.selector) for r in results] == [
        ("pass", "rsa-sha256", "og"), ("pass", "ed25519-sha256", "ed")]
    tampered = await verify_dkim(signed.replace(b"up.", b"down."), world.dns.resolver(), inline)
    assert [r.result for r in tampered] == ["fail", "fail"]


@needs_opendkim
@pytest_twisted.ensureDeferred
async def test_sign_runs_in_the_reactor_thread_pool(world: World) -> None:
    threads: list[int] = []

    def clock() -> float:  # read inside signature(), i.e. wherever the signing runs
        threads.append(threading.get_ident())
        return time.time()

    run_cpu = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    signed = await signer(world.rsa, world.ed, clock=clock).with_runner(run_cpu).sign(MESSAGE)
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert [r for r, _, _ in world.opendkim(signed)] == ["pass", "pass"]


# -- what breaks them ----------------------------------------------------------------------


@needs_opendkim
@needs_mail_dkim
def test_changed_body_fails_in_both_verifiers(world: World) -> None:
    signed = signer(world.rsa, world.ed).sign_bytes(MESSAGE).replace(b"up.", b"down.")
    assert [r for r, _, _ in world.opendkim(signed)] == ["fail", "fail"]
    assert world.mail_dkim(signed)[:2] == [
        "message fail", "signature rsa-sha256 og fail (body has been altered)"]


@needs_opendkim
@needs_mail_dkim
@pytest.mark.parametrize("where", ["top", "bottom"])
def test_added_from_fails_in_both_verifiers(world: World, where: str) -> None:
    def add_from(signed: bytes) -> bytes:
        if where == "top":
            return EVIL_FROM + signed
        return signed.replace(b"\r\n\r\n", b"\r\n" + EVIL_FROM + b"\r\n", 1)

    signed = add_from(signer(world.rsa, world.ed).sign_bytes(MESSAGE))
    assert [r for r, _, _ in world.opendkim(signed)] == ["fail", "fail"]
    assert world.mail_dkim(signed)[:2] == [
        "message fail", "signature rsa-sha256 og fail (message has been altered)"]


@needs_mail_dkim
def test_without_over_signing_an_added_from_on_top_would_pass(world: World) -> None:
    # Why From is over-signed: the same attack on a signature that lists From once
    # passes Mail::DKIM, which reads the last From: while many readers show the first.
    plain = signer(world.rsa, oversign=()).sign_bytes(MESSAGE)
    assert world.mail_dkim(EVIL_FROM + plain) == ["message pass", "signature rsa-sha256 og pass"]
