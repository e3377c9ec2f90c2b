"""An MP application on the Jasper feed: subscribe, print messages, gaps and late ones, unsubscribe.

Against a running controller (the MP's token from `POST /v1/mps`, the endpoint it was given):

    python examples/mp_client.py --controller http://127.0.0.1:8080 --token-file mp.token \\
        --stream 1 --endpoint 127.0.0.1:40000 --count 100

Self-contained on loopback (starts a controller, a relay, a receiver and a publisher first):

    python examples/mp_client.py --loopback --count 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from jasper_client import Gap, Late, Malformed, Message, MpClient


def run_client(args: argparse.Namespace, controller: str, token: str, endpoint: tuple[str, int]):
    """Read `args.count` messages (or until `args.seconds` pass) and print a line per event."""
    seen = 0
    end = time.monotonic() + args.seconds
    with MpClient(controller, token, stream_id=args.stream, endpoint=endpoint,
                  deliver=args.deliver, ca_file=args.ca_file) as client:  # fmt: skip
        sub = client.subscription or {}
        print(f"subscribed: id {sub.get('id')}, deliver {client.feed.target}")
        while seen < args.count and time.monotonic() < end:
            for event in client.receive(timeout_s=1.0):
                if isinstance(event, Message):
                    seen += 1
                    lag_us = (event.release_ns - event.deadline_ns) / 1e3
                    print(f"stream {event.stream_id} seq {event.seq} flags {event.flags:#04x} "
                          f"release-deadline {lag_us:+.1f} us: {event.payload[:32]!r}")  # fmt: skip
                elif isinstance(event, Gap):
                    missing = "?" if event.missing is None else event.missing
                    print(f"GAP before seq {event.seq} of stream {event.stream_id}: "
                          f"{missing} missing; rebuild state from a snapshot")  # fmt: skip
                elif isinstance(event, Late):
                    late_us = event.late_by_ns / 1e3
                    print(f"LATE seq {event.seq}: {late_us:.1f} us past its deadline")
                elif isinstance(event, Malformed):
                    print(f"dropped a datagram that is not MP framing: {event.reason}")
    print(f"{seen} messages, {client.feed.gaps} gaps, {client.feed.late} late; unsubscribed")
    return 0 if seen else 1


def loopback(args: argparse.Namespace) -> int:
    """A controller, relay, receiver and publisher on 127.0.0.1, then the client."""
    from controller.loopback import DaemonSet, LoopbackController, free_udp_block

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jasper-mp-")))
        ctl = LoopbackController(db_path=work / "controller.db")
        ctl.start()
        stack.callback(ctl.close)
        daemons = DaemonSet(ctl, work)
        stack.callback(daemons.stop)
        ctl.create_stream(args.stream, "md", depth=1, fanout=3, hold_ns=5_000_000)
        daemons.start("relay", "relay0", "--port", str(free_udp_block(1)), "--fast-path", "user")
        base = free_udp_block(1)
        daemons.start("receiver", "rx0", "--port-base", str(base), "--endpoints", "1",
                      "--fast-path", "user", "--no-realtime")  # fmt: skip
        daemons.start("publisher", "pub", "--stream", str(args.stream), "--rate", str(args.rate))
        ctl.wait_nodes({"relay0", "rx0", "pub"}, 60)
        _, token = ctl.create_mp("example-mp")
        return run_client(args, ctl.url, token, ("127.0.0.1", base))
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--controller", help="controller URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--token-file", type=Path, help="file holding the MP's token")
    p.add_argument("--stream", type=int, default=1, help="stream id (default 1)")
    p.add_argument("--endpoint", help="the MP's receiver endpoint, ADDR:PORT")
    p.add_argument("--deliver", help="udp:ADDR:PORT or unix:/path (default: a free UDP port)")
    p.add_argument("--ca-file", help="CA bundle of an HTTPS controller")
    p.add_argument("--count", type=int, default=100, help="messages to read (default 100)")
    p.add_argument("--seconds", type=float, default=60.0, help="give up after (default 60)")
    p.add_argument("--loopback", action="store_true", help="start a loopback overlay first")
    p.add_argument("--rate", type=float, default=100.0, help="--loopback publisher msg/s")
    args = p.parse_args(argv)
    if args.loopback:
        return loopback(args)
    if not (args.controller and args.token_file and args.endpoint):
        p.error("--controller, --token-file and --endpoint are needed (or --loopback)")
    addr, _, port = args.endpoint.rpartition(":")
    token = args.token_file.read_text().strip()
    return run_client(args, args.controller, token, (addr, int(port)))


if __name__ == "__main__":
    sys.exit(main())
