"""aiosmtpd peer: a handler that counts bytes and discards.

Run as ``python benchmarks/servers/aiosmtpd_server.py --port N [--stats FILE]``.  It
listens on 127.0.0.1 only, prints ``READY`` on stdout once listening, and on SIGTERM or
SIGINT writes ``{"messages": n, "bytes": b}`` to the stats file before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

DATA_SIZE_LIMIT = 64 * 1024 * 1024


class CountingHandler:
    """Accepts every message, counts it and its bytes, keeps nothing."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        self.bytes += len(envelope.content)
        return "250 OK"


async def serve(port: int, stats: Path | None) -> None:
    loop = asyncio.get_running_loop()
    handler = CountingHandler()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            data_size_limit=DATA_SIZE_LIMIT,
            hostname="localhost",
            loop=loop,
        ),
        host="127.0.0.1",
        port=port,
        backlog=1024,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("READY", flush=True)
    await stop.wait()
    server.close()
    if stats is not None:
        stats.write_text(json.dumps({"messages": handler.messages, "bytes": handler.bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats", type=Path, default=None)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.stats))
    sys.exit(0)


if __name__ == "__main__":
    main()
