"""The verdict cache (issue 13): which messages may be judged from it, how long a
verdict is kept, and that what it gives back is what the checks computed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from maitred_tx.auth import spf
from maitred_tx.auth.dmarc import DMARCVerdict, check_dmarc_authors, parse_dmarc_record
from maitred_tx.auth.resolver import Record, ZoneResolver
from maitred_tx.auth.verdictcache import (
    MAX_FROM_OCTETS,
    NO_LOOKUP_LIFETIME,
    VerdictCache,
    verdict_key,
)
from maitred_tx.auth.verdicts import AuthResults, SPFRequest, check_message
from maitred_tx.smtp.config import AuthChecks

HEAD = b"From: Alice <a@sender.test>\r\nTo: u@mx.test\r\nSubject: one\r\n\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Expiries:
    """A resolver's ``expires``: answers cached until given times (None: not cached)."""

    def __init__(self) -> None:
        self.until: dict[tuple[str, str], float] = {}

    def expires(self, name: str, rtype: str) -> float | None:
        return self.until.get((name, rtype))


def key(head: bytes = HEAD, mail_from: str | None = "a@sender.test") -> tuple:
    k = verdict_key(head, "192.0.2.1", "client.test", mail_from, "mx.test")
    assert k is not None
    return k


def results(dmarc_result: str = "none", pct: int = 100, error: str | None = None
            ) -> AuthResults:
    verdict = spf.SPFVerdict(spf.SPFResult.NONE, "mailfrom", "sender.test", error=error)
    record = parse_dmarc_record(f"v=DMARC1; p=reject; pct={pct}") if pct < 100 else None
    dmarc = DMARCVerdict(dmarc_result, "sender.test", None, "none", record, False, False)  # type: ignore[arg-type]
    return AuthResults(verdict, verdict, "a@sender.test", (), None, dmarc)


# --- which messages have a key --------------------------------------------------------


def test_the_body_subject_and_other_fields_are_not_part_of_the_key() -> None:
    other = b"From: Alice <a@sender.test>\r\nTo: v@mx.test\r\nSubject: two\r\nX: y\r\n\r\n"
    assert key(HEAD) == key(other)


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h.replace(b"a@sender", b"b@sender"),  # another author
        lambda h: h.replace(b"Alice", b"Bob"),  # the From: field as sent, not as parsed
    ],
)
def test_the_from_field_is_part_of_the_key(change) -> None:
    assert key(change(HEAD)) != key(HEAD)


def test_envelope_and_client_are_part_of_the_key() -> None:
    base = verdict_key(HEAD, "192.0.2.1", "client.test", "a@sender.test", "mx.test")
    for other in [
        verdict_key(HEAD, "192.0.2.2", "client.test", "a@sender.test", "mx.test"),
        verdict_key(HEAD, "192.0.2.1", "other.test", "a@sender.test", "mx.test"),
        verdict_key(HEAD, "192.0.2.1", "client.test", "b@sender.test", "mx.test"),
        verdict_key(HEAD, "192.0.2.1", "client.test", None, "mx.test"),
        verdict_key(HEAD, "192.0.2.1", "client.test", "a@sender.test", "mx2.test"),
    ]:
        assert other is not None and other != base


@pytest.mark.parametrize(
    "extra",
    [
        b"DKIM-Signature: v=1; d=sender.test\r\n",
        b"dkim-signature: v=1\r\n",
        b"ARC-Seal: i=1\r\n",
        b"X-Note: mentions ARC-Seal only in a value\r\n",  # errs on the side of signed
    ],
)
def test_a_message_that_may_be_signed_has_no_key(extra: bytes) -> None:
    assert verdict_key(extra + HEAD, "192.0.2.1", "h", "a@sender.test", "mx.test") is None


@pytest.mark.parametrize(
    "head",
    [
        b"From: a@sender.test\r\nFrom: b@other.test\r\n\r\n",  # two From: fields
        b"From: a@sender.test, b@other.test\r\n\r\n",  # two authors
        b"From: authors: a@sender.test;\r\n\r\n",  # a group
        b"From: <" + b"a" * MAX_FROM_OCTETS + b"@sender.test>\r\n\r\n",
    ],
)
def test_several_authors_or_a_huge_from_have_no_key(head: bytes) -> None:
    assert verdict_key(head, "192.0.2.1", "h", "a@sender.test", "mx.test") is None


# --- how long a verdict is kept ---------------------------------------------------------


def test_kept_until_the_first_answer_it_used_expires() -> None:
    clock = Clock()
    cache = VerdictCache(10, clock)
    asked = [("sender.test", "TXT"), ("_dmarc.sender.test", "TXT")]
    resolver = Expiries()
    resolver.until = {("sender.test", "TXT"): 1300.0, ("_dmarc.sender.test", "TXT"): 1030.0}
    kept = cache.put(key(), results(), "mx.test", asked, resolver)
    assert kept is not None and kept.expires == 1030.0
    assert kept.header.startswith(b"Authentication-Results: mx.test;")
    clock.now = 1029.9
    assert cache.get(key()) is kept
    clock.now = 1030.0
    assert cache.get(key()) is None
    assert len(cache) == 0


def test_not_kept_when_an_answer_it_used_is_not_cached() -> None:
    cache = VerdictCache(10, Clock())
    resolver = Expiries()
    resolver.until = {("sender.test", "TXT"): 2000.0}
    asked = [("sender.test", "TXT"), ("_dmarc.sender.test", "TXT")]
    assert cache.put(key(), results(), "mx.test", asked, resolver) is None
    assert cache.get(key()) is None


def test_a_verdict_without_lookups_is_renewed_hourly() -> None:
    clock = Clock()
    cache = VerdictCache(10, clock)
    kept = cache.put(key(), results(), "mx.test", [], Expiries())
    assert kept is not None and kept.expires == clock.now + NO_LOOKUP_LIFETIME


@pytest.mark.parametrize(
    ("made", "kept"),
    [
        (results(), True),
        (results("fail", pct=100), True),
        (results("fail", pct=50), False),  # pct sampled this message alone
        (results("pass", pct=50), True),  # a pass is never sampled
        (results(error="Traceback ..."), False),  # a bug, not a DNS outcome
    ],
)
def test_only_repeatable_verdicts_are_kept(made: AuthResults, kept: bool) -> None:
    cache = VerdictCache(10, Clock())
    assert (cache.put(key(), made, "mx.test", [], Expiries()) is not None) is kept


def test_the_oldest_verdict_goes_first_when_full() -> None:
    cache = VerdictCache(2, Clock())
    keys = [key(mail_from=f"{i}@sender.test") for i in range(3)]
    for k in keys:
        cache.put(k, results(), "mx.test", [], Expiries())
    assert len(cache) == 2
    assert cache.get(keys[0]) is None
    assert cache.get(keys[1]) is not None and cache.get(keys[2]) is not None


def test_a_size_of_zero_keeps_nothing() -> None:
    cache = VerdictCache(0, Clock())
    assert cache.put(key(), results(), "mx.test", [], Expiries()) is None


# --- what is kept is what the checks computed --------------------------------------------


class Counting:
    """A zone resolver that counts its lookups."""

    def __init__(self, zone: dict[tuple[str, str], list[Record]]) -> None:
        self.inner = ZoneResolver(zone)
        self.asked: list[tuple[str, str]] = []

    async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
        self.asked.append((name, rtype))
        return await self.inner.lookup(name, rtype)


def test_the_kept_field_is_the_one_check_message_writes() -> None:
    zone: dict[tuple[str, str], list[Record]] = {
        ("sender.test", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
        ("client.test", "TXT"): ["v=spf1 -all"],
        ("_dmarc.sender.test", "TXT"): ["v=DMARC1; p=quarantine"],
    }
    resolver = Counting(zone)

    async def no_cpu(fn):  # no signature: never called
        raise AssertionError("no CPU work for an unsigned message")

    async def read() -> bytes:
        raise AssertionError("an unsigned message is not read whole")

    request = SPFRequest("192.0.2.1", "a@sender.test", "client.test", "mx.test")
    verdict = asyncio.run(check_message(
        resolver, no_cpu, first=HEAD + b"body\r\n", size=len(HEAD) + 6, read=read,
        spf=request, mail_from="a@sender.test", settings=AuthChecks(), authserv_id="mx.test"))
    assert verdict.results is not None
    assert verdict.results.dmarc.result == "pass"
    expiries = Expiries()
    expiries.until = {k: 5000.0 for k in resolver.asked}
    cache = VerdictCache(10, Clock())
    kept = cache.put(key(), verdict.results, "mx.test", set(resolver.asked), expiries)
    assert kept is not None
    assert verdict.prefix == kept.header + HEAD
    assert kept.temporary == ()


def test_dmarc_sampling_is_per_message() -> None:
    """Why a failing pct<100 verdict is not kept: the same inputs give two dispositions."""
    zone: dict[tuple[str, str], list[Record]] = {
        ("_dmarc.sender.test", "TXT"): ["v=DMARC1; p=reject; pct=50"],
    }
    resolver = ZoneResolver(zone)

    def verdict(sample: float) -> DMARCVerdict:
        return asyncio.run(check_dmarc_authors(
            resolver, ["sender.test"], spf_domain=None, spf_pass=False,
            dkim_pass_domains=[], sample=lambda: sample))

    assert verdict(0.1).disposition == "reject"
    assert verdict(0.9).disposition != "reject"
