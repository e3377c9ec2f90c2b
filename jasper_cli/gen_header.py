"""`jasper gen-header`: write the eBPF programs' C header from the wire spec."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jasper_cli.options import output_file

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "ebpf" / "include" / "jasper_wire.h"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "gen-header",
        help="write ebpf/include/jasper_wire.h from jasper/wire_spec.py",
        description="Regenerate the C header of the wire format from the Python spec.",
    )
    p.add_argument("--output", type=output_file, default=DEFAULT_PATH, help="file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jasper.wire_spec import c_header

    args.output.write_text(c_header())
    print(f"wrote {args.output}")
    return 0
