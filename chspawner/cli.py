"""The ``chspawner`` command.

``chspawner run`` is the hot path: it goes straight to the stdlib launcher
without importing argparse or anything else. Every other subcommand is
parsed with argparse, which is only imported for them.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "run":
        from chspawner.runtime import launcher
        return launcher.main(argv[1:])
    return _main(argv)


def _main(argv: list[str]) -> int:
    import argparse

    from chspawner import __version__

    parser = argparse.ArgumentParser(
        prog="chspawner",
        description="Jupyter in your own container images, unprivileged.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "run", add_help=False,
        help="run a command in an image (ch-run's options; "
             "'chspawner run --help' for them)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 64
    return 0  # not reached: "run" is dispatched in main()


if __name__ == "__main__":
    sys.exit(main())
