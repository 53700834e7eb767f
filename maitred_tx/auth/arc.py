"""ARC chain validation (RFC 8617 5.2), with dkimpy's ARC verifier doing the crypto.

Like ``maitred_tx.auth.dkim``: the keys named by every ARC-Seal and
ARC-Message-Signature (``s._domainkey.d``) are fetched first through our ``Resolver``,
concurrently; dkimpy's ``ARC.verify`` then runs inside the caller's ``run_cpu`` with a
``dnsfunc`` answering from those records.  A temporary DNS failure makes the signature
that needed the key unverifiable, so the chain fails; the reason says so.

The result is the chain validation status of RFC 8617 4.4 (``none``, ``pass``, ``fail``).
dkimpy returns no status when an ARC-Seal carries ``cv=fail`` (the chain was already
broken upstream): that is ``fail`` here (RFC 8617 5.2 step 2).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import dkim

from maitred_tx.auth.dkim import (
    CPURunner,
    KeyAnswer,
    KeyTemporary,
    fetch_keys,
    format_error,
    header_fields,
    key_names,
    make_dnsfunc,
)
from maitred_tx.auth.resolver import Resolver

__all__ = ["ARCResult", "ARCResultValue", "verify_arc"]

ARCResultValue: TypeAlias = Literal["none", "pass", "fail"]

_ARC_SIGNATURES = (b"arc-seal", b"arc-message-signature")
_ARC_HEADERS = (*_ARC_SIGNATURES, b"arc-authentication-results")
# RFC 8617 4.2.1: instance values run from 1 to 50.
_MAX_INSTANCES = 50


@dataclass(frozen=True, slots=True)
class ARCResult:
    """The chain validation status of a message (RFC 8617 4.4, 5.2).

    ``instances`` is the highest ARC Set instance found (0: none).  ``oldest_pass``
    (RFC 8617 5.2 step 6, reported as ``arc.oldest-pass``) is set only when the chain
    passes: 0 when every ARC-Message-Signature still validates, else the lowest
    instance from which all newer AMSs validate.
    """

    result: ARCResultValue
    instances: int
    oldest_pass: int | None = None
    reason: str | None = None


async def verify_arc(message: bytes, resolver: Resolver, run_cpu: CPURunner) -> ARCResult:
    """Validates the ARC chain of ``message`` (the whole message as received)."""
    fields = [(n.lower(), v) for n, v in header_fields(message)]
    if not any(n in _ARC_HEADERS for n, _ in fields):
        return ARCResult("none", 0, None, "message is not ARC signed")
    signature_values = [v for n, v in fields if n in _ARC_SIGNATURES]
    # Each instance has one seal and one AMS; a longer list is broken anyway (and
    # dkimpy stops at the first bad set), so bound the lookups.
    keys = await fetch_keys(key_names(signature_values[: 2 * _MAX_INSTANCES]), resolver)
    return await run_cpu(lambda: _verify_chain(message, keys))


def _verify_chain(message: bytes, keys: dict[bytes, KeyAnswer]) -> ARCResult:
    temporary = [k.reason for k in keys.values() if isinstance(k, KeyTemporary)]
    try:
        arc = dkim.ARC(message)
        instances, _ = arc.sorted_arc_headers()
        cv, sets, reason = arc.verify(dnsfunc=make_dnsfunc(keys))
    except (dkim.DKIMException, IndexError) as e:
        return ARCResult("fail", 0, None, _with_temporary(format_error(e), temporary))
    if cv == dkim.CV_None:
        return ARCResult("none", instances, None, reason)
    if cv == dkim.CV_Pass:
        return ARCResult("pass", instances, _oldest_pass(sets), None)
    return ARCResult("fail", instances, None, _with_temporary(reason, temporary))


def _oldest_pass(sets: list[dict[str, Any]]) -> int:
    """``sets`` are dkimpy's per-instance results, newest first."""
    for newer, older in itertools.pairwise(sets):
        if not older["ams-valid"]:
            return int(newer["instance"])
    return 0


def _with_temporary(reason: str, temporary: list[str]) -> str:
    if temporary:
        return f"{reason}; temporary DNS failure: {'; '.join(temporary)}"
    return reason
