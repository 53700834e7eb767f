"""The envelope file format: round trips (Hypothesis), the index summary agrees with
the full model, and anything else is a CodecError - never another exception."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.queue.codec import CodecError, decode, encode, summary
from maitred_tx.queue.store import QueuedMessage, QueuedRecipient, QueueReply, RecipientState
from maitred_tx.smtp.params import BodyType, Notify, Ret

texts = st.text(min_size=1, max_size=30)
times = st.floats(0, 4e9, allow_nan=False)
recipients = st.builds(
    QueuedRecipient,
    address=texts,
    orcpt=st.none() | st.tuples(st.sampled_from(["rfc822", "utf-8"]), texts),
    notify=st.none() | st.frozensets(st.sampled_from(list(Notify)), min_size=1),
    state=st.sampled_from(list(RecipientState)),
    attempts=st.integers(0, 1000),
    next_attempt_at=st.none() | times,
    last_attempt_at=st.none() | times,
    status=st.none() | st.sampled_from(["4.7.1", "5.1.1", "2.0.0"]),
    reply=st.none() | st.builds(QueueReply, st.integers(200, 599),
                                st.none() | st.just("4.4.1"), st.text(max_size=50)),
    diagnostic=st.none() | texts,
    remote_mta=st.none() | texts,
    remote_dsn=st.booleans(),
    notified=st.booleans(),
    delay_notified=st.booleans(),
)
messages = st.builds(
    QueuedMessage,
    id=st.just("1700000000.M000001P1Q1Rabcdef"),
    sender=st.none() | texts,
    recipients=st.lists(recipients, min_size=1, max_size=4).map(tuple),
    created_at=times,
    size=st.integers(0, 10**9),
    envid=st.none() | texts,
    ret=st.none() | st.sampled_from(list(Ret)),
    smtputf8=st.booleans(),
    body_type=st.none() | st.sampled_from(list(BodyType)),
    transaction_id=st.none() | texts,
    held=st.booleans(),
)


@given(messages)
def test_round_trip(message: QueuedMessage) -> None:
    raw = encode(message)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1  # one line: easy to grep
    assert decode(raw) == message


@given(messages)
def test_summary_agrees_with_the_model(message: QueuedMessage) -> None:
    entry = summary(encode(message))
    assert entry.id == message.id and entry.size == message.size
    assert entry.held == message.held
    assert entry.next_attempt_at == (None if message.done else message.next_attempt_at)


GOOD = json.loads(encode(QueuedMessage("X", "a@b", (QueuedRecipient("c@d"),), 1.0, 5)))


def mutated(path: list[object], value: object) -> bytes:
    data = json.loads(json.dumps(GOOD))
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"[]",
        b'"text"',
        mutated(["v"], 2),
        mutated(["id"], 5),
        mutated(["size"], -1),
        mutated(["size"], True),
        mutated(["created_at"], "yesterday"),
        mutated(["held"], "no"),
        mutated(["ret"], "SOME"),
        mutated(["recipients"], []),
        mutated(["recipients"], {}),
        mutated(["recipients", 0], "c@d"),
        mutated(["recipients", 0, "state"], "lost"),
        mutated(["recipients", 0, "notify"], ["SOMETIMES"]),
        mutated(["recipients", 0, "orcpt"], ["rfc822"]),
        mutated(["recipients", 0, "reply"], [250, None]),
        mutated(["recipients", 0, "next_attempt_at"], float("inf")),
        mutated(["recipients", 0, "notified"], KeyError),
        mutated(["recipients", 0, "attempts"], 1.5),
    ],
)
def test_anything_else_is_a_codec_error(raw: bytes) -> None:
    with pytest.raises(CodecError):
        decode(raw)
    with contextlib.suppress(CodecError):
        summary(raw)  # lighter: it need not notice every bad field, but raises no other
