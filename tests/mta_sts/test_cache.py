"""The on-disk policy cache: expiry on a fake clock, restarts, corrupt files, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from twisted.internet import task

from maitred_tx.mta_sts.cache import MAX_FILE_SIZE, CachedPolicy, PolicyCache
from maitred_tx.mta_sts.policy import Mode, Policy

POLICY = Policy(Mode.ENFORCE, ("mx.example.test", "*.example.net"), 3600, (("k", "v w"),))
ENTRY = CachedPolicy("example.test", "id1", POLICY, 1000.0)


def make(directory: Path | None, clock: task.Clock) -> tuple[PolicyCache, list[str]]:
    problems: list[str] = []
    return PolicyCache(directory, clock.seconds, problems.append), problems


def clock_at(seconds: float) -> task.Clock:
    clock = task.Clock()
    clock.advance(seconds)
    return clock


def test_entries_survive_a_restart(tmp_path: Path) -> None:
    clock = clock_at(1000)
    cache, problems = make(tmp_path, clock)
    cache.put(ENTRY)
    cache.save(ENTRY)
    assert (tmp_path / "example.test.json").is_file()
    again, problems = make(tmp_path, clock)
    assert again.get("example.test") == ENTRY
    assert again.domains() == ["example.test"]
    assert problems == []


def test_the_directory_is_created_private(tmp_path: Path) -> None:
    make(tmp_path / "state" / "mta-sts", clock_at(0))
    assert (tmp_path / "state" / "mta-sts").stat().st_mode & 0o777 == 0o700


def test_max_age_expiry(tmp_path: Path) -> None:
    clock = clock_at(1000)
    cache, _ = make(tmp_path, clock)
    cache.put(ENTRY)
    cache.save(ENTRY)
    clock.advance(3599)
    assert cache.get("example.test") == ENTRY
    assert make(tmp_path, clock)[0].get("example.test") == ENTRY
    clock.advance(1)  # fetched_at + max_age: expired
    assert cache.get("example.test") is None
    assert len(cache) == 0
    # a restart after expiry does not load it, and removes the file
    restarted, problems = make(tmp_path, clock)
    assert restarted.get("example.test") is None
    assert not (tmp_path / "example.test.json").exists()
    assert problems == []


def test_max_age_zero_is_never_served(tmp_path: Path) -> None:
    clock = clock_at(50)
    cache, _ = make(tmp_path, clock)
    cache.put(CachedPolicy("example.test", "x", Policy(Mode.TESTING, ("a.test",), 0), 50.0))
    assert cache.get("example.test") is None


def test_memory_only_cache(tmp_path: Path) -> None:
    cache, _ = make(None, clock_at(1000))
    cache.put(ENTRY)
    cache.save(ENTRY)  # nothing to write
    assert cache.get("example.test") == ENTRY
    assert cache.path_for("example.test") is None


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("example.test.json", b"\x00\xff garbage", "ignoring"),
        ("example.test.json", b"{not json", "ignoring"),
        ("example.test.json", b"[]", "not a format-1 cache entry"),
        ("example.test.json", b"[" * 100000, "ignoring"),  # RecursionError in json
        ("example.test.json", b" " * (MAX_FILE_SIZE + 1), f"larger than {MAX_FILE_SIZE}"),
        ("Example.test.json", None, "normalised"),
        ("..json", None, "not a domain name"),
    ],
)
def test_corrupt_files_are_skipped_and_reported(
    tmp_path: Path, name: str, content: bytes | None, why: str
) -> None:
    (tmp_path / "good.test.json").write_bytes(
        CachedPolicy("good.test", "g1", POLICY, 1000.0).to_json()
    )
    (tmp_path / name).write_bytes(content if content is not None else ENTRY.to_json())
    cache, problems = make(tmp_path, clock_at(1000))
    assert cache.domains() == ["good.test"]
    assert len(problems) == 1
    assert name in problems[0] and why in problems[0]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"format": 2}, "format-1"),
        ({"domain": "other.test"}, "is for 'other.test'"),
        ({"id": "bad id!"}, "bad policy id"),
        ({"id": 5}, "bad policy id"),
        ({"fetched_at": "yesterday"}, "bad fetch time"),
        ({"fetched_at": float("nan")}, "bad fetch time"),
        ({"policy": None}, "no policy text"),
        ({"policy": "version: STSv1\nmode: enforce\nmax_age: 1\n"}, "no 'mx' line"),
    ],
)
def test_entries_are_validated(tmp_path: Path, change: dict[str, object], why: str) -> None:
    data = json.loads(ENTRY.to_json()) | change
    (tmp_path / "example.test.json").write_text(json.dumps(data))
    cache, problems = make(tmp_path, clock_at(1000))
    assert len(cache) == 0
    assert len(problems) == 1 and why in problems[0], problems


def test_leftovers_of_interrupted_writes_are_removed(tmp_path: Path) -> None:
    leftover = tmp_path / ".example.test.abc123.tmp"
    leftover.write_bytes(b'{"format": 1, "dom')
    (tmp_path / "README").write_text("not ours, left alone")
    cache, problems = make(tmp_path, clock_at(1000))
    assert not leftover.exists()
    assert (tmp_path / "README").exists()
    assert len(cache) == 0 and problems == []


def test_a_clock_gone_back_does_not_extend_an_entry(tmp_path: Path) -> None:
    cache, _ = make(tmp_path, clock_at(5000))
    cache.save(CachedPolicy("example.test", "id1", POLICY, 5000.0))
    clock = clock_at(1000)  # the machine's clock went back by 4000 s
    restarted, _ = make(tmp_path, clock)
    entry = restarted.get("example.test")
    assert entry is not None and entry.fetched_at == 1000.0
    clock.advance(3600)
    assert restarted.get("example.test") is None


def test_save_replaces_the_file_atomically(tmp_path: Path) -> None:
    cache, _ = make(tmp_path, clock_at(1000))
    cache.save(ENTRY)
    path = tmp_path / "example.test.json"
    before = path.read_bytes()
    inode = path.stat().st_ino
    with path.open("rb") as reader:  # a reader of the old file keeps seeing all of it
        newer = CachedPolicy("example.test", "id2", POLICY, 2000.0)
        cache.save(newer)
        assert reader.read() == before
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert CachedPolicy.from_json(path.read_bytes(), "example.test") == newer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.test.json"]


def test_a_failed_write_leaves_the_old_entry_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _ = make(tmp_path, clock_at(1000))
    cache.save(ENTRY)
    path = tmp_path / "example.test.json"
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cache.save(CachedPolicy("example.test", "id2", POLICY, 2000.0))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.test.json"]


def test_paths_only_for_normalised_domains(tmp_path: Path) -> None:
    cache, _ = make(tmp_path, clock_at(0))
    for bad in ("../etc/passwd", "Example.test", "a/b.test", "example.test."):
        with pytest.raises(ValueError):
            cache.path_for(bad)
    assert cache.path_for("xn--bcher-kva.example") == tmp_path / "xn--bcher-kva.example.json"
