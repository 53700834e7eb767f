"""The client against a real MTA: a throw-away Postfix smtpd on loopback (see
postfix_support.py), with PIPELINING, CHUNKING, STARTTLS, SMTPUTF8 and a recipient it
refuses.  What Postfix logged (its per-session command counts, its TLS line) and what
it delivered (a pipe transport writes each message to a file) are the proof."""

from __future__ import annotations

import pytest
import pytest_twisted
from postfix_support import postfix_instance
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from maitred_tx.client import Outcome, SMTPClient, TLSMode


@pytest.fixture(scope="module")
def postfix():
    with postfix_instance() as instance:
        yield instance


async def connect(port: int, **kw) -> SMTPClient:
    kw.setdefault("tls", TLSMode.NONE)
    return await SMTPClient.connect(reactor, f"tcp:127.0.0.1:{port}", helo="client.test", **kw)


def stored_body(message: bytes) -> bytes:
    """The body of a message as the pipe transport wrote it (LF line ends)."""
    return message.split(b"\n\n", 1)[1]


@pytest_twisted.ensureDeferred
async def test_pipelining_and_chunking(postfix, recording_proxy):
    wire = recording_proxy(postfix.port)
    client = await connect(wire.port)
    ext = client.extensions
    assert ext.pipelining and ext.chunking and ext.starttls and ext.max_size == 10240000
    body = b"Subject: chunks\r\nX-Test: pipelining\r\n\r\n.dot line\r\nlast line\r\n"
    result = await client.send("pipelining@client.test",
                               ["a@pfx.test", "refused@pfx.test", "b@elsewhere.test"], body)
    await client.quit()
    assert [(r.recipient, r.outcome, r.reply.code, r.reply.status)
            for r in result.recipients] == [
        ("a@pfx.test", Outcome.DELIVERED, 250, "2.0.0"),
        ("refused@pfx.test", Outcome.PERMANENT, 550, "5.1.1"),
        ("b@elsewhere.test", Outcome.DELIVERED, 250, "2.0.0")]
    batch = wire.read_with(b"MAIL FROM:<pipelining@client.test>")
    assert batch.startswith(b"MAIL FROM:") and batch.count(b"RCPT TO:") == 3
    assert batch.endswith(b"BDAT %d LAST\r\n" % len(body) + body)  # one read, body included
    session = await deferToThread(postfix.session, "pipelining@client.test")
    assert "rcpt=2/3 bdat=1 quit=1" in session[-1], session[-1]
    stored = await deferToThread(postfix.delivered, b"X-Test: pipelining")
    assert stored_body(stored) == b".dot line\nlast line\n"  # BDAT: no dot-stuffing


@pytest_twisted.ensureDeferred
async def test_starttls_verified_and_several_messages(postfix):
    client = await connect(postfix.port, tls=TLSMode.REQUIRED, tls_hostname="localhost",
                           trust_root=str(postfix.certs.cert))
    assert client.tls and not client.extensions.starttls
    for n in range(3):
        result = await client.send("tls@client.test", [f"t{n}@pfx.test"],
                                   b"Subject: tls %d\r\nX-Test: tls-%d\r\n\r\nhi\r\n" % (n, n))
        assert result.all_delivered
    await client.quit()
    session = await deferToThread(postfix.session, "tls@client.test")
    assert any("TLS connection established from localhost" in line for line in session)
    assert "starttls=1 mail=3 rcpt=3 bdat=3 quit=1" in session[-1], session[-1]
    for n in range(3):
        await deferToThread(postfix.delivered, b"X-Test: tls-%d" % n)


@pytest_twisted.ensureDeferred
async def test_data_with_dot_stuffing_pipelined(postfix, recording_proxy):
    wire = recording_proxy(postfix.port)
    client = await connect(wire.port, chunking=False)
    body = b"Subject: dots\r\nX-Test: dots\r\n\r\n.\r\n..two\r\n.three\r\nend"
    result = await client.send("dots@client.test", ["d@pfx.test"], body)
    await client.quit()
    assert result.all_delivered
    batch = wire.read_with(b"MAIL FROM:<dots@client.test>")
    assert batch.endswith(b"RCPT TO:<d@pfx.test>\r\nDATA\r\n")
    assert any(r.endswith(b"\r\n..\r\n...two\r\n..three\r\nend\r\n.\r\n") for r in wire.reads)
    session = await deferToThread(postfix.session, "dots@client.test")
    assert "mail=1 rcpt=1 data=1 quit=1" in session[-1], session[-1]
    stored = await deferToThread(postfix.delivered, b"X-Test: dots")
    assert stored_body(stored) == b".\n..two\n.three\nend\n"


@pytest_twisted.ensureDeferred
async def test_smtputf8(postfix):
    client = await connect(postfix.port)
    result = await client.send("utf8@client.test", ["jörg@pfx.test"],
                               "Subject: grüße\r\nX-Test: utf8\r\n\r\nÄ\r\n".encode())
    await client.quit()
    assert result.all_delivered
    stored = await deferToThread(postfix.delivered, b"X-Test: utf8")
    assert "Ä".encode() in stored
    line = await deferToThread(postfix.log_line, "to=<jörg@pfx.test>")
    assert "status=sent" in line
