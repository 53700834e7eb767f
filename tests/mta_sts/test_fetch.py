"""PolicyFetcher against a real HTTPS server (twisted.web, test CA, 127.0.0.1): RFC 8461
3.3 - verified certificate for mta-sts.<domain>, 200 only, no redirects, text/plain,
size and time limits."""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from mta_sts_support import CA, GOOD_POLICY, PolicyServer, make_fetcher, policy_handler
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.web import server

from maitred_tx.mta_sts.fetch import FetchError, PolicyFetcher, policy_url
from maitred_tx.mta_sts.policy import MAX_POLICY_SIZE, Mode, Policy
from maitred_tx.mta_sts.report import ResultType

EXPECTED = Policy(Mode.ENFORCE, ("mx1.example.test",), 86400)
FETCH_ERROR = ResultType.STS_POLICY_FETCH_ERROR


async def fails(fetcher: PolicyFetcher, domain: str, result: ResultType, match: str) -> FetchError:
    with pytest.raises(FetchError, match=match) as raised:
        await fetcher.fetch(domain)
    assert raised.value.result_type is result
    assert raised.value.domain == domain
    return raised.value


def fetcher_for(ca: CA, https: PolicyServer, **kw: Any) -> PolicyFetcher:
    return make_fetcher(reactor, ca, https, **kw)


def maybe_deferred(result: Any) -> Any:
    return maybeDeferred(lambda: result)


def test_url() -> None:
    assert policy_url("example.com") == "https://mta-sts.example.com/.well-known/mta-sts.txt"


@pytest_twisted.ensureDeferred
async def test_good_policy(ca: CA, https: PolicyServer) -> None:
    assert await fetcher_for(ca, https).fetch("example.test") == EXPECTED
    assert https.requests == {"mta-sts.example.test": 1}
    (headers,) = https.headers
    assert headers[b"Host"] == [b"mta-sts.example.test"]
    assert b"Accept-Encoding" not in headers  # no content coding asked for
    assert b"Cookie" not in headers


@pytest_twisted.ensureDeferred
async def test_media_type_parameters_are_allowed(
    ca: CA, start_server: Callable[..., PolicyServer]
) -> None:
    https = start_server({
        "mta-sts.example.test": policy_handler(GOOD_POLICY, b"TEXT/Plain ; charset=utf-8"),
        "mta-sts.charset.example.test": policy_handler(GOOD_POLICY, b"text/plain;format=flowed"),
    })
    fetcher = fetcher_for(ca, https)
    assert await fetcher.fetch("example.test") == EXPECTED
    assert await fetcher.fetch("charset.example.test") == EXPECTED


def redirect(request: server.Request) -> bytes:
    request.setResponseCode(301)
    request.setHeader(b"location", b"https://mta-sts.example.test/.well-known/mta-sts.txt")
    return b""


def status(code: int) -> Callable[[server.Request], bytes]:
    def handle(request: server.Request) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain")
        return GOOD_POLICY.encode()  # a policy, but not with a 200

    return handle


@pytest_twisted.ensureDeferred
async def test_redirects_are_not_followed(
    ca: CA, start_server: Callable[..., PolicyServer]
) -> None:
    https = start_server({
        "mta-sts.example.test": policy_handler(GOOD_POLICY),
        "mta-sts.redirect.example.test": redirect,
    })
    await fails(fetcher_for(ca, https), "redirect.example.test", FETCH_ERROR,
                "HTTP status 301 to https://mta-sts.example.test/")
    assert https.requests == {"mta-sts.redirect.example.test": 1}  # the target never asked


@pytest.mark.parametrize("code", [404, 500, 204, 203])
@pytest_twisted.ensureDeferred
async def test_only_200_counts(
    ca: CA, start_server: Callable[..., PolicyServer], code: int
) -> None:
    https = start_server({"mta-sts.error.example.test": status(code)})
    await fails(fetcher_for(ca, https), "error.example.test", FETCH_ERROR, f"HTTP status {code}")


@pytest_twisted.ensureDeferred
async def test_missing_policy_is_404(ca: CA, https: PolicyServer) -> None:
    await fails(fetcher_for(ca, https), "missing.example.test", FETCH_ERROR, "HTTP status 404")


def two_types(request: server.Request) -> bytes:
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain", b"text/html"])
    return GOOD_POLICY.encode()


@pytest_twisted.ensureDeferred
async def test_media_type_must_be_text_plain(
    ca: CA, start_server: Callable[..., PolicyServer]
) -> None:
    https = start_server({
        "mta-sts.html.example.test": policy_handler(GOOD_POLICY, b"text/html"),
        "mta-sts.bad.example.test": policy_handler(GOOD_POLICY, b"text/plainx"),
        "mta-sts.untyped.example.test": policy_handler(GOOD_POLICY, None),
        "mta-sts.twotypes.example.test": two_types,
    })
    fetcher = fetcher_for(ca, https)
    await fails(fetcher, "html.example.test", FETCH_ERROR, "Content-Type text/html is not")
    await fails(fetcher, "bad.example.test", FETCH_ERROR, "text/plainx is not")
    await fails(fetcher, "untyped.example.test", FETCH_ERROR, "Content-Type none is not")
    await fails(fetcher, "twotypes.example.test", FETCH_ERROR, "text/plain, text/html is not")


@pytest_twisted.ensureDeferred
async def test_invalid_policy(ca: CA, start_server: Callable[..., PolicyServer]) -> None:
    https = start_server({
        "mta-sts.bad.example.test": policy_handler("version: STSv1\nmode: enforce\nmax_age: 9\n")
    })
    await fails(fetcher_for(ca, https), "bad.example.test", ResultType.STS_POLICY_INVALID,
                "no 'mx' line")


def stream(total: int, then_finish: bool) -> Callable[[server.Request], Any]:
    """A chunked body of ``total`` octets, then (maybe) the end; no Content-Length."""

    def handle(request: server.Request) -> Any:
        request.setHeader(b"content-type", b"text/plain")
        request.write(GOOD_POLICY.encode())
        sent = len(GOOD_POLICY)
        while sent < total:
            chunk = min(8192, total - sent)
            request.write(b"x-pad: " + b"y" * (chunk - 8) + b"\n")
            sent += chunk
        if then_finish:
            request.finish()
        return server.NOT_DONE_YET

    return handle


@pytest_twisted.ensureDeferred
async def test_size_limit(ca: CA, start_server: Callable[..., PolicyServer]) -> None:
    https = start_server({
        "mta-sts.big.example.test": policy_handler(GOOD_POLICY + "x: " + "y" * MAX_POLICY_SIZE),
        # 80 KiB streamed without a length, then the server stalls: the fetch must end
        # at the limit, not at the timeout
        "mta-sts.stall.example.test": stream(80 * 1024, then_finish=False),
        "mta-sts.example.test": stream(MAX_POLICY_SIZE, then_finish=True),
    })
    fetcher = fetcher_for(ca, https, timeout=5.0)
    await fails(fetcher, "big.example.test", FETCH_ERROR, r"body of \d+ octets exceeds 65536")
    started = time.monotonic()
    await fails(fetcher, "stall.example.test", FETCH_ERROR, "body larger than 65536 octets")
    assert time.monotonic() - started < 2
    policy = await fetcher.fetch("example.test")  # exactly at the limit: accepted
    assert policy.mx == ("mx1.example.test",)
    small = fetcher_for(ca, https, max_size=100)
    await fails(small, "example.test", FETCH_ERROR, "body larger than 100 octets")


def never(request: server.Request) -> Any:
    return server.NOT_DONE_YET  # no answer at all


@pytest_twisted.ensureDeferred
async def test_timeouts(ca: CA, start_server: Callable[..., PolicyServer]) -> None:
    https = start_server({
        "mta-sts.slow.example.test": never,
        "mta-sts.stall.example.test": stream(1000, then_finish=False),  # headers, then stall
    })
    fetcher = fetcher_for(ca, https, timeout=0.4)
    for domain in ("slow.example.test", "stall.example.test"):
        started = time.monotonic()
        await fails(fetcher, domain, FETCH_ERROR, "no answer within 0.4 s")
        assert 0.35 < time.monotonic() - started < 1.5


def cut_short(request: server.Request) -> Any:
    request.setHeader(b"content-type", b"text/plain")
    request.setHeader(b"content-length", b"1000")
    request.write(GOOD_POLICY.encode())
    request.channel.transport.transport.loseConnection()  # TCP closed under TLS
    return server.NOT_DONE_YET


def gzipped(request: server.Request) -> bytes:
    request.setHeader(b"content-type", b"text/plain")
    request.setHeader(b"content-encoding", b"gzip")
    return gzip.compress(GOOD_POLICY.encode())


@pytest_twisted.ensureDeferred
async def test_truncated_and_coded_bodies(
    ca: CA, start_server: Callable[..., PolicyServer]
) -> None:
    https = start_server({
        "mta-sts.cut.example.test": cut_short,
        "mta-sts.zip.example.test": gzipped,
    })
    fetcher = fetcher_for(ca, https)
    await fails(fetcher, "cut.example.test", FETCH_ERROR, "body cut short")
    await fails(fetcher, "zip.example.test", FETCH_ERROR, "content-coded answer \\(gzip\\)")


@pytest_twisted.ensureDeferred
async def test_certificate_for_another_name(ca: CA, https: PolicyServer) -> None:
    error = await fails(fetcher_for(ca, https), "wrongname.example.test",
                        ResultType.STS_WEBPKI_INVALID, "not valid for the name")
    assert "mta-sts.wrongname.example.test" in error.reason
    assert https.requests == {}  # nothing was asked over the unverified connection


@pytest_twisted.ensureDeferred
async def test_unknown_ca_and_expired_certificate(
    ca: CA, start_server: Callable[..., PolicyServer]
) -> None:
    handlers = {"mta-sts.example.test": policy_handler(GOOD_POLICY)}
    rogue = start_server(handlers, issuer=CA("rogue CA"))
    expired = start_server(handlers, expired=True)
    for https in (rogue, expired):
        await fails(fetcher_for(ca, https), "example.test", ResultType.STS_WEBPKI_INVALID,
                    "certificate verify failed")
        assert https.requests == {}


@pytest_twisted.ensureDeferred
async def test_connection_refused(ca: CA, https: PolicyServer) -> None:
    fetcher = fetcher_for(ca, https)
    await maybe_deferred(https.listener.stopListening())
    await fails(fetcher, "example.test", FETCH_ERROR, "ConnectionRefused")


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError):
        PolicyFetcher(None, timeout=0)
    with pytest.raises(ValueError):
        PolicyFetcher(None, max_size=0)


def byte_by_byte(request: server.Request) -> Any:
    """The policy as one chunk per octet (chunked transfer coding), CRLF and LF mixed."""
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    body = (GOOD_POLICY.replace("\r\n", "\n", 2) + "note: caf\xe9\r\n").encode()
    for i in range(len(body)):
        request.write(body[i : i + 1])
    request.finish()
    return server.NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_body_in_one_octet_chunks(
    ca: CA, start_server: Callable[..., PolicyServer]
) -> None:
    https = start_server({"mta-sts.example.test": byte_by_byte})
    policy = await fetcher_for(ca, https).fetch("example.test")
    assert (policy.mode, policy.mx, policy.max_age) == (EXPECTED.mode, EXPECTED.mx, 86400)
    assert policy.extensions == (("note", "caf\xe9"),)  # UTF-8 split across chunks
