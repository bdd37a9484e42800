"""Read a directory of Kubernetes-style YAML into a snapshot. Broken files become errors.

Files are parsed with libyaml when PyYAML has it (about six times faster), and a :class:`Reader`
parses again only the files that changed since its last read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sidemesh import kubeyaml
from sidemesh.mesh.resources import Snapshot, build_snapshot

SUFFIXES = (".yaml", ".yml", ".json")

Stamp = tuple[int, int]


def _files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*") if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _parse(path: Path) -> tuple[list[tuple[str, Any]], list[str]]:
    try:
        docs = kubeyaml.load_all(path.read_text())  # as kubectl reads it (a safe loader, C or Python)
        return [(f"{path.name}#{i}", doc) for i, doc in enumerate(docs)], []
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
        return [], [f"{path.name}: cannot read: {str(exc).splitlines()[0]}"]


class Reader:
    """Loads a directory, keeping each file's parsed documents until that file changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[Path, tuple[Stamp, list[tuple[str, Any]], list[str]]] = {}

    def load(self) -> Snapshot:
        docs: list[tuple[str, Any]] = []
        errors: list[str] = []
        seen: dict[Path, tuple[Stamp, list[tuple[str, Any]], list[str]]] = {}
        for path in _files(self.directory):
            try:
                st = path.stat()
            except OSError:
                continue  # removed meanwhile
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._cache.get(path)
            if cached is not None and cached[0] == stamp:
                entry = cached
            else:
                docs_now, errors_now = _parse(path)
                if errors_now and cached is not None and cached[1]:
                    # Not YAML any more (half written, or broken): its last good documents stay in
                    # force, as a failed `kubectl apply` leaves the stored object; dropping them would
                    # drop its ServiceAuthorizations, and their workloads would fall back to the default.
                    docs_now = cached[1]
                    errors_now = [f"{e}; its last good contents stay in force" for e in errors_now]
                entry = (stamp, docs_now, errors_now)
            seen[path] = entry
            docs += entry[1]
            errors += entry[2]
        self._cache = seen
        snapshot = build_snapshot(docs)
        return Snapshot(
            snapshot.services,
            snapshot.workloads,
            snapshot.namespaces,
            snapshot.policies,
            tuple(errors) + snapshot.errors,
        )


def load_directory(directory: Path) -> Snapshot:
    return Reader(directory).load()


def stamp(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Changes when any file is added, removed or written."""
    out = []
    for p in sorted(directory.rglob("*")):
        if p.suffix in SUFFIXES and p.is_file():
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)
