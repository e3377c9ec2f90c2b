"""REST API: auth, validation, ownership, idempotency, tree, configs, liveness, switching."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.app import create_app
from controller.settings import Settings
from jasper.topology import parse_topology

ADMIN = {"Authorization": "Bearer admin-secret"}
NODE = {"Authorization": "Bearer node-secret"}


def make_settings(path: Path, **kw: Any) -> Settings:
    return Settings(
        db_path=str(path / "c.db"),
        admin_token="admin-secret",  # type: ignore[arg-type]
        node_token="node-secret",  # type: ignore[arg-type]
        **kw,
    )


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path))) as c:
        yield c


def register(c: TestClient, name: str, role: str, port: int, **kw: Any) -> dict[str, Any]:
    body = {"name": name, "role": role, "data_addr": "127.0.0.1", "port": port, **kw}
    r = c.post("/v1/nodes", json=body, headers=NODE)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def setup_world(c: TestClient, relays: int = 3, **stream: Any) -> tuple[str, str]:
    """Relays, one receiver host with 50 endpoint ports, a publisher, stream 1 (with the
    fields `stream`), two MPs."""
    for i in range(relays):
        register(c, f"relay{i}", "relay", 7000 + i)
    register(c, "rx0", "receiver", 7100, capacity=50)
    register(c, "pub", "publisher", 6000)
    body = {"id": 1, "name": "md", **stream}
    assert c.post("/v1/streams", json=body, headers=ADMIN).status_code == 201
    tokens = []
    for name in ("alpha", "beta"):
        r = c.post("/v1/mps", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201
        tokens.append(r.json()["token"])
    return tokens[0], tokens[1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sub_body(port: int, stream: int = 1) -> dict[str, Any]:
    return {"stream_id": stream, "endpoint": {"addr": "127.0.0.1", "port": port}}


# --- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nodes"),
        ("POST", "/v1/nodes"),
        ("GET", "/v1/streams"),
        ("POST", "/v1/streams"),
        ("POST", "/v1/mps"),
        ("GET", "/v1/subscriptions"),
        ("POST", "/v1/subscriptions"),
        ("GET", "/v1/streams/1/tree"),
        ("GET", "/v1/nodes/x/config"),
    ],
)
def test_no_token_is_401(client: TestClient, method: str, path: str) -> None:
    r = client.request(method, path, json={})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.request(method, path, json={}, headers=bearer("wrong"))
    assert r.status_code == 401


def test_roles_are_enforced_with_403(client: TestClient) -> None:
    alpha, _ = setup_world(client)
    assert client.get("/v1/nodes", headers=bearer(alpha)).status_code == 403
    assert client.get("/v1/nodes", headers=NODE).status_code == 403
    r = client.post("/v1/streams", json={"id": 2, "name": "x"}, headers=NODE)
    assert r.status_code == 403
    assert client.post("/v1/mps", json={"name": "m"}, headers=bearer(alpha)).status_code == 403
    # Only MPs subscribe; a node token never sees MPs' subscriptions.
    assert client.post("/v1/subscriptions", json=sub_body(7100), headers=ADMIN).status_code == 403
    assert client.get("/v1/subscriptions", headers=NODE).status_code == 403
    r = client.post(
        "/v1/nodes",
        json={"name": "n", "role": "relay", "data_addr": "127.0.0.1", "port": 1},
        headers=bearer(alpha),
    )
    assert r.status_code == 403


def test_mp_token_shown_once_and_stored_hashed(client: TestClient, tmp_path: Path) -> None:
    alpha, _ = setup_world(client)
    listed = client.get("/v1/mps", headers=ADMIN).json()
    assert all("token" not in m for m in listed)
    db = (tmp_path / "c.db").read_bytes()
    assert alpha.encode() not in db
    me = client.get("/v1/mps/1", headers=bearer(alpha))
    assert me.status_code == 200 and me.json()["name"] == "alpha"
    assert client.get("/v1/mps/2", headers=bearer(alpha)).status_code == 403
    assert client.post("/v1/mps", json={"name": "alpha"}, headers=ADMIN).status_code == 409


# --- subscriptions -------------------------------------------------------------------------


def test_subscription_ownership(client: TestClient) -> None:
    alpha, beta = setup_world(client)
    r = client.post("/v1/subscriptions", json=sub_body(7100), headers=bearer(alpha))
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sub["host"] == "rx0" and sub["parents"]
    sid = sub["id"]
    assert client.get(f"/v1/subscriptions/{sid}", headers=bearer(beta)).status_code == 403
    assert client.delete(f"/v1/subscriptions/{sid}", headers=bearer(beta)).status_code == 403
    assert client.get("/v1/subscriptions", headers=bearer(beta)).json() == []
    assert [s["id"] for s in client.get("/v1/subscriptions", headers=bearer(alpha)).json()] == [sid]
    # The same endpoint cannot be taken by another MP.
    r = client.post("/v1/subscriptions", json=sub_body(7100), headers=bearer(beta))
    assert r.status_code == 409
    assert client.get(f"/v1/subscriptions/{sid}", headers=ADMIN).status_code == 200
    assert client.delete(f"/v1/subscriptions/{sid}", headers=bearer(alpha)).status_code == 204
    assert client.get(f"/v1/subscriptions/{sid}", headers=bearer(alpha)).status_code == 404
    assert client.delete(f"/v1/subscriptions/{sid}", headers=bearer(alpha)).status_code == 404


def test_repeated_subscribe_is_idempotent(client: TestClient) -> None:
    alpha, _ = setup_world(client)
    first = client.post("/v1/subscriptions", json=sub_body(7101), headers=bearer(alpha))
    again = client.post("/v1/subscriptions", json=sub_body(7101), headers=bearer(alpha))
    assert first.status_code == 201 and again.status_code == 200
    assert first.json() == again.json()
    assert len(client.get("/v1/subscriptions", headers=bearer(alpha)).json()) == 1
    tree = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    assert len(tree["endpoints"]) == 1


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ({"addr": "10.9.9.9", "port": 7100}, "no host there"),
        ({"addr": "127.0.0.1", "port": 7150}, "past the host's ports"),
        ({"addr": "127.0.0.1", "port": 7000}, "a relay's port, not an endpoint"),
        ({"addr": "127.0.0.1", "port": 6000}, "the publisher"),
    ],
)
def test_endpoint_must_be_on_a_registered_receiver(
    client: TestClient, endpoint: dict[str, Any], why: str
) -> None:
    alpha, _ = setup_world(client)
    r = client.post(
        "/v1/subscriptions", json={"stream_id": 1, "endpoint": endpoint}, headers=bearer(alpha)
    )
    assert r.status_code == 422, why
    assert r.json()["detail"][0]["loc"] == ["body", "endpoint"]
    assert client.get("/v1/subscriptions", headers=ADMIN).json() == []


def test_deliver_only_to_the_endpoint_host(client: TestClient) -> None:
    alpha, _ = setup_world(client)
    body = {**sub_body(7102), "deliver": "udp:8.8.8.8:53"}
    r = client.post("/v1/subscriptions", json=body, headers=bearer(alpha))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "deliver"]
    body = {**sub_body(7102), "deliver": "udp:127.0.0.1:9000"}
    assert client.post("/v1/subscriptions", json=body, headers=bearer(alpha)).status_code == 201


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/subscriptions", {"stream_id": 1}, ["body", "endpoint"]),
        ("/v1/subscriptions", {"stream_id": "x", "endpoint": {}}, ["body", "stream_id"]),
        (
            "/v1/subscriptions",
            {"stream_id": 1, "endpoint": {"addr": "999.1.1.1", "port": 7100}},
            ["body", "endpoint", "addr"],
        ),
        (
            "/v1/subscriptions",
            {"stream_id": 1, "endpoint": {"addr": "127.0.0.1", "port": 70000}},
            ["body", "endpoint", "port"],
        ),
        ("/v1/streams", {"id": -1, "name": "x"}, ["body", "id"]),
        ("/v1/streams", {"id": 3, "name": "x", "hedge": 99}, ["body", "hedge"]),
        ("/v1/streams", {"id": 3, "name": "x", "colour": "red"}, ["body", "colour"]),
        ("/v1/mps", {"name": "bad name!"}, ["body", "name"]),
    ],
)
def test_malformed_bodies_are_422_naming_the_field(
    client: TestClient, path: str, body: dict[str, Any], field: list[str]
) -> None:
    alpha, _ = setup_world(client)
    headers = bearer(alpha) if path == "/v1/subscriptions" else ADMIN
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == 422
    assert field in [e["loc"] for e in r.json()["detail"]], r.json()


def test_node_registration_validation(client: TestClient) -> None:
    r = client.post(
        "/v1/nodes",
        json={"name": "r", "role": "router", "data_addr": "1.2.3.4", "port": 1},
        headers=NODE,
    )
    assert r.status_code == 422 and ["body", "role"] in [e["loc"] for e in r.json()["detail"]]
    register(client, "rx0", "receiver", 7100, capacity=10)
    # Port ranges of two nodes on one address must not overlap (the topology forbids it).
    r = client.post(
        "/v1/nodes",
        json={"name": "rx1", "role": "receiver", "data_addr": "127.0.0.1", "port": 7105},
        headers=NODE,
    )
    assert r.status_code == 409


def test_unknown_ids_are_404(client: TestClient) -> None:
    alpha, _ = setup_world(client)
    assert client.get("/v1/streams/99", headers=ADMIN).status_code == 404
    assert client.get("/v1/streams/99/tree", headers=ADMIN).status_code == 404
    assert client.post("/v1/streams/99/replan", headers=ADMIN).status_code == 404
    assert client.patch("/v1/streams/99", json={}, headers=ADMIN).status_code == 404
    assert client.get("/v1/subscriptions/99", headers=bearer(alpha)).status_code == 404
    assert client.get("/v1/mps/99", headers=ADMIN).status_code == 404
    assert client.get("/v1/nodes/nope", headers=NODE).status_code == 404
    assert client.get("/v1/nodes/nope/config", headers=NODE).status_code == 404
    assert client.post("/v1/nodes/nope/heartbeat", json={}, headers=NODE).status_code == 404
    r = client.post("/v1/subscriptions", json=sub_body(7100, stream=99), headers=bearer(alpha))
    assert r.status_code == 404
    assert client.post("/v1/streams", json={"id": 1, "name": "d"}, headers=ADMIN).status_code == 409


# --- tree and configs ----------------------------------------------------------------------


def test_tree_json_and_node_configs_are_valid_topologies(client: TestClient) -> None:
    alpha, beta = setup_world(client, relays=12)
    r = client.patch("/v1/streams/1", json={"depth": 2, "fanout": 4}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["depth"] == 2
    for i in range(20):
        token = alpha if i % 2 else beta
        assert (
            client.post(
                "/v1/subscriptions", json=sub_body(7100 + i), headers=bearer(token)
            ).status_code
            == 201
        )
    tree = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    assert tree["depth"] == 2 and tree["levels"][0][0]["slot"] == "r0.0"
    assert len(tree["endpoints"]) == 20
    assert all(len(set(e["parents"])) == 3 for e in tree["endpoints"])  # H+1 copies
    assert tree["predicted_oml_ns"] >= tree["predicted_median_ns"] > 0
    assert tree["hedge_edges"]
    topo = parse_topology(tree["topology"])
    assert topo.publisher.name == "pub"
    assert len(topo.endpoints()) == 20
    assert {e.mp for _, e in topo.endpoints()} == {"alpha", "beta"}
    # An MP's view is a valid topology too, with only its own endpoints (tests/security).
    mine = client.get("/v1/streams/1/tree", headers=bearer(alpha)).json()
    assert {e.mp for _, e in parse_topology(mine["topology"]).endpoints()} == {"alpha"}
    for name in ("relay0", "rx0", "pub"):
        cfg = client.get(f"/v1/nodes/{name}/config?version=0&wait=0", headers=NODE).json()
        assert cfg["node"] == name
        parse_topology(cfg["streams"][0]["topology"])


def test_a_deleted_stream_leaves_every_config_and_the_others_untouched(
    client: TestClient,
) -> None:
    alpha, _ = setup_world(client)
    assert client.post("/v1/streams", json={"id": 2, "name": "b"}, headers=ADMIN).status_code == 201
    for port, stream in ((7100, 1), (7101, 2)):
        r = client.post("/v1/subscriptions", json=sub_body(port, stream), headers=bearer(alpha))
        assert r.status_code == 201
    before = client.get("/v1/nodes/rx0/config?version=0&wait=0", headers=NODE).json()
    assert [s["stream_id"] for s in before["streams"]] == [1, 2]
    assert client.delete("/v1/streams/2", headers=bearer(alpha)).status_code == 403
    assert client.delete("/v1/streams/2", headers=ADMIN).status_code == 204
    assert client.delete("/v1/streams/2", headers=ADMIN).status_code == 404
    assert client.get("/v1/streams/2", headers=ADMIN).status_code == 404
    subs = client.get("/v1/subscriptions", headers=bearer(alpha)).json()
    assert [s["stream_id"] for s in subs] == [1]
    after = client.get("/v1/nodes/rx0/config?version=0&wait=0", headers=NODE).json()
    assert after["version"] > before["version"]
    # Stream 1's document is the same plan as before: nothing of it moved.
    assert [s["stream_id"] for s in after["streams"]] == [1]
    assert after["streams"][0]["topology"] == before["streams"][0]["topology"]
    # The id is free again.
    assert client.post("/v1/streams", json={"id": 2, "name": "c"}, headers=ADMIN).status_code == 201


def test_incremental_attach_moves_nobody(client: TestClient) -> None:
    alpha, _ = setup_world(client, relays=12)
    client.patch("/v1/streams/1", json={"depth": 2, "fanout": 4}, headers=ADMIN)
    for i in range(10):
        client.post("/v1/subscriptions", json=sub_body(7100 + i), headers=bearer(alpha))
    before = {
        e["name"]: e["parents"]
        for e in client.get("/v1/streams/1/tree", headers=ADMIN).json()["endpoints"]
    }
    client.post("/v1/subscriptions", json=sub_body(7120), headers=bearer(alpha))
    tree = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    after = {e["name"]: e["parents"] for e in tree["endpoints"]}
    assert {k: after[k] for k in before} == before
    assert len(after) == 11


def test_long_poll_returns_on_change(client: TestClient) -> None:
    alpha, _ = setup_world(client)
    cfg = client.get("/v1/nodes/rx0/config?version=0&wait=0", headers=NODE).json()
    started = time.monotonic()
    r = client.get(f"/v1/nodes/rx0/config?version={cfg['version']}&wait=0.3", headers=NODE)
    assert r.json()["version"] == cfg["version"]
    assert time.monotonic() - started >= 0.25  # it waited: nothing changed
    client.post("/v1/subscriptions", json=sub_body(7105), headers=bearer(alpha))
    r = client.get(f"/v1/nodes/rx0/config?version={cfg['version']}&wait=10", headers=NODE)
    new = r.json()
    assert new["version"] > cfg["version"]
    eps = new["streams"][0]["topology"]["receivers"][0]["endpoints"]
    assert [e["port"] for e in eps] == [7105]


def test_make_before_break_switch(client: TestClient) -> None:
    alpha, _ = setup_world(client, relays=6)
    client.patch("/v1/streams/1", json={"depth": 2, "fanout": 3}, headers=ADMIN)
    for i in range(6):
        client.post("/v1/subscriptions", json=sub_body(7100 + i), headers=bearer(alpha))
    old = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    r = client.post("/v1/streams/1/replan", headers=ADMIN).json()
    assert r["pending_epoch"] == old["plan_epoch"] + 1 and r["plan_epoch"] == old["plan_epoch"]
    # The publisher keeps the old plan; relays of the new one and receivers get the new one,
    # with the old plan alongside and the parents of both accepted.
    pub = client.get("/v1/nodes/pub/config?wait=0", headers=NODE).json()
    assert pub["streams"][0]["plan_epoch"] == old["plan_epoch"]
    rx = client.get("/v1/nodes/rx0/config?wait=0", headers=NODE).json()
    topo = rx["streams"][0]["topology"]
    assert rx["streams"][0]["plan_epoch"] == old["plan_epoch"] + 1
    assert topo["x-previous"]["plan_epoch"] == old["plan_epoch"]
    parse_topology(topo)
    # Every live node of the new plan acknowledges the version: the stream switches.
    version = rx["version"]
    for name in [f"relay{i}" for i in range(6)] + ["rx0", "pub"]:
        r = client.post(
            f"/v1/nodes/{name}/heartbeat", json={"applied_version": version}, headers=NODE
        )
        assert r.status_code == 200
    tree = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    assert tree["plan_epoch"] == old["plan_epoch"] + 1 and tree["pending_epoch"] is None
    pub = client.get("/v1/nodes/pub/config?wait=0", headers=NODE).json()
    assert pub["streams"][0]["plan_epoch"] == tree["plan_epoch"]
    assert "x-previous" not in pub["streams"][0]["topology"]


def test_dead_relay_is_planned_around(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, heartbeat_timeout_s=1.5, monitor_interval_s=0.05, switch_timeout_s=0.2
    )
    with TestClient(create_app(settings)) as c:
        alpha, _ = setup_world(c, relays=4)
        c.patch("/v1/streams/1", json={"depth": 2, "fanout": 2}, headers=ADMIN)
        for i in range(4):
            c.post("/v1/subscriptions", json=sub_body(7100 + i), headers=bearer(alpha))
        tree = c.get("/v1/streams/1/tree", headers=ADMIN).json()
        used = {s["node"] for level in tree["levels"] for s in level}
        victim = sorted(used)[0]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for name in ["relay0", "relay1", "relay2", "relay3", "rx0", "pub"]:
                if name != victim:
                    c.post(f"/v1/nodes/{name}/heartbeat", json={}, headers=NODE)
            tree = c.get("/v1/streams/1/tree", headers=ADMIN).json()
            used = {s["node"] for level in tree["levels"] for s in level}
            if victim not in used and tree["pending_epoch"] is None:
                break
            time.sleep(0.1)
        assert victim not in used
        node = c.get(f"/v1/nodes/{victim}", headers=NODE).json()
        assert node["alive"] is False
        assert all(victim not in e["parents"] for e in tree["endpoints"])
        metrics = c.get("/metrics").text
        assert 'jasper_replans_total{reason="relay_dead"}' in metrics


def test_lemon_relays_stay_out_of_the_tree(client: TestClient) -> None:
    alpha, _ = setup_world(client, relays=6)
    client.patch("/v1/streams/1", json={"depth": 2, "fanout": 2}, headers=ADMIN)
    names = [f"relay{i}" for i in range(6)] + ["rx0"]
    for src in names:
        latency = [
            {
                "peer": dst,
                "owd_ns": 400_000 if "relay5" in (src, dst) else 30_000,
                "jitter_ns": 100_000 if "relay5" in (src, dst) else 1_000,
                "samples": 50,
            }
            for dst in names
            if dst != src
        ]
        r = client.post(f"/v1/nodes/{src}/heartbeat", json={"latency": latency}, headers=NODE)
        assert r.status_code == 200
    for i in range(4):
        client.post("/v1/subscriptions", json=sub_body(7100 + i), headers=bearer(alpha))
    client.post("/v1/streams/1/replan", headers=ADMIN)
    tree = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    assert tree["lemons"] == ["relay5"]
    links = client.get("/v1/latency", headers=ADMIN).json()
    assert len(links) == 7 * 6
    assert {(x["src"], x["dst"]) for x in links if x["owd_ns"] == 400_000} >= {("relay0", "relay5")}
    assert client.get("/v1/latency", headers=bearer(alpha)).status_code == 403
    pending_or_active = tree["topology"]
    assert pending_or_active is not None
    rx = client.get("/v1/nodes/rx0/config?wait=0", headers=NODE).json()
    relays = {r["name"] for r in rx["streams"][0]["topology"]["relays"]}
    assert "relay5" not in relays


def distinct_parents(topology: dict[str, Any]) -> set[int]:
    return {len(set(e["parents"])) for rx in topology["receivers"] for e in rx["endpoints"]}


def forwarded_parents(topology: dict[str, Any]) -> set[int]:
    """Distinct relays forwarding to each endpoint by the plan's own tables (during a switch
    the endpoints' `parents` also list the old plan's)."""
    senders: dict[str, set[str]] = {}
    for r in topology["relays"]:
        for t in r["targets"]:
            senders.setdefault(t["node"], set()).add(r["name"])
    names = [e["name"] for rx in topology["receivers"] for e in rx["endpoints"]]
    return {len(senders.get(n, ())) for n in names}


def test_small_tree_says_hedging_is_off_and_regains_it_when_relays_join(
    client: TestClient,
) -> None:
    alpha, _ = setup_world(client, relays=1)
    for i in range(6):
        client.post("/v1/subscriptions", json=sub_body(7100 + i), headers=bearer(alpha))
    topo = client.get("/v1/streams/1/tree", headers=ADMIN).json()["topology"]
    assert distinct_parents(topo) == {1}
    hedging = topo["x-hedging"]
    assert hedging["hedge"] == 2 and hedging["parents_min"] == 1
    assert hedging["note"].startswith("hedging off: each endpoint gets 1 distinct parent")
    assert "1 relay(s) usable; H=2 needs 4" in hedging["note"]
    # A second relay cannot give a second parent (a root over one sibling): no re-plan.
    register(client, "relay1", "relay", 7001)
    assert "relay_joined" not in client.get("/metrics").text
    # With a root over two siblings each endpoint gets two parents.
    register(client, "relay2", "relay", 7002)
    assert 'jasper_replans_total{reason="relay_joined"} 1.0' in client.get("/metrics").text
    rx = client.get("/v1/nodes/rx0/config?wait=0", headers=NODE).json()
    pending = rx["streams"][0]["topology"]
    assert forwarded_parents(pending) == {2} and pending["x-hedging"]["parents_min"] == 2
    assert pending["x-hedging"]["note"].startswith("hedging reduced")
    # Once every node runs the new plan the stream switches; a fourth relay then re-plans
    # again, to H+1 parents, and the plan has nothing to confess.
    for name in ("relay0", "relay1", "relay2", "rx0", "pub"):
        body = {"applied_version": rx["version"]}
        assert client.post(f"/v1/nodes/{name}/heartbeat", json=body, headers=NODE).is_success
    tree = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    assert tree["pending_epoch"] is None and distinct_parents(tree["topology"]) == {2}
    register(client, "relay3", "relay", 7003)
    assert 'jasper_replans_total{reason="relay_joined"} 2.0' in client.get("/metrics").text
    rx = client.get("/v1/nodes/rx0/config?wait=0", headers=NODE).json()
    pending = rx["streams"][0]["topology"]
    assert forwarded_parents(pending) == {3}
    assert pending["x-hedging"] == {"hedge": 2, "parents_min": 3, "note": ""}


def test_healthz_and_metrics(client: TestClient) -> None:
    alpha, _ = setup_world(client)
    client.post("/v1/subscriptions", json=sub_body(7100), headers=bearer(alpha))
    assert client.get("/healthz").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert 'jasper_subscriptions{stream="1"} 1.0' in text
    assert 'jasper_nodes{role="relay",state="alive"} 3.0' in text
    assert "jasper_attach_seconds_count 1.0" in text
    assert "jasper_predicted_oml_seconds" in text
    assert (
        'jasper_http_requests_total{method="POST",route="/v1/subscriptions",status="201"}' in text
    )


def test_full_leaf_relays_replan_only_when_more_relays_help(client: TestClient) -> None:
    # H=0: relays joining re-plan nothing by themselves (a hedged stream re-plans for more
    # distinct parents, see the next test), so only the leaf relays' load does.
    alpha, _ = setup_world(client, relays=3, hedge=0)
    for i in range(40):
        client.post("/v1/subscriptions", json=sub_body(7100 + i), headers=bearer(alpha))
    # Three relays cannot make a deeper tree for 40 endpoints: no re-plan churn.
    assert "leaf_relays_full" not in client.get("/metrics").text
    for i in range(3, 12):
        register(client, f"relay{i}", "relay", 7000 + i)
    client.post("/v1/subscriptions", json=sub_body(7140), headers=bearer(alpha))
    text = client.get("/metrics").text
    assert 'jasper_replans_total{reason="leaf_relays_full"} 1.0' in text
    tree = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    assert tree["pending_epoch"] == tree["plan_epoch"] + 1
