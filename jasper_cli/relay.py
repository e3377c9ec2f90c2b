"""`jasper relay`: run one or more relay nodes of a topology in this process."""

from __future__ import annotations

import argparse
from typing import Any

from jasper_cli.options import PORT, check_static_node, daemon_types, retype


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "relay",
        help="run relay node(s): forward the first copy of each message to children and hedges",
        description=(
            "Relay daemon. Receives on its data port, drops later hedged copies and sends each "
            "first copy to its own children and to its hedge targets."
        ),
    )
    from overlay.daemon import add_common_arguments

    add_common_arguments(p, kind="relay")
    retype(p, daemon_types())
    p.add_argument("--port", type=PORT, default=7000, help="data port (controller mode)")
    p.add_argument(
        "--fast-path",
        choices=("auto", "ebpf", "user"),
        default="auto",
        help="eBPF replication (auto falls back to user space, saying why)",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="run the event loop in SCHED_FIFO (needs CAP_SYS_NICE): forwarding does not "
        "queue behind ordinary processes",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from overlay.daemon import run_relay

    check_static_node(args, "relay")
    return run_relay(args)
