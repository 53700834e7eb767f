"""``kill -9`` of a relaying server: nothing that got a 250 is lost, and a message goes
out twice only in the window RFC 5321 6.1 allows (``maitred_tx/queue/store.py``).

A real ``twistd -n maitred --delivery queue --relay-host [127.0.0.1]:PORT`` process
takes messages from smtplib clients (threads) and relays them to aiosmtpd (its
Controller, in a thread of this test process: it stays up across the relay's deaths),
whose handler records every message it acknowledged.  The relay is SIGKILLed at random
moments while both halves work, restarted on the same spool each time, and finally
left to drain.  Then every recipient of every message that got its 250 must have
reached the destination, and copies beyond the first are bounded by what the window
allows: per kill, at most the transactions the runner had in flight.

Two deterministic tests pin down each side of that window, which a random SIGKILL
cannot aim at: a kill while the destination withholds its 250 (the message must be
sent again: the safe side), and a kill once the 250 is on record (the recipient it
covers must never be sent again).
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

INTEROP = Path(__file__).resolve().parent.parent / "interop"
sys.path.insert(0, str(INTEROP))
sys.path.insert(0, str(INTEROP.parent))  # load_support

from load_support import Ledger, submit  # noqa: E402
from maitred_interop import free_port, stop_process, twistd_command, wait_for_port  # noqa: E402

from maitred_tx.queue.spool import SpoolStore  # noqa: E402
from maitred_tx.queue.store import RecipientState  # noqa: E402
from maitred_tx.relay.runner import DESTINATION_CONCURRENCY  # noqa: E402

pytest.importorskip("aiosmtpd")
from aiosmtpd.controller import Controller  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SIGKILL: POSIX, tested on Linux")

ROUNDS = 4
SENDERS = 3
MAX_MESSAGES_PER_ROUND = 40  # per sender: bounds a round even if the kill is late
KILL_AFTER = (0.05, 0.8)  # seconds after the round's first relayed message
STALL_SECONDS = 15.0  # the longest the destination withholds a 250 (it is killed first)
RECIPIENTS = ("a@dest.test", "b@dest.test", "c@dest.test")
_SEQ = re.compile(rb"\r\nX-Seq: (\d+)\r\n")
_LETTERS = bytes(b"abcdefghij."[i % 11] for i in range(256))
RECEIVED = b"Received: from load.test ([127.0.0.1])\r\n"


@functools.lru_cache(maxsize=2048)
def message_bytes(seq: int) -> bytes:
    """The message numbered *seq*: deterministic, from about 200 octets to 30 KiB."""
    rng = random.Random(seq)
    lines = rng.choice([2, 10, 100, 400])
    text = rng.randbytes(70 * lines).translate(_LETTERS)
    body = b"".join(b"%05d " % i + text[70 * i : 70 * i + 70] + b"\r\n" for i in range(lines))
    return (b"From: load@origin.test\r\nTo: dest@dest.test\r\n"
            b"Message-ID: <%d@relay-crash.test>\r\nX-Seq: %d\r\nSubject: relay crash\r\n\r\n"
            % (seq, seq)) + body


@functools.lru_cache(maxsize=2048)
def recipients_of(seq: int) -> tuple[str, ...]:
    """One to three recipients, fixed per message."""
    return tuple(sorted(random.Random(-seq).sample(RECIPIENTS, 1 + seq % 3)))


# --- the destination: aiosmtpd, recording what it acknowledged ----------------------


@dataclass(frozen=True, slots=True)
class Taken:
    """One transaction the destination answered with 250."""

    seq: int
    recipients: tuple[str, ...]
    content: bytes


@dataclass
class Destination:
    """aiosmtpd's handler.  ``stall``: message numbers whose first arrival gets no
    answer (until the relay is gone); ``defer``: addresses refused with 451 at RCPT."""

    acked: list[Taken] = field(default_factory=list)
    arrivals: list[int] = field(default_factory=list)
    stall: set[int] = field(default_factory=set)
    stalled: threading.Event = field(default_factory=threading.Event)
    defer: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: Any) -> str:
        if address in self.defer:
            return "451 4.3.2 Not now"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = bytes(envelope.original_content)
        match = _SEQ.search(content)
        seq = int(match.group(1)) if match else -1
        with self.lock:
            self.arrivals.append(seq)
            stall = seq in self.stall
            self.stall.discard(seq)
        if stall:  # aiosmtpd cancels this when the relay's connection goes
            self.stalled.set()
            await asyncio.sleep(STALL_SECONDS)
            return "451 4.4.2 Stalled"
        with self.lock:  # recorded, then 250: what the relay may have missed is counted
            self.acked.append(Taken(seq, tuple(sorted(envelope.rcpt_tos)), content))
        return "250 2.0.0 OK"

    def taken(self) -> list[Taken]:
        with self.lock:
            return list(self.acked)

    def pairs(self) -> Counter[tuple[int, str]]:
        """(message, recipient) -> how many times the destination acknowledged it."""
        return Counter((t.seq, r) for t in self.taken() for r in t.recipients)


@pytest.fixture
def destination() -> Iterator[tuple[int, Destination]]:
    handler = Destination()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()  # returns once it accepts connections
    try:
        yield controller.port, handler
    finally:
        controller.stop()


# --- the relay: a twistd process ---------------------------------------------------


@dataclass
class Relay:
    """Starts ``twistd -n maitred`` relaying to *dest_port*, on one spool, again and
    again; each start has its own log file."""

    workdir: Path
    dest_port: int
    starts: int = 0
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    def start(self) -> int:
        self.port = free_port()
        self.starts += 1
        command = [twistd_command(), "-n", "--pidfile=", "--logfile", str(self.log),
                   "maitred", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                   "--delivery", "queue", "--spool", str(self.spool),
                   "--relay-host", f"[127.0.0.1]:{self.dest_port}", "--relay",
                   "--no-auth-checks", "--hostname", "relay.test"]
        quiet = subprocess.DEVNULL
        self.process = subprocess.Popen(command, cwd=self.workdir, stdin=quiet,
                                        stdout=quiet, stderr=quiet)
        try:
            wait_for_port(self.port, self.process)
        except RuntimeError:
            stop_process(self.process)
            raise
        return self.process.pid

    @property
    def log(self) -> Path:
        return self.workdir / f"twistd-{self.starts}.log"

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def queued(self) -> int:
        return len(os.listdir(self.spool / "env"))

    def pending(self) -> set[tuple[int, str]]:
        """(message, recipient) still to be sent, as a reader of the spool sees it."""
        out: set[tuple[int, str]] = set()
        for message in SpoolStore(self.spool).load_all():
            try:
                body = (self.spool / "msg" / message.id).read_bytes()
            except FileNotFoundError:  # removed since the listing
                continue
            match = _SEQ.search(body)
            assert match is not None, message.id
            out |= {(int(match.group(1)), r.address) for r in message.pending}
        return out

    def why(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
def relay_process(tmp_path: Path, destination: tuple[int, Destination]) -> Iterator[Relay]:
    r = Relay(tmp_path, destination[0])
    try:
        yield r
    finally:
        r.stop()


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def send(port: int, seq: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("load.test")
        client.sendmail("load@origin.test", list(recipients_of(seq)), message_bytes(seq))


# --- kill -9 at random moments -------------------------------------------------------


def submitter(port: int, ledger: Ledger, stop: threading.Event, first: threading.Event,
              ) -> None:
    submit(port, ledger, stop, first, message=message_bytes, recipients=recipients_of,
           limit=MAX_MESSAGES_PER_ROUND)


def check_delivered_intact(taken: list[Taken]) -> None:
    """Each copy at the destination: our Received: field, then exactly the bytes the
    client sent, to recipients of that message."""
    for t in taken:
        assert t.seq > 0, t.content[:300]
        assert t.content.startswith(RECEIVED), t.content[:300]
        assert t.content.endswith(message_bytes(t.seq)), f"message {t.seq} differs"
        header_end = len(t.content) - len(message_bytes(t.seq))
        assert t.content[:header_end].count(b"Received:") == 1, t.content[:header_end]
        assert set(t.recipients) <= set(recipients_of(t.seq)), t


def test_kill_9_while_relaying_loses_nothing_and_repeats_only_the_window(
        relay_process: Relay, destination: tuple[int, Destination]) -> None:
    relay = relay_process
    _, dest = destination
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ledger = Ledger()
    rounds: list[str] = []
    deadline = time.monotonic() + 90
    for n in range(ROUNDS):
        assert time.monotonic() < deadline, "crash test over its time budget"
        relay.start()
        relayed_before = len(dest.taken())
        stop, first = threading.Event(), threading.Event()
        threads = [threading.Thread(target=submitter, args=(relay.port, ledger, stop, first))
                   for _ in range(SENDERS)]
        for t in threads:
            t.start()
        acked_before = len(ledger.acked)
        first.wait(20)
        wait_for(lambda: len(dest.taken()) > relayed_before, 20,  # noqa: B023
                 f"round {n}: the first relayed message")
        time.sleep(rng.uniform(*KILL_AFTER))
        relay.kill()
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        # Right after the kill: every acknowledged recipient is at the destination or
        # still pending in the spool.
        owed = {(seq, r) for seq in ledger.acked for r in recipients_of(seq)}
        lost = owed - set(dest.pairs()) - relay.pending()
        assert not lost, f"seed {seed}, round {n}: lost {sorted(lost)[:10]}"
        rounds.append(f"round {n}: {len(ledger.acked) - acked_before} accepted, "
                      f"{len(dest.taken()) - relayed_before} relayed, "
                      f"{relay.queued()} queued at the kill")
    relay.start()  # the last start: it recovers the spool and drains it
    wait_for(lambda: relay.queued() == 0 and not os.listdir(relay.spool / "msg"), 30,
             f"the spool to drain (seed {seed}):\n{relay.why()}", interval=0.05)
    relay.stop()
    for sub in ("tmp", "corrupt", "msg", "env"):
        assert os.listdir(relay.spool / sub) == [], f"{sub}/ after the drain"
    taken = dest.taken()
    check_delivered_intact(taken)
    pairs = dest.pairs()
    owed = {(seq, r) for seq in ledger.acked for r in recipients_of(seq)}
    lost = owed - set(pairs)
    assert not lost, f"seed {seed}: acknowledged but never delivered: {sorted(lost)[:10]}"
    copies = Counter(t.seq for t in taken)
    duplicates = sum(c - 1 for c in copies.values())
    print(f"\nseed {seed}; " + "; ".join(rounds)
          + f"; {len(ledger.acked)} acknowledged to clients, {ledger.cut_off} cut off in "
          f"flight, {len(copies)} distinct messages relayed, {duplicates} duplicates "
          f"(bound {ROUNDS} kills x {DESTINATION_CONCURRENCY})")
    # RFC 5321 6.1: a copy beyond the first comes only from the window between the
    # destination recording the message (just before its 250) and the relay's journal
    # line for it (SpoolStore.journal_attempt, written as soon as the reply is read):
    # one per delivery in flight, and only while the reply is on its way or waits for
    # the relay's busy reactor.
    assert duplicates <= ROUNDS * DESTINATION_CONCURRENCY, f"seed {seed}"
    assert all(c <= ROUNDS + 1 for c in copies.values()), f"seed {seed}"
    assert len(ledger.acked) >= ROUNDS


# --- each side of the window, deterministically -------------------------------------


def test_a_kill_while_the_destination_withholds_its_250_means_a_second_copy(
        relay_process: Relay, destination: tuple[int, Destination]) -> None:
    relay = relay_process
    """The relay dies after the whole message went out but before any answer: to the
    queue it was never delivered, and it goes again after the restart (not lost)."""
    _, dest = destination
    dest.stall.add(7)
    relay.start()
    send(relay.port, 7)
    assert dest.stalled.wait(15), relay.why()
    relay.kill()
    [message] = SpoolStore(relay.spool).load_all()
    assert [(r.address, r.state, r.attempts) for r in message.recipients] == [
        (a, RecipientState.PENDING, 0) for a in recipients_of(7)]
    assert dest.taken() == []
    relay.start()
    wait_for(lambda: relay.queued() == 0, 15, f"the resend:\n{relay.why()}")
    relay.stop()
    assert dest.arrivals == [7, 7]
    [taken] = dest.taken()
    assert taken.recipients == recipients_of(7)
    check_delivered_intact([taken])


def test_a_kill_after_the_250_is_recorded_never_sends_it_again(
        relay_process: Relay, destination: tuple[int, Destination]) -> None:
    relay = relay_process
    """One recipient is taken, the other deferred (451); the relay is killed as soon as
    the spool shows the first as relayed.  After a restart and a flush only the
    deferred one goes: the record made right after the 250 is final."""
    _, dest = destination
    dest.defer.add("b@dest.test")
    seq = 5  # recipients_of(5) == ("a@dest.test", "b@dest.test", "c@dest.test")
    assert recipients_of(seq) == RECIPIENTS
    relay.start()
    send(relay.port, seq)

    def states() -> dict[str, RecipientState]:
        loaded = list(SpoolStore(relay.spool).load_all())
        return {r.address: r.state for m in loaded for r in m.recipients}

    wait_for(lambda: states().get("a@dest.test") is RecipientState.RELAYED, 15,
             "the record of the 250", interval=0.002)
    relay.kill()  # at once: the message may be between its record and its settling
    assert states() == {"a@dest.test": RecipientState.RELAYED,
                        "b@dest.test": RecipientState.DEFERRED,
                        "c@dest.test": RecipientState.RELAYED}
    [message] = SpoolStore(relay.spool).load_all()
    assert message.recipients[1].next_attempt_at > time.time() + 200  # 5 minutes
    assert [t.recipients for t in dest.taken()] == [("a@dest.test", "c@dest.test")]
    relay.start()
    time.sleep(1.0)  # the runner's first run after the start: nothing is due
    assert [t.recipients for t in dest.taken()] == [("a@dest.test", "c@dest.test")]
    dest.defer.clear()
    flush = subprocess.run([sys.executable, "-m", "maitred_tx.queue", "--spool",
                            str(relay.spool), "flush"], capture_output=True, timeout=30)
    assert flush.returncode == 0, flush.stderr
    wait_for(lambda: relay.queued() == 0, 15, f"the retry:\n{relay.why()}")
    relay.stop()
    taken = dest.taken()
    assert [t.recipients for t in taken] == [("a@dest.test", "c@dest.test"),
                                             ("b@dest.test",)]
    check_delivered_intact(taken)
    assert os.listdir(relay.spool / "corrupt") == []
