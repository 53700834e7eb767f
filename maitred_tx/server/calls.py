"""Calling application code that may answer now, with a Deferred, or with a coroutine.

A delivery that answers at once is the common case (and every benchmark's), so its
answer is used at once: no Deferred is made unless the application made one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from inspect import isawaitable
from types import GeneratorType
from typing import Any, TypeAlias, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

__all__ = ["Eventually", "is_deferred", "is_later", "settle", "then"]

_T = TypeVar("_T")
Eventually: TypeAlias = "_T | Deferred[_T]"  # a value now, or later


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


# Deferred and Awaitable are ABCs: isinstance() against them costs a microsecond or so
# for every plain answer.  Asked once per type instead (the set of types a program
# answers with is small); a generator is looked at one by one (see then()).
_LATER: dict[type, bool] = {}


def _may_be_later(cls: type) -> bool:
    later = _LATER.get(cls)
    if later is None:
        later = _LATER[cls] = issubclass(cls, (Deferred, Awaitable, GeneratorType))
    return later


def is_deferred(value: object) -> bool:
    """``isinstance(value, Deferred)``, without the ABC check for plain values."""
    return _may_be_later(type(value)) and isinstance(value, Deferred)


def is_later(value: object) -> bool:
    """Whether *value* is an answer still to come (a Deferred or an awaitable), without
    the ABC checks for plain values."""
    return _may_be_later(type(value)) and (isinstance(value, Deferred) or isawaitable(value))


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
    return settle(result, on_result, on_failure)


def settle(
    result: Any, on_result: Callable[[Any], _T], on_failure: Callable[[Failure], _T]
) -> Eventually[_T]:
    """The second half of :func:`then`, for a *result* the caller already has."""
    if _may_be_later(type(result)):
        if isawaitable(result) and not isinstance(result, Deferred):
            result = ensureDeferred(_await(result))
        if isinstance(result, Deferred):
            return result.addCallback(on_result).addErrback(on_failure)
    try:
        return on_result(result)
    except Exception:
        return on_failure(Failure())
