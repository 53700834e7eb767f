"""DMARC (RFC 7489): record grammar, discovery, alignment, policy, pct, several authors."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maitred_tx.auth.dmarc import (
    MAX_AUTHOR_DOMAINS,
    DMARCRecord,
    DMARCRecordError,
    DMARCVerdict,
    aligned,
    check_dmarc,
    check_dmarc_authors,
    is_dmarc_record,
    parse_dmarc_record,
)
from maitred_tx.auth.resolver import Record, ZoneResolver

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (ZoneResolver answers at once)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise AssertionError("the coroutine suspended")


def never() -> float:
    raise AssertionError("sample() must not be called here")


def zone(**records: Sequence[Record]) -> dict[tuple[str, str], Sequence[Record]]:
    """zone(example_com=[...]) -> {("_dmarc.example.com", "TXT"): [...]}."""
    return {("_dmarc." + k.replace("_", "."), "TXT"): v for k, v in records.items()}


def dmarc(
    resolver: ZoneResolver,
    from_domain: str,
    *,
    spf: str | None = None,
    spf_pass: bool = True,
    dkim: Sequence[str] = (),
    sample: Callable[[], float] = never,
) -> DMARCVerdict:
    return run(check_dmarc(resolver, from_domain, spf_domain=spf, spf_pass=spf_pass,
                           dkim_pass_domains=dkim, sample=sample))


# --- Record grammar (6.3, 6.4) ------------------------------------------------------------


def test_minimal_record_has_the_defaults_of_6_3() -> None:
    assert parse_dmarc_record("v=DMARC1; p=reject") == DMARCRecord(
        p="reject", sp=None, pct=100, adkim="r", aspf="r", rua=(), ruf=(), fo=("0",),
        rf=("afrf",), ri=86400, ignored=())


def test_every_tag() -> None:
    record = parse_dmarc_record(
        "v=DMARC1;p=quarantine; sp = reject ;pct=25;adkim=s;aspf=s;"
        " rua=mailto:a@example.com!10m, mailto:b@example.net ;ruf=mailto:f@example.com;"
        "fo=0:1:d:s;rf=afrf:iodef;ri=3600;")
    assert record == DMARCRecord(
        p="quarantine", sp="reject", pct=25, adkim="s", aspf="s",
        rua=("mailto:a@example.com!10m", "mailto:b@example.net"),
        ruf=("mailto:f@example.com",), fo=("0", "1", "d", "s"), rf=("afrf", "iodef"),
        ri=3600)


def test_tag_names_and_keywords_are_case_insensitive_but_dmarc1_is_exact() -> None:
    # RFC 5234 2.3: quoted ABNF strings are case-insensitive; 6.4 spells DMARC1 in %x.
    assert parse_dmarc_record("V=DMARC1; P=Reject; ADKIM=S").p == "reject"
    assert parse_dmarc_record("V=DMARC1; P=Reject; ADKIM=S").adkim == "s"
    assert not is_dmarc_record("v=dmarc1; p=reject")


@pytest.mark.parametrize("text", [
    "p=reject; v=DMARC1",  # v must be first (6.3)
    "v=DMARC10; p=reject",
    "v=DMARC2; p=reject",
    "v=spf1 -all",
    "",
    "DMARC1; p=reject",
])
def test_not_a_dmarc_record(text: str) -> None:
    assert not is_dmarc_record(text)
    with pytest.raises(DMARCRecordError):
        parse_dmarc_record(text)


def test_unknown_tags_are_ignored_and_whitespace_allowed() -> None:
    record = parse_dmarc_record("v = DMARC1 ;\tp = none ; np=reject; future_tag=x y z ;")
    assert record == DMARCRecord(p="none")


@pytest.mark.parametrize("text", [
    "v=DMARC1; p=reject; p=none",  # RFC 6376 3.2: a duplicate voids the tag-list
    "v=DMARC1; p=reject; v=DMARC1",
    "v=DMARC1; p=reject; garbage",  # a tag-spec without "="
    "v=DMARC1; p=reject; 1x=y",  # tag-name = ALPHA *ALNUMPUNC
])
def test_broken_tag_list_is_an_error(text: str) -> None:
    assert is_dmarc_record(text)
    with pytest.raises(DMARCRecordError):
        parse_dmarc_record(text)


@pytest.mark.parametrize("text", [
    "v=DMARC1",
    "v=DMARC1; p=block",
    "v=DMARC1; p=",
    "v=DMARC1; p=reject; sp=deny",
    "v=DMARC1; p=block; rua=not a uri",
])
def test_invalid_policy_without_rua_is_unusable(text: str) -> None:
    with pytest.raises(DMARCRecordError):
        parse_dmarc_record(text)


@pytest.mark.parametrize(("text", "ignored"), [
    ("v=DMARC1; rua=mailto:d@example.com", ()),
    ("v=DMARC1; p=block; rua=mailto:d@example.com", ("p",)),
    ("v=DMARC1; p=reject; sp=deny; rua=mailto:d@example.com", ("sp",)),
])
def test_invalid_policy_with_rua_is_p_none(text: str, ignored: tuple[str, ...]) -> None:
    # 6.6.3 step 6.1: act as if a record with a valid v and p=none was retrieved.
    record = parse_dmarc_record(text)
    assert (record.p, record.sp, record.rua, record.ignored) == (
        "none", None, ("mailto:d@example.com",), ignored)


@pytest.mark.parametrize(("tag", "field"), [
    ("pct=101", "pct"), ("pct=-1", "pct"), ("pct=1000", "pct"), ("pct=\uff15\uff10", "pct"),
    ("pct=", "pct"), ("adkim=x", "adkim"), ("aspf=relaxed", "aspf"), ("fo=0:x", "fo"),
    ("rf=a b", "rf"), ("ri=soon", "ri"), ("ri=99999999999", "ri"),
])
def test_invalid_optional_values_are_ignored(tag: str, field: str) -> None:
    record = parse_dmarc_record(f"v=DMARC1; p=reject; {tag}")
    assert record.ignored == (field,)
    assert getattr(record, field) == getattr(DMARCRecord(p="reject"), field)


def test_invalid_uris_are_dropped_valid_ones_kept() -> None:
    record = parse_dmarc_record(
        "v=DMARC1; p=none; rua=mailto:a@example.com,nonsense, https://r.example/x!5")
    assert record.rua == ("mailto:a@example.com", "https://r.example/x!5")
    assert record.ignored == ("rua",)


def test_pct_bounds() -> None:
    assert parse_dmarc_record("v=DMARC1; p=reject; pct=0").pct == 0
    assert parse_dmarc_record("v=DMARC1; p=reject; pct=100").pct == 100
    assert parse_dmarc_record("v=DMARC1; p=reject; pct=007").pct == 7


@given(st.text())
def test_any_text_parses_or_raises_the_record_error(text: str) -> None:
    try:
        record = parse_dmarc_record(text)
    except DMARCRecordError:
        return
    assert is_dmarc_record(text)
    assert record.p in ("none", "quarantine", "reject")
    assert 0 <= record.pct <= 100


@given(
    p=st.sampled_from(["none", "quarantine", "reject"]),
    sp=st.none() | st.sampled_from(["none", "quarantine", "reject"]),
    pct=st.integers(0, 100),
    adkim=st.sampled_from(["r", "s"]),
    aspf=st.sampled_from(["r", "s"]),
    ws=st.sampled_from(["", " ", "\t", " \t "]),
)
def test_generated_records_round_trip(p: str, sp: str | None, pct: int, adkim: str,
                                      aspf: str, ws: str) -> None:
    tags = [f"v{ws}={ws}DMARC1", f"p={p.upper()}", f"pct{ws}={pct}", f"adkim={adkim}",
            f"aspf={ws}{aspf}"] + ([f"sp={sp}"] if sp else [])
    record = parse_dmarc_record(f"{ws};{ws}".join(tags))
    assert (record.p, record.sp, record.pct, record.adkim, record.aspf, record.ignored) == (
        p, sp, pct, adkim, aspf, ())


# --- Alignment (3.1) ------------------------------------------------------------------------


@pytest.mark.parametrize(("identifier", "author", "relaxed", "strict"), [
    ("example.com", "example.com", True, True),
    ("EXAMPLE.com.", "example.COM", True, True),
    ("mail.example.com", "example.com", True, False),
    ("example.com", "news.example.com", True, False),
    ("a.example.com", "b.example.com", True, False),
    ("example.com", "example.net", False, False),
    ("example.co.uk", "other.co.uk", False, False),
    ("co.uk", "example.co.uk", False, False),
    ("alice.github.io", "bob.github.io", False, False),  # PSL private section
    ("www.alice.github.io", "alice.github.io", True, False),
    ("xn--mnchen-3ya.example", "münchen.example", True, True),  # A-label = U-label
    ("", "example.com", False, False),
])
def test_alignment(identifier: str, author: str, relaxed: bool, strict: bool) -> None:
    assert aligned(identifier, author, "r") is relaxed
    assert aligned(identifier, author, "s") is strict


# --- Discovery (6.6.3) ----------------------------------------------------------------------


def test_no_record_anywhere_is_none_after_two_lookups() -> None:
    resolver = ZoneResolver({})
    verdict = dmarc(resolver, "mail.example.com", spf="example.com")
    assert (verdict.result, verdict.policy, verdict.disposition, verdict.record) == (
        "none", None, "none", None)
    assert verdict.aligned_spf  # reported in relaxed mode, the default
    assert resolver.lookups == [("_dmarc.mail.example.com", "TXT"),
                                ("_dmarc.example.com", "TXT")]


def test_organizational_domain_is_queried_once_when_it_is_the_author_domain() -> None:
    resolver = ZoneResolver({("_dmarc.example.com", "A"): ["192.0.2.1"]})  # NODATA
    assert dmarc(resolver, "Example.COM").result == "none"
    assert resolver.lookups == [("_dmarc.example.com", "TXT")]


def test_other_txt_records_are_discarded_then_the_org_domain_is_asked() -> None:
    resolver = ZoneResolver(zone(
        a_example_com=["v=spf1 -all", "some verification token"],
        example_com=["v=DMARC1; p=reject"]))
    verdict = dmarc(resolver, "a.example.com")
    assert (verdict.result, verdict.policy_domain, verdict.policy) == (
        "fail", "example.com", "reject")
    assert verdict.disposition == "reject"


def test_record_at_the_author_domain_wins_over_the_org_domain() -> None:
    resolver = ZoneResolver(zone(a_example_com=["v=DMARC1; p=none"],
                                 example_com=["v=DMARC1; p=reject"]))
    verdict = dmarc(resolver, "a.example.com")
    assert (verdict.policy, verdict.policy_domain) == ("none", "a.example.com")
    assert resolver.lookups == [("_dmarc.a.example.com", "TXT")]


def test_multiple_records_mean_no_dmarc_and_no_fallback() -> None:
    resolver = ZoneResolver(zone(
        a_example_com=["v=DMARC1; p=reject", "v=DMARC1; p=none"],
        example_com=["v=DMARC1; p=reject"]))
    verdict = dmarc(resolver, "a.example.com")
    assert (verdict.result, verdict.record, verdict.disposition) == ("none", None, "none")
    assert resolver.lookups == [("_dmarc.a.example.com", "TXT")]


def test_multiple_records_at_the_org_domain_mean_no_dmarc() -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=reject", "v=DMARC1; p=reject"]))
    assert dmarc(resolver, "a.example.com").result == "none"


@pytest.mark.parametrize("temporary", ["_dmarc.a.example.com", "_dmarc.example.com"])
def test_temporary_failure_is_temperror(temporary: str) -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=reject"]), temporary=[temporary])
    verdict = dmarc(resolver, "a.example.com")
    assert (verdict.result, verdict.policy, verdict.disposition, verdict.record) == (
        "temperror", None, "none", None)


@pytest.mark.parametrize("text", ["v=DMARC1; p=reject; p=none", "v=DMARC1; p=bogus",
                                  "v=DMARC1; p=reject; oops"])
def test_malformed_record_is_permerror(text: str) -> None:
    verdict = dmarc(ZoneResolver(zone(example_com=[text])), "example.com")
    assert (verdict.result, verdict.policy, verdict.record, verdict.policy_domain) == (
        "permerror", None, None, "example.com")
    assert verdict.reason


def test_invalid_p_with_rua_is_evaluated_as_p_none() -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=bogus; rua=mailto:r@example.com"]))
    verdict = dmarc(resolver, "example.com")
    assert (verdict.result, verdict.policy, verdict.disposition) == ("fail", "none", "none")


def test_idn_author_domain_is_looked_up_in_a_labels() -> None:
    resolver = ZoneResolver({("_dmarc.xn--mnchen-3ya.example", "TXT"): ["v=DMARC1; p=reject"]})
    verdict = dmarc(resolver, "München.example", dkim=["xn--mnchen-3ya.example"])
    assert (verdict.result, verdict.from_domain) == ("pass", "xn--mnchen-3ya.example")


# --- Pass / fail and the policy that applies ------------------------------------------------

REJECT = ZoneResolver(zone(example_com=["v=DMARC1; p=reject"]))


def test_relaxed_spf_alignment_passes() -> None:
    verdict = dmarc(REJECT, "example.com", spf="bounces.example.com")
    assert (verdict.result, verdict.aligned_spf, verdict.aligned_dkim) == ("pass", True, False)
    assert (verdict.policy, verdict.disposition) == ("reject", "none")


def test_spf_counts_only_when_it_passed() -> None:
    verdict = dmarc(REJECT, "example.com", spf="example.com", spf_pass=False)
    assert (verdict.result, verdict.aligned_spf, verdict.disposition) == (
        "fail", False, "reject")


def test_strict_spf_alignment() -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=reject; aspf=s"]))
    assert dmarc(resolver, "example.com", spf="bounces.example.com").result == "fail"
    assert dmarc(resolver, "example.com", spf="EXAMPLE.com").result == "pass"


def test_relaxed_dkim_alignment_any_passing_signature() -> None:
    verdict = dmarc(REJECT, "news.example.com", dkim=["esp.example.net", "example.com"])
    assert (verdict.result, verdict.aligned_dkim, verdict.aligned_spf) == ("pass", True, False)


def test_strict_dkim_alignment() -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=quarantine; adkim=s"]))
    verdict = dmarc(resolver, "news.example.com", dkim=["example.com"])
    assert (verdict.result, verdict.policy, verdict.disposition) == (
        "fail", "quarantine", "quarantine")
    assert dmarc(resolver, "news.example.com", dkim=["News.Example.com"]).result == "pass"


def test_strict_spf_does_not_make_dkim_strict() -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=reject; aspf=s"]))
    verdict = dmarc(resolver, "example.com", spf="b.example.com", dkim=["d.example.com"])
    assert (verdict.result, verdict.aligned_spf, verdict.aligned_dkim) == ("pass", False, True)


def test_cousin_domains_do_not_align() -> None:
    verdict = dmarc(REJECT, "example.com", spf="example.com.evil.example",
                    dkim=["evil.example", "com"])
    assert (verdict.result, verdict.disposition) == ("fail", "reject")


@pytest.mark.parametrize(("record", "author", "policy"), [
    ("v=DMARC1; p=none; sp=reject", "a.example.com", "reject"),  # found at the org domain
    ("v=DMARC1; p=none; sp=reject", "example.com", "none"),  # sp= not for the domain itself
    ("v=DMARC1; p=quarantine", "a.b.example.com", "quarantine"),  # no sp=: p applies
])
def test_the_policy_that_applies(record: str, author: str, policy: str) -> None:
    verdict = dmarc(ZoneResolver(zone(example_com=[record])), author)
    assert (verdict.result, verdict.policy, verdict.disposition) == ("fail", policy, policy)


def test_sp_does_not_apply_to_a_record_found_at_the_subdomain_itself() -> None:
    resolver = ZoneResolver(zone(a_example_com=["v=DMARC1; p=quarantine; sp=none"]))
    assert dmarc(resolver, "a.example.com").policy == "quarantine"


# --- pct (6.6.4) ----------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "draw", "disposition", "reason"), [
    ("reject", 0.0, "reject", ""),
    ("reject", 0.49, "reject", ""),
    ("reject", 0.5, "quarantine", "not selected by pct"),  # the next policy lower
    ("reject", 0.99, "quarantine", "not selected by pct"),
    ("quarantine", 0.3, "quarantine", ""),
    ("quarantine", 0.7, "none", "not selected by pct"),
    ("none", 0.9, "none", "not selected by pct"),
])
def test_pct_sampling(policy: str, draw: float, disposition: str, reason: str) -> None:
    resolver = ZoneResolver(zone(example_com=[f"v=DMARC1; p={policy}; pct=50"]))
    verdict = dmarc(resolver, "example.com", sample=lambda: draw)
    assert (verdict.result, verdict.policy, verdict.disposition, verdict.reason) == (
        "fail", policy, disposition, reason)


def test_pct_zero_never_applies_the_policy() -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=reject; pct=0"]))
    assert dmarc(resolver, "example.com", sample=lambda: 0.0).disposition == "quarantine"


def test_sample_is_not_drawn_for_pct_100_or_a_pass() -> None:
    assert dmarc(REJECT, "example.com").disposition == "reject"  # `never` would raise
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=reject; pct=1"]))
    assert dmarc(resolver, "example.com", dkim=["example.com"]).result == "pass"


# --- Several authors (6.6.1) ----------------------------------------------------------------


def authors(resolver: ZoneResolver, domains: Sequence[str], **kw: Any) -> DMARCVerdict:
    return run(check_dmarc_authors(resolver, domains, spf_domain=kw.get("spf"),
                                   spf_pass=True, dkim_pass_domains=kw.get("dkim", ()),
                                   sample=never))


def test_no_author_domain_is_permerror_without_lookups() -> None:
    resolver = ZoneResolver({})
    verdict = authors(resolver, [])
    assert (verdict.result, verdict.from_domain, verdict.disposition) == (
        "permerror", "", "none")
    assert resolver.lookups == []


def test_one_author_domain_is_check_dmarc() -> None:
    assert authors(REJECT, ["example.com"], dkim=["example.com"]) == dmarc(
        REJECT, "example.com", dkim=["example.com"])


def test_the_same_domain_twice_is_one_author_domain() -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=reject"]))
    assert authors(resolver, ["example.com", "EXAMPLE.com."]).result == "fail"
    assert len(resolver.lookups) == 1


def test_the_strictest_failing_policy_wins() -> None:
    resolver = ZoneResolver(zone(
        example_com=["v=DMARC1; p=quarantine"],
        example_net=["v=DMARC1; p=reject"],
        example_org=["v=DMARC1; p=none"]))
    verdict = authors(resolver, ["example.org", "example.com", "example.net"],
                      dkim=["example.org"])
    assert (verdict.result, verdict.from_domain, verdict.disposition) == (
        "fail", "example.net", "reject")


def test_a_passing_author_does_not_hide_a_failing_one() -> None:
    # The attacker signs for their own domain and adds the victim's as a second author.
    resolver = ZoneResolver(zone(evil_example=["v=DMARC1; p=none"],
                                 victim_example=["v=DMARC1; p=reject"]))
    verdict = authors(resolver, ["evil.example", "victim.example"], dkim=["evil.example"])
    assert (verdict.result, verdict.from_domain) == ("fail", "victim.example")


def test_temperror_outranks_pass_and_none() -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=reject"]),
                            temporary=["_dmarc.example.net"])
    verdict = authors(resolver, ["example.com", "example.net", "example.org"],
                      dkim=["example.com"])
    assert (verdict.result, verdict.from_domain) == ("temperror", "example.net")


def test_all_passing_authors_pass() -> None:
    resolver = ZoneResolver(zone(example_com=["v=DMARC1; p=reject"],
                                 example_net=["v=DMARC1; p=reject"]))
    verdict = authors(resolver, ["example.com", "example.net"],
                      dkim=["example.com", "example.net"])
    assert (verdict.result, verdict.from_domain) == ("pass", "example.com")


def test_too_many_authors_is_permerror_without_lookups() -> None:
    resolver = ZoneResolver({})
    domains = [f"d{i}.example" for i in range(MAX_AUTHOR_DOMAINS + 1)]
    verdict = authors(resolver, domains)
    assert (verdict.result, verdict.from_domain) == ("permerror", "d0.example")
    assert resolver.lookups == []
