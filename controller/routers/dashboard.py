"""Dashboard: the live operator page (static, holds no secret) and its admin-only snapshot.

The page asks for the admin token, keeps it in the tab's sessionStorage and sends it as a
Bearer header to the JSON endpoints; no token ever travels in a URL (docs/dashboard.md).
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from controller.dashboard import DashboardPublic, snapshot
from controller.deps import AdminDep, PlannerDep, SettingsDep
from controller.errors import NotFound

router = APIRouter(tags=["dashboard"])

ASSETS = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
"""The page's files (controller/static/), the only ones served."""

HEADERS = {
    # Scripts and styles from our own files only: an MP-chosen name that slipped past the
    # page's escaping still could not run.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _asset(name: str) -> Response:
    body = resources.files("controller").joinpath("static", name).read_bytes()
    return Response(body, media_type=ASSETS[name], headers=HEADERS)


@router.get("/dashboard", include_in_schema=False)
async def page() -> Response:
    return _asset("dashboard.html")


@router.get("/dashboard/{name}", include_in_schema=False)
async def asset(name: Annotated[str, Path(max_length=32)]) -> Response:
    if name not in ASSETS or name == "dashboard.html":
        raise NotFound("no such dashboard file")
    return _asset(name)


@router.get(
    "/v1/dashboard",
    response_model=DashboardPublic,
    summary="Snapshot for the live dashboard: node health, lateness, recent hold windows",
)
async def get_snapshot(planner: PlannerDep, settings: SettingsDep, _: AdminDep) -> DashboardPublic:
    return snapshot(planner, endpoint_series=settings.metrics_endpoint_series)
