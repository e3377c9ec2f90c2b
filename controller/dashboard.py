"""The live dashboard's snapshot: node health, per-endpoint and per-MP lateness, recent holds."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from controller import store
from controller.hold import HoldWindow
from controller.node_metrics import NodeReport, fleet_view, samples
from controller.schemas import HoldDecisionPublic

if TYPE_CHECKING:
    from controller.planner import Planner

HOLD_WINDOWS = 300
"""Hold windows per stream in a snapshot (the page polls every second; /hold has them all)."""

FAIRNESS_NOTE = (
    "P(F) and DWS need each message's release time at every endpoint; receivers report "
    "counters only (released, late), so the controller cannot compute them live. "
    "`jasper demo` and `jasper emulate` compute them from release records after a run."
)


class DashboardStream(BaseModel):
    id: int
    name: str
    plan_epoch: int | None = Field(description="Active plan's epoch; None before the first plan")
    pending_epoch: int | None
    hold_policy: str
    hold_ns: int = Field(description="Hold in force (send time -> deadline), ns")
    hold_windows: list[HoldDecisionPublic] = Field(
        description=f"The last {HOLD_WINDOWS} windows of the deadline policy, oldest first"
    )


class DashboardNode(BaseModel):
    name: str
    role: str
    alive: bool
    heartbeat_age_s: float | None
    clock_status: str | None = Field(description="synchronized, free-running, unknown, ...")
    clock_bound_ns: int | None = Field(description="Clock error bound the node reported, ns")
    clock_offset_ns: int | None
    data_path: str = Field(description="relay: user or ebpf; receiver: python or native, + ebpf")
    plan_epoch: int | None
    streams: list[int]
    released: int | None = Field(description="Receivers: messages released, over its endpoints")
    late: int | None = Field(description="Receivers: of those, late")
    copies_in: int | None = Field(description="Relays: copies that reached it (both paths)")


class DashboardEndpoint(BaseModel):
    name: str = Field(description="s<subscription id>")
    stream: int | None
    node: str = Field(description="Receiver host reporting it")
    mp: str | None = Field(description="Name of the MP that subscribed it (chosen by the MP)")
    released: int
    late: int


class DashboardPublic(BaseModel):
    """What the dashboard page polls; counters are cumulative, the page takes differences."""

    at_ns: int = Field(description="Controller clock when taken, ns since the epoch")
    streams: list[DashboardStream]
    nodes: list[DashboardNode]
    endpoints: list[DashboardEndpoint] = Field(
        description="Per-endpoint counters; empty when more than metrics_endpoint_series "
        "endpoints report (then see endpoints_omitted and the receivers' sums)"
    )
    endpoints_omitted: int
    fairness_live: bool = Field(description="Whether P(F) and DWS are computed live (never yet)")
    fairness_note: str


def _data_path(node: NodeReport, data: Mapping[str, Mapping[tuple[str, ...], float]]) -> str:
    """Which path a node's counters came from: heartbeat statuses carry numbers only, so the
    path is read from which families of the table the node has samples in."""

    def has(family: str, *values: str) -> bool:
        return any(k[0] == node.name and set(values) <= set(k) for k in data.get(family, {}))

    if node.role == "relay":
        return "ebpf" if has("jasper_relay_copies_in_total", "kernel") else "user"
    if node.role == "receiver":
        path = "native" if has("jasper_receiver_native_datagrams_total") else "python"
        return f"{path}+ebpf" if has("jasper_receiver_fast_path_events_total") else path
    return "user"


def _int(v: float | None) -> int | None:
    return None if v is None else round(v)


def _family(data: Mapping[str, Mapping[tuple[str, ...], float]], name: str) -> dict[str, float]:
    """A family's samples summed by their first label (the node)."""
    out: dict[str, float] = {}
    for labels, v in data.get(name, {}).items():
        out[labels[0]] = out.get(labels[0], 0.0) + v
    return out


def snapshot(planner: Planner, *, endpoint_series: int) -> DashboardPublic:
    """The fleet as the page draws it, read through controller.node_metrics' table."""
    db = planner.database.conn
    view = fleet_view(planner)
    data = samples(view, endpoint_series=endpoint_series)
    released = _family(data, "jasper_receiver_released_total")
    late = _family(data, "jasper_receiver_late_total")
    copies_in = _family(data, "jasper_relay_copies_in_total")

    subs = {f"s{s.id}": s for s in store.list_subscriptions(db=db)}
    mps = {m.id: m.name for m in store.list_mps(db=db)}
    ep_late = {labels[2]: v for labels, v in data.get("jasper_endpoint_late_total", {}).items()}
    endpoints = []
    for (node, stream, ep), v in sorted(data.get("jasper_endpoint_released_total", {}).items()):
        sub = subs.get(ep)
        endpoints.append(
            DashboardEndpoint(
                name=ep,
                stream=int(stream) if stream else None,
                node=node,
                mp=mps.get(sub.mp_id) if sub is not None else None,
                released=round(v),
                late=round(ep_late.get(ep, 0.0)),
            )
        )

    node_streams: dict[str, set[int]] = {}
    for name, sid in view.relay_stream.items():
        node_streams.setdefault(name, set()).add(sid)
    for sub in subs.values():
        node_streams.setdefault(sub.host, set()).add(sub.stream_id)
    nodes = []
    for n in view.nodes:
        epoch = n.status.get("plan_epoch")
        bound = n.clock.get("bound_ns")
        offset = n.clock.get("offset_ns")
        clock_status = n.clock.get("status")
        nodes.append(
            DashboardNode(
                name=n.name,
                role=n.role,
                alive=n.alive,
                heartbeat_age_s=n.heartbeat_age_s,
                clock_status=str(clock_status) if clock_status is not None else None,
                clock_bound_ns=int(bound) if isinstance(bound, int | float) else None,
                clock_offset_ns=int(offset) if isinstance(offset, int | float) else None,
                data_path=_data_path(n, data) if n.alive and n.status else "unknown",
                plan_epoch=int(epoch) if isinstance(epoch, int | float) else None,
                streams=sorted(node_streams.get(n.name, ())),
                released=_int(released.get(n.name)) if n.role == "receiver" else None,
                late=_int(late.get(n.name)) if n.role == "receiver" else None,
                copies_in=_int(copies_in.get(n.name)) if n.role == "relay" else None,
            )
        )

    streams = []
    for row in store.list_streams(db=db):
        plans = planner.plans.get(row.id)
        hold = planner.hold_of(row)
        windows = list(hold.history)[-HOLD_WINDOWS:]
        streams.append(
            DashboardStream(
                id=row.id,
                name=row.name,
                plan_epoch=plans.active.epoch if plans is not None else None,
                pending_epoch=plans.pending.epoch if plans and plans.pending else None,
                hold_policy=row.hold_policy,
                hold_ns=hold.hold_ns,
                hold_windows=[_window(w) for w in windows],
            )
        )
    omitted = data.get("jasper_metrics_endpoints_omitted", {}).get((), 0.0)
    return DashboardPublic(
        at_ns=time.time_ns(),
        streams=streams,
        nodes=nodes,
        endpoints=endpoints,
        endpoints_omitted=round(omitted),
        fairness_live=False,
        fairness_note=FAIRNESS_NOTE,
    )


def _window(w: HoldWindow) -> HoldDecisionPublic:
    d = w.decision
    return HoldDecisionPublic(
        at_ns=d.at_ns,
        action=d.action.value,
        late_fraction=d.late_fraction,
        delay_estimate_ns=d.delay_estimate_ns,
        bounds_ns=d.bounds_ns,
        extra_hold_ns=d.extra_hold_ns,
        hold_ns=d.hold_ns,
        reporters=w.reporters,
        count=w.count,
    )
