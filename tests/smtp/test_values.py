"""fast_init: every class given one builds exactly what dataclasses' __init__ builds."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import typing
from dataclasses import InitVar, dataclass, field
from typing import Any

import pytest

import maitred_tx.envelope
import maitred_tx.outcomes
import maitred_tx.smtp.address
import maitred_tx.smtp.commands
import maitred_tx.smtp.events
import maitred_tx.smtp.params
import maitred_tx.smtp.replies
from maitred_tx.envelope import Envelope, Recipient, SessionContext
from maitred_tx.outcomes import PermanentFailure, TemporaryFailure
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.commands import MailFrom
from maitred_tx.smtp.events import HelloReceived, SessionInfo
from maitred_tx.smtp.params import MailParams, RcptParams
from maitred_tx.smtp.replies import Reply
from maitred_tx.smtp.values import GENERATED, fast_init

_MISSING: Any = object()  # a slot left unset

# Valid values for the classes whose __post_init__ checks them; every other class gets
# a distinct object per field (the constructors store, they do not look).
_VALID: dict[type, tuple[Any, ...]] = {
    Reply: (451, "4.3.0", ("Try later",)),
    TemporaryFailure: ("Try later", 452, "4.3.1"),
    PermanentFailure: ("No", 554, "5.7.1"),
}


def _slots(obj: object) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name, _MISSING) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


def _built_both_ways(cls: type, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    generated, fast = object.__new__(cls), object.__new__(cls)
    GENERATED[cls](generated, *args, **kwargs)
    cls.__init__(fast, *args, **kwargs)  # type: ignore[misc]
    return generated, fast


def _assert_same(cls: type, generated: object, fast: object) -> None:
    built, expected = _slots(fast), _slots(generated)
    for f in dataclasses.fields(cls):
        factory = f.default_factory is not dataclasses.MISSING
        if factory and built[f.name] is not expected[f.name]:
            # Each side called the factory: a new value each time (time.time, RcptParams()).
            assert type(built[f.name]) is type(expected[f.name]), f.name
        else:
            assert built[f.name] == expected[f.name], f.name


def test_the_values_of_the_core_have_it() -> None:
    # Without this, a decorator dropped from a module would only make it slower.
    for cls in (SessionContext, SessionInfo, Envelope, Recipient, Mailbox, MailParams,
                RcptParams, MailFrom, HelloReceived, Reply, TemporaryFailure):
        assert cls in GENERATED, cls
    modules = (maitred_tx.envelope, maitred_tx.outcomes, maitred_tx.smtp.address,
               maitred_tx.smtp.commands, maitred_tx.smtp.events, maitred_tx.smtp.params,
               maitred_tx.smtp.replies)
    frozen = {obj for m in modules for obj in vars(m).values()
              if isinstance(obj, type) and obj.__module__ == m.__name__
              and dataclasses.is_dataclass(obj) and obj.__dataclass_params__.frozen}
    assert frozen <= set(GENERATED)


@pytest.mark.parametrize("cls", sorted(GENERATED, key=lambda c: c.__qualname__),
                         ids=lambda c: c.__qualname__)
def test_same_signature_as_the_generated_init(cls: type) -> None:
    ours = inspect.signature(cls.__init__)
    theirs = inspect.signature(GENERATED[cls])
    assert [(p.name, p.kind) for p in ours.parameters.values()] == [
        (p.name, p.kind) for p in theirs.parameters.values()]
    for p, q in zip(ours.parameters.values(), theirs.parameters.values(), strict=True):
        if repr(q.default) == "<factory>":
            assert repr(p.default) == "<factory>"
        else:
            assert p.default is q.default, p.name
    assert cls.__init__.__annotations__ == GENERATED[cls].__annotations__
    # The annotations resolve where the class's do (the module's globals).
    assert typing.get_type_hints(cls.__init__) == typing.get_type_hints(GENERATED[cls])


@pytest.mark.parametrize("cls", sorted(GENERATED, key=lambda c: c.__qualname__),
                         ids=lambda c: c.__qualname__)
def test_same_value_as_the_generated_init(cls: type) -> None:
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    every = _VALID.get(cls) or tuple(object() for _ in init_fields)
    # Every argument given, positionally and by keyword.
    _assert_same(cls, *_built_both_ways(cls, *every))
    _assert_same(cls, *_built_both_ways(
        cls, **{f.name: v for f, v in zip(init_fields, every, strict=True)}))
    # Only what has no default: the defaults, the factories and init=False fields.
    required = [v for f, v in zip(init_fields, every, strict=True)
                if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    _assert_same(cls, *_built_both_ways(cls, *required))
    # And what dataclasses refuses, it refuses too.
    with pytest.raises(TypeError):
        cls(*every, object())
    if required:
        with pytest.raises(TypeError):
            cls(*required[:-1])


def test_still_frozen_hashable_replaceable_and_picklable() -> None:
    ctx = SessionContext("S1", "mx.test", "192.0.2.1", 25000, helo="client.test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.helo = "other"  # type: ignore[misc]
    assert dataclasses.replace(ctx, helo="b").helo == "b"
    assert pickle.loads(pickle.dumps(ctx)) == ctx
    box = Mailbox("joe", "example.org")
    assert str(box) == "joe@example.org"  # the init=False cache starts empty
    assert hash(box) == hash(Mailbox("joe", "example.org"))
    assert pickle.loads(pickle.dumps(box)) == box
    env = Envelope(ctx, "M1", box, MailParams(), (Recipient(box),))
    assert type(env.received_at) is float and env.recipients[0].params == RcptParams()
    with pytest.raises(ValueError):
        Reply(700, None, ("x",))  # __post_init__ still runs


def test_every_kind_of_field() -> None:
    calls: list[str] = []

    def made() -> list[str]:
        calls.append("factory")
        return ["made"]

    @dataclass(frozen=True, slots=True)
    class Kinds:
        a: int
        b: str = "b"
        c: list[str] = field(default_factory=made)
        d: int = field(default=4, init=False)
        e: list[str] = field(default_factory=made, init=False)
        f: int | None = field(default=None, init=False, repr=False)  # left as default
        g: int = field(default=7, kw_only=True)
        h: int = field(kw_only=True)

        def __post_init__(self) -> None:
            calls.append(f"post {self.a}")

    fast = fast_init(Kinds)
    assert str(inspect.signature(fast.__init__)) == str(
        inspect.signature(GENERATED[Kinds]))
    calls.clear()
    generated, ours = _built_both_ways(Kinds, 1, h=8)
    assert calls == ["factory", "factory", "post 1"] * 2
    assert _slots(ours) == _slots(generated) == {
        "a": 1, "b": "b", "c": ["made"], "d": 4, "e": ["made"], "f": None, "g": 7, "h": 8}
    given: list[str] = []
    assert fast(1, "x", given, g=9, h=8).c is given  # type: ignore[call-arg]


def test_refuses_what_it_cannot_copy() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        b: InitVar[int]

        def __post_init__(self, b: int) -> None:
            pass

    # dataclasses renames a field called "self" in its __init__; this one refuses it.
    WithSelf = dataclasses.make_dataclass("WithSelf", ["self"], frozen=True, slots=True)

    for cls in (NoSlots, NotFrozen, WithInitVar, WithSelf, int):
        with pytest.raises(TypeError):
            fast_init(cls)
