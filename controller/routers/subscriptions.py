"""Subscriptions: an MP asks for a stream at one of its endpoints; it sees only its own."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from controller import store
from controller.deliver import check_target, parse_target
from controller.deps import DbDep, MpDep, MpOrAdminDep, PlannerDep, SettingsDep
from controller.errors import Forbidden, NotFound, Unprocessable
from controller.planner import Planner, endpoint_key
from controller.schemas import EndpointAddr, SubscriptionCreate, SubscriptionPublic
from controller.store import SubscriptionRow

router = APIRouter(prefix="/v1/subscriptions", tags=["subscriptions"])

SubPath = Annotated[int, Path(ge=0, le=2**62, description="Subscription id")]


def public(sub: SubscriptionRow, planner: Planner) -> SubscriptionPublic:
    parents: list[str] = []
    plans = planner.plans.get(sub.stream_id)
    key = endpoint_key(sub.id)
    if plans is not None and key in plans.active.where:
        parents = list(plans.active.parents(key))
    return SubscriptionPublic(
        id=sub.id,
        mp_id=sub.mp_id,
        stream_id=sub.stream_id,
        endpoint=EndpointAddr(addr=sub.addr, port=sub.port),  # type: ignore[arg-type]
        host=sub.host,
        deliver=sub.deliver,
        parents=parents,
    )


@router.post(
    "",
    response_model=SubscriptionPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Subscribe; repeating an identical request returns the same subscription (200)",
    responses={200: {"model": SubscriptionPublic, "description": "Already subscribed"}},
)
async def subscribe(
    body: SubscriptionCreate,
    response: Response,
    planner: PlannerDep,
    db: DbDep,
    settings: SettingsDep,
    mp: MpDep,
) -> SubscriptionPublic:
    if body.deliver is not None:
        why = check_target(
            parse_target(body.deliver),
            mp_id=mp.id,
            endpoint_addr=str(body.endpoint.addr),
            folder=settings.mp_deliver_dir,
            nodes=store.list_nodes(db=db),
            subscriptions=store.list_subscriptions(db=db),
        )
        if why is not None:
            raise Unprocessable(why, field=("body", "deliver"))
    sub, created = planner.subscribe(
        mp_id=mp.id,
        stream_id=body.stream_id,
        addr=str(body.endpoint.addr),
        port=body.endpoint.port,
        deliver=body.deliver,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return public(sub, planner)


@router.get("", response_model=list[SubscriptionPublic], summary="Own subscriptions (all: admin)")
async def list_subscriptions(
    db: DbDep, planner: PlannerDep, who: MpOrAdminDep
) -> list[SubscriptionPublic]:
    mp_id = who.mp.id if who.mp is not None else None
    return [public(s, planner) for s in store.list_subscriptions(db=db, mp_id=mp_id)]


def _owned(db: DbDep, sub_id: int, who: MpOrAdminDep) -> SubscriptionRow:
    sub = store.get_subscription(db=db, sub_id=sub_id)
    if sub is None:
        raise NotFound(f"subscription {sub_id} not found")
    if who.mp is not None and sub.mp_id != who.mp.id:
        raise Forbidden("this subscription belongs to another MP")
    return sub


@router.get("/{sub_id}", response_model=SubscriptionPublic, summary="One subscription")
async def get_subscription(
    sub_id: SubPath, db: DbDep, planner: PlannerDep, who: MpOrAdminDep
) -> SubscriptionPublic:
    return public(_owned(db, sub_id, who), planner)


@router.delete(
    "/{sub_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Unsubscribe",
    response_class=Response,
)
async def delete_subscription(
    sub_id: SubPath, db: DbDep, planner: PlannerDep, who: MpOrAdminDep
) -> Response:
    planner.unsubscribe(_owned(db, sub_id, who))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
