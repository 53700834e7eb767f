"""The Organizational Domain (RFC 7489 3.2) against the official PSL test vectors.

Every ``checkPublicSuffix`` line of data/psl/test_psl.txt (see data/psl/SOURCE.md) is
one test case: the registrable domain must equal the expected value, null meaning none.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from maitred_tx.auth.dmarc import organizational_domain, registrable_domain

DATA = Path(__file__).parent / "data" / "psl" / "test_psl.txt"
_LINE = re.compile(r"checkPublicSuffix\((null|'[^']*'), (null|'[^']*')\);")


def _vectors() -> list[tuple[str | None, str | None]]:
    vectors = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if line.startswith("//") or not line.strip():
            continue
        match = _LINE.fullmatch(line.strip())
        assert match is not None, f"unparsed line in test_psl.txt: {line!r}"
        domain, expected = (None if v == "null" else v[1:-1] for v in match.groups())
        vectors.append((domain, expected))
    return vectors


VECTORS = _vectors()


def test_every_line_is_read() -> None:
    lines = [ln for ln in DATA.read_text(encoding="utf-8").splitlines()
             if ln.startswith("checkPublicSuffix(")]
    # 78 active lines; the 4 '.local' lines are commented out upstream.
    assert len(VECTORS) == len(lines) == 78


@pytest.mark.parametrize(("domain", "expected"), VECTORS, ids=[repr(d) for d, _ in VECTORS])
def test_registrable_domain(domain: str | None, expected: str | None) -> None:
    # A null input is represented by the empty string, the only "no name" a str can be.
    assert registrable_domain(domain or "") == expected


@pytest.mark.parametrize(("domain", "expected"), VECTORS, ids=[repr(d) for d, _ in VECTORS])
def test_organizational_domain(domain: str | None, expected: str | None) -> None:
    if domain is None or domain.startswith("."):
        pytest.skip("not a domain name: no Organizational Domain to speak of")
    # A name with no registrable domain (a public suffix) is its own Organizational Domain.
    assert organizational_domain(domain) == (expected or domain.lower())


def test_trailing_dot_and_case() -> None:
    assert organizational_domain("Mail.Example.CO.UK.") == "example.co.uk"
    assert registrable_domain("a.b.example.com.") == "example.com"


def test_private_section_is_honoured() -> None:
    # The package reads the ICANN and the private sections: a github.io user site is its
    # own Organizational Domain, so another user's site never aligns with it.
    assert organizational_domain("www.alice.github.io") == "alice.github.io"
    assert organizational_domain("bob.github.io") != organizational_domain("alice.github.io")
