"""Sessions that end badly over a real socket: the server stops (421 4.3.2), the peer
vanishes mid-message, a deadline fires while the delivery is still opening the message.
Nothing half-written may be left behind."""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest_twisted
from maitred_interop import Client, config, free_port
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from maitred_tx.delivery.maildir import MaildirDelivery
from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.service import SMTPService
from maitred_tx.smtp.config import AuthChecks

START = b"MAIL FROM:<a@b.org>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n"


def open_data(c: Client) -> None:
    c.greet()
    c.send(START)
    assert [r.code for r in c.replies(3)] == [250, 250, 354]


@pytest_twisted.ensureDeferred
async def test_service_stop_says_421_to_open_sessions():
    delivery = MemoryDelivery()
    port = free_port()
    # Without the authentication checks the delivery's sink opens at DATA and must be
    # aborted; with them it opens after the body only (tests/interop/test_authentication).
    unchecked = replace(config(), auth_checks=AuthChecks(enabled=False))
    service = SMTPService(reactor, unchecked, delivery, [f"tcp:{port}:interface=127.0.0.1"])
    service.startService()
    try:
        client = await deferToThread(Client, port)
        await deferToThread(open_data, client)
        await deferToThread(client.send, b"Subject: half\r\n\r\nhalf a body")
        await deferToThread(time.sleep, 0.1)  # let the server read it
    finally:
        await service.stopService()
    replies = await deferToThread(client.rest)
    client.close()
    assert [(r.code, r.status) for r in replies] == [(421, "4.3.2")]
    assert "mx.test" in replies[0].text
    assert delivery.messages == [] and delivery.aborted == 1


def test_twistd_sigterm_says_421(twistd):
    with twistd("--delivery", "discard", "--hostname", "mx.test") as server:
        with Client(server.port) as c:
            open_data(c)
            server.process.send_signal(signal.SIGTERM)
            replies = c.rest(timeout=10)
        # twistd stops cleanly, then re-raises the signal it was stopped by.
        assert server.process.wait(10) in (0, -signal.SIGTERM)
        log = server.log_text()
    assert [(r.code, r.status) for r in replies] == [(421, "4.3.2")]
    assert "Traceback" not in log
    assert "Server Shut Down." in log


@pytest_twisted.ensureDeferred
async def test_peer_vanishes_mid_message_leaves_nothing_in_the_maildir(serve, tmp_path: Path):
    server = serve(config(), MaildirDelivery(tmp_path, reactor))

    def session() -> None:
        with Client(server.port) as c:
            open_data(c)
            c.send(b"Subject: gone\r\n\r\n" + b"x" * 100_000 + b"\r\n")  # no end marker

    await deferToThread(session)
    maildir = tmp_path / "localhost" / "user"
    for _ in range(100):  # the abort runs once the server sees the close
        if server.factory.connections == set() and not any((maildir / "tmp").iterdir()):
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert server.factory.connections == set()
    assert list((maildir / "tmp").iterdir()) == []
    assert list((maildir / "new").iterdir()) == []


class SlowOpen(MemoryDelivery):
    """open_message answers after *delay* seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.opened = 0

    def open_message(self, envelope) -> Deferred:
        def opened():
            self.opened += 1
            return MemoryDelivery.open_message(self, envelope)

        return deferLater(reactor, self.delay, opened)


@pytest_twisted.ensureDeferred
async def test_deadline_while_the_sink_opens_aborts_it(serve):
    delivery = SlowOpen(delay=1.0)
    server = serve(config(session_deadline=0.5), delivery)

    def session() -> list[tuple[int, str | None]]:
        with Client(server.port) as c:
            c.greet()
            c.send(START + b"Subject: late\r\n\r\nbody\r\n.\r\n")
            return [(r.code, r.status) for r in c.rest(timeout=5)]

    replies = await deferToThread(session)
    assert replies[-1] == (421, "4.4.2")
    assert (250, "2.0.0") not in replies
    for _ in range(150):  # the sink opens after the close
        if delivery.opened:
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert delivery.opened == 1
    assert delivery.messages == []
    assert delivery.aborted == 1  # the late sink was discarded, not leaked


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_closes_a_delivery_that_has_close():
    """LMTP and HTTP deliveries keep connections: SMTPService.stopService calls a
    delivery's close() (and waits for its Deferred) after the listeners are gone."""
    from twisted.internet.defer import Deferred

    from maitred_tx.delivery.memory import MemoryDelivery
    from maitred_tx.service import SMTPService
    from maitred_tx.smtp.config import Config

    class Closing(MemoryDelivery):
        def __init__(self) -> None:
            super().__init__()
            self.closing: Deferred[None] = Deferred()
            self.calls = 0

        def close(self) -> Deferred[None]:
            self.calls += 1
            return self.closing

    delivery = Closing()
    service = SMTPService(reactor, Config(), delivery, ["tcp:0:interface=127.0.0.1"])
    service.startService()
    stopped = service.stopService()
    assert delivery.calls == 1 and not stopped.called  # waits for close()
    delivery.closing.callback(None)
    await stopped
