"""Calling application code that may answer now, with a Deferred, or with a coroutine."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from inspect import isawaitable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed

__all__ = ["call"]


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def call(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Always a Deferred; an exception raised or a failed awaitable becomes its failure."""
    try:
        result = fn(*args)
    except Exception:
        return fail()
    if isinstance(result, Deferred):
        return result
    if isawaitable(result):
        return ensureDeferred(_await(result))
    return succeed(result)
