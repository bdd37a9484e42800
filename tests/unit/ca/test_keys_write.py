"""Keys and token files are written whole and 0600, or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ca import keys


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was truncated first: a token file that could not be written lost every token."""
    path = tmp_path / "tokens.yaml"
    path.write_bytes(b"tokens: [a, b]\n")

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(keys.os, "replace", refuse)
    with pytest.raises(PermissionError):
        keys.write_file(path, b"tokens: [a, b, c]\n")
    assert path.read_bytes() == b"tokens: [a, b]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.yaml"]  # nothing left behind


def test_a_file_written_over_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    keys.write_file(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
