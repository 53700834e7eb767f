"""A twisted.mail-style delivery for ``twistd maitred --delivery python:...`` tests.

Written the way twisted.mail users write them (IMessageDelivery, IMessage with
lineReceived / eomReceived); each message is stored as
``$MAITRED_INTEROP_OUT/<local part>.<n>.eml`` with LF line ends, as twisted.mail
hands over lines without their CRLF.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from twisted.internet import defer
from twisted.mail.smtp import IMessage, IMessageDelivery, SMTPBadRcpt
from zope.interface import implementer

_counter = itertools.count(1)


@implementer(IMessage)
class FileMessage:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred[Path]:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"\n".join(self.lines) + b"\n")
        tmp.rename(self.path)
        return defer.succeed(self.path)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(IMessageDelivery)
class FileDelivery:
    """Accepts every sender and every recipient but ``nobody``."""

    @property
    def out(self) -> Path:
        return Path(os.environ["MAITRED_INTEROP_OUT"])

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        return b"Received: from " + helo[0] + b" by FileDelivery"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        local = user.dest.local.decode()
        if local == "nobody":
            raise SMTPBadRcpt(user)
        path = self.out / f"{local}.{next(_counter)}.eml"
        return lambda: FileMessage(path)


delivery = FileDelivery()  # --delivery python:maitred_interop_delivery.delivery
