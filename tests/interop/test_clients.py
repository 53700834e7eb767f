"""Real clients against a real socket: smtplib, Twisted's ESMTPSender, swaks and
Postfix's smtp-source.  What they send must arrive byte for byte."""

from __future__ import annotations

import random
import smtplib
from email.message import EmailMessage
from pathlib import Path

import pytest_twisted
from maitred_interop import Client, config, message_files, require, split_trace
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.mail.smtp import sendmail as twisted_sendmail

from maitred_tx.delivery.maildir import MaildirDelivery
from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.outcomes import Accepted, TemporaryFailure
from maitred_tx.smtp.config import Config, Mode

MESSAGE = (
    b"From: a@b.org\r\n"
    b"To: user@localhost\r\n"
    b"Subject: interop\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".A line that starts with a dot (stuffed by the client, unstuffed by us).\r\n"
    b"..two dots\r\n"
    b"\xc3\xa9t\xc3\xa9 in 8 bits\r\n"
)


def smtp(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)


@pytest_twisted.ensureDeferred
async def test_smtplib_plain_send(serve):
    server = serve()

    def send() -> dict:
        with smtp(server.port) as s:
            return s.sendmail("a@b.org", ["user@localhost"], MESSAGE)

    assert await deferToThread(send) == {}
    [stored] = server.messages
    assert stored.body == MESSAGE
    assert str(stored.envelope.sender) == "a@b.org"
    assert [str(r.mailbox) for r in stored.envelope.recipients] == ["user@localhost"]
    assert stored.envelope.session.helo == "client.test"
    assert stored.envelope.session.esmtp


@pytest_twisted.ensureDeferred
async def test_smtplib_several_recipients_one_refused(serve):
    server = serve()

    def send() -> dict:
        with smtp(server.port) as s:
            return s.sendmail(
                "a@b.org", ["one@localhost", "x@example.org", "two@LOCALHOST"], MESSAGE
            )

    refused = await deferToThread(send)
    assert refused == {"x@example.org": (550, b"5.7.1 Relaying denied")}
    [stored] = server.messages  # one copy for every accepted recipient
    assert [str(r.mailbox) for r in stored.envelope.recipients] == [
        "one@localhost",
        "two@localhost",
    ]
    assert stored.body == MESSAGE


@pytest_twisted.ensureDeferred
async def test_smtplib_smtputf8_sendmail(serve):
    server = serve()
    body = "From: a@b.org\r\nTo: δοκιμή@localhost\r\n\r\nΚαλημέρα\r\n".encode()  # noqa: RUF001

    def send() -> tuple[bool, dict]:
        with smtp(server.port) as s:
            s.ehlo()
            advertised = s.has_extn("smtputf8")
            return advertised, s.sendmail(
                "a@b.org", ["δοκιμή@localhost"], body, mail_options=["SMTPUTF8"]
            )

    assert await deferToThread(send) == (True, {})
    [stored] = server.messages
    assert stored.envelope.params.smtputf8
    assert stored.envelope.recipients[0].mailbox.local_part == "δοκιμή"
    assert stored.body == body


@pytest_twisted.ensureDeferred
async def test_smtplib_send_message_utf8_addresses(serve):
    server = serve()
    msg = EmailMessage()
    msg["From"] = "José <josé@example.org>"
    msg["To"] = "Jürgen <jürgen@localhost>"
    msg["Subject"] = "ünïcode"
    msg.set_content("Grüße\n")

    def send() -> dict:
        with smtp(server.port) as s:
            return s.send_message(msg)  # sees non-ASCII addresses: MAIL ... SMTPUTF8

    assert await deferToThread(send) == {}
    [stored] = server.messages
    assert stored.envelope.params.smtputf8
    assert str(stored.envelope.sender) == "josé@example.org"
    assert str(stored.envelope.recipients[0].mailbox) == "jürgen@localhost"
    assert "Grüße".encode() in stored.body or b"Gr=C3=BC=C3=9Fe" in stored.body


@pytest_twisted.ensureDeferred
async def test_smtplib_utf8_recipient_without_smtputf8_is_refused(serve):
    server = serve()

    def send() -> None:
        with smtp(server.port) as s:
            s.ehlo()
            assert s.mail("a@b.org") == (250, b"2.1.0 Sender OK")
            s.command_encoding = "utf-8"  # send the raw UTF-8 without declaring it
            code, text = s.rcpt("δοκιμή@localhost")
            assert (code, text[:5]) == (553, b"5.6.7")

    await deferToThread(send)
    assert server.messages == []


@pytest_twisted.ensureDeferred
async def test_twisted_esmtp_sender(serve):
    server = serve()
    # ESMTPSender takes the message with LF line ends and sends CRLF (it would turn a
    # CRLF into CR CR LF).
    result = await twisted_sendmail(
        "127.0.0.1",
        "a@b.org",
        ["user@localhost", "other@localhost"],
        MESSAGE.replace(b"\r\n", b"\n"),
        port=server.port,
        reactor=reactor,
    )
    accepted, per_recipient = result
    assert accepted == 2
    assert [(addr, code) for addr, code, _ in per_recipient] == [
        (b"user@localhost", 250),
        (b"other@localhost", 250),
    ]
    [stored] = server.messages
    assert stored.body == MESSAGE
    assert len(stored.envelope.recipients) == 2


async def _swaks(port: int, *args: str) -> tuple[str, int]:
    swaks = require("swaks")
    out, err, code = await getProcessOutputAndValue(
        swaks,
        [
            *f"--server 127.0.0.1 --port {port} --from a@b.org --helo client.test".split(),
            *["--timeout", "10", *args],
        ],
        env={"PATH": "/usr/bin:/bin"},
    )
    return (out + err).decode("utf-8", "replace"), code


@pytest_twisted.ensureDeferred
async def test_swaks_pipeline_into_maildir(serve, tmp_path: Path):
    server = serve(config(), MaildirDelivery(tmp_path, reactor))
    data = (
        "From: a@b.org\r\nTo: user@localhost\r\nSubject: swaks\r\n\r\n"
        "first line\r\n.leading dot\r\nlast line\r\n"
    )
    transcript, code = await _swaks(
        server.port, "--to", "user@localhost", "--pipeline", "--data", data
    )
    assert code == 0, transcript
    assert "250 2.0.0 OK: message accepted" in transcript
    [path] = message_files(tmp_path / "localhost" / "user")
    fields, body = split_trace(path.read_bytes())
    assert fields[0] == b"Return-Path: <a@b.org>"
    assert fields[1] == b"Delivered-To: user@localhost"
    assert fields[2].startswith(b"Received: from client.test ([127.0.0.1])")
    assert b"by mx.test (maitred_tx) with ESMTP" in fields[2]
    assert body == data.encode() + b"\r\n"  # swaks ends the data with one more CRLF


@pytest_twisted.ensureDeferred
async def test_swaks_attachment_into_maildir(serve, tmp_path: Path):
    server = serve(config(), MaildirDelivery(tmp_path / "mail", reactor))
    attachment = tmp_path / "blob.bin"
    attachment.write_bytes(bytes(range(256)) * 64)
    transcript, code = await _swaks(
        server.port,
        *["--to", "user@localhost,other@localhost", "--attach", f"@{attachment}"],
        *["--body", "see attachment", "--pipeline"],
    )
    assert code == 0, transcript
    import base64
    import email
    import email.policy

    for user in ("user", "other"):
        [path] = message_files(tmp_path / "mail" / "localhost" / user)
        fields, body = split_trace(path.read_bytes())
        assert fields[1] == f"Delivered-To: {user}@localhost".encode()
        message = email.message_from_bytes(body, policy=email.policy.default)
        parts = [p for p in message.walk() if p.get_filename() == "blob.bin"]
        assert len(parts) == 1
        assert parts[0].get_content() == attachment.read_bytes()
        assert base64.b64encode(attachment.read_bytes())[:76] in body


@pytest_twisted.ensureDeferred
async def test_smtp_source_100_messages(serve):
    smtp_source = require("smtp-source")
    server = serve()
    load = ["-s", "5", "-m", "100", "-l", "2048"]  # 5 sessions, 100 messages of 2 kB
    envelope = ["-f", "a@b.org", "-t", "user@localhost"]
    out, err, code = await getProcessOutputAndValue(
        smtp_source,
        [*load, *envelope, f"127.0.0.1:{server.port}"],
        env={"PATH": "/usr/bin:/bin:/usr/sbin"},
    )
    assert code == 0, (out, err)
    assert len(server.messages) == 100
    for stored in server.messages:
        assert str(stored.envelope.sender) == "a@b.org"
        assert [str(r.mailbox) for r in stored.envelope.recipients] == ["user@localhost"]
        assert len(stored.body) >= 2048
    # Every session ended cleanly.  smtp-source exits once it has the 221; the server
    # sees the close a reactor turn or more later (under load, after the exit).
    for _ in range(100):
        if server.factory.connections == set():
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert server.factory.connections == set()


@pytest_twisted.ensureDeferred
async def test_smtplib_smtputf8_into_maildir(serve, tmp_path: Path):
    server = serve(config(), MaildirDelivery(tmp_path, reactor))
    body = "Subject: ünïcode\r\n\r\nGrüße\r\n".encode()

    def send() -> dict:
        with smtp(server.port) as s:
            return s.sendmail("josé@example.org", ["Jürgen@localhost"], body, ["SMTPUTF8"])

    assert await deferToThread(send) == {}
    [path] = message_files(tmp_path / "localhost" / "jürgen")
    fields, stored = split_trace(path.read_bytes())
    assert fields[0] == "Return-Path: <josé@example.org>".encode()
    assert fields[1] == "Delivered-To: Jürgen@localhost".encode()
    assert b" with UTF8SMTP id " in fields[2]
    assert stored == body


@pytest_twisted.ensureDeferred
async def test_smtplib_large_message_with_dots_survives_segmentation(serve):
    server = serve()
    rng = random.Random(5321)
    alphabet = bytes(b"ab.\t "[i % 5] for i in range(256))
    text = rng.randbytes(4_500_000).translate(alphabet)  # dots everywhere
    cuts = sorted(rng.sample(range(1, len(text)), 60_000))  # lines of 0..~150 octets
    lines = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    lines[::7] = [b"." + line for line in lines[::7]]  # more lines that start with "."
    message = b"Subject: large\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    assert len(message) > 4_000_000

    def send() -> dict:
        with smtp(server.port) as s:
            return s.sendmail("a@b.org", ["user@localhost"], message)

    assert await deferToThread(send) == {}
    [stored] = server.messages
    assert stored.body == message


class PerRecipient(MemoryDelivery):
    """LMTP: every recipient called 'full' gets its own 452 at the end of data."""

    def open_message(self, envelope):
        sink = super().open_message(envelope)
        close = sink.close

        def per_recipient():
            close()
            return [
                TemporaryFailure("Mailbox full", 452, "4.2.2")
                if r.mailbox.local_part == "full"
                else Accepted()
                for r in envelope.recipients
            ]

        sink.close = per_recipient
        return sink


@pytest_twisted.ensureDeferred
async def test_smtplib_lmtp(serve):
    server = serve(Config(hostname="mx.test", mode=Mode.LMTP), PerRecipient())

    def send() -> tuple[dict, list[tuple[int, str | None]]]:
        with smtplib.LMTP("127.0.0.1", server.port, local_hostname="client.test") as s:
            refused = s.sendmail("a@b.org", ["user@localhost"], MESSAGE)
        with Client(server.port) as c:
            assert c.reply().code == 220
            assert c.command("LHLO client.test").code == 250
            c.send(
                b"MAIL FROM:<a@b.org>\r\nRCPT TO:<one@localhost>\r\n"
                b"RCPT TO:<full@localhost>\r\nRCPT TO:<two@localhost>\r\nDATA\r\n"
            )
            assert [r.code for r in c.replies(5)] == [250, 250, 250, 250, 354]
            c.send(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n")
            return refused, [(r.code, r.status) for r in c.rest()]

    refused, replies = await deferToThread(send)
    assert refused == {}
    # RFC 2033 4.2: one reply per accepted recipient, in RCPT order.
    assert replies == [(250, "2.0.0"), (452, "4.2.2"), (250, "2.0.0"), (221, "2.0.0")]
    assert [m.body for m in server.messages] == [MESSAGE, MESSAGE]
