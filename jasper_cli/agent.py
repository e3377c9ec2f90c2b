"""`jasper agent`: a standalone node agent (register, heartbeat, probe, fetch the plan)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from jasper_cli.options import (
    PORT,
    PORT_OR_ANY,
    STREAM_ID,
    count,
    http_url,
    ip_address,
    output_file,
    positive,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run a standalone node agent (for a host that only probes and registers)",
        description=(
            "Register this host with the controller, send heartbeats with latency probe "
            "summaries and long-poll the plan. Relay, receiver and publisher daemons run the "
            "same agent in-process when started with --controller; this command is for a "
            "host that only probes, or that runs a daemon from a topology file it writes."
        ),
    )
    p.add_argument(
        "--controller", required=True, type=http_url, metavar="URL", help="http://HOST:PORT"
    )
    p.add_argument("--role", required=True, choices=["relay", "receiver", "publisher"])
    p.add_argument("--node-name", required=True, metavar="NAME")
    p.add_argument("--data-addr", type=ip_address, default="127.0.0.1", metavar="IP")
    p.add_argument("--port", type=PORT, default=None, help="data port / first endpoint port")
    p.add_argument("--capacity", type=count(1), default=1, help="receiver: endpoint ports")
    p.add_argument("--stream", type=STREAM_ID, default=None, help="stream to follow (publisher)")
    p.add_argument(
        "--probe-port", type=PORT_OR_ANY, default=None, help="UDP port for latency probes"
    )
    p.add_argument(
        "--write-topology",
        type=output_file,
        metavar="FILE",
        help="write each new plan for this node to FILE",
    )
    p.add_argument("--heartbeat", type=positive("s"), default=1.0, metavar="S", help="interval")
    from overlay.credential import add_credential_arguments

    add_credential_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jasper.topology import Topology
    from overlay.agent import Agent, node_credential

    default_port = {"relay": 7000, "receiver": 7100, "publisher": 1}[args.role]

    class TopologyFile:
        """Writes every plan to a file, for a daemon started with --topology."""

        def __init__(self, path: str | None) -> None:
            self.path = Path(path) if path else None
            self.applied = 0

        def apply_topology(self, topo: Topology) -> None:
            self.applied += 1
            if self.path is not None:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(topo.to_dict(), indent=1))
                tmp.replace(self.path)

        def status(self) -> dict[str, Any]:
            return {"plans_written": self.applied}

    credential = node_credential(args, args.node_name)

    async def main() -> int:
        agent = Agent(
            controller=args.controller,
            credential=credential,
            ca_file=args.ca_file,
            node_name=args.node_name,
            role=args.role,
            data_addr=args.data_addr,
            port=args.port or default_port,
            capacity=args.capacity,
            stream_id=args.stream,
            probe_port=args.probe_port,
            heartbeat_s=args.heartbeat,
            daemon=TopologyFile(args.write_topology),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)
        return 0

    return asyncio.run(main())
