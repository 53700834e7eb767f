"""Sending one message straight to its recipients' domains, without a queue: each
domain's MX hosts (RFC 5321 5.1, RFC 7505), its MTA-STS policy (RFC 8461) and
verified or opportunistic STARTTLS, exactly as the queue runner sends
(``maitred_tx.relay.sender``), once.

For an application that wants to hand a message to the recipients' servers itself
and act on each recipient's outcome (a temporary failure is its own to retry)::

    results = await send_to_domains(reactor, TwistedResolver(reactor), "me@example.org",
                                    ["bob@example.com"], message_bytes,
                                    helo="mail.example.org", mta_sts=policy_store)
    results["bob@example.com"].state   # RecipientState.RELAYED / DELIVERED / DEFERRED / FAILED
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import succeed

from maitred_tx.auth.resolver import Resolver
from maitred_tx.queue.store import AttemptResult, QueuedMessage, QueuedRecipient
from maitred_tx.relay.sender import OutboundSender, destination_of

__all__ = ["send_to_domains"]


async def send_to_domains(
    reactor: Any,
    resolver: Resolver,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    *,
    helo: str,
    mta_sts: Any = None,
    trust_root: Any = None,
    signer: Any = None,
    port: int = 25,
) -> dict[str, AttemptResult]:
    """Send *message* from *sender* (``""``: the null path) to every recipient's MX
    hosts, one domain after another; one result per recipient.  *mta_sts*: a
    ``maitred_tx.mta_sts.PolicyStore`` (None: no MTA-STS).  *signer*: a DKIM
    ``maitred_tx.auth.sign.Signer``.  *trust_root*: CAs for verified TLS (None: the
    platform's).  *port*: the MX hosts' port (25; other values are for tests)."""
    outbound = OutboundSender(reactor, resolver, helo=helo, mta_sts=mta_sts,
                              signer=signer, trust_root=trust_root, port=port)
    queued = QueuedMessage(id=f"direct-{time.time_ns():x}", sender=sender or None,
                           recipients=tuple(QueuedRecipient(r) for r in recipients),
                           created_at=time.time(), size=len(message))
    groups: dict[str, list[QueuedRecipient]] = defaultdict(list)
    for r in queued.recipients:
        groups[destination_of(r.address, None)].append(r)
    results: dict[str, AttemptResult] = {}
    try:
        for destination, group in groups.items():
            for result in await outbound.deliver(
                    queued, group, lambda: succeed(io.BytesIO(message)), destination):
                results[result.address] = result
    finally:
        outbound.connections.close()
    return results
