"""`jasper publisher`: publish synthetic order-book updates into the tree."""

from __future__ import annotations

import argparse
from typing import Any

from jasper_cli.options import (
    HOLD_US,
    PORT_OR_ANY,
    RATE,
    STREAM_ID,
    Number,
    check_static_node,
    daemon_types,
    non_negative,
    positive,
    retype,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "publisher",
        help="publish synthetic order-book updates at a rate",
        description=(
            "Publisher (the exchange's side). Stamps session, sequence, send time and "
            "deadline = send time + hold, and sends each message to the root relay."
        ),
    )
    from overlay.daemon import add_common_arguments

    add_common_arguments(p, kind="publisher")
    retype(p, daemon_types())
    p.add_argument("--stream", type=STREAM_ID, default=1, help="stream id (controller mode)")
    p.add_argument(
        "--port",
        type=PORT_OR_ANY,
        default=0,
        help="controller mode: the UDP port the publisher sends from and takes NAKs on, "
        "registered with the controller so receivers can ask for lost messages "
        "(docs/recovery.md; default 0: a free one)",
    )
    p.add_argument(
        "--source",
        type=source_arg,
        default="synthetic",
        help="where messages come from: synthetic (order-book updates at --rate), "
        "udp:HOST:PORT or unix:PATH (the matching engine sends datagrams of one or more "
        "messages, each a u16 length and the bytes; see docs/wire-format.md)",
    )
    p.add_argument("--rate", type=RATE, default=100.0, help="messages per second (synthetic)")
    p.add_argument(
        "--duration", type=positive("s"), default=None, help="seconds (default: until stopped)"
    )
    p.add_argument("--hold-us", type=HOLD_US, default=None, help="hold in µs (default: topology's)")
    p.add_argument(
        "--batch-us",
        type=window_us_arg,
        default=0.0,
        help="pack the messages due within this window into shared datagrams, up to the MTU "
        "(µs; default 0: one message per datagram)",
    )
    p.add_argument(
        "--start-at", type=non_negative("s"), default=None, help="start at this Unix time (seconds)"
    )
    p.add_argument(
        "--session-wait-s",
        type=non_negative("s"),
        default=10.0,
        help="under --controller: wait up to this long for every node to run the config that "
        "announces this publisher's session before sending (default 10; a thousand-node "
        "tree on a small machine takes longer)",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="run in SCHED_FIFO (needs CAP_SYS_NICE): sends are not delayed by other processes",
    )
    p.set_defaults(func=run)


def source_arg(text: str) -> str:
    from overlay.publisher import parse_source

    try:
        parse_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


window_us_arg = Number(float, low=0, high=1_000_000, unit="µs")


def run(args: argparse.Namespace) -> int:
    from overlay.daemon import run_publisher

    check_static_node(args, "publisher")
    return run_publisher(args)
