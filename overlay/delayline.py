"""The link model applied in a node's receive path: copies wait out their sampled link delay."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from jasper.linkmodel import LinkModel, LinkSampler
from jasper.topology import Topology
from overlay.kernel import TimerFd

Process = Callable[[bytes, str, int], None]
"""Handler of one copy: (datagram, sender name, effective arrival time in ns)."""


@dataclass
class DelayCounters:
    """Outcomes of the delay line."""

    delayed: int = 0
    """Copies held for their sampled delay."""
    lost: int = 0
    """Copies dropped by the model's loss."""
    overflow: int = 0
    """Copies dropped because the line was full."""


class SenderNames:
    """Maps a datagram's source address to the topology name of the node that sent it.

    A node serving several streams names senders from all their plans (`more`): the relays
    and endpoints of each, and each stream's publisher.
    """

    def __init__(self, topo: Topology, *more: Topology) -> None:
        self.by_addr: dict[tuple[str, int], str] = {}
        ips: dict[str, set[str]] = {}
        plans = (topo, *more)
        for plan in plans:
            for name, addr in plan.addresses().items():
                self.by_addr.setdefault(addr, name)
                ips.setdefault(addr[0], set()).add(name)
        for plan in plans:
            pub = plan.publisher
            ips.setdefault(pub.addr, set()).add(pub.name)
            if pub.nak_addr is not None:  # its port is known: retransmissions
                self.by_addr[pub.nak_addr] = pub.name
        # The publisher sends from an ephemeral port: name it by its address when unambiguous.
        self.by_ip = {ip: next(iter(names)) for ip, names in ips.items() if len(names) == 1}
        for plan in plans:
            pub = plan.publisher
            if pub.addr in ips and len(ips[pub.addr]) > 1:
                self.by_ip.setdefault(pub.addr, pub.name)

    def __call__(self, src: tuple[str, int]) -> str:
        name = self.by_addr.get(src)
        if name is None:
            name = self.by_ip.get(src[0]) or f"{src[0]}:{src[1]}"
        return name


class DelayLine:
    """One per process: copies from all its nodes, released in order of effective arrival.

    Effective arrival = kernel receive time + the delay sampled for the link the copy came
    over. Copies are handed to their node's handler in that order, so when H+1 copies of a
    message race, the one that would have arrived first on the modelled links is the one the
    node keeps. With no model the line is bypassed (handlers run at once).
    """

    def __init__(
        self,
        model: LinkModel | None,
        *,
        capacity: int = 65536,
        clock: Callable[[], int] = time.time_ns,
        granularity_ns: int = 20_000,
    ) -> None:
        self.model = model
        self.capacity = capacity
        self.granularity_ns = granularity_ns
        """Copies due this close to a wake-up are processed in it (up to this early)."""
        self.counters = DelayCounters()
        self._clock = clock
        self._heap: list[tuple[int, int, Process, bytes, str]] = []
        self._order = itertools.count()
        self._samplers: dict[tuple[str, str], LinkSampler] = {}
        self._timer: TimerFd | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def set_model(self, model: LinkModel | None) -> None:
        """Swap the model (a new topology); copies already held keep their sampled delay."""
        if model != self.model:
            self.model = model
            self._samplers.clear()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = TimerFd()
        loop.add_reader(self._timer.fd, self._on_timer)

    def close(self) -> None:
        if self._timer is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._timer.fd)
            self._timer.close()
            self._timer = None

    def __len__(self) -> int:
        return len(self._heap)

    def admit(self, dst: str, src: str, data: bytes, rx_ns: int, process: Process) -> None:
        """A copy received by node `dst` from `src` at kernel time rx_ns."""
        model = self.model
        if model is None or self._timer is None:
            process(data, src, rx_ns)
            return
        key = (src, dst)
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = self._samplers[key] = model.link(src, dst)
        delay = sampler.sample()
        if delay is None:
            self.counters.lost += 1
            return
        if len(self._heap) >= self.capacity:
            self.counters.overflow += 1
            return
        due = rx_ns + delay
        self.counters.delayed += 1
        heap = self._heap
        heapq.heappush(heap, (due, next(self._order), process, data, src))
        if heap[0][0] == due:
            self._timer.arm(due)

    def _on_timer(self) -> None:
        assert self._timer is not None
        self._timer.consume()
        self.run_due()

    def run_due(self) -> None:
        """Hand every copy whose effective arrival has come to its node; re-arm the timer."""
        heap = self._heap
        # Copies due within the granularity are taken in the same wake-up (in due order,
        # stamped with their own effective arrival): one event-loop turn per copy costs more
        # CPU than the rest of the copy's path.
        horizon = self._clock() + self.granularity_ns
        while heap and heap[0][0] <= horizon:
            due, _, process, data, src = heapq.heappop(heap)
            process(data, src, due)
            if not heap or heap[0][0] > horizon:
                horizon = self._clock() + self.granularity_ns
        if heap and self._timer is not None:
            self._timer.arm(heap[0][0])

    def flush(self) -> None:
        """Process everything still held, regardless of time (at shutdown)."""
        heap = self._heap
        while heap:
            due, _, process, data, src = heapq.heappop(heap)
            process(data, src, due)
