"""Tree: the current plan of a stream, with predicted OML; re-plan on demand."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path

from controller import store
from controller.deps import AdminDep, DbDep, PlannerDep, PrincipalDep
from controller.errors import NotFound
from controller.keys import without_keys
from controller.planner import Planner, endpoint_key
from controller.schemas import (
    HoldDecisionPublic,
    LinkPublic,
    StreamHoldPublic,
    TreeEndpoint,
    TreePublic,
    TreeSlot,
)
from controller.visibility import mp_topology

router = APIRouter(prefix="/v1/streams", tags=["tree"])

StreamPath = Annotated[int, Path(ge=0, le=2**32 - 1, description="Stream id")]


def tree_of(planner: Planner, stream_id: int, *, mp_id: int | None = None) -> TreePublic:
    """The stream's tree; for `mp_id` as that MP may see it (controller.visibility): its own
    endpoints listed, other MPs' endpoints counted in `other_endpoints`."""
    db = planner.database.conn
    plans = planner.plans.get(stream_id)
    if plans is None or store.get_stream(db=db, stream_id=stream_id) is None:
        raise NotFound(f"stream {stream_id} not found")
    p = plans.active
    doc = without_keys(planner.topology_doc(stream_id))  # keys go to nodes' configs only
    prediction = planner.prediction(stream_id)
    fwd = p.forwarding()
    parents: dict[str, list[str]] = {}
    hedge_edges: list[tuple[str, str]] = []
    for src, targets in fwd.items():
        for f in targets:
            parents.setdefault(f.target, [])
            if f.hedge:
                hedge_edges.append((src, f.target))
    for src, targets in fwd.items():
        for f in targets:
            if not f.hedge:
                parents[f.target].insert(0, src)
            else:
                parents[f.target].append(src)
    subs = {s.id: s for s in store.list_subscriptions(db=db, stream_id=stream_id)}
    mps = {m.id: m.name for m in store.list_mps(db=db)}
    all_keys = set(p.endpoints())
    hidden: set[str] = set()
    if mp_id is not None:
        own = {endpoint_key(s.id) for s in subs.values() if s.mp_id == mp_id}
        hidden = all_keys - own
        parents = {k: v for k, v in parents.items() if k not in hidden}
        hedge_edges = [e for e in hedge_edges if e[1] not in hidden]
        doc = mp_topology(doc, own)
    endpoints = []
    for key in p.endpoints():
        sub = subs.get(int(key[1:]))
        if sub is None or key in hidden:
            continue
        endpoints.append(
            TreeEndpoint(
                name=key,
                subscription_id=sub.id,
                mp=mps.get(sub.mp_id),
                host=sub.host,
                addr=sub.addr,
                port=sub.port,
                parents=list(p.parents(key)),
                predicted_arrival_ns=prediction.arrival_ns.get(key, 0),
            )
        )
    return TreePublic(
        stream_id=stream_id,
        plan_epoch=p.epoch,
        pending_epoch=plans.pending.epoch if plans.pending else None,
        depth=len(p.shape.levels),
        fanout=p.shape.fanout,
        hedge=p.shape.hedge,
        publisher=doc["publisher"]["name"],
        levels=[[TreeSlot(slot=s, node=p.slot_node[s]) for s in level] for level in p.shape.levels],
        parents=parents,
        hedge_edges=hedge_edges,
        endpoints=endpoints,
        other_endpoints=len(hidden),
        lemons=list(planner.lemons()),
        predicted_oml_ns=prediction.oml_ns,
        predicted_median_ns=prediction.median_ns,
        topology=doc,
    )


@router.get("/{stream_id}/tree", response_model=TreePublic, summary="Current tree of a stream")
async def get_tree(stream_id: StreamPath, planner: PlannerDep, who: PrincipalDep) -> TreePublic:
    # An MP sees its own endpoints only; admin and nodes (which get whole plans anyway) all.
    return tree_of(planner, stream_id, mp_id=who.mp.id if who.mp is not None else None)


@router.post(
    "/{stream_id}/replan", response_model=TreePublic, summary="Full re-plan (make-before-break)"
)
async def replan(stream_id: StreamPath, planner: PlannerDep, db: DbDep, _: AdminDep) -> TreePublic:
    planner.replan(stream_id, reason="requested")
    return tree_of(planner, stream_id)


@router.get(
    "/{stream_id}/hold",
    response_model=StreamHoldPublic,
    summary="Release hold in force and its history (one entry per delay window)",
)
async def get_hold(stream_id: StreamPath, planner: PlannerDep, _: PrincipalDep) -> StreamHoldPublic:
    stream = store.get_stream(db=planner.database.conn, stream_id=stream_id)
    if stream is None:
        raise NotFound(f"stream {stream_id} not found")
    hold = planner.hold_of(stream)
    return StreamHoldPublic(
        stream_id=stream_id,
        hold_policy=stream.hold_policy,  # type: ignore[arg-type]
        hold_ns=hold.hold_ns,
        configured_hold_ns=stream.hold_ns,
        history=[
            HoldDecisionPublic(
                at_ns=w.decision.at_ns,
                action=w.decision.action.value,
                late_fraction=w.decision.late_fraction,
                delay_estimate_ns=w.decision.delay_estimate_ns,
                bounds_ns=w.decision.bounds_ns,
                extra_hold_ns=w.decision.extra_hold_ns,
                hold_ns=w.decision.hold_ns,
                reporters=w.reporters,
                count=w.count,
            )
            for w in hold.history
        ],
    )


emulation_router = APIRouter(prefix="/v1/emulation", tags=["emulation"])


@emulation_router.get(
    "/link-model", response_model=dict[str, Any] | None, summary="Link model in the plans"
)
async def get_link_model(planner: PlannerDep, _: AdminDep) -> dict[str, Any] | None:
    return planner.link_model


@emulation_router.put(
    "/link-model",
    response_model=dict[str, Any] | None,
    summary="Emulation only: set the link model every plan carries (null: off), e.g. a step "
    "change in delays; not stored across restarts (the setting JASPER_LINK_MODEL is)",
)
async def put_link_model(
    body: Annotated[dict[str, Any] | None, Body()], planner: PlannerDep, _: AdminDep
) -> dict[str, Any] | None:
    planner.set_link_model(body)
    return planner.link_model


latency_router = APIRouter(prefix="/v1/latency", tags=["tree"])


@latency_router.get("", response_model=list[LinkPublic], summary="Measured latency matrix")
async def latency(planner: PlannerDep, _: AdminDep) -> list[LinkPublic]:
    return [
        LinkPublic(src=src, dst=dst, owd_ns=s.owd_ns, jitter_ns=s.jitter_ns, samples=s.samples)
        for (src, dst), s in sorted(planner.matrix.items())
    ]
