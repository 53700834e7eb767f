"""Calling application code that may answer now, with a Deferred, or with a coroutine.

A delivery that answers at once is the common case (and every benchmark's), so its
answer is used at once: no Deferred is made unless the application made one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from inspect import isawaitable
from typing import Any, TypeAlias, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

__all__ = ["Eventually", "then"]

_T = TypeVar("_T")
Eventually: TypeAlias = "_T | Deferred[_T]"  # a value now, or later


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def then(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    on_result: Callable[[Any], _T],
    on_failure: Callable[[Failure], _T],
) -> Eventually[_T]:
    """``on_result(fn(*args))``, or ``on_failure`` if either raises or the answer fails;
    a Deferred only when *fn* answered with a Deferred or an awaitable."""
    try:
        result = fn(*args)
    except Exception:
        return on_failure(Failure())
    if isawaitable(result) and not isinstance(result, Deferred):
        result = ensureDeferred(_await(result))
    if isinstance(result, Deferred):
        return result.addCallback(on_result).addErrback(on_failure)
    try:
        return on_result(result)
    except Exception:
        return on_failure(Failure())
