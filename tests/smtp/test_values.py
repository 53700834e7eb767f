"""fast_init: the generated __init__ takes exactly the dataclass's fields, with its
defaults, and leaves the values as frozen as before."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from maitred_tx.envelope import Envelope, Recipient
from maitred_tx.smtp.commands import MailFrom, RcptTo
from maitred_tx.smtp.events import (
    MailReceived,
    MessageComplete,
    MessageData,
    MessageStarted,
    RcptReceived,
)
from maitred_tx.smtp.params import MailParams
from maitred_tx.smtp.values import fast_init

FAST = [Envelope, Recipient, MailFrom, RcptTo, MailParams, MailReceived, RcptReceived,
        MessageStarted, MessageData, MessageComplete]


@pytest.mark.parametrize("cls", FAST, ids=lambda c: c.__name__)
def test_init_takes_the_fields(cls: Any) -> None:
    """A field added to the dataclass is a parameter of __init__, with its default."""
    assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
    assert "fast_init" in (cls.__init__.__doc__ or "")
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        if f.default is not dataclasses.MISSING:
            assert p.default is f.default
        elif f.default_factory is dataclasses.MISSING:
            assert p.default is inspect.Parameter.empty


def _pair() -> tuple[Any, Any]:
    def make() -> Any:
        @dataclasses.dataclass(frozen=True, slots=True)
        class Value:
            a: int
            b: str = "b"
            c: list[int] = dataclasses.field(default_factory=list)
            d: int | None = None

        return Value

    return make(), fast_init(make())


def test_same_values_as_the_dataclass_init() -> None:
    plain, fast = _pair()
    cases: list[tuple[tuple[object, ...], dict[str, object]]] = [
        ((1,), {}), ((1, "x"), {"d": 4}), ((), {"a": 2, "c": [1]})
    ]
    for args, kwargs in cases:
        assert dataclasses.astuple(fast(*args, **kwargs)) == dataclasses.astuple(
            plain(*args, **kwargs)
        )
    assert fast(1).c is not fast(1).c  # the factory is called per value
    with pytest.raises(TypeError):
        fast()
    with pytest.raises(TypeError):
        fast(1, e=2)


def test_still_frozen() -> None:
    _, fast = _pair()
    value = fast(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.a = 2
    assert dataclasses.replace(value, a=3).a == 3
    assert hash(fast(1, "x", (), 2)) == hash(fast(1, "x", (), 2))


def test_refuses_what_it_does_not_generate() -> None:
    @dataclasses.dataclass(slots=True)
    class Mutable:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True, slots=True)
    class KeywordOnly:
        a: int = dataclasses.field(kw_only=True)

    for cls in (Mutable, Checked, KeywordOnly):
        with pytest.raises(TypeError):
            fast_init(cls)
