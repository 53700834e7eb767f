"""The queue runner with real peers: a queued message goes to the domain's MX hosts (or a
smarthost) through maitred_tx's client, retries, bounces (RFC 3464), MTA-STS (RFC 8461)
and connection reuse; every peer is real (dnsmasq, a receiving maitred_tx server with
STARTTLS, an HTTPS policy server)."""

from __future__ import annotations

import email
import email.policy
import time
from typing import Any

import pytest_twisted
from maitred_interop import until
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import deferLater

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.mta_sts.report import ResultType
from maitred_tx.outcomes import PermanentFailure, TemporaryFailure
from maitred_tx.queue.store import RecipientState
from maitred_tx.relay.route import RelayHost

MESSAGE = b"From: alice@sender.test\r\nTo: bob@good.test\r\nSubject: relayed\r\n\r\nHello.\r\n"


class RefusingNobody(MemoryDelivery):
    """An MX that refuses nobody@ with 550 5.1.1 and takes everyone else."""

    def rcpt_to(self, context, envelope, recipient, params):
        if recipient.local_part == "nobody":
            return PermanentFailure("No such user here", 550, "5.1.1")
        return None


def states(relay, message_id: str) -> dict[str, RecipientState]:
    message = relay.store.load(message_id)
    return {} if message is None else {r.address: r.state for r in message.recipients}


async def deferred(r, address: str) -> Any:
    """Queue a message for *address*; its recipient once the runner deferred it."""
    message_id = r.add("alice@sender.test", [address], MESSAGE)
    await until(lambda: states(r, message_id).get(address) is RecipientState.DEFERRED,
                what="the deferral")
    return r.store.load(message_id).recipients[0]


@pytest_twisted.ensureDeferred
async def test_a_message_goes_to_the_mx_over_starttls_and_leaves_the_queue(receiver, relay):
    mx = receiver()
    r = relay(port=mx.port)
    message_id = r.add("alice@sender.test", ["bob@good.test", "carol@good.test"], MESSAGE)
    await until(lambda: mx.messages and r.store.load(message_id) is None, what="delivery")
    [got] = mx.messages
    assert got.body == MESSAGE
    assert [str(rc.mailbox) for rc in got.envelope.recipients] == ["bob@good.test",
                                                                   "carol@good.test"]
    assert str(got.envelope.sender) == "alice@sender.test"
    assert got.envelope.session.tls  # opportunistic STARTTLS was used
    assert r.store.count() == 0


@pytest_twisted.ensureDeferred
async def test_the_next_mx_is_tried_when_the_first_cannot_be_reached(receiver, relay):
    mx = receiver()
    r = relay(port=mx.port)
    r.add("alice@sender.test", ["bob@down.test"], MESSAGE)  # mx1 is 127.0.0.2: refused
    await until(lambda: mx.messages, what="delivery through mx2")
    assert mx.messages[0].envelope.session.hostname == "mx.good.test"


@pytest_twisted.ensureDeferred
async def test_one_connection_carries_several_messages(receiver, relay):
    mx = receiver()
    r = relay(port=mx.port, destination_concurrency=1)
    for i in range(3):
        r.add("alice@sender.test", ["bob@good.test"], MESSAGE.replace(b"Hello", b"M%d" % i))
    await until(lambda: len(mx.messages) == 3, what="three deliveries")
    assert len(mx.sessions) == 1


@pytest_twisted.ensureDeferred
async def test_a_destination_gets_at_most_its_concurrency_in_connections(receiver, relay):
    mx = receiver()
    r = relay(port=mx.port, destination_concurrency=3)
    for i in range(12):
        r.add("alice@sender.test", ["bob@good.test"], MESSAGE.replace(b"Hello", b"M%d" % i))
    await until(lambda: len(mx.messages) == 12, what="twelve deliveries")
    assert 1 <= len(mx.sessions) <= 3


@pytest_twisted.ensureDeferred
async def test_a_permanent_failure_bounces_to_the_sender_with_the_headers(receiver, relay):
    mx = receiver(delivery=RefusingNobody())
    r = relay(port=mx.port)
    message_id = r.add("alice@sender.test", ["nobody@good.test", "bob@good.test"], MESSAGE)
    # bob gets the message; the bounce for nobody goes to alice (MX of sender.test).
    await until(lambda: len(mx.messages) == 2 and r.store.count() == 0, what="bounce")
    original, bounce = mx.messages
    assert [str(x.mailbox) for x in original.envelope.recipients] == ["bob@good.test"]
    assert bounce.envelope.sender is None  # MAIL FROM:<>
    assert [str(x.mailbox) for x in bounce.envelope.recipients] == ["alice@sender.test"]
    report = email.message_from_bytes(bounce.body, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; nobody@good.test" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user here" in status
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "Subject: relayed" in parts[2].get_content()
    assert r.store.load(message_id) is None


@pytest_twisted.ensureDeferred
async def test_a_bounce_is_never_bounced(receiver, relay):
    mx = receiver()
    r = relay(port=mx.port)
    message_id = r.add(None, ["anyone@nullmx.test"], MESSAGE)  # MAIL FROM:<>, null MX
    await until(lambda: r.store.load(message_id) is None, what="the message to go")
    await deferLater(reactor, 0.3, lambda: None)
    assert r.store.count() == 0 and mx.messages == []  # no DSN for a bounce


@pytest_twisted.ensureDeferred
async def test_null_mx_bounces_with_556(receiver, relay):
    mx = receiver()
    r = relay(port=mx.port)
    r.add("alice@sender.test", ["x@nullmx.test"], MESSAGE)
    await until(lambda: mx.messages, what="the bounce")
    status = mx.messages[0].body.decode()
    assert "Status: 5.1.10" in status and "null MX" in status


@pytest_twisted.ensureDeferred
async def test_a_temporary_failure_is_retried_later(receiver, relay):
    class Busy(MemoryDelivery):
        def __init__(self) -> None:
            super().__init__()
            self.refusals = 1

        def mail_from(self, context, sender, params):
            if self.refusals:
                self.refusals -= 1
                return TemporaryFailure("Try later", 451, "4.3.2")
            return None

    mx = receiver(delivery=Busy())
    r = relay(port=mx.port)
    message_id = r.add("alice@sender.test", ["bob@good.test"], MESSAGE)
    await until(lambda: states(r, message_id) == {"bob@good.test": RecipientState.DEFERRED},
                what="the deferral")
    recipient = r.store.load(message_id).recipients[0]
    assert recipient.attempts == 1 and recipient.status == "4.3.2"
    assert recipient.next_attempt_at > time.time() + 200  # the first retry: 5 minutes
    assert r.store.flush(message_id) == 1  # maitred-queue flush
    r.runner.kick()
    await until(lambda: mx.messages, what="the retry")
    await until(lambda: r.store.load(message_id) is None, what="the message to go")


@pytest_twisted.ensureDeferred
async def test_a_smarthost_takes_everything(receiver, relay):
    mx = receiver(tls=False)
    r = relay(port=1, relay_host=RelayHost("127.0.0.1", mx.port))  # MX port 1: unused
    r.add("alice@sender.test", ["bob@good.test", "x@nullmx.test", "y@nowhere.test"], MESSAGE)
    await until(lambda: mx.messages, what="the smarthost's copy")
    assert [str(x.mailbox) for x in mx.messages[0].envelope.recipients] == [
        "bob@good.test", "x@nullmx.test", "y@nowhere.test"]


# --- MTA-STS (RFC 8461) ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mta_sts_enforce_delivers_over_verified_tls(receiver, relay, policies):
    mx = receiver()
    r = relay(port=mx.port, policy_server=policies)
    r.add("alice@sender.test", ["bob@sts.test"], MESSAGE)
    await until(lambda: mx.messages, what="delivery")
    assert mx.messages[0].envelope.session.tls
    assert policies.requests["mta-sts.sts.test"] == 1
    assert _sessions(r, "sts.test") == (1, 0)  # RFC 8460: the session counted


def _sessions(r, domain: str) -> tuple[int, int]:
    """The TLS report's successful and failed session counts for *domain*."""
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    rendered = r.mta_sts.report.render(domain, organization="o", contact="c",
                                       report_id="r", start=now, end=now)
    summaries = [p["summary"] for p in rendered["policies"]]
    return (sum(s["total-successful-session-count"] for s in summaries),
            sum(s["total-failure-session-count"] for s in summaries))


@pytest_twisted.ensureDeferred
async def test_mta_sts_enforce_keeps_mail_for_an_unlisted_mx(receiver, relay, policies):
    mx = receiver()
    r = relay(port=mx.port, policy_server=policies)
    recipient = await deferred(r, "bob@bad-sts.test")
    assert recipient.status == "4.7.5" and "MTA-STS" in recipient.diagnostic
    assert mx.messages == []
    assert ResultType.VALIDATION_FAILURE in {
        f.result_type for f in r.mta_sts.report.failures("bad-sts.test")}


@pytest_twisted.ensureDeferred
async def test_mta_sts_enforce_keeps_mail_when_the_certificate_does_not_match(
        receiver, relay, policies):
    mx = receiver()
    r = relay(port=mx.port, policy_server=policies)
    recipient = await deferred(r, "bob@wrongcert.test")
    assert recipient.status == "4.7.5" and "mx.wrongcert.test" in recipient.diagnostic
    assert mx.messages == []


@pytest_twisted.ensureDeferred
async def test_mta_sts_testing_reports_but_delivers(receiver, relay, policies):
    mx = receiver()
    r = relay(port=mx.port, policy_server=policies)
    r.add("alice@sender.test", ["bob@testing.test"], MESSAGE)
    await until(lambda: mx.messages, what="delivery")
    kinds = {f.result_type for f in r.mta_sts.report.failures("testing.test")}
    assert ResultType.VALIDATION_FAILURE in kinds
    assert _sessions(r, "testing.test")[0] == 0  # delivered, but not over verified TLS


@pytest_twisted.ensureDeferred
async def test_dkim_signed_on_the_way_out(receiver, relay, tmp_path, dns):
    """--dkim-key: the copy the MX receives carries a signature our verifier accepts
    with the key published in DNS (here: checked directly against the public key)."""
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from maitred_tx.auth.sign import Signer, load_key

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "dkim.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    dkim_key = load_key("sel", "sender.test", str(path))
    mx = receiver()
    r = relay(port=mx.port, signer=Signer([dkim_key]))
    r.add("alice@sender.test", ["bob@good.test"], MESSAGE)
    await until(lambda: mx.messages, what="delivery")
    body = mx.messages[0].body
    assert body.startswith(b"DKIM-Signature: ") and body.endswith(MESSAGE)
    record = dkim_key.dns_record.encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"sel._domainkey.sender.test."
        return record

    assert dkim.verify(body, dnsfunc=dnsfunc)



# --- error paths and fairness ---------------------------------------------------------


class SlowFor(MemoryDelivery):
    """Answers DATA *seconds* late for messages to *domain*: a slow destination."""

    def __init__(self, domain: str, seconds: float) -> None:
        super().__init__()
        self.domain, self.seconds = domain, seconds

    def open_message(self, envelope: Any) -> Any:
        sink = super().open_message(envelope)
        if any(rc.mailbox.domain == self.domain for rc in envelope.recipients):
            close = sink.close
            sink.close = lambda: deferLater(reactor, self.seconds, close)  # type: ignore
        return sink


def to(mx, domain: str) -> int:
    return sum(any(rc.mailbox.domain == domain for rc in m.envelope.recipients)
               for m in mx.messages)


@pytest_twisted.ensureDeferred
async def test_a_slow_destination_does_not_hold_back_new_mail_for_another(receiver, relay):
    """A run used to wait for every delivery it started: mail queued meanwhile for a
    fast destination waited behind the slow one's whole backlog."""
    mx = receiver(delivery=SlowFor("sts.test", 1.0))
    r = relay(port=mx.port)
    for i in range(3):
        r.add("alice@sender.test", ["bob@sts.test"], MESSAGE.replace(b"Hello", b"S%d" % i))
    await deferLater(reactor, 0.3, lambda: None)  # the slow ones are under way
    started = time.monotonic()
    r.add("alice@sender.test", ["bob@good.test"], MESSAGE)
    await until(lambda: to(mx, "good.test"), what="the fast destination's message")
    assert time.monotonic() - started < 0.9
    assert to(mx, "sts.test") <= 1  # the slow backlog was still being sent
    await until(lambda: to(mx, "sts.test") == 3, what="the slow backlog")


@pytest_twisted.ensureDeferred
async def test_messages_waiting_for_their_destination_hold_no_delivery_place(
        receiver, relay):
    """With 2 places, 3 messages for one (slow) destination used to fill both places,
    one of them only waiting for the destination's turn: the other destination's
    message, in the same run, waited for the slow ones."""
    from maitred_tx.queue.store import QueuedRecipient, QueueEnvelope

    mx = receiver(delivery=SlowFor("sts.test", 1.0))
    r = relay(port=mx.port, concurrency=2)
    for address in ("bob@sts.test", "carol@sts.test", "dave@sts.test", "bob@good.test"):
        r.store.add(QueueEnvelope("alice@sender.test", (QueuedRecipient(address),)),
                    [MESSAGE])
    started = time.monotonic()
    r.runner.kick()  # one run finds all four
    await until(lambda: to(mx, "good.test"), what="the fast destination's message")
    assert time.monotonic() - started < 0.9
    await until(lambda: to(mx, "sts.test") == 3, what="the slow ones")


@pytest_twisted.ensureDeferred
async def test_an_envid_the_client_will_not_send_does_not_stick_the_message(
        receiver, relay):
    """Our server takes ENVID=a+20b (a space); the client refuses to send an ENVID with
    a space.  That ValueError escaped the sender: the message was never recorded, the
    runner retried it at once, forever, leaking one connection each time."""
    mx = receiver()
    r = relay(port=mx.port)
    message_id = r.add("alice@sender.test", ["bob@good.test"], MESSAGE, envid="a b")
    await until(lambda: r.store.load(message_id) is None, what="the message to go")
    assert len(mx.messages) == 1 and len(mx.sessions) == 1


@pytest_twisted.ensureDeferred
async def test_a_message_finished_owing_nothing_leaves_by_its_record(receiver, relay):
    """The attempt that makes every recipient final, with no DSN owed, is recorded as
    the message's durable removal: its envelope is written once (the commit), never
    rewritten.  One that owes a bounce is recorded, bounced, settled, then removed."""

    mx = receiver(delivery=RefusingNobody())
    r = relay(port=mx.port)
    written: list[str] = []
    real = r.store._write_env

    def counting(message: Any) -> None:
        written.append(message.id)
        real(message)

    r.store._write_env = counting  # type: ignore[method-assign]
    delivered = r.add("alice@sender.test", ["bob@good.test"], MESSAGE)
    bounced = r.add("alice@sender.test", ["nobody@good.test"], MESSAGE)
    await until(lambda: len(mx.messages) == 2 and r.store.count() == 0, what="both done")
    assert written.count(delivered) == 1  # the commit only
    assert written.count(bounced) == 3  # the commit, the failure, the bounce settled
    assert r.store.ids() == []


@pytest_twisted.ensureDeferred
async def test_a_failing_record_does_not_resend_in_a_loop(receiver, relay):
    """The envelope cannot be rewritten (a full disk): the message was due at once
    again, and went to the destination again and again, as fast as it answered.  Once
    the disk is back, the results kept in memory are recorded: no second copy."""
    import errno

    from maitred_tx.queue.schedule import RetryPolicy

    mx = receiver()
    r = relay(port=mx.port, policy=RetryPolicy(first=1.5))
    store = r.store
    real = store.record_attempt
    failures = []

    def full(*args: Any, **kwargs: Any) -> Any:
        failures.append(args[0])
        raise OSError(errno.ENOSPC, "No space left on device")

    store.record_attempt = full  # type: ignore[method-assign]
    message_id = r.add("alice@sender.test", ["bob@good.test"], MESSAGE)
    await until(lambda: failures, what="the failed record")
    await deferLater(reactor, 0.8, lambda: None)
    assert len(mx.messages) == 1 and len(failures) == 1
    store.record_attempt = real  # type: ignore[method-assign]
    assert store.load(message_id) is not None  # still queued: retried later
    await until(lambda: store.load(message_id) is None, what="the record and removal")
    assert len(mx.messages) == 1


@pytest_twisted.ensureDeferred
async def test_a_body_that_cannot_be_read_closes_the_connection(receiver, relay):
    """The stored body fails to read (EIO): the error leaves the sender with its
    connection dropped (it used to stay open, neither cached nor closed), and the
    recipient is deferred - retried later, given up in time - rather than the message
    retried at once, in a loop, and never bounced."""
    import errno

    mx = receiver()
    r = relay(port=mx.port)
    reads = []

    class Unreadable:
        def read(self, size: int = -1) -> bytes:
            reads.append(size)
            raise OSError(errno.EIO, "Input/output error")

        def close(self) -> None:
            pass

    r.queue.open_body = lambda message_id: succeed(Unreadable())  # type: ignore
    message_id = r.add("alice@sender.test", ["bob@good.test"], MESSAGE)
    await until(lambda: reads, what="the failed read")
    await until(lambda: mx.sessions and mx.sessions[0].transport.disconnected,
                timeout=3.0, what="the connection to close")
    await deferLater(reactor, 0.5, lambda: None)
    assert len(mx.sessions) == 1 and mx.messages == []
    [bob] = r.store.load(message_id).recipients
    assert (bob.state, bob.status) == (RecipientState.DEFERRED, "4.3.0")
    assert "Input/output error" in bob.diagnostic and bob.next_attempt_at > time.time()


@pytest_twisted.ensureDeferred
async def test_the_bounce_is_read_and_built_off_the_reactor_thread(receiver, relay,
                                                                    monkeypatch):
    """A RET=FULL bounce reads up to 1 MiB of the stored message and scans it: in a
    thread, not on the reactor thread (where it used to be)."""
    import threading

    from maitred_tx.relay import runner as runner_module

    threads = []
    for name in ("read_original", "build_dsn"):
        real = getattr(runner_module, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            threads.append((_name, threading.get_ident()))
            return _real(*args, **kwargs)

        monkeypatch.setattr(runner_module, name, spy)
    mx = receiver()
    r = relay(port=mx.port)
    r.add("alice@sender.test", ["x@nullmx.test"], MESSAGE)
    await until(lambda: mx.messages, what="the bounce")
    reactor_thread = threading.get_ident()
    assert [n for n, _ in threads] == ["read_original", "build_dsn"]
    assert all(t != reactor_thread for _, t in threads)


@pytest_twisted.ensureDeferred
async def test_stopping_waits_for_the_transaction_under_way_only(receiver, relay):
    """Stopped while one message is being sent and 150 wait for their destination's
    turn: the stop waits for the one (a run used to wait for all of them), the others
    stay queued, untouched, and nothing fails on the way out.  (Each waiter, resumed
    inside the previous one's release, used to nest: 150 of them exceeded the
    recursion limit, and the stop never ended.)"""
    from twisted.logger import globalLogPublisher

    from maitred_tx.queue.store import QueuedRecipient, QueueEnvelope

    mx = receiver(delivery=SlowFor("sts.test", 1.0))
    r = relay(port=mx.port)
    envelope = QueueEnvelope("alice@sender.test", (QueuedRecipient("bob@sts.test"),))
    r.store.sync = False  # 150 messages, quickly: durability is not the point here
    ids = [r.store.add(envelope, [MESSAGE]) for _ in range(150)]
    r.runner.kick()
    await until(lambda: mx.sessions, what="the first in flight")
    await deferLater(reactor, 0.3, lambda: None)  # the others are loaded and waiting
    errors: list[Any] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_level") is not None and event["log_level"].name in (
                "error", "critical"):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        started = time.monotonic()
        stopped = r.runner.stopService()
        await until(lambda: stopped.called, timeout=5.0, what="the stop")
        took = time.monotonic() - started
    finally:
        globalLogPublisher.removeObserver(observer)
    assert took < 1.8 and errors == []
    assert len(mx.messages) == 1
    left = [r.store.load(i) for i in ids]
    assert sum(m is None for m in left) == 1
    assert all(m.recipients[0].attempts == 0 for m in left if m is not None)



def test_a_connection_gone_before_mail_counts_as_stale() -> None:
    """What makes the sender retry once on a new connection (a reused one the server
    had closed): the connection lost before MAIL was answered, and nothing else."""
    from maitred_tx.client import ConnectionLost, SendResult, ServerRefused
    from maitred_tx.client.replies import ServerReply
    from maitred_tx.relay.results import stale as _stale

    lost = ConnectionLost("gone", host="mx")
    ok = ServerReply(250, "2.1.0", ("ok",))
    assert _stale(lost)
    assert _stale(SendResult((), None, None, error=lost))
    assert not _stale(SendResult((), ok, None, error=lost))  # MAIL was answered
    assert not _stale(SendResult((), None, None, error=ServerRefused("no", host="mx")))
    assert not _stale(None)


@pytest_twisted.ensureDeferred
async def test_send_to_domains_without_a_queue(receiver, policies, dns, ca):
    """The client used straight to the recipients' domains: MX routing and MTA-STS
    (enforce: verified TLS; an unlisted MX: refused and temporary), no queue."""
    from mta_sts_support import make_fetcher

    from maitred_tx.mta_sts import PolicyStore
    from maitred_tx.relay.direct import send_to_domains

    mx = receiver()
    resolver = dns.resolver()
    store = PolicyStore(reactor, resolver, make_fetcher(reactor, ca, policies))
    results = await send_to_domains(
        reactor, resolver, "alice@sender.test",
        ["bob@sts.test", "carol@bad-sts.test", "dave@nullmx.test"], MESSAGE,
        helo="relay.test", mta_sts=store, trust_root=ca.trust_root(), port=mx.port)
    assert results["bob@sts.test"].state in (RecipientState.DELIVERED,
                                             RecipientState.RELAYED)
    assert (results["carol@bad-sts.test"].state, results["carol@bad-sts.test"].status) == (
        RecipientState.DEFERRED, "4.7.5")
    assert (results["dave@nullmx.test"].state, results["dave@nullmx.test"].status) == (
        RecipientState.FAILED, "5.1.10")
    [got] = mx.messages
    assert got.body == MESSAGE and got.envelope.session.tls
    assert [str(x.mailbox) for x in got.envelope.recipients] == ["bob@sts.test"]


@pytest_twisted.ensureDeferred
async def test_the_refresh_runs_on_its_period_and_survives_an_error(receiver, relay):
    """tap passes the MTA-STS store's refresh_cached (RFC 8461 3.3: refresh policies
    proactively): it runs every refresh_every seconds; one that raises is logged and
    the next one still runs.  Stopping the runner stops it."""
    calls: list[float] = []

    async def refresh() -> None:
        calls.append(reactor.seconds())
        if len(calls) == 1:
            raise OSError("the policy cache's disk is full")

    mx = receiver(tls=False)
    r = relay(port=mx.port, refresh=refresh, refresh_every=0.05)
    await until(lambda: len(calls) >= 3, what="three refreshes")
    assert calls[1] - calls[0] >= 0.04  # on its period, not in a loop after the error
    stopped = r.runner.stopService()
    if stopped is not None:
        await stopped
    count = len(calls)
    await deferLater(reactor, 0.2, lambda: None)
    assert len(calls) == count
