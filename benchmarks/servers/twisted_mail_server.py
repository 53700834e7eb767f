"""twisted.mail.smtp peer: an accept-all IMessageDelivery that counts and discards.

Run as ``python benchmarks/servers/twisted_mail_server.py --port N [--stats FILE]``.  It
listens on 127.0.0.1 only, prints ``READY`` on stdout once listening, and on SIGTERM or
SIGINT writes ``{"messages": n, "bytes": b}`` to the stats file before exiting.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.mail import smtp
from zope.interface import implementer


class Counter:
    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0


@implementer(smtp.IMessage)
class CountingMessage:
    """Counts the bytes of one message (lines arrive without CRLF) and drops them."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.size = 0

    def lineReceived(self, line: bytes) -> None:
        self.size += len(line) + 2

    def eomReceived(self) -> defer.Deferred[None]:
        self.counter.messages += 1
        self.counter.bytes += self.size
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class AcceptAllDelivery:
    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], CountingMessage]:
        return lambda: CountingMessage(self.counter)


class QuietESMTP(smtp.ESMTP):
    noisy = False


class DeliveryFactory(smtp.SMTPFactory):
    protocol = QuietESMTP
    domain = b"localhost"
    noisy = False

    def __init__(self, counter: Counter) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.counter = counter

    def buildProtocol(self, addr: Any) -> smtp.SMTP:
        proto: smtp.SMTP = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        proto.delivery = AcceptAllDelivery(self.counter)
        return proto


class CountingFactory(protocol.Factory):
    """The reference servers' factory: ``protocol_class(counter)`` per connection."""

    noisy = False
    protocol_class: Callable[[Counter], protocol.Protocol]

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.protocol_class(self.counter)


def main(make_factory: Callable[[Counter], Any] = DeliveryFactory) -> None:
    """Serve on 127.0.0.1 (also for the reference servers, twisted_floor_server.py and
    twisted_fused_server.py)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats", type=Path, default=None)
    args = parser.parse_args()
    counter = Counter()
    tcp: Any = reactor  # the global reactor's type is opaque to mypy
    tcp.listenTCP(args.port, make_factory(counter), backlog=1024, interface="127.0.0.1")

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        if args.stats is not None:
            stats = {"messages": counter.messages, "bytes": counter.bytes}
            args.stats.write_text(json.dumps(stats))
        tcp.callFromThread(tcp.stop)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tcp.callWhenRunning(print, "READY", flush=True)
    tcp.run(installSignalHandlers=False)
    sys.exit(0)


if __name__ == "__main__":
    main()
