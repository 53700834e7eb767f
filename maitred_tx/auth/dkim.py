"""DKIM signature verification (RFC 6376), rsa-sha256 and ed25519-sha256 (RFC 8463).

This module owns the split between the two kinds of work a DKIM check needs:

- DNS goes through our ``Resolver`` only, never dkimpy's own DNS: the key names
  (``s._domainkey.d``) of every signature are read from the header block and looked up
  concurrently first; dkimpy then gets a ``dnsfunc`` that answers from what was fetched.
- The CPU work (canonicalization, hashing, RSA / Ed25519) runs inside one call of the
  caller's ``run_cpu`` per message, so production can hand it to a bounded thread pool
  and tests can run it inline.

Every DKIM-Signature header field gets one ``DKIMResult``, in header order, with an
RFC 8601 2.7.1 result.  How RFC 6376's PERMFAIL/TEMPFAIL cases map onto those values:

======================================================  ===========  ==================
case                                                    result       where
======================================================  ===========  ==================
signature verifies                                      pass         RFC 6376 6.1.3
body hash or header signature does not match            fail         RFC 6376 6.1.3
key revoked (``p=`` empty)                              fail         RFC 6376 3.6.1, 6.1.2 step 6
signature expired (``x=`` before ``now``)               fail         RFC 6376 3.5 x=, 6.1.1
no key (NXDOMAIN, no TXT record)                        permerror    RFC 6376 6.1.2 step 3
key record unusable, key type does not fit ``a=``      permerror    RFC 6376 6.1.2 steps 4-8
signature unparseable, required tag missing or bad,     permerror    RFC 6376 6.1.1
From not signed, ``t=`` in the future
``l=`` larger than the canonicalized body               permerror    RFC 6376 3.4.5, 8.2
rsa-sha1 signature, key shorter than 1024 bits,         policy       RFC 8301 3.1, 3.2
signatures past ``max_signatures``
DNS timeout / SERVFAIL for the key                      temperror    RFC 6376 6.1.2 step 2
======================================================  ===========  ==================

Why these three choices:

- *Revoked key -> fail.*  RFC 6376 6.1.2 step 6 says a revoked key MUST be treated as "a
  failed signature check"; the signer has disowned the signature, which is what RFC 8601's
  ``fail`` ("failed the verification test") reports.  libopendkim likewise reports it among
  the verification outcomes (DKIM_STAT_REVOKED next to BADSIG), not as an unverifiable
  signature.  A key that is merely absent stays ``permerror``: no test could be run.
- *Expired -> fail.*  ``x=`` is a signed limit set by the signer; past it the signature no
  longer vouches for the message (RFC 6376 3.5), so the verification test fails.  We allow
  ``_CLOCK_SKEW`` seconds for unsynchronised clocks.
- *Oversize l= -> permerror.*  An ``l=`` claiming more body than there is cannot be
  honoured (dkimpy would silently hash the shorter body and pass); libopendkim rejects it
  as a signature error (DKIM_SIGERROR_TOOLARGE_L), and RFC 8601's permerror is the
  "unrecoverable error" that a later attempt will not change.

dkimpy's own ``verify()`` checks ``t=``/``x=`` against ``time.time()``; to keep ``now``
injectable without monkeypatching, we run dkimpy's field validation without those two tags,
check them ourselves against ``now``, and then call ``DKIM.verify_sig`` (what ``verify()``
calls after its header preparation).  Written against dkimpy 1.1.
"""

from __future__ import annotations

import binascii
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias, TypeVar

import dkim
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
)
from dkim.util import InvalidTagValueList, parse_tag_value

from maitred_tx.auth.resolver import NXDomain, Record, Resolver, TemporaryDNSError

__all__ = ["CPURunner", "DKIMResult", "DKIMResultValue", "verify_dkim"]

_T = TypeVar("_T")

DKIMResultValue: TypeAlias = Literal["pass", "fail", "neutral", "temperror", "permerror", "policy"]

# Seconds of clock difference tolerated for t= (future) and x= (past): OpenDKIM's
# ClockDrift default (300 s).  dkimpy's own 10 hours lets a signature live on for most
# of a working day after the signer meant it to die.
_CLOCK_SKEW = 300
# RFC 8301 3.2: verifiers MUST NOT consider keys shorter than 1024 bits valid.
_MIN_RSA_BITS = 1024
# RFC 6008 2: header.b carries at least 8 characters of b=, more when needed to tell the
# message's signatures apart.
_MIN_HEADER_B = 8


class CPURunner(Protocol):
    """Runs a CPU-bound function somewhere (a thread pool in production) and gives
    back its result as an awaitable."""

    def __call__(self, fn: Callable[[], _T], /) -> Awaitable[_T]: ...


@dataclass(frozen=True, slots=True)
class DKIMResult:
    """The outcome for one DKIM-Signature header field (RFC 8601 2.7.1)."""

    result: DKIMResultValue
    domain: str  # d=, "" when the signature did not carry one
    selector: str  # s=
    b: str  # the first characters of b= (header.b, RFC 6008)
    algorithm: str  # a=
    reason: str | None = None


# -- header block and key discovery (cheap, runs on the caller's thread) -------------

# the same field-name rule as dkimpy's rfc822_parse, so both see the same fields
_HEADER_NAME = re.compile(rb"([\x21-\x7e]+?):")


def header_fields(message: bytes) -> list[tuple[bytes, bytes]]:
    """The (name, raw value) pairs of the header block, unfolding continuation lines
    into the value.  Lines that are neither a field nor a continuation are skipped
    (dkimpy refuses them; the verification step reports that)."""
    fields: list[tuple[bytes, bytes]] = []
    for line in _header_lines(message):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line + b"\r\n")
            continue
        m = _HEADER_NAME.match(line)
        if m is not None:
            fields.append((m.group(1), line[m.end() :] + b"\r\n"))
    return fields


def _header_lines(message: bytes) -> Iterable[bytes]:
    start = 0
    while start < len(message):
        end = message.find(b"\n", start)
        if end == -1:
            end = len(message)
        line = message[start:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return
        yield line
        start = end + 1


def format_error(e: Exception) -> str:
    """dkimpy's complaint about a header block; it raises IndexError when the block
    opens with a continuation line."""
    if isinstance(e, IndexError):
        return "continuation line before the first header field"
    return str(e)


def lenient_tags(value: bytes) -> dict[str, str]:
    """Tag=value pairs read without raising, for reporting on broken signatures."""
    tags: dict[str, str] = {}
    for spec in value.split(b";"):
        name, sep, val = spec.partition(b"=")
        if sep:
            key = name.strip().decode("ascii", "replace")
            tags.setdefault(key, val.strip().decode("utf-8", "replace"))
    return tags


def key_name(sig: Mapping[bytes, bytes]) -> bytes | None:
    """The DNS name dkimpy will ask for (RFC 6376 3.6.2.1), lower case, no final dot."""
    if b"s" not in sig or b"d" not in sig:
        return None
    return (sig[b"s"] + b"._domainkey." + sig[b"d"]).lower().rstrip(b".")


# What a key lookup gave: the TXT record (bytes), or why there is none.
@dataclass(frozen=True, slots=True)
class KeyMissing:
    reason: str


@dataclass(frozen=True, slots=True)
class KeyTemporary:
    reason: str


KeyAnswer: TypeAlias = "bytes | KeyMissing | KeyTemporary"


def key_names(signature_values: Iterable[bytes]) -> list[bytes]:
    """The key record names (s._domainkey.d.) of the signatures that can be parsed;
    DKIM-Signature, ARC-Message-Signature and ARC-Seal share the tag-list syntax."""
    names: list[bytes] = []
    for value in signature_values:
        try:
            name = key_name(parse_tag_value(value))
        except InvalidTagValueList:
            continue
        if name is not None:
            names.append(name)
    return names


async def fetch_keys(names: Iterable[bytes], resolver: Resolver) -> dict[bytes, KeyAnswer]:
    """Looks up every key name once.

    Every lookup is asked for before the first is awaited, which makes them concurrent
    with a resolver whose ``lookup()`` starts at the call (the checks thread's
    ``offthread.BridgedResolver`` does); with plain coroutines they run one after the
    other.  No asyncio.gather, so that any driver of coroutines can run this.
    """
    unique = list(dict.fromkeys(names))
    pending = [(name, _ask(name, resolver)) for name in unique]
    return {name: await _key_answer(name, asked) for name, asked in pending}


def _ask(name: bytes, resolver: Resolver) -> Awaitable[Sequence[Record]] | KeyMissing:
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return KeyMissing("key name is not UTF-8")
    return resolver.lookup(text, "TXT")


async def _key_answer(name: bytes, asked: Awaitable[Sequence[Record]] | KeyMissing) -> KeyAnswer:
    if isinstance(asked, KeyMissing):
        return asked
    text = name.decode("utf-8")
    try:
        records = await asked
    except NXDomain:
        return KeyMissing(f"no key for signature: {text} does not exist")
    except TemporaryDNSError as e:
        return KeyTemporary(f"key lookup failed: {e}")
    txts = [_txt_bytes(r) for r in records if isinstance(r, str)]
    if not txts:
        return KeyMissing(f"no key for signature: no TXT record at {text}")
    # RFC 6376 3.6.2.2 / 6.1.2 step 3: with several records the verifier may choose;
    # we take the first that reads as a key record (has p=), else the first.
    for txt in txts:
        try:
            if b"p" in parse_tag_value(txt):
                return txt
        except InvalidTagValueList:
            continue
    return txts[0]


def _txt_bytes(record: str) -> bytes:
    try:
        return record.encode("latin-1")  # how the resolver decoded it (resolver.Record)
    except UnicodeEncodeError:
        return record.encode("utf-8")


def make_dnsfunc(keys: Mapping[bytes, KeyAnswer]) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc``: called as ``dnsfunc(name, timeout=...)`` with the bytes
    name ``s._domainkey.d.`` (trailing dot); returns the TXT record or None, and
    raises ``dkim.DnsTimeoutError`` for a temporary failure."""

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        if isinstance(name, str):
            name = name.encode("utf-8")
        answer = keys.get(name.lower().rstrip(b"."))
        if isinstance(answer, bytes):
            return answer
        if isinstance(answer, KeyTemporary):
            raise dkim.DnsTimeoutError(answer.reason)
        return None

    return dnsfunc


# -- the public entry point ---------------------------------------------------------


async def verify_dkim(
    message: bytes,
    resolver: Resolver,
    run_cpu: CPURunner,
    *,
    now: float | None = None,
    max_signatures: int = 10,
) -> list[DKIMResult]:
    """Verifies every DKIM-Signature of ``message`` (the whole message as received,
    CRLF or LF line ends); one result per signature in header order, [] when unsigned.

    Signatures past the first ``max_signatures`` are not verified (RFC 6376 6.1: a
    verifier MAY limit them) and get ``policy``.  ``now`` (seconds since the epoch)
    is the time ``t=``/``x=`` are judged against; default: the clock at the call.
    """
    when = time.time() if now is None else now
    sig_values = [v for n, v in header_fields(message) if n.lower() == b"dkim-signature"]
    if not sig_values:
        return []
    keys = await fetch_keys(key_names(sig_values[:max_signatures]), resolver)
    prefixes = _b_prefixes(sig_values)
    results = await run_cpu(lambda: _verify_all(message, sig_values, keys, when, max_signatures))
    return [_with_b(r, prefixes[i]) for i, r in enumerate(results)]


def _b_prefixes(sig_values: Sequence[bytes]) -> list[str]:
    """Per signature, the shortest b= prefix (at least 8 characters) that no other
    signature of the message shares: one more than the longest common prefix with its
    neighbours in sorted order."""
    bs = ["".join(lenient_tags(v).get("b", "").split()) for v in sig_values]
    ordered = sorted(set(bs))
    shortest = {}
    for i, b in enumerate(ordered):
        neighbours = ordered[max(i - 1, 0) : i] + ordered[i + 1 : i + 2]
        common = max((_common_prefix(b, other) for other in neighbours), default=0)
        shortest[b] = b[: max(_MIN_HEADER_B, common + 1)]
    return [shortest[b] for b in bs]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _with_b(result: DKIMResult, b: str) -> DKIMResult:
    return DKIMResult(
        result.result, result.domain, result.selector, b, result.algorithm, result.reason
    )


# -- the CPU part (runs inside run_cpu) -----------------------------------------------


def _verify_all(
    message: bytes,
    sig_values: Sequence[bytes],
    keys: Mapping[bytes, KeyAnswer],
    now: float,
    max_signatures: int,
) -> list[DKIMResult]:
    try:
        signer = dkim.DKIM(message, minkey=_MIN_RSA_BITS)
        sigheaders = [(n, v) for n, v in signer.headers if n.lower() == b"dkim-signature"]
        broken = None if len(sigheaders) == len(sig_values) else "header block unreadable"
    except (dkim.DKIMException, IndexError) as e:
        signer, sigheaders, broken = None, [], f"message format: {format_error(e)}"
    dnsfunc = make_dnsfunc(keys)
    results = []
    for i, value in enumerate(sig_values):
        if i >= max_signatures:
            results.append(
                _result(value, "policy", f"not verified: more than {max_signatures} signatures")
            )
        elif signer is None or broken is not None:
            results.append(_result(value, "permerror", broken))
        else:
            results.append(_verify_one(signer, sigheaders[i], keys, dnsfunc, now))
    return results


def _result(value: bytes, result: DKIMResultValue, reason: str | None) -> DKIMResult:
    tags = lenient_tags(value)
    return DKIMResult(result, tags.get("d", ""), tags.get("s", ""), "", tags.get("a", ""), reason)


def _verify_one(
    signer: dkim.DKIM,
    sigheader: tuple[bytes, bytes],
    keys: Mapping[bytes, KeyAnswer],
    dnsfunc: Callable[..., bytes | None],
    now: float,
) -> DKIMResult:
    value = sigheader[1]
    try:
        sig = parse_tag_value(value)
    except InvalidTagValueList as e:
        return _result(value, "permerror", f"malformed signature: {e}")
    problem = _check_fields(sig, now)
    if problem is not None:
        return _result(value, problem[0], problem[1])
    name = key_name(sig)
    assert name is not None  # _check_fields made sure s= and d= are there
    key = keys.get(name, KeyMissing("no key for signature"))
    if isinstance(key, KeyTemporary):
        return _result(value, "temperror", key.reason)
    if isinstance(key, KeyMissing):
        return _result(value, "permerror", key.reason)
    problem = _check_key(sig, name, key)
    if problem is not None:
        return _result(value, problem[0], problem[1])
    problem = _check_length(sig, signer.body)
    if problem is not None:
        return _result(value, problem[0], problem[1])
    include = [h.lower() for h in re.split(rb"\s*:\s*", sig[b"h"])]
    signer.signature_fields, signer.domain, signer.selector = sig, sig[b"d"], sig[b"s"]
    signer.include_headers = tuple(include)
    try:
        ok = signer.verify_sig(sig, include, sigheader, dnsfunc)
    except dkim.KeyFormatError as e:
        if "too small" in str(e):
            return _result(value, "policy", f"{e} (RFC 8301 3.2)")
        return _result(value, "permerror", str(e))
    except dkim.ValidationError as e:
        if "body hash mismatch" in str(e):
            return _result(value, "fail", "body hash mismatch")
        return _result(value, "permerror", str(e))
    except (dkim.DKIMException, binascii.Error) as e:
        return _result(value, "permerror", str(e))
    if ok:
        return _result(value, "pass", None)
    return _result(value, "fail", "signature did not verify")


Problem: TypeAlias = "tuple[DKIMResultValue, str] | None"


def _check_fields(sig: dict[bytes, bytes], now: float) -> Problem:
    """RFC 6376 6.1.1, with t=/x= judged against ``now`` rather than the clock."""
    try:
        dkim.validate_signature_fields({k: v for k, v in sig.items() if k not in (b"t", b"x")})
    except dkim.ValidationError as e:
        return "permerror", str(e)
    if sig[b"a"] == b"rsa-sha1":
        return "policy", "rsa-sha1 is not accepted (RFC 8301 3.1)"
    if b"from" not in (h.strip().lower() for h in sig[b"h"].split(b":")):
        return "permerror", "From is not signed (RFC 6376 5.4)"
    t = sig.get(b"t")
    x = sig.get(b"x")
    for tag, val in ((b"t", t), (b"x", x), (b"l", sig.get(b"l"))):
        if val is not None and re.fullmatch(rb"\d{1,12}", val) is None:
            return "permerror", f"{tag.decode()}= is not a decimal integer"
    if t is not None and int(t) > now + _CLOCK_SKEW:
        return "permerror", "t= is in the future"
    if x is not None:
        if t is not None and int(x) < int(t):
            return "permerror", "x= is earlier than t="
        if int(x) < now - _CLOCK_SKEW:
            return "fail", "signature expired"
    return None


def _check_key(sig: dict[bytes, bytes], name: bytes, txt: bytes) -> Problem:
    """RFC 6376 6.1.2 steps 4-8 that dkimpy folds into one silent ``False``."""
    try:
        pub = parse_tag_value(txt)
    except InvalidTagValueList as e:
        return "permerror", f"key record unreadable: {e}"
    if b"p" not in pub:
        return "permerror", "key record has no p="
    if not pub[b"p"].strip():
        return "fail", "key revoked"
    key_type = pub.get(b"k", b"rsa").lower()
    if not sig[b"a"].startswith(key_type + b"-"):
        return "permerror", f"key type {key_type.decode('ascii', 'replace')} does not fit a="
    if b"h" in pub:
        allowed = {h.strip().lower() for h in pub[b"h"].split(b":")}
        if sig[b"a"].rsplit(b"-", 1)[-1] not in allowed:
            return "permerror", "key does not allow the signature's hash (h=)"
    try:
        dkim.evaluate_pk(name, txt)
    except dkim.NaClNotFoundError:
        return "temperror", "ed25519 verification unavailable (PyNaCl not installed)"
    except (dkim.KeyFormatError, binascii.Error, ValueError) as e:
        return "permerror", f"unusable key: {e}"
    return None


def _check_length(sig: dict[bytes, bytes], body: bytes) -> Problem:
    if b"l" not in sig:
        return None
    try:
        policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as e:
        return "permerror", f"invalid c=: {e}"
    if int(sig[b"l"]) > len(policy.canonicalize_body(body)):
        return "permerror", "l= is larger than the body"
    return None
