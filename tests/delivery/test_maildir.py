"""MaildirDelivery: layout, exact bytes, durability order, failures, safety, memory."""

from __future__ import annotations

import hashlib
import os
import re
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from maitred_tx.delivery import maildir as maildir_module
from maitred_tx.delivery.maildir import MaildirDelivery, maildir_components
from maitred_tx.envelope import Envelope, Recipient, SessionContext, trace_headers
from maitred_tx.interfaces import IMessageSink
from maitred_tx.outcomes import Accepted, Outcome, PermanentFailure, TemporaryFailure
from maitred_tx.smtp.address import Mailbox, parse_forward_path, parse_reverse_path
from maitred_tx.smtp.params import MailParams, RcptParams

CONTEXT = SessionContext(
    session_id="s1",
    hostname="mx.test",
    peer_host="127.0.0.1",
    peer_port=1234,
    helo="client.test",
    esmtp=True,
)
BODY = b"Subject: hi\r\n\r\nHello,\r\n\r\n.. a dot line\r\nbare\nLF and bare\rCR\r\n"


def mbox(path: str) -> Mailbox:
    return parse_forward_path(path, smtputf8=True)


def envelope(*recipients: Mailbox, message_id: str = "Q1") -> Envelope:
    return Envelope(
        session=CONTEXT,
        message_id=message_id,
        sender=parse_reverse_path("<sender@origin.test>", smtputf8=True),
        params=MailParams(smtputf8=True),
        recipients=tuple(Recipient(r) for r in recipients),
        received_at=1_700_000_000.0,
    )


def stored(maildir: Path, sub: str = "new") -> list[Path]:
    d = maildir / sub
    return sorted(d.iterdir()) if d.is_dir() else []


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def delivery(tmp_path: Path) -> MaildirDelivery:
    return MaildirDelivery(tmp_path / "mail", reactor)


async def deliver(
    delivery: MaildirDelivery, env: Envelope, chunks: Sequence[bytes] = (BODY,)
) -> list[Outcome]:
    sink = await delivery.open_message(env)
    assert IMessageSink.providedBy(sink)
    for chunk in chunks:
        assert sink.write(chunk) is None
    return list(await sink.close())


def only_message(maildir: Path) -> bytes:
    files = stored(maildir)
    assert len(files) == 1, files
    assert stored(maildir, "tmp") == []
    return files[0].read_bytes()


# --- layout and exact bytes ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_single_recipient_exact_bytes(delivery: MaildirDelivery) -> None:
    bob = mbox("<Bob@Example.COM>")
    env = envelope(bob)
    assert await deliver(delivery, env, [BODY[:5], b"", BODY[5:]]) == [Accepted()]
    maildir = Path(delivery.root) / "example.com" / "bob"
    data = only_message(maildir)
    headers = trace_headers(env, bob)
    assert data == headers + BODY
    assert data.startswith(
        b"Return-Path: <sender@origin.test>\r\nDelivered-To: Bob@example.com\r\n"
    )
    assert b"Received: from client.test ([127.0.0.1])\r\n" in data
    # Every header line ends with CRLF; no bare LF in the trace fields.
    assert headers.endswith(b"\r\n") and b"\n" not in headers.replace(b"\r\n", b"")
    for sub in ("tmp", "new", "cur"):
        assert (maildir / sub).is_dir()
    assert (maildir.stat().st_mode & 0o777) == 0o700


@pytest_twisted.ensureDeferred
async def test_file_name_follows_maildir_spec(delivery: MaildirDelivery) -> None:
    await deliver(delivery, envelope(mbox("<bob@example.com>")))
    [path] = stored(Path(delivery.root) / "example.com" / "bob")
    name = path.name
    base, size = name.rsplit(",S=", 1)
    assert int(size) == path.stat().st_size
    match = re.fullmatch(r"(\d+)\.M(\d{1,6})P(\d+)Q(\d+)\.(.+)", base)
    assert match is not None, base
    assert int(match[3]) == os.getpid()
    assert "/" not in name and ":" not in name
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest_twisted.ensureDeferred
async def test_binary_body_preserved(delivery: MaildirDelivery) -> None:
    body = bytes(range(256)) * 4 + b"\r\n.\r\n" + bytes(range(255, -1, -1))
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
    bob = mbox("<bob@example.com>")
    env = envelope(bob, mbox("<carol@example.com>"))
    assert await deliver(delivery, env, chunks) == [Accepted(), Accepted()]
    for name in ("bob", "carol"):
        data = only_message(Path(delivery.root) / "example.com" / name)
        assert data.endswith(body)
    assert only_message(Path(delivery.root) / "example.com" / "bob") == (
        trace_headers(env, bob) + body
    )


@pytest_twisted.ensureDeferred
async def test_three_recipients_duplicate_and_other_domain(delivery: MaildirDelivery) -> None:
    bob, bob_again, alice = (
        mbox("<bob@example.com>"),
        mbox("<BOB@example.com>"),
        mbox("<alice@other.test>"),
    )
    env = envelope(bob, bob_again, alice)
    assert await deliver(delivery, env) == [Accepted(), Accepted(), Accepted()]
    root = Path(delivery.root)
    assert only_message(root / "example.com" / "bob") == trace_headers(env, bob) + BODY
    assert only_message(root / "other.test" / "alice") == trace_headers(env, alice) + BODY
    assert len(all_files(root)) == 2  # once per distinct mailbox


@pytest_twisted.ensureDeferred
async def test_utf8_local_part_and_domain(delivery: MaildirDelivery) -> None:
    jorg = mbox("<Jörg@Bücher.example>")
    nfd = Mailbox("Jo\u0308RG", "bücher.example")  # decomposed + upper: same mailbox
    env = envelope(jorg, nfd)
    assert await deliver(delivery, env) == [Accepted(), Accepted()]
    maildir = Path(delivery.root) / "bücher.example" / "jörg"
    assert only_message(maildir) == trace_headers(env, jorg) + BODY
    assert os.listdir(Path(delivery.root) / "bücher.example") == ["jörg"]


@pytest_twisted.ensureDeferred
async def test_postmaster(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    postmaster = mbox("<Postmaster>")
    assert postmaster.domain == ""
    assert await deliver(MaildirDelivery(root, reactor), envelope(postmaster)) == [Accepted()]
    assert only_message(root / "localhost" / "postmaster").endswith(BODY)
    d = MaildirDelivery(root, reactor, postmaster_domain="Example.COM")
    assert await deliver(d, envelope(postmaster)) == [Accepted()]
    assert only_message(root / "example.com" / "postmaster").endswith(BODY)


@pytest_twisted.ensureDeferred
async def test_explicit_threadpool_is_used(tmp_path: Path) -> None:
    class Pool:
        calls = 0

        def callInThreadWithCallback(self, onResult: Any, f: Any, *a: Any, **kw: Any) -> None:
            Pool.calls += 1
            reactor.getThreadPool().callInThreadWithCallback(onResult, f, *a, **kw)

    d = MaildirDelivery(tmp_path, reactor, threadpool=Pool())  # type: ignore[arg-type]
    env = envelope(mbox("<bob@example.com>"), mbox("<al@example.com>"))
    assert await deliver(d, env) == [Accepted(), Accepted()]
    assert Pool.calls == 2  # open, then close


# --- names that must never leave ROOT ------------------------------------------------


HOSTILE = [
    "../../x",
    "..",
    ".",
    "../",
    "/etc/passwd",
    "a/../../b",
    ".hidden",
    "a\\..\\b",
    "nul\x00byte",
    "ctl\x01\x1f\x7f\x85",
    "%2e%2e",
    "%2F",
]


@pytest.mark.parametrize("local", HOSTILE)
def test_components_are_single_safe_names(local: str) -> None:
    names = maildir_components(Mailbox(local, "example.com", quoted=True))
    assert names is not None
    for name in names:
        assert name not in ("", ".", "..")
        assert not name.startswith(".")
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert all(c.isprintable() for c in name)


def test_encoding_is_injective() -> None:
    # Distinct after case folding (which is deliberate) stays distinct once encoded.
    locals_ = ["a/b", "a%2Fb", "a%b", ".a", "%2Ea", "a\x00b", "a%00b"]
    names = {maildir_components(Mailbox(x, "example.com", quoted=True)) for x in locals_}
    assert len(names) == len(locals_)


@pytest.mark.parametrize(
    "mailbox",
    [
        Mailbox("", "example.com", quoted=True),
        Mailbox("x" * 256, "example.com", quoted=True),
        Mailbox("%" * 100, "example.com", quoted=True),  # 300 octets once encoded
        Mailbox("bad\ud800", "example.com", quoted=True),  # lone surrogate
    ],
)
def test_rcpt_refuses_unmappable_names(tmp_path: Path, mailbox: Mailbox) -> None:
    d = MaildirDelivery(tmp_path / "mail", reactor)
    env = envelope()
    outcome = d.rcpt_to(CONTEXT, env, mailbox, RcptParams())
    assert outcome == PermanentFailure("Mailbox name not allowed", 553, "5.1.3")
    assert (outcome.code, outcome.status) == (553, "5.1.3")
    assert d.rcpt_to(CONTEXT, env, mbox("<bob@example.com>"), RcptParams()) is None


@pytest_twisted.ensureDeferred
async def test_path_traversal_stays_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "mail"
    d = MaildirDelivery(root, reactor)
    parsed = mbox('<"../../x"@example.com>')
    hostile = [parsed] + [Mailbox(x, "example.com", quoted=True) for x in HOSTILE]
    hostile += [Mailbox("x", "../.."), Mailbox("x", ".."), Mailbox("y", "/etc")]
    for m in hostile:
        assert d.rcpt_to(CONTEXT, envelope(), m, RcptParams()) is None
    outcomes = await deliver(d, envelope(*hostile))
    assert outcomes == [Accepted()] * len(hostile)
    # Nothing outside ROOT, every message file exactly two levels below it.
    assert sorted(p.name for p in tmp_path.rglob("*") if root not in (p, *p.parents)) == [
        "a",
        "b",
    ]
    for f in all_files(root):
        rel = f.relative_to(root).parts
        assert len(rel) == 4 and rel[2] == "new", rel
    assert (root / "example.com" / "%2E.%2F..%2Fx").is_dir()
    assert (root / "%2E." / "x").is_dir()


@pytest_twisted.ensureDeferred
async def test_symlink_out_of_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "mail", tmp_path / "outside"
    outside.mkdir()
    (root / "example.com").mkdir(parents=True)
    (root / "example.com" / "eve").symlink_to(outside)
    d = MaildirDelivery(root, reactor)
    env = envelope(mbox("<eve@example.com>"), mbox("<bob@example.com>"))
    outcomes = await deliver(d, env)
    assert outcomes == [PermanentFailure("Mailbox name not allowed", 553, "5.1.3"), Accepted()]
    assert list(outside.iterdir()) == []


# --- abort and unfinished sinks -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_abort_leaves_nothing(delivery: MaildirDelivery) -> None:
    env = envelope(mbox("<bob@example.com>"), mbox("<carol@example.com>"))
    sink = await delivery.open_message(env)
    sink.write(BODY * 1000)
    maildir = Path(delivery.root) / "example.com" / "bob"
    assert len(stored(maildir, "tmp")) == 1
    sink.abort()
    sink.abort()  # idempotent
    sink.write(b"late")  # ignored
    assert all_files(Path(delivery.root)) == []


@pytest_twisted.ensureDeferred
async def test_unclosed_sink_puts_nothing_in_new(delivery: MaildirDelivery) -> None:
    sink = await delivery.open_message(envelope(mbox("<bob@example.com>")))
    sink.write(BODY)
    maildir = Path(delivery.root) / "example.com" / "bob"
    assert stored(maildir) == []
    sink.abort()


@pytest_twisted.ensureDeferred
async def test_close_twice_is_a_bug(delivery: MaildirDelivery) -> None:
    sink = await delivery.open_message(envelope(mbox("<bob@example.com>")))
    await sink.close()
    with pytest.raises(RuntimeError):
        sink.close()
    sink.abort()  # after close: nothing to do, the message stays
    assert len(stored(Path(delivery.root) / "example.com" / "bob")) == 1


# --- failures -----------------------------------------------------------------------

STORE_FAILED = TemporaryFailure("Could not store message, try again later", 451, "4.3.0")


def block(root: Path, mailbox: str, sub: str) -> None:
    """Make one Maildir unusable even for root: a file where a directory must be."""
    path = root / mailbox
    path.mkdir(parents=True)
    for s in ("tmp", "new", "cur"):
        if s == sub:
            (path / s).write_bytes(b"not a directory")
        else:
            (path / s).mkdir()


@pytest.mark.parametrize("sub", ["tmp", "new"])
@pytest_twisted.ensureDeferred
async def test_failure_for_one_recipient(delivery: MaildirDelivery, sub: str) -> None:
    root = Path(delivery.root)
    block(root, "example.com/bob", sub)
    env = envelope(mbox("<alice@example.com>"), mbox("<bob@example.com>"), mbox("<c@x.test>"))
    outcomes = await deliver(delivery, env)
    assert outcomes == [Accepted(), STORE_FAILED, Accepted()]
    assert (outcomes[1].code, outcomes[1].status) == (451, "4.3.0")  # type: ignore[union-attr]
    assert only_message(root / "example.com" / "alice").endswith(BODY)
    assert only_message(root / "x.test" / "c").endswith(BODY)
    assert [f.relative_to(root).as_posix() for f in all_files(root / "example.com" / "bob")] == [
        f"example.com/bob/{sub}"
    ]


@pytest.mark.parametrize("sub", ["tmp", "new"])
@pytest_twisted.ensureDeferred
async def test_failure_of_the_first_recipient(delivery: MaildirDelivery, sub: str) -> None:
    root = Path(delivery.root)
    block(root, "example.com/bob", sub)
    bob, alice = mbox("<bob@example.com>"), mbox("<alice@example.com>")
    env = envelope(bob, alice, bob)
    assert await deliver(delivery, env) == [STORE_FAILED, Accepted(), STORE_FAILED]
    assert only_message(root / "example.com" / "alice") == trace_headers(env, alice) + BODY
    if sub == "new":  # the tmp/ file whose rename failed was removed
        assert stored(root / "example.com" / "bob", "tmp") == []


@pytest_twisted.ensureDeferred
async def test_every_recipient_fails(delivery: MaildirDelivery) -> None:
    root = Path(delivery.root)
    block(root, "example.com/bob", "tmp")
    block(root, "example.com/al", "tmp")
    env = envelope(mbox("<bob@example.com>"), mbox("<al@example.com>"))
    assert await deliver(delivery, env) == [STORE_FAILED, STORE_FAILED]


@pytest_twisted.ensureDeferred
async def test_fsync_failure_of_the_stream_fails_everyone(
    delivery: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    env = envelope(mbox("<bob@example.com>"), mbox("<al@example.com>"))
    sink = await delivery.open_message(env)
    sink.write(BODY)
    monkeypatch.setattr(os, "fsync", failing)
    assert list(await sink.close()) == [STORE_FAILED, STORE_FAILED]
    assert all_files(Path(delivery.root)) == []


@pytest_twisted.ensureDeferred
async def test_write_error_fails_everyone(delivery: MaildirDelivery) -> None:
    class Broken:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    env = envelope(mbox("<bob@example.com>"), mbox("<al@example.com>"))
    sink = await delivery.open_message(env)
    real = sink._stream.file
    sink._stream.file = Broken()
    real.close()
    sink.write(BODY)
    assert list(await sink.close()) == [STORE_FAILED, STORE_FAILED]
    assert all_files(Path(delivery.root)) == []


# --- durability order ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_files_and_new_dirs_fsynced_before_close_fires(
    delivery: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        events.append(("rename", dst))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    env = envelope(mbox("<bob@example.com>"), mbox("<al@example.com>"))
    sink = await delivery.open_message(env)
    sink.write(BODY)
    events.clear()  # directory creation fsyncs are not what this test is about
    outcomes = await sink.close()
    fired_before = list(events)  # everything recorded before close's Deferred fired
    assert list(outcomes) == [Accepted(), Accepted()]
    for name in ("bob", "al"):
        maildir = Path(delivery.root) / "example.com" / name
        [final] = stored(maildir)
        tmp_file = maildir.resolve() / "tmp" / final.name.rsplit(",S=", 1)[0]
        file_synced = fired_before.index(("fsync", str(tmp_file)))
        renamed = fired_before.index(("rename", str(final)))
        dir_synced = fired_before.index(("fsync", str(maildir.resolve() / "new")))
        assert file_synced < renamed < dir_synced


# --- memory -------------------------------------------------------------------------


def chunks(count: int, size: int) -> Iterator[bytes]:
    pattern = hashlib.sha256(b"seed").digest() * (size // 32)
    for i in range(count):
        yield i.to_bytes(8, "big") + pattern[8:]


@pytest_twisted.ensureDeferred
async def test_50_mb_streamed_with_bounded_memory(delivery: MaildirDelivery) -> None:
    count, size = 800, 64 * 1024  # 52,428,800 octets
    env = envelope(mbox("<bob@example.com>"), mbox("<al@example.com>"))
    sink = await delivery.open_message(env)
    expected = hashlib.sha256()
    tracemalloc.start()
    try:
        for chunk in chunks(count, size):
            sink.write(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak
    assert list(await sink.close()) == [Accepted(), Accepted()]
    for chunk in chunks(count, size):
        expected.update(chunk)
    for name, who in (("bob", env.recipients[0]), ("al", env.recipients[1])):
        [path] = stored(Path(delivery.root) / "example.com" / name)
        headers = trace_headers(env, who.mailbox)
        assert path.stat().st_size == len(headers) + count * size
        got = hashlib.sha256()
        with path.open("rb") as f:
            assert f.read(len(headers)) == headers
            while block := f.read(1 << 20):
                got.update(block)
        assert got.hexdigest() == expected.hexdigest()


def test_module_never_imports_the_global_reactor() -> None:
    source = Path(maildir_module.__file__).read_text()
    assert "from twisted.internet import reactor" not in source
    assert "import reactor" not in source
