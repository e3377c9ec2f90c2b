"""Join tokens: an admin issues one per node (or per agent process), shown once, single use."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller import credentials
from controller.deps import AdminDep, PlannerDep
from controller.schemas import JoinTokenCreate, JoinTokenCreated

router = APIRouter(prefix="/v1/join-tokens", tags=["nodes"])


@router.post(
    "",
    response_model=JoinTokenCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Issue a one-time join token for node names; the answer is the only copy",
)
async def issue(body: JoinTokenCreate, planner: PlannerDep, _: AdminDep) -> JoinTokenCreated:
    issued = credentials.issue_join_token(
        planner.database, nodes=tuple(dict.fromkeys(body.nodes)), ttl_s=body.ttl_s
    )
    return JoinTokenCreated(
        token=issued.token, nodes=list(issued.nodes), expires_at=issued.expires_ns / 1e9
    )
