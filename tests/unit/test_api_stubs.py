"""The committed gRPC stubs must be what `make protos` generates from the .proto files."""

from __future__ import annotations

from pathlib import Path

from sidemesh.api import generate


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert produced, "protoc produced nothing"
    stale = [
        str(rel) for rel in produced if (tmp_path / rel).read_bytes() != (generate.ROOT / rel).read_bytes()
    ]
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit the result"
