"""``maitred-queue`` (``python -m maitred_tx.queue``): look at and act on a spool.

    maitred-queue list [--json]      every message: id, size, arrival, sender, recipients
    maitred-queue show ID            one message in full (its envelope as JSON)
    maitred-queue flush [ID]         try one message (or all) now
    maitred-queue hold ID / release ID
    maitred-queue delete ID...       remove messages, without any DSN

``--spool DIR`` (default ``./spool``, as ``twistd maitred --spool``) names the spool.
Safe while the server runs: every change is made under the message's lock
(:mod:`maitred_tx.queue.spool`), then ``SPOOL/flush`` is touched so that the server
rereads the envelopes.  A delete cannot recall a copy already being sent: if a
delivery attempt is under way, the next hop may still get that one copy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from maitred_tx.queue.codec import encode
from maitred_tx.queue.spool import SpoolStore, valid_id
from maitred_tx.queue.store import QueuedMessage, QueuedRecipient

__all__ = ["main"]

DEFAULT_SPOOL = "./spool"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spool", default=argparse.SUPPRESS,
                        help=f"the spool directory (default {DEFAULT_SPOOL})")
    parser = argparse.ArgumentParser(prog="maitred-queue", parents=[common],
                                     description="List and manage maitred's outbound queue.")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", parents=[common], help="list every queued message")
    listing.add_argument("--json", action="store_true", help="one JSON envelope per line")
    sub.add_parser("show", parents=[common], help="one message's envelope").add_argument("id")
    sub.add_parser("flush", parents=[common], help="try now").add_argument("id", nargs="?")
    sub.add_parser("hold", parents=[common], help="keep from delivery").add_argument("id")
    sub.add_parser("release", parents=[common], help="undo hold").add_argument("id")
    sub.add_parser("delete", parents=[common], help="remove, no DSN").add_argument(
        "id", nargs="+")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command; the exit status: 0 done, 1 a message was not found, 2 usage."""
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    spool = getattr(args, "spool", DEFAULT_SPOOL)
    if not os.path.isdir(os.path.join(spool, "env")):
        print(f"maitred-queue: no spool at {spool}", file=sys.stderr)
        return 2
    try:
        return _run(args, SpoolStore(spool), out)
    except OSError as e:  # e.g. the spool's permissions; never a traceback
        print(f"maitred-queue: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, store: SpoolStore, out: TextIO) -> int:
    ids = args.id if isinstance(getattr(args, "id", None), list) else [getattr(args, "id", None)]
    for message_id in ids:
        if message_id is not None and not valid_id(message_id):
            print(f"maitred-queue: not a queue id: {message_id!r}", file=sys.stderr)
            return 2
    command = args.command
    if command == "list":
        return _list(store, out, as_json=args.json)
    if command == "show":
        message = store.load(args.id)
        if message is None:
            return _missing(args.id)
        out.write(json.dumps(json.loads(encode(message)), indent=2, ensure_ascii=False) + "\n")
        return 0
    if command == "flush":
        count = store.flush(args.id)
        store.request_flush()
        if args.id is not None and count == 0:
            return _missing(args.id)
        print(f"{count} message(s) due now", file=out)
        return 0
    if command in ("hold", "release"):
        if not store.hold(args.id, command == "hold"):
            return _missing(args.id)
        store.request_flush()
        print(f"{args.id} {'held' if command == 'hold' else 'released'}", file=out)
        return 0
    status = 0
    for message_id in args.id:  # delete
        if store.delete(message_id):
            print(f"{message_id} deleted", file=out)
        else:
            status = _missing(message_id)
    store.request_flush()
    return status


def _missing(message_id: str) -> int:
    print(f"maitred-queue: no message {message_id}", file=sys.stderr)
    return 1


def _list(store: SpoolStore, out: TextIO, *, as_json: bool) -> int:
    count = pending = 0
    for message in store.load_all():
        count += 1
        pending += len(message.pending)
        if as_json:
            out.write(encode(message).decode())
        else:
            out.write(_describe(message))
    if not as_json:
        print(f"-- {count} message(s), {pending} recipient(s) pending", file=out)
    return 0


def _describe(message: QueuedMessage) -> str:
    held = "  [held]" if message.held else ""
    sender = "<>" if message.sender is None else f"<{message.sender}>"
    lines = [f"{message.id}  {message.size:>9}  {_time(message.created_at)}  {sender}{held}"]
    lines += [f"    {_recipient(r)}" for r in message.recipients]
    return "\n".join(lines) + "\n"


def _recipient(r: QueuedRecipient) -> str:
    text = f"<{r.address}> {r.state.value}"
    if r.attempts:
        text += f", {r.attempts} attempt(s)"
    if r.next_attempt_at is not None and not r.state.final:
        text += f", next {_time(r.next_attempt_at)}"
    reason = str(r.reply) if r.reply is not None else r.diagnostic
    return f"{text}: {reason}" if reason else text


def _time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
