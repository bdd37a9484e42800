"""Generate the Python stubs for every `.proto` under `sidemesh/api/`.

Usage: ``python -m sidemesh.api.generate [--out DIR]``. With ``--out`` the stubs are written to
another directory (the staleness test compares that output with the committed files).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
ROOT = API_DIR.parent.parent


def proto_files() -> list[Path]:
    return sorted(API_DIR.glob("*.proto"))


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugins into ``out``."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    include = str(resources.files("grpc_tools") / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    plugin_dir = Path(sys.executable).parent
    for proto in proto_files():
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {proto}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
