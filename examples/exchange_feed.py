"""An exchange's side of Jasper: a stand-in matching engine feeding the publisher's ingress.

The publisher listens on a local socket (`jasper publisher --source udp:HOST:PORT` or
`--source unix:PATH`); the engine hands it messages in the ingress framing: each datagram
holds one or more blocks, a block being a u16 length (network order) and that many bytes of
one market message (at most jasper.wire_spec.MAX_MESSAGE). The publisher stamps session,
sequence number, send time and deadline, signs and sends; messages that arrive in one
datagram leave in one wire datagram, in order, each with its own sequence number.

    python examples/exchange_feed.py --to udp:127.0.0.1:9000 --rate 1000 --seconds 5
    python examples/exchange_feed.py --to unix:/run/jasper/ingress.sock --batch 8

The messages are synthetic order-book updates (overlay.publisher.OrderBook: instrument, side,
price in 1e-4, quantity, level, and the engine's own sequence number at the end).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from jasper.wire import pack_blocks
from jasper.wire_spec import MAX_PAYLOAD
from overlay.publisher import OrderBook, parse_source


def feed(to: str, *, rate: float, seconds: float, batch: int, count: int | None) -> int:
    """Send order-book updates to the publisher's ingress `to` at `rate` messages per second,
    `batch` per datagram, for `seconds` (or `count` messages); returns messages sent."""
    kind, addr = parse_source(to)
    if kind == "synthetic":
        raise ValueError("--to must be udp:HOST:PORT or unix:PATH (the publisher's --source)")
    family = socket.AF_INET if kind == "udp" else socket.AF_UNIX
    book = OrderBook()
    sent = 0
    start = time.monotonic()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        while time.monotonic() - start < seconds and (count is None or sent < count):
            n = batch if count is None else min(batch, count - sent)
            messages = [book.update(sent + 1 + i) for i in range(n)]
            payload = pack_blocks(messages)
            assert len(payload) <= MAX_PAYLOAD, "a batch must fit one wire datagram"
            sock.sendto(payload, addr)
            sent += n
            # Paced on the wall clock: a late loop catches up instead of drifting.
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--to", required=True, help="the publisher's --source: udp:HOST:PORT|unix:PATH")
    ap.add_argument("--rate", type=float, default=1000.0, help="messages per second (default 1000)")
    ap.add_argument("--seconds", type=float, default=5.0, help="how long to send (default 5)")
    ap.add_argument("--count", type=int, default=None, help="stop after this many messages")
    ap.add_argument("--batch", type=int, default=1, help="messages per ingress datagram (1-40)")
    args = ap.parse_args(argv)
    if not args.rate > 0 or not args.seconds > 0:
        ap.error("--rate and --seconds must be > 0")
    if not 1 <= args.batch <= 40:
        ap.error("--batch must be 1..40 (40 updates of 33 bytes fill one wire datagram)")
    if args.count is not None and args.count < 1:
        ap.error("--count must be >= 1")
    try:
        sent = feed(args.to, rate=args.rate, seconds=args.seconds, batch=args.batch,
                    count=args.count)  # fmt: skip
    except ValueError as exc:
        ap.error(str(exc))
    except OSError as exc:
        print(f"exchange_feed: cannot send to {args.to}: {exc}", file=sys.stderr)
        return 1
    print(f"sent {sent} messages to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
