"""Latency prober: timestamped UDP probes to peers, answered with echoes, summarised per peer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

from jasper.latency import (
    ECHO,
    PROBE,
    LinkSummary,
    LinkWindow,
    ProbeError,
    decode_probe,
    echo_for,
)

log = logging.getLogger(__name__)


class Prober(asyncio.DatagramProtocol):
    """Probes every peer each `interval_s` from one UDP socket and answers peers' probes.

    One-way delay is the peer's receive clock minus our send clock, so it carries the clock
    offset between the two; `clock` should be the node's corrected clock (overlay/clocks.py).
    """

    def __init__(
        self,
        *,
        name: str,
        addr: str,
        port: int,
        interval_s: float = 0.2,
        window: int = 64,
        dead_after_s: float = 3.0,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.name = name
        self.addr = addr
        self.port = port
        self.interval_s = interval_s
        self.window = window
        self.dead_after_ns = int(dead_after_s * 1e9)
        self.clock = clock
        self.peers: dict[str, tuple[str, int]] = {}
        self.links: dict[str, LinkWindow] = {}
        self.malformed: Counter[str] = Counter()
        self.echoes_sent = 0
        self.transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.addr, self.port)
        )
        self.transport = transport
        if self.port == 0:
            self.port = transport.get_extra_info("sockname")[1]
        self._task = asyncio.create_task(self._probe_loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.close()

    def set_peers(self, peers: Iterable[tuple[str, str, int]]) -> None:
        """(name, addr, probe port) of the peers to probe; others are forgotten."""
        self.peers = {name: (a, p) for name, a, p in peers if name != self.name}
        for gone in set(self.links) - set(self.peers):
            del self.links[gone]
        for name in self.peers:
            self.links.setdefault(name, LinkWindow(name, size=self.window))

    async def _probe_loop(self) -> None:
        while True:
            self.probe_all()
            await asyncio.sleep(self.interval_s)

    def probe_all(self) -> None:
        if self.transport is None:
            return
        for name, dst in self.peers.items():
            packet = self.links[name].probe(sender=self.name, now_ns=self.clock())
            self.transport.sendto(packet.encode(), dst)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        now = self.clock()
        try:
            packet = decode_probe(data)
        except ProbeError as exc:
            self.malformed[str(exc)] += 1
            return
        if packet.kind == PROBE:
            if self.transport is not None:
                answer = echo_for(packet, responder=self.name, now_ns=now)
                self.transport.sendto(answer.encode(), addr)
                self.echoes_sent += 1
        elif packet.kind == ECHO:
            link = self.links.get(packet.sender)
            if link is None or not link.echo(packet, now_ns=now):
                self.malformed["unexpected_echo"] += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is down: counted, the probe is just lost.
        self.malformed[type(exc).__name__] += 1

    def summaries(self) -> list[LinkSummary]:
        out = []
        for link in self.links.values():
            s = link.summary()
            if s is not None:
                out.append(s)
        return out

    def dead_peers(self) -> list[str]:
        """Peers that answered nothing for `dead_after_s` while we kept probing."""
        now = self.clock()
        return [n for n, link in self.links.items() if link.silent_for_ns(now) > self.dead_after_ns]


async def probe_once(prober: Prober, wait_s: float) -> list[LinkSummary]:
    """Probe now and return what came back within `wait_s` (for tools and tests)."""
    prober.probe_all()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(wait_s)
    return prober.summaries()
