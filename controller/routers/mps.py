"""Market participants: created by the admin, each with an API token shown once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from controller import store
from controller.deps import AdminDep, DbDep, MpOrAdminDep, PlannerDep
from controller.errors import Forbidden, NotFound
from controller.schemas import MpCreate, MpCreated, MpPublic

router = APIRouter(prefix="/v1/mps", tags=["mps"])

MpPath = Annotated[int, Path(ge=0, le=2**62, description="MP id")]


@router.post(
    "",
    response_model=MpCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an MP; the answer holds its token, which is never shown again",
)
async def create_mp(body: MpCreate, planner: PlannerDep, _: AdminDep) -> MpCreated:
    mp, token = planner.create_mp(body.name)
    return MpCreated(id=mp.id, name=mp.name, token=token)


@router.get("", response_model=list[MpPublic], summary="List MPs")
async def list_mps(db: DbDep, _: AdminDep) -> list[MpPublic]:
    return [MpPublic(id=m.id, name=m.name) for m in store.list_mps(db=db)]


@router.get("/{mp_id}", response_model=MpPublic, summary="One MP (itself, or any for admin)")
async def get_mp(mp_id: MpPath, db: DbDep, who: MpOrAdminDep) -> MpPublic:
    mp = store.get_mp(db=db, mp_id=mp_id)
    if mp is None:
        raise NotFound(f"MP {mp_id} not found")
    if who.mp is not None and who.mp.id != mp.id:
        raise Forbidden("an MP sees only itself")
    return MpPublic(id=mp.id, name=mp.name)
