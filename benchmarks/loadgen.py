"""SMTP load generators for the benchmarks: a raw asyncio client and smtp-source.

The asyncio client speaks just enough ESMTP to drive a receiving server hard without
smtplib's overhead: greeting, EHLO, then per message MAIL/RCPT/DATA (sent as one write
when the server advertises PIPELINING, RFC 2920) or MAIL/RCPT/``BDAT n LAST`` (RFC 3030,
only when CHUNKING is advertised), and QUIT.  Every reply code is checked; a transaction
counts as done only when its final 250 arrived.  Anything else (a wrong code, a reset,
a connection never made, the deadline) leaves it counted as failed, never as slow.

Every loop is bounded by a count and by an absolute deadline (``time.monotonic()``).

Run alone for a quick manual check, e.g.::

    python benchmarks/loadgen.py --port 2525 --connections 50 --messages 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

HOST = "127.0.0.1"
SENDER = "sender@loadgen.localhost"  # two labels: SPF and DMARC apply (maitred-auth)
RECIPIENT = "bench@localhost"
HELO_NAME = "loadgen.localhost"
LARGE_WRITE = 256 * 1024
FILLER_WIDTH = 76
MAX_KEPT_ERRORS = 20
PIPELINED_STAGES = ("MAIL", "RCPT", "DATA")
PIPELINED_CODES: tuple[tuple[int, ...], ...] = ((250,), (250, 251), (354,))


class SMTPReplyError(Exception):
    """The server answered with a code other than the one the client expected."""

    def __init__(self, stage: str, expected: tuple[int, ...], code: int, text: bytes) -> None:
        shown = text.decode("latin-1").strip()[:120]
        super().__init__(f"{stage}: expected {'/'.join(map(str, expected))}, got {code} {shown}")


# --------------------------------------------------------------------------- messages


def build_message(size: int, tag: str = "bench") -> bytes:
    """An RFC 5322 message of exactly ``size`` bytes (at least the headers' size).

    Headers, a blank line, then filler lines of 76 characters + CRLF; every 16th line
    starts with a dot so that the DATA path really has to dot-stuff and un-stuff.
    """
    header = (
        f"From: <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Subject: maitred_tx benchmark {tag}\r\n"
        f"Message-ID: <{tag}.{size}@loadgen.localhost>\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    lines: list[bytes] = []
    for i in range(64):
        text = (alphabet[i % len(alphabet) :] + alphabet * 2)[:FILLER_WIDTH]
        if i % 16 == 5:
            text = "." + text[1:]
        lines.append(text.encode("ascii") + b"\r\n")
    block = b"".join(lines)
    remaining = max(size - len(header), 0)
    body = block * (remaining // len(block)) + block[: remaining % len(block)]
    if body and not body.endswith(b"\r\n"):
        # Finish the last, shorter line properly so the message ends with CRLF.
        body = body[:-2] + b"\r\n" if len(body) >= 2 else b"\r\n"
    return header + body


def dot_stuff(raw: bytes) -> bytes:
    """The DATA wire form of ``raw`` (which ends with CRLF): stuffed, with ``.CRLF``."""
    stuffed = raw.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


@dataclass(frozen=True, slots=True)
class Message:
    """One message, pre-built once in both wire forms."""

    raw: bytes
    data_wire: bytes

    @classmethod
    def of_size(cls, size: int, tag: str = "bench") -> Message:
        raw = build_message(size, tag)
        return cls(raw=raw, data_wire=dot_stuff(raw))


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class LoadResult:
    """What one load run achieved.  ``ok`` counts transactions that got their 250."""

    planned: int = 0
    ok: int = 0
    session_errors: int = 0
    elapsed: float = 0.0
    payload_bytes: int = 0
    connections_ok: int = 0
    client_cpu: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.planned - self.ok

    @property
    def clean(self) -> bool:
        return self.failed == 0 and self.session_errors == 0

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(text)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["failed"] = self.failed
        return out


# --------------------------------------------------------------------------- client


class Session:
    """One client connection.  Methods raise on any unexpected reply or a lost peer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extensions: dict[str, str] = {}

    @classmethod
    async def open(cls, host: str, port: int) -> Session:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        session = cls(reader, writer)
        try:
            await session.expect("greeting", 220)
            session.writer.write(f"EHLO {HELO_NAME}\r\n".encode("ascii"))
            _code, lines = await session.expect("EHLO", 250)
        except BaseException:
            session.abort()
            raise
        for line in lines[1:]:
            keyword, _, params = line.decode("latin-1").partition(" ")
            session.extensions[keyword.upper()] = params
        return session

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.extensions

    async def reply(self) -> tuple[int, list[bytes]]:
        """Read one (possibly multi-line) reply; return its code and texts."""
        texts: list[bytes] = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError("connection closed by the server")
            if len(line) < 4 or not line[:3].isdigit():
                raise ConnectionError(f"malformed reply line {line[:80]!r}")
            texts.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), texts

    async def expect(self, stage: str, *codes: int) -> tuple[int, list[bytes]]:
        code, texts = await self.reply()
        if code not in codes:
            raise SMTPReplyError(stage, codes, code, b" ".join(texts))
        return code, texts

    def _envelope(self, message: Message) -> bytes:
        size = f" SIZE={len(message.raw)}" if "SIZE" in self.extensions else ""
        return f"MAIL FROM:<{SENDER}>{size}\r\nRCPT TO:<{RECIPIENT}>\r\n".encode("ascii")

    async def _write(self, payload: bytes) -> None:
        if len(payload) <= LARGE_WRITE:
            self.writer.write(payload)
            transport = self.writer.transport
            if transport.get_write_buffer_size() > LARGE_WRITE:
                await self.writer.drain()
            return
        view = memoryview(payload)
        for start in range(0, len(view), LARGE_WRITE):
            self.writer.write(view[start : start + LARGE_WRITE])
            await self.writer.drain()

    async def send_data(self, message: Message) -> None:
        """One MAIL/RCPT/DATA transaction; returns only once its 250 arrived."""
        envelope = self._envelope(message)
        if self.pipelining:
            self.writer.write(envelope + b"DATA\r\n")
            replies = [await self.reply() for _ in range(3)]
            failure: SMTPReplyError | None = None
            for stage, allowed, (code, texts) in zip(
                PIPELINED_STAGES, PIPELINED_CODES, replies, strict=True
            ):
                if code not in allowed and failure is None:
                    failure = SMTPReplyError(stage, allowed, code, b" ".join(texts))
            if failure is not None:
                if replies[2][0] == 354:  # A broken server opened DATA anyway: end it.
                    self.writer.write(b".\r\n")
                    await self.reply()
                raise failure
        else:
            mail_line, rcpt_line, _ = envelope.split(b"\r\n")
            self.writer.write(mail_line + b"\r\n")
            await self.expect("MAIL", 250)
            self.writer.write(rcpt_line + b"\r\n")
            await self.expect("RCPT", 250, 251)
            self.writer.write(b"DATA\r\n")
            await self.expect("DATA", 354)
        await self._write(message.data_wire)
        await self.expect("end of data", 250)

    async def send_bdat(self, message: Message) -> None:
        """One MAIL/RCPT/``BDAT n LAST`` transaction with the raw (unstuffed) bytes."""
        envelope = self._envelope(message)
        if self.pipelining:
            self.writer.write(envelope)
            await self.expect("MAIL", 250)
            await self.expect("RCPT", 250, 251)
        else:
            mail_line, rcpt_line, _ = envelope.split(b"\r\n")
            self.writer.write(mail_line + b"\r\n")
            await self.expect("MAIL", 250)
            self.writer.write(rcpt_line + b"\r\n")
            await self.expect("RCPT", 250, 251)
        await self._write(f"BDAT {len(message.raw)} LAST\r\n".encode("ascii"))
        await self._write(message.raw)
        await self.expect("BDAT", 250)

    async def quit(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await self.expect("QUIT", 221)
        finally:
            self.abort()

    def abort(self) -> None:
        self.writer.close()


async def _messages_on_one_connection(
    port: int,
    message: Message,
    count: int,
    bdat: bool,
    result: LoadResult,
    deadline: float,
) -> None:
    """Open one session, send ``count`` messages, QUIT; record everything in ``result``."""
    session: Session | None = None
    try:
        async with asyncio.timeout_at(_loop_time(deadline)):
            session = await Session.open(HOST, port)
            result.connections_ok += 1
            if bdat and not session.chunking:
                raise RuntimeError("BDAT asked for but the server does not advertise CHUNKING")
            send = session.send_bdat if bdat else session.send_data
            for _ in range(count):
                await send(message)
                result.ok += 1
                result.payload_bytes += len(message.raw)
            await session.quit()
            session = None
    except TimeoutError:
        result.session_errors += 1
        result.error("deadline reached before the connection's messages were all sent")
    except (OSError, SMTPReplyError, RuntimeError, asyncio.IncompleteReadError) as exc:
        result.session_errors += 1
        result.error(f"{type(exc).__name__}: {exc}")
    finally:
        if session is not None:
            session.abort()


def _loop_time(deadline: float) -> float:
    """Convert a ``time.monotonic()`` deadline to the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


async def run_connections(
    port: int,
    message: Message,
    *,
    connections: int,
    per_connection: int,
    deadline: float,
    bdat: bool = False,
) -> LoadResult:
    """``connections`` sessions in parallel, each sending ``per_connection`` messages."""
    result = LoadResult(planned=connections * per_connection)
    cpu0, start = time.process_time(), time.perf_counter()
    await asyncio.gather(
        *(
            _messages_on_one_connection(port, message, per_connection, bdat, result, deadline)
            for _ in range(connections)
        )
    )
    result.elapsed = time.perf_counter() - start
    result.client_cpu = time.process_time() - cpu0
    return result


async def run_one_per_connection(
    port: int, message: Message, *, parallel: int, per_worker: int, deadline: float
) -> LoadResult:
    """``parallel`` workers, each opening ``per_worker`` connections of one message each."""
    result = LoadResult(planned=parallel * per_worker)
    cpu0, start = time.process_time(), time.perf_counter()

    async def worker() -> None:
        for _ in range(per_worker):
            if time.monotonic() >= deadline:
                result.error("deadline reached before all connections were made")
                result.session_errors += 1
                return
            await _messages_on_one_connection(port, message, 1, False, result, deadline)

    await asyncio.gather(*(worker() for _ in range(parallel)))
    result.elapsed = time.perf_counter() - start
    result.client_cpu = time.process_time() - cpu0
    return result


async def run_idle(
    port: int,
    *,
    count: int,
    deadline: float,
    on_established: Callable[[], Awaitable[None]],
    concurrency: int = 32,
) -> LoadResult:
    """Open ``count`` sessions (greeting + EHLO), await ``on_established``, then QUIT all.

    ``planned``/``ok`` count connections here.  At most ``concurrency`` handshakes are in
    flight at once so that a small listen backlog is not what is being measured.
    """
    raise_nofile_limit(count + 256)
    result = LoadResult(planned=count)
    sessions: list[Session] = []
    gate = asyncio.Semaphore(concurrency)
    cpu0, start = time.process_time(), time.perf_counter()

    async def connect() -> None:
        async with gate:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    sessions.append(await Session.open(HOST, port))
            except TimeoutError:
                result.error("deadline reached before the connection was set up")
            except (OSError, SMTPReplyError, asyncio.IncompleteReadError) as exc:
                result.error(f"{type(exc).__name__}: {exc}")

    try:
        await asyncio.gather(*(connect() for _ in range(count)))
        result.elapsed = time.perf_counter() - start
        result.ok = result.connections_ok = len(sessions)
        await on_established()

        async def close(session: Session) -> None:
            try:
                async with asyncio.timeout_at(_loop_time(deadline + 30)):
                    await session.quit()
            except (
                TimeoutError,
                OSError,
                SMTPReplyError,
                asyncio.IncompleteReadError,
            ) as exc:
                result.session_errors += 1
                result.error(f"QUIT: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(close(s) for s in sessions))
    finally:
        for session in sessions:
            session.abort()
    result.client_cpu = time.process_time() - cpu0
    return result


def raise_nofile_limit(wanted: int) -> None:
    """Raise RLIMIT_NOFILE's soft limit to ``wanted`` (bounded by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# --------------------------------------------------------------------------- smtp-source

SMTP_SOURCE = "smtp-source"


def smtp_source_path() -> str | None:
    found = shutil.which(SMTP_SOURCE)
    if found is None and os.access("/usr/sbin/smtp-source", os.X_OK):
        found = "/usr/sbin/smtp-source"
    return found


def run_smtp_source(
    port: int,
    *,
    sessions: int,
    messages: int,
    size: int,
    keep_open: bool,
    deadline: float,
) -> LoadResult:
    """Drive the server with Postfix's smtp-source (C, no pipelining, HELO).

    ``messages`` in all over ``sessions`` parallel sessions; ``keep_open`` (``-d``) sends
    them over the same connections, otherwise each connection carries one message.
    ``size`` is smtp-source's ``-l`` (payload bytes, its few headers come on top).  The
    ``-c`` counter it prints after each completed DATA gives the number confirmed; a
    non-zero exit (any unexpected reply is fatal to it) is a session error.
    """
    result = LoadResult(planned=messages)
    binary = smtp_source_path()
    if binary is None:
        result.session_errors += 1
        result.error("smtp-source is not installed")
        return result
    argv = [binary, "-c", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    argv += ["-M", "localhost", "-f", SENDER, "-t", RECIPIENT]
    if keep_open:
        argv.append("-d")
    argv.append(f"{HOST}:{port}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    timeout = max(deadline - time.monotonic(), 0.1)
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            result.session_errors += 1
            result.error("smtp-source did not finish before the deadline")
    result.elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    counts = re.findall(rb"(\d+)", out)
    result.ok = min(int(counts[-1]), messages) if counts else 0
    result.payload_bytes = result.ok * size
    if proc.returncode != 0:
        result.session_errors += 1
        result.error(
            f"smtp-source exited {proc.returncode}: {err.decode('latin-1').strip()[-300:]}"
        )
    return result


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--messages", type=int, default=10, help="per connection")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--bdat", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline, seconds")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    message = Message.of_size(args.size)
    result = asyncio.run(
        run_connections(
            args.port,
            message,
            connections=args.connections,
            per_connection=args.messages,
            deadline=deadline,
            bdat=args.bdat,
        )
    )
    out = result.as_dict()
    out["msgs_per_s"] = result.ok / result.elapsed if result.elapsed else 0.0
    print(json.dumps(out, indent=2))
    return 0 if result.clean else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
