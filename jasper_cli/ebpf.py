"""`jasper ebpf`: build the fast-path programs, show what is attached, clean up after crashes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ebpf",
        help="eBPF fast path: build, status, cleanup",
        description=(
            "Kernel fast path of relays (TC replication) and receivers (duplicate and source "
            "filtering). `build` compiles the programs into the cache, `status` lists the "
            "pinned nodes with their counters, `cleanup` removes filters and pins that crashed "
            "processes left behind."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser("build", help="compile the programs (cached by source hash)")
    b.add_argument("--force", action="store_true", help="compile even when cached")
    s = actions.add_parser("status", help="pinned nodes, their owners and counters")
    s.add_argument("--json", action="store_true", help="print JSON")
    c = actions.add_parser("cleanup", help="remove what crashed fast-path processes left")
    c.add_argument("--node", help="only this node")
    c.add_argument(
        "--force", action="store_true", help="also nodes whose owning process still runs"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        from ebpf.build import BuildError, build_all

        try:
            for role, path in build_all(force=args.force).items():
                print(f"{role}: {path}")
        except BuildError as e:
            print(f"jasper ebpf: error: {e}", file=sys.stderr)
            return 1
        return 0

    from ebpf import loader

    if args.action == "status":
        ok, why = loader.fast_path_available()
        nodes = loader.status()
        if args.json:
            print(json.dumps({"available": ok, "reason": why, "nodes": nodes}, indent=2))
            return 0
        print(f"fast path: {'available' if ok else 'unavailable: ' + why}")
        if not nodes:
            print("no nodes pinned")
        for n in nodes:
            owner = "alive" if n.get("owner_alive") else "gone"
            print(
                f"{n['node']}: {n.get('role', '?')} on {n.get('ifname', '?')} "
                f"({n.get('hook', '?')}), pid {n.get('pid', '?')} {owner}"
            )
            for k, v in n.get("counters", {}).items():
                print(f"    {k:14} {v}")
        return 0

    removed = loader.cleanup(args.node, force=args.force)
    for r in removed:
        print(f"removed {r}")
    if not removed:
        print("nothing to clean up")
    return 0
