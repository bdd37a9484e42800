"""Keys and token files are written 0600, in place (symlinks, bind mounts, the owner kept), and a
failed write does not empty the old file."""

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

    def refuse(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keys.os, "write", refuse)
    with pytest.raises(OSError, match="No space"):
        keys.write_file(path, b"tokens: [a, b, c]\n")
    assert path.read_bytes() == b"tokens: [a, b]\n"


def test_a_file_written_over_is_0600_shorter_content_cut_owner_and_symlink_kept(tmp_path: Path) -> None:
    real = tmp_path / "real-key.pem"
    real.write_bytes(b"a much longer old content")
    real.chmod(0o644)
    link = tmp_path / "key.pem"
    link.symlink_to(real)
    if os.geteuid() == 0:
        os.chown(real, 65534, 65534)  # another owner: a replacing rename made it root's
    keys.write_file(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o600
    if os.geteuid() == 0:
        assert (os.stat(real).st_uid, os.stat(real).st_gid) == (65534, 65534)
