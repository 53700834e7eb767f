"""Header-section helpers: where the header ends, fields as received, unfolding, authors."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.auth.headers import (
    HeaderField,
    from_domains,
    from_values,
    header_end,
    iter_fields,
    split_message,
    unfold,
)

MESSAGE = (b"Received: from a\r\n\tby b\r\nFrom: Alice <alice@example.com>\r\n"
           b"Subject: hi\r\n\r\nbody\r\n\r\nFrom: not@a-header.example\r\n")


def test_header_end_and_split() -> None:
    end = header_end(MESSAGE)
    assert end is not None and MESSAGE[end:].startswith(b"body")
    head, body = split_message(MESSAGE)
    assert head.endswith(b"Subject: hi\r\n") and body.startswith(b"body")
    assert header_end(b"\r\nbody") == 2
    assert header_end(b"A: b\n\nbody") == 6
    assert header_end(b"A: b\r\nC: d\r\n") is None
    assert split_message(b"A: b\r\n") == (b"A: b\r\n", b"")


def test_header_end_on_a_prefix_never_looks_past_the_empty_line() -> None:
    for cut in range(len(MESSAGE)):
        end = header_end(MESSAGE[:cut])
        assert end is None or end == header_end(MESSAGE)


def test_fields_keep_their_bytes() -> None:
    head, _ = split_message(MESSAGE)
    fields = list(iter_fields(head))
    assert [f.name for f in fields] == [b"Received", b"From", b"Subject"]
    assert fields[0] == HeaderField(b"Received", b"Received: from a\r\n\tby b\r\n",
                                    b" from a\r\n\tby b\r\n")
    assert b"".join(f.raw for f in fields) == head


def test_odd_lines() -> None:
    block = b" orphan continuation\r\nFrom x@y\r\nSubject : s\rt\r\nX:\r\n"
    fields = list(iter_fields(block))
    assert [f.name for f in fields] == [None, None, b"Subject", b"X"]
    assert fields[2].raw == b"Subject : s\rt\r\n"  # a lone CR ends no line
    assert fields[2].is_named(b"subject")


@given(st.lists(st.sampled_from([b"A: 1", b" c", b"\tc", b"B:", b"junk", b"", b"x\ry"]))
       .map(lambda lines: b"\r\n".join(lines)))
def test_fields_concatenate_to_the_block(block: bytes) -> None:
    assert b"".join(f.raw for f in iter_fields(block)) == block


def test_unfold() -> None:
    assert unfold(b" a\r\n\tb\r\n  c\r\n") == b" a\tb  c"
    assert unfold(b" a\n b\n") == b" a b"


@pytest.mark.parametrize(("value", "domains"), [
    (b"Alice <alice@Example.COM.>", ["example.com"]),
    (b"alice@example.com (Alice <x@comment.example>)", ["example.com"]),
    (b'"bob@evil.example" <bob@example.com>', ["example.com"]),
    (b'"weird@local"@example.com', ["example.com"]),
    (b"=?utf-8?q?x=40evil.example?= <a@example.com>", ["example.com"]),
    (b"Team: a@example.com, b@example.net;", ["example.com", "example.net"]),
    (b"a@example.com,\r\n\tb@EXAMPLE.com", ["example.com"]),
    (b"undisclosed-recipients:;", []),
    (b"nobody", []),
    (b"a@[192.0.2.1]", []),
    (b"<@route.example:a@example.com>", ["example.com"]),
    (b"user@m\xc3\xbcnchen.example", ["m\u00fcnchen.example"]),
    # parsers disagree on this one: every domain either sees is an author domain
    (b"a@victim.example <b@evil.example>", ["victim.example", "evil.example"]),
])
def test_from_domains(value: bytes, domains: list[str]) -> None:
    assert from_domains(b"Subject: x\r\nFrom: " + value + b"\r\nTo: c@to.example\r\n") == domains


def test_several_from_fields_and_no_from_field() -> None:
    block = b"From: a@example.com\r\nfrom: b@example.net\r\n"
    assert from_domains(block) == ["example.com", "example.net"]
    assert from_domains(b"Sender: a@example.com\r\nReply-To: b@example.net\r\n") == []


@given(st.binary(max_size=200))
def test_from_domains_never_raises(value: bytes) -> None:
    for domain in from_domains(b"From: " + value.replace(b"\n", b"\n ") + b"\r\n"):
        assert domain == domain.lower() and domain and not domain.endswith(".")


def _fields_by_lines(header_block: bytes) -> list[tuple[bytes | None, bytes]]:
    """The line-by-line reading iter_fields replaced (a field runs until a line that
    starts with no WSP after a line feed; a lone CR glues), kept as the reference."""
    lines = header_block.splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        j = i + 1
        while j < len(lines) and (lines[j][:1] in (b" ", b"\t")
                                  or not lines[j - 1].endswith(b"\n")):
            j += 1
        raw = b"".join(lines[i:j])
        m = re.match(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:", raw)
        out.append((m.group(1) if m else None, raw))
        i = j
    return out


@given(st.lists(st.sampled_from([b"From: a", b"X:", b" c", b"\t", b"\r", b"\n", b"\r\n",
                                 b"junk", b"a\rb", b":"]), max_size=20))
def test_iter_fields_agrees_with_the_line_by_line_reading(parts: list[bytes]) -> None:
    block = b"".join(parts)
    assert [(f.name, f.raw) for f in iter_fields(block)] == _fields_by_lines(block)


@given(st.lists(st.sampled_from([b"From: a@b.example", b"from :c@d.example", b"FROM", b":",
                                 b"X-From: e@f.example", b" g@h.example", b"\t", b"\r\n",
                                 b"\n", b"\r", b"Fromage: x", b"From:"]), max_size=16))
def test_from_values_are_the_from_fields_of_iter_fields(parts: list[bytes]) -> None:
    block = b"".join(parts)
    expected = [f.value for f in iter_fields(block) if f.is_named(b"From")]
    assert from_values(block) == expected
