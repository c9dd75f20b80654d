"""Generate the gRPC stubs under ``agent/pb`` from ``proto/``; ``--check`` fails when the
committed stubs are stale. Run: ``python -m agent.protogen [--check]``.

The proto root is mapped onto ``agent/pb`` (``-Iagent/pb=proto``) so the generated
modules import each other as ``agent.pb.callrec.v1.…``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "agent" / "pb"


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` (which stands for the repository root)."""
    from grpc_tools import protoc  # dev dependency; imported only when generating

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-Iagent/pb={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(f"agent/pb/{p.relative_to(PROTO_DIR)}" for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted((out_root / "agent" / "pb").rglob("*.py*"))
    pb_root = out_root / "agent" / "pb"
    for directory in {p.parent for p in generated}:
        while directory != pb_root.parent:
            (directory / "__init__.py").touch()
            directory = directory.parent
    return sorted((out_root / "agent" / "pb").rglob("*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if agent/pb is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        files = generate(fresh_root)
        fresh_pb = fresh_root / "agent" / "pb"
        stale = [
            f.relative_to(fresh_pb)
            for f in files
            if not (OUT_DIR / f.relative_to(fresh_pb)).exists()
            or not filecmp.cmp(f, OUT_DIR / f.relative_to(fresh_pb), shallow=False)
        ]
        if args.check:
            for name in stale:
                sys.stderr.write(f"stale generated stub: agent/pb/{name}\n")
            return 1 if stale else 0
        shutil.rmtree(OUT_DIR, ignore_errors=True)
        shutil.copytree(fresh_pb, OUT_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
