"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.deps import PlannerDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the service answers and its database is readable")
async def healthz(planner: PlannerDep) -> dict[str, object]:
    planner.database.conn.execute("SELECT 1").fetchone()
    return {"status": "ok", "config_version": planner.version}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
