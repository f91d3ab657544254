"""Builds the deployable zip: every file in the project that `.funcignore` does not exclude,
which is what Functions Core Tools would publish, so the zip holds the app and nothing else.

`.funcignore` has gitignore semantics (pathspec's GitIgnoreSpec). The zip is deterministic
(sorted entries, fixed timestamps): the same sources give the same bytes. Dependencies are not
included; Flex Consumption installs requirements.txt with a remote build.

    python -m localdev.package [--output dist/offboard-app.zip]
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pathspec

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "dist" / "offboard-app.zip"
# Zip timestamps cannot predate 1980; a fixed one keeps the archive reproducible.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def deployable_files(root: Path) -> list[str]:
    """Paths (relative, with forward slashes) that `.funcignore` lets through, sorted."""
    spec = pathspec.GitIgnoreSpec.from_lines((root / ".funcignore").read_text().splitlines())
    return sorted(_walk(root, spec))


def _walk(root: Path, spec: pathspec.GitIgnoreSpec) -> Iterator[str]:
    for directory, subdirs, files in os.walk(root):
        relative = Path(directory).relative_to(root).as_posix()
        prefix = "" if relative == "." else f"{relative}/"
        # Pruning an ignored directory keeps .venv and node_modules from being walked at all.
        subdirs[:] = [d for d in subdirs if not spec.match_file(f"{prefix}{d}/")]
        for name in files:
            path = f"{prefix}{name}"
            if not spec.match_file(path) and not (root / path).is_symlink():
                yield path


def build(root: Path = ROOT, output: Path = DEFAULT_OUTPUT) -> list[str]:
    files = deployable_files(root)
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            entry = zipfile.ZipInfo(path, date_time=_EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, (root / path).read_bytes())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the deployable zip, honouring .funcignore.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="zip to write")
    args = parser.parse_args(argv)
    files = build(ROOT, args.output.resolve())
    print(f"{args.output}: {len(files)} files", file=sys.stderr)
    for path in files:
        print(f"  {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
