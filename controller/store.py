"""Persistence: the SQLite schema and every query the controller runs (portable SQL)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from controller.files import prepare_database

# Plain SQL that PostgreSQL also accepts (INTEGER PRIMARY KEY becomes a sequence there, "?"
# placeholders become "%s"); no SQLite-only types or AUTOINCREMENT.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS nodes (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        data_addr TEXT NOT NULL,
        port INTEGER NOT NULL,
        capacity INTEGER NOT NULL,
        probe_port INTEGER,
        alive INTEGER NOT NULL,
        registered_ns BIGINT NOT NULL,
        applied_version INTEGER NOT NULL DEFAULT 0,
        clock TEXT,
        status TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS streams (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        rate_hint REAL NOT NULL,
        hedge INTEGER NOT NULL,
        fanout INTEGER NOT NULL,
        depth INTEGER,
        hold_ns BIGINT NOT NULL,
        hold_policy TEXT NOT NULL,
        publisher TEXT,
        created_ns BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS mps (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        created_ns BIGINT NOT NULL
    )""",
    # Node credentials (docs/security-nodes.md): one-time join tokens an admin issues for a
    # set of node names, and the long-lived credential a node enrols for with one. Hashes only.
    """CREATE TABLE IF NOT EXISTS join_tokens (
        token_hash TEXT PRIMARY KEY,
        nodes TEXT NOT NULL,
        created_ns BIGINT NOT NULL,
        expires_ns BIGINT NOT NULL,
        used_ns BIGINT
    )""",
    """CREATE TABLE IF NOT EXISTS node_credentials (
        id INTEGER PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        created_ns BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS node_credential_names (
        node_name TEXT PRIMARY KEY,
        credential_id INTEGER NOT NULL REFERENCES node_credentials(id)
    )""",
    """CREATE TABLE IF NOT EXISTS subscriptions (
        id INTEGER PRIMARY KEY,
        mp_id INTEGER NOT NULL REFERENCES mps(id),
        stream_id INTEGER NOT NULL REFERENCES streams(id),
        addr TEXT NOT NULL,
        port INTEGER NOT NULL,
        host TEXT NOT NULL,
        deliver TEXT,
        created_ns BIGINT NOT NULL,
        UNIQUE (stream_id, addr, port)
    )""",
    """CREATE TABLE IF NOT EXISTS plans (
        stream_id INTEGER NOT NULL REFERENCES streams(id),
        state TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        doc TEXT NOT NULL,
        created_ns BIGINT NOT NULL,
        PRIMARY KEY (stream_id, state)
    )""",
    """CREATE TABLE IF NOT EXISTS plan_leaves (
        stream_id INTEGER NOT NULL,
        state TEXT NOT NULL,
        subscription_id INTEGER NOT NULL,
        slot TEXT NOT NULL,
        PRIMARY KEY (stream_id, state, subscription_id)
    )""",
    """CREATE TABLE IF NOT EXISTS latency (
        src TEXT NOT NULL,
        dst TEXT NOT NULL,
        owd_ns BIGINT NOT NULL,
        jitter_ns BIGINT NOT NULL,
        samples INTEGER NOT NULL,
        updated_ns BIGINT NOT NULL,
        PRIMARY KEY (src, dst)
    )""",
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    )""",
    # Stream MAC keys (docs/security-keys.md): one row per valid epoch, the secret as hex;
    # `signing` marks the epoch the publisher signs with.
    """CREATE TABLE IF NOT EXISTS stream_keys (
        stream_id INTEGER NOT NULL REFERENCES streams(id),
        epoch BIGINT NOT NULL,
        secret TEXT NOT NULL,
        signing INTEGER NOT NULL,
        created_ns BIGINT NOT NULL,
        PRIMARY KEY (stream_id, epoch)
    )""",
)


class Database:
    """One SQLite connection in WAL mode, opened by the app's lifespan (never at import).

    The controller's routes run on one event loop thread and never await inside a
    transaction, so a single connection serialises writers without locks of our own.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        prepare_database(path)  # 0600 before SQLite creates it (0644) or its -wal/-shm
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        if path != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the API answers, even if the machine dies next.
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as db:
            for stmt in SCHEMA:
                db.execute(stmt)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN ... COMMIT, or ROLLBACK when the block raises."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


# --- rows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRow:
    name: str
    role: str
    data_addr: str
    port: int
    capacity: int
    probe_port: int | None
    alive: bool
    registered_ns: int
    applied_version: int
    clock: dict[str, Any] | None
    status: dict[str, Any] | None


@dataclass(frozen=True)
class StreamRow:
    id: int
    name: str
    rate_hint: float
    hedge: int
    fanout: int
    hold_ns: int
    hold_policy: str
    publisher: str | None
    depth: int | None = None


@dataclass(frozen=True)
class MpRow:
    id: int
    name: str
    created_ns: int


@dataclass(frozen=True)
class SubscriptionRow:
    id: int
    mp_id: int
    stream_id: int
    addr: str
    port: int
    host: str
    deliver: str | None
    created_ns: int


def _node(r: sqlite3.Row) -> NodeRow:
    return NodeRow(
        name=r["name"],
        role=r["role"],
        data_addr=r["data_addr"],
        port=r["port"],
        capacity=r["capacity"],
        probe_port=r["probe_port"],
        alive=bool(r["alive"]),
        registered_ns=r["registered_ns"],
        applied_version=r["applied_version"],
        clock=json.loads(r["clock"]) if r["clock"] else None,
        status=json.loads(r["status"]) if r["status"] else None,
    )


def _stream(r: sqlite3.Row) -> StreamRow:
    return StreamRow(**{k: r[k] for k in StreamRow.__dataclass_fields__})


def _sub(r: sqlite3.Row) -> SubscriptionRow:
    return SubscriptionRow(**{k: r[k] for k in SubscriptionRow.__dataclass_fields__})


# --- nodes ---------------------------------------------------------------------------------


def upsert_node(
    *,
    db: sqlite3.Connection,
    name: str,
    role: str,
    data_addr: str,
    port: int,
    capacity: int,
    probe_port: int | None,
    now_ns: int,
) -> NodeRow:
    db.execute(
        """INSERT INTO nodes (name, role, data_addr, port, capacity, probe_port, alive,
                              registered_ns)
           VALUES (?, ?, ?, ?, ?, ?, 1, ?)
           ON CONFLICT (name) DO UPDATE SET role = excluded.role,
               data_addr = excluded.data_addr, port = excluded.port,
               capacity = excluded.capacity, probe_port = excluded.probe_port, alive = 1""",
        (name, role, data_addr, port, capacity, probe_port, now_ns),
    )
    node = get_node(db=db, name=name)
    assert node is not None
    return node


_NODE_FIELDS = (
    "name, role, data_addr, port, capacity, probe_port, alive, registered_ns, applied_version"
)


def get_node(*, db: sqlite3.Connection, name: str, telemetry: bool = True) -> NodeRow | None:
    """One node; without `telemetry` its stored clock and status are not read (None)."""
    blobs = "clock, status" if telemetry else "NULL AS clock, NULL AS status"
    r = db.execute(f"SELECT {_NODE_FIELDS}, {blobs} FROM nodes WHERE name = ?", (name,)).fetchone()
    return _node(r) if r else None


def list_nodes(*, db: sqlite3.Connection, telemetry: bool = False) -> list[NodeRow]:
    """Every node by name. Their stored clock and status (JSON, the last heartbeat's) are read
    only with `telemetry`, else None: the planner calls this on every config poll and monitor
    tick, and decoding 130 receivers' status documents each time was ~40% of the controller's
    CPU in the 1,000-endpoint emulation (py-spy)."""
    blobs = "clock, status" if telemetry else "NULL AS clock, NULL AS status"
    rows = db.execute(f"SELECT {_NODE_FIELDS}, {blobs} FROM nodes ORDER BY name")
    return [_node(r) for r in rows]


def set_node_alive(*, db: sqlite3.Connection, name: str, alive: bool) -> None:
    db.execute("UPDATE nodes SET alive = ? WHERE name = ?", (int(alive), name))


def record_heartbeat(
    *,
    db: sqlite3.Connection,
    name: str,
    applied_version: int,
    clock: dict[str, Any],
    status: dict[str, Any],
) -> None:
    db.execute(
        "UPDATE nodes SET applied_version = ?, clock = ?, status = ? WHERE name = ?",
        (applied_version, json.dumps(clock), json.dumps(status), name),
    )


def delete_node(*, db: sqlite3.Connection, name: str) -> None:
    db.execute("DELETE FROM nodes WHERE name = ?", (name,))


# --- latency -------------------------------------------------------------------------------


def upsert_latency(
    *,
    db: sqlite3.Connection,
    src: str,
    dst: str,
    owd_ns: int,
    jitter_ns: int,
    samples: int,
    now_ns: int,
) -> None:
    db.execute(
        """INSERT INTO latency (src, dst, owd_ns, jitter_ns, samples, updated_ns)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (src, dst) DO UPDATE SET owd_ns = excluded.owd_ns,
               jitter_ns = excluded.jitter_ns, samples = excluded.samples,
               updated_ns = excluded.updated_ns""",
        (src, dst, owd_ns, jitter_ns, samples, now_ns),
    )


def list_latency(*, db: sqlite3.Connection) -> list[tuple[str, str, int, int, int]]:
    return [
        (r["src"], r["dst"], r["owd_ns"], r["jitter_ns"], r["samples"])
        for r in db.execute("SELECT * FROM latency ORDER BY src, dst")
    ]


# --- streams -------------------------------------------------------------------------------


def insert_stream(*, db: sqlite3.Connection, row: StreamRow, now_ns: int) -> StreamRow:
    db.execute(
        """INSERT INTO streams (id, name, rate_hint, hedge, fanout, depth, hold_ns,
                                hold_policy, publisher, created_ns)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            row.id,
            row.name,
            row.rate_hint,
            row.hedge,
            row.fanout,
            row.depth,
            row.hold_ns,
            row.hold_policy,
            row.publisher,
            now_ns,
        ),
    )
    return row


def update_stream(*, db: sqlite3.Connection, row: StreamRow) -> StreamRow:
    db.execute(
        """UPDATE streams SET name = ?, rate_hint = ?, hedge = ?, fanout = ?, depth = ?,
                              hold_ns = ?, hold_policy = ?, publisher = ? WHERE id = ?""",
        (
            row.name,
            row.rate_hint,
            row.hedge,
            row.fanout,
            row.depth,
            row.hold_ns,
            row.hold_policy,
            row.publisher,
            row.id,
        ),
    )
    return row


def get_stream(*, db: sqlite3.Connection, stream_id: int) -> StreamRow | None:
    r = db.execute("SELECT * FROM streams WHERE id = ?", (stream_id,)).fetchone()
    return _stream(r) if r else None


def list_streams(*, db: sqlite3.Connection) -> list[StreamRow]:
    return [_stream(r) for r in db.execute("SELECT * FROM streams ORDER BY id")]


# --- MPs -----------------------------------------------------------------------------------


def insert_mp(*, db: sqlite3.Connection, name: str, token_hash: str, now_ns: int) -> MpRow:
    cur = db.execute(
        "INSERT INTO mps (name, token_hash, created_ns) VALUES (?, ?, ?)",
        (name, token_hash, now_ns),
    )
    assert cur.lastrowid is not None
    return MpRow(id=cur.lastrowid, name=name, created_ns=now_ns)


def get_mp(*, db: sqlite3.Connection, mp_id: int) -> MpRow | None:
    r = db.execute("SELECT id, name, created_ns FROM mps WHERE id = ?", (mp_id,)).fetchone()
    return MpRow(id=r["id"], name=r["name"], created_ns=r["created_ns"]) if r else None


def get_mp_by_name(*, db: sqlite3.Connection, name: str) -> MpRow | None:
    r = db.execute("SELECT id, name, created_ns FROM mps WHERE name = ?", (name,)).fetchone()
    return MpRow(id=r["id"], name=r["name"], created_ns=r["created_ns"]) if r else None


def mp_by_token_hash(*, db: sqlite3.Connection, token_hash: str) -> MpRow | None:
    r = db.execute(
        "SELECT id, name, created_ns FROM mps WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    return MpRow(id=r["id"], name=r["name"], created_ns=r["created_ns"]) if r else None


def list_mps(*, db: sqlite3.Connection) -> list[MpRow]:
    return [
        MpRow(id=r["id"], name=r["name"], created_ns=r["created_ns"])
        for r in db.execute("SELECT id, name, created_ns FROM mps ORDER BY id")
    ]


# --- node credentials ----------------------------------------------------------------------


@dataclass(frozen=True)
class JoinTokenRow:
    nodes: tuple[str, ...]
    created_ns: int
    expires_ns: int
    used_ns: int | None


def insert_join_token(
    *,
    db: sqlite3.Connection,
    token_hash: str,
    nodes: tuple[str, ...],
    now_ns: int,
    expires_ns: int,
) -> JoinTokenRow:
    db.execute(
        """INSERT INTO join_tokens (token_hash, nodes, created_ns, expires_ns, used_ns)
           VALUES (?, ?, ?, ?, NULL)""",
        (token_hash, json.dumps(list(nodes)), now_ns, expires_ns),
    )
    return JoinTokenRow(nodes=nodes, created_ns=now_ns, expires_ns=expires_ns, used_ns=None)


def get_join_token(*, db: sqlite3.Connection, token_hash: str) -> JoinTokenRow | None:
    r = db.execute(
        "SELECT nodes, created_ns, expires_ns, used_ns FROM join_tokens WHERE token_hash = ?",
        (token_hash,),
    ).fetchone()
    if r is None:
        return None
    return JoinTokenRow(
        nodes=tuple(json.loads(r["nodes"])),
        created_ns=r["created_ns"],
        expires_ns=r["expires_ns"],
        used_ns=r["used_ns"],
    )


def use_join_token(*, db: sqlite3.Connection, token_hash: str, now_ns: int) -> bool:
    """Mark a join token used; False when it already was (or does not exist)."""
    cur = db.execute(
        "UPDATE join_tokens SET used_ns = ? WHERE token_hash = ? AND used_ns IS NULL",
        (now_ns, token_hash),
    )
    return cur.rowcount == 1


def insert_node_credential(
    *, db: sqlite3.Connection, token_hash: str, nodes: tuple[str, ...], now_ns: int
) -> int:
    """A credential for `nodes`; each name leaves the credential that held it before."""
    cur = db.execute(
        "INSERT INTO node_credentials (token_hash, created_ns) VALUES (?, ?)",
        (token_hash, now_ns),
    )
    assert cur.lastrowid is not None
    for name in nodes:
        revoke_node_credential(db=db, node_name=name)
        db.execute(
            "INSERT INTO node_credential_names (node_name, credential_id) VALUES (?, ?)",
            (name, cur.lastrowid),
        )
    return cur.lastrowid


def nodes_of_credential(*, db: sqlite3.Connection, token_hash: str) -> tuple[str, ...] | None:
    """The node names a credential speaks for; None for an unknown (or fully revoked) one."""
    rows = db.execute(
        """SELECT n.node_name FROM node_credentials c
           JOIN node_credential_names n ON n.credential_id = c.id
           WHERE c.token_hash = ? ORDER BY n.node_name""",
        (token_hash,),
    ).fetchall()
    return tuple(r["node_name"] for r in rows) or None


def revoke_node_credential(*, db: sqlite3.Connection, node_name: str) -> bool:
    """Take `node_name` from its credential (dropped once it speaks for no node)."""
    r = db.execute(
        "SELECT credential_id FROM node_credential_names WHERE node_name = ?", (node_name,)
    ).fetchone()
    if r is None:
        return False
    db.execute("DELETE FROM node_credential_names WHERE node_name = ?", (node_name,))
    db.execute(
        """DELETE FROM node_credentials WHERE id = ? AND NOT EXISTS
           (SELECT 1 FROM node_credential_names WHERE credential_id = ?)""",
        (r["credential_id"], r["credential_id"]),
    )
    return True


def purge_join_tokens(*, db: sqlite3.Connection, expired_before_ns: int) -> int:
    """Forget unused join tokens that expired before then (kept a while, so a late one is told
    "expired"). Used ones stay, so a replay is told "already used" and seeding the same token
    again (the controller's boot seeds) never revives it."""
    cur = db.execute(
        "DELETE FROM join_tokens WHERE expires_ns < ? AND used_ns IS NULL", (expired_before_ns,)
    )
    return cur.rowcount


# --- subscriptions -------------------------------------------------------------------------


def insert_subscription(
    *,
    db: sqlite3.Connection,
    mp_id: int,
    stream_id: int,
    addr: str,
    port: int,
    host: str,
    deliver: str | None,
    now_ns: int,
) -> SubscriptionRow:
    cur = db.execute(
        """INSERT INTO subscriptions (mp_id, stream_id, addr, port, host, deliver, created_ns)
           VALUES (?, ?, ?, ?, ?, ?, ?)""",
        (mp_id, stream_id, addr, port, host, deliver, now_ns),
    )
    assert cur.lastrowid is not None
    return SubscriptionRow(cur.lastrowid, mp_id, stream_id, addr, port, host, deliver, now_ns)


def get_subscription(*, db: sqlite3.Connection, sub_id: int) -> SubscriptionRow | None:
    r = db.execute("SELECT * FROM subscriptions WHERE id = ?", (sub_id,)).fetchone()
    return _sub(r) if r else None


def subscription_at(
    *, db: sqlite3.Connection, stream_id: int, addr: str, port: int
) -> SubscriptionRow | None:
    r = db.execute(
        "SELECT * FROM subscriptions WHERE stream_id = ? AND addr = ? AND port = ?",
        (stream_id, addr, port),
    ).fetchone()
    return _sub(r) if r else None


def list_subscriptions(
    *, db: sqlite3.Connection, mp_id: int | None = None, stream_id: int | None = None
) -> list[SubscriptionRow]:
    sql, args = "SELECT * FROM subscriptions WHERE 1 = 1", list[int]()
    if mp_id is not None:
        sql, args = sql + " AND mp_id = ?", [*args, mp_id]
    if stream_id is not None:
        sql, args = sql + " AND stream_id = ?", [*args, stream_id]
    return [_sub(r) for r in db.execute(sql + " ORDER BY id", args)]


def delete_stream(*, db: sqlite3.Connection, stream_id: int, meta_keys: tuple[str, ...]) -> int:
    """Delete a stream with its subscriptions, plans, keys and `meta_keys` rows; the number of
    subscriptions that went with it."""
    subs = db.execute("DELETE FROM subscriptions WHERE stream_id = ?", (stream_id,)).rowcount
    for table in ("plan_leaves", "plans", "stream_keys"):
        db.execute(f"DELETE FROM {table} WHERE stream_id = ?", (stream_id,))
    db.executemany("DELETE FROM meta WHERE key = ?", [(k,) for k in meta_keys])
    db.execute("DELETE FROM streams WHERE id = ?", (stream_id,))
    return int(subs)


def delete_subscription(*, db: sqlite3.Connection, sub_id: int) -> None:
    db.execute("DELETE FROM plan_leaves WHERE subscription_id = ?", (sub_id,))
    db.execute("DELETE FROM subscriptions WHERE id = ?", (sub_id,))


# --- plans ---------------------------------------------------------------------------------


def save_plan(
    *,
    db: sqlite3.Connection,
    stream_id: int,
    state: str,
    epoch: int,
    doc: dict[str, Any],
    leaves: dict[int, str],
    now_ns: int,
) -> None:
    """Replace the plan of `stream_id` in `state` ("active" or "pending") with its leaves."""
    db.execute("DELETE FROM plans WHERE stream_id = ? AND state = ?", (stream_id, state))
    db.execute("DELETE FROM plan_leaves WHERE stream_id = ? AND state = ?", (stream_id, state))
    db.execute(
        "INSERT INTO plans (stream_id, state, epoch, doc, created_ns) VALUES (?, ?, ?, ?, ?)",
        (stream_id, state, epoch, json.dumps(doc), now_ns),
    )
    db.executemany(
        "INSERT INTO plan_leaves (stream_id, state, subscription_id, slot) VALUES (?, ?, ?, ?)",
        [(stream_id, state, sub_id, slot) for sub_id, slot in leaves.items()],
    )


def drop_plan(*, db: sqlite3.Connection, stream_id: int, state: str) -> None:
    db.execute("DELETE FROM plans WHERE stream_id = ? AND state = ?", (stream_id, state))
    db.execute("DELETE FROM plan_leaves WHERE stream_id = ? AND state = ?", (stream_id, state))


def set_leaf(*, db: sqlite3.Connection, stream_id: int, state: str, sub_id: int, slot: str) -> None:
    db.execute(
        """INSERT INTO plan_leaves (stream_id, state, subscription_id, slot) VALUES (?, ?, ?, ?)
           ON CONFLICT (stream_id, state, subscription_id) DO UPDATE SET slot = excluded.slot""",
        (stream_id, state, sub_id, slot),
    )


def load_plans(
    *, db: sqlite3.Connection
) -> list[tuple[int, str, int, dict[str, Any], dict[int, str]]]:
    """(stream_id, state, epoch, doc, {subscription id: slot}) for every stored plan."""
    out = []
    for r in db.execute("SELECT * FROM plans ORDER BY stream_id, state"):
        leaves = {
            lr["subscription_id"]: lr["slot"]
            for lr in db.execute(
                "SELECT subscription_id, slot FROM plan_leaves WHERE stream_id = ? AND state = ?",
                (r["stream_id"], r["state"]),
            )
        }
        out.append((r["stream_id"], r["state"], r["epoch"], json.loads(r["doc"]), leaves))
    return out


# --- meta ----------------------------------------------------------------------------------


def get_meta(*, db: sqlite3.Connection, key: str, default: int = 0) -> int:
    r = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(r["value"]) if r else default


def set_meta(*, db: sqlite3.Connection, key: str, value: int) -> None:
    db.execute(
        """INSERT INTO meta (key, value) VALUES (?, ?)
           ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
        (key, value),
    )


# --- stream keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamKeyRow:
    stream_id: int
    epoch: int
    secret: bytes = field(repr=False)  # never printed into a log
    signing: bool
    created_ns: int


def insert_stream_key(
    *,
    db: sqlite3.Connection,
    stream_id: int,
    epoch: int,
    secret: bytes,
    signing: bool,
    now_ns: int,
) -> None:
    db.execute(
        """INSERT INTO stream_keys (stream_id, epoch, secret, signing, created_ns)
           VALUES (?, ?, ?, ?, ?)""",
        (stream_id, epoch, secret.hex(), int(signing), now_ns),
    )


def list_stream_keys(*, db: sqlite3.Connection, stream_id: int | None = None) -> list[StreamKeyRow]:
    """Valid key epochs by stream, then epoch; of one stream with `stream_id`."""
    sql, args = "SELECT * FROM stream_keys", list[int]()
    if stream_id is not None:
        sql, args = sql + " WHERE stream_id = ?", [stream_id]
    return [
        StreamKeyRow(
            stream_id=r["stream_id"],
            epoch=r["epoch"],
            secret=bytes.fromhex(r["secret"]),
            signing=bool(r["signing"]),
            created_ns=r["created_ns"],
        )
        for r in db.execute(sql + " ORDER BY stream_id, epoch", args)
    ]


def set_signing_epoch(*, db: sqlite3.Connection, stream_id: int, epoch: int) -> None:
    """The publisher of `stream_id` signs with `epoch` (and no other) from now on."""
    db.execute(
        """UPDATE stream_keys SET signing = CASE WHEN epoch = ? THEN 1 ELSE 0 END
           WHERE stream_id = ?""",
        (epoch, stream_id),
    )


def delete_stream_key(*, db: sqlite3.Connection, stream_id: int, epoch: int) -> None:
    db.execute("DELETE FROM stream_keys WHERE stream_id = ? AND epoch = ?", (stream_id, epoch))
