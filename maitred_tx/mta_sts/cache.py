"""The MTA-STS policy cache (RFC 8461 5.1), kept on disk so that a restart keeps it.

One small JSON file per policy domain, ``<a-label domain>.json``, holding the policy id
(from the TXT record), the fetch time and the policy text.  An entry lives for the
policy's ``max_age`` after its fetch (3.2) and is then discarded.  Files are written
atomically (a temporary file in the same directory, fsync, rename, fsync of the
directory; ``write_atomically``): a crash leaves the old entry or the new one, never a
torn file.  Files that cannot be read back are skipped and reported, never fatal: the
cache is an optimisation of the protocol, which works (less well) without it.

Pure: stdlib only.  ``save`` and the loading in the constructor block on the file system;
glue runs ``save`` in a thread (``maitred_tx.mta_sts.store``).  Time comes from a clock
passed in: seconds since the epoch, so that entries survive restarts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from maitred_tx.mta_sts.policy import (
    ID_PATTERN,
    MAX_POLICY_SIZE,
    Policy,
    StsError,
    ascii_domain,
    parse_policy,
)

__all__ = ["REPORT_STATE_FILE", "CachedPolicy", "PolicyCache", "write_atomically"]

FORMAT: Final = 1
# A cache file is a policy plus a few fields: anything larger is not ours.
MAX_FILE_SIZE: Final = 2 * MAX_POLICY_SIZE + 4096
_SUFFIX: Final = ".json"
_TMP_SUFFIX: Final = ".tmp"
# The day's TLS report counts, kept beside the policies by ``relay.reports`` (with
# --tls-reports): not a policy domain's entry (no TLD is named "tls-report").
REPORT_STATE_FILE: Final = "tls-report.json"


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A policy as fetched for ``domain`` (lower-case A-labels) when the TXT record
    said ``policy_id``, at ``fetched_at`` (seconds since the epoch)."""

    domain: str
    policy_id: str
    policy: Policy
    fetched_at: float

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.policy.max_age

    def expired(self, now: float) -> bool:
        """3.2: max_age is the policy's lifetime, counted from its fetch."""
        return now >= self.expires_at

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "domain": self.domain,
                "id": self.policy_id,
                "fetched_at": self.fetched_at,
                "policy": self.policy.to_text(),
            },
            indent=1,
        ).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, domain: str) -> CachedPolicy:
        """Read back ``to_json``'s output for ``domain``; ValueError says what is wrong."""
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a format-{FORMAT} cache entry")
        if data.get("domain") != domain:
            raise ValueError(f"entry is for {data.get('domain')!r}, not {domain!r}")
        policy_id, fetched_at, text = data.get("id"), data.get("fetched_at"), data.get("policy")
        if not isinstance(policy_id, str) or not ID_PATTERN.fullmatch(policy_id):
            raise ValueError(f"bad policy id {policy_id!r}")
        if not isinstance(fetched_at, int | float) or not math.isfinite(fetched_at):
            raise ValueError(f"bad fetch time {fetched_at!r}")
        if not isinstance(text, str):
            raise ValueError("no policy text")
        return cls(domain, policy_id, parse_policy(text), float(fetched_at))


def _ignore(message: str) -> None:
    pass


class PolicyCache:
    """Cached policies by domain: in memory, and in ``directory`` when one is given.

    ``clock()`` gives seconds since the epoch.  ``on_problem(message)`` hears about
    each cache file that was skipped (corrupt, unreadable) or could not be removed."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        clock: Callable[[], float],
        on_problem: Callable[[str], None] = _ignore,
    ) -> None:
        self._directory = Path(directory) if directory is not None else None
        self._clock = clock
        self._on_problem = on_problem
        self._entries: dict[str, CachedPolicy] = {}
        if self._directory is not None:
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._load(self._directory)

    def __len__(self) -> int:
        return len(self._entries)

    def domains(self) -> list[str]:
        """The domains with an entry (expired ones included until looked up)."""
        return sorted(self._entries)

    def get(self, domain: str) -> CachedPolicy | None:
        """The live entry for ``domain``; an expired one is dropped and None returned."""
        entry = self._entries.get(domain)
        if entry is not None and entry.expired(self._clock()):
            del self._entries[domain]
            return None
        return entry

    def put(self, entry: CachedPolicy) -> None:
        """Keep ``entry`` in memory (``save`` puts it on disk)."""
        self._entries[entry.domain] = entry

    def path_for(self, domain: str) -> Path | None:
        """The file of ``domain``'s entry, None for a memory-only cache."""
        if self._directory is None:
            return None
        if ascii_domain(domain) != domain:  # never a path from an unchecked name
            raise ValueError(f"{domain!r} is not a normalised domain name")
        return self._directory / (domain + _SUFFIX)

    def save(self, entry: CachedPolicy) -> None:
        """Write ``entry``'s file atomically (blocking; raises OSError)."""
        path = self.path_for(entry.domain)
        if path is None:
            return
        write_atomically(path, entry.to_json())

    def _load(self, directory: Path) -> None:
        now = self._clock()
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") and path.name.endswith(_TMP_SUFFIX):
                self._remove(path)  # left by a write that never finished
                continue
            if not path.name.endswith(_SUFFIX) or path.name == REPORT_STATE_FILE:
                continue
            try:
                entry = self._read(path)
            except (OSError, ValueError, RecursionError) as exc:  # StsError, JSON errors
                self._on_problem(f"ignoring MTA-STS cache file {path}: {exc}")
                continue
            if entry.expired(now):
                self._remove(path)
            else:
                self._entries[entry.domain] = entry

    def _read(self, path: Path) -> CachedPolicy:
        domain = path.name[: -len(_SUFFIX)]
        try:
            if ascii_domain(domain) != domain:
                raise ValueError("file name is not a normalised domain")
        except StsError as exc:
            raise ValueError(str(exc)) from None
        with path.open("rb") as source:
            raw = source.read(MAX_FILE_SIZE + 1)
        if len(raw) > MAX_FILE_SIZE:
            raise ValueError(f"larger than {MAX_FILE_SIZE} octets")
        entry = CachedPolicy.from_json(raw, domain)
        if entry.fetched_at > self._clock():  # the clock went back: do not extend
            entry = CachedPolicy(entry.domain, entry.policy_id, entry.policy, self._clock())
        return entry

    def _remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._on_problem(f"cannot remove MTA-STS cache file {path}: {exc}")


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path``'s content with ``data`` so that a crash leaves the old file or
    the new one, never a torn one: a temporary file beside it (``.<name>.*.tmp``, which
    ``PolicyCache`` removes at start-up when a write never finished), fsync, rename,
    fsync of the directory.  Blocking; raises OSError."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
