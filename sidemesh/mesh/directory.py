"""Read a directory of Kubernetes-style YAML into a snapshot. Broken files become errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sidemesh.mesh.resources import Snapshot, build_snapshot

SUFFIXES = (".yaml", ".yml", ".json")


def read_documents(directory: Path) -> tuple[list[tuple[str, Any]], list[str]]:
    docs: list[tuple[str, Any]] = []
    errors: list[str] = []
    for path in sorted(
        p for p in directory.rglob("*") if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith(".")
    ):
        try:
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
                docs.append((f"{path.name}#{i}", doc))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            errors.append(f"{path.name}: cannot read: {str(exc).splitlines()[0]}")
    return docs, errors


def load_directory(directory: Path) -> Snapshot:
    docs, errors = read_documents(directory)
    snapshot = build_snapshot(docs)
    return Snapshot(
        snapshot.services,
        snapshot.workloads,
        snapshot.namespaces,
        snapshot.policies,
        tuple(errors) + snapshot.errors,
    )


def stamp(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Changes when any file is added, removed or written."""
    out = []
    for p in sorted(directory.rglob("*")):
        if p.suffix in SUFFIXES and p.is_file():
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)
