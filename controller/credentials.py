"""Node credentials: one-time join tokens an admin issues, and the credential a node enrols for.

The life cycle (docs/security-nodes.md): an admin issues a join token for the node names one
agent process runs; the agent presents it once and receives its own random credential; from
then on that credential may register, heartbeat and poll as those names only. The database
holds SHA-256 hashes of both, never the tokens (like MP tokens: 256-bit random strings need no
slow hash). Enrolling a name again moves it to the new credential, which revokes the old one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from controller import store
from controller.errors import ApiError
from controller.planner import hash_token, new_token
from controller.store import Database

KEEP_EXPIRED_NS = 7 * 86_400 * 10**9
"""Expired join tokens are forgotten a week after expiry; until then a late one is answered
"expired" instead of "unknown"."""


class EnrolmentRefused(ApiError):
    """A join token that cannot be used: unknown, used or expired (the caller's fault)."""

    status = 401


@dataclass(frozen=True)
class IssuedJoinToken:
    token: str
    """Shown once to the admin; only its hash is stored."""
    nodes: tuple[str, ...]
    expires_ns: int
    """Unix time, ns."""


@dataclass(frozen=True)
class EnrolledNode:
    credential: str
    """Shown once to the node; only its hash is stored."""
    nodes: tuple[str, ...]


def issue_join_token(
    database: Database, *, nodes: tuple[str, ...], ttl_s: float, now_ns: int | None = None
) -> IssuedJoinToken:
    now = time.time_ns() if now_ns is None else now_ns
    token = new_token()
    expires = now + int(ttl_s * 1e9)
    with database.transaction() as db:
        store.purge_join_tokens(db=db, expired_before_ns=now - KEEP_EXPIRED_NS)
        store.insert_join_token(
            db=db, token_hash=hash_token(token), nodes=nodes, now_ns=now, expires_ns=expires
        )
    return IssuedJoinToken(token=token, nodes=nodes, expires_ns=expires)


def seed_join_token(
    database: Database,
    *,
    token_hash: str,
    nodes: tuple[str, ...],
    ttl_s: float,
    now_ns: int | None = None,
) -> bool:
    """Store a join token made elsewhere (by Terraform), given as its SHA-256 hex digest.

    False when that hash is already stored (seeding again at every boot is harmless: a used
    token stays used).
    """
    now = time.time_ns() if now_ns is None else now_ns
    with database.transaction() as db:
        if store.get_join_token(db=db, token_hash=token_hash) is not None:
            return False
        store.insert_join_token(
            db=db,
            token_hash=token_hash,
            nodes=nodes,
            now_ns=now,
            expires_ns=now + int(ttl_s * 1e9),
        )
    return True


def enrol(database: Database, *, join_token: str, now_ns: int | None = None) -> EnrolledNode:
    """Trade a join token for a new credential; raises EnrolmentRefused saying why not."""
    now = time.time_ns() if now_ns is None else now_ns
    token_hash = hash_token(join_token)
    credential = new_token()
    with database.transaction() as db:
        row = store.get_join_token(db=db, token_hash=token_hash)
        if row is None:
            raise EnrolmentRefused("unknown join token: ask the admin for a new one")
        if row.used_ns is not None:
            raise EnrolmentRefused(
                "join token already used: a join token enrols once; ask the admin for a new "
                "one, or start the node with the credential file it was given"
            )
        if now >= row.expires_ns:
            raise EnrolmentRefused("join token expired: ask the admin for a new one")
        if not store.use_join_token(db=db, token_hash=token_hash, now_ns=now):
            raise EnrolmentRefused("join token already used")
        store.insert_node_credential(
            db=db, token_hash=hash_token(credential), nodes=row.nodes, now_ns=now
        )
    return EnrolledNode(credential=credential, nodes=row.nodes)


def nodes_of(database: Database, credential: str) -> tuple[str, ...] | None:
    """The node names `credential` may act as, or None when it is no node's credential."""
    return store.nodes_of_credential(db=database.conn, token_hash=hash_token(credential))


def revoke(database: Database, *, node: str) -> bool:
    """Take `node` from its credential; False when it had none."""
    with database.transaction() as db:
        return store.revoke_node_credential(db=db, node_name=node)
