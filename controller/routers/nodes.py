"""Nodes: agents register their VM, send heartbeats and long-poll their config."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from controller import credentials, store
from controller.deps import AdminDep, DbDep, NodeAuthDep, PlannerDep, SettingsDep, require_self
from controller.errors import NotFound
from controller.schemas import (
    Enrolment,
    Heartbeat,
    HeartbeatReply,
    NodeConfig,
    NodeCreate,
    NodeCredential,
    NodeName,
    NodePublic,
    Peer,
    StreamPlan,
)
from controller.store import NodeRow
from jasper.owd import OwdReport

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])

NamePath = Annotated[NodeName, Path(description="Node name")]


def public(node: NodeRow) -> NodePublic:
    return NodePublic(
        name=node.name,
        role=node.role,  # type: ignore[arg-type]
        data_addr=node.data_addr,
        port=node.port,
        capacity=node.capacity,
        probe_port=node.probe_port,
        alive=node.alive,
        applied_version=node.applied_version,
        clock=node.clock,
        status=node.status,
    )


@router.post("", response_model=NodePublic, summary="Register (or re-register) a node")
async def register(body: NodeCreate, planner: PlannerDep, who: NodeAuthDep) -> NodePublic:
    require_self(who, body.name)
    node = planner.register_node(
        name=body.name,
        role=body.role,
        data_addr=str(body.data_addr),
        port=body.port,
        capacity=body.capacity,
        probe_port=body.probe_port,
    )
    return public(node)


@router.post(
    "/enrol",
    response_model=NodeCredential,
    status_code=status.HTTP_201_CREATED,
    summary="Trade a one-time join token for the node's own credential (shown once)",
    responses={401: {"description": "Unknown, used or expired join token"}},
)
async def enrol(body: Enrolment, planner: PlannerDep) -> NodeCredential:
    enrolled = credentials.enrol(planner.database, join_token=body.join_token)
    return NodeCredential(credential=enrolled.credential, nodes=list(enrolled.nodes))


@router.delete(
    "/{name}/credential",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke the node's credential (it must enrol again with a new join token)",
)
async def revoke_credential(name: NamePath, planner: PlannerDep, _: AdminDep) -> None:
    if not credentials.revoke(planner.database, node=name):
        raise NotFound(f"node {name!r} has no credential")


@router.get("", response_model=list[NodePublic], summary="List nodes")
async def list_nodes(db: DbDep, planner: PlannerDep, _: AdminDep) -> list[NodePublic]:
    return [public(planner.view(n)) for n in store.list_nodes(db=db, telemetry=True)]


@router.get("/{name}", response_model=NodePublic, summary="One node")
async def get_node(name: NamePath, db: DbDep, planner: PlannerDep, who: NodeAuthDep) -> NodePublic:
    require_self(who, name)
    node = store.get_node(db=db, name=name)
    if node is None:
        raise NotFound(f"node {name!r} not found")
    return public(planner.view(node))


@router.post("/{name}/heartbeat", response_model=HeartbeatReply, summary="Heartbeat")
async def heartbeat(
    name: NamePath, body: Heartbeat, planner: PlannerDep, who: NodeAuthDep
) -> HeartbeatReply:
    require_self(who, name)
    node = planner.heartbeat(
        name=name,
        applied_version=body.applied_version,
        clock=body.clock.model_dump(),
        status=body.status,
        latency=[(p.peer, p.owd_ns, p.jitter_ns, p.samples) for p in body.latency],
        dead_neighbours=body.dead_neighbours,
        owd_reports=[OwdReport.from_dict(r.model_dump()) for r in body.owd],
    )
    return HeartbeatReply(version=planner.version, alive=node.alive)


@router.get("/{name}/config", response_model=NodeConfig, summary="Long-poll the node's config")
async def get_config(
    name: NamePath,
    planner: PlannerDep,
    settings: SettingsDep,
    who: NodeAuthDep,
    version: Annotated[
        int, Query(ge=0, le=2**62, description="Answer once the config is newer than this")
    ] = 0,
    wait: Annotated[float, Query(ge=0, le=3600, description="Longest wait, seconds")] = 25.0,
) -> NodeConfig:
    require_self(who, name)
    node = store.get_node(db=planner.database.conn, name=name, telemetry=False)
    if node is None:
        raise NotFound(f"node {name!r} is not registered")
    await planner.wait_change(version, min(wait, settings.long_poll_max_s), role=node.role)
    streams = [
        StreamPlan(stream_id=sid, plan_epoch=epoch, topology=doc)
        for sid, epoch, doc in planner.node_streams(name)
    ]
    peers = [
        Peer(name=p.name, addr=p.data_addr, probe_port=p.probe_port)
        for p in planner.peers_of(name)
        if p.probe_port is not None
    ]
    return NodeConfig(
        version=planner.version_for(node.role), node=name, streams=streams, peers=peers
    )
