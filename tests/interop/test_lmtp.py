"""LMTP (RFC 2033) over real TCP and UNIX sockets (issue 4): LHLO instead of EHLO/HELO,
one reply per accepted recipient after DATA or BDAT, taken from the delivery's
per-recipient outcomes; smtplib.LMTP (a host starting with "/" is a UNIX socket)."""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest
import pytest_twisted
from maitred_interop import LOCALHOST, Reply
from security_support import mx_config
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent

from maitred_tx.delivery.memory import MemoryDelivery
from maitred_tx.outcomes import Accepted, PermanentFailure, TemporaryFailure
from maitred_tx.smtp.config import Mode

MESSAGE = b"From: a@b.org\r\nSubject: lmtp\r\n\r\nHello.\r\n"


class PerRecipient(MemoryDelivery):
    """'full' gets 452 4.2.2 and 'gone' 550 5.1.1 at the end of data; others 250."""

    def open_message(self, envelope):
        sink = super().open_message(envelope)
        close = sink.close

        def per_recipient():
            close()
            outcomes = {"full": TemporaryFailure("Mailbox full", 452, "4.2.2"),
                        "gone": PermanentFailure("No such mailbox", 550, "5.1.1")}
            return [outcomes.get(r.mailbox.local_part, Accepted())
                    for r in envelope.recipients]

        sink.close = per_recipient
        return sink


class Stream:
    """A raw client over any connected stream socket (TCP or UNIX)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.buf = b""

    def reply(self) -> Reply:
        lines: list[str] = []
        while True:
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(lines)
                self.buf += chunk
                continue
            line, self.buf = self.buf[:nl].decode(), self.buf[nl + 2 :]
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), tuple(lines))

    def codes(self, data: bytes, count: int) -> list[tuple[int, str | None]]:
        self.sock.sendall(data)
        return [(r.code, r.status) for r in (self.reply() for _ in range(count))]


def connect(where: int | Path) -> socket.socket:
    if isinstance(where, Path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(where))
        return s
    return socket.create_connection((LOCALHOST, where), timeout=10)


def lmtp_transcript(where: int | Path) -> dict[str, list[tuple[int, str | None]]]:
    with connect(where) as sock:
        c = Stream(sock)
        out = {"greeting": [(lambda r: (r.code, r.status))(c.reply())]}
        out["ehlo+helo"] = c.codes(b"EHLO client.test\r\nHELO client.test\r\n", 2)
        out["mail before lhlo"] = c.codes(b"MAIL FROM:<a@b.org>\r\n", 1)
        lhlo = c.codes(b"LHLO client.test\r\n", 1)
        out["lhlo"] = lhlo
        out["envelope"] = c.codes(
            b"MAIL FROM:<a@b.org>\r\nRCPT TO:<one@example.com>\r\nRCPT TO:<full@example.com>\r\n"
            b"RCPT TO:<nobody@elsewhere.org>\r\nRCPT TO:<gone@example.com>\r\nDATA\r\n", 6)
        out["data"] = c.codes(MESSAGE + b".\r\n", 3)  # three accepted recipients
        out["bdat envelope"] = c.codes(
            b"MAIL FROM:<a@b.org>\r\nRCPT TO:<two@example.com>\r\nRCPT TO:<full@example.com>\r\n",
            3)
        out["bdat"] = c.codes(b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE, 2)
        out["quit"] = c.codes(b"QUIT\r\n", 1)
        return out


EXPECTED = {
    "greeting": [(220, None)],
    # RFC 2033 4.1: LHLO only; no enhanced codes before it (RFC 2034).
    "ehlo+helo": [(500, None), (500, None)],
    "mail before lhlo": [(503, None)],
    "lhlo": [(250, None)],
    "envelope": [(250, "2.1.0"), (250, "2.1.5"), (250, "2.1.5"), (550, "5.7.1"),
                 (250, "2.1.5"), (354, None)],
    # RFC 2033 4.2: one reply per accepted recipient, in RCPT order, from the outcomes.
    "data": [(250, "2.0.0"), (452, "4.2.2"), (550, "5.1.1")],
    "bdat envelope": [(250, "2.1.0"), (250, "2.1.5"), (250, "2.1.5")],
    "bdat": [(250, "2.0.0"), (452, "4.2.2")],
    "quit": [(221, "2.0.0")],
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_lmtp_per_recipient_replies(service, tmp_path, transport):
    sock = tmp_path / "lmtp.sock"
    endpoint = "tcp:{port}:interface=127.0.0.1" if transport == "tcp" else f"unix:{sock}"
    server = service([(endpoint, mx_config(mode=Mode.LMTP))], delivery=PerRecipient())
    where = server.port if transport == "tcp" else sock
    got = await deferToThread(lmtp_transcript, where)
    for step, expected in EXPECTED.items():
        assert (step, got[step]) == (step, expected)
    first, second = server.messages
    assert [str(r.mailbox) for r in first.envelope.recipients] == [
        "one@example.com", "full@example.com", "gone@example.com"]
    assert first.body == second.body == MESSAGE
    assert first.envelope.session.lmtp and second.envelope.chunked


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_smtplib_lmtp(service, tmp_path, transport):
    sock = tmp_path / "lmtp.sock"
    endpoint = "tcp:{port}:interface=127.0.0.1" if transport == "tcp" else f"unix:{sock}"
    server = service([(endpoint, mx_config(mode=Mode.LMTP))], delivery=PerRecipient())

    def send() -> tuple[object, ...]:
        host = str(sock) if transport == "unix" else LOCALHOST
        port = server.port if transport == "tcp" else 0
        with smtplib.LMTP(host, port, local_hostname="client.test", timeout=10) as s:
            code, _ = s.ehlo()  # smtplib.LMTP's ehlo() sends LHLO
            ok = s.sendmail("a@b.org", ["one@example.com"], MESSAGE)
            try:
                s.sendmail("a@b.org", ["full@example.com"], MESSAGE)
            except smtplib.SMTPDataError as e:  # the one recipient's own reply
                failed = (e.smtp_code, e.smtp_error.split()[0])
            else:
                failed = None
            return code, ok, failed

    with capturedLogs() as events:
        code, ok, failed = await deferToThread(send)
    # No error is logged for a UNIX socket (TCP_NODELAY is a TCP option).
    assert [formatEvent(e) for e in events if "log_failure" in e] == []
    assert code == 250 and ok == {}
    assert failed == (452, b"4.2.2")
    assert len(server.messages) == 2
