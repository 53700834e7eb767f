"""SPF (RFC 7208): the OpenSPF RFC 7208 test suite, every case, plus our own tests of
macros, limits, the HELO / MAIL FROM pair and totality over arbitrary records."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from hypothesis import given, settings
from hypothesis import strategies as st

from maitred_tx.auth.resolver import MX, Record, TemporaryDNSError, ZoneResolver
from maitred_tx.auth.spf import SPFResult, SPFVerdict, check, check_host

SUITE = Path(__file__).parent / "data" / "spf" / "rfc7208-tests.yml"
TYPES = ("A", "AAAA", "MX", "TXT", "PTR", "CNAME")

# Suite cases we deliberately do not follow, with the reason.  Empty: we follow them all.
NOT_FOLLOWED: dict[str, str] = {}


def run(coro: Coroutine[Any, Any, SPFVerdict]) -> SPFVerdict:
    """Drive a check over ZoneResolver, which never suspends: no event loop needed."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return,unused-ignore]
    raise AssertionError("the check suspended on a resolver that never does")


# ---------------------------------------------------------------- the suite's zone data


def _text(value: str | list[str]) -> str:
    strings = [value] if isinstance(value, str) else list(value)
    # one record of character-strings, joined (RFC 7208 3.3); bytes as a resolver sees them
    return "".join(strings).encode("utf-8").decode("latin-1")


def _record(rtype: str, value: Any) -> Record:
    if rtype in ("TXT", "SPF"):
        return _text(value)
    if rtype == "MX":
        return MX(int(value[0]), str(value[1]).lower().rstrip("."))
    if rtype in ("PTR", "CNAME"):
        return str(value).lower().rstrip(".")
    return str(value)


def suite_zone(zonedata: dict[str, list[Any]]) -> ZoneResolver:
    """Translate a scenario's zonedata (see data/spf/SOURCE.md) into a ZoneResolver."""
    zone: dict[tuple[str, str], list[Record]] = {}
    temporary: list[tuple[str, str]] = []
    for raw_name, entries in zonedata.items():
        name = raw_name.lower().rstrip(".")
        seen: set[str] = set()
        timed_out = False
        has_txt = False
        spf: list[Record] = []
        for entry in entries:
            if entry == "TIMEOUT":
                if not timed_out:
                    temporary += [(name, t) for t in TYPES if t not in seen]
                timed_out = True
                continue
            ((rtype, value),) = entry.items()
            if rtype == "TXT":
                has_txt = True
            if value == "NONE" or value == "TIMEOUT":
                if value == "TIMEOUT":
                    temporary.append((name, rtype))
                continue
            if rtype == "SPF":
                spf.append(_record(rtype, value))
                continue
            if not timed_out:
                seen.add(rtype)
            zone.setdefault((name, rtype), []).append(_record(rtype, value))
        if not has_txt and spf and "TXT" not in seen:
            zone[(name, "TXT")] = spf  # copied after any TIMEOUT: it then times out
        if not zone.keys() & {(name, t) for t in TYPES} and not timed_out:
            zone[(name, "SPF")] = spf  # the name exists (SPF type only): TXT is NODATA
    _follow_cnames(zone, temporary)
    return ZoneResolver(zone, temporary)


def _follow_cnames(
    zone: dict[tuple[str, str], list[Record]], temporary: list[tuple[str, str]]
) -> None:
    aliases = {n: str(r[0]) for (n, t), r in zone.items() if t == "CNAME"}
    names = {n for n, _ in zone}
    for alias in aliases:
        for rtype in TYPES[:5]:
            target, hops = alias, 0
            while target in aliases and hops < 8:
                target, hops = aliases[target], hops + 1
            if target in aliases:  # a loop
                temporary.append((alias, rtype))
            elif target not in names:  # the chain ends nowhere: NXDOMAIN
                zone.pop((alias, "CNAME"), None)
            elif (target, rtype) in zone:
                zone[(alias, rtype)] = zone[(target, rtype)]


def suite_cases() -> list[Any]:
    cases = []
    with SUITE.open("rb") as f:
        for scenario in yaml.safe_load_all(f):
            for name, case in scenario["tests"].items():
                why = NOT_FOLLOWED.get(name)
                marks = [pytest.mark.skip(reason=why)] if why else []
                cases.append(pytest.param(scenario["zonedata"], case, id=name, marks=marks))
    return cases


SUITE_CASES = suite_cases()


def test_the_whole_suite_is_loaded() -> None:
    assert len(SUITE_CASES) == 203  # rfc7208-tests.yml: 2014.04 + the 2019.08 additions


@pytest.mark.parametrize(("zonedata", "case"), SUITE_CASES)
def test_rfc7208_suite(zonedata: dict[str, list[Any]], case: dict[str, Any]) -> None:
    helo = str(case["helo"])
    sender = case["mailfrom"] or f"postmaster@{helo}"  # 2.4: a null sender
    domain = sender.rpartition("@")[2]
    verdict = run(check_host(suite_zone(zonedata), case["host"], domain, sender, helo=helo))
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert verdict.result.value in expected, verdict
    if "explanation" in case:
        assert (verdict.explanation or "DEFAULT") == case["explanation"], verdict


# ---------------------------------------------------------------- our own cases

IP = "192.0.2.1"


def zone(
    records: dict[str, str],
    extra: dict[tuple[str, str], list[Record]] | None = None,
    *,
    temporary: Sequence[str] = (),
) -> ZoneResolver:
    """One TXT record per name, plus other records keyed (name, rtype)."""
    data: dict[tuple[str, str], list[Record]] = {(n, "TXT"): [t] for n, t in records.items()}
    return ZoneResolver({**data, **(extra or {})}, temporary)


def spf(
    record: str,
    ip: str = IP,
    sender: str = "alice.b@example.com",
    *,
    helo: str = "mx.example.org",
    resolver: ZoneResolver | None = None,
    **kw: Any,
) -> SPFVerdict:
    r = resolver or zone({"example.com": record})
    return run(check_host(r, ip, "example.com", sender, helo=helo, **kw))


def test_result_values_are_the_authentication_results_names() -> None:
    assert [r.value for r in SPFResult] == [
        "none",
        "neutral",
        "pass",
        "fail",
        "softfail",
        "temperror",
        "permerror",
    ]


def test_verdict_names_the_matching_mechanism() -> None:
    v = spf("v=spf1 ip4:192.0.2.0/24 -all")
    assert (v.result, v.mechanism, v.identity, v.domain) == (
        SPFResult.PASS,
        "ip4:192.0.2.0/24",
        "mailfrom",
        "example.com",
    )
    v = spf("v=spf1 ip4:198.51.100.1 ~all")
    assert (v.result, v.mechanism, v.explanation) == (SPFResult.SOFTFAIL, "~all", None)
    assert spf("v=spf1 ip4:198.51.100.1").mechanism is None  # the default neutral


@pytest.mark.parametrize(
    ("macro", "expansion"),
    [  # RFC 7208 7.4's examples: sender strong-bad@email.example.com, ip 192.0.2.3
        ("%{s}", "strong-bad@email.example.com"),
        ("%{o}", "email.example.com"),
        ("%{d}", "email.example.com"),
        ("%{d4}", "email.example.com"),
        ("%{d3}", "email.example.com"),
        ("%{d2}", "example.com"),
        ("%{d1}", "com"),
        ("%{dr}", "com.example.email"),
        ("%{d2r}", "example.email"),
        ("%{l}", "strong-bad"),
        ("%{l-}", "strong.bad"),
        ("%{lr}", "strong-bad"),
        ("%{lr-}", "bad.strong"),
        ("%{l1r-}", "strong"),
        ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
        ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
        ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
        ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
        ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
        ("%{h}", "mx.example.org"),
        ("%{L}", "strong-bad"),
        ("%{S}", "strong-bad%40email.example.com"),
        ("x%%y%_z%-w", "x%y z%20w"),
    ],
)
def test_macro_expansion_rfc_examples(macro: str, expansion: str) -> None:
    """Each expansion is observed through the explanation of a fail (exp= text)."""
    r = ZoneResolver(
        {
            ("email.example.com", "TXT"): ["v=spf1 -all exp=why.example.com"],
            ("why.example.com", "TXT"): [macro],
        }
    )
    v = run(
        check_host(
            r,
            "192.0.2.3",
            "email.example.com",
            "strong-bad@email.example.com",
            helo="mx.example.org",
        )
    )
    assert (v.result, v.explanation) == (SPFResult.FAIL, expansion)


def test_exp_only_macros_and_ipv6_forms() -> None:
    r = ZoneResolver(
        {
            ("example.com", "TXT"): ["v=spf1 -all exp=why.example.com"],
            ("why.example.com", "TXT"): ["%{c} %{r} %{t} %{v} %{i}"],
        }
    )
    v = run(
        check_host(
            r,
            "2001:db8::cb01",
            "example.com",
            "a@example.com",
            helo="h.example",
            receiver="mx.example.net",
            now=1_700_000_000.5,
        )
    )
    assert v.explanation == (
        "2001:db8::cb01 mx.example.net 1700000000 ip6 "
        "2.0.0.1.0.D.B.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.C.B.0.1"
    )
    # c, r, t outside the explanation text are a syntax error (7.3)
    assert spf("v=spf1 exists:%{t}.example.com").result is SPFResult.PERMERROR


def test_macro_in_the_queried_name() -> None:
    r = zone(
        {"example.com": "v=spf1 exists:%{ir}.%{l1r.}.%{o}.bl.example.net -all"},
        {("1.2.0.192.alice.example.com.bl.example.net", "A"): ["127.0.0.2"]},
    )
    assert spf("", resolver=r).result is SPFResult.PASS
    # the sender's local part "alice.b" reversed by "." and cut to one part: "alice"
    assert ("1.2.0.192.alice.example.com.bl.example.net", "A") in r.lookups


def test_long_expansions_are_cut_from_the_left() -> None:
    r = zone({"example.com": "v=spf1 exists:%{l}.%{l}.%{l}.%{l}.%{l}.x.example -all"})
    v = spf("", sender=("a" * 60 + ".") * 1 + "b" * 60 + "@example.com", resolver=r)
    assert v.result is SPFResult.FAIL
    (queried, _) = r.lookups[-1]
    assert len(queried) <= 253 and queried.endswith(".x.example")


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 a:%{x}.example.com",  # unknown letter
        "v=spf1 a:%{d0}.example.com",  # zero transformer
        "v=spf1 a:%d.example.com",  # '%' not followed by { % _ -
        "v=spf1 a:example.com%",
        "v=spf1 a:%{d",
        "v=spf1 foo=%{q}",  # unknown modifiers must be well formed too
    ],
)
def test_macro_syntax_errors_are_permerror(record: str) -> None:
    assert spf(record).result is SPFResult.PERMERROR


def _chain(n: int, mechanism: str) -> ZoneResolver:
    records = {f"d{i}.example.net": "v=spf1 ip4:198.51.100.9" for i in range(n)}
    records["example.com"] = "v=spf1 " + " ".join(
        f"{mechanism}:d{i}.example.net" for i in range(n)
    )
    extra: dict[tuple[str, str], list[Record]] = {}
    for i in range(n):
        extra[(f"d{i}.example.net", "A")] = ["198.51.100.9"]
        extra[(f"d{i}.example.net", "MX")] = [MX(0, f"d{i}.example.net")]
    return zone(records, extra)


@pytest.mark.parametrize("mechanism", ["a", "mx", "include"])
def test_ten_dns_terms_allowed_eleventh_is_permerror(mechanism: str) -> None:
    assert spf("", resolver=_chain(10, mechanism)).result is SPFResult.NEUTRAL
    v = spf("", resolver=_chain(11, mechanism))
    assert v.result is SPFResult.PERMERROR and "10 DNS lookups" in (v.reason or "")


def test_terms_without_dns_do_not_count() -> None:
    record = "v=spf1 " + " ".join(f"ip4:198.51.100.{i}" for i in range(40)) + " all"
    assert spf(record).result is SPFResult.PASS


def test_void_lookups_two_allowed_third_is_permerror() -> None:
    assert spf("v=spf1 a:n1.example.net a:n2.example.net").result is SPFResult.NEUTRAL
    v = spf("v=spf1 a:n1.example.net mx:n2.example.net exists:n3.example.net")
    assert v.result is SPFResult.PERMERROR and "void" in (v.reason or "")


def test_mx_more_than_ten_is_permerror_ptr_more_than_ten_ignored() -> None:
    mxs: list[Record] = [MX(i, f"mx{i}.example.com") for i in range(11)]
    policy = {"example.com": "v=spf1 mx -all"}
    r = zone(policy, {("example.com", "MX"): mxs, ("mx10.example.com", "A"): [IP]})
    assert spf("", resolver=r).result is SPFResult.PERMERROR
    r = zone(policy, {("example.com", "MX"): mxs[:10], ("mx9.example.com", "A"): [IP]})
    assert spf("", resolver=r).result is SPFResult.PASS
    ptrs: list[Record] = [f"h{i}.example.com" for i in range(11)]
    policy = {"example.com": "v=spf1 ptr -all"}
    reverse = ("1.2.0.192.in-addr.arpa", "PTR")
    r = zone(policy, {reverse: ptrs, ("h10.example.com", "A"): [IP]})
    assert spf("", resolver=r).result is SPFResult.FAIL  # the 11th name is never looked at
    r = zone(policy, {reverse: ptrs, ("h9.example.com", "A"): [IP]})
    assert spf("", resolver=r).result is SPFResult.PASS


def test_temporary_errors() -> None:
    assert spf("", resolver=zone({}, temporary=["example.com"])).result is SPFResult.TEMPERROR
    r = zone({"example.com": "v=spf1 a:dead.example.net -all"}, temporary=["dead.example.net"])
    v = spf("", resolver=r)
    assert v.result is SPFResult.TEMPERROR and "dead.example.net" in (v.reason or "")


def test_ipv4_mapped_client_is_ipv4_and_ip6_cidr() -> None:
    assert spf("v=spf1 ip4:192.0.2.0/24 -all", "::ffff:192.0.2.1").result is SPFResult.PASS
    assert spf("v=spf1 ip6:2001:db8::/32 -all", "2001:db8:1::1").result is SPFResult.PASS
    assert spf("v=spf1 ip6:2001:db8::/33 -all", "2001:db8:8000::1").result is SPFResult.FAIL
    assert spf("v=spf1 ip6:::/0 -all", IP).result is SPFResult.FAIL  # never matches IPv4
    with pytest.raises(ValueError):
        spf("v=spf1 -all", "not-an-ip")


@pytest.mark.parametrize(
    "domain",
    [
        "localhost",
        "",
        "a..b.example",
        "[192.0.2.1]",
        "1.2.3.4",
        "x" * 64 + ".example",
        "é.example",
    ],
)
def test_malformed_domains_are_none(domain: str) -> None:
    r = zone({})
    v = run(check_host(r, IP, domain, f"a@{domain}", helo="h.example"))
    assert v.result is SPFResult.NONE and r.lookups == []


def test_check_helo_and_mailfrom() -> None:
    r = zone(
        {
            "mx.example.org": "v=spf1 ip4:192.0.2.1 -all",
            "example.com": "v=spf1 -all",
        }
    )
    helo_v, mail_v = run_pair(check(r, IP, "alice@example.com", "mx.example.org"))
    assert (helo_v.identity, helo_v.domain, helo_v.result) == (
        "helo",
        "mx.example.org",
        SPFResult.PASS,
    )
    assert (mail_v.identity, mail_v.domain, mail_v.result) == (
        "mailfrom",
        "example.com",
        SPFResult.FAIL,
    )
    for null in (None, ""):  # 2.4: the null sender checks postmaster@<helo>
        r.lookups.clear()
        helo_v, mail_v = run_pair(check(r, IP, null, "mx.example.org"))
        assert (mail_v.identity, mail_v.domain, mail_v.result) == (
            "mailfrom",
            "mx.example.org",
            SPFResult.PASS,
        )
        assert r.lookups == [("mx.example.org", "TXT")]  # one evaluation, not two


def run_pair(
    coro: Coroutine[Any, Any, tuple[SPFVerdict, SPFVerdict]],
) -> tuple[SPFVerdict, SPFVerdict]:
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return,unused-ignore]
    raise AssertionError("suspended")


class _Exploding:
    async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
        raise TemporaryDNSError("boom")


def test_exp_lookup_failures_give_no_explanation() -> None:
    r = zone({"example.com": "v=spf1 -all exp=gone.example.com"}, temporary=["gone.example.com"])
    v = spf("", resolver=r)
    assert (v.result, v.explanation) == (SPFResult.FAIL, None)
    assert (
        run(check_host(_Exploding(), IP, "example.com", "a@example.com", helo="h")).result
        is SPFResult.TEMPERROR
    )


# ---------------------------------------------------------------- totality

# fmt: off
_PIECES = [
    "a", "mx", "ptr", "all", "-all", "~all", "include:", "exists:", "ip4:", "ip6:",
    "redirect=", "exp=", "a:", "mx:", "/", "//", "%{", "}", "%%", "%{d2r-}", "%{p}", "%{i}",
    "%{l1r+}", ".example.com", "inc.example.com", "tmp.example.com", "=", ":", "/24", "//64",
    "192.0.2.1", "2001:db8::", "::ffff:1.2.3.4",
]
# fmt: on
_spf_chars = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=60)
_terms = st.lists(st.one_of(st.sampled_from(_PIECES), _spf_chars), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(_terms, st.text(max_size=80)),
    include_body=_terms,
    ip=st.sampled_from([IP, "2001:db8::1", "::ffff:192.0.2.1"]),
    sender=st.sampled_from(["a@example.com", "@example.com", "x-y+z@example.com", "nobody"]),
    helo=st.text(max_size=20),
)
def test_check_host_always_returns_a_verdict(
    body: str, include_body: str, ip: str, sender: str, helo: str
) -> None:
    r = ZoneResolver(
        {
            ("example.com", "TXT"): ["v=spf1 " + body, "unrelated"],
            ("inc.example.com", "TXT"): ["v=spf1 " + include_body],
            ("why.example.com", "TXT"): [include_body],
            ("example.com", "MX"): [MX(0, "inc.example.com"), MX(5, "")],
            ("inc.example.com", "A"): [IP, "not an address"],
            ("1.2.0.192.in-addr.arpa", "PTR"): ["inc.example.com"],
        },
        temporary=["tmp.example.com"],
    )
    for record in (body, body + " include:inc.example.com exp=why.example.com"):
        r._zone[("example.com", "TXT")] = ["v=spf1 " + record]
        v = run(check_host(r, ip, "example.com", sender, helo=helo))
        assert isinstance(v, SPFVerdict) and isinstance(v.result, SPFResult)
