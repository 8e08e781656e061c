"""``fedcifar-warm``: a warm parent for the ClientApps of SuperNodes on this machine.

    fedcifar-warm flower-supernode --insecure --superlink HOST:9092 ...   around a plain SuperNode
    fedcifar-warm --dir DIR --exit-with PID [--exit-with PID ...]        what fedcifar-deploy starts

Around a command, it preloads, starts the command with the shim first on its PATH, passes the
signals it gets on to it and exits with its exit code: the warm parent lives exactly as long as
the SuperNode. With --exit-with it serves until every named SuperNode has ended (or SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ...errors import WarmStartError
from .child import ChildStart
from .folder import WarmFolder
from .fork_safety import DEFAULT_PRELOAD
from .parent import start_parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcifar-warm",
        description="Start each ClientApp process of a SuperNode from a warm parent (torch already imported).",
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="folder for the socket and the shim, owner-only (default: a new temporary folder, removed at exit)",
    )
    parser.add_argument(
        "--exit-with",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="serve until these SuperNode processes have all ended (repeatable)",
    )
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help=f"one more module to import in the warm parent, after {' '.join(DEFAULT_PRELOAD)} (repeatable)",
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="the SuperNode command to run, e.g. flower-supernode ..."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedcifar-warm``; in a forked child, Flower's flwr-clientapp instead (never returns)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command and not args.dir:
        parser.error("give the SuperNode command to run (fedcifar-warm flower-supernode ...), or --dir and --exit-with")
    owner = os.getpid()
    temporary = None if args.dir else Path(tempfile.mkdtemp(prefix="fedcifar-warm-"))
    try:
        folder = WarmFolder.prepare(temporary or Path(args.dir))
        preload = list(dict.fromkeys([*DEFAULT_PRELOAD, *args.preload]))  # the app's own modules come on top
        outcome = start_parent(folder, preload, args.exit_with, command)
    except WarmStartError as err:
        parser.exit(2, f"fedcifar-warm: error: {err}\n")
    finally:
        if temporary is not None and os.getpid() == owner:
            shutil.rmtree(temporary, ignore_errors=True)
    if isinstance(outcome, ChildStart):
        outcome.run()  # a forked child: Flower's flwr-clientapp; never returns
    return outcome


if __name__ == "__main__":
    sys.exit(main())
