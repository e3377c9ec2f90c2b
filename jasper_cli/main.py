"""Entry point of the `jasper` command: builds the parser from the subcommand modules."""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from jasper_cli.options import UsageError, check_paths

# Each module defines `add_parser(subparsers)`, which registers one subcommand and sets
# `func` to a callable taking the parsed args and returning an exit code. Modules import their
# heavy dependencies inside `run`, so `jasper --help` and the data-plane daemons stay small.
COMMAND_MODULES = (
    "demo",
    "simulate",
    "publisher",
    "relay",
    "receiver",
    "controller",
    "agent",
    "ebpf",
    "clock",
    "audit",
    "emulate",
    "gen_header",
)


# Errors of the user's environment rather than of our code: a path that is missing, not
# writable or full, a port in use. Any other exception is a bug and keeps its traceback.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.EADDRINUSE,
        errno.EADDRNOTAVAIL,
    }
)


class JasperParser(argparse.ArgumentParser):
    """argparse with one-line errors: `jasper demo: error: --rate must be > 0 (got -1)`.

    The usage block argparse prints first is left out (`--help` shows it), and "argument X:
    must ..." reads "X must ...". Subcommand parsers inherit this class.
    """

    def error(self, message: str) -> NoReturn:
        prefix = "argument "
        if message.startswith(prefix) and ": must " in message:
            name, _, rest = message[len(prefix) :].partition(": ")
            message = f"{name} {rest}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = JasperParser(
        prog="jasper",
        description=(
            "Jasper: fair multicast for financial exchanges in a public cloud. A tree of relays "
            "copies market data to every market participant, and every receiver holds each "
            "message until one release time stamped by the root."
        ),
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        qualified = f"jasper_cli.{name}"
        if importlib.util.find_spec(qualified) is None:
            continue
        importlib.import_module(qualified).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(int(args.verbose) + 1, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    check_paths(parser, args)
    prog = f"jasper {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS or args.verbose >= 2:
            raise
        where = " ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        print(
            f"{prog}: error: {exc.strerror or exc}{': ' + where if where else ''} "
            "(jasper -vv shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
