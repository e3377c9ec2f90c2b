"""App factory: builds the FastAPI service from settings; nothing connects at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from controller import store
from controller.errors import ApiError
from controller.keys import KeyPhase
from controller.limits import AuthFailureLimit, BodyLimit, StrictJson, validation_error
from controller.metrics import ControllerMetrics
from controller.node_metrics import NodeCollector, fleet_view
from controller.planner import Planner
from controller.routers import (
    dashboard,
    health,
    join_tokens,
    mps,
    nodes,
    streams,
    subscriptions,
    tree,
)
from controller.settings import Settings
from controller.store import Database

log = logging.getLogger("jasper.controller")


def _state_gauges(planner: Planner) -> dict[str, list[tuple[dict[str, str], float]]]:
    db = planner.database.conn
    node_counts: dict[tuple[str, str], int] = {}
    for n in store.list_nodes(db=db):
        key = (n.role, "alive" if n.alive else "dead")
        node_counts[key] = node_counts.get(key, 0) + 1
    subs: dict[int, int] = {}
    for s in store.list_subscriptions(db=db):
        subs[s.stream_id] = subs.get(s.stream_id, 0) + 1
    out: dict[str, list[tuple[dict[str, str], float]]] = {
        "jasper_nodes": [
            ({"role": r, "state": st}, float(c)) for (r, st), c in sorted(node_counts.items())
        ],
        "jasper_subscriptions": [({"stream": str(k)}, float(v)) for k, v in sorted(subs.items())],
        "jasper_config_version": [({}, float(planner.version))],
        "jasper_plan_epoch": [],
        "jasper_plan_pending": [],
        "jasper_predicted_oml_seconds": [],
        # Key epochs only (never key material): which epoch signs, and whether a rotation runs.
        "jasper_key_sign_epoch": [],
        "jasper_key_rotating": [],
    }
    for sid, plans in sorted(planner.plans.items()):
        label = {"stream": str(sid)}
        out["jasper_plan_epoch"].append((label, float(plans.active.epoch)))
        out["jasper_plan_pending"].append((label, float(plans.pending is not None)))
        out["jasper_predicted_oml_seconds"].append((label, planner.prediction(sid).oml_ns / 1e9))
    for sid, ring in sorted(planner.keys.items()):
        label = {"stream": str(sid)}
        out["jasper_key_sign_epoch"].append((label, float(ring.sign_epoch)))
        out["jasper_key_rotating"].append((label, float(ring.phase is not KeyPhase.STEADY)))
    return out


async def _monitor(planner: Planner, interval_s: float) -> None:
    """Declares silent nodes dead and completes plan switches and key rotations, forever."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            planner.flush_telemetry()
            planner.check_liveness()
            planner.check_switches()
            planner.check_keys()
            planner.check_sessions()
            planner.check_holds()
        except Exception:  # a bad tick must not end monitoring for good
            log.exception("monitor tick failed")


def create_app(settings: Settings) -> FastAPI:
    """The controller app; the database opens when the app starts (lifespan), not here."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(settings.db_path)
        metrics = ControllerMetrics()
        planner = Planner(database=database, settings=settings, metrics=metrics)
        planner.load()
        metrics.watch(lambda: _state_gauges(planner))
        metrics.registry.register(
            NodeCollector(
                lambda: fleet_view(planner), endpoint_series=settings.metrics_endpoint_series
            )
        )
        app.state.planner = planner
        app.state.metrics = metrics
        task = asyncio.create_task(_monitor(planner, settings.monitor_interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            planner.flush_telemetry()
            database.close()

    app = FastAPI(
        title="Jasper controller",
        version="1",
        description=(
            "Market participants subscribe to market-data streams; the controller plans the "
            "relay tree from measured latencies and hands every node its config."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings

    # Innermost first: strict JSON inside the body limit inside the failed-auth limit.
    app.add_middleware(StrictJson)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        AuthFailureLimit,
        burst=settings.auth_failure_burst,
        per_s=settings.auth_failure_per_s,
        clients=settings.auth_failure_clients,
    )
    app.add_exception_handler(RequestValidationError, validation_error)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail()}, status_code=exc.status)

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        return response

    for module in (nodes, join_tokens, streams, tree, mps, subscriptions, health, dashboard):
        app.include_router(module.router)
    app.include_router(tree.latency_router)
    app.include_router(tree.emulation_router)
    return app
