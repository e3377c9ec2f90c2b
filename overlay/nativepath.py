"""The native data path of a receiver host: a C thread receives, admits, holds and releases every
copy (overlay._datapath); this side applies plans to it and books what it reports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jasper.linkmodel import LinkModel
from jasper.records import RELEASE_DTYPE, Releases, expand_releases
from jasper.recovery import RECOVERY_COUNTER_NAMES
from jasper.topology import StreamRules, Topology, stream_rules
from jasper.wire_spec import MALFORMED_REASONS, REJECT_REASONS
from overlay.recordlog import RecordLog, save_releases

if TYPE_CHECKING:
    from overlay.receiver import Endpoint, Receiver

log = logging.getLogger(__name__)

UNKNOWN_PARENT = 0xFFFFFFFE
"""The pump's parent id of a copy from an address no plan names."""
OTHER_PARENT = 0xFFFFFFFF
"""The core's parent id for parents beyond its per-endpoint table."""
BOOK_INTERVAL_S = 0.02
"""How often records, counters and the clock offset are exchanged with the C thread."""
RECORD_BUFFER_BYTES = 16 << 20
"""The C thread's record buffer: 233k releases, 11 s of 1000 datagrams/s to 20 endpoints, so
a loop stalled for a while loses none."""


def native_available() -> tuple[bool, str]:
    """Whether the native data path can run here, and why not."""
    try:
        from overlay import _datapath  # noqa: F401
    except ImportError as exc:
        return False, f"overlay._datapath is not built ({exc}); run scripts/setup.sh"
    return True, ""


OUT_DISCARD = -2
"""ReceivePump.set_deliver's out_fd for an in-process endpoint without a reader."""


class NativeDatapath:
    """Drives one overlay._datapath.ReceivePump for a Receiver: its endpoints' sockets, parents,
    link model and node clock go in; releases come back as records, in-process deliveries and
    counters, booked on the event loop every BOOK_INTERVAL_S."""

    def __init__(
        self,
        rx: Receiver,
        *,
        ring_size: int,
        hold_capacity: int,
        spin_ns: int,
        realtime: bool,
        clock_offset: Callable[[], int],
    ) -> None:
        from overlay import _datapath
        from overlay.release import REALTIME_PRIORITY

        self.rx = rx
        self.pump = _datapath.ReceivePump(
            endpoints=max(1, len(rx.endpoints)),
            ring_size=ring_size,
            hold_capacity=hold_capacity,
            pending_capacity=hold_capacity,
            spin_ns=spin_ns,
            priority=REALTIME_PRIORITY if realtime else 0,
            record_capacity=RECORD_BUFFER_BYTES,
        )
        self.record_dtype = np.dtype(list(_datapath.RECORD_FIELDS))
        self._clock_offset = clock_offset
        self.parent_names: list[str] = []
        self._parent_ids: dict[str, int] = {}
        self._added = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._final: dict[str, Any] | None = None
        """The counters as the pump closed with them."""
        self.records_booked = 0
        self.delivered_messages = np.zeros(0, dtype=np.int64)
        """Messages handed to each endpoint's MP (from the release records)."""

    # -- plans ----------------------------------------------------------------------------------

    def add_endpoint(self, ep: Endpoint) -> None:
        """Hand a new endpoint's sockets to the C thread (endpoints come in index order)."""
        assert ep.index == self._added, "endpoints are added in index order"
        self.delivered_messages = np.append(self.delivered_messages, 0)
        self.pump.add_endpoint(ep.index, ep.sock.fileno(), ep.out_fd, ep.out_sockaddr)
        self._added += 1
        if ep.out_fd < 0:
            self.set_deliver(ep)

    def set_deliver(self, ep: Endpoint) -> None:
        """Where the C thread hands the endpoint's releases: its socket, the in-process queue
        when someone iterates it (Receiver.messages), or nowhere (stamped and counted): an
        in-process endpoint nobody reads would cost a copy and a Python tuple per release,
        ~100,000 a second at N=1000 in the emulation."""
        out_fd = ep.out_fd if ep.out_fd >= 0 or ep.consumer is not None else OUT_DISCARD
        self.pump.set_deliver(ep.index, out_fd, ep.out_sockaddr)

    def _parent_id(self, name: str) -> int:
        pid = self._parent_ids.get(name)
        if pid is None:
            pid = self._parent_ids[name] = len(self.parent_names)
            self.parent_names.append(name)
        return pid

    def apply_plan(
        self,
        topo: Topology,
        model: LinkModel | None,
        *,
        whole_path: bool | None = None,
        also: Sequence[Topology] = (),
        streams: Mapping[int, StreamRules] | None = None,
    ) -> None:
        """Sender addresses → parent ids, the streams admitted (keys, announced session), and
        the link model, of a (new) plan.

        whole_path: emulate every hop of the plan here (the path model) instead of the last
        hop only; None: when the model says so (emulated_at "receivers"). Faithful only when
        no relay applies the link model itself and every receiver host of the plan emulates
        the whole path too; see docs/link-model.md.

        also: the plans of the host's other streams (their senders are named too); streams:
        what is admitted, when not `topo`'s stream alone (a host serving several streams).
        """
        rows: list[tuple[str, int, int]] = []
        ips: dict[str, set[str]] = {}
        for plan in (topo, *also):
            for name, (ip, port) in plan.addresses().items():
                rows.append((ip, port, self._parent_id(name)))
                ips.setdefault(ip, set()).add(name)
        # The publisher sends from an ephemeral port: known by its address when unambiguous.
        for pub in {p.publisher.name: p.publisher for p in (topo, *also)}.values():
            if not ips.get(pub.addr) or ips[pub.addr] == {pub.name}:
                rows.append((pub.addr, 0, self._parent_id(pub.name)))
            if pub.nak_addr is not None:  # retransmissions come from the publisher's own port
                rows.append((*pub.nak_addr, self._parent_id(pub.name)))
        self.pump.set_parents(rows)
        # What the core admits, as the Python path's stream_rules: a key rotation is a new plan
        # with two keys; a stream the plan no longer names is refused from now on.
        admitted = stream_rules(topo) if streams is None else streams
        self.pump.set_streams([(sid, keys, session) for sid, (keys, session) in admitted.items()])
        self._set_recovery((topo, *also))
        if model is None:
            self.pump.set_link_model(None)
            self.pump.set_path_model(None)
            return
        factors: dict[tuple[int, int], float] = {}
        if model.lemon_factor != 1.0 and (model.lemons or model.lemon_fraction > 0):
            for ep in self.rx.endpoints:
                ep_lemon = model.is_lemon(ep.name)
                for name, pid in self._parent_ids.items():
                    if ep_lemon or model.is_lemon(name):
                        factors[(pid, ep.index)] = model.lemon_factor
        self.pump.set_link_model(
            median_ns=model.median_ns,
            p99_ns=model.p99_ns,
            spike_prob=model.spike_prob,
            spike_min_ns=model.spike_min_ns,
            spike_max_ns=model.spike_max_ns,
            loss=model.loss,
            seed=model.seed,
            factors=factors,
        )
        if whole_path is None:
            whole_path = model.emulated_at == "receivers"
        if whole_path:
            graph = path_graph(topo, model, self._parent_id, self.rx.endpoints)
            self.pump.set_path_model(**graph)
        else:
            self.pump.set_path_model(None)

    def _set_recovery(self, plans: Sequence[Topology]) -> None:
        """The core's NAK schedule and where each stream's NAKs go (docs/recovery.md): on while
        a plan names its publisher's port, off (open ranges forgotten) when none does."""
        dests = [
            (plan.stream.id, addr[0], addr[1])
            for plan in plans
            if (addr := plan.publisher.nak_addr) is not None
        ]
        # The receiver's schedule (a jitter seed of the host's own unless it was given one).
        self.pump.set_recovery(self.rx._recovery if dests else None, dests)

    # -- running --------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.pump.set_clock_offset(self._clock_offset())
        self.pump.start()
        loop.add_reader(self.pump.notify_fd, self._on_notify)
        self._tick = loop.call_later(BOOK_INTERVAL_S, self._on_tick)

    def _on_tick(self) -> None:
        self.pump.set_clock_offset(self._clock_offset())
        self.book()
        if self._loop is not None and not self._loop.is_closed():
            self._tick = self._loop.call_later(BOOK_INTERVAL_S, self._on_tick)

    def _on_notify(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.pump.notify_fd)
        self._take_deliveries()

    def stop(self, timeout_s: float) -> None:
        """Stop receiving; held messages are released on time (up to `timeout_s`); book all."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.pump.notify_fd)
        self.pump.stop(drain=True, timeout_s=timeout_s)
        self.book()

    def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._final is None:
            # Status stays readable after close (the daemons write it last).
            self._final = self._counters()
            self.pump.close()

    def _counters(self) -> dict[str, Any]:
        if self._final is not None:
            return self._final
        c: dict[str, Any] = self.pump.counters()
        c["held"], c["pending"] = self.pump.held, self.pump.pending
        return c

    @property
    def held(self) -> int:
        return int(self._counters()["held"])

    # -- booking --------------------------------------------------------------------------------

    def book(self) -> None:
        """Records, in-process deliveries and OWD samples of everything released so far."""
        self._take_deliveries()
        raw = self.pump.take_records()
        if not raw:
            return
        recs = np.frombuffer(raw, dtype=self.record_dtype).copy()
        self.records_booked += len(recs)
        ok = recs["ok"] != 0
        self.delivered_messages += np.bincount(
            recs["endpoint"][ok], weights=recs["count"][ok], minlength=len(self.delivered_messages)
        ).astype(np.int64)[: len(self.delivered_messages)]
        rx = self.rx
        # Arrivals are on the node clock in the pump; records keep the kernel's.
        recs["arrival_ns"] -= self._clock_offset()
        if rx.owd is not None:
            now = rx.clock()
            for r in recs[recs["kind"] != 2].tolist():  # unstamped: no delay to learn from
                rx.owd.record(
                    endpoint=r[0],
                    stream_id=r[2],
                    send_ns=r[_SEND],
                    arrival_ns=r[_ARRIVAL],
                    deadline_ns=r[_DEADLINE],
                    now_ns=now,
                )
        if rx.auditor is not None:
            for r in recs.tolist():
                rx.auditor.on_release(
                    endpoint=r[0],
                    stream_id=r[2],
                    seq=r[4],
                    deadline_ns=r[_DEADLINE],
                    release_true_ns=r[_HANDED],
                    late=r[6] == 1,
                )
        log_ = rx.records
        if isinstance(log_, ReleaseLog):
            log_.add(recs, synced=rx.synced())
        else:  # a per-message log handed to the receiver
            assert isinstance(log_, RecordLog)
            log_.extend(self.delivery_rows(recs, synced=rx.synced()))

    def delivery_rows(self, recs: np.ndarray, *, synced: bool) -> np.ndarray:
        """One DELIVERY_DTYPE row per message of every released datagram that reached its MP."""
        return delivery_rows(
            recs, [ep.name for ep in self.rx.endpoints], self.parent_names, synced=synced
        )

    def _take_deliveries(self) -> None:
        from overlay.receiver import Delivery

        eps = self.rx.endpoints
        loop = self._loop
        for (
            endpoint,
            stream,
            session,
            seq,
            _count,
            kind,
            deadline,
            stamp,
            payload,
            mp_flags,
        ) in self.pump.take_deliveries():
            ep = eps[endpoint]
            if ep.consumer is None:
                continue
            if len(ep.queue) >= ep.queue_len:
                ep.counters.deliver_dropped["queue_full"] += 1
                continue
            ep.queue.append(
                Delivery(
                    endpoint=ep.name,
                    stream_id=stream,
                    session=session,
                    seq=seq,
                    deadline_ns=deadline,
                    release_ns=stamp,
                    late=kind == 1,
                    payload=payload,
                    flags=mp_flags,
                )
            )
            if loop is not None:
                ep.consumer.set()

    # -- status ---------------------------------------------------------------------------------

    def endpoint_status(self) -> dict[str, dict[str, Any]]:
        """Per endpoint, the same keys as the Python path's EndpointCounters.to_dict()."""
        c = self._counters()
        out: dict[str, dict[str, Any]] = {}
        for ep in self.rx.endpoints:
            e = c["endpoints"][ep.index]
            malformed = {r: e[f"malformed_{r}"] for r in MALFORMED_REASONS if e[f"malformed_{r}"]}
            rejected = {r: e[f"rejected_{r}"] for r in REJECT_REASONS if e[f"rejected_{r}"]}
            copies_from: dict[str, int] = {}
            kept_from: dict[str, int] = {}
            for pid, (copies, kept) in e["parents"].items():
                name = self._parent_name(pid)
                copies_from[name] = copies_from.get(name, 0) + copies
                kept_from[name] = kept_from.get(name, 0) + kept
            errors = dict(e["deliver_errors"])
            errors.update(ep.counters.deliver_dropped)
            out[ep.name] = {
                "received": e["received"],
                "malformed": malformed,
                "rejected": rejected,
                "accepted": e["accepted"],
                "duplicates": e["duplicates"],
                "stale": e["stale"],
                "heartbeats": e["heartbeats"],
                "copies_from": copies_from,
                "kept_from": kept_from,
                "kernel_drops": e["kernel_drops"],
                "delivered": int(self.delivered_messages[ep.index]),
                "late": e["late"],
                "hold_overflow": e["hold_overflow"],
                "pending_overflow": e["pending_overflow"],
                "gaps": e["gaps"],
                "gap_messages": e["gap_messages"],
                **{name: e[name] for name in RECOVERY_COUNTER_NAMES},
                "deliver_dropped": errors,
                "malformed_total": sum(malformed.values()),
                "distinct_parents": len(copies_from),
            }
        return out

    def _parent_name(self, pid: int) -> str:
        if pid < len(self.parent_names):
            return self.parent_names[pid]
        return "unknown" if pid == UNKNOWN_PARENT else "other"

    def status(self) -> dict[str, Any]:
        """The C thread's own figures (totals)."""
        totals = {k: v for k, v in self._counters().items() if k != "endpoints"}
        totals["records_booked"] = self.records_booked
        totals["booked_at_ns"] = time.time_ns()
        return totals


class ReleaseLog:
    """The native path's release records, one per (datagram, endpoint), kept as they came.

    Saved compact (`compact`, `save`: RELEASE_DTYPE, releases-{node}.npz); expanded to one
    DELIVERY_DTYPE row per message only when read (`array`): at market rates a batch of B
    messages to E endpoints is B·E rows, too many to build while running or to write.
    """

    def __init__(self, path: NativeDatapath) -> None:
        self._path = path
        self._chunks: list[tuple[np.ndarray, bool]] = []
        self._messages = 0

    def add(self, recs: np.ndarray, *, synced: bool) -> None:
        ok = recs[recs["ok"] != 0]
        self._chunks.append((ok, synced))
        self._messages += int(ok["count"].sum())

    def __len__(self) -> int:
        """Rows the log stands for: messages delivered, per endpoint."""
        return self._messages

    def releases(self) -> np.ndarray:
        """The raw release records (the pump's record dtype), in release order."""
        if not self._chunks:
            return np.zeros(0, dtype=self._path.record_dtype)
        return np.concatenate([c for c, _ in self._chunks])

    def compact(self) -> Releases:
        """The records as RELEASE_DTYPE rows with the endpoint and parent name tables."""
        parts = [release_rows(c, synced=s) for c, s in self._chunks]
        recs = np.concatenate(parts) if parts else np.zeros(0, dtype=RELEASE_DTYPE)
        names = tuple(ep.name for ep in self._path.rx.endpoints)
        return Releases(recs, names, tuple(self._path.parent_names))

    def array(self) -> np.ndarray:
        return expand_releases(self.compact())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write releases-{node}.npz (overlay.recordlog.save_releases) atomically."""
        return save_releases(path, self.compact())


def release_rows(recs: np.ndarray, *, synced: bool) -> np.ndarray:
    """One RELEASE_DTYPE row per released datagram (pump record) that reached its MP."""
    recs = recs[recs["ok"] != 0]
    rows = np.zeros(len(recs), dtype=RELEASE_DTYPE)
    for name in ("endpoint", "parent", "stream_id", "session", "seq", "count"):
        rows[name] = recs[name]
    rows["arrival_ns"] = recs["arrival_ns"]
    rows["release_ns"] = recs["handed_ns"]
    rows["deadline_ns"] = recs["deadline_ns"]
    rows["synced"] = synced
    return rows


def node_key(name: str) -> int:
    """A node's 64-bit key for the path model's per-link hash: the same on every host."""
    return int.from_bytes(hashlib.sha256(f"node:{name}".encode()).digest()[:8], "big")


def path_graph(
    topo: Topology,
    model: LinkModel,
    parent_id: Callable[[str], int],
    endpoints: Sequence[Endpoint],
) -> dict[str, Any]:
    """ReceivePump.set_path_model's keywords for a plan: the publisher and every relay as
    (parent id, key, lemon factor), every sender -> relay link (own parent and hedges), and
    this host's endpoints (docs/link-model.md, "The fast path and the link model")."""
    relays = {r.name for r in topo.relays}

    def factor(name: str) -> float:
        return model.lemon_factor if model.is_lemon(name) else 1.0

    senders = [(topo.publisher.name, topo.publisher.targets)]
    senders += [(r.name, r.targets) for r in topo.relays]
    return {
        "publisher": parent_id(topo.publisher.name),
        "nodes": [(parent_id(name), node_key(name), factor(name)) for name, _ in senders],
        "edges": [
            (parent_id(name), parent_id(t.node))
            for name, targets in senders
            for t in targets
            if t.node in relays
        ],
        "endpoints": [(ep.index, node_key(ep.name), factor(ep.name)) for ep in endpoints],
    }


def delivery_rows(
    recs: np.ndarray, endpoints: list[str], parents: list[str], *, synced: bool
) -> np.ndarray:
    """One DELIVERY_DTYPE row per message of each released datagram that reached its MP."""
    rel = Releases(release_rows(recs, synced=synced), tuple(endpoints), tuple(parents))
    return expand_releases(rel)


# Positions in a record tuple (RECORD_DTYPE order: endpoint, parent, stream_id, session, seq,
# count, kind, ok, err, deadline_ns, send_ns, arrival_ns, release_ns, handed_ns).
_DEADLINE, _SEND, _ARRIVAL, _RELEASE, _HANDED = 9, 10, 11, 12, 13
