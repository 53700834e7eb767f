"""Inbound email authentication (issue 5) with real parts: a dnsmasq on loopback serves
the test domains' SPF, DKIM key and DMARC records; messages signed by dkimpy and by
Mail::DKIM (dkimproxy-sign) go through smtplib to an in-process server whose checker
asks that dnsmasq through twisted.names; the stored messages' first fields and our
Authentication-Results field are asserted exactly.

Every name under .test is answered by dnsmasq (--local=/test/: unknown names are
NXDOMAIN); any other name is REFUSED (no upstream): a temporary DNS failure.
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import dkim
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnsmasq_support import run_dnsmasq
from maitred_interop import Client, free_port, message_files, split_trace, twistd_maitred
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent

from maitred_tx.auth.checks import AuthChecker, AuthResults
from maitred_tx.auth.dns import TwistedResolver
from maitred_tx.delivery.maildir import MaildirDelivery
from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.service import SMTPService
from maitred_tx.smtp.config import AuthChecks, AuthTempError, Config, Mode

HELO = "client.test"
LOCALHOST = "127.0.0.1"
RCPT = "user@localhost"


class Keys:
    def __init__(self) -> None:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.txt = "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()


KEYS = Keys()


def zone() -> dict[str, str]:
    return {
        HELO: "v=spf1 ip4:127.0.0.1 -all",
        "pass.test": "v=spf1 ip4:127.0.0.1 -all",
        "sel._domainkey.pass.test": KEYS.txt,
        "_dmarc.pass.test": "v=DMARC1; p=reject",
        "fail.test": "v=spf1 -all",
        "_dmarc.fail.test": "v=DMARC1; p=reject",
        "soft.test": "v=spf1 ~all",
        "temp.test": "v=spf1 include:broken.example -all",
        "_dmarc.temp.test": "v=DMARC1; p=reject",
        # none.test: no record at all (NXDOMAIN)
    }


def txt_argument(name: str, text: str) -> str:
    # One TXT record of several character-strings of at most 255 octets (RFC 1035
    # 3.3.14); the checks join them (RFC 7208 3.3, RFC 6376 3.6.2.2).
    pieces = [text[i : i + 255] for i in range(0, len(text), 255)]
    # No quotes: those are for dnsmasq's config file, on argv they would be data.
    assert "," not in text
    return "--txt-record=" + ",".join([name, *pieces])


@pytest.fixture(scope="module")
def dns_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A dnsmasq serving ``zone()`` on a port of 127.0.0.1 free for UDP and TCP
    (tests/dnsmasq_support.py: a port taken meanwhile is retried, and a dnsmasq that
    is installed but does not start fails the tests rather than skipping them)."""
    records = [txt_argument(n, t) for n, t in zone().items()]
    # TTL 300: cacheable answers (dnsmasq's default is 0); the zone is static and every
    # server() has a resolver, and so a cache, of its own.
    for dnsmasq in run_dnsmasq(tmp_path_factory.mktemp("dns"), records, local=("test",),
                               ttl=300):
        yield dnsmasq.port


@dataclass(slots=True)
class Running:
    port: int
    factory: SMTPFactory
    delivery: Any


@pytest.fixture
def server(dns_port: int, tmp_path: Path) -> Iterator[Any]:
    """``server(auth=AuthChecks(...), maildir=False, mode=...)`` on 127.0.0.1:0."""
    listeners = []

    def start(auth: AuthChecks | None = None, maildir: bool = False,
              resolver_class: type[TwistedResolver] = TwistedResolver,
              **config: Any) -> Running:
        resolver = resolver_class(reactor, [(LOCALHOST, dns_port)], timeout=2.0)
        checker = AuthChecker(reactor, resolver)
        checkers.append(checker)
        delivery = MaildirDelivery(str(tmp_path / "Maildir"), reactor) if maildir else (
            MemoryDelivery())
        cfg = Config(hostname="mx.test", auth_checks=auth or AuthChecks(), **config)
        factory = SMTPFactory(reactor, cfg, delivery, checker=checker)
        listener = reactor.listenTCP(0, factory, interface=LOCALHOST)
        listeners.append((factory, listener))
        return Running(listener.getHost().port, factory, delivery)

    checkers: list[AuthChecker] = []
    yield start
    for factory, listener in listeners:
        factory.shutdown()
        pytest_twisted.blockon(listener.stopListening())
    for checker in checkers:
        checker.stop()


def message(author: str, body: bytes = b"Hello.\r\n", extra: bytes = b"") -> bytes:
    return (
        f"From: Alice <{author}>\r\nTo: {RCPT}\r\nSubject: test\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@{author.split('@')[1]}>\r\n"
    ).encode() + extra + b"\r\n" + body


def signed(msg: bytes, selector: bytes = b"sel", domain: bytes = b"pass.test") -> bytes:
    header = dkim.sign(msg, selector, domain, KEYS.pem, canonicalize=(b"relaxed", b"relaxed"))
    return bytes(header) + msg


def header_b(msg: bytes) -> str:
    value = msg.split(b"DKIM-Signature:", 1)[1].split(b"\r\n\r\n", 1)[0]
    b = value.split(b" b=", 1)[1] if b" b=" in value else value.split(b"\tb=", 1)[1]
    first = b"".join(b.split()).decode()[:8]
    # RFC 8601 2.2: a value with "/" or "=" (RFC 2045 tspecials) is a quoted-string
    return f'"{first}"' if set(first) & set("/=") else first


def send(port: int, sender: str, msg: bytes, helo: str = HELO) -> tuple[int, bytes]:
    """MAIL/RCPT/DATA with smtplib; the reply to the end of data."""
    with smtplib.SMTP(LOCALHOST, port, local_hostname=helo, timeout=30) as s:
        s.ehlo()
        assert s.mail(sender)[0] == 250
        assert s.rcpt(RCPT)[0] == 250
        return s.data(msg)


def ar(*resinfo: str) -> bytes:
    return ("Authentication-Results: mx.test;\r\n\t" + ";\r\n\t".join(resinfo)
            + "\r\n").encode()


HELO_PASS = "spf=pass smtp.helo=client.test"


async def deliver(srv: Running, sender: str, msg: bytes) -> tuple[int, bytes]:
    return await deferToThread(send, srv.port, sender, msg)


# -- SPF ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "result", "dmarc"),
    [
        ("pass.test", "pass", "dmarc=pass (p=reject) header.from=pass.test"),
        ("fail.test", "fail", "dmarc=fail (p=reject) header.from=fail.test"),
        ("soft.test", "softfail", "dmarc=none header.from=soft.test"),
        ("none.test", "none", "dmarc=none header.from=none.test"),
        ("temp.test", "temperror", "dmarc=fail (p=reject) header.from=temp.test"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_spf_results_in_the_header(server, domain, result, dmarc):
    srv = server()
    msg = message(f"alice@{domain}")
    assert (await deliver(srv, f"alice@{domain}", msg))[0] == 250
    [stored] = srv.delivery.messages
    expected = ar(f"spf={result} smtp.mailfrom=alice@{domain}", HELO_PASS, "dkim=none",
                  "arc=none", dmarc)
    assert stored.body == expected + msg
    auth = stored.envelope.auth
    assert isinstance(auth, AuthResults)
    assert auth.spf_mailfrom.result.value == result and auth.dmarc.from_domain == domain


@pytest_twisted.ensureDeferred
async def test_null_sender_reports_the_helo_identity_only(server):
    srv = server()
    msg = message("alice@pass.test")
    assert (await deliver(srv, "", msg))[0] == 250
    [stored] = srv.delivery.messages
    # RFC 7208 2.4: the MAIL FROM identity of a bounce is postmaster@<HELO>; DMARC uses
    # the HELO domain, which is not aligned with pass.test.
    assert stored.body == ar(HELO_PASS, "dkim=none", "arc=none",
                             "dmarc=fail (p=reject) header.from=pass.test") + msg


# -- DKIM -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dkim_pass_and_the_maildir_order_of_fields(server, tmp_path):
    srv = server(maildir=True)
    msg = signed(message("alice@pass.test"))
    assert (await deliver(srv, "alice@pass.test", msg))[0] == 250
    [path] = message_files(tmp_path / "Maildir" / "localhost" / "user")
    fields, rest = split_trace(path.read_bytes())
    assert fields[0] == b"Return-Path: <alice@pass.test>"
    assert fields[1] == b"Delivered-To: user@localhost"
    assert fields[2].startswith(b"Received: from client.test ([127.0.0.1])")
    expected = ar("spf=pass smtp.mailfrom=alice@pass.test", HELO_PASS,
                  f"dkim=pass header.d=pass.test header.s=sel header.b={header_b(msg)}",
                  "arc=none", "dmarc=pass (p=reject) header.from=pass.test")
    assert rest == expected + msg


@pytest_twisted.ensureDeferred
async def test_dkim_tampered_body_fails_and_dmarc_still_passes_on_spf(server):
    srv = server()
    msg = signed(message("alice@pass.test")).replace(b"Hello.", b"Hullo.")
    assert (await deliver(srv, "alice@pass.test", msg))[0] == 250
    [stored] = srv.delivery.messages
    assert stored.body == ar(
        "spf=pass smtp.mailfrom=alice@pass.test", HELO_PASS,
        f"dkim=fail header.d=pass.test header.s=sel header.b={header_b(msg)}",
        "arc=none", "dmarc=pass (p=reject) header.from=pass.test") + msg


@pytest_twisted.ensureDeferred
async def test_dkim_missing_key_is_permerror(server):
    srv = server()
    msg = signed(message("alice@pass.test"), selector=b"gone")
    assert (await deliver(srv, "alice@pass.test", msg))[0] == 250
    [stored] = srv.delivery.messages
    assert stored.body.startswith(ar(
        "spf=pass smtp.mailfrom=alice@pass.test", HELO_PASS,
        f"dkim=permerror header.d=pass.test header.s=gone header.b={header_b(msg)}",
        "arc=none", "dmarc=pass (p=reject) header.from=pass.test"))


@pytest.mark.skipif(shutil.which("dkimproxy-sign") is None,
                    reason="dkimproxy-sign (Debian libmail-dkim-perl) not installed")
@pytest_twisted.ensureDeferred
async def test_mail_dkim_signature_passes_dmarc_without_spf(server, tmp_path):
    key = tmp_path / "key.pem"
    key.write_bytes(KEYS.pem)
    msg = message("alice@pass.test")
    out = subprocess.run(
        ["dkimproxy-sign", "--domain", "pass.test", "--selector", "sel", "--key", str(key),
         "--method", "relaxed"], input=msg, capture_output=True, check=True, timeout=60,
    ).stdout
    header = out.rstrip(b"\r\n").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
    msg = header + msg
    srv = server()
    # SPF fails (fail.test as MAIL FROM): DMARC passes on the aligned DKIM signature.
    assert (await deliver(srv, "bounce@fail.test", msg))[0] == 250
    [stored] = srv.delivery.messages
    assert stored.body == ar(
        "spf=fail smtp.mailfrom=bounce@fail.test", HELO_PASS,
        f"dkim=pass header.d=pass.test header.s=sel header.b={header_b(msg)}",
        "arc=none", "dmarc=pass (p=reject) header.from=pass.test") + msg


# -- DMARC and temperror policy ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dmarc_reject_refuses_after_the_body(server):
    srv = server(auth=AuthChecks(dmarc_reject=True))
    code, text = await deliver(srv, "alice@fail.test", message("alice@fail.test"))
    assert (code, text.split()[0]) == (550, b"5.7.1")
    assert b"fail.test" in text
    assert srv.delivery.messages == []
    # The same policy delivers a message that passes.
    assert (await deliver(srv, "alice@pass.test", message("alice@pass.test")))[0] == 250


@pytest_twisted.ensureDeferred
async def test_temperror_is_deferred_with_the_defer_policy(server):
    srv = server(auth=AuthChecks(temperror=AuthTempError.DEFER, dmarc_reject=True))
    code, text = await deliver(srv, "alice@temp.test", message("alice@temp.test"))
    assert (code, text.split()[0]) == (451, b"4.7.0")
    assert b"(spf)" in text
    assert srv.delivery.messages == []


@pytest_twisted.ensureDeferred
async def test_temperror_under_p_reject_is_never_rejected(server):
    # dmarc=fail only because SPF could not be evaluated: not a 550.
    srv = server(auth=AuthChecks(dmarc_reject=True))
    assert (await deliver(srv, "alice@temp.test", message("alice@temp.test")))[0] == 250


# -- forgery, sessions that are not checked -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_forged_results_with_our_authserv_id_are_removed(server):
    forged = (b"Authentication-Results: mx.test; dmarc=pass header.from=fail.test\r\n"
              b"Authentication-Results: MX.TEST;\r\n\tspf=pass\r\n"
              b"Authentication-Results: other.example; spf=pass smtp.mailfrom=fail.test\r\n")
    msg = message("alice@fail.test", extra=forged)
    srv = server()
    assert (await deliver(srv, "alice@fail.test", msg))[0] == 250
    [stored] = srv.delivery.messages
    kept = msg.replace(forged, forged.split(b"\r\n")[-2] + b"\r\n")
    assert stored.body == ar("spf=fail smtp.mailfrom=alice@fail.test", HELO_PASS, "dkim=none",
                             "arc=none", "dmarc=fail (p=reject) header.from=fail.test") + kept
    assert stored.body.count(b"mx.test") == 1


@pytest_twisted.ensureDeferred
async def test_checks_off_leave_the_message_and_envelope_alone(server):
    srv = server(auth=AuthChecks(enabled=False))
    msg = message("alice@fail.test", extra=b"Authentication-Results: mx.test; spf=pass\r\n")
    assert (await deliver(srv, "alice@fail.test", msg))[0] == 250
    [stored] = srv.delivery.messages
    assert stored.body == msg and stored.envelope.auth is None


@pytest_twisted.ensureDeferred
async def test_lmtp_listener_is_not_checked_by_default(server):
    srv = server(mode=Mode.LMTP)
    assert not srv.factory.config.checks_messages
    assert server(mode=Mode.LMTP, auth=AuthChecks(enabled=True)).factory.config.checks_messages


@pytest_twisted.ensureDeferred
async def test_xclient_login_session_skips_the_checks(server):
    # An authenticated session (here XCLIENT LOGIN= from a trusted proxy: the same
    # SessionContext.authenticated as AUTH) is not checked.
    srv = server()
    srv.factory.trusted_proxies = (ip_network("127.0.0.0/8"),)

    def session() -> int:
        with Client(srv.port) as c:
            c.greet()
            assert c.command("XCLIENT LOGIN=alice ADDR=192.0.2.1").code == 220
            assert c.command("EHLO client.test").code == 250
            c.send(b"MAIL FROM:<alice@fail.test>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n")
            assert [r.code for r in c.replies(3)] == [250, 250, 354]
            return c.command(message("alice@fail.test") + b".").code

    assert await deferToThread(session) == 250
    [stored] = srv.delivery.messages
    assert stored.body == message("alice@fail.test") and stored.envelope.auth is None


# -- a real service, a big message ----------------------------------------------------


def big_message(size: int) -> bytes:
    line = b"x" * 998 + b"\r\n"
    head = (b"From: alice@pass.test\r\nTo: user@localhost\r\nSubject: big\r\n"
            b"DKIM-Signature: v=1; a=rsa-sha256; d=pass.test; s=sel; h=from; bh=AAAA; "
            b"b=BigMessageSignature\r\n\r\n")
    return head + line * (size // len(line))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_50_mb_message_with_checks_keeps_memory_bounded(dns_port, tmp_path):
    msg = big_message(50 * 1024 * 1024)
    args = ["--maildir", str(tmp_path / "Maildir"), "--hostname", "mx.test",
            "--max-size", str(64 * 1024 * 1024), "--dns-server", f"127.0.0.1:{dns_port}"]
    with twistd_maitred(tmp_path, args) as srv:
        with Client(srv.port) as c:  # warm up: the checks' modules are loaded
            c.greet()
            c.send(b"MAIL FROM:<alice@pass.test>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n")
            assert [r.code for r in c.replies(3)] == [250, 250, 354]
            assert c.command(signed(message("alice@pass.test")) + b".").code == 250
            before = srv.status("VmRSS")
            c.send(b"MAIL FROM:<alice@pass.test>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n")
            assert [r.code for r in c.replies(3)] == [250, 250, 354]
            peak = 0
            for i in range(0, len(msg), 1024 * 1024):
                c.send(msg[i : i + 1024 * 1024])
                peak = max(peak, srv.status("VmRSS"))
            c.send(b".\r\n")
            reply = c.reply()
            peak = max(peak, srv.status("VmRSS"))
        assert reply.code == 250, reply
    growth = peak - before
    assert growth < 20 * 1024, f"RSS grew by {growth} kB"
    stored = message_files(tmp_path / "Maildir" / "localhost" / "user")[-1].read_bytes()
    _, rest = split_trace(stored)
    b = "BigMessa"  # RFC 6008: the first 8 characters of b=
    # Larger than --max-dkim-size (default 10240000): dkim=policy, ARC not evaluated.
    assert rest.startswith(ar(
        "spf=pass smtp.mailfrom=alice@pass.test", HELO_PASS,
        f"dkim=policy header.d=pass.test header.s=sel header.b={b}",
        "dmarc=pass (p=reject) header.from=pass.test"))
    assert len(rest) > len(msg)


def test_twistd_options_reach_the_config():
    from maitred_tx.tap import Options

    options = Options()
    options.parseOptions(["--dns-server", "127.0.0.1:5353", "--dns-server", "[::1]:53",
                          "--dns-timeout", "2", "--dmarc-reject", "--auth-temperror", "defer",
                          "--max-dkim-size", "1000"])
    assert options["dns-server"] == [("127.0.0.1", 5353), ("::1", 53)]
    auth = options.config.auth_checks
    assert (auth.enabled, auth.temperror, auth.dmarc_reject, auth.max_dkim_size) == (
        None, AuthTempError.DEFER, True, 1000)
    off = Options()
    off.parseOptions(["--no-auth-checks"])
    assert not off.config.checks_messages
    with pytest.raises(Exception, match="auth-temperror"):
        Options().parseOptions(["--auth-temperror", "maybe"])


@pytest_twisted.ensureDeferred
async def test_service_builds_one_checker_and_runs_its_thread_with_the_service(dns_port):
    cfg = Config(hostname="mx.test")
    service = SMTPService(reactor, cfg, MemoryDelivery(), [f"tcp:{free_port()}"],
                          dns_servers=[(LOCALHOST, dns_port)])
    service.listen(f"tcp:{free_port()}", replace(cfg, mode=Mode.LMTP))
    mx, lmtp = service.factories
    assert mx.checker is not None and mx.checker is service.checker and lmtp.checker is None
    assert not mx.checker.thread.running
    service.startService()
    try:
        assert mx.checker.thread.running
        assert "maitred-auth" in {t.name for t in threading.enumerate()}
    finally:
        await service.stopService()
    assert not mx.checker.thread.running
    assert "maitred-auth" not in {t.name for t in threading.enumerate()}


class ThreadRecordingResolver(TwistedResolver):
    """Notes which thread reads its cache and which sends its queries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cached_on: set[str] = set()
        self.lookup_on: set[str] = set()
        self.lookups = 0

    def cached(self, name: str, rtype: str) -> Any:
        self.cached_on.add(threading.current_thread().name)
        return super().cached(name, rtype)

    async def lookup(self, name: str, rtype: str) -> Any:
        self.lookup_on.add(threading.current_thread().name)
        self.lookups += 1
        return await super().lookup(name, rtype)


@pytest_twisted.ensureDeferred
async def test_checks_run_off_the_reactor_thread_and_dns_is_asked_on_it(server):
    """Issue 5: the reactor thread only hands the message over and takes the verdict
    back; the evaluation reads the DNS cache from the checks thread, and only a miss
    sends a query, from the reactor thread (twisted.names)."""
    srv = server(resolver_class=ThreadRecordingResolver)
    resolver = srv.factory.checker.resolver
    assert isinstance(resolver, ThreadRecordingResolver)
    assert (await deliver(srv, "alice@pass.test", message("alice@pass.test")))[0] == 250
    queried = resolver.lookups
    assert queried > 0
    # The second message is answered from the cache: no query leaves the reactor.
    assert (await deliver(srv, "alice@pass.test", message("alice@pass.test")))[0] == 250
    assert resolver.lookups == queried
    assert resolver.cached_on == {"maitred-auth"}
    assert resolver.lookup_on == {threading.main_thread().name}
    stored = srv.delivery.messages[-1]
    assert stored.envelope.auth is not None
    assert stored.envelope.auth.dmarc.result == "pass"


@pytest_twisted.ensureDeferred
async def test_the_verdicts_join_the_message_log_event(server):
    """One log event per message: the outcome and, with checks on, the verdicts."""
    srv = server(auth=AuthChecks(dmarc_reject=True))
    with capturedLogs() as events:
        assert (await deliver(srv, "alice@pass.test", message("alice@pass.test")))[0] == 250
        assert (await deliver(srv, "alice@fail.test", message("alice@fail.test")))[0] == 550
    mine = [e for e in events if "message_id" in e]
    assert [e["auth"] for e in mine] == [
        "spf=pass dkim=none arc=none dmarc=pass",
        "spf=fail dkim=none arc=none dmarc=fail",
    ]
    assert formatEvent(mine[0]).endswith(": 250 2.0.0 (spf=pass dkim=none arc=none dmarc=pass)")
    assert formatEvent(mine[1]).endswith(": 550 5.7.1 (spf=fail dkim=none arc=none dmarc=fail)")


# -- the verdict cache (issue 13) --------------------------------------------------------


def count_hand_overs(srv: Running) -> list[int]:
    """How many messages went to the checks thread (a counter around ``submit``)."""
    thread = srv.factory.checker.thread
    submit, count = thread.submit, [0]

    def counting(coroutine: Any) -> Any:
        count[0] += 1
        return submit(coroutine)

    thread.submit = counting
    return count


@pytest.mark.parametrize("domain", ["pass.test", "fail.test", "none.test", "temp.test"])
@pytest_twisted.ensureDeferred
async def test_a_repeat_sender_is_judged_from_the_verdict_cache(server, domain):
    """The first unsigned message from a sender goes to the checks thread; the next ones
    get the same field, from the verdict cache, with no hand-over and no DNS query —
    pass, fail, NXDOMAIN (none.test) and a cached DNS failure (temp.test: REFUSED)."""
    srv = server(resolver_class=ThreadRecordingResolver)
    hand_overs = count_hand_overs(srv)
    resolver = srv.factory.checker.resolver
    for i in range(4):
        msg = message(f"alice@{domain}", body=b"message %d\r\n" % i)
        assert (await deliver(srv, f"alice@{domain}", msg))[0] == 250
        if i == 0:
            queried = resolver.lookups
    assert hand_overs == [1]
    assert resolver.lookups == queried
    fields = {m.body.split(b"\r\nFrom: ")[0] for m in srv.delivery.messages}
    assert len(fields) == 1  # the same Authentication-Results field every time
    assert [m.envelope.auth.summary() for m in srv.delivery.messages[1:]] == [
        srv.delivery.messages[0].envelope.auth.summary()] * 3


@pytest_twisted.ensureDeferred
async def test_signed_messages_and_other_senders_are_checked_each_time(server):
    srv = server()
    hand_overs = count_hand_overs(srv)
    for _ in range(2):
        msg = signed(message("alice@pass.test"))
        assert (await deliver(srv, "alice@pass.test", msg))[0] == 250
    assert hand_overs == [2]  # a signature is verified for every message
    for author in ("alice@pass.test", "bob@pass.test"):  # another From: field
        assert (await deliver(srv, "alice@pass.test", message(author)))[0] == 250
    assert hand_overs == [4]
    assert (await deliver(srv, "carol@pass.test", message("alice@pass.test")))[0] == 250
    assert hand_overs == [5]  # another MAIL FROM
    assert [m.envelope.auth.dkim[0].result if m.envelope.auth.dkim else "none"
            for m in srv.delivery.messages] == ["pass", "pass", "none", "none", "none"]


@pytest_twisted.ensureDeferred
async def test_a_cached_verdict_still_refuses_under_dmarc_reject(server):
    srv = server(auth=AuthChecks(dmarc_reject=True))
    hand_overs = count_hand_overs(srv)
    for _ in range(3):
        code, text = await deliver(srv, "alice@fail.test", message("alice@fail.test"))
        assert (code, text.split(b" ")[0]) == (550, b"5.7.1")
    assert hand_overs == [1]
    assert srv.delivery.messages == []


@pytest_twisted.ensureDeferred
async def test_a_verdict_expires_with_the_first_dns_answer_it_used(server):
    """The resolver's cache and the verdict cache on one fake clock: past the zone's TTL
    (300 s) the verdict is computed again from fresh answers."""
    srv = server()
    checker = srv.factory.checker
    now = [reactor.seconds()]
    checker.resolver._cache._clock = lambda: now[0]
    checker.verdicts._clock = lambda: now[0]
    hand_overs = count_hand_overs(srv)
    for advance in (0, 299, 2):
        now[0] += advance
        assert (await deliver(srv, "alice@pass.test", message("alice@pass.test")))[0] == 250
    assert hand_overs == [2]
