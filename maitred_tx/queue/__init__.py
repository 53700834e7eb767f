"""The durable outbound queue: data model and store interface (``store``), the
embedded spool directory store (``spool``), retry schedule (``schedule``), DSN
messages (``dsn``), the reactor-facing wrapper (``threaded``) and the CLI (``cli``).

Only the pure data model and schedule are re-exported here; the Twisted-facing
``threaded`` and the delivery (``maitred_tx.delivery.queue``) are imported by name.
"""

from maitred_tx.queue.schedule import DelayWarning, RetryPolicy
from maitred_tx.queue.store import (
    AttemptResult,
    MessageWriter,
    QueuedMessage,
    QueuedRecipient,
    QueueEnvelope,
    QueueReply,
    QueueStore,
    RecipientState,
)

__all__ = [
    "AttemptResult",
    "DelayWarning",
    "MessageWriter",
    "QueueEnvelope",
    "QueueReply",
    "QueueStore",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientState",
    "RetryPolicy",
]
