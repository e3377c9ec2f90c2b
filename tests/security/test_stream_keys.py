"""Stream keys and sessions from the controller (issue 15, items 1-2): a key per stream issued
at creation, rotated make-before-break by epoch, never shown outside nodes' own configs; the
publisher session announced through the control plane, only by the stream's publisher, never
backwards."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller import store
from controller.keys import TRANSITIONS, KeyEvent, KeyPhase, RotationInProgress, StreamKeyRing
from controller.loopback import (
    DaemonSet,
    DeliverySink,
    LoopbackController,
    free_udp_block,
    wait_for,
)
from controller.metrics import ControllerMetrics
from controller.planner import Planner
from controller.store import Database, StreamRow
from jasper.topology import parse_topology
from jasper.wire import StreamKey
from tests.test_controller_api import (
    ADMIN,
    NODE,
    bearer,
    client,  # noqa: F401  (fixture)
    make_settings,
    setup_world,
    sub_body,
)

HOLD_NS = 1_000_000
GRACE_NS = 2 * HOLD_NS


def key(epoch: int) -> StreamKey:
    return StreamKey(epoch, bytes([epoch]) * 32)


# --- the rotation state machine ------------------------------------------------------------


def test_key_ring_moves_through_its_phases_on_a_fake_clock() -> None:
    ring = StreamKeyRing(stream_id=1, keys=(key(1),), sign_epoch=1)
    assert ring.step(applied=True, now_ns=0, grace_ns=GRACE_NS) is None  # steady stays steady
    assert ring.rotate(bytes(32)).epoch == 2
    assert ring.phase is KeyPhase.DISTRIBUTING
    assert [k.epoch for k in ring.keys] == [1, 2] and ring.sign_epoch == 1
    with pytest.raises(RotationInProgress):
        ring.rotate(bytes(32))
    now = 1_000
    assert ring.step(applied=False, now_ns=now, grace_ns=GRACE_NS) is None
    assert ring.step(applied=True, now_ns=now, grace_ns=GRACE_NS) is KeyPhase.SIGNING
    assert ring.sign_epoch == 2 and [k.epoch for k in ring.keys] == [1, 2]
    assert ring.auth().signing_key().epoch == 2
    now += 5_000
    assert ring.step(applied=False, now_ns=now, grace_ns=GRACE_NS) is None
    assert ring.step(applied=True, now_ns=now, grace_ns=GRACE_NS) is KeyPhase.RETIRING
    assert ring.since_ns == now
    assert ring.step(applied=True, now_ns=now + GRACE_NS - 1, grace_ns=GRACE_NS) is None
    assert len(ring.keys) == 2
    assert ring.step(applied=False, now_ns=now + GRACE_NS, grace_ns=GRACE_NS) is KeyPhase.STEADY
    assert [k.epoch for k in ring.keys] == [2] and ring.sign_epoch == 2
    assert ring.rotate(bytes(32)).epoch == 3  # and the next rotation may start


def test_zero_grace_drops_the_old_key_as_soon_as_every_node_signs() -> None:
    ring = StreamKeyRing(stream_id=1, keys=(key(1),), sign_epoch=1)
    ring.rotate(bytes(32))
    ring.step(applied=True, now_ns=0, grace_ns=0)
    assert ring.step(applied=True, now_ns=0, grace_ns=0) is KeyPhase.STEADY
    assert [k.epoch for k in ring.keys] == [2]


def test_transition_table_rotates_only_when_steady() -> None:
    rotating = {phase for (phase, event) in TRANSITIONS if event is KeyEvent.ROTATE}
    assert rotating == {KeyPhase.STEADY}
    # Every phase is reachable and every phase leads on: no dead end.
    assert {to for to in TRANSITIONS.values()} == set(KeyPhase)
    assert {phase for phase, _ in TRANSITIONS} == set(KeyPhase)


def test_restored_ring_takes_its_phase_from_the_stored_keys() -> None:
    def restore(sign: int, *epochs: int) -> StreamKeyRing:
        return StreamKeyRing.restore(
            stream_id=1, keys=tuple(key(e) for e in epochs), sign_epoch=sign, version=9
        )

    assert restore(1, 1).phase is KeyPhase.STEADY
    assert restore(1, 2, 1).phase is KeyPhase.DISTRIBUTING
    assert [k.epoch for k in restore(1, 2, 1).keys] == [1, 2]
    signing = restore(2, 1, 2)
    assert signing.phase is KeyPhase.SIGNING and signing.phase_version == 9


def test_secrets_stay_out_of_reprs() -> None:
    secret = bytes(range(32))
    ring = StreamKeyRing(stream_id=1, keys=(StreamKey(1, secret),), sign_epoch=1)
    row = store.StreamKeyRow(stream_id=1, epoch=1, secret=secret, signing=True, created_ns=0)
    for text in (repr(ring), repr(row), repr(ring.auth())):
        assert secret.hex() not in text and repr(secret) not in text


# --- the planner: keys in documents, rotation driven by applied config versions ------------


class FakeClock:
    def __init__(self) -> None:
        self.now_ns = 1_000_000_000

    def __call__(self) -> int:
        return self.now_ns


class World:
    """A planner on a real database with a hand-stepped clock, two relays, one receiver host,
    a publisher and stream 1 with two subscriptions."""

    def __init__(self, path: Path, clock: FakeClock) -> None:
        self.path, self.clock = path, clock
        self.planner = self.open()
        p = self.planner
        for i in range(2):
            p.register_node(
                name=f"relay{i}",
                role="relay",
                data_addr="127.0.0.1",
                port=7000 + i,
                capacity=1,
                probe_port=None,
            )
        p.register_node(
            name="rx0", role="receiver", data_addr="127.0.0.1", port=7100, capacity=10,
            probe_port=None,
        )  # fmt: skip
        p.register_node(
            name="pub", role="publisher", data_addr="127.0.0.1", port=6000, capacity=1,
            probe_port=None,
        )  # fmt: skip
        p.create_stream(
            StreamRow(
                id=1, name="md", rate_hint=100.0, hedge=1, fanout=2, hold_ns=HOLD_NS,
                hold_policy="fixed", publisher="pub",
            )
        )  # fmt: skip
        mp, _ = p.create_mp("alpha")
        for port in (7100, 7101):
            p.subscribe(mp_id=mp.id, stream_id=1, addr="127.0.0.1", port=port, deliver=None)

    def open(self) -> Planner:
        planner = Planner(
            database=Database(str(self.path)),
            settings=make_settings(self.path.parent),
            metrics=ControllerMetrics(),
            clock_ns=self.clock,
        )
        planner.load()
        return planner

    def restart(self) -> Planner:
        self.planner.database.close()
        self.planner = self.open()
        return self.planner

    @property
    def nodes(self) -> list[str]:
        return ["relay0", "relay1", "rx0", "pub"]

    def beat(self, name: str, version: int, **status: float) -> None:
        self.planner.heartbeat(
            name=name,
            applied_version=version,
            clock={},
            status=dict(status),
            latency=[],
            dead_neighbours=[],
        )

    def auth(self, name: str) -> dict[str, Any]:
        """The stream section of the node's config, checked by the node-side parser."""
        (_, _, doc), *_ = self.planner.node_streams(name)
        topo = parse_topology(doc)
        assert topo.stream.auth is not None
        stream: dict[str, Any] = doc["stream"]
        if "x-previous" in doc:
            assert doc["x-previous"]["stream"]["auth"] == stream["auth"]
        return stream


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "c.db", FakeClock())
    try:
        yield w
    finally:
        w.planner.database.close()


def epochs(stream: dict[str, Any]) -> tuple[list[int], int]:
    return [k["epoch"] for k in stream["auth"]["keys"]], stream["auth"]["sign_epoch"]


def test_every_document_carries_the_streams_key(world: World) -> None:
    p = world.planner
    ring = p.keys[1]
    assert [k.epoch for k in ring.keys] == [1] and len(ring.keys[0].key) == 32
    for name in world.nodes:
        stream = world.auth(name)
        assert stream["auth"] == {"keys": [{"epoch": 1, "key": ring.keys[0].key.hex()}],
                                  "sign_epoch": 1}  # fmt: skip
    rows = store.list_stream_keys(db=p.database.conn, stream_id=1)
    assert [(r.epoch, r.secret, r.signing) for r in rows] == [(1, ring.keys[0].key, True)]
    # A second stream gets its own key.
    p.create_stream(
        StreamRow(id=2, name="b", rate_hint=1.0, hedge=0, fanout=2, hold_ns=HOLD_NS,
                  hold_policy="fixed", publisher="pub")
    )  # fmt: skip
    assert p.keys[2].keys[0].key != ring.keys[0].key


def test_rotation_is_make_before_break(world: World) -> None:
    p, clock = world.planner, world.clock
    old = p.keys[1].keys[0]
    before = p.version
    p.rotate_keys(1)
    ring = p.keys[1]
    assert ring.phase is KeyPhase.DISTRIBUTING and p.version > before
    v1 = ring.phase_version
    assert v1 == p.version
    for name in world.nodes:
        assert epochs(world.auth(name)) == ([1, 2], 1)  # both keys, still signing with 1
    with pytest.raises(Exception, match="rotation is distributing"):
        p.rotate_keys(1)

    # Every node but the receiver runs the new config: the publisher keeps signing with 1.
    for name in ("relay0", "relay1", "pub"):
        world.beat(name, v1)
    world.beat("rx0", v1 - 1)
    assert ring.phase is KeyPhase.DISTRIBUTING and p.key_waiting_for(1) == ["rx0"]
    world.beat("rx0", v1)
    assert ring.phase is KeyPhase.SIGNING
    v2 = ring.phase_version
    assert v2 > v1
    for name in world.nodes:
        assert epochs(world.auth(name)) == ([1, 2], 2)  # the publisher switches, 1 still held
    rows = store.list_stream_keys(db=p.database.conn, stream_id=1)
    assert [(r.epoch, r.signing) for r in rows] == [(1, False), (2, True)]

    # Every node runs the signing config: the grace (2 x hold) starts on the fake clock.
    for name in world.nodes:
        world.beat(name, v2)
    assert ring.phase is KeyPhase.RETIRING and ring.since_ns == clock.now_ns
    version = p.version
    clock.now_ns += GRACE_NS - 1
    assert p.check_keys() == [] and len(ring.keys) == 2 and p.version == version
    clock.now_ns += 1
    assert p.check_keys() == [(1, KeyPhase.STEADY)]
    assert p.version > version
    for name in world.nodes:
        stream = world.auth(name)
        assert epochs(stream) == ([2], 2)
        assert old.key.hex() not in json.dumps(stream)
    rows = store.list_stream_keys(db=p.database.conn, stream_id=1)
    assert [(r.epoch, r.signing) for r in rows] == [(2, True)]
    p.rotate_keys(1)
    assert [k.epoch for k in p.keys[1].keys] == [2, 3]


def test_dead_nodes_do_not_hold_a_rotation(world: World) -> None:
    p = world.planner
    p.rotate_keys(1)
    v1 = p.keys[1].phase_version
    for name in ("relay0", "relay1", "pub"):
        world.beat(name, v1)
    assert p.key_waiting_for(1) == ["rx0"]
    with p.database.transaction() as db:
        store.set_node_alive(db=db, name="rx0", alive=False)
    assert p.check_keys() == [(1, KeyPhase.SIGNING)]


def test_rotation_survives_a_restart(world: World) -> None:
    p = world.planner
    p.rotate_keys(1)
    keys = p.keys[1].keys
    p = world.restart()
    ring = p.keys[1]
    assert ring.phase is KeyPhase.DISTRIBUTING and ring.keys == keys and ring.sign_epoch == 1
    for name in world.nodes:
        world.beat(name, p.version)
    assert ring.phase is KeyPhase.SIGNING
    p = world.restart()
    ring = p.keys[1]
    assert ring.phase is KeyPhase.SIGNING and ring.sign_epoch == 2
    for name in world.nodes:
        world.beat(name, p.version)
    assert ring.phase is KeyPhase.RETIRING
    world.clock.now_ns += GRACE_NS
    p.check_keys()
    assert world.restart().keys[1].keys == keys[1:]


def test_streams_stored_without_keys_get_one_at_load(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "c.db"))
    with db.transaction() as tx:
        store.insert_stream(
            db=tx,
            row=StreamRow(id=5, name="old", rate_hint=1.0, hedge=0, fanout=2, hold_ns=HOLD_NS,
                          hold_policy="fixed", publisher=None),
            now_ns=0,
        )  # fmt: skip
        store.set_meta(db=tx, key="config_version", value=40)
    db.close()
    p = Planner(
        database=Database(str(tmp_path / "c.db")),
        settings=make_settings(tmp_path),
        metrics=ControllerMetrics(),
    )
    p.load()
    assert [k.epoch for k in p.keys[5].keys] == [1]
    assert p.version > 40  # nodes poll the documents that now carry it
    assert [r.epoch for r in store.list_stream_keys(db=p.database.conn)] == [1]
    p.database.close()


# --- sessions ------------------------------------------------------------------------------


def session_of(world: World, name: str = "rx0") -> int | None:
    (_, _, doc), *_ = world.planner.node_streams(name)
    value = doc["stream"].get("session")
    assert parse_topology(doc).stream.session == value
    return value


def test_publisher_session_is_announced_forward_only(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    p = world.planner
    assert session_of(world) is None
    version = p.version
    world.beat("pub", 0, session=1000.0, seq=5.0)
    assert p.version > version
    for name in ("relay0", "relay1", "rx0"):
        assert session_of(world, name) == 1000
    # The publisher chooses its session: a restarted one takes a new one rather than the
    # announced one, under which its sequence would start over behind the old high-water mark.
    assert session_of(world, "pub") is None
    version = p.version
    world.beat("pub", 0, session=1000.0)
    assert p.version == version  # unchanged: no new config

    # Only the stream's publisher moves it: not a relay, not another publisher node.
    p.register_node(name="pub2", role="publisher", data_addr="127.0.0.1", port=6001,
                    capacity=1, probe_port=None)  # fmt: skip
    version = p.version
    world.beat("relay0", 0, session=2000.0)
    world.beat("pub2", 0, session=2000.0)
    assert session_of(world) == 1000 and p.version == version

    # Never backwards: logged once, ignored.
    with caplog.at_level(logging.WARNING, logger="jasper.controller"):
        world.beat("pub", 0, session=999.0)
        world.beat("pub", 0, session=999.0)
    assert session_of(world) == 1000 and p.version == version
    assert len([r for r in caplog.records if "never go backwards" in r.getMessage()]) == 1

    # Not a u32: ignored.
    for bad in (float("nan"), 1000.5, -1.0, 2.0**32):
        world.beat("pub", 0, session=bad)
    assert session_of(world) == 1000

    world.beat("pub", 0, session=1001.0)
    assert session_of(world) == 1001 and p.version > version
    assert world.restart().sessions == {1: 1001}
    assert session_of(world) == 1001


def test_a_publisher_may_announce_its_session_when_it_registers(world: World) -> None:
    p = world.planner
    p.register_node(name="pub", role="publisher", data_addr="127.0.0.1", port=6000,
                    capacity=1, probe_port=None, session=77)  # fmt: skip
    assert session_of(world) == 77
    world.beat("pub", 0, session=78.0, stream_id=2.0)  # names another stream: not this one
    assert session_of(world) == 77
    world.beat("pub", 0, session=78.0, stream_id=1.0)
    assert session_of(world) == 78


# --- the API: admin routes, and no key outside node configs --------------------------------


def node_keys(c: TestClient) -> set[str]:
    """Every key in the nodes' configs, as hex."""
    out = set()
    for name in ("relay0", "relay1", "rx0", "pub"):
        cfg = c.get(f"/v1/nodes/{name}/config?wait=0", headers=NODE).json()
        for entry in cfg["streams"]:
            docs = [entry["topology"], entry["topology"].get("x-previous") or {}]
            for doc in docs:
                for k in doc.get("stream", {}).get("auth", {}).get("keys", ()):
                    out.add(k["key"])
    return out


def forms(hex_key: str) -> list[str]:
    raw = bytes.fromhex(hex_key)
    return [hex_key, hex_key.upper(), base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="), repr(raw)]  # fmt: skip


def test_rotation_routes_are_admin_only(client: TestClient) -> None:  # noqa: F811
    alpha, _ = setup_world(client)
    r = client.get("/v1/streams/1/keys", headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["phase"] == "steady" and body["sign_epoch"] == 1
    assert body["epochs"] == [{"epoch": 1, "signing": True}] and body["session"] is None
    for who in (NODE, bearer(alpha)):
        assert client.get("/v1/streams/1/keys", headers=who).status_code == 403
        assert client.post("/v1/streams/1/keys/rotate", headers=who).status_code == 403
    assert client.post("/v1/streams/9/keys/rotate", headers=ADMIN).status_code == 404
    assert client.get("/v1/streams/9/keys", headers=ADMIN).status_code == 404
    r = client.post("/v1/streams/1/keys/rotate", headers=ADMIN)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["phase"] == "distributing" and body["sign_epoch"] == 1
    assert body["epochs"] == [{"epoch": 1, "signing": True}, {"epoch": 2, "signing": False}]
    assert "pub" in body["waiting_for"]  # no endpoint yet, so rx0 is not in the plan
    r = client.post("/v1/streams/1/keys/rotate", headers=ADMIN)
    assert r.status_code == 409 and "rotation" in r.json()["detail"]


def test_keys_appear_only_in_node_configs(
    client: TestClient,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    alpha, beta = setup_world(client)
    for i, token in enumerate((alpha, beta)):
        r = client.post("/v1/subscriptions", json=sub_body(7100 + i), headers=bearer(token))
        assert r.status_code == 201
    rotated = client.post("/v1/streams/1/keys/rotate", headers=ADMIN)
    keys = node_keys(client)
    assert len(keys) == 2  # both epochs, in node configs
    version = client.get("/v1/nodes/rx0/config?wait=0", headers=NODE).json()["version"]
    for name in ("relay0", "relay1", "relay2", "rx0", "pub"):
        client.post(f"/v1/nodes/{name}/heartbeat", json={"applied_version": version,
                    "status": {"session": 4.0}}, headers=NODE)  # fmt: skip
    reads = [
        ("GET", "/v1/streams", ADMIN),
        ("GET", "/v1/streams", bearer(alpha)),
        ("GET", "/v1/streams/1", ADMIN),
        ("GET", "/v1/streams/1", NODE),
        ("GET", "/v1/streams/1/tree", ADMIN),
        ("GET", "/v1/streams/1/tree", NODE),
        ("GET", "/v1/streams/1/tree", bearer(alpha)),
        ("GET", "/v1/streams/1/hold", ADMIN),
        ("GET", "/v1/streams/1/keys", ADMIN),
        ("POST", "/v1/streams/1/replan", ADMIN),
        ("GET", "/v1/nodes", ADMIN),
        ("GET", "/v1/nodes/pub", NODE),
        ("GET", "/v1/nodes/rx0", NODE),
        ("GET", "/v1/subscriptions", bearer(alpha)),
        ("GET", "/v1/latency", ADMIN),
        ("GET", "/v1/emulation/link-model", ADMIN),
        ("GET", "/metrics", ADMIN),
        ("GET", "/healthz", ADMIN),
        ("GET", "/openapi.json", ADMIN),
    ]
    answers = [("rotate", rotated.text)]
    for method, path, who in reads:
        r = client.request(method, path, headers=who)
        assert r.status_code < 400, (path, r.status_code, r.text)
        answers.append((path, r.text))
    metrics = client.get("/metrics").text
    assert 'jasper_key_sign_epoch{stream="1"} 2.0' in metrics  # nodes ran epoch 2: signing
    assert 'jasper_key_rotating{stream="1"} 1.0' in metrics
    tree = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    assert "auth" not in tree["topology"]["stream"]
    assert tree["topology"]["stream"]["session"] == 4  # the session is no secret
    parse_topology(tree["topology"])
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "key epoch 2 issued" in logged
    for k in keys:
        for text in forms(k):
            for path, answer in answers:
                assert text not in answer, f"key leaked in {path}"
            assert text not in logged, "key leaked into the log"
    # Still there for the nodes (epoch 2 at least, epoch 1 until the rotation is done).
    assert node_keys(client) & keys


# --- end to end: real controller, agents and daemons ---------------------------------------

RELAYS = [f"relay{i}" for i in range(3)]
ENDPOINTS = 4


def stored_keys(db_path: Path) -> set[str]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        return {row[0] for row in conn.execute("SELECT secret FROM stream_keys")}


def rejected(ctl: LoopbackController, names: list[str]) -> dict[str, float]:
    """Datagrams refused (by key epoch, MAC, session...), per node and counter."""
    out = {}
    for node in ctl.nodes():
        if node["name"] in names:
            for k, v in (node["status"] or {}).items():
                if "rejected" in k:
                    out[f"{node['name']}:{k}"] = v
    return out


@pytest.mark.slow
def test_rotation_and_session_over_real_processes(tmp_path: Path) -> None:
    db_path = tmp_path / "controller.db"
    ctl = LoopbackController(db_path=db_path)
    ctl.start()
    daemons = DaemonSet(ctl, tmp_path)
    sink = DeliverySink(ENDPOINTS)
    try:
        ctl.create_stream(1, "md", depth=1, fanout=3, hold_ns=5_000_000)
        for name in RELAYS:
            daemons.start("relay", name, "--port", str(free_udp_block(1)), "--fast-path", "user")
        base = free_udp_block(ENDPOINTS)
        daemons.start("receiver", "rx0", "--port-base", str(base), "--endpoints",
                      str(ENDPOINTS), "--fast-path", "user", "--no-realtime")  # fmt: skip
        daemons.start("publisher", "pub", "--stream", "1", "--rate", "100")
        ctl.wait_nodes({*RELAYS, "rx0", "pub"}, 60)
        _, token = ctl.create_mp("mp")
        for i in range(ENDPOINTS):
            ctl.subscribe(token, 1, "127.0.0.1", base + i, deliver=f"udp:127.0.0.1:{sink.port(i)}")
        wait_for(lambda: all(len(sink.times[i]) > 20 for i in range(ENDPOINTS)), 60, "traffic")

        # The publisher's own session, announced through the control plane.
        def announced() -> bool:
            keys = ctl.call("GET", "/v1/streams/1/keys")
            pub = next(n for n in ctl.nodes() if n["name"] == "pub")
            session = (pub["status"] or {}).get("session")
            return keys["session"] is not None and keys["session"] == session

        wait_for(announced, 30, "the publisher's session announced")

        state = ctl.call("POST", "/v1/streams/1/keys/rotate")
        assert state["phase"] == "distributing"
        both = stored_keys(db_path)
        assert len(both) == 2
        started = time.monotonic()

        def done() -> bool:
            s = ctl.call("GET", "/v1/streams/1/keys")
            return bool(s["phase"] == "steady" and s["epochs"] == [{"epoch": 2, "signing": True}])

        wait_for(done, 60, "the rotation to finish")
        assert len(stored_keys(db_path) & both) == 1
        mark = time.monotonic()
        wait_for(
            lambda: all(sink.count_between(i, mark, time.monotonic()) > 20
                        for i in range(ENDPOINTS)),
            60,
            "deliveries signed with the new key",
        )  # fmt: skip
        # Nothing was lost while switching: every endpoint kept receiving through it.
        for i in range(ENDPOINTS):
            assert sink.count_between(i, started, mark) > 0
        rx0 = next(n for n in ctl.nodes() if n["name"] == "rx0")["status"] or {}
        assert any(k.endswith(".accepted") and v > 0 for k, v in rx0.items())  # reported ...
        refused = rejected(ctl, [*RELAYS, "rx0"])
        assert not any(refused.values()), refused  # ... and nothing was refused
        # No key in any answer but node configs, nor in any file but the database.
        tree = json.dumps(ctl.tree(1))
        for path in tmp_path.rglob("*"):
            if path.is_file() and not path.name.startswith("controller.db"):
                data = path.read_bytes()
                for k in both:
                    assert k.encode() not in data, f"key in {path}"
        for k in both:
            assert k not in tree
    finally:
        daemons.stop()
        sink.close()
        ctl.close()


@pytest.mark.slow
def test_a_restarted_publisher_gets_a_new_session_announced(tmp_path: Path) -> None:
    """The publisher's config carries no session to send under, so a restarted publisher does
    not start its sequence over under the old one (every copy up to the old high-water mark
    would be dropped as a duplicate); it picks a later one, which is announced, and it sends
    only once every node runs the config that announces it: no copy is refused by session."""
    ctl = LoopbackController(db_path=tmp_path / "controller.db")
    ctl.start()
    daemons = DaemonSet(ctl, tmp_path)
    sink = DeliverySink(2)
    try:
        ctl.create_stream(1, "md", depth=1, fanout=3, hold_ns=5_000_000)
        daemons.start("relay", "relay0", "--port", str(free_udp_block(1)), "--fast-path", "user")
        base = free_udp_block(2)
        daemons.start("receiver", "rx0", "--port-base", str(base), "--endpoints", "2",
                      "--fast-path", "user", "--no-realtime")  # fmt: skip
        daemons.start("publisher", "pub", "--stream", "1", "--rate", "100")
        ctl.wait_nodes({"relay0", "rx0", "pub"}, 60)
        _, token = ctl.create_mp("mp")
        for i in range(2):
            ctl.subscribe(token, 1, "127.0.0.1", base + i, deliver=f"udp:127.0.0.1:{sink.port(i)}")

        def session() -> Any:
            return ctl.call("GET", "/v1/streams/1/keys")["session"]

        wait_for(lambda: session() is not None and len(sink.times[0]) > 200, 60, "traffic")
        first = session()
        daemons.procs["pub"].kill()
        daemons.procs["pub"].wait()
        daemons.start("publisher", "pub", "--stream", "1", "--rate", "100")
        mark = time.monotonic()
        wait_for(lambda: session() != first, 30, "the new session announced")
        assert session() > first
        wait_for(lambda: sink.count_between(0, mark, time.monotonic()) > 200, 60, "traffic")
        relay = next(n for n in ctl.nodes() if n["name"] == "relay0")["status"] or {}
        assert relay.get("nodes.relay0.duplicates", 0) == 0

        # Heartbeats carry the counters: wait for one after the traffic, then none refused.
        def rx0_status() -> Any:
            return next(n for n in ctl.nodes() if n["name"] == "rx0")["status"]

        beats = rx0_status()
        wait_for(lambda: rx0_status() != beats, 10, "a heartbeat from rx0")
        refused = rejected(ctl, ["relay0", "rx0"])
        assert not any(refused.values()), refused
    finally:
        daemons.stop()
        sink.close()
        ctl.close()
