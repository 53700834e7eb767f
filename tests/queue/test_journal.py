"""The attempt journal: an attempt noted with journal_attempt and not yet recorded in
its envelope when the process died is applied at the next start; nothing is applied
twice; a line cut short by the crash is ignored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from maitred_tx.queue.spool import SpoolStore
from maitred_tx.queue.store import (
    AttemptResult,
    QueuedRecipient,
    QueueEnvelope,
    QueueReply,
    RecipientState,
)

OK = QueueReply(250, "2.0.0", "ok")


def spool_with_one(root: Path) -> tuple[SpoolStore, str]:
    store = SpoolStore(root, sync=False)
    store.recover()
    envelope = QueueEnvelope("a@example.org", (QueuedRecipient("b@example.net"),
                                               QueuedRecipient("c@example.net")))
    return store, store.add(envelope, [b"Subject: x\r\n\r\nbody\r\n"])


def test_a_journaled_attempt_survives_the_process(tmp_path: Path) -> None:
    """A child process journals an attempt and is killed (SIGKILL) before recording it:
    the next start applies it, so the delivered recipient is never sent again."""
    store, message_id = spool_with_one(tmp_path)
    store.close()
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from maitred_tx.queue.spool import SpoolStore
from maitred_tx.queue.store import AttemptResult, QueueReply, RecipientState
store = SpoolStore({str(tmp_path)!r}, sync=False)
store.recover()
store.journal_attempt({message_id!r}, [
    AttemptResult("b@example.net", RecipientState.RELAYED, QueueReply(250, "2.0.0", "ok")),
    AttemptResult("c@example.net", RecipientState.DEFERRED, QueueReply(451, "4.3.0", "x")),
], 1000.0)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr
    store = SpoolStore(tmp_path, sync=False)
    report = store.recover()
    assert report.replayed == [message_id]
    message = store.load(message_id)
    assert message is not None
    states = {r.address: (r.state, r.attempts) for r in message.recipients}
    assert states == {"b@example.net": (RecipientState.RELAYED, 1),
                      "c@example.net": (RecipientState.DEFERRED, 1)}
    assert os.path.getsize(tmp_path / "journal") == 0
    # A second start finds nothing more to apply.
    store.close()
    again = SpoolStore(tmp_path, sync=False)
    assert again.recover().replayed == []
    assert again.load(message_id).recipients[0].attempts == 1


def test_recorded_attempts_are_not_applied_twice_and_a_cut_line_is_ignored(
        tmp_path: Path) -> None:
    store, message_id = spool_with_one(tmp_path)
    results = [AttemptResult("b@example.net", RecipientState.DEFERRED,
                             QueueReply(451, "4.3.0", "later"))]
    store.journal_attempt(message_id, results, 1000.0)
    store.record_attempt(message_id, results, 1000.0)  # not journaled=True: the entry stays
    with open(tmp_path / "journal", "ab") as f:
        f.write(b'["' + message_id.encode() + b'",1001.0,[["b@exam')  # cut by a crash
    store.close()
    again = SpoolStore(tmp_path, sync=False)
    assert again.recover().replayed == []
    assert again.load(message_id).recipients[0].attempts == 1


def test_the_journal_is_emptied_when_nothing_is_in_flight(tmp_path: Path) -> None:
    store, message_id = spool_with_one(tmp_path)
    results = [AttemptResult("b@example.net", RecipientState.RELAYED, OK)]
    store.journal_attempt(message_id, results, 1000.0)
    store.journal_attempt(message_id, results, 1000.5)
    assert os.path.getsize(tmp_path / "journal") > 0
    store.record_attempt(message_id, results, 1000.0, journaled=True)
    assert os.path.getsize(tmp_path / "journal") > 0  # one still in flight
    store.record_attempt(message_id, results, 1000.5, journaled=True)
    assert os.path.getsize(tmp_path / "journal") == 0


def test_a_journal_line_that_fits_no_message_is_ignored(tmp_path: Path) -> None:
    """A line naming no valid id, or an address the message does not have (a damaged
    journal): the start goes on, applying what fits - it used to raise out of
    recover() (ValueError, KeyError), and the server could not start on its spool."""
    store, message_id = spool_with_one(tmp_path)
    store.close()
    with open(tmp_path / "journal", "ab") as f:
        f.write(b'["../etc/passwd",1000.0,[["b@example.net","relayed",null,null,null,'
                b'null,false]]]\n')
        f.write(b'["' + message_id.encode() + b'",1000.0,[["x@example.net","relayed",'
                b'null,null,null,null,false],["b@example.net","relayed",null,null,null,'
                b'null,false]]]\n')
    again = SpoolStore(tmp_path, sync=False)
    assert again.recover().replayed == [message_id]
    states = {r.address: r.state for r in again.load(message_id).recipients}
    assert states == {"b@example.net": RecipientState.RELAYED,
                      "c@example.net": RecipientState.PENDING}
