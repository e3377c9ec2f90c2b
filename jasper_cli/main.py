"""Entry point of the `jasper` command: builds the parser from the subcommand modules."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
