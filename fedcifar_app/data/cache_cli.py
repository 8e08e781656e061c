"""``fedcifar-cache info|clear``: where decoded datasets live, how big they are, and removal."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ..files import write_problem
from .cache import cache_entries, cache_root


def main(argv: Sequence[str] | None = None) -> int:
    """``fedcifar-cache info|clear``: where decoded datasets live, how big they are, and removal."""
    parser = argparse.ArgumentParser(prog="fedcifar-cache", description=main.__doc__)
    parser.add_argument("action", choices=("info", "clear"))
    args = parser.parse_args(argv)
    root = cache_root()
    try:
        return _info(root) if args.action == "info" else _clear(root)
    except OSError as err:  # an unreadable or read-only cache folder: one line, no traceback
        what, fix = write_problem(err)
        print(f"fedcifar-cache: error: {err.filename or root}: {what}; {fix}", file=sys.stderr)
        return 2


def _info(root: Path) -> int:
    entries = cache_entries(root)
    total = 0
    print(f"cache folder: {root} (set FEDCIFAR_CACHE_DIR to move it)")
    for entry in entries:
        size = sum(f.stat().st_size for f in entry.iterdir())
        total += size
        try:
            meta = json.loads((entry / "meta.json").read_text())
            described = f"{meta['split']:5s}  {meta['rows']:6d} rows  {meta['source']}"
        except (OSError, ValueError, KeyError, TypeError):
            described = "damaged: decoded again on its next use"
        print(f"  {entry.name}  {size / 2**20:8.1f} MiB  {described}")
    print(f"{len(entries)} entries, {total / 2**20:.1f} MiB")
    return 0


def _clear(root: Path) -> int:
    entries = cache_entries(root)
    if root.exists():
        shutil.rmtree(root)
    print(f"removed {root} ({len(entries)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
