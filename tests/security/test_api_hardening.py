"""Controller API hardening (issue 15, items 4-6 and 8): deliver targets, what an MP sees,
input limits, file modes. Each test failed on the main before the change."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from controller.app import create_app
from controller.loopback import LoopbackController
from jasper.topology import parse_topology
from tests.test_controller_api import (
    ADMIN,
    NODE,
    bearer,
    client,  # noqa: F401  (fixture)
    make_settings,
    register,
    setup_world,
    sub_body,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def detail_text(r: httpx.Response) -> str:
    return json.dumps(r.json()["detail"])


# --- 4. deliver targets --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deliver", "why"),
    [
        ("unix:/dev/log", "outside the MP folder"),
        ("unix:/etc/passwd", "outside the MP folder"),
        ("unix:/run/jasper/mp/../../../etc/passwd", "'..' climbs out"),
        ("unix:/run/jasper/mp/./x", "'.' segment"),
        ("unix:/run/jasper/mp//x", "not normalised"),
        ("unix:/run/jasper/mp/x/", "trailing slash"),
        ("unix:/run/jasper/mp/", "the folder itself"),
        ("unix:/run/jasper/mpx/feed", "a sibling sharing the prefix"),
        ("unix:run/jasper/mp/feed", "relative"),
        ("unix:/run/jasper/mp/a\x00b", "NUL"),
        ("unix:/run/jasper/mp/" + "a" * 60 + "/" + "b" * 60, "past sun_path"),
        ("unix:/run/jasper/mp/a b", "a space"),
        ("udp:127.0.0.1:99999", "port above 65535"),
        ("udp:127.0.0.1:0", "port 0"),
        ("udp:127.0.0.1:", "no port"),
        ("udp:127.0.0.01:9000", "not a canonical address"),
        ("udp:localhost:9000", "a name, not an address"),
        ("udp:8.8.8.8:53", "another host"),
        ("udp:127.0.0.2:9000", "another loopback address than the endpoint's"),
        ("udp:127.0.0.1:7100", "an endpoint port of the receiver host"),
        ("udp:127.0.0.1:7001", "a relay's data port"),
        ("tcp:127.0.0.1:9000", "another scheme"),
        ("file:/etc/passwd", "another scheme"),
        ("", "empty"),
    ],
)
def test_deliver_targets_outside_the_rules_are_422(
    client: TestClient,  # noqa: F811
    deliver: str,
    why: str,
) -> None:
    alpha, _ = setup_world(client)
    r = client.post(
        "/v1/subscriptions", json={**sub_body(7102), "deliver": deliver}, headers=bearer(alpha)
    )
    assert r.status_code == 422, (why, r.text)
    err = r.json()["detail"][0]
    assert err["loc"] == ["body", "deliver"], err
    assert "deliver" in err["msg"], err  # the message names the field and what it may be
    assert client.get("/v1/subscriptions", headers=ADMIN).json() == []


def test_deliver_error_says_what_is_allowed(client: TestClient) -> None:  # noqa: F811
    alpha, _ = setup_world(client)
    r = client.post(
        "/v1/subscriptions", json={**sub_body(7102), "deliver": "tcp:x"}, headers=bearer(alpha)
    )
    msg = r.json()["detail"][0]["msg"]
    assert "udp:ADDR:PORT" in msg and "unix:PATH" in msg and "1-65535" in msg
    r = client.post(
        "/v1/subscriptions",
        json={**sub_body(7102), "deliver": "unix:/dev/log"},
        headers=bearer(alpha),
    )
    assert "/run/jasper/mp/" in r.json()["detail"][0]["msg"]


def test_valid_deliver_targets_are_accepted(client: TestClient) -> None:  # noqa: F811
    alpha, _ = setup_world(client)
    for port, deliver in (
        (7102, "udp:127.0.0.1:9000"),
        (7103, "udp:127.0.0.1:65535"),
        (7104, "unix:/run/jasper/mp/alpha.sock"),
        (7105, "unix:/run/jasper/mp/alpha/feed-2.sock"),
        (7106, "udp:127.0.0.1:9000"),  # one MP may deliver two endpoints to one socket
    ):
        r = client.post(
            "/v1/subscriptions", json={**sub_body(port), "deliver": deliver}, headers=bearer(alpha)
        )
        assert r.status_code == 201, (deliver, r.text)
        assert r.json()["deliver"] == deliver


def test_another_mps_deliver_target_is_refused(client: TestClient) -> None:  # noqa: F811
    alpha, beta = setup_world(client)
    for i, deliver in enumerate(("udp:127.0.0.1:9000", "unix:/run/jasper/mp/alpha.sock")):
        body = {**sub_body(7102 + i), "deliver": deliver}
        assert client.post("/v1/subscriptions", json=body, headers=bearer(alpha)).status_code == 201
        body = {**sub_body(7110 + i), "deliver": deliver}
        r = client.post("/v1/subscriptions", json=body, headers=bearer(beta))
        assert r.status_code == 422 and "another MP" in r.json()["detail"][0]["msg"], r.text


def test_deliver_folder_is_a_setting(tmp_path: Path) -> None:
    folder = tmp_path / "mp-sockets"
    settings = make_settings(tmp_path, mp_deliver_dir=str(folder) + "//")
    assert settings.mp_deliver_dir == f"{folder}/"
    with TestClient(create_app(settings)) as c:
        alpha, _ = setup_world(c)
        inside = {**sub_body(7102), "deliver": f"unix:{folder}/feed.sock"}
        assert c.post("/v1/subscriptions", json=inside, headers=bearer(alpha)).status_code == 201
        default = {**sub_body(7103), "deliver": "unix:/run/jasper/mp/feed.sock"}
        r = c.post("/v1/subscriptions", json=default, headers=bearer(alpha))
        assert r.status_code == 422 and str(folder) in r.json()["detail"][0]["msg"]
    with pytest.raises(ValueError, match=r"\.\."):
        make_settings(tmp_path, mp_deliver_dir="/run/jasper/../etc")


# --- 5. visibility -------------------------------------------------------------------------


def test_an_mp_sees_only_its_own_endpoints(client: TestClient) -> None:  # noqa: F811
    alpha, beta = setup_world(client, relays=6)
    client.patch("/v1/streams/1", json={"depth": 2, "fanout": 3}, headers=ADMIN)
    mine, theirs = [], []
    for i in range(12):
        token, subs = (alpha, mine) if i % 3 == 0 else (beta, theirs)
        body = {**sub_body(7100 + i), "deliver": f"udp:127.0.0.1:{9100 + i}"}
        r = client.post("/v1/subscriptions", json=body, headers=bearer(token))
        assert r.status_code == 201, r.text
        subs.append(r.json())
    r = client.get("/v1/streams/1/tree", headers=bearer(alpha))
    assert r.status_code == 200
    tree = r.json()
    assert {e["subscription_id"] for e in tree["endpoints"]} == {s["id"] for s in mine}
    assert {e["mp"] for e in tree["endpoints"]} == {"alpha"}
    assert tree["other_endpoints"] == len(theirs)
    assert tree["topology"]["x-other-endpoints"] == len(theirs)
    text = json.dumps(tree)
    assert "beta" not in text
    for s in theirs:
        assert f'"s{s["id"]}"' not in text  # its endpoint name, as key, target or edge
        assert s["deliver"] not in text
        assert str(s["endpoint"]["port"]) not in text
    # Still a valid topology, the MP's own endpoints with their parents.
    topo = parse_topology(tree["topology"])
    assert {e.name for _, e in topo.endpoints()} == {f"s{s['id']}" for s in mine}
    assert "auth" not in tree["topology"]["stream"]  # no stream keys, now or later
    # The admin sees everyone.
    full = client.get("/v1/streams/1/tree", headers=ADMIN).json()
    assert len(full["endpoints"]) == 12 and full["other_endpoints"] == 0
    assert {e["mp"] for e in full["endpoints"]} == {"alpha", "beta"}
    # Beta sees its own, alpha's as a count.
    other = client.get("/v1/streams/1/tree", headers=bearer(beta)).json()
    assert len(other["endpoints"]) == len(theirs) and other["other_endpoints"] == len(mine)
    assert "alpha" not in json.dumps(other)


def test_hold_view_names_no_mp(client: TestClient) -> None:  # noqa: F811
    alpha, beta = setup_world(client)
    for i, token in enumerate((alpha, beta)):
        body = {**sub_body(7100 + i), "deliver": f"udp:127.0.0.1:{9200 + i}"}
        assert client.post("/v1/subscriptions", json=body, headers=bearer(token)).status_code == 201
    owd = {
        "stream_id": 1, "start_ns": 1, "end_ns": 2, "count": 500, "late": 0,
        "p50_ns": 10, "p95_ns": 20, "p97_ns": 30, "p99_ns": 40, "max_ns": 50,
    }  # fmt: skip
    r = client.post("/v1/nodes/rx0/heartbeat", json={"owd": [owd]}, headers=NODE)
    assert r.status_code == 200
    r = client.get("/v1/streams/1/hold", headers=bearer(alpha))
    assert r.status_code == 200
    text = r.text
    assert "beta" not in text and "9201" not in text and "7101" not in text


# --- 6. input limits -----------------------------------------------------------------------

STREAM = b'{"id": 5, "name": "x", %s}'


@pytest.mark.parametrize(
    ("path", "raw", "why"),
    [
        ("/v1/streams", STREAM % b'"rate_hint": NaN', "NaN"),
        ("/v1/streams", STREAM % b'"rate_hint": Infinity', "Infinity"),
        ("/v1/streams", STREAM % b'"rate_hint": -Infinity', "-Infinity"),
        ("/v1/streams", STREAM % b'"rate_hint": 1e400', "a float that overflows"),
        ("/v1/streams", STREAM % b'"rate_hint": -1e400', "a float that overflows"),
        ("/v1/streams", STREAM % b'"rate_hint": 1e300', "finite but above the field's bound"),
        ("/v1/streams", STREAM % (b'"hold_ns": ' + b"9" * 5000), "5000 digits"),
        ("/v1/streams", STREAM % b'"hold_ns": 99999999999999999999999', "past 64 bits"),
        ("/v1/streams", b'{"id": 5, "name": "\\ud800"}', "lone surrogate, escaped"),
        ("/v1/streams", b'{"id": 5, "name": "\xed\xa0\x80"}', "lone surrogate, raw bytes"),
        ("/v1/streams", b'{"id": 5, "name": "\xff"}', "not UTF-8"),
        ("/v1/streams", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("/v1/nodes/rx0/heartbeat", b'{"status": {"x": NaN}}', "NaN in a counter"),
        ("/v1/nodes/rx0/heartbeat", b'{"status": {"\\udc00": 1}}', "surrogate key"),
        ("/v1/nodes/rx0/heartbeat", b'{"clock": {"status": "\\udfff"}}', "surrogate value"),
        ("/v1/emulation/link-model", b'{"default": {"delay_us": NaN}}', "NaN in a free dict"),
    ],
)
def test_unusable_numbers_and_strings_are_422(
    client: TestClient,  # noqa: F811
    path: str,
    raw: bytes,
    why: str,
) -> None:
    setup_world(client)
    headers = {**(NODE if "nodes" in path else ADMIN), "content-type": "application/json"}
    method = "PUT" if "link-model" in path else "POST"
    r = client.request(method, path, content=raw, headers=headers)
    assert r.status_code == 422, (why, r.status_code, r.text[:300])
    assert r.json()["detail"][0]["msg"], r.text
    # Nothing of it was stored.
    assert client.get("/v1/streams/5", headers=ADMIN).status_code == 404
    node = client.get("/v1/nodes/rx0", headers=NODE).json()
    assert node["status"] in (None, {}), node


def test_validation_errors_echo_only_encodable_input() -> None:
    from controller.limits import json_safe

    assert json_safe({"a": [float("nan"), float("inf")], "\udc00k": "x\ud800"}) == {
        "a": ["nan", "inf"],
        "\\udc00k": "x\\ud800",
    }


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackController]:
    with LoopbackController() as ctl:
        yield ctl


def json_admin(ctl: LoopbackController) -> dict[str, str]:
    return {"Authorization": f"Bearer {ctl.admin_token}", "content-type": "application/json"}


def raw_request(ctl: LoopbackController, head: str, body: bytes = b"") -> bytes:
    """One request written on a plain socket; the status line and headers of the answer."""
    with socket.create_connection(("127.0.0.1", ctl.port), timeout=5) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_real_server_answers_non_finite_numbers_with_422(server: LoopbackController) -> None:
    for raw in (STREAM % b'"rate_hint": 1e400', STREAM % b'"rate_hint": NaN'):
        r = httpx.post(
            server.url + "/v1/streams",
            content=raw,
            headers=json_admin(server),
        )
        assert r.status_code == 422, r.text
    assert "Traceback" not in server.log_path.read_text(errors="replace")


def test_body_over_the_limit_is_413_before_it_is_read(server: LoopbackController) -> None:
    # 64 MiB announced, none sent: the answer comes at once, without auth, body unread.
    started = time.monotonic()
    answer = raw_request(
        server,
        "POST /v1/streams HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {64 << 20}",
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 3
    # Just over 1 MiB, authenticated.
    big = b'{"id": 9, "name": "' + b"x" * (1 << 20) + b'"}'
    r = httpx.post(
        server.url + "/v1/streams",
        content=big,
        headers=json_admin(server),
    )
    assert r.status_code == 413 and "1048576" in r.json()["detail"]


def test_chunked_body_over_the_limit_is_413(server: LoopbackController) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"id": 9, "name": "'
        for _ in range(64):  # 4 MiB in 64 KiB chunks, no Content-Length
            yield b"x" * 65536
        yield b'"}'

    answers = []
    for ctype in ("application/json", "application/octet-stream"):
        # JSON is refused while the strict decoder reads it, other types while the route does.
        try:
            r = httpx.post(
                server.url + "/v1/streams",
                content=chunks(),
                headers={"Authorization": f"Bearer {server.admin_token}", "content-type": ctype},
            )
        except httpx.HTTPError:  # the server may close before the client wrote everything
            continue
        answers.append(r.status_code)
    assert answers and set(answers) == {413}, answers
    # Within the limit, chunked still works.
    r = httpx.post(
        server.url + "/v1/streams",
        content=iter([b'{"id": 9, ', b'"name": "chunked"}']),
        headers=json_admin(server),
    )
    assert r.status_code == 201, r.text


def from_address(ctl: LoopbackController, addr: str) -> httpx.Client:
    """A client whose connections come from `addr` (any 127.0.0.0/8 address works)."""
    return httpx.Client(
        base_url=ctl.url, transport=httpx.HTTPTransport(local_address=addr), timeout=10
    )


def test_failed_auth_is_rate_limited_per_address(tmp_path: Path) -> None:
    env = {"JASPER_AUTH_FAILURE_BURST": "5", "JASPER_AUTH_FAILURE_PER_S": "2"}
    with (
        LoopbackController(db_path=tmp_path / "c.db", settings_env=env) as ctl,
        from_address(ctl, "127.0.0.2") as guesser,
        from_address(ctl, "127.0.0.2") as neighbour,
        from_address(ctl, "127.0.0.3") as member,
    ):
        admin = {"Authorization": f"Bearer {ctl.admin_token}"}
        _, mp_token = ctl.create_mp("fresh")
        # Valid calls never spend the budget; the guesser's neighbour behind the same
        # address (a NAT) has used its token before the guessing starts.
        for _ in range(30):
            assert member.get("/v1/streams", headers=admin).status_code == 200
        assert neighbour.get("/v1/streams", headers=admin).status_code == 200
        codes = [
            guesser.get("/v1/streams", headers={"Authorization": f"Bearer guess{i}"}).status_code
            for i in range(40)
        ]
        assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}, codes
        r = guesser.get("/v1/streams", headers={"Authorization": "Bearer guess"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # Blocked means blocked before the token is checked: a right token the address has
        # not used before gets 429 too, and so does a request with no token.
        assert guesser.get("/v1/streams", headers=bearer(mp_token)).status_code == 429
        assert guesser.get("/v1/streams").status_code == 429
        assert guesser.get("/healthz").status_code == 200
        # Valid clients are not slowed: on other addresses, and on this one with a token it
        # had already used.
        started = time.monotonic()
        for _ in range(20):
            assert member.get("/v1/streams", headers=admin).status_code == 200
            assert neighbour.get("/v1/streams", headers=admin).status_code == 200
        assert time.monotonic() - started < 5
        # After Retry-After the address may try again.
        time.sleep(int(r.headers["retry-after"]) + 0.1)
        r = guesser.get("/v1/streams", headers={"Authorization": "Bearer guess"})
        assert r.status_code == 401


def test_only_a_checked_token_is_trusted_past_the_limit(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, auth_failure_burst=2, auth_failure_per_s=0.01)
    with TestClient(create_app(settings)) as c:
        guess = bearer("guess")
        # Answers of routes that check no token (404, enrolment) prove nothing about it.
        assert c.get("/v1/no-such-route", headers=guess).status_code == 404
        assert c.get("/v1/streams", headers=ADMIN).status_code == 200
        for _ in range(2):
            assert c.get("/v1/streams", headers=bearer("wrong")).status_code == 401
        assert c.get("/v1/streams", headers=guess).status_code == 429
        assert c.get("/v1/streams", headers=ADMIN).status_code == 200


# --- 8. files ------------------------------------------------------------------------------


def test_database_files_are_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    db.touch(mode=0o644)  # a file an older version left readable by all is tightened too
    os.chmod(db, 0o644)
    with LoopbackController(db_path=db) as ctl:
        ctl.create_stream(1, "md")
        _, token = ctl.create_mp("alpha")
        assert token
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert p.exists(), p
            assert mode(p) == 0o600, (p, oct(mode(p)))
        assert mode(ctl.log_path) == 0o640
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with LoopbackController(db_path=fresh / "c.db") as ctl:
        ctl.create_stream(1, "md")
        for p in fresh.iterdir():
            want = 0o640 if p.suffix == ".log" else 0o600
            assert mode(p) == want, (p, oct(mode(p)))


def test_audit_files_are_0640(tmp_path: Path) -> None:
    from overlay.audit_log import AuditLogWriter

    path = tmp_path / "audit.bin"
    AuditLogWriter(path, node="rx0", endpoints=["s1"]).close()
    assert mode(path) == 0o640
    os.chmod(path, 0o644)
    AuditLogWriter(path, node="rx0", endpoints=["s1"]).close()
    assert mode(path) == 0o640


def test_in_process_database_files_are_owner_only(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as c:
        register(c, "rx0", "receiver", 7100)
        files = sorted(tmp_path.glob("c.db*"))
        assert [f.name for f in files] == ["c.db", "c.db-shm", "c.db-wal"]
        assert {mode(f) for f in files} == {0o600}
