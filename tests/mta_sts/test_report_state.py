"""The TLS report's counts saved and read back (``report.dump_state`` / ``load_state``):
round trips with failure details and policy-less domains, MAX_DETAILS on load and on
merge, and malformed files refused with a ValueError that says what is wrong."""

from __future__ import annotations

import contextlib
import json
import random
from datetime import UTC, datetime

import pytest

from maitred_tx.mta_sts.policy import Mode, Policy
from maitred_tx.mta_sts.report import (
    MAX_DETAILS,
    FailureDetail,
    ResultType,
    TlsReport,
    dump_state,
    load_state,
)

ENFORCE = Policy(Mode.ENFORCE, ("mx.example.com", "*.example.net"), 86400, (("k", "v w"),))
SINCE = 1796594400.0  # 2026-12-06 22:00:00 UTC
EXPIRED = FailureDetail(ResultType.CERTIFICATE_EXPIRED, "mx.example.com", "192.0.2.1",
                        "198.51.100.7", "expired 2026-11-30")
FETCH = FailureDetail(ResultType.STS_POLICY_FETCH_ERROR, reason="HTTP 404")


def _rendered(report: TlsReport, domain: str) -> dict[str, object]:
    moment = datetime(2026, 12, 6, tzinfo=UTC)
    return report.render(domain, organization="Org", contact="a@b.example", report_id="id",
                         start=moment, end=moment)


def _sample() -> TlsReport:
    report = TlsReport()
    report.record_success("Example.COM", ENFORCE)
    report.record_success("example.com", ENFORCE)
    report.record_failure("example.com", ENFORCE, EXPIRED)
    report.record_failure("example.com", ENFORCE, EXPIRED)
    report.record_failure("example.com", None, FETCH)  # same domain, no policy applied
    report.record_success("bücher.example", None)  # a U-label: kept as its A-label
    return report


def test_round_trip_keeps_counts_details_and_policy_less_domains() -> None:
    report = _sample()
    again, since = load_state(dump_state(report, SINCE))
    assert since == SINCE
    assert again.domains() == report.domains() == ["example.com", "xn--bcher-kva.example"]
    for domain in report.domains():
        assert _rendered(again, domain) == _rendered(report, domain)
        assert again.failures(domain) == report.failures(domain)
    assert again.failures("example.com") == {EXPIRED: 2, FETCH: 1}
    # recording goes on into the same entries, not beside them
    again.record_failure("example.com", ENFORCE, EXPIRED)
    assert again.failures("example.com")[EXPIRED] == 3
    assert len(_rendered(again, "example.com")["policies"]) == 2  # type: ignore[arg-type]


def test_the_file_is_versioned_json() -> None:
    data = json.loads(dump_state(TlsReport(), SINCE))
    assert data == {"version": 1, "since": SINCE, "sessions": []}
    assert load_state(dump_state(TlsReport(), SINCE))[0].domains() == []


def test_every_change_is_counted() -> None:
    report = TlsReport()
    seen = [report.changes]
    report.record_success("example.com", None)
    seen.append(report.changes)
    report.record_failure("example.com", None, FETCH)
    seen.append(report.changes)
    report.take()
    seen.append(report.changes)
    assert seen == sorted(set(seen))


def test_merge_adds_counts_and_keeps_the_details_bound() -> None:
    report, other = _sample(), _sample()
    report.merge(other)
    assert report.failures("example.com") == {EXPIRED: 4, FETCH: 2}
    summary = _rendered(report, "example.com")["policies"][0]["summary"]  # type: ignore[index]
    assert summary == {"total-successful-session-count": 4, "total-failure-session-count": 4}
    full, more = TlsReport(), TlsReport()
    for n in range(MAX_DETAILS):
        full.record_failure("example.com", None, FailureDetail(ResultType.STARTTLS_NOT_SUPPORTED,
                                                               f"mx{n}.example.com"))
    more.record_failure("example.com", None, FailureDetail(ResultType.STARTTLS_NOT_SUPPORTED,
                                                           "new.example.com"))
    full.merge(more)
    assert len(full.failures("example.com")) == MAX_DETAILS
    summary = _rendered(full, "example.com")["policies"][0]["summary"]  # type: ignore[index]
    assert summary["total-failure-session-count"] == MAX_DETAILS + 1


def test_a_full_report_round_trips_and_one_detail_more_is_refused() -> None:
    report = TlsReport()
    for n in range(MAX_DETAILS + 5):
        report.record_failure("example.com", None,
                              FailureDetail(ResultType.VALIDATION_FAILURE, f"mx{n}.example.com"))
    again, _ = load_state(dump_state(report, SINCE))
    assert again.failures("example.com") == report.failures("example.com")
    assert len(again.failures("example.com")) == MAX_DETAILS
    data = json.loads(dump_state(report, SINCE))
    data["sessions"][0]["details"].append(
        {"result_type": "validation-failure", "mx_host": "extra.example.com", "count": 1})
    with pytest.raises(ValueError, match=r"sessions\[0\]: details: not a list of at most 100"):
        load_state(json.dumps(data).encode())


def _good() -> dict[str, object]:
    data: dict[str, object] = json.loads(dump_state(_sample(), SINCE))
    return data


def _with(path: tuple[object, ...], value: object) -> bytes:
    data = _good()
    target: object = data
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    target[path[-1]] = value  # type: ignore[index]
    return json.dumps(data).encode()


@pytest.mark.parametrize(("raw", "why"), [
    (b"", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[" * 100000, "not JSON"),
    (b"[]", "not a JSON object"),
    (_with(("version",), 2), "version 2, not 1"),
    (_with(("since",), "yesterday"), "bad period start"),
    (_with(("since",), -1), "bad period start"),
    (_with(("since",), True), "bad period start"),
    (_with(("sessions",), {}), "no sessions list"),
    (_with(("sessions", 0), "x"), r"sessions\[0\]: not an object"),
    (_with(("sessions", 1, "domain"), "EXAMPLE.com"), r"sessions\[1\]: bad domain"),
    (_with(("sessions", 0, "domain"), 7), "bad domain"),
    (_with(("sessions", 0, "policy"), "version: STSv1\n"), "bad policy"),
    (_with(("sessions", 0, "policy"), ["version: STSv1"]), "bad policy"),
    (_with(("sessions", 0, "policy"), None), "given twice"),
    (_with(("sessions", 0, "successes"), -1), "bad successes"),
    (_with(("sessions", 0, "failures"), 1.5), "bad failures"),
    (_with(("sessions", 0, "failures"), 1), "more failure details than failures"),
    (_with(("sessions", 0, "details"), None), "details: not a list"),
    (_with(("sessions", 0, "details", 0), []), "not an object"),
    (_with(("sessions", 0, "details", 0, "result_type"), "bad-luck"), "bad result type"),
    (_with(("sessions", 0, "details", 0, "result_type"), ["x"]), "bad result type"),
    (_with(("sessions", 0, "details", 0, "mx_host"), 3), "bad mx_host"),
    (_with(("sessions", 0, "details", 0, "count"), 0), "repeated or not counted"),
    (_with(("sessions", 0, "details", 0, "count"), None), "bad count"),
], ids=lambda value: "raw" if isinstance(value, bytes) else None)
def test_malformed_state_is_refused_with_a_value_error(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        load_state(raw)


def test_garbage_only_ever_raises_value_error() -> None:
    """Random edits of a good file: loaded or refused with ValueError, nothing else."""
    rng = random.Random(8460)
    values: list[object] = [None, True, -1, 0, 2**70, 1.5, float("nan"), "", "x", [], {},
                            [1], {"a": 1}, "example.com", "certificate-expired"]
    good = json.dumps(_good())
    for _ in range(2000):
        data = json.loads(good)
        node = data
        while isinstance(node, dict | list) and node and rng.random() < 0.7:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            key = rng.choice(keys)
            if not isinstance(node[key], dict | list) or rng.random() < 0.3:
                node[key] = rng.choice(values)
                break
            node = node[key]
        with contextlib.suppress(ValueError):
            load_state(json.dumps(data).encode())
