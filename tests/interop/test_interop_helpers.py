"""The interop tests' own helpers, where a mistake would make a test pass or fail for
the wrong reason."""

from __future__ import annotations

from pathlib import Path

from maitred_interop import message_files


def test_message_files_are_in_delivery_order(tmp_path: Path) -> None:
    """Maildir's microseconds are not zero-padded: by name, the second message of this
    second (.M123456) would sort before the first (.M95)."""
    names = ["1795466004.M95P7Q1.mx", "1795466004.M123456P7Q2.mx", "1795466005.M3P7Q3.mx"]
    (tmp_path / "new").mkdir()
    for name in reversed(names):
        (tmp_path / "new" / name).write_bytes(b"")
    assert [p.name for p in message_files(tmp_path)] == names
    assert message_files(tmp_path / "absent") == []
