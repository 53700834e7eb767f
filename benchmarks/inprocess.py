"""The SMTP work alone, in process: maitred_tx's protocol and twisted.mail's fed the same
bytes, with no sockets and no reactor.  It shows what the full benchmark cannot: where in
a connection each one spends its time.  Two more columns are judged by nothing: the
fused reference (servers/twisted_fused_server.py: maitred_tx's checks for these commands
in one class), and the same with what maitred_tx's interfaces cost on top (its
FusedWithInterfaces: context, mailboxes, envelope, the delivery's hooks, the outcome's
reply and the log event).

    python benchmarks/inprocess.py [--quick] [--connections N] [--messages N] [--rounds R]

Two measurements, each the best of R rounds (the round least disturbed by the machine):

- an (e)-like connection, phase by phase.  Each command is its own read, in smtp-source's
  order: connect, HELO, MAIL, RCPT, DATA, the 1 KiB body, QUIT.  Results are µs per
  connection;
- a (b)-like message on one connection, µs per message.  MAIL, RCPT and DATA come in one
  read, the body in the next.  twisted.mail does not offer PIPELINING, and gets the same
  bytes anyway: its LineReceiver takes the lines one by one, with one read fewer per
  message than a client waiting for each reply would cost it.

All of them discard the message.  Nothing is logged: the global log publisher is
started with no observers, for all of them.  Every reply is checked.  A connection or message
that did not get its replies is an error (exit status 1), never a fast sample.
Timings are for comparing them in one run; no test asserts them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadgen import RECIPIENT, SENDER, Message
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import globalLogBeginner

from maitred_tx.delivery.discard import DiscardDelivery
from maitred_tx.server.factory import SMTPFactory
from maitred_tx.smtp.config import Config, Limits
from maitred_tx.testing import TestTransport, parse_replies

SERVERS_DIR = Path(__file__).resolve().parent / "servers"

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
MAIL = f"MAIL FROM:<{SENDER}>\r\n".encode()
RCPT = f"RCPT TO:<{RECIPIENT}>\r\n".encode()
PHASES = ("connect", "HELO", "MAIL", "RCPT", "DATA", "body", "QUIT")
# The replies of one connection, and of one pipelined message, as codes.
CONNECTION_CODES = [220, 250, 250, 250, 354, 250, 221]
MESSAGE_CODES = [250, 250, 354, 250]


class CheckError(Exception):
    """A server did not answer as an accepting server must."""


def factories() -> dict[str, Callable[[], Any]]:
    """A protocol factory per server, each discarding what it accepts."""
    # The twisted.mail peer is a script beside run.py's servers, not a package; it
    # imports Twisted's global reactor, so only when the measurement runs.
    if str(SERVERS_DIR) not in sys.path:
        sys.path.insert(0, str(SERVERS_DIR))
    import twisted_fused_server  # type: ignore[import-not-found]
    import twisted_mail_server  # type: ignore[import-not-found]

    config = Config(
        hostname="localhost",
        local_domains=frozenset({"localhost"}),
        limits=Limits(max_message_size=64 * 1024 * 1024, max_client_connections=0),
    )
    return {
        "maitred_tx": lambda: SMTPFactory(Clock(), config, DiscardDelivery()),
        "twisted.mail": lambda: twisted_mail_server.DeliveryFactory(
            twisted_mail_server.Counter()),
        # Judged by nothing: the same checks fused into one class, and again with what
        # maitred_tx's interfaces cost on top (servers/twisted_fused_server.py).
        "fused ref.": lambda: twisted_fused_server.FusedFactory(
            twisted_mail_server.Counter()),
        "fused+ifaces": lambda: twisted_fused_server.FusedWithInterfacesFactory(
            twisted_mail_server.Counter()),
    }


def _connect(factory: Any) -> tuple[Any, TestTransport]:
    protocol = factory.buildProtocol(PEER)
    transport = TestTransport(PEER)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def check(what: str, output: bytes, expected: Sequence[int]) -> None:
    """Raise CheckError unless *output* holds exactly the *expected* reply codes."""
    try:
        codes = [reply.code for reply in parse_replies(output)]
    except ValueError as e:
        raise CheckError(f"{what}: {e}") from None
    if codes != list(expected):
        raise CheckError(f"{what}: replies {codes}, expected {list(expected)}")


def connection_lines(message: Message) -> list[bytes]:
    return [b"HELO localhost\r\n", MAIL, RCPT, b"DATA\r\n", message.data_wire, b"QUIT\r\n"]


def time_connections(name: str, factory: Any, lines: list[bytes], count: int) -> list[float]:
    """µs per connection in each phase, summed over *count* connections."""
    spent = [0.0] * len(PHASES)
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        protocol, transport = _connect(factory)
        spent[0] += clock() - start
        for phase, line in enumerate(lines, 1):
            start = clock()
            protocol.dataReceived(line)
            spent[phase] += clock() - start
        check(f"{name}, one connection", transport.value(), CONNECTION_CODES)
        if transport.connected:  # the QUIT's 221 came; the server did not close
            raise CheckError(f"{name}: the connection is still open after QUIT")
    return [s / count * 1e6 for s in spent]


def time_messages(name: str, factory: Any, message: Message, count: int) -> float:
    """µs per message, *count* pipelined messages on one connection."""
    protocol, transport = _connect(factory)
    protocol.dataReceived(b"EHLO localhost\r\n")
    check(f"{name}, greeting and EHLO", transport.value(), [220, 250])
    transport.clear()
    commands = MAIL + RCPT + b"DATA\r\n"
    body = message.data_wire
    start = time.perf_counter()
    for _ in range(count):
        protocol.dataReceived(commands)
        protocol.dataReceived(body)
    spent = time.perf_counter() - start
    check(f"{name}, {count} messages", transport.value(), MESSAGE_CODES * count)
    return spent / count * 1e6


def run(connections: int, messages: int, rounds: int, out: Any = sys.stdout) -> None:
    # Neither server logs: events go to a publisher without observers (as the
    # benchmark's maitred-nolog, and the peers, which log nothing per message).
    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    message = Message.of_size(1024)
    lines = connection_lines(message)
    made = factories()
    for make in made.values():  # warm up both, and check them once before timing
        time_connections("warm-up", make(), lines, 20)
    phases: dict[str, list[float]] = {}
    per_message: dict[str, float] = {}
    for _ in range(rounds):
        for name, make in made.items():
            result = time_connections(name, make(), lines, connections)
            if name not in phases or sum(result) < sum(phases[name]):
                phases[name] = result
            cost = time_messages(name, make(), message, messages)
            per_message[name] = min(per_message.get(name, cost), cost)
    names = list(made)
    print(f"(e)-like connection, µs, best of {rounds} round(s) of {connections}:", file=out)
    print(f"{'phase':<10}" + "".join(f"{n:>14}" for n in names), file=out)
    for i, phase in enumerate(PHASES):
        print(f"{phase:<10}" + "".join(f"{phases[n][i]:>14.1f}" for n in names), file=out)
    totals = [sum(phases[n]) for n in names]
    print(f"{'total':<10}" + "".join(f"{t:>14.1f}" for t in totals), file=out)
    print(f"\n(b)-like pipelined 1 KiB message, µs, best of {rounds} round(s) of "
          f"{messages}:", file=out)
    for name in names:
        print(f"{name:<14}{per_message[name]:>10.1f}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny counts")
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.messages, args.rounds = 50, 200, 1
    try:
        run(args.connections, args.messages, args.rounds)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
