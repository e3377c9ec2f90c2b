"""Planner service: the placements of every stream, their storage, configs and node liveness."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from controller import store
from controller.errors import Conflict, NotFound, Unprocessable
from controller.hold import HoldControl, StreamHold
from controller.keys import GRACE_HOLDS, PUBLISHED, KeyPhase, RotationInProgress, StreamKeyRing
from controller.metrics import ControllerMetrics
from controller.settings import Settings
from controller.store import Database, NodeRow, StreamRow, SubscriptionRow
from jasper.layout import Layout, Spot, topology_of
from jasper.owd import OwdReport
from jasper.placement import (
    Endpoint,
    LatencyMatrix,
    LinkStats,
    OmlPrediction,
    Placement,
    fresh_shape,
    full_plan,
    hedging_note,
    predict_oml,
    rank_relays,
)
from jasper.topology import StreamConfig
from jasper.wire import StreamKey
from jasper.wire_spec import KEY_LEN

log = logging.getLogger("jasper.controller")

ACTIVE, PENDING = "active", "pending"
# Placeholder publisher name in a plan made before any publisher registered; configs always
# carry the publisher registered at the time they are built.
NO_PUBLISHER = "publisher"


def hash_token(token: str) -> str:
    """MP tokens are 256-bit random strings, so one SHA-256 round is enough to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _hold_key(stream_id: int) -> str:
    """Meta row keeping a stream's hold in force across controller restarts."""
    return f"hold_ns:{stream_id}"


def _session_key(stream_id: int) -> str:
    """Meta row holding the publisher session the control plane announces for a stream."""
    return f"session:{stream_id}"


SESSION_MAX = 2**32 - 1


def endpoint_key(sub_id: int) -> str:
    """Name of a subscription's endpoint in topologies."""
    return f"s{sub_id}"


@dataclass(frozen=True)
class Telemetry:
    """The latest heartbeat of a node, kept in memory between flushes."""

    applied_version: int
    """Config version the node runs."""
    clock: dict[str, Any]
    """Clock status, error bound and offset as the node reported them."""
    status: dict[str, Any]
    """Daemon and agent counters, flattened."""


@dataclass
class StreamPlans:
    """The plans of one stream: the one traffic follows and, during a switch, the next."""

    active: Placement
    pending: Placement | None = None
    pending_version: int = 0
    """Config version at which the pending plan was published to its nodes."""
    pending_since: float = 0.0
    """time.monotonic() when the pending plan was published."""


class Planner:
    """Owns the in-memory placements and keeps them equal to what the database holds.

    Every method that changes state runs inside one database transaction and is called from
    the event loop thread without awaiting in between, so requests never interleave inside it.
    """

    def __init__(
        self,
        *,
        database: Database,
        settings: Settings,
        metrics: ControllerMetrics,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ):
        self.database = database
        self.clock_ns = clock_ns
        """Monotonic clock, ns, for key rotation graces (a hook: tests step it by hand)."""
        self.settings = settings
        self.metrics = metrics
        self.plans: dict[int, StreamPlans] = {}
        self.matrix: dict[tuple[str, str], LinkStats] = {}
        self.last_seen: dict[str, float] = {}
        self.version = 0
        """Config version of every node's answer: moves when a plan, node or link changes."""
        self.hold_version = 0
        """Version of the last hold change. Only a publisher's answer carries the hold in force
        (receivers hold to the deadline it stamps), so only publishers' long polls answer it:
        with an adaptive hold moving every window, waking every node for it would ship each
        the whole plan again (at 1,000 endpoints, 118 plans of ~1,000 endpoints per window)."""
        self._wake: asyncio.Event | None = None
        self._docs: dict[tuple[int, str, int], dict[str, Any]] = {}
        self._predictions: dict[tuple[int, int], OmlPrediction] = {}
        self.dead_reports: dict[str, set[str]] = {}
        self.telemetry: dict[str, Telemetry] = {}
        self.telemetry_dirty: set[str] = set()
        self._dirty_links: dict[tuple[str, str], LinkStats] = {}
        self.link_model: dict[str, Any] | None = settings.link_model
        """Emulation: the link model every topology carries (settings, or set over the API)."""
        self.holds = HoldControl(
            window_s=settings.hold_window_s,
            objective_late_fraction=settings.hold_objective_late_fraction,
        )
        self.keys: dict[int, StreamKeyRing] = {}
        """Stream id -> its MAC keys and rotation phase (docs/security-keys.md)."""
        self.sessions: dict[int, int] = {}
        """Stream id -> the publisher session announced in its documents."""
        self._refused_sessions: set[tuple[int, int]] = set()
        """(stream, session) reports already logged as going backwards."""
        self.session_versions: dict[int, int] = {}
        """Stream id -> the config version that announced its session, while some live node
        of the stream does not run it yet; the publisher sends once this is empty for it."""

    # --- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Rebuild the placements exactly as stored; every node gets a fresh heartbeat grace."""
        db = self.database.conn
        self.version = store.get_meta(db=db, key="config_version")
        subs = {s.id: s for s in store.list_subscriptions(db=db)}
        for stream_id, state, _epoch, doc, leaves in store.load_plans(db=db):
            placement = Placement.from_dict(doc)
            for sub_id, slot in sorted(leaves.items()):
                sub = subs.get(sub_id)
                if sub is not None:
                    placement.attach(Endpoint(endpoint_key(sub_id), sub.host), slot)
            if state == ACTIVE:
                self.plans.setdefault(stream_id, StreamPlans(active=placement)).active = placement
            else:
                plans = self.plans.setdefault(stream_id, StreamPlans(active=placement))
                plans.pending = placement
                plans.pending_version = self.version
                plans.pending_since = time.monotonic()
        for src, dst, owd, jitter, samples in store.list_latency(db=db):
            self.matrix[(src, dst)] = LinkStats(owd, jitter, samples)
        now = time.monotonic()
        for node in store.list_nodes(db=db):
            self.last_seen[node.name] = now
        self._load_keys()

    def _load_keys(self) -> None:
        """Keys and announced sessions as stored; a stream stored before keys existed gets its
        first key now (and nodes a new config carrying it)."""
        db = self.database.conn
        by_stream: dict[int, list[store.StreamKeyRow]] = {}
        for row in store.list_stream_keys(db=db):
            by_stream.setdefault(row.stream_id, []).append(row)
        missing = []
        for stream in store.list_streams(db=db):
            session = store.get_meta(db=db, key=_session_key(stream.id), default=-1)
            if session >= 0:
                self.sessions[stream.id] = session
            rows = by_stream.get(stream.id)
            if not rows:
                missing.append(stream.id)
                continue
            signing = [r.epoch for r in rows if r.signing]
            self.keys[stream.id] = StreamKeyRing.restore(
                stream_id=stream.id,
                keys=tuple(StreamKey(r.epoch, r.secret) for r in rows),
                sign_epoch=signing[0] if signing else rows[-1].epoch,
                version=self.version,
            )
        if missing:
            with self.database.transaction() as tx:
                for stream_id in missing:
                    self._issue_first_key(tx, stream_id)
                self._bump(tx)
            log.info("issued first keys for streams %s", ", ".join(map(str, missing)))

    # --- change notification ----------------------------------------------------------------

    def _bump(self, db: Any) -> None:
        """A change every node's config shows (one counter with `hold_version`)."""
        self.version = max(self.version, self.hold_version) + 1
        store.set_meta(db=db, key="config_version", value=self.version)
        self._docs.clear()
        self._wake_pollers()

    def _bump_hold(self, db: Any) -> None:
        """A change only publishers' configs show: the hold in force."""
        self.hold_version = max(self.version, self.hold_version) + 1
        store.set_meta(db=db, key="config_version", value=self.hold_version)
        self._wake_pollers()

    def _wake_pollers(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def version_for(self, role: str) -> int:
        """The config version a node of `role` is answered with."""
        return max(self.version, self.hold_version) if role == "publisher" else self.version

    async def wait_change(self, seen_version: int, timeout_s: float, *, role: str = "") -> None:
        """Return when the config version of a `role` node differs from `seen_version`, or
        after `timeout_s`.

        A node that is ahead of us saw an earlier incarnation of this controller (its database
        was replaced): it gets the current config at once rather than waiting to catch up.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        while self.version_for(role) == seen_version:
            left = until - loop.time()
            if left <= 0:
                return
            if self._wake is None:
                self._wake = asyncio.Event()
            wake = self._wake
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), left)

    # --- nodes ------------------------------------------------------------------------------

    def register_node(
        self,
        *,
        name: str,
        role: str,
        data_addr: str,
        port: int,
        capacity: int,
        probe_port: int | None,
        session: int | None = None,
    ) -> NodeRow:
        """Register or update a node; a publisher may say which session it sends under."""
        span = capacity if role == "receiver" else 1
        with self.database.transaction() as db:
            for other in store.list_nodes(db=db):
                if other.name == name or other.data_addr != data_addr:
                    continue
                other_span = other.capacity if other.role == "receiver" else 1
                if other.role == "publisher" or role == "publisher":
                    continue
                if port < other.port + other_span and other.port < port + span:
                    raise Conflict(
                        f"ports {port}..{port + span - 1} on {data_addr} overlap node "
                        f"{other.name!r} ({other.port}..{other.port + other_span - 1})",
                        field=("body", "port"),
                    )
            previous = store.get_node(db=db, name=name)
            node = store.upsert_node(
                db=db,
                name=name,
                role=role,
                data_addr=data_addr,
                port=port,
                capacity=capacity,
                probe_port=probe_port,
                now_ns=time.time_ns(),
            )
            self.last_seen[name] = time.monotonic()
            fields = ("role", "data_addr", "port", "capacity", "probe_port", "alive")
            if previous is None or any(getattr(previous, f) != getattr(node, f) for f in fields):
                self._bump(db)
            self._plan_new_streams_if_needed(db, node)
        if role == "publisher" and session is not None:
            self.announce_session(name, session)
        return node

    def _plan_new_streams_if_needed(
        self, db: Any, node: NodeRow, *, reason: str = "relay_joined"
    ) -> None:
        # A stream planned before any relay existed is fed by the publisher directly, and one
        # planned when the first relay joined has that relay alone above its endpoints (one
        # copy each, whatever H): re-plan when the relays alive now give its endpoints more
        # distinct parents. Endpoints attach without a re-plan, so nothing else would.
        if node.role != "relay":
            return
        relays = len(self._usable_relays(db))
        for stream_id, plans in self.plans.items():
            if plans.pending is not None:
                continue
            active = plans.active
            if not active.shape.levels:
                self._replan(db, stream_id, reason=reason)
                continue
            stream = store.get_stream(db=db, stream_id=stream_id)
            if stream is None or stream.hedge == 0:
                continue
            fresh = fresh_shape(
                len(active.where),
                relays,
                fanout=stream.fanout,
                hedge=stream.hedge,
                depth=stream.depth,
            )
            if fresh.parents_per_leaf() > active.parents_min():
                self._replan(db, stream_id, reason=reason)

    def heartbeat(
        self,
        *,
        name: str,
        applied_version: int,
        clock: dict[str, Any],
        status: dict[str, Any],
        latency: list[tuple[str, int, int, int]],
        dead_neighbours: list[str],
        owd_reports: list[OwdReport] | None = None,
    ) -> NodeRow:
        """Take a heartbeat. Telemetry (counters, clock, probes, applied version) is kept in
        memory and written by `flush_telemetry` in one transaction per monitor tick: a
        thousand nodes beating every second must not cost a thousand fsyncs. Liveness changes
        are committed at once."""
        node = store.get_node(db=self.database.conn, name=name, telemetry=False)
        if node is None:
            raise NotFound(f"node {name!r} is not registered")
        self.telemetry[name] = Telemetry(applied_version, clock, status)
        self.telemetry_dirty.add(name)
        for peer, owd, jitter, samples in latency:
            stats = LinkStats(owd, jitter, samples)
            self.matrix[(name, peer)] = stats
            self._dirty_links[(name, peer)] = stats
        self.last_seen[name] = time.monotonic()
        self.dead_reports.pop(name, None)
        for peer in dead_neighbours:
            self.dead_reports.setdefault(peer, set()).add(name)
        if not node.alive:
            log.info("node %s is back", name)
            with self.database.transaction() as db:
                store.set_node_alive(db=db, name=name, alive=True)
                self._bump(db)
                node = replace(node, alive=True)
                # A relay back from the dead is one more relay to plan with, as a new one is.
                self._plan_new_streams_if_needed(db, node, reason="relay_back")
        self.metrics.heartbeats.inc()
        if node.role == "publisher" and "session" in status:
            # A publisher process sends one stream; when its status names it, only that one.
            sid = status.get("stream_id")
            only = int(sid) if isinstance(sid, int | float) and math.isfinite(sid) else None
            self.announce_session(name, status["session"], stream_id=only)
        if owd_reports:
            for r in owd_reports:
                self._hold_of(r.stream_id)
            self.holds.report(name, owd_reports)
            self.check_holds()
        self.check_switches()
        self.check_keys()
        self.check_sessions()
        return self.view(node)

    def view(self, node: NodeRow) -> NodeRow:
        """The stored node with its latest heartbeat telemetry."""
        t = self.telemetry.get(node.name)
        if t is None:
            return node
        return replace(node, applied_version=t.applied_version, clock=t.clock, status=t.status)

    def flush_telemetry(self) -> None:
        """Write heartbeat telemetry received since the last flush, in one transaction."""
        if not self.telemetry_dirty and not self._dirty_links:
            return
        now_ns = time.time_ns()
        telemetry, self.telemetry_dirty = self.telemetry_dirty, set()
        links, self._dirty_links = self._dirty_links, {}
        with self.database.transaction() as db:
            for name in telemetry:
                t = self.telemetry.get(name)
                if t is not None:
                    store.record_heartbeat(
                        db=db,
                        name=name,
                        applied_version=t.applied_version,
                        clock=t.clock,
                        status=t.status,
                    )
            for (src, dst), stats in links.items():
                store.upsert_latency(
                    db=db,
                    src=src,
                    dst=dst,
                    owd_ns=stats.owd_ns,
                    jitter_ns=stats.jitter_ns,
                    samples=stats.samples,
                    now_ns=now_ns,
                )

    def check_liveness(self) -> list[str]:
        """Declare dead the nodes silent for longer than the timeout (or reported dead by two
        neighbours and silent for half of it); re-plan the streams they relay for."""
        now = time.monotonic()
        timeout = self.settings.heartbeat_timeout_s
        died: list[str] = []
        with self.database.transaction() as db:
            for node in store.list_nodes(db=db):
                if not node.alive:
                    continue
                silent = now - self.last_seen.get(node.name, now)
                reported = len(self.dead_reports.get(node.name, ())) >= 2
                if silent > timeout or (reported and silent > timeout / 2):
                    store.set_node_alive(db=db, name=node.name, alive=False)
                    died.append(node.name)
            if died:
                log.warning("nodes declared dead: %s", ", ".join(died))
                self._bump(db)
                for stream_id, plans in list(self.plans.items()):
                    used = set(plans.active.relay_nodes())
                    if plans.pending is not None:
                        used |= set(plans.pending.relay_nodes())
                    if used & set(died):
                        self._replan(db, stream_id, reason="relay_dead")
        return died

    def node_alive(self, name: str) -> bool:
        node = store.get_node(db=self.database.conn, name=name, telemetry=False)
        return node is not None and node.alive

    # --- streams ----------------------------------------------------------------------------

    def create_stream(self, row: StreamRow) -> StreamRow:
        with self.database.transaction() as db:
            if store.get_stream(db=db, stream_id=row.id) is not None:
                raise Conflict(f"stream {row.id} exists", field=("body", "id"))
            store.insert_stream(db=db, row=row, now_ns=time.time_ns())
            store.set_meta(db=db, key=_hold_key(row.id), value=row.hold_ns)
            self._issue_first_key(db, row.id)
            self.plans.pop(row.id, None)
            self._replan(db, row.id, reason="stream_created")
        return row

    def update_stream(self, row: StreamRow) -> StreamRow:
        with self.database.transaction() as db:
            old = store.get_stream(db=db, stream_id=row.id)
            if old is None:
                raise NotFound(f"stream {row.id} not found")
            store.update_stream(db=db, row=row)
            if (old.hold_policy, old.hold_ns) != (row.hold_policy, row.hold_ns):
                # A new setting starts the hold over, after a restart too.
                store.set_meta(db=db, key=_hold_key(row.id), value=row.hold_ns)
            if (old.hedge, old.fanout, old.depth) != (row.hedge, row.fanout, row.depth):
                self._replan(db, row.id, reason="stream_changed")
            else:
                self._bump(db)
        return row

    def delete_stream(self, stream_id: int) -> int:
        """Delete a stream with its subscriptions, plans and keys; the subscriptions deleted.

        Every node's next config no longer lists it: each node that served it stops (its
        agent removes that stream from the daemon), and the node's other streams keep their
        sockets, dedup state and held messages (docs/controller.md, "What a node serves").
        """
        with self.database.transaction() as db:
            if store.get_stream(db=db, stream_id=stream_id) is None:
                raise NotFound(f"stream {stream_id} not found")
            subs = store.delete_stream(
                db=db,
                stream_id=stream_id,
                meta_keys=(_hold_key(stream_id), _session_key(stream_id)),
            )
            self.plans.pop(stream_id, None)
            self.keys.pop(stream_id, None)
            self.sessions.pop(stream_id, None)
            self.session_versions.pop(stream_id, None)
            self.holds.streams.pop(stream_id, None)
            self._bump(db)
        log.info("stream %d deleted with %d subscriptions", stream_id, subs)
        return subs

    def set_link_model(self, doc: dict[str, Any] | None) -> None:
        """Emulation: every node's link model from the next config on (a step change)."""
        from jasper.linkmodel import parse_link_model

        try:
            parse_link_model(doc)
        except ValueError as exc:
            raise Unprocessable(str(exc), field=("body",)) from exc
        self.link_model = doc
        with self.database.transaction() as db:
            self._bump(db)

    # --- release hold ---------------------------------------------------------------------

    def _hold_of(self, stream_id: int) -> StreamHold | None:
        stream = store.get_stream(db=self.database.conn, stream_id=stream_id)
        return None if stream is None else self.hold_of(stream)

    def hold_of(self, stream: StreamRow) -> StreamHold:
        """The stream's hold state (made on first use, resuming the stored hold in force)."""
        resume = None
        if stream.id not in self.holds.streams:
            stored = store.get_meta(db=self.database.conn, key=_hold_key(stream.id), default=-1)
            resume = stored if stored >= 0 else None
        return self.holds.configure(
            stream_id=stream.id,
            policy=stream.hold_policy,
            hold_ns=stream.hold_ns,
            resume_ns=resume,
        )

    def hold_in_force(self, stream: StreamRow) -> int:
        """The hold the publisher stamps with now: the setting, or the adaptive policy's."""
        return self.hold_of(stream).hold_ns

    def _bound_of(self, name: str) -> int:
        t = self.telemetry.get(name)
        bound = t.clock.get("bound_ns") if t is not None else None
        return int(bound) if isinstance(bound, int | float) and bound >= 0 else 0

    def check_holds(self) -> list[int]:
        """Close the delay windows that are complete (every receiver host of the stream
        reported) or old; push a changed hold to the nodes (a new config version)."""
        changed = []
        db = self.database.conn
        for stream_id, plans in list(self.plans.items()):
            hold = self._hold_of(stream_id)
            if hold is None:
                continue
            hosts = set(plans.active.hosts.values())
            if not self.holds.ready(stream_id, hosts):
                continue
            stream = store.get_stream(db=db, stream_id=stream_id)
            pub = self._publisher_of(db, stream) if stream is not None else None
            if self.holds.close_window(
                stream_id,
                root_bound_ns=self._bound_of(pub.name) if pub is not None else 0,
                receiver_bound_ns=max((self._bound_of(h) for h in hosts), default=0),
                now_ns=time.time_ns(),
            ):
                changed.append(stream_id)
        if changed:
            with self.database.transaction() as tx:
                for stream_id in changed:
                    store.set_meta(
                        db=tx, key=_hold_key(stream_id), value=self.holds.streams[stream_id].hold_ns
                    )
                self._bump_hold(tx)
            for stream_id in changed:
                log.info(
                    "stream %d: hold now %d ns", stream_id, self.holds.streams[stream_id].hold_ns
                )
        return changed

    # --- stream keys and publisher sessions (docs/security-keys.md) ------------------------

    def _issue_first_key(self, db: Any, stream_id: int) -> StreamKeyRing:
        key = StreamKey(1, secrets.token_bytes(KEY_LEN))
        store.insert_stream_key(
            db=db,
            stream_id=stream_id,
            epoch=key.epoch,
            secret=key.key,
            signing=True,
            now_ns=time.time_ns(),
        )
        ring = StreamKeyRing(stream_id=stream_id, keys=(key,), sign_epoch=key.epoch)
        self.keys[stream_id] = ring
        return ring

    def key_ring(self, stream_id: int) -> StreamKeyRing:
        ring = self.keys.get(stream_id)
        if ring is None or store.get_stream(db=self.database.conn, stream_id=stream_id) is None:
            raise NotFound(f"stream {stream_id} not found")
        return ring

    def rotate_keys(self, stream_id: int) -> StreamKeyRing:
        """Start a rotation: epoch n+1 goes to every node, the publisher keeps signing with n
        until they all run it (`check_keys` takes it from there)."""
        ring = self.key_ring(stream_id)
        with self.database.transaction() as db:
            try:
                key = ring.rotate(secrets.token_bytes(KEY_LEN))
            except RotationInProgress as exc:
                raise Conflict(str(exc)) from exc
            store.insert_stream_key(
                db=db,
                stream_id=stream_id,
                epoch=key.epoch,
                secret=key.key,
                signing=False,
                now_ns=time.time_ns(),
            )
            self._bump(db)
            ring.phase_version = self.version
        log.info("stream %d: key epoch %d issued (rotation started)", stream_id, key.epoch)
        return ring

    def key_nodes(self, stream_id: int) -> list[NodeRow]:
        """The nodes a rotation waits for: those of the stream's plans and its publisher."""
        plans = self.plans.get(stream_id)
        if plans is None:
            return []
        names = set(plans.active.relay_nodes()) | set(plans.active.hosts.values())
        if plans.pending is not None:
            names |= set(plans.pending.relay_nodes()) | set(plans.pending.hosts.values())
        db = self.database.conn
        stream = store.get_stream(db=db, stream_id=stream_id)
        pub = self._publisher_of(db, stream) if stream is not None else None
        if pub is not None:
            names.add(pub.name)
        return [self.view(n) for n in store.list_nodes(db=db) if n.name in names]

    def key_waiting_for(self, stream_id: int) -> list[str]:
        """Live nodes of the stream that do not run the rotation phase's config yet."""
        ring = self.keys.get(stream_id)
        if ring is None or ring.phase in (KeyPhase.STEADY, KeyPhase.RETIRING):
            return []
        return [
            n.name
            for n in self.key_nodes(stream_id)
            if n.alive and n.applied_version < ring.phase_version
        ]

    def key_grace_ns(self, stream_id: int) -> int:
        stream = store.get_stream(db=self.database.conn, stream_id=stream_id)
        if stream is None:
            return 0
        return GRACE_HOLDS * max(stream.hold_ns, self.hold_in_force(stream))

    def check_keys(self) -> list[tuple[int, KeyPhase]]:
        """Make-before-break for keys: move each rotating stream on once every live node of
        it runs the phase's config (and, to drop the old key, the grace passed). Nodes that
        never apply hold the rotation where it is; `GET /v1/streams/{id}/keys` names them."""
        now = self.clock_ns()
        moved = []
        for stream_id, ring in list(self.keys.items()):
            if ring.phase is KeyPhase.STEADY:
                continue
            applied = ring.phase is not KeyPhase.RETIRING and not self.key_waiting_for(stream_id)
            old, new = ring.oldest.epoch, ring.newest.epoch
            to = ring.step(applied=applied, now_ns=now, grace_ns=self.key_grace_ns(stream_id))
            if to is None:
                continue
            moved.append((stream_id, to))
            if to not in PUBLISHED:
                log.info("stream %d: every node signs with key epoch %d", stream_id, new)
                continue
            with self.database.transaction() as db:
                if to is KeyPhase.SIGNING:
                    store.set_signing_epoch(db=db, stream_id=stream_id, epoch=new)
                elif to is KeyPhase.STEADY:
                    store.delete_stream_key(db=db, stream_id=stream_id, epoch=old)
                self._bump(db)
                ring.phase_version = self.version
            if to is KeyPhase.SIGNING:
                log.info("stream %d: the publisher signs with key epoch %d", stream_id, new)
            else:
                log.info("stream %d: key epoch %d dropped (rotation done)", stream_id, old)
        return moved

    def announce_session(
        self, name: str, session: object, *, stream_id: int | None = None
    ) -> list[int]:
        """The publisher node `name` runs publisher session `session`: announce it in the
        documents of the streams it publishes (of `stream_id` only, when given). Receivers
        and relays take no other session, so only the stream's publisher may move it, and
        never backwards. The streams whose announced session changed."""
        if (
            isinstance(session, bool)
            or not isinstance(session, int | float)
            or not math.isfinite(session)
            or session != int(session)
            or not 0 <= session <= SESSION_MAX
        ):
            log.warning("node %s reported session %r: not a u32; ignored", name, session)
            return []
        value = int(session)
        changed: list[int] = []
        db = self.database.conn
        for stream in store.list_streams(db=db):
            if stream_id is not None and stream.id != stream_id:
                continue
            if self.sessions.get(stream.id) == value:
                continue
            pub = self._publisher_of(db, stream)
            if pub is None or pub.name != name or pub.role != "publisher":
                continue
            current = self.sessions.get(stream.id)
            if current is not None and value < current:
                if (stream.id, value) not in self._refused_sessions:
                    self._refused_sessions.add((stream.id, value))
                    log.warning(
                        "stream %d: publisher %s reports session %d, older than the announced "
                        "%d; ignored (sessions never go backwards)",
                        stream.id,
                        name,
                        value,
                        current,
                    )
                continue
            changed.append(stream.id)
        if changed:
            with self.database.transaction() as tx:
                for sid in changed:
                    store.set_meta(db=tx, key=_session_key(sid), value=value)
                    self.sessions[sid] = value
                self._bump(tx)
                for sid in changed:
                    self.session_versions[sid] = self.version
            for sid in changed:
                log.info("stream %d: publisher %s announced session %d", sid, name, value)
        return changed

    def session_waiting_for(self, stream_id: int) -> list[str]:
        """Live nodes of the stream (its publisher aside) that do not yet run the config that
        announced its session: they would refuse the new session's copies."""
        version = self.session_versions.get(stream_id)
        if version is None:
            return []
        stream = store.get_stream(db=self.database.conn, stream_id=stream_id)
        pub = self._publisher_of(self.database.conn, stream) if stream is not None else None
        return [
            n.name
            for n in self.key_nodes(stream_id)
            if n.alive and n.applied_version < version and (pub is None or n.name != pub.name)
        ]

    def session_in_force(self, stream_id: int) -> bool:
        """Whether every live node of the stream takes its announced session."""
        return stream_id in self.sessions and stream_id not in self.session_versions

    def check_sessions(self) -> list[int]:
        """Streams whose announced session every live node now runs: their publisher's
        document says so (a new config version), and the publisher starts sending."""
        done = [sid for sid in list(self.session_versions) if not self.session_waiting_for(sid)]
        if done:
            with self.database.transaction() as db:
                for sid in done:
                    del self.session_versions[sid]
                self._bump(db)
            for sid in done:
                log.info("stream %d: session %d in force at every node", sid, self.sessions[sid])
        return done

    # --- MPs --------------------------------------------------------------------------------

    def create_mp(self, name: str) -> tuple[store.MpRow, str]:
        """(MP, token): the token exists only in this answer; the database keeps its hash."""
        token = new_token()
        with self.database.transaction() as db:
            if store.get_mp_by_name(db=db, name=name) is not None:
                raise Conflict(f"MP {name!r} exists", field=("body", "name"))
            mp = store.insert_mp(
                db=db, name=name, token_hash=hash_token(token), now_ns=time.time_ns()
            )
        return mp, token

    # --- subscriptions ----------------------------------------------------------------------

    def subscribe(
        self, *, mp_id: int, stream_id: int, addr: str, port: int, deliver: str | None
    ) -> tuple[SubscriptionRow, bool]:
        """(subscription, created): an identical repeat returns the existing one."""
        with self.database.transaction() as db:
            if store.get_stream(db=db, stream_id=stream_id) is None:
                raise NotFound(f"stream {stream_id} not found")
            existing = store.subscription_at(db=db, stream_id=stream_id, addr=addr, port=port)
            if existing is not None:
                if existing.mp_id != mp_id:
                    raise Conflict(
                        f"endpoint {addr}:{port} is subscribed to stream {stream_id} by another MP"
                    )
                if existing.deliver != deliver:
                    raise Conflict(
                        f"endpoint {addr}:{port} is already subscribed with deliver="
                        f"{existing.deliver!r}; delete that subscription first"
                    )
                return existing, False
            host = self._receiver_for(db, addr, port)
            if deliver is not None and deliver.startswith("udp:"):
                target = deliver[4:].rsplit(":", 1)[0]
                if target != addr:
                    # Released data may only go to the MP's own host, never to a third party.
                    raise Unprocessable(
                        f"deliver address {target} is not the endpoint's host {addr}",
                        field=("body", "deliver"),
                    )
            sub = store.insert_subscription(
                db=db,
                mp_id=mp_id,
                stream_id=stream_id,
                addr=addr,
                port=port,
                host=host.name,
                deliver=deliver,
                now_ns=time.time_ns(),
            )
            started = time.perf_counter()
            self._attach(db, sub)
            self.metrics.attach_seconds.observe(time.perf_counter() - started)
            self._bump(db)
        return sub, True

    def _receiver_for(self, db: Any, addr: str, port: int) -> NodeRow:
        for node in store.list_nodes(db=db):
            if (
                node.role == "receiver"
                and node.data_addr == addr
                and node.port <= port < node.port + node.capacity
            ):
                return node
        raise Unprocessable(
            f"{addr}:{port} is not an endpoint port of any registered receiver host",
            field=("body", "endpoint"),
        )

    def _attach(self, db: Any, sub: SubscriptionRow) -> None:
        plans = self.plans[sub.stream_id]
        ep = Endpoint(endpoint_key(sub.id), sub.host)
        for state, placement in ((ACTIVE, plans.active), (PENDING, plans.pending)):
            if placement is None:
                continue
            slot = placement.attach(ep)
            store.set_leaf(db=db, stream_id=sub.stream_id, state=state, sub_id=sub.id, slot=slot)
        # Incremental attach never moves anyone; when the leaf relays are full and idle relays
        # exist, a full re-plan spreads the load (make-before-break, so nothing is lost).
        target = plans.pending or plans.active
        slot = target.least_loaded()
        if target.shape.levels and target.load(slot) > 2 * target.shape.fanout:
            stream = store.get_stream(db=db, stream_id=sub.stream_id)
            assert stream is not None
            fresh = fresh_shape(
                len(target.where),
                len(self._usable_relays(db)),
                fanout=stream.fanout,
                hedge=stream.hedge,
                depth=stream.depth,
            )
            # Only when a fresh plan would spread over more relays than this one uses.
            if sum(map(len, fresh.levels)) > len(target.relay_nodes()):
                self._replan(db, sub.stream_id, reason="leaf_relays_full")

    def unsubscribe(self, sub: SubscriptionRow) -> None:
        with self.database.transaction() as db:
            store.delete_subscription(db=db, sub_id=sub.id)
            plans = self.plans.get(sub.stream_id)
            if plans is not None:
                plans.active.detach(endpoint_key(sub.id))
                if plans.pending is not None:
                    plans.pending.detach(endpoint_key(sub.id))
            self._bump(db)

    # --- planning ---------------------------------------------------------------------------

    def _usable_relays(self, db: Any) -> list[str]:
        return [n.name for n in store.list_nodes(db=db) if n.role == "relay" and n.alive]

    def _publisher_of(self, db: Any, stream: StreamRow) -> NodeRow | None:
        nodes = store.list_nodes(db=db)
        if stream.publisher is not None:
            return next((n for n in nodes if n.name == stream.publisher), None)
        pubs = [n for n in nodes if n.role == "publisher"]
        alive = [n for n in pubs if n.alive]
        chosen = alive or pubs
        return chosen[0] if chosen else None

    def replan(self, stream_id: int, *, reason: str = "requested") -> Placement:
        with self.database.transaction() as db:
            if store.get_stream(db=db, stream_id=stream_id) is None:
                raise NotFound(f"stream {stream_id} not found")
            return self._replan(db, stream_id, reason=reason)

    def _replan(self, db: Any, stream_id: int, *, reason: str) -> Placement:
        stream = store.get_stream(db=db, stream_id=stream_id)
        assert stream is not None
        subs = store.list_subscriptions(db=db, stream_id=stream_id)
        pub = self._publisher_of(db, stream)
        plans = self.plans.get(stream_id)
        epoch = 1
        if plans is not None:
            epoch = max(plans.active.epoch, plans.pending.epoch if plans.pending else 0) + 1
        started = time.perf_counter()
        relays = self._usable_relays(db)
        placement = full_plan(
            [Endpoint(endpoint_key(s.id), s.host) for s in subs],
            relays,
            publisher=pub.name if pub else NO_PUBLISHER,
            matrix=LatencyMatrix(self.matrix),
            fanout=stream.fanout,
            hedge=stream.hedge,
            epoch=epoch,
            lemon_factor=self.settings.lemon_factor,
            depth=stream.depth,
        )
        self.metrics.plan_seconds.observe(time.perf_counter() - started)
        self.metrics.replans.labels(reason=reason).inc()
        leaves = {int(k[1:]): s for k, s in placement.where.items()}
        now_ns = time.time_ns()
        if plans is None or not plans.active.where:
            # Nothing flows yet, so there is nothing to keep alive while switching.
            store.drop_plan(db=db, stream_id=stream_id, state=PENDING)
            store.save_plan(
                db=db,
                stream_id=stream_id,
                state=ACTIVE,
                epoch=epoch,
                doc=placement.to_dict(),
                leaves=leaves,
                now_ns=now_ns,
            )
            self.plans[stream_id] = StreamPlans(active=placement)
        else:
            store.save_plan(
                db=db,
                stream_id=stream_id,
                state=PENDING,
                epoch=epoch,
                doc=placement.to_dict(),
                leaves=leaves,
                now_ns=now_ns,
            )
            plans.pending = placement
            plans.pending_since = time.monotonic()
        self._bump(db)
        if plans is not None and plans.pending is placement:
            plans.pending_version = self.version
        log.info("stream %d re-planned (%s): epoch %d", stream_id, reason, epoch)
        note = hedging_note(placement, relays=len(relays), depth=stream.depth)
        if note:
            log.warning("stream %d, epoch %d: %s", stream_id, epoch, note)
        return placement

    def check_switches(self) -> list[int]:
        """Make-before-break, second half: move a stream to its pending plan once every live
        node of that plan runs it (or the switch timeout passed)."""
        switched = []
        now = time.monotonic()
        for stream_id, plans in self.plans.items():
            pending = plans.pending
            if pending is None:
                continue
            ready = all(
                n.applied_version >= plans.pending_version
                for n in self._nodes_of(pending)
                if n.alive
            )
            if ready or now - plans.pending_since > self.settings.switch_timeout_s:
                with self.database.transaction() as db:
                    store.drop_plan(db=db, stream_id=stream_id, state=ACTIVE)
                    db.execute(
                        "UPDATE plans SET state = ? WHERE stream_id = ? AND state = ?",
                        (ACTIVE, stream_id, PENDING),
                    )
                    db.execute(
                        "UPDATE plan_leaves SET state = ? WHERE stream_id = ? AND state = ?",
                        (ACTIVE, stream_id, PENDING),
                    )
                    plans.active, plans.pending = pending, None
                    self._bump(db)
                switched.append(stream_id)
                log.info("stream %d switched to epoch %d", stream_id, pending.epoch)
        return switched

    def _nodes_of(self, placement: Placement) -> list[NodeRow]:
        db = self.database.conn
        names = set(placement.relay_nodes()) | set(placement.hosts.values())
        return [self.view(n) for n in store.list_nodes(db=db) if n.name in names]

    # --- views ------------------------------------------------------------------------------

    def prediction(self, stream_id: int) -> OmlPrediction:
        plans = self.plans[stream_id]
        key = (stream_id, self.version)
        if key not in self._predictions:
            self._predictions = {key: predict_oml(plans.active, LatencyMatrix(self.matrix))}
        return self._predictions[key]

    def lemons(self) -> tuple[str, ...]:
        relays = [n.name for n in store.list_nodes(db=self.database.conn) if n.role == "relay"]
        return rank_relays(
            relays, LatencyMatrix(self.matrix), lemon_factor=self.settings.lemon_factor
        ).lemons

    def topology_doc(
        self, stream_id: int, variant: str = ACTIVE, *, previous: bool = False
    ) -> dict[str, Any]:
        """The topology document (jasper.topology schema) of a stream's active or pending plan.

        For the pending plan with `previous`, receivers accept copies from the parents of both
        plans and the old plan rides along as "x-previous", so a data plane that keys
        forwarding by plan epoch keeps old-epoch messages flowing until the switch.
        """
        key = (stream_id, variant + ("+prev" if previous else ""), self.version)
        if key in self._docs:
            return self._docs[key]
        db = self.database.conn
        stream = store.get_stream(db=db, stream_id=stream_id)
        if stream is None:
            raise NotFound(f"stream {stream_id} not found")
        plans = self.plans[stream_id]
        placement = plans.active if variant == ACTIVE else plans.pending
        assert placement is not None
        nodes = {n.name: n for n in store.list_nodes(db=db)}
        subs = {s.id: s for s in store.list_subscriptions(db=db, stream_id=stream_id)}
        mps = {m.id: m.name for m in store.list_mps(db=db)}
        pub = self._publisher_of(db, stream)
        old = plans.active if previous and variant == PENDING else None
        tables = placement.tables()
        if old is not None:
            tables = tables.during_switch_from(old.tables())
        layout = Layout(
            publisher=pub.name if pub else placement.publisher,
            publisher_addr=pub.data_addr if pub else "0.0.0.0",
            # The port the publisher registered: it sends from it and serves NAKs there, so
            # receivers recover losses (docs/recovery.md).
            publisher_port=pub.port if pub else None,
            relays={n.name: (n.data_addr, n.port) for n in nodes.values()},
            hosts={n: nodes[n].data_addr for n in sorted(nodes) if nodes[n].role == "receiver"},
            endpoints={
                endpoint_key(sub.id): Spot(sub.host, sub.port, sub.deliver, mps.get(sub.mp_id))
                for sub in subs.values()
            },
        )
        ring = self.keys.get(stream_id)
        relays = sum(1 for n in nodes.values() if n.role == "relay" and n.alive)
        topology = topology_of(
            tables,
            layout,
            # hold_ns is the stream's setting; the publisher's copy carries the hold in force
            # (node_streams), so a moving hold does not change every node's document. The
            # keys are the same in every document of the stream (also x-previous).
            stream=StreamConfig(
                id=stream.id,
                name=stream.name,
                hedge=stream.hedge,
                hold_ns=stream.hold_ns,
                auth=ring.auth() if ring else None,
                session=self.sessions.get(stream_id),
            ),
            plan_epoch=placement.epoch,
            link_model=self.link_model,
            extra={
                "x-hold-policy": stream.hold_policy,
                "x-rate-hint": stream.rate_hint,
                # Whether every endpoint gets H+1 copies from distinct parents, and if not why
                # (too few relays, depth 1 asked, fan-out below H+1): a reader of the plan
                # must not take H for granted.
                "x-hedging": {
                    "hedge": placement.shape.hedge,
                    "parents_min": placement.parents_min(),
                    "note": hedging_note(placement, relays=relays, depth=stream.depth),
                },
            },
        )
        doc = topology.to_dict()
        if old is not None:
            doc["x-previous"] = self.topology_doc(stream_id, ACTIVE)
        self._docs[key] = doc
        return doc

    def node_streams(self, name: str) -> list[tuple[int, int, dict[str, Any]]]:
        """(stream id, plan epoch, topology) for each stream whose plan involves `name`.

        During a switch the publisher and relays that only the old plan uses keep the old
        plan; everyone else already gets the new one (make before break).
        """
        node = store.get_node(db=self.database.conn, name=name, telemetry=False)
        if node is None:
            raise NotFound(f"node {name!r} is not registered")
        out = []
        for stream_id, plans in sorted(self.plans.items()):
            doc = self.topology_doc(stream_id, ACTIVE)
            pending = plans.pending
            if pending is not None:
                in_new = name in set(pending.relay_nodes()) or node.role == "receiver"
                if in_new and node.role != "publisher":
                    doc = self.topology_doc(stream_id, PENDING, previous=True)
            if node.role == "publisher":
                stream = store.get_stream(db=self.database.conn, stream_id=stream_id)
                if stream is not None:
                    hold = self.hold_in_force(stream)
                    section = {**doc["stream"], "hold_ns": hold}
                    # The session is the publisher's to choose, not to be told: a restarted
                    # publisher that took the announced one back would restart its sequence
                    # under it, and every copy up to the old high-water mark would be dropped
                    # as a duplicate. Without it the new process picks a new (later) session,
                    # which its heartbeat announces.
                    # It is told which one is announced and whether every node runs it
                    # yet: it picks a later one and sends once that is in force
                    # (docs/security.md, "Publisher sessions").
                    section["announced_session"] = section.pop("session", None)
                    section["session_in_force"] = self.session_in_force(stream_id)
                    doc = {**doc, "stream": section}
            out.append((stream_id, int(doc["plan_epoch"]), doc))
        return out

    def peers_of(self, name: str) -> list[NodeRow]:
        """Nodes the agent `name` should probe: every other live node with a probe port."""
        return [
            n
            for n in store.list_nodes(db=self.database.conn)
            if n.name != name and n.alive and n.probe_port is not None
        ]
