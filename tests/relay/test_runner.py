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
from twisted.internet import reactor
from twisted.internet.task import deferLater

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.mta_sts.report import ResultType
from maitred_tx.outcomes import TemporaryFailure
from maitred_tx.queue.store import RecipientState
from maitred_tx.relay.route import RelayHost

MESSAGE = b"From: alice@sender.test\r\nTo: bob@good.test\r\nSubject: relayed\r\n\r\nHello.\r\n"


async def until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


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
    class Refusing(MemoryDelivery):
        def rcpt_to(self, context, envelope, recipient, params):
            if recipient.local_part == "nobody":
                from maitred_tx.outcomes import PermanentFailure

                return PermanentFailure("No such user here", 550, "5.1.1")
            return None

    mx = receiver(delivery=Refusing())
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




def test_a_connection_gone_before_mail_counts_as_stale() -> None:
    """What makes the sender retry once on a new connection (a reused one the server
    had closed): the connection lost before MAIL was answered, and nothing else."""
    from maitred_tx.client import ConnectionLost, SendResult, ServerRefused
    from maitred_tx.client.replies import ServerReply
    from maitred_tx.relay.sender import _stale

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
