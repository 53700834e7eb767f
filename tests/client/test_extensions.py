"""EHLO replies as real servers send them, read into Extensions (pure)."""

from __future__ import annotations

import pytest

from maitred_tx.client.extensions import NO_EXTENSIONS, parse_ehlo
from maitred_tx.client.replies import ServerReply


def ehlo(*lines: str) -> ServerReply:
    return ServerReply(250, None, lines)


def test_maitred_tx_ehlo():
    ext = parse_ehlo(ehlo("mx.test", "PIPELINING", "SIZE 10240000", "8BITMIME", "BINARYMIME",
                          "CHUNKING", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"))
    assert ext.esmtp and ext.pipelining and ext.chunking and ext.binary_mime
    assert ext.eight_bit_mime and ext.smtputf8 and ext.enhanced_status_codes and ext.dsn
    assert (ext.size, ext.max_size) == (True, 10240000)
    assert not ext.starttls and ext.auth == frozenset()


def test_postfix_ehlo_with_starttls_and_unknown_keywords():
    ext = parse_ehlo(ehlo("pfx.test", "PIPELINING", "SIZE 10240000", "VRFY", "ETRN",
                          "STARTTLS", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8",
                          "CHUNKING", "XFORWARD NAME ADDR PROTO HELO"))
    assert ext.starttls and not ext.binary_mime
    assert "etrn" in ext and "XFORWARD" in ext and "XCLIENT" not in ext
    assert ext.params("xforward") == ("NAME", "ADDR", "PROTO", "HELO")
    assert ext.params("VRFY") == () and ext.params("nope") is None


def test_smtp_sink_ehlo_ends_with_an_empty_line():
    ext = parse_ehlo(ehlo("smtp-sink", "PIPELINING", "8BITMIME", "AUTH PLAIN LOGIN",
                          "XCLIENT NAME HELO", "ENHANCEDSTATUSCODES", "DSN", ""))
    assert ext.auth == {"PLAIN", "LOGIN"} and ext.pipelining and not ext.size
    assert [name for name, _ in ext.keywords][-1] == "DSN"


def test_old_auth_equals_form_and_case():
    ext = parse_ehlo(ehlo("old.test", "auth=LOGIN", "Auth plain cram-md5", "size"))
    assert ext.auth == {"LOGIN", "PLAIN", "CRAM-MD5"}
    assert ext.size and ext.max_size is None


@pytest.mark.parametrize(("line", "maximum"), [
    ("SIZE 0", None),  # RFC 1870 4: no fixed maximum
    ("SIZE", None),
    ("SIZE 52428800", 52428800),
    ("SIZE lots", None),  # not a number: the server still enforces its own limit
    ("SIZE ١٢٣", None),  # Arabic-Indic digits are not ASCII digits
])
def test_size_values(line, maximum):
    ext = parse_ehlo(ehlo("mx", line))
    assert ext.size and ext.max_size == maximum


def test_helo_fallback_offers_nothing():
    assert not NO_EXTENSIONS.esmtp and not NO_EXTENSIONS.pipelining
    assert "PIPELINING" not in NO_EXTENSIONS
