"""A reference, not a peer: the least a Twisted server spends on the benchmark's I/O.

It answers every command the load generators send (EHLO/HELO, MAIL, RCPT, DATA, BDAT,
RSET, NOOP, QUIT) with a fixed reply, parses nothing but the verb, finds DATA's end with
one ``bytes.find`` per read and counts BDAT chunks, and sends with maitred_tx's own
``_write`` (at once when the socket takes the bytes).  No validation, no limits, no
logging: it is not an SMTP server anyone should run.  Its CPU time per message is the
floor under any Twisted SMTP server's in the same scenario, so "twisted-mail ÷ 2.5 -
floor" is what a target of 2.5x leaves for everything an SMTP server does
(benchmarks/README.md).

Run as ``python benchmarks/servers/twisted_floor_server.py --port N [--stats FILE]``;
it listens on 127.0.0.1 only and behaves like twisted_mail_server.py (READY, stats).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import protocol
from twisted_mail_server import Counter, CountingFactory, main

from maitred_tx.server.protocol_base import _write

_END = b"\r\n.\r\n"
_BDAT = re.compile(rb"BDAT (\d+)( LAST)?", re.IGNORECASE)
_EHLO = b"250-localhost\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 SIZE 67108864\r\n"
_REPLIES = {
    b"HELO": b"250 localhost\r\n",
    b"MAIL": b"250 2.1.0 OK\r\n",
    b"RCPT": b"250 2.1.5 OK\r\n",
    b"RSET": b"250 2.0.0 OK\r\n",
    b"NOOP": b"250 2.0.0 OK\r\n",
}


class Floor(protocol.Protocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.buf = b""
        self.in_data = False  # in a DATA body: buf holds at most the last 4 octets
        self.chunk = 0  # BDAT octets still to come
        self.last = False  # the chunk being read is the LAST one
        self.size = 0

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.setTcpNoDelay(True)
        self.send(b"220 localhost ESMTP floor\r\n")

    def send(self, data: bytes) -> None:
        _write(self.transport, data)  # maitred_tx's own: the same sends, the same cost

    def dataReceived(self, data: bytes) -> None:
        buf, out = self.buf + data, []
        while buf:
            if self.chunk:
                take = min(self.chunk, len(buf))
                self.chunk -= take
                self.size += take
                buf = buf[take:]
                if not self.chunk:
                    out.append(self._message_done() if self.last else b"250 2.0.0 chunk OK\r\n")
                continue
            if self.in_data:
                end = buf.find(_END)
                if end < 0:
                    self.size += max(len(buf) - 4, 0)
                    buf = buf[-4:]
                    break
                self.size += end + 2
                buf = buf[end + len(_END) :]
                self.in_data = False
                out.append(self._message_done())
                continue
            nl = buf.find(b"\r\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(_EHLO)
            elif verb == b"DATA":
                out.append(b"354 go ahead\r\n")
                self.in_data, buf = True, b"\r\n" + buf  # the CRLF before a first "."
                self.size = -2
            elif verb == b"BDAT":
                match = _BDAT.match(line)
                self.chunk = int(match.group(1)) if match else 0
                self.last = bool(match and match.group(2))
                if not self.chunk:
                    out.append(self._message_done() if self.last else b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                self.send(b"".join(out) + b"221 2.0.0 bye\r\n")
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            else:
                out.append(_REPLIES.get(verb, b"500 5.5.2 unknown\r\n"))
        self.buf = buf
        if out:
            self.send(b"".join(out))

    def _message_done(self) -> bytes:
        self.counter.messages += 1
        self.counter.bytes += self.size
        self.size = 0
        return b"250 2.0.0 OK\r\n"


class FloorFactory(CountingFactory):
    protocol_class = Floor


if __name__ == "__main__":
    main(FloorFactory)
