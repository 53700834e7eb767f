"""Frozen dataclasses that are cheap to build: :func:`fast_init`.

The server builds a dozen small immutable values per message (commands, events,
parameters, the envelope) and more per connection (SessionContext has fifteen fields
and is built twice).  A frozen dataclass's generated ``__init__`` stores every field
with ``object.__setattr__(self, name, value)``, because its own ``__setattr__``
refuses: measured here at about a third of a microsecond per field, 5 us for one
SessionContext.  In a slotted class each field is a slot whose descriptor can store
the value itself (``descriptor.__set__(self, value)``), at about half that cost.

``fast_init`` gives a frozen, slotted dataclass such an ``__init__``, with the same
parameters, defaults, default factories, ``init=False`` defaults and ``__post_init__``
call as the generated one.  Nothing else changes: the class stays frozen (its
``__setattr__`` still refuses), and equality, hashing, repr, pickling and
``dataclasses.replace`` are dataclasses' own.  Every class it is applied to is held
to the generated ``__init__`` by tests/smtp/test_values.py (``GENERATED`` keeps it).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["GENERATED", "fast_init"]

_T = TypeVar("_T")

# Each class given a fast __init__, with the one dataclasses generated for it.
GENERATED: dict[type, Callable[..., None]] = {}


class _Factory:
    """The default of a parameter whose field has a default_factory (as dataclasses'
    own marker, it shows as ``<factory>`` in the signature)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


def fast_init(cls: type[_T]) -> type[_T]:
    """Replace the generated ``__init__`` of a frozen, slotted dataclass (apply it
    above ``@dataclass(frozen=True, slots=True)``).  Anything else is a TypeError at
    import time, never a silently different constructor."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__qualname__}: fast_init needs @dataclass(frozen=True, slots=True)")
    generated = cls.__dict__["__init__"]
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    init_fields = [f for f in fields if f.init]
    if list(inspect.signature(generated).parameters)[1:] != [f.name for f in init_fields]:
        raise TypeError(f"{cls.__qualname__}: InitVar fields are not supported")
    if any(f.name == "self" or f.name.startswith("__fi_") for f in fields):
        raise TypeError(f"{cls.__qualname__}: a field name clashes with the generated code")
    helpers: dict[str, Any] = {"__fi_factory": _FACTORY}
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    for f in fields:
        setter = f"__fi_set_{f.name}"
        helpers[setter] = _slot(cls, f.name).__set__
        # What the field gets when no argument gives it one: a factory's call, the
        # default, or nothing.
        has_factory = f.default_factory is not dataclasses.MISSING
        if has_factory:
            helpers[f"__fi_factory_{f.name}"] = f.default_factory
            fill: str | None = f"__fi_factory_{f.name}()"
        elif f.default is not dataclasses.MISSING:
            helpers[f"__fi_default_{f.name}"] = f.default
            fill = f"__fi_default_{f.name}"
        else:
            fill = None
        if f.init:
            if has_factory:  # the marker as the default: the factory runs per call
                default = "=__fi_factory"
                value = f"{fill} if {f.name} is __fi_factory else {f.name}"
            else:
                default, value = ("" if fill is None else f"={fill}"), f.name
            (keyword if f.kw_only else positional).append(f"{f.name}{default}")
        elif fill is not None:
            value = fill
        else:
            continue  # init=False without a default: left unset, as dataclasses does
        body.append(f"        {setter}(self, {value})")
    if hasattr(cls, "__post_init__"):
        body.append("        self.__post_init__()")
    signature = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    # As dataclasses builds its own: the helpers are closure variables of a maker
    # function, and __init__'s globals are the class's module, where its annotations
    # resolve (typing.get_type_hints).
    source = (
        f"def __fi_make({', '.join(helpers)}):\n"
        f"    def __init__({signature}):\n" + ("\n".join(body) or "        pass") + "\n"
        "    return __init__\n"
    )
    made: dict[str, Any] = {}
    module = sys.modules.get(cls.__module__)
    exec(source, vars(module) if module is not None else {}, made)
    init = made["__fi_make"](**helpers)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = dict(generated.__annotations__)
    init.__doc__ = generated.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    GENERATED[cls] = generated
    return cls


def _slot(cls: type, name: str) -> types.MemberDescriptorType:
    for klass in cls.__mro__:
        descriptor = klass.__dict__.get(name)
        if isinstance(descriptor, types.MemberDescriptorType):
            return descriptor
    raise TypeError(f"{cls.__qualname__}.{name} is not a slot")
