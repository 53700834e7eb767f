"""QueueDelivery through the real server: smtplib -> SMTPFactory on 127.0.0.1 ->
QueueDelivery -> SpoolStore files.  The 250 only after the envelope's directory
fsync; 451 4.3.0 when the store fails; DSN parameters kept; no partial file left."""

from __future__ import annotations

import os
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from maitred_tx.delivery.queue import QueueDelivery, queue_envelope
from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.queue import spool as spool_module
from maitred_tx.queue.spool import SpoolStore
from maitred_tx.queue.store import QueuedMessage, RecipientState
from maitred_tx.queue.threaded import ThreadedQueue
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.address import parse_forward_path, parse_reverse_path
from maitred_tx.smtp.config import Config
from maitred_tx.smtp.params import BodyType, MailParams, Notify, RcptParams, Ret

CONFIG = Config(hostname="mx.test", local_domains=frozenset({"example.com", "example.net"}))
MESSAGE = (b"From: alice@origin.test\r\nSubject: queued\r\n\r\nHello,\r\n"
           b".leading dot\r\n\r\n8bit: \xc3\xa9\r\n")


class Served:
    def __init__(self, root: Path) -> None:
        self.store = SpoolStore(root)
        self.report = self.store.recover()
        self.delivery = QueueDelivery(ThreadedQueue(self.store, reactor))
        self.factory = SMTPFactory(reactor, CONFIG, self.delivery)
        self.listener = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listener.getHost().port
        self.root = root

    def files(self, sub: str) -> list[str]:
        return sorted(os.listdir(self.root / sub))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "spool")
    yield s
    s.factory.shutdown()
    d = s.listener.stopListening()
    if isinstance(d, Deferred):
        pytest_twisted.blockon(d)
    s.store.close()


def send(port: int, sender: str, recipients: list[str], message: bytes,
         mail_options: tuple[str, ...] = (), rcpt_options: tuple[str, ...] = ()
         ) -> tuple[int, bytes]:
    """One transaction with smtplib (blocking: run it in a thread); the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender, list(mail_options))
        assert code == 250, (code, text)
        for r in recipients:
            code, text = client.rcpt(r, list(rcpt_options))
            assert code == 250, (code, text)
        return client.data(message)


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """The Received: field we prepended (folded lines) and the bytes after it."""
    assert stored.startswith(b"Received: ")
    end = stored.index(b"\r\n")
    while stored[end + 2 : end + 3] == b"\t":
        end = stored.index(b"\r\n", end + 2)
    return stored[: end + 2], stored[end + 2 :]


@pytest_twisted.ensureDeferred
async def test_smtplib_message_is_queued_with_its_dsn_parameters(served: Served) -> None:
    seen: list[QueuedMessage] = []
    served.delivery.subscribe(seen.append)
    code, text = await deferToThread(
        send, served.port, "alice@origin.test", ["bob@example.com"], MESSAGE,
        ("BODY=8BITMIME", "RET=FULL", "ENVID=QQ+2B314"),
        ("NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Bob+2BX@Example.com"),
    )
    assert code == 250
    status, _, rest = text.decode().partition(" ")
    assert status == "2.0.0"
    [message_id] = served.files("msg")
    assert rest == f"Queued as {message_id}"
    assert served.files("env") == [f"{message_id}.json"] and served.files("tmp") == []
    message = served.store.load(message_id)
    assert message is not None and seen == [message]
    assert message.sender == "alice@origin.test"
    assert message.envid == "QQ+314" and message.ret is Ret.FULL
    assert message.body_type is BodyType.EIGHT_BIT_MIME and not message.smtputf8
    [bob] = message.recipients
    assert bob.address == "bob@example.com" and bob.state is RecipientState.PENDING
    assert bob.notify == frozenset({Notify.SUCCESS, Notify.DELAY})
    assert bob.orcpt == ("rfc822", "Bob+X@Example.com")
    stored = (served.root / "msg" / message_id).read_bytes()
    assert message.size == len(stored)
    received, body = split_received(stored)
    assert body == MESSAGE  # exactly the bytes sent, dot-unstuffed
    assert received.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test")
    assert b"\tfor <bob@example.com>;" in received
    assert f"id {message.transaction_id}".encode() in received
    assert b"Return-Path" not in stored and b"Delivered-To" not in stored
    # In the index: due now.
    assert served.store.due(time.time() + 1) == [message_id]


@pytest_twisted.ensureDeferred
async def test_one_copy_for_several_recipients_and_a_bounce(served: Served) -> None:
    code, _ = await deferToThread(send, served.port, "<>", ["bob@example.com",
                                                            "carol@example.net"], MESSAGE)
    assert code == 250
    [message] = list(served.store.load_all())
    assert message.sender is None
    assert [r.address for r in message.recipients] == ["bob@example.com", "carol@example.net"]
    assert [r.notify for r in message.recipients] == [None, None]
    received, body = split_received((served.root / "msg" / message.id).read_bytes())
    assert b"for <" not in received and body == MESSAGE


@pytest_twisted.ensureDeferred
async def test_the_250_waits_for_the_envelope_directory_fsync(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env/ directory fsync is the last step of the commit: hold it, and the
    client must not have its 250 until it is let go."""
    real_fsync = os.fsync
    env_dir = os.path.realpath(served.root / "env")
    release = threading.Event()
    synced: list[str] = []

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append(path)
        if path == env_dir:
            release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    replied: list[float] = []

    def client() -> tuple[int, bytes]:
        result = send(served.port, "alice@origin.test", ["bob@example.com"], MESSAGE)
        replied.append(time.monotonic())
        return result

    d = deferToThread(client)
    deadline = time.monotonic() + 20
    while env_dir not in synced and time.monotonic() < deadline:
        await deferLater(0.02)
    assert env_dir in synced, synced
    await deferLater(0.5)
    assert replied == []  # held: no 250 while the commit is not durable
    release.set()
    code, _ = await d
    assert code == 250
    # Body file, msg/, envelope file, env/: in that order, all before the reply.
    [message_id] = served.files("msg")
    msg_dir = os.path.realpath(served.root / "msg")
    body_index = next(i for i, p in enumerate(synced) if p.endswith(message_id)
                      and "/tmp/" in p)
    assert synced[body_index + 1] == msg_dir
    assert synced[body_index + 2].endswith(".json") and "/tmp/" in synced[body_index + 2]
    assert synced[body_index + 3] == env_dir


def deferLater(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@pytest_twisted.ensureDeferred
async def test_a_store_failure_is_451_and_leaves_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(message: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(served.store, "_write_env", full)
    seen: list[QueuedMessage] = []
    served.delivery.subscribe(seen.append)
    code, text = await deferToThread(send, served.port, "alice@origin.test",
                                     ["bob@example.com"], MESSAGE)
    assert (code, text.split()[0]) == (451, b"4.3.0")
    assert served.files("msg") == served.files("env") == served.files("tmp") == []
    assert seen == []


@pytest_twisted.ensureDeferred
async def test_a_spool_that_cannot_be_written_is_451(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(prefix: bytes = b"") -> Any:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(served.store, "create", broken)
    code, text = await deferToThread(send, served.port, "alice@origin.test",
                                     ["bob@example.com"], MESSAGE)
    assert (code, text.split()[0]) == (451, b"4.3.0")
    assert served.files("msg") == []


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_leaves_no_file(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    aborted = threading.Event()
    create = served.store.create

    def watched_create(prefix: bytes = b"") -> Any:
        writer = create(prefix)
        abort = writer.abort

        def watched_abort() -> None:
            abort()
            aborted.set()

        writer.abort = watched_abort  # type: ignore[method-assign]
        return writer

    monkeypatch.setattr(served.store, "create", watched_create)

    def half() -> None:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO client.test\r\n")
            while f.readline()[3:4] == b"-":
                pass
            s.sendall(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
            assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            s.sendall(b"Subject: cut\r\n\r\n" + b"x" * 200_000)

    await deferToThread(half)
    deadline = time.monotonic() + 20
    while not aborted.is_set() and time.monotonic() < deadline:
        await deferLater(0.05)
    assert aborted.is_set()  # the sink was aborted, in the thread pool
    assert served.files("tmp") == served.files("msg") == served.files("env") == []


@pytest_twisted.ensureDeferred
async def test_a_failing_subscriber_does_not_change_the_answer(served: Served) -> None:
    calls: list[str] = []

    def bad(message: QueuedMessage) -> None:
        calls.append(message.id)
        raise RuntimeError("runner bug")

    unsubscribe: Callable[[], None] = served.delivery.subscribe(bad)
    code, _ = await deferToThread(send, served.port, "a@origin.test", ["bob@example.com"],
                                  MESSAGE)
    assert code == 250 and len(calls) == 1
    unsubscribe()
    code, _ = await deferToThread(send, served.port, "a@origin.test", ["bob@example.com"],
                                  MESSAGE)
    assert code == 250 and len(calls) == 1
    assert len(served.files("msg")) == 2


def test_queue_envelope_keeps_every_parameter() -> None:
    context = SessionContext("s1", "mx.test", "127.0.0.1", 25, helo="c.test", esmtp=True)
    env = Envelope(
        session=context,
        message_id="T42",
        sender=parse_reverse_path("<ünï@côde.test>", smtputf8=True),
        params=MailParams(smtputf8=True, ret=Ret.HDRS, envid="E1", body=BodyType.BINARY_MIME),
        recipients=(
            Recipient(parse_forward_path("<josé@exämple.com>", smtputf8=True),
                      RcptParams(notify=frozenset({Notify.NEVER}),
                                 orcpt=("utf-8", "josé@exämple.com"))),
        ),
        received_at=1_700_000_000.5,
    )
    qe = queue_envelope(env)
    assert qe.sender == "ünï@côde.test" and qe.transaction_id == "T42"
    assert (qe.envid, qe.ret, qe.smtputf8, qe.body_type) == ("E1", Ret.HDRS, True,
                                                             BodyType.BINARY_MIME)
    assert qe.received_at == 1_700_000_000.5
    [r] = qe.recipients
    assert (r.address, r.notify, r.orcpt) == ("josé@exämple.com", frozenset({Notify.NEVER}),
                                              ("utf-8", "josé@exämple.com"))


@pytest_twisted.ensureDeferred
async def test_a_recipient_given_twice_is_queued_once(served: Served) -> None:
    """RCPT TO the same mailbox twice (a list expanded client-side, a retrying MUA):
    one queued recipient, so one copy onward and one line in a DSN - as Postfix's
    cleanup drops duplicate recipients.  The first one's DSN parameters are kept."""
    code, _ = await deferToThread(
        send, served.port, "alice@origin.test",
        ["bob@example.com", "carol@example.net", "bob@EXAMPLE.com"], MESSAGE)
    assert code == 250
    [message] = list(served.store.load_all())
    assert [r.address for r in message.recipients] == ["bob@example.com",
                                                       "carol@example.net"]
