"""The whole per-message pipeline as pure coroutines (maitred_tx.auth.verdicts), on
asyncio with the zone as data: what the checks thread runs for every message."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from maitred_tx.auth.resolver import Record, ZoneResolver
from maitred_tx.auth.spf import SPFResult, SPFVerdict
from maitred_tx.auth.verdicts import SPFPair, SPFRequest, Verdict, check_message, check_spf
from maitred_tx.smtp.config import AuthChecks, AuthTempError

T = TypeVar("T")

IP = "192.0.2.10"
ZONE: dict[tuple[str, str], Sequence[Record]] = {
    ("pass.test", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
    ("_dmarc.pass.test", "TXT"): ["v=DMARC1; p=reject"],
    ("fail.test", "TXT"): ["v=spf1 -all"],
    ("_dmarc.fail.test", "TXT"): ["v=DMARC1; p=reject"],
    ("client.test", "TXT"): ["v=spf1 ip4:192.0.2.10 -all"],
}


def message(author: str, extra: bytes = b"", body: bytes = b"Hello.\r\n") -> bytes:
    return (f"From: <{author}>\r\nTo: <rcpt@mx.test>\r\nSubject: hi\r\n".encode()
            + extra + b"\r\n" + body)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def inline(fn: Callable[[], T]) -> T:
    return fn()


class Decided:
    """An SPFRequest whose verdicts are given (SPF itself is tested below and in
    test_spf): ``pair`` stands for what ``check_spf`` would say."""

    def __init__(self, pair: SPFPair) -> None:
        self.pair = pair

    async def check(self, resolver: Any) -> SPFPair:
        return self.pair


def spf_pair(result: SPFResult, domain: str) -> SPFPair:
    return (SPFVerdict(SPFResult.PASS, "helo", "client.test"),
            SPFVerdict(result, "mailfrom", domain))


def verdict(
    msg: bytes,
    *,
    pair: SPFPair | None,
    resolver: Any = None,
    settings: AuthChecks | None = None,
    mail_from: str | None = "alice@pass.test",
    read: Callable[[], Awaitable[bytes]] | None = None,
    first: int = 64 * 1024,
) -> Verdict:
    async def never_read() -> bytes:
        raise AssertionError("an unsigned message must not be read whole")

    return run(check_message(
        resolver or ZoneResolver(ZONE), inline, first=msg[:first], size=len(msg),
        read=read or never_read, spf=None if pair is None else Decided(pair),  # type: ignore[arg-type]
        mail_from=mail_from,
        settings=settings or AuthChecks(), authserv_id="mx.test",
    ))


async def never() -> bytes:
    raise AssertionError("must not be read whole")


# -- unsigned mail: SPF + DMARC, the header, the policy --------------------------------


def test_pass_gives_our_field_then_the_header_block_and_the_body_offset() -> None:
    msg = message("alice@pass.test")
    v = verdict(msg, pair=spf_pair(SPFResult.PASS, "pass.test"))
    assert v.results is not None and v.refusal is None and v.error is None
    assert v.results.dmarc.result == "pass"
    assert v.prefix.startswith(b"Authentication-Results: mx.test;")
    assert b"spf=pass smtp.mailfrom=alice@pass.test" in v.prefix
    assert b"dmarc=pass (p=reject) header.from=pass.test" in v.prefix
    head_end = msg.index(b"\r\n\r\n") + 4
    assert v.offset == head_end and v.prefix.endswith(msg[:head_end])
    assert v.prefix + msg[v.offset:] == v.results.header("mx.test") + msg


def test_forged_field_with_our_authserv_id_is_left_out_of_the_prefix() -> None:
    forged = b"Authentication-Results: mx.test; dmarc=pass header.from=fail.test\r\n"
    other = b"Authentication-Results: other.example; spf=pass\r\n"
    msg = message("alice@pass.test", extra=forged + other)
    v = verdict(msg, pair=spf_pair(SPFResult.PASS, "pass.test"))
    assert forged not in v.prefix and other in v.prefix
    assert v.prefix.count(b"Authentication-Results: mx.test;") == 1


def test_dmarc_reject_refuses_with_550_5_7_1_only_when_asked() -> None:
    msg = message("alice@fail.test")
    pair = spf_pair(SPFResult.FAIL, "fail.test")
    recorded = verdict(msg, pair=pair, mail_from="alice@fail.test")
    assert recorded.refusal is None and recorded.results is not None
    assert recorded.results.dmarc.result == "fail"
    refused = verdict(msg, pair=pair, mail_from="alice@fail.test",
                      settings=AuthChecks(dmarc_reject=True))
    assert refused.refusal is not None
    assert (refused.refusal.code, refused.refusal.status) == (550, "5.7.1")
    assert "fail.test" in " ".join(refused.refusal.text)


def test_temperror_is_451_4_7_0_under_the_defer_policy() -> None:
    msg = message("alice@fail.test")
    pair = spf_pair(SPFResult.TEMPERROR, "fail.test")
    v = verdict(msg, pair=pair, mail_from="alice@fail.test",
                settings=AuthChecks(temperror=AuthTempError.DEFER, dmarc_reject=True))
    assert v.refusal is not None and (v.refusal.code, v.refusal.status) == (451, "4.7.0")
    assert "spf" in " ".join(v.refusal.text)


def test_without_spf_verdicts_only_dkim_and_dmarc_are_reported() -> None:
    v = verdict(message("alice@pass.test"), pair=None)
    assert v.results is not None and v.results.spf_mailfrom is None
    assert b"spf=" not in v.prefix and v.results.dmarc.result == "fail"


def test_message_without_a_body_is_all_header() -> None:
    msg = b"From: <alice@pass.test>\r\nSubject: no body\r\n"
    v = verdict(msg, pair=spf_pair(SPFResult.PASS, "pass.test"))
    assert v.offset == len(msg) and v.prefix.endswith(msg)


def test_a_header_block_longer_than_first_is_not_split_and_delivered_whole() -> None:
    msg = message("alice@pass.test", extra=b"X-Long: " + b"a" * 500 + b"\r\n")
    v = verdict(msg, pair=spf_pair(SPFResult.PASS, "pass.test"), first=100)
    assert v.offset == 0
    assert v.prefix.startswith(b"Authentication-Results: ") and v.prefix.endswith(b"\r\n")
    assert v.prefix.count(b"\r\n") == v.prefix.count(b"\r\n\t") + 1  # only our field


def test_a_bug_in_the_checks_delivers_without_a_verdict_but_forgeries_removed() -> None:
    class Broken:
        async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
            raise RuntimeError("resolver bug")

    forged = b"Authentication-Results: mx.test; dmarc=pass\r\n"
    msg = message("alice@pass.test", extra=forged)
    v = verdict(msg, pair=spf_pair(SPFResult.PASS, "pass.test"), resolver=Broken())
    assert v.results is None and v.refusal is None
    assert v.error is not None and "RuntimeError: resolver bug" in v.error
    assert forged not in v.prefix and v.prefix == msg[: v.offset].replace(forged, b"")


# -- signed mail: read once, verified, or skipped when too large -----------------------


@pytest.fixture(scope="module")
def ed_key() -> tuple[bytes, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return base64.b64encode(seed), "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()


def signed_zone(txt: str) -> ZoneResolver:
    return ZoneResolver({**ZONE, ("ed._domainkey.pass.test", "TXT"): [txt]})


def test_signed_message_is_read_once_and_its_signature_verified(ed_key) -> None:
    seed, txt = ed_key
    plain = message("alice@pass.test")
    msg = bytes(dkim.sign(plain, b"ed", b"pass.test", seed,
                          signature_algorithm=b"ed25519-sha256")) + plain
    reads = []

    async def read() -> bytes:
        reads.append(1)
        return msg

    v = verdict(msg, pair=None, resolver=signed_zone(txt), read=read)
    assert reads == [1]
    assert v.results is not None
    assert [(r.result, r.domain, r.selector) for r in v.results.dkim] == [
        ("pass", "pass.test", "ed")
    ]
    assert v.results.dmarc.result == "pass"  # aligned DKIM alone, no SPF at all
    assert v.results.arc is not None and v.results.arc.result == "none"


def test_arc_sealed_message_gets_its_chain_verified() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (test extra) reads the ARC suite")
    suite = Path(__file__).resolve().parents[3] / "shared/vectors/arc"
    path = suite / "arc-draft-validation-tests.yml"
    if not path.exists():
        pytest.skip(f"the ARC suite is not at {path}")
    with path.open(encoding="utf-8") as f:  # the suite's first passing case
        scenario = next(s for s in yaml.safe_load_all(f) if "cv_pass_i1_1" in s["tests"])
    text = scenario["tests"]["cv_pass_i1_1"]["message"]
    msg = text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    zone = ZoneResolver({(n, "TXT"): [v] for n, v in scenario["txt-records"].items()})

    async def read() -> bytes:
        return msg

    v = verdict(msg, pair=None, resolver=zone, read=read)
    assert v.results is not None and v.results.arc is not None
    assert (v.results.arc.result, v.results.arc.instances) == ("pass", 1)
    assert b"arc=pass" in v.prefix


def test_signed_message_over_max_dkim_size_is_policy_and_never_read(ed_key) -> None:
    seed, txt = ed_key
    plain = message("alice@pass.test")
    msg = bytes(dkim.sign(plain, b"ed", b"pass.test", seed,
                          signature_algorithm=b"ed25519-sha256")) + plain
    v = verdict(msg, pair=None, resolver=signed_zone(txt),
                settings=AuthChecks(max_dkim_size=10, dmarc_reject=True))
    assert v.results is not None
    assert [r.result for r in v.results.dkim] == ["policy"]
    assert v.results.dkim_skipped is not None and v.results.arc is None
    assert v.refusal is None  # an unverified signature might have passed
    spf = run(check_message(
        signed_zone(txt), inline, first=msg, size=len(msg), read=never,
        spf=SPFRequest(IP, "alice@pass.test", "client.test", "mx.test"),
        mail_from="alice@pass.test", settings=AuthChecks(max_dkim_size=10),
        authserv_id="mx.test",
    ))
    assert spf.results is not None and spf.results.spf_mailfrom is not None
    assert spf.results.spf_mailfrom.result is SPFResult.PASS  # SPF still checked


# -- SPF: the overall time limit and bugs are temperror --------------------------------


def test_spf_past_its_time_limit_is_temperror_for_both_identities() -> None:
    class Silent:
        async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    helo, mailfrom = run(check_spf(Silent(), IP, "alice@pass.test", "client.test",
                                   receiver="mx.test", timeout=0.05))
    assert (helo.result, mailfrom.result) == (SPFResult.TEMPERROR, SPFResult.TEMPERROR)
    assert (helo.domain, mailfrom.domain) == ("client.test", "pass.test")
    assert mailfrom.reason == "SPF evaluation took longer than 0.05s"
    assert mailfrom.error is None  # a timeout is no bug: nothing to log


def test_spf_bug_is_temperror_with_the_reason() -> None:
    class Broken:
        async def lookup(self, name: str, rtype: str) -> Sequence[Record]:
            raise KeyError("bug")

    _helo, mailfrom = run(check_spf(Broken(), IP, None, "client.test", receiver="mx.test"))
    assert mailfrom.result is SPFResult.TEMPERROR and mailfrom.domain == "client.test"
    assert mailfrom.reason is not None and "KeyError" in mailfrom.reason
    # The traceback rides along for the glue to log (this module logs nothing).
    assert mailfrom.error is not None and "Traceback" in mailfrom.error
    assert _helo.error == mailfrom.error


def test_spf_pass_for_both_identities() -> None:
    helo, mailfrom = run(check_spf(ZoneResolver(ZONE), IP, "alice@pass.test", "client.test",
                                   receiver="mx.test"))
    assert (helo.result, mailfrom.result) == (SPFResult.PASS, SPFResult.PASS)
    assert mailfrom.mechanism == "ip4:192.0.2.0/24"


def test_spf_and_dkim_verdicts_of_a_signed_message(ed_key) -> None:
    """The real SPF request, through the zone, and a DKIM verification of the same
    message: both verdicts arrive (the zone answers at once, so this shows nothing
    about whether they overlap; test_offthread covers where the work runs)."""
    seed, txt = ed_key
    plain = message("alice@pass.test")
    msg = bytes(dkim.sign(plain, b"ed", b"pass.test", seed,
                          signature_algorithm=b"ed25519-sha256")) + plain

    async def read() -> bytes:
        return msg

    v = run(check_message(
        signed_zone(txt), inline, first=msg, size=len(msg), read=read,
        spf=SPFRequest(IP, "alice@pass.test", "client.test", "mx.test"),
        mail_from="alice@pass.test", settings=AuthChecks(), authserv_id="mx.test",
    ))
    assert v.results is not None and v.results.spf_mailfrom is not None
    assert v.results.spf_mailfrom.result is SPFResult.PASS
    assert [r.result for r in v.results.dkim] == ["pass"]
    assert b"spf=pass smtp.mailfrom=alice@pass.test" in v.prefix


def test_a_client_without_an_ip_address_gets_no_spf_verdicts() -> None:
    """A UNIX-socket client: SPF cannot apply (RFC 7208 needs an IP address)."""
    msg = message("alice@pass.test")
    v = run(check_message(
        ZoneResolver(ZONE), inline, first=msg, size=len(msg), read=never,
        spf=SPFRequest("/run/maitred.sock", "alice@pass.test", "client.test", "mx.test"),
        mail_from="alice@pass.test", settings=AuthChecks(), authserv_id="mx.test",
    ))
    assert v.results is not None
    assert (v.results.spf_helo, v.results.spf_mailfrom) == (None, None)
    assert v.results.mail_from == "alice@pass.test" and b"spf=" not in v.prefix
