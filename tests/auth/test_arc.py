"""ARC chain validation against ValiMail's arc_test_suite (all 171 validation cases).

Each scenario's ``txt-records`` become a ZoneResolver; each case's message (LF in the
YAML) is verified with CRLF line ends, and the chain status must equal the case's
``cv``.  The three cases with a blank ``cv`` are ARC-Seals carrying cv=fail, which
RFC 8617 5.2 reads as a failed chain.  A verifier answering "fail" to everything would
score 109/171, so the summary checks the pass / fail / none split as well as the total.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from maitred_tx.auth.arc import ARCResult, verify_arc
from maitred_tx.auth.resolver import ZoneResolver

yaml = pytest.importorskip("yaml", reason="PyYAML (test extra) reads the ARC test suite")

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "arc"
SUITE = VECTORS / "arc-draft-validation-tests.yml"

T = TypeVar("T")


async def inline(fn: Callable[[], T]) -> T:
    return fn()


def load_cases() -> list[tuple[str, dict[str, list[str]], bytes, str]]:
    if not SUITE.exists():
        return []
    cases = []
    with SUITE.open(encoding="utf-8") as f:
        for scenario in yaml.safe_load_all(f):
            records = {name: [value] for name, value in scenario["txt-records"].items()}
            for case_id, case in scenario["tests"].items():
                text = (case["message"] or "").replace("\r\n", "\n").replace("\n", "\r\n")
                expected = (case.get("cv") or "fail").strip().lower()
                cases.append((case_id, records, text.encode("utf-8"), expected))
    return cases


CASES = load_cases()
needs_suite = pytest.mark.skipif(not CASES, reason=f"ARC test suite not found at {SUITE}")


def run(records: dict[str, list[str]], message: bytes) -> ARCResult:
    zone: dict[tuple[str, str], Any] = {(name, "TXT"): values for name, values in records.items()}
    return asyncio.run(verify_arc(message, ZoneResolver(zone), inline))


@needs_suite
@pytest.mark.parametrize(
    ("records", "message", "expected"),
    [pytest.param(r, m, e, id=f"{e}-{i}") for i, r, m, e in CASES],
)
def test_arc_suite_case(records: dict[str, list[str]], message: bytes, expected: str) -> None:
    result = run(records, message)
    assert result.result == expected, result.reason


@needs_suite
def test_arc_suite_summary() -> None:
    expected = collections.Counter(e for *_, e in CASES)
    agreed = collections.Counter(e for _, r, m, e in CASES if run(r, m).result == e)
    assert sum(expected.values()) == 171
    assert expected == {"pass": 54, "fail": 112, "none": 5}
    assert agreed == expected


# -- beyond the suite -------------------------------------------------------------


def first_pass_case() -> tuple[dict[str, list[str]], bytes]:
    for case_id, records, message, expected in CASES:
        if case_id == "cv_pass_i1_1" and expected == "pass":
            return records, message
    pytest.skip("cv_pass_i1_1 not in the suite")


@needs_suite
def test_pass_reports_instances_and_oldest_pass() -> None:
    records, message = first_pass_case()
    result = run(records, message)
    assert result == ARCResult("pass", 1, 0, None)


@needs_suite
def test_temporary_dns_failure_fails_the_chain_and_says_why() -> None:
    records, message = first_pass_case()
    zone: dict[tuple[str, str], Any] = {(n, "TXT"): v for n, v in records.items()}
    resolver = ZoneResolver(zone, temporary=list(records))
    result = asyncio.run(verify_arc(message, resolver, inline))
    assert result.result == "fail"
    assert result.reason is not None and "temporary DNS failure" in result.reason


@needs_suite
def test_keys_are_looked_up_once_through_the_resolver() -> None:
    records, message = first_pass_case()
    zone: dict[tuple[str, str], Any] = {(n, "TXT"): v for n, v in records.items()}
    resolver = ZoneResolver(zone)
    asyncio.run(verify_arc(message, resolver, inline))
    assert resolver.lookups == [("dummy._domainkey.example.org", "TXT")]


def test_unsigned_message_is_none_without_lookups() -> None:
    resolver = ZoneResolver({})
    message = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    result = asyncio.run(verify_arc(message, resolver, inline))
    assert result == ARCResult("none", 0, None, "message is not ARC signed")
    assert resolver.lookups == []
