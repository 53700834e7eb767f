"""Keeps benchmarks/ from rotting: the quick mode runs every scenario for a few seconds
and fails if any transaction did not get its 250.  No timing is asserted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick(script: str, timeout: float) -> str:
    """Run a benchmarks/ script in its --quick mode; its stdout, once it exited 0."""
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_benchmarks_quick() -> None:
    pytest.importorskip("aiosmtpd")
    if shutil.which("dnsmasq") is None and not Path("/usr/sbin/dnsmasq").exists():
        # the maitred-auth/-checks rows serve their SPF/DKIM/DMARC records from dnsmasq
        pytest.skip("dnsmasq is not installed (Debian dnsmasq-base)")
    assert "maitred" in quick("run.py", timeout=300)


def test_target_ratio_range_is_paired_by_repetition(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bracketed range pairs our server and the peer within each repetition: the
    medians' ratio here is 2.00x, the paired ratios 1.50x and 3.00x."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report
    from scenarios import Sample

    def sample(server: str, repetition: int, cpu: float) -> Sample:
        return Sample("b/py", server, repetition, metrics={"server_cpu_us_per_msg": cpu})

    samples = [sample("twisted-mail", 1, 300.0), sample("maitred", 1, 200.0),
               sample("twisted-mail", 2, 600.0), sample("maitred", 2, 200.0),
               sample("twisted-mail", 3, 400.0)]  # no maitred sample: not paired
    target = next(t for t in report.targets_for([_Variant("b/py", "messages")])
                  if t.peer == "twisted-mail" and t.metric == "server_cpu_us_per_msg")
    summary = report.summarize(samples)
    reps = report.by_repetition(samples)
    assert report.evaluate(target, "maitred", summary, reps) == ("2.00x (1.50-3.00)", "MISS")
    assert report.evaluate(target, "maitred", summary) == ("2.00x", "MISS")


def test_floor_lines_say_what_the_target_leaves_above_the_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report
    from scenarios import Sample

    samples = [
        Sample("b/py", server, 1, metrics={"server_cpu_us_per_msg": cpu})
        for server, cpu in (("twisted-floor", 60.0), ("twisted-mail", 400.0),
                            ("maitred", 200.0), ("aiosmtpd", 900.0), ("twisted-fused", 90.0))
    ]
    servers = ["aiosmtpd", "twisted-mail", "twisted-floor", "maitred"]
    summary = report.summarize(samples)
    assert report.floor_lines(servers, summary) == [
        "- (b/py) floor 60 µs/msg; twisted-mail ÷ 2.5 = 160 µs/msg leaves 100 µs above the "
        "floor; spent above it: maitred 140 µs",
        "",
    ]
    # The fused reference is named apart from ours, when it ran.
    assert report.floor_lines([*servers, "twisted-fused"], summary)[0].endswith(
        "spent above it: maitred 140 µs; the reference twisted-fused 30 µs"
    )
    assert report.floor_lines(["maitred"], report.summarize(samples[2:])) == []


def test_checks_lines_compare_the_default_checks_with_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report
    from scenarios import Sample

    samples = [
        Sample("b/py", server, rep, metrics={"server_cpu_us_per_msg": cpu})
        for server, rep, cpu in (("maitred", 1, 100.0), ("maitred-checks", 1, 120.0),
                                 ("maitred", 2, 100.0), ("maitred-checks", 2, 140.0))
    ]
    summary, reps = report.summarize(samples), report.by_repetition(samples)
    assert report.checks_lines(["maitred", "maitred-checks"], summary, reps) == [
        "- (b/py) default checks: maitred-checks 130 µs/msg ÷ maitred (--no-auth-checks) "
        "100 µs/msg = 1.30x (1.20-1.40), required ≤ 1.3x: PASS",
        "",
    ]
    slow = [Sample("b/py", "maitred-checks", 1, metrics={"server_cpu_us_per_msg": 131.0}),
            samples[0]]
    line = report.checks_lines(["maitred", "maitred-checks"], report.summarize(slow))[0]
    assert line.endswith("= 1.31x, required ≤ 1.3x: MISS")
    assert report.checks_lines(["maitred"], summary) == []


class _Variant:
    def __init__(self, key: str, kind: str) -> None:
        self.key, self.kind = key, kind


def test_inprocess_quick() -> None:
    """benchmarks/inprocess.py runs both protocols, checks every reply, and reports."""
    out = quick("inprocess.py", timeout=120)
    for phase in ("connect", "HELO", "MAIL", "RCPT", "DATA", "body", "QUIT", "total"):
        assert phase in out
    assert "maitred_tx" in out and "twisted.mail" in out


def test_inprocess_check_refuses_what_an_accepting_server_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import inprocess

    inprocess.check("ok", b"220 hi\r\n250-x\r\n250 y\r\n", [220, 250])
    for wrong in (b"220 hi\r\n", b"220 hi\r\n451 4.3.0 later\r\n", b"220 hi\r\n250 y"):
        with pytest.raises(inprocess.CheckError):
            inprocess.check("wrong", wrong, [220, 250])


# A transaction up to the body's first line, for the fused reference's checks.
_BODY = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\nDATA\r\nS: x\r\n\r\n"
# A transaction whose header block is 96 octets (its last CRLF included), in 3 lines.
_HEADER_96 = (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n"
              + b"A: " + b"a" * 27 + b"\r\nB: " + b"b" * 27 + b"\r\nC: " + b"c" * 27
              + b"\r\n\r\nbody\r\n.\r\n")


class _FusedSession:
    """The fused reference on a StringTransport, its timer on a Clock."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "servers"))
        import twisted_fused_server
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        from twisted_mail_server import Counter

        self.clock = Clock()
        monkeypatch.setattr(twisted_fused_server, "reactor", self.clock)
        self.module = twisted_fused_server
        self.protocol = twisted_fused_server.FusedFactory(Counter()).buildProtocol(None)
        self.transport = StringTransport()
        self.transport.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"EHLO client.test\r\n")

    def feed(self, lines: bytes, whole: bool) -> list[int]:
        """The reply codes of the session so far, after *lines* (whole or by octets)."""
        from maitred_tx.testing import parse_replies

        for piece in [lines] if whole else [lines[i : i + 1] for i in range(len(lines))]:
            self.protocol.dataReceived(piece)
        return [r.code for r in parse_replies(self.transport.value())]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (_BODY + b"ok\r\n.\r\n", [250, 250, 354, 250]),
        (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@elsewhere.example>\r\n", [250, 550]),
        (_BODY + b"n\0l\r\n.\r\n", [250, 250, 354, 550]),
        (_BODY + b"bare\nlf\r\n.\r\n", [250, 250, 354, 550]),
        (_BODY + b"x" * 999 + b"\r\n.\r\n", [250, 250, 354, 554]),
        (_BODY + b"x" * 998 + b"\r\n.\r\n", [250, 250, 354, 250]),
        (b"MAIL FROM:<a@b.example> SIZE=99999999999\r\n", [552]),
        (b"MAIL FROM:<not an address>\r\n", [500]),
        (b"DATA\r\n", [503]),
        (b"NOOP\n", [500]),
    ],
    ids=["accepted", "relay", "nul", "bare-lf", "long-line", "longest-line", "size", "path",
         "sequence", "bare-lf-command"],
)
def test_the_fused_reference_checks_what_it_claims(
    monkeypatch: pytest.MonkeyPatch, lines: bytes, expected: list[int]
) -> None:
    """The fused reference is only a fair yardstick while it refuses what maitred_tx
    refuses: each check it is said to make, fed whole and byte by byte."""
    for whole in (True, False):
        codes = _FusedSession(monkeypatch).feed(lines, whole)
        assert codes == [220, 250, *expected], ("whole" if whole else "bytes", codes)


@pytest.mark.parametrize(("limit", "code"), [(95, 552), (96, 250)])
def test_the_fused_reference_measures_the_header_block_across_reads(
    monkeypatch: pytest.MonkeyPatch, limit: int, code: int
) -> None:
    """Fed byte by byte, every read starts or ends inside a line: the block's end must
    still be found across reads, and its size counted to the CRLF that ends it."""
    for whole in (True, False):
        session = _FusedSession(monkeypatch)
        monkeypatch.setattr(session.module, "MAX_HEADER", limit)
        assert session.feed(_HEADER_96, whole) == [220, 250, 250, 250, 354, code]


def test_the_fused_reference_times_out_from_the_last_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its one idle timer sleeps on after a read, as maitred_tx's does."""
    session = _FusedSession(monkeypatch)
    timeout = session.module.IDLE_TIMEOUT
    session.clock.advance(timeout - 1)
    assert session.feed(b"NOOP\r\n", True) == [220, 250, 250]
    session.clock.advance(timeout - 1)  # the first timer fires: a read came since
    assert not session.transport.disconnecting
    session.clock.advance(1)
    assert session.feed(b"", True) == [220, 250, 250, 421]
    assert session.transport.disconnecting
