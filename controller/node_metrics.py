"""Per-node Prometheus series read from heartbeat statuses, through an explicit table."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller import store
from jasper.wire_spec import MALFORMED_REASONS, NAK_REASONS, REJECT_REASONS

if TYPE_CHECKING:
    from controller.planner import Planner

Scope = Literal["relay", "receiver", "endpoints", "endpoint", "publisher", "node"]
"""Where a row's keys are read and which labels its series carry:

- relay: under `nodes.<node>.` of a relay process's status (one process may host several
  relay nodes; each heartbeat names one of them); labels node, stream.
- receiver: the receiver host's status root; labels node, stream.
- endpoints: under `endpoints.<endpoint>.`, summed over the host's endpoints of one stream;
  labels node, stream.
- endpoint: under `endpoints.<endpoint>.`, one series per endpoint (bounded by
  `metrics_endpoint_series`); labels node, stream, endpoint.
- publisher: the publisher's status root; labels node, stream.
- node: any node's status root plus its clock and heartbeat age; labels node, role.
"""


@dataclass(frozen=True)
class Series:
    """One row of the table: status keys to one metric family's samples."""

    name: str
    """Metric name as exposed; counters end in `_total`."""
    kind: Literal["counter", "gauge"]
    help: str
    scope: Scope
    keys: tuple[str, ...]
    """Status keys relative to the scope, summed. `{label}` in a key captures one key part
    (letters, digits, `_` and `-`) as that label's value."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Fixed labels of this row (e.g. path="kernel"), after the scope's."""
    values: tuple[str, ...] | None = None
    """The only values a captured label may take (bounded cardinality); None: any token."""
    scale: float = 1.0
    """Multiplier to base units (ns to seconds: 1e-9)."""


def _k(*keys: str) -> tuple[str, ...]:
    return keys


_KERNEL_RELAY_EVENTS = (
    "malformed",
    "no_neighbour",
    "fib_fallback",
    "clone_failed",
    "no_targets",
    "passed",
    "clone_seen",
)
_KERNEL_RECEIVER_EVENTS = ("in", "accepted", "duplicates", "not_parent", "malformed", "passed")
_NATIVE_EVENTS = (
    "recv_calls",
    "batches",
    "truncated",
    "deliveries_dropped",
    "records_dropped",
    "late_wakes",
    "wakeups",
    "spins",
)

SERIES: tuple[Series, ...] = (
    # --- every node -----------------------------------------------------------------------
    Series("jasper_node_clock_error_bound_seconds", "gauge",
           "Clock error bound the node reported: abs(offset) + root dispersion + root delay / 2",
           "node", _k("clock.bound_ns"), scale=1e-9),
    Series("jasper_node_clock_synced", "gauge",
           "1 while the node's clock is synchronized, 0 when free-running or unknown",
           "node", _k("clock.synced")),
    Series("jasper_node_clock_offset_seconds", "gauge",
           "Node clock minus the host's kernel clock (emulated skew left after correction)",
           "node", _k("clock.offset_ns"), scale=1e-9),
    Series("jasper_node_heartbeat_age_seconds", "gauge",
           "Seconds since the node's last heartbeat reached this controller",
           "node", _k("heartbeat.age_s")),
    Series("jasper_node_applied_config_version", "gauge",
           "Config version the node runs", "node", _k("heartbeat.applied_version")),
    Series("jasper_node_plan_epoch", "gauge",
           "Plan epoch the node's daemon runs", "node", _k("plan_epoch")),
    Series("jasper_node_cpu_seconds_total", "counter",
           "CPU time of the node's process (user + system)", "node", _k("process.cpu_s")),
    Series("jasper_node_peak_rss_bytes", "gauge",
           "Peak resident memory of the node's process", "node",
           _k("process.peak_rss_kb"), scale=1024.0),
    Series("jasper_node_agent_failures_total", "counter",
           "Control-plane calls of the node's agent that failed, by call", "node",
           _k("agent.heartbeat_failures"), {"call": "heartbeat"}),
    Series("jasper_node_agent_failures_total", "counter",
           "Control-plane calls of the node's agent that failed, by call", "node",
           _k("agent.poll_failures"), {"call": "poll"}),
    Series("jasper_node_agent_failures_total", "counter",
           "Control-plane calls of the node's agent that failed, by call", "node",
           _k("agent.apply_errors"), {"call": "apply"}),
    Series("jasper_emulated_link_lost_total", "counter",
           "Copies the emulated link model dropped at this node (emulation only)", "node",
           _k("delay_line.lost")),
    # --- relays ---------------------------------------------------------------------------
    Series("jasper_relay_copies_in_total", "counter",
           "Copies that reached the relay, by the path that took them",
           "relay", _k("received"), {"path": "user"}),
    Series("jasper_relay_copies_in_total", "counter",
           "Copies that reached the relay, by the path that took them",
           "relay", _k("fast_path.in"), {"path": "kernel"}),
    Series("jasper_relay_copies_out_total", "counter",
           "Copies the relay sent (own children and hedges), by the path that sent them",
           "relay", _k("sent", "sent_hedge"), {"path": "user"}),
    Series("jasper_relay_copies_out_total", "counter",
           "Copies the relay sent (own children and hedges), by the path that sent them",
           "relay", _k("fast_path.copies"), {"path": "kernel"}),
    Series("jasper_relay_hedge_copies_out_total", "counter",
           "Copies the user-space relay sent as hedges to siblings' children (the kernel path "
           "does not count them apart)", "relay", _k("sent_hedge")),
    Series("jasper_relay_accepted_total", "counter",
           "First copies the user-space relay kept and forwarded", "relay", _k("accepted")),
    Series("jasper_relay_duplicates_total", "counter",
           "Later hedged copies the relay dropped, by path",
           "relay", _k("duplicates"), {"path": "user"}),
    Series("jasper_relay_duplicates_total", "counter",
           "Later hedged copies the relay dropped, by path",
           "relay", _k("fast_path.duplicates"), {"path": "kernel"}),
    Series("jasper_relay_stale_total", "counter",
           "Copies older than the dedup window or of an older session, dropped",
           "relay", _k("stale")),
    Series("jasper_relay_kernel_drops_total", "counter",
           "Datagrams the kernel dropped for a full receive buffer (SO_RXQ_OVFL)",
           "relay", _k("kernel_drops")),
    Series("jasper_relay_send_errors_total", "counter",
           "Sends the kernel refused, by errno name", "relay", _k("send_errors.{errno}")),
    Series("jasper_datagrams_rejected_total", "counter",
           "Well-formed datagrams refused before admission, by reason",
           "relay", _k("rejected.{reason}"), values=REJECT_REASONS),
    Series("jasper_datagrams_malformed_total", "counter",
           "Datagrams dropped as not Jasper, by reason",
           "relay", _k("malformed.{reason}"), values=MALFORMED_REASONS),
    Series("jasper_relay_fast_path_events_total", "counter",
           "Outcomes of the relay's eBPF program (per-CPU map counters, summed), by event",
           "relay", _k("fast_path.{event}"), values=_KERNEL_RELAY_EVENTS),
    Series("jasper_relay_fast_path_targets", "gauge",
           "Targets in the relay's eBPF forwarding table", "relay", _k("fast_path.targets"),
           {"resolved": "all"}),
    Series("jasper_relay_fast_path_targets", "gauge",
           "Targets in the relay's eBPF forwarding table", "relay",
           _k("fast_path.targets_fib"), {"resolved": "fib"}),
    Series("jasper_relay_fast_path_targets", "gauge",
           "Targets in the relay's eBPF forwarding table", "relay",
           _k("fast_path.targets_unroutable"), {"resolved": "unroutable"}),
    # --- receivers, summed over a host's endpoints of one stream ------------------------------
    Series("jasper_receiver_copies_in_total", "counter",
           "Copies that reached the receiver host's endpoints", "endpoints", _k("received")),
    Series("jasper_receiver_accepted_total", "counter",
           "First copies kept (datagrams; each may carry several messages)",
           "endpoints", _k("accepted")),
    Series("jasper_receiver_duplicates_total", "counter",
           "Later hedged copies dropped by the receiver", "endpoints", _k("duplicates")),
    Series("jasper_receiver_stale_total", "counter",
           "Copies older than the dedup window or of an older session, dropped",
           "endpoints", _k("stale")),
    Series("jasper_receiver_kernel_drops_total", "counter",
           "Datagrams the kernel dropped for a full receive buffer (SO_RXQ_OVFL)",
           "endpoints", _k("kernel_drops")),
    Series("jasper_receiver_released_total", "counter",
           "Messages handed to MPs (on time or late)", "endpoints", _k("delivered")),
    Series("jasper_receiver_late_total", "counter",
           "Messages whose first copy arrived after the deadline (handed over at once)",
           "endpoints", _k("late")),
    Series("jasper_receiver_gaps_total", "counter",
           "Releases flagged gap-before: a sequence number skipped at an endpoint",
           "endpoints", _k("gaps")),
    Series("jasper_receiver_gap_messages_total", "counter",
           "Sequence numbers skipped in release order (lost, unless they come later)",
           "endpoints", _k("gap_messages")),
    Series("jasper_receiver_hold_overflow_total", "counter",
           "Messages refused by a full release schedule, handed over at once",
           "endpoints", _k("hold_overflow")),
    Series("jasper_receiver_deliver_dropped_total", "counter",
           "Deliveries the MP could not take (queue full, or the socket's errno)",
           "endpoints", _k("deliver_dropped.{reason}")),
    Series("jasper_datagrams_rejected_total", "counter",
           "Well-formed datagrams refused before admission, by reason",
           "endpoints", _k("rejected.{reason}"), values=REJECT_REASONS),
    Series("jasper_datagrams_malformed_total", "counter",
           "Datagrams dropped as not Jasper, by reason",
           "endpoints", _k("malformed.{reason}"), values=MALFORMED_REASONS),
    # Loss recovery (docs/recovery.md): jasper.recovery.RECOVERY_COUNTER_NAMES.
    Series("jasper_receiver_naks_sent_total", "counter",
           "NAK datagrams receiver endpoints sent to the publisher", "endpoints",
           _k("naks_sent")),
    Series("jasper_receiver_naks_coalesced_total", "counter",
           "Missing ranges asked for in a NAK beside its first range", "endpoints",
           _k("naks_coalesced")),
    Series("jasper_receiver_recovered_total", "counter",
           "Messages a retransmission brought before their deadline (released on time)",
           "endpoints", _k("recovered")),
    Series("jasper_receiver_recovered_late_total", "counter",
           "Messages a retransmission brought after their deadline (released late)",
           "endpoints", _k("recovered_late")),
    Series("jasper_receiver_unrecoverable_total", "counter",
           "Missing messages given up (NAKs spent, hole too wide, new session)",
           "endpoints", _k("unrecoverable")),
    Series("jasper_receiver_endpoints", "gauge",
           "Endpoints the receiver host reports", "endpoints", _k("endpoint")),
    # --- receivers, per endpoint (bounded) ---------------------------------------------------
    Series("jasper_endpoint_released_total", "counter",
           "Messages handed to this endpoint's MP (on time or late)", "endpoint",
           _k("delivered")),
    Series("jasper_endpoint_late_total", "counter",
           "Messages of this endpoint whose first copy arrived after the deadline",
           "endpoint", _k("late")),
    Series("jasper_endpoint_distinct_parents", "gauge",
           "Parents this endpoint received copies from (H+1 when hedging works)",
           "endpoint", _k("distinct_parents")),
    # --- receiver hosts ----------------------------------------------------------------------
    Series("jasper_receiver_held_messages", "gauge",
           "Messages held for release at their deadline now", "receiver", _k("release.held")),
    Series("jasper_receiver_release_errors_total", "counter",
           "Releases that failed on the Python path", "receiver", _k("release.errors")),
    Series("jasper_receiver_native_datagrams_total", "counter",
           "Datagrams the native path's thread received", "receiver", _k("native.datagrams")),
    Series("jasper_receiver_native_events_total", "counter",
           "Events of the native receive path, by event", "receiver",
           _k("native.{event}"), values=_NATIVE_EVENTS),
    Series("jasper_receiver_native_spin_seconds_total", "counter",
           "Time the native release thread spun toward deadlines", "receiver",
           _k("native.spin_ns"), scale=1e-9),
    Series("jasper_receiver_deadlines_clamped_total", "counter",
           "Deadlines the native core raised to the stream's floor", "receiver",
           _k("native.clamped")),
    Series("jasper_receiver_fast_path_events_total", "counter",
           "Outcomes of the receiver host's eBPF filter (per-CPU map counters, summed), by event",
           "receiver", _k("kernel.{event}"), values=_KERNEL_RECEIVER_EVENTS),
    Series("jasper_receiver_refused_endpoints", "gauge",
           "Endpoints of the plan the receiver refused (bad deliver target)", "receiver",
           _k("refused_endpoints")),
    # --- publishers --------------------------------------------------------------------------
    Series("jasper_publisher_messages_total", "counter",
           "Messages the publisher sent", "publisher", _k("messages")),
    Series("jasper_publisher_datagrams_total", "counter",
           "Datagrams the publisher sent", "publisher", _k("sent_datagrams")),
    Series("jasper_publisher_deadlines_clamped_total", "counter",
           "Deadlines the publisher clamped", "publisher", _k("deadlines_clamped")),
    Series("jasper_publisher_hold_seconds", "gauge",
           "Hold the publisher stamps with now (deadline - send time)", "publisher",
           _k("hold_ns"), scale=1e-9),
    Series("jasper_publisher_naks_received_total", "counter",
           "NAKs the publisher accepted", "publisher", _k("recovery.naks_received")),
    Series("jasper_publisher_naks_refused_total", "counter",
           "NAKs the publisher refused, by reason", "publisher",
           _k("recovery.naks_refused.{reason}"), values=NAK_REASONS),
    Series("jasper_publisher_retransmits_total", "counter",
           "Datagrams the publisher sent again answering NAKs", "publisher",
           _k("recovery.retransmits_sent")),
    Series("jasper_publisher_retransmits_coalesced_total", "counter",
           "Retransmissions not sent twice to one endpoint within the coalescing window",
           "publisher", _k("recovery.retransmits_coalesced")),
    Series("jasper_publisher_retransmits_missing_total", "counter",
           "Sequence numbers asked for that the retransmit buffer no longer held",
           "publisher", _k("recovery.retransmits_missing")),
    Series("jasper_publisher_ingress_malformed_total", "counter",
           "Ingress messages from the matching engine dropped as malformed", "publisher",
           _k("ingress.malformed")),
)  # fmt: skip
"""The whole mapping from heartbeat status keys to series; nothing else is exported."""

SCOPE_LABELS: dict[Scope, tuple[str, ...]] = {
    "relay": ("node", "stream"),
    "receiver": ("node", "stream"),
    "endpoints": ("node", "stream"),
    "endpoint": ("node", "stream", "endpoint"),
    "publisher": ("node", "stream"),
    "node": ("node", "role"),
}

UP = "jasper_node_up"
STREAM_HOLD = "jasper_stream_hold_seconds"
ENDPOINTS_OMITTED = "jasper_metrics_endpoints_omitted"
CONTROLLER_FAMILIES: dict[str, tuple[str, str]] = {
    UP: ("gauge", "1 while the controller counts the node alive; a dead node has no other series"),
    STREAM_HOLD: ("gauge", "Hold in force per stream, as the controller decides it"),
    ENDPOINTS_OMITTED: (
        "gauge",
        "Endpoints left out of the per-endpoint series (more than metrics_endpoint_series)",
    ),
}


def exported_names() -> set[str]:
    """Every sample name this module can export (what a dashboard may query)."""
    return {s.name for s in SERIES} | set(CONTROLLER_FAMILIES)


@dataclass(frozen=True)
class NodeReport:
    """What the controller knows of one node at scrape time."""

    name: str
    role: str
    alive: bool
    status: Mapping[str, Any]
    """The last heartbeat's flattened daemon status ({} before the first)."""
    clock: Mapping[str, Any]
    """The last heartbeat's clock: status label, bound_ns, offset_ns."""
    applied_version: int
    heartbeat_age_s: float | None


@dataclass(frozen=True)
class FleetView:
    """Every node with the streams its counters belong to."""

    nodes: tuple[NodeReport, ...]
    relay_stream: Mapping[str, int]
    """Relay node -> the lowest stream id it serves (its counters cover all its streams)."""
    endpoint_stream: Mapping[str, int]
    """Endpoint name -> stream of its subscription."""
    stream_hold_ns: Mapping[int, int]
    """Stream -> the hold in force, ns."""


_CAPTURE = re.compile(r"\{(\w+)\}")


def _compile(key: str) -> re.Pattern[str] | None:
    if "{" not in key:
        return None
    parts = _CAPTURE.split(key)
    rx = ""
    for i, part in enumerate(parts):
        rx += f"(?P<{part}>[A-Za-z0-9_-]{{1,48}})" if i % 2 else re.escape(part)
    return re.compile(rx + r"\Z")


_PATTERNS: dict[int, tuple[tuple[str, re.Pattern[str] | None], ...]] = {
    id(s): tuple((k, _compile(k)) for k in s.keys) for s in SERIES
}


def _label_names(s: Series) -> tuple[str, ...]:
    captured = tuple(n for k in s.keys for n in _CAPTURE.findall(k))
    return (*SCOPE_LABELS[s.scope], *s.labels, *dict.fromkeys(captured))


def _check_table() -> None:
    """Rows of one family agree on type, help and label names (a bug otherwise)."""
    seen: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for s in SERIES:
        shape = (s.kind, s.help, _label_names(s))
        if seen.setdefault(s.name, shape) != shape:
            raise AssertionError(f"rows of {s.name} disagree: {seen[s.name]} vs {shape}")
        if (s.kind == "counter") != s.name.endswith("_total"):
            raise AssertionError(f"{s.name}: counters and only counters end in _total")


_check_table()

_Samples = dict[str, dict[tuple[str, ...], float]]


def _add(out: _Samples, s: Series, scoped: Mapping[str, Any], base: tuple[str, ...]) -> None:
    fam = out.setdefault(s.name, {})
    fixed = tuple(s.labels.values())
    for key, rx in _PATTERNS[id(s)]:
        if rx is None:
            v = scoped.get(key)
            if isinstance(v, int | float):
                labels = (*base, *fixed)
                fam[labels] = fam.get(labels, 0.0) + float(v) * s.scale
            continue
        for k, v in scoped.items():
            m = rx.match(k)
            if m is None or not isinstance(v, int | float):
                continue
            captured = tuple(m.groupdict().values())
            if s.values is not None and any(c not in s.values for c in captured):
                continue
            labels = (*base, *fixed, *captured)
            fam[labels] = fam.get(labels, 0.0) + float(v) * s.scale


def _by_scope() -> dict[Scope, list[Series]]:
    out: dict[Scope, list[Series]] = {}
    for s in SERIES:
        out.setdefault(s.scope, []).append(s)
    return out


_SCOPES = _by_scope()


def _endpoints_of(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`endpoints.<name>.<rest>` keys grouped by endpoint (names without dots, as the
    controller gives them: s<subscription id>)."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in status.items():
        if not k.startswith("endpoints."):
            continue
        name, _, rest = k[len("endpoints.") :].partition(".")
        if rest:
            out.setdefault(name, {})[rest] = v
    return out


def samples(view: FleetView, *, endpoint_series: int) -> _Samples:
    """Every sample of the table for `view`: family name -> label values -> value."""
    out: _Samples = {s.name: {} for s in SERIES}
    out[UP] = {}
    out[STREAM_HOLD] = {}
    out[ENDPOINTS_OMITTED] = {}
    endpoints_total = 0
    per_endpoint: list[tuple[tuple[str, str], dict[str, Any]]] = []
    for node in view.nodes:
        out[UP][(node.name, node.role)] = 1.0 if node.alive else 0.0
        if not node.alive or (not node.status and not node.clock):
            continue
        status = node.status
        root = dict(status)
        clock_status = node.clock.get("status")
        root["clock.synced"] = 1.0 if clock_status == "synchronized" else 0.0
        for k in ("bound_ns", "offset_ns"):
            v = node.clock.get(k)
            if isinstance(v, int | float):
                root[f"clock.{k}"] = v
        if node.heartbeat_age_s is not None:
            root["heartbeat.age_s"] = node.heartbeat_age_s
        root["heartbeat.applied_version"] = node.applied_version
        for s in _SCOPES["node"]:
            _add(out, s, root, (node.name, node.role))
        if node.role == "relay":
            stream = _stream_label(view.relay_stream.get(node.name))
            prefix = f"nodes.{node.name}."
            scoped = {k[len(prefix) :]: v for k, v in status.items() if k.startswith(prefix)}
            for s in _SCOPES["relay"]:
                _add(out, s, scoped, (node.name, stream))
        elif node.role == "receiver":
            eps = _endpoints_of(status)
            streams = {ep: _stream_label(view.endpoint_stream.get(ep)) for ep in eps}
            for ep, fields in sorted(eps.items()):
                fields["endpoint"] = 1
                for s in _SCOPES["endpoints"]:
                    _add(out, s, fields, (node.name, streams[ep]))
                per_endpoint.append(((node.name, ep), fields))
            endpoints_total += len(eps)
            host_streams = sorted(set(streams.values())) or [""]
            # Host-wide figures belong to the host's stream (a receiver process runs one
            # stream's plan); with endpoints of several, to the first.
            for s in _SCOPES["receiver"]:
                _add(out, s, status, (node.name, host_streams[0]))
        elif node.role == "publisher":
            sid = status.get("stream_id")
            stream = _stream_label(int(sid) if isinstance(sid, int | float) else None)
            for s in _SCOPES["publisher"]:
                _add(out, s, status, (node.name, stream))
    if endpoints_total <= endpoint_series:
        for (node_name, ep), fields in per_endpoint:
            stream = _stream_label(view.endpoint_stream.get(ep))
            for s in _SCOPES["endpoint"]:
                _add(out, s, fields, (node_name, stream, ep))
        out[ENDPOINTS_OMITTED][()] = 0.0
    else:
        out[ENDPOINTS_OMITTED][()] = float(endpoints_total)
    for sid, hold_ns in sorted(view.stream_hold_ns.items()):
        out[STREAM_HOLD][(str(sid),)] = hold_ns / 1e9
    return out


def _stream_label(sid: int | None) -> str:
    return "" if sid is None else str(sid)


class NodeCollector(Collector):
    """The table's families, read from the controller's state at scrape time: a node that
    died leaves only `jasper_node_up 0`; a node that was deleted leaves nothing."""

    def __init__(self, read: Callable[[], FleetView], *, endpoint_series: int) -> None:
        self.read = read
        self.endpoint_series = endpoint_series

    def collect(self) -> Iterator[Metric]:
        data = samples(self.read(), endpoint_series=self.endpoint_series)
        meta: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        for s in SERIES:
            meta.setdefault(s.name, (s.kind, s.help, _label_names(s)))
        meta[UP] = (*CONTROLLER_FAMILIES[UP], ("node", "role"))
        meta[STREAM_HOLD] = (*CONTROLLER_FAMILIES[STREAM_HOLD], ("stream",))
        meta[ENDPOINTS_OMITTED] = (*CONTROLLER_FAMILIES[ENDPOINTS_OMITTED], ())
        for name, (kind, help_text, labels) in meta.items():
            fam: CounterMetricFamily | GaugeMetricFamily
            if kind == "counter":
                fam = CounterMetricFamily(name, help_text, labels=labels)
            else:
                fam = GaugeMetricFamily(name, help_text, labels=labels)
            for values, value in sorted(data.get(name, {}).items()):
                fam.add_metric(list(values), value)
            yield fam


def fleet_view(planner: Planner) -> FleetView:
    """The planner's nodes, telemetry and plans as the collector reads them."""
    db = planner.database.conn
    now = time.monotonic()
    nodes = []
    for n in store.list_nodes(db=db):
        t = planner.telemetry.get(n.name)
        seen = planner.last_seen.get(n.name)
        nodes.append(
            NodeReport(
                name=n.name,
                role=n.role,
                alive=n.alive,
                status=t.status if t is not None else {},
                clock=t.clock if t is not None else {},
                applied_version=t.applied_version if t is not None else n.applied_version,
                heartbeat_age_s=None if seen is None else max(0.0, now - seen),
            )
        )
    relay_stream: dict[str, int] = {}
    # A relay in several trees counts them together (its counters are per node): the series
    # carry the lowest stream id whose plan names it.
    for sid, plans in sorted(planner.plans.items()):
        used = list(plans.active.relay_nodes())
        if plans.pending is not None:
            used += plans.pending.relay_nodes()
        for name in used:
            relay_stream.setdefault(name, sid)
    endpoint_stream = {f"s{sub.id}": sub.stream_id for sub in store.list_subscriptions(db=db)}
    holds: dict[int, int] = {}
    for stream in store.list_streams(db=db):
        held = planner.holds.streams.get(stream.id)
        holds[stream.id] = held.hold_ns if held is not None else stream.hold_ns
    return FleetView(
        nodes=tuple(nodes),
        relay_stream=relay_stream,
        endpoint_stream=endpoint_stream,
        stream_hold_ns=holds,
    )


def describe() -> list[dict[str, Any]]:
    """The table as rows for docs and tests: name, type, labels, help, status keys."""
    rows: dict[str, dict[str, Any]] = {}
    for s in SERIES:
        row = rows.setdefault(
            s.name,
            {"name": s.name, "type": s.kind, "labels": _label_names(s), "help": s.help,
             "keys": []},
        )  # fmt: skip
        row["keys"] += [f"{s.scope}:{k}" for k in s.keys]
    return list(rows.values())
