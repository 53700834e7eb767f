"""HTTPDelivery against a real twisted.web server on 127.0.0.1 (HTTP, and HTTPS with a
test certificate), mostly with smtplib talking to an in-process maitred in front of it.

What is checked: the exact body and header fields the webhook receives, the SMTP reply
(code and enhanced code) for each kind of answer or failure, timeouts and refused
connections, certificate verification, per-recipient JSON over LMTP, and a 20 MB
message going through with bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import re
import smtplib
import socket
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from maitred_tx.delivery.http import (
    SPOOL_MEMORY,
    HTTPDelivery,
    outcome_for_status,
    recipient_outcomes,
)
from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.outcomes import Accepted, PermanentFailure, TemporaryFailure
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.address import parse_forward_path, parse_reverse_path
from maitred_tx.smtp.config import Config, Limits, Mode
from maitred_tx.smtp.params import MailParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))

from security_support import make_certificate

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@localhost\r\n"
    b"Subject: webhook\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"..a line that starts with a dot\r\n"
    b"bye\r\n"
)
RECEIVED = re.compile(
    rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby mx\.test \(maitred_tx\) with ESMTP id (\S+)(?:\r\n\tfor <[^>]+>)?;\r\n"
    rb"\t[^\r\n]+\r\n"
)


# -- a webhook: twisted.web on 127.0.0.1 ----------------------------------------------


@dataclass
class Seen:
    path: bytes
    headers: dict[bytes, list[bytes]]
    size: int
    sha256: str
    body: bytes | None  # kept when small


class Hook(Resource):
    """Records every request; answers with ``status``/``answer_headers``/``answer``,
    or never (``hang``).  Hanging requests' ends are recorded in ``ended``."""

    isLeaf = True

    def __init__(self, status: int = 200, answer_headers: dict[bytes, bytes] | None = None,
                 answer: bytes = b"stored\n", hang: bool = False) -> None:
        super().__init__()
        self.status = status
        self.answer_headers = answer_headers or {}
        self.answer = answer
        self.hang = hang
        self.seen: list[Seen] = []
        self.ended: list[str] = []

    def render_POST(self, request: Any) -> Any:
        digest, size, kept = hashlib.sha256(), 0, []
        while block := request.content.read(1 << 20):
            digest.update(block)
            size += len(block)
            if size <= SPOOL_MEMORY:
                kept.append(block)
        headers = {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append(Seen(request.uri, headers, size, digest.hexdigest(),
                              b"".join(kept) if size <= SPOOL_MEMORY else None))
        if self.hang:
            request.notifyFinish().addBoth(lambda r: self.ended.append(type(r).__name__))
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        for name, value in self.answer_headers.items():
            request.setHeader(name, value)
        return self.answer


@dataclass
class Web:
    hook: Hook
    port: int
    scheme: str = "http"

    def url(self, path: str = "/hook?token=s3cret") -> str:
        host = "localhost" if self.scheme == "https" else "127.0.0.1"
        return f"{self.scheme}://{host}:{self.port}{path}"


@pytest.fixture
def web() -> Iterator[Callable[..., Web]]:
    """``web(tls=None)`` starts a webhook server (HTTPS with ``tls``: a CertFiles)."""
    ports: list[Any] = []

    def start(tls: Any = None, **hook_kw: Any) -> Web:
        hook = Hook(**hook_kw)
        site = Site(hook)
        if tls is None:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        else:
            pem = tls.cert.read_bytes() + tls.key.read_bytes()
            options = ssl.PrivateCertificate.loadPEM(pem).options()
            port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        ports.append(port)
        return Web(hook, port.getHost().port, "http" if tls is None else "https")

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


# -- maitred in front of it -------------------------------------------------------------


@pytest.fixture
def deliveries() -> Iterator[Callable[..., HTTPDelivery]]:
    """``delivery(url, **kw)``: an HTTPDelivery whose idle connections are closed after
    the test."""
    made: list[HTTPDelivery] = []

    def make(url: str, **kw: Any) -> HTTPDelivery:
        made.append(HTTPDelivery(reactor, url, **kw))
        return made[-1]

    yield make
    for delivery in made:
        pytest_twisted.blockon(delivery.close())


@pytest.fixture
def smtp() -> Iterator[Callable[..., int]]:
    """``smtp(delivery, config=None)`` serves SMTP on 127.0.0.1; returns the port."""
    started: list[tuple[SMTPFactory, Any]] = []

    def start(delivery: Any, config: Config | None = None) -> int:
        factory = SMTPFactory(reactor, config or Config(hostname="mx.test"), delivery)
        listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        started.append((factory, listener))
        return int(listener.getHost().port)

    yield start
    for factory, listener in started:
        factory.shutdown()
        stopped = listener.stopListening()
        if isinstance(stopped, Deferred):
            pytest_twisted.blockon(stopped)


def sendmail(port: int, recipients: list[str], message: bytes = MESSAGE,
             sender: str = "alice@example.org") -> tuple[int, bytes] | dict[str, Any]:
    """smtplib in this (worker) thread: {} / the refused dict, or (code, text) of a
    refused message."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        try:
            return client.sendmail(sender, recipients, message)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error


def wait(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


# -- the contract: body and header fields ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_webhook_receives_exactly_the_message_and_envelope(web, deliveries, smtp) -> None:
    server = web()
    delivery = deliveries(server.url(), headers={"Authorization": "Bearer t0ken",
                                                 "X-Maitred-Sender": "forged"})
    port = smtp(delivery)
    assert await deferToThread(sendmail, port, ["bob@localhost", "carol@localhost"]) == {}
    (seen,) = server.hook.seen
    assert seen.path == b"/hook?token=s3cret"
    received = RECEIVED.match(seen.body or b"")
    assert received is not None, seen.body
    # smtplib dot-stuffs, maitred unstuffs: the webhook gets the message as written
    assert seen.body == received.group(0) + MESSAGE
    assert b"\tfor <" not in received.group(0)  # two recipients: no "for" clause
    h = seen.headers
    assert h[b"content-type"] == [b"message/rfc822"]
    assert h[b"content-length"] == [str(seen.size).encode()]
    assert h[b"authorization"] == [b"Bearer t0ken"]
    assert h[b"x-maitred-message-id"] == [received.group(1)]
    assert h[b"x-maitred-sender"] == [b"alice@example.org"]  # ours, not the configured one
    assert h[b"x-maitred-recipient"] == [b"bob@localhost", b"carol@localhost"]
    assert h[b"x-maitred-client-address"] == [b"127.0.0.1"]
    assert h[b"x-maitred-helo"] == [b"client.test"]
    assert b"x-maitred-tls" not in h and b"x-maitred-authenticated" not in h


@pytest.mark.parametrize("split", ["whole", "lines", "bytes"])
@pytest_twisted.ensureDeferred
async def test_sink_sends_the_same_bytes_however_they_arrive(web, deliveries,
                                                             split: str) -> None:
    server = web()
    delivery = deliveries(server.url("/"), received=False)
    sink = delivery.open_message(envelope("<b@localhost>"))
    if split == "whole":
        pieces = [MESSAGE]
    elif split == "lines":
        pieces = MESSAGE.splitlines(keepends=True)
    else:
        pieces = [MESSAGE[i : i + 1] for i in range(len(MESSAGE))]
    for piece in pieces:
        assert sink.write(piece) is None
    assert await sink.close() == Accepted()
    assert server.hook.seen[0].body == MESSAGE


def envelope(*recipients: str, sender: str | None = "<a@example.org>", **session: Any
             ) -> Envelope:
    session.setdefault("helo", "client.test")
    context = SessionContext(session_id="s1", hostname="mx.test", peer_host="192.0.2.7",
                             peer_port=2525, esmtp=True, **session)
    return Envelope(
        session=context, message_id="Q1",
        sender=None if sender is None else parse_reverse_path(sender, smtputf8=True),
        params=MailParams(smtputf8=any(not r.isascii() for r in recipients)),
        recipients=tuple(Recipient(parse_forward_path(r, smtputf8=True)) for r in recipients),
        received_at=1_700_000_000.0,
    )


class Verdicts:
    """Stands in for maitred_tx.auth's AuthResults, of which the delivery only reads
    ``summary()``."""

    def summary(self) -> str:
        return "spf=pass dkim=pass arc=none dmarc=pass"


def test_request_headers_for_utf8_tls_auth_and_null_sender() -> None:
    delivery = HTTPDelivery(reactor, "https://hooks.example/in")
    env = envelope("<jörg@bücher.example>", "<b@localhost>", sender=None, tls=True,
                   tls_version="TLSv1.3", authenticated="alice", helo="evil\r\nX-Injected: 1")
    env = env.with_auth(Verdicts())
    h = delivery.request_headers(env)
    assert h[b"Content-Type"] == [b"message/global"]  # RFC 6532 3.7: SMTPUTF8 message
    assert h[b"X-Maitred-Sender"] == [b""]
    assert h[b"X-Maitred-Recipient"] == ["jörg@bücher.example".encode(), b"b@localhost"]
    assert h[b"X-Maitred-Helo"] == [b"evil??X-Injected: 1"]  # no line break gets through
    assert h[b"X-Maitred-TLS"] == [b"TLSv1.3"]
    assert h[b"X-Maitred-Authenticated"] == [b"alice"]
    assert h[b"X-Maitred-Auth"] == [b"spf=pass dkim=pass arc=none dmarc=pass"]


def test_configuration_errors() -> None:
    for url in ("ftp://x/", "http:///path", "hooks.example/in", "file:///etc/passwd"):
        with pytest.raises(ValueError, match="webhook URL must be"):
            HTTPDelivery(reactor, url)
    with pytest.raises(ValueError, match="timeout must be"):
        HTTPDelivery(reactor, "http://h/", timeout=0)
    with pytest.raises(ValueError, match="a value holds a line break"):
        HTTPDelivery(reactor, "http://h/", headers={"X-A": "a\r\nX-B: b"})
    with pytest.raises(ValueError, match="bad header name"):
        HTTPDelivery(reactor, "http://h/", headers={"X A": "a"})


# -- what the answer means ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Accepted()), (201, Accepted()), (204, Accepted()),
        (400, PermanentFailure("Message rejected by the webhook (HTTP 400)", 554, "5.6.0")),
        (404, PermanentFailure("Message rejected by the webhook (HTTP 404)", 554, "5.6.0")),
        (413, PermanentFailure("Message too big for the webhook (HTTP 413)", 552, "5.3.4")),
        (429, TemporaryFailure("Webhook rate limit, try again later (HTTP 429)", 451, "4.7.1")),
        (408, TemporaryFailure("Webhook unavailable, try again later (HTTP 408)", 451, "4.3.0")),
        (302, TemporaryFailure("Webhook unavailable, try again later (HTTP 302)", 451, "4.3.0")),
        (500, TemporaryFailure("Webhook unavailable, try again later (HTTP 500)", 451, "4.3.0")),
        (503, TemporaryFailure("Webhook unavailable, try again later (HTTP 503)", 451, "4.3.0")),
    ],
)
def test_outcome_for_status(status: int, outcome: Any) -> None:
    assert outcome_for_status(status) == outcome


@pytest.mark.parametrize(
    ("status", "reply"),
    [(404, (554, b"5.6.0 Message rejected by the webhook (HTTP 404)")),
     (400, (554, b"5.6.0 Message rejected by the webhook (HTTP 400)")),
     (413, (552, b"5.3.4 Message too big for the webhook (HTTP 413)")),
     (500, (451, b"4.3.0 Webhook unavailable, try again later (HTTP 500)")),
     (429, (451, b"4.7.1 Webhook rate limit, try again later (HTTP 429)"))],
)
@pytest_twisted.ensureDeferred
async def test_smtp_reply_follows_the_answer(web, deliveries, smtp, status: int,
                                             reply: tuple[int, bytes]) -> None:
    server = web(status=status)
    port = smtp(deliveries(server.url()))
    assert await deferToThread(sendmail, port, ["bob@localhost"]) == reply
    assert len(server.hook.seen) == 1


@pytest_twisted.ensureDeferred
async def test_redirect_is_not_followed_and_logged(web, deliveries, smtp) -> None:
    target = web()
    server = web(status=302, answer_headers={b"Location": target.url("/elsewhere?k=v").encode()})
    port = smtp(deliveries(server.url()))
    with capturedLogs() as events:
        got = await deferToThread(sendmail, port, ["bob@localhost"])
    assert got == (451, b"4.3.0 Webhook unavailable, try again later (HTTP 302)")
    assert target.hook.seen == []
    logged = [formatEvent(e) for e in events if "redirect" in e.get("log_format", "")]
    assert logged == [f"webhook http://127.0.0.1:{server.port}/hook: HTTP 302 redirect to "
                      f"http://127.0.0.1:{target.port}/elsewhere not followed"]


@pytest_twisted.ensureDeferred
async def test_hanging_webhook_times_out_with_451(web, deliveries, smtp) -> None:
    server = web(hang=True)
    port = smtp(deliveries(server.url(), timeout=0.5))
    with capturedLogs() as events:
        got = await deferToThread(sendmail, port, ["bob@localhost"])
    assert got == (451, b"4.3.0 Webhook unavailable, try again later")
    assert len(server.hook.seen) == 1
    for _ in range(100):  # we hung up: the server sees its request end
        if server.hook.ended:
            break
        await wait(0.02)
    assert server.hook.ended == ["Failure"]
    warned = [formatEvent(e) for e in events if "not delivered" in e.get("log_format", "")]
    queue_id = server.hook.seen[0].headers[b"x-maitred-message-id"][0].decode()
    assert warned == [f"webhook http://127.0.0.1:{server.port}/hook: {queue_id} not delivered: "
                      "no answer within 0.5 s -> 451 4.3.0"]  # no token from the query


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_451(deliveries, smtp) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    port = smtp(deliveries(f"http://127.0.0.1:{closed}/hook", timeout=5))
    with capturedLogs() as events:
        got = await deferToThread(sendmail, port, ["bob@localhost"])
    assert got == (451, b"4.3.0 Webhook unavailable, try again later")
    warned = [formatEvent(e) for e in events if "not delivered" in e.get("log_format", "")]
    assert len(warned) == 1 and "ConnectionRefusedError" in warned[0], warned


@pytest_twisted.ensureDeferred
async def test_https_with_a_trusted_certificate(web, deliveries, smtp, tmp_path) -> None:
    certs = make_certificate(tmp_path)
    server = web(tls=certs)
    port = smtp(deliveries(server.url(), trust_root=str(certs.cert)))
    assert await deferToThread(sendmail, port, ["bob@localhost"]) == {}
    assert server.hook.seen[0].body is not None
    assert server.hook.seen[0].body.endswith(MESSAGE)


@pytest_twisted.ensureDeferred
async def test_https_certificate_is_verified_by_default(web, deliveries, smtp,
                                                        tmp_path) -> None:
    server = web(tls=make_certificate(tmp_path))  # self-signed: no platform CA signed it
    port = smtp(deliveries(server.url(), timeout=5))
    with capturedLogs() as events:
        got = await deferToThread(sendmail, port, ["bob@localhost"])
    assert got == (451, b"4.3.0 Webhook unavailable, try again later")
    assert server.hook.seen == []
    warned = [formatEvent(e) for e in events if "not delivered" in e.get("log_format", "")]
    assert len(warned) == 1 and "certificate verify failed" in warned[0], warned


@pytest_twisted.ensureDeferred
async def test_max_size_refuses_without_a_request(web, deliveries, smtp) -> None:
    server = web()
    port = smtp(deliveries(server.url(), max_size=len(MESSAGE) + 100))
    big = MESSAGE + b"x" * 200 + b"\r\n"
    assert await deferToThread(sendmail, port, ["bob@localhost"], big) == (
        552, b"5.3.4 Message too big for the webhook")
    assert server.hook.seen == []


@pytest_twisted.ensureDeferred
async def test_aborted_message_sends_nothing(web, deliveries) -> None:
    server = web()
    sink = deliveries(server.url()).open_message(envelope("<b@localhost>"))
    sink.write(MESSAGE)
    sink.abort()
    sink.abort()
    await wait(0.05)
    assert server.hook.seen == []
    with pytest.raises(RuntimeError, match="aborted"):
        sink.close()


# -- per-recipient answers ----------------------------------------------------------


def test_recipient_outcomes_parsing() -> None:
    env = envelope("<a@localhost>", "<b@localhost>", "<c@localhost>", "<d@localhost>")
    body = json.dumps({"recipients": {
        "a@localhost": {"code": 250, "text": "kept"},
        "b@localhost": {"code": 550, "status": "5.1.1", "text": "no such user\r\n250 fake"},
        "c@localhost": {"code": 421, "status": "bad"},  # clamped to what a delivery may say
        "d@localhost": {"code": "550"},  # unusable: the answer's own outcome
    }}).encode()
    assert recipient_outcomes(env, body) == [
        Accepted("kept"),
        PermanentFailure("no such user??250 fake", 550, "5.1.1"),
        TemporaryFailure("Webhook: try again later", 451, "4.0.0"),
        Accepted(),
    ]
    for unusable in (b"", b"stored", b"[]", b'{"recipients": []}', b"\xff{"):
        assert recipient_outcomes(env, unusable) is None


@pytest_twisted.ensureDeferred
async def test_per_recipient_json_over_lmtp(web, deliveries, smtp) -> None:
    answer = {"recipients": {"gone@localhost": {"code": 550, "status": "5.1.1",
                                                "text": "No such mailbox"},
                             "full@localhost": {"code": 452, "status": "4.2.2"}}}
    server = web(answer=json.dumps(answer).encode(),
                 answer_headers={b"Content-Type": b"application/json; charset=utf-8"})
    port = smtp(deliveries(server.url()), Config(hostname="mx.test", mode=Mode.LMTP))
    # one reply per recipient after DATA (RFC 2033 4.2), from the webhook's JSON
    replies = await deferToThread(raw_lmtp, port, ["ok", "gone", "full"])
    assert replies == ["250 2.0.0", "550 5.1.1 No such mailbox",
                       "452 4.2.2 Webhook: try again later"]
    assert len(server.hook.seen) == 1
    assert server.hook.seen[0].headers[b"x-maitred-recipient"] == [
        b"ok@localhost", b"gone@localhost", b"full@localhost"]


def last_reply_line(f: Any) -> str:
    """The last line of the next (possibly multi-line) reply on the socket file *f*."""
    while True:
        line = f.readline().decode().rstrip("\r\n")
        if line[3:4] != "-":
            return line


def raw_lmtp(port: int, users: list[str]) -> list[str]:
    """An LMTP transaction on a socket: the reply to each recipient after DATA, cut to
    code, enhanced code and (for failures) text."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")

        def reply() -> str:
            return last_reply_line(f)

        reply()
        s.sendall(b"LHLO client.test\r\nMAIL FROM:<alice@example.org>\r\n")
        reply()
        reply()
        for user in users:
            s.sendall(f"RCPT TO:<{user}@localhost>\r\n".encode())
            assert reply().startswith("250")
        s.sendall(b"DATA\r\n")
        assert reply().startswith("354")
        s.sendall(MESSAGE + b".\r\n")
        out = []
        for _ in users:
            line = reply()
            out.append(line[:9] if line.startswith("250") else line)
        s.sendall(b"QUIT\r\n")
        return out


# -- a large message streams --------------------------------------------------------------


def big_message(size: int) -> Iterator[bytes]:
    """A message of about ``size`` octets in 64 KiB pieces of 78-octet lines."""
    yield b"From: a@example.org\r\nSubject: big\r\n\r\n"
    line = b"0123456789" * 7 + b"abcdef\r\n"
    piece = line * (64 * 1024 // len(line))
    for _ in range(size // len(piece)):
        yield piece


def send_big(port: int, size: int) -> tuple[str, int, str]:
    """Raw SMTP: the message is generated piece by piece (never whole in memory);
    returns the final reply, the size sent and its SHA-256."""
    digest, sent = hashlib.sha256(), 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        f = s.makefile("rb")

        def reply() -> str:
            return last_reply_line(f)

        reply()
        s.sendall(b"EHLO client.test\r\n")
        reply()
        s.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
        assert reply().startswith("250") and reply().startswith("250")
        assert reply().startswith("354")
        for piece in big_message(size):
            s.sendall(piece)
            digest.update(piece)
            sent += len(piece)
        s.sendall(b".\r\n")
        final = reply()
        s.sendall(b"QUIT\r\n")
    return final, sent, digest.hexdigest()


@pytest_twisted.ensureDeferred
async def test_20_mb_message_streams_with_bounded_memory(web, deliveries, smtp) -> None:
    server = web()
    config = Config(hostname="mx.test", limits=Limits(max_message_size=64 * 1024 * 1024))
    port = smtp(deliveries(server.url(), received=False), config)
    tracemalloc.start()
    try:
        final, sent, digest = await deferToThread(send_big, port, 20 * 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert final.startswith("250 2.0.0"), final
    (seen,) = server.hook.seen
    assert (seen.size, seen.sha256) == (sent, digest)
    assert seen.headers[b"content-length"] == [str(sent).encode()]
    # SMTP buffers + at most SPOOL_MEMORY spooled + the web server's own buffers
    assert peak < 8 * 1024 * 1024, peak


# -- twistd maitred --delivery https://... --------------------------------------------


def test_twistd_delivery_url() -> None:
    from twisted.python.usage import UsageError

    from maitred_tx.tap import Options, load_delivery

    options = Options()
    options.parseOptions(["--delivery", "https://hooks.example/in?k=v", "--webhook-timeout",
                          "7.5"])
    delivery = load_delivery(options, reactor)
    assert isinstance(delivery, HTTPDelivery)
    assert (delivery.url, delivery.timeout) == ("https://hooks.example/in?k=v", 7.5)
    with pytest.raises(UsageError, match="--delivery must be maildir, queue, discard, "
                                         r"python:NAME or an http\(s\):// URL"):
        Options().parseOptions(["--delivery", "ftp://hooks.example/"])
    with pytest.raises(UsageError, match="0 is not a positive number of seconds"):
        Options().parseOptions(["--delivery", "http://h/", "--webhook-timeout", "0"])
