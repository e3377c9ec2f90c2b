"""Dependencies of the routes: settings, planner, database, and who is calling.

All are `async def` on purpose: they then run on the event loop thread, like the routes,
so the one SQLite connection is never used from two threads at once.
"""

from __future__ import annotations

import hmac
import sqlite3
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller import store
from controller.planner import Planner, hash_token
from controller.settings import Settings
from controller.store import MpRow


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_planner(request: Request) -> Planner:
    planner: Planner = request.app.state.planner
    return planner


async def get_db(request: Request) -> sqlite3.Connection:
    """Read-only use: writes go through the planner, which owns transactions."""
    planner: Planner = request.app.state.planner
    return planner.database.conn


SettingsDep = Annotated[Settings, Depends(get_settings)]
PlannerDep = Annotated[Planner, Depends(get_planner)]
DbDep = Annotated[sqlite3.Connection, Depends(get_db)]

bearer = HTTPBearer(auto_error=False, description="Admin, node or MP token")


@dataclass(frozen=True)
class Principal:
    """Who sent the request."""

    kind: Literal["admin", "node", "mp"]
    mp: MpRow | None = None
    nodes: tuple[str, ...] | None = None
    """Node names a node credential speaks for; None: any (admin, legacy shared token)."""

    def may_act_as(self, node: str) -> bool:
        if self.kind == "admin":
            return True
        return self.kind == "node" and (self.nodes is None or node in self.nodes)


def _unauthorized(msg: str) -> HTTPException:
    return HTTPException(401, msg, headers={"WWW-Authenticate": "Bearer"})


async def get_principal(
    settings: SettingsDep,
    db: DbDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if creds is None or not creds.credentials:
        raise _unauthorized("missing bearer token")
    token = creds.credentials
    if hmac.compare_digest(token.encode(), settings.admin_token.get_secret_value().encode()):
        return Principal("admin")
    legacy = settings.node_token
    if legacy is not None and hmac.compare_digest(
        token.encode(), legacy.get_secret_value().encode()
    ):
        return Principal("node")
    nodes = store.nodes_of_credential(db=db, token_hash=hash_token(token))
    if nodes is not None:
        return Principal("node", nodes=nodes)
    mp = store.mp_by_token_hash(db=db, token_hash=hash_token(token))
    if mp is not None:
        return Principal("mp", mp)
    raise _unauthorized("unknown token")


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_admin(who: PrincipalDep) -> Principal:
    if who.kind != "admin":
        raise HTTPException(403, "admin token required")
    return who


async def require_node(who: PrincipalDep) -> Principal:
    if who.kind not in ("admin", "node"):
        raise HTTPException(403, "node credential required")
    return who


def require_self(who: Principal, node: str) -> None:
    """403 unless `who` may act as node `node` (its own credential, or the admin)."""
    if not who.may_act_as(node):
        if who.kind != "node":
            raise HTTPException(403, "node credential required")
        mine = ", ".join(repr(n) for n in who.nodes or ())
        raise HTTPException(
            403,
            f"this node credential speaks for {mine}, not {node!r}: a node acts only as itself",
        )


async def require_mp(who: PrincipalDep) -> MpRow:
    if who.mp is None:
        raise HTTPException(403, "an MP token is required")
    return who.mp


async def require_mp_or_admin(who: PrincipalDep) -> Principal:
    if who.kind == "node":
        raise HTTPException(403, "MP or admin token required")
    return who


AdminDep = Annotated[Principal, Depends(require_admin)]
NodeAuthDep = Annotated[Principal, Depends(require_node)]
MpDep = Annotated[MpRow, Depends(require_mp)]
MpOrAdminDep = Annotated[Principal, Depends(require_mp_or_admin)]
