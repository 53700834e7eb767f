"""``kill -9`` during load loses no acknowledged message and shows nothing half-written.

A real ``twistd -n maitred --delivery queue --spool DIR`` process takes messages from
smtplib clients in threads and is SIGKILLed at a random moment while they send (a
few rounds, each bounded in messages and seconds), then restarted on the same spool.
Checked, after every kill *before* any recovery (what a reader such as maitred-queue
would see) and again after the final restart's recovery:

- every message whose client got its 250 is in the spool, exactly once, and its
  stored bytes are our Received: field followed by exactly the bytes sent;
- every envelope names a complete body: nothing half-written is visible (leftovers
  in tmp/, and bodies whose envelope never came, are allowed until recovery, which
  must then remove them); nothing is quarantined.
"""

from __future__ import annotations

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
from pathlib import Path

import pytest

INTEROP = Path(__file__).resolve().parent.parent / "interop"
sys.path.insert(0, str(INTEROP))
sys.path.insert(0, str(INTEROP.parent))  # load_support

from load_support import Ledger, submit  # noqa: E402
from maitred_interop import free_port, stop_process, twistd_command, wait_for_port  # noqa: E402

from maitred_tx.queue.spool import SpoolStore  # noqa: E402
from maitred_tx.queue.store import (  # noqa: E402
    QueuedRecipient,
    QueueEnvelope,
    QueueReply,
    RecipientState,
)

ROUNDS = 4
SENDERS = 4
MAX_MESSAGES_PER_ROUND = 400  # per sender: bounds a round even if the kill is late
LOAD_SECONDS = (0.2, 1.0)  # the kill comes this long after the round's first 250
_SEQ = re.compile(rb"\r\nX-Seq: (\d+)\r\n")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SIGKILL and /proc: Linux only")


_LETTERS = bytes(b"abcdefghij."[i % 11] for i in range(256))


@functools.lru_cache(maxsize=4096)
def message_bytes(seq: int) -> bytes:
    """The message numbered *seq*: deterministic, from 200 octets up to ~300 KiB."""
    rng = random.Random(seq)
    lines = rng.choice([2, 10, 100, 4000])
    text = rng.randbytes(70 * lines).translate(_LETTERS)
    body = b"".join(b"%05d " % i + text[70 * i : 70 * i + 70] + b"\r\n" for i in range(lines))
    return (b"From: load@origin.test\r\nTo: sink@example.com\r\n"
            b"Message-ID: <%d@crash.test>\r\nX-Seq: %d\r\nSubject: crash test\r\n\r\n"
            % (seq, seq)) + body


def sender(port: int, ledger: Ledger, stop: threading.Event, first: threading.Event) -> None:
    submit(port, ledger, stop, first, message=message_bytes,
           recipients=lambda seq: ["sink@example.com"], limit=MAX_MESSAGES_PER_ROUND)


def start(spool: Path, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    command = [twistd_command(), "-n", "--pidfile=", "--logfile", str(workdir / "twistd.log"),
               "maitred", "--listen", f"tcp:{port}:interface=127.0.0.1",
               "--delivery", "queue", "--spool", str(spool), "--domain", "example.com",
               "--hostname", "mx.test", "--no-auth-checks",
               # the runner's smarthost refuses connections: what got a 250 stays queued
               "--relay-host", "[127.0.0.1]:1"]
    quiet = subprocess.DEVNULL
    process = subprocess.Popen(command, cwd=workdir, stdin=quiet, stdout=quiet, stderr=quiet)
    try:
        wait_for_port(port, process)
    except RuntimeError:
        stop_process(process)
        raise
    return process


def visible(spool: Path) -> dict[int, list[str]]:
    """seq -> ids of the messages a reader sees (an envelope in env/), each checked
    to be complete: its body is our Received: field and then exactly the message."""
    found: dict[int, list[str]] = {}
    for message in SpoolStore(spool).load_all():
        stored = (spool / "msg" / message.id).read_bytes()  # FileNotFoundError: a bug
        assert message.size == len(stored), message.id
        assert stored.startswith(b"Received: from load.test ([127.0.0.1])\r\n")
        match = _SEQ.search(stored)
        assert match is not None, message.id
        seq = int(match.group(1))
        assert stored.endswith(message_bytes(seq)), f"{message.id}: seq {seq} differs"
        header_end = len(stored) - len(message_bytes(seq))
        assert stored[:header_end].count(b"Received:") == 1
        assert [r.address for r in message.recipients] == ["sink@example.com"]
        found.setdefault(seq, []).append(message.id)
    return found


def test_kill_9_during_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    spool = tmp_path / "spool"
    ledger = Ledger()
    rounds: list[str] = []
    deadline = time.monotonic() + 120
    for n in range(ROUNDS):
        assert time.monotonic() < deadline, "crash test over its time budget"
        port = free_port()
        process = start(spool, tmp_path, port)
        stop, first = threading.Event(), threading.Event()
        threads = [threading.Thread(target=sender, args=(port, ledger, stop, first))
                   for _ in range(SENDERS)]
        for t in threads:
            t.start()
        before = len(ledger.acked)
        first.wait(20)
        time.sleep(rng.uniform(*LOAD_SECONDS))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        leftovers = len(os.listdir(spool / "tmp")), len(os.listdir(spool / "msg"))
        found = visible(spool)  # before any recovery
        missing = ledger.acked - set(found)
        assert not missing, f"seed {seed}: acknowledged but lost: {sorted(missing)[:10]}"
        assert all(len(ids) == 1 for ids in found.values()), f"seed {seed}: duplicates"
        rounds.append(f"round {n}: {len(ledger.acked) - before} acked, "
                      f"tmp/msg files at kill {leftovers}")
    # The last restart recovers the spool: leftovers go, nothing is lost or quarantined.
    port = free_port()
    process = start(spool, tmp_path, port)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo("load.test")
            client.sendmail("load@origin.test", ["sink@example.com"], message_bytes(0))
    finally:
        stop_process(process)
    found = visible(spool)
    assert os.listdir(spool / "tmp") == []
    assert os.listdir(spool / "corrupt") == []
    assert sorted(os.listdir(spool / "msg")) == sorted(
        message_id for ids in found.values() for message_id in ids)
    assert ledger.acked | {0} <= set(found), f"seed {seed}"
    assert all(len(ids) == 1 for ids in found.values())
    unacked = set(found) - ledger.acked - {0}
    print(f"\nseed {seed}; " + "; ".join(rounds)
          + f"; {len(ledger.acked)} acked, {ledger.cut_off} cut off in flight, "
          f"{len(unacked)} stored without their 250 reaching the client")
    assert len(ledger.acked) >= ROUNDS  # every round got some load
    assert ledger.cut_off >= 1  # some kill landed mid-transaction


_RECORDER = r"""
import sys
from maitred_tx.queue.spool import SpoolStore
from maitred_tx.queue.store import AttemptResult, QueueReply, RecipientState
store = SpoolStore(sys.argv[1])
message_id = sys.argv[2]
for i in range(int(sys.argv[3])):
    done = AttemptResult(f"r{i}@example.com", RecipientState.DELIVERED,
                         QueueReply(250, "2.0.0", f"ok {i}"), remote_mta="mx.example.com")
    store.record_attempt(message_id, [done], 1_700_000_000.0 + i)
    print(i, flush=True)  # the runner would now go on: the record is durable
"""


def test_kill_9_after_record_attempt_never_forgets_a_delivery(tmp_path: Path) -> None:
    """The store half of "delivered none twice": a runner process records one
    remote 250 after another and is SIGKILLed at a random moment; every recipient
    whose record_attempt had returned is DELIVERED for the next process, so no run
    would send to it again (the one being recorded at the kill may go either way)."""
    count = 400
    spool = tmp_path / "spool"
    store = SpoolStore(spool)
    store.recover()
    recipients = tuple(QueuedRecipient(f"r{i}@example.com") for i in range(count))
    message_id = store.add(QueueEnvelope("s@origin.test", recipients), [b"x\r\n"])
    store.close()
    kill_after = random.randrange(20, count // 2)
    child = subprocess.Popen([sys.executable, "-c", _RECORDER, str(spool), message_id,
                              str(count)], stdout=subprocess.PIPE)
    assert child.stdout is not None
    returned = -1
    try:
        for line in child.stdout:  # bounded: at most *count* lines
            returned = int(line)
            if returned >= kill_after:
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(30)
    for line in child.stdout:  # what it printed before it died, still in the pipe
        returned = int(line)
    child.stdout.close()
    assert kill_after <= returned < count - 1
    after = SpoolStore(spool)
    after.recover()
    message = after.load(message_id)
    assert message is not None
    states = [r.state for r in message.recipients]
    delivered = sum(s is RecipientState.DELIVERED for s in states)
    assert states[: returned + 1] == [RecipientState.DELIVERED] * (returned + 1)
    assert returned + 1 <= delivered <= returned + 2  # at most the one in flight besides
    assert all(s is RecipientState.PENDING for s in states[delivered:])
    assert message.recipients[returned].reply == QueueReply(250, "2.0.0", f"ok {returned}")
    assert os.listdir(spool / "corrupt") == []
    after.close()
