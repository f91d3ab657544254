"""`scripts/bench`: the round-trip benchmark (bench/roundtrips.py), then the pacing benchmark
(bench/pacing.py). `--only roundtrips` or `--only pacing` runs one; every other option goes to
the pacing benchmark (`scripts/bench --only pacing --help` lists them)."""

from __future__ import annotations

import argparse
import sys

from . import pacing, roundtrips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--only", choices=("roundtrips", "pacing"))
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
        return pacing.main(rest) if known.only == "pacing" else 0
    status = 0
    if known.only in (None, "roundtrips"):
        status |= roundtrips.main([])
    if known.only in (None, "pacing"):
        status |= pacing.main(rest)
    return status


if __name__ == "__main__":
    sys.exit(main())
