"""Streams: the market-data streams an exchange publishes, and their MAC keys (admin only)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Path, status

from controller import store
from controller.deps import AdminDep, DbDep, PlannerDep, PrincipalDep, SettingsDep
from controller.errors import NotFound
from controller.keys import KeyPhase
from controller.planner import Planner
from controller.schemas import (
    StreamCreate,
    StreamKeyEpochPublic,
    StreamKeysPublic,
    StreamPublic,
    StreamUpdate,
)
from controller.store import StreamRow

router = APIRouter(prefix="/v1/streams", tags=["streams"])

StreamPath = Annotated[int, Path(ge=0, le=2**32 - 1, description="Stream id")]


def public(row: StreamRow) -> StreamPublic:
    return StreamPublic(
        id=row.id,
        name=row.name,
        rate_hint=row.rate_hint,
        hedge=row.hedge,
        fanout=row.fanout,
        depth=row.depth,
        hold_ns=row.hold_ns,
        hold_policy=row.hold_policy,  # type: ignore[arg-type]
        publisher=row.publisher,
    )


@router.post("", response_model=StreamPublic, status_code=status.HTTP_201_CREATED, summary="Create")
async def create_stream(
    body: StreamCreate, planner: PlannerDep, settings: SettingsDep, _: AdminDep
) -> StreamPublic:
    row = StreamRow(
        id=body.id,
        name=body.name,
        rate_hint=body.rate_hint,
        hedge=body.hedge,
        fanout=body.fanout or settings.default_fanout,
        depth=body.depth,
        hold_ns=body.hold_ns,
        hold_policy=body.hold_policy,
        publisher=body.publisher,
    )
    return public(planner.create_stream(row))


@router.get("", response_model=list[StreamPublic], summary="List streams")
async def list_streams(db: DbDep, _: PrincipalDep) -> list[StreamPublic]:
    # Any authenticated caller may see which streams exist: MPs need it to subscribe.
    return [public(s) for s in store.list_streams(db=db)]


@router.get("/{stream_id}", response_model=StreamPublic, summary="One stream")
async def get_stream(stream_id: StreamPath, db: DbDep, _: PrincipalDep) -> StreamPublic:
    row = store.get_stream(db=db, stream_id=stream_id)
    if row is None:
        raise NotFound(f"stream {stream_id} not found")
    return public(row)


@router.patch("/{stream_id}", response_model=StreamPublic, summary="Change a stream")
async def update_stream(
    stream_id: StreamPath, body: StreamUpdate, db: DbDep, planner: PlannerDep, _: AdminDep
) -> StreamPublic:
    row = store.get_stream(db=db, stream_id=stream_id)
    if row is None:
        raise NotFound(f"stream {stream_id} not found")
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    return public(planner.update_stream(replace(row, **changes)))


@router.delete(
    "/{stream_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a stream, its subscriptions, plans and keys",
)
async def delete_stream(stream_id: StreamPath, planner: PlannerDep, _: AdminDep) -> None:
    planner.delete_stream(stream_id)


def keys_public(planner: Planner, stream_id: int) -> StreamKeysPublic:
    """The stream's key epochs and rotation phase, without the secrets."""
    ring = planner.key_ring(stream_id)
    grace_left = None
    if ring.phase is KeyPhase.RETIRING and ring.since_ns is not None:
        elapsed = planner.clock_ns() - ring.since_ns
        grace_left = max(0, planner.key_grace_ns(stream_id) - elapsed)
    return StreamKeysPublic(
        stream_id=stream_id,
        phase=ring.phase.value,
        epochs=[
            StreamKeyEpochPublic(epoch=k.epoch, signing=k.epoch == ring.sign_epoch)
            for k in ring.keys
        ],
        sign_epoch=ring.sign_epoch,
        config_version=ring.phase_version,
        waiting_for=planner.key_waiting_for(stream_id),
        grace_left_ns=grace_left,
        session=planner.sessions.get(stream_id),
    )


@router.get("/{stream_id}/keys", response_model=StreamKeysPublic, summary="Key epochs and phase")
async def get_keys(stream_id: StreamPath, planner: PlannerDep, _: AdminDep) -> StreamKeysPublic:
    return keys_public(planner, stream_id)


@router.post(
    "/{stream_id}/keys/rotate",
    response_model=StreamKeysPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Rotate the stream's MAC key (make-before-break)",
    responses={409: {"description": "A rotation of this stream is still running"}},
)
async def rotate_keys(stream_id: StreamPath, planner: PlannerDep, _: AdminDep) -> StreamKeysPublic:
    planner.rotate_keys(stream_id)
    return keys_public(planner, stream_id)
