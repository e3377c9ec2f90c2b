"""`jasper receiver`: host the MP endpoints of one receiver host in this process."""

from __future__ import annotations

import argparse
from typing import Any

from jasper_cli.options import (
    PORT,
    Number,
    PathOption,
    check_static_node,
    count,
    daemon_types,
    output_file,
    retype,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "receiver",
        help="run a receiver host: dedup, hold until the deadline, deliver to MPs",
        description=(
            "Receiver daemon. Hosts many MP endpoints (one UDP port each), keeps the first of "
            "the H+1 copies, holds it until the root's deadline and delivers it."
        ),
    )
    from overlay.daemon import add_common_arguments

    add_common_arguments(p, kind="receiver")
    retype(p, daemon_types())
    p.add_argument(
        "--port-base", type=PORT, default=7100, help="first endpoint port (controller mode)"
    )
    p.add_argument(
        "--endpoints", type=count(1), default=20, help="endpoints hosted (controller mode)"
    )
    p.add_argument(
        "--fast-path",
        choices=("auto", "ebpf", "user"),
        default="auto",
        help="eBPF dedup and source filtering (auto falls back to user space, saying why)",
    )
    p.add_argument(
        "--datapath",
        choices=("auto", "native", "python"),
        default="auto",
        help="receive path: native (a C thread receives, dedups, holds and releases every copy; "
        "Python only applies plans and books records), python (the reference path), or auto "
        "(native where it is built, else python, saying why)",
    )
    p.add_argument(
        "--deliver",
        choices=("topology", "memory", "sink"),
        default="topology",
        help="deliver to each endpoint's target from the topology, in memory only, or (sink) "
        "over loopback UDP into one socket this process never reads: the real send path to an "
        "MP, through the C release threads, without MP processes (emulation, benchmarks)",
    )
    p.add_argument(
        "--spin-us",
        type=Number(int, low=0, high=1_000_000, unit="µs"),
        default=100,
        help="busy-wait this long before each deadline (µs)",
    )
    p.add_argument(
        "--no-realtime",
        action="store_true",
        help="stay SCHED_OTHER (by default the release thread and the event loop ask for "
        "SCHED_FIFO, so a deadline never waits behind ordinary processes)",
    )
    p.add_argument(
        "--no-realtime-loop",
        action="store_true",
        help="keep the event loop SCHED_OTHER but the release threads SCHED_FIFO: many "
        "receiver processes on few cores then do not starve each other's receive loops, while a "
        "deadline still preempts ordinary work (with --deliver sink or socket targets the release "
        "threads are C and never wait for the GIL)",
    )
    p.add_argument(
        "--cpu-wakeup-us",
        type=wakeup_us_arg,
        metavar="US",
        help="while running, ask the kernel (PM QoS, /dev/cpu_dma_latency) that idle CPUs wake "
        "within US µs; 0 keeps idle vCPUs polling instead of halting, so a deadline's timer is "
        "not delayed by the hypervisor, at the price of idle CPUs burning their host CPU "
        "(default: not asked)",
    )
    p.add_argument(
        "--release-threads",
        type=release_threads_arg,
        default=1,
        metavar="N",
        help="C release threads, each pinned to its own CPU and sending its share of the "
        "endpoints (endpoint i on thread i mod N), so one deadline's batch goes out N at a time "
        "(default 1; more than the CPUs this process may use is refused)",
    )
    p.add_argument(
        "--audit-log",
        type=AUDIT_LOG,
        metavar="PATH",
        help="append one record per release (stream, seq, endpoint, deadline, release time, "
        "clock bound) to PATH; {node} in PATH becomes the node name (read with `jasper audit`)",
    )
    p.set_defaults(func=run)


wakeup_us_arg = Number(int, low=0, unit="µs")
AUDIT_LOG = PathOption(output_file.check_path, "file", template="{node}", as_text=True)
"""A file to append to, where "{node}" stands for the node name."""


def release_threads_arg(text: str) -> int:
    import os

    # The upper bound is the CPUs this process may run on.
    return int(Number(int, low=1, high=len(os.sched_getaffinity(0)))(text))


def run(args: argparse.Namespace) -> int:
    from overlay.daemon import run_receiver

    check_static_node(args, "receiver")
    return run_receiver(args)
