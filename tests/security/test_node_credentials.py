"""Per-node credentials (issue 15, item 3): one-time join tokens, enrolment, a node acting only
as itself, credentials hashed at rest and kept by the agent across restarts. Against a real
controller process over HTTP, as the other controller tests do."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.loopback import LoopbackController
from overlay.agent import Agent
from overlay.credential import NodeCredentialSource


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[LoopbackController]:
    with LoopbackController(db_path=tmp_path / "c.db") as c:
        yield c


def node_body(name: str, port: int, *, addr: str = "127.0.0.1", role: str = "relay") -> Any:
    return {"name": name, "role": role, "data_addr": addr, "port": port}


def as_node(ctl: LoopbackController, credential: str | None, method: str, path: str,
            body: Any = None) -> httpx.Response:  # fmt: skip
    if credential is None:
        return ctl.client.request(method, path, json=body, auth=False)
    return ctl.client.request(method, path, token=credential, json=body)


def enrol(ctl: LoopbackController, join_token: str) -> httpx.Response:
    return ctl.client.request(
        "POST", "/v1/nodes/enrol", json={"join_token": join_token}, auth=False
    )


HEARTBEAT: dict[str, Any] = {"applied_version": 0}


def test_a_node_acts_only_as_itself(ctl: LoopbackController) -> None:
    a = ctl.node_credential("relay-a")
    b = ctl.node_credential("relay-b")
    assert as_node(ctl, a, "POST", "/v1/nodes", node_body("relay-a", 9000)).status_code == 200
    assert as_node(ctl, b, "POST", "/v1/nodes", node_body("relay-b", 9001)).status_code == 200

    # Register a new node, or another node's name at its own address: refused.
    for body in (node_body("evil", 9100), node_body("relay-b", 9001, addr="127.0.0.9")):
        r = as_node(ctl, a, "POST", "/v1/nodes", body)
        assert r.status_code == 403, r.text
        assert "acts only as itself" in r.json()["detail"], r.text
    # Heartbeat, poll, read as another: refused.
    r = as_node(ctl, a, "POST", "/v1/nodes/relay-b/heartbeat", HEARTBEAT)
    assert r.status_code == 403, r.text
    r = as_node(ctl, a, "GET", "/v1/nodes/relay-b/config?wait=0")
    assert r.status_code == 403, r.text
    assert as_node(ctl, a, "GET", "/v1/nodes/relay-b").status_code == 403
    # As itself: fine.
    assert as_node(ctl, a, "POST", "/v1/nodes/relay-a/heartbeat", HEARTBEAT).status_code == 200
    assert as_node(ctl, a, "GET", "/v1/nodes/relay-a/config?wait=0").status_code == 200

    # relay-b is where it registered, and "evil" does not exist.
    nodes = {n["name"]: n for n in ctl.nodes()}
    assert set(nodes) == {"relay-a", "relay-b"}
    assert (nodes["relay-b"]["data_addr"], nodes["relay-b"]["port"]) == ("127.0.0.1", 9001)

    # A node credential is no admin: no streams, join tokens, node list or revocations.
    for method, path, body in (
        ("POST", "/v1/streams", {"id": 1, "name": "md"}),
        ("POST", "/v1/join-tokens", {"nodes": ["evil"]}),
        ("GET", "/v1/nodes", None),
        ("DELETE", "/v1/nodes/relay-b/credential", None),
    ):
        r = as_node(ctl, a, method, path, body)
        assert r.status_code == 403, (path, r.text)

    # No shared node token any more: an unknown bearer and no bearer are both 401.
    assert (
        as_node(ctl, "not-a-credential", "POST", "/v1/nodes", node_body("x", 9200)).status_code
        == 401
    )
    assert as_node(ctl, None, "POST", "/v1/nodes", node_body("x", 9200)).status_code == 401


def test_one_credential_for_the_relays_of_one_process(ctl: LoopbackController) -> None:
    """A process hosting several relays (as the demo packs them) enrols once for all."""
    cred = ctl.node_credential("r.0", "r.1")
    for i, name in enumerate(("r.0", "r.1")):
        r = as_node(ctl, cred, "POST", "/v1/nodes", node_body(name, 9300 + i))
        assert r.status_code == 200, r.text
    assert as_node(ctl, cred, "POST", "/v1/nodes", node_body("r.2", 9302)).status_code == 403


def test_join_tokens_are_single_use_expiring_and_admin_issued(ctl: LoopbackController) -> None:
    token = ctl.join_token("rx0")
    first = enrol(ctl, token)
    assert first.status_code == 201, first.text
    assert first.json()["nodes"] == ["rx0"]
    again = enrol(ctl, token)
    assert again.status_code == 401
    assert "already used" in again.json()["detail"]

    short = ctl.join_token("rx1", ttl_s=0.3)
    time.sleep(0.5)
    expired = enrol(ctl, short)
    assert expired.status_code == 401
    assert "expired" in expired.json()["detail"]
    assert "unknown join token" in enrol(ctl, "no-such-token").json()["detail"]

    # Bad requests say what was wrong.
    for body in ({"nodes": []}, {"nodes": ["rx2"], "ttl_s": 0}, {"nodes": ["bad name"]}):
        r = ctl.client.request("POST", "/v1/join-tokens", json=body)
        assert r.status_code == 422, (body, r.text)
    assert ctl.client.request("POST", "/v1/nodes/enrol", json={}, auth=False).status_code == 422
    # Only the admin issues join tokens: not an MP, not without a token.
    _, mp = ctl.create_mp("mp")
    r = ctl.client.request("POST", "/v1/join-tokens", token=mp, json={"nodes": ["rx2"]})
    assert r.status_code == 403
    r = ctl.client.request("POST", "/v1/join-tokens", json={"nodes": ["rx2"]}, auth=False)
    assert r.status_code == 401


def test_re_enrolment_and_revocation_retire_the_old_credential(ctl: LoopbackController) -> None:
    old = ctl.node_credential("relay-a")
    assert as_node(ctl, old, "POST", "/v1/nodes", node_body("relay-a", 9000)).status_code == 200
    new = ctl.node_credential("relay-a")  # the VM was rebuilt and enrolled again
    assert as_node(ctl, old, "POST", "/v1/nodes/relay-a/heartbeat", HEARTBEAT).status_code == 401
    assert as_node(ctl, new, "POST", "/v1/nodes/relay-a/heartbeat", HEARTBEAT).status_code == 200
    assert ctl.client.request("DELETE", "/v1/nodes/relay-a/credential").status_code == 204
    assert as_node(ctl, new, "POST", "/v1/nodes/relay-a/heartbeat", HEARTBEAT).status_code == 401
    assert ctl.client.request("DELETE", "/v1/nodes/relay-a/credential").status_code == 404


def test_credentials_survive_a_restart_and_are_hashed_at_rest(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    with LoopbackController(db_path=db) as ctl:
        join = ctl.join_token("relay-a")
        unused = ctl.join_token("relay-b")
        cred = enrol(ctl, join).json()["credential"]
        assert (
            as_node(ctl, cred, "POST", "/v1/nodes", node_body("relay-a", 9000)).status_code == 200
        )
        ctl.kill()  # SIGKILL: nothing flushed at shutdown
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("c.db*"))
        for secret in (join, unused, cred):
            assert secret.encode() not in stored
        ctl.start()
        assert (
            as_node(ctl, cred, "POST", "/v1/nodes/relay-a/heartbeat", HEARTBEAT).status_code == 200
        )
        assert enrol(ctl, join).status_code == 401  # still used after the restart
        assert enrol(ctl, unused).status_code == 201


def test_agent_enrols_once_and_reuses_its_credential_file(
    ctl: LoopbackController, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "node-credential-relay-a"
    join = ctl.join_token("relay-a")

    async def run_agent() -> Agent:
        agent = Agent(
            controller=ctl.url,
            credential=NodeCredentialSource(credential_file=path, join_token=join),
            node_name="relay-a",
            role="relay",
            data_addr="127.0.0.1",
            port=17400,
            heartbeat_s=0.1,
            poll_wait_s=1,
            max_backoff_s=0.2,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(agent.registered.wait(), 20)
        while agent.counters.heartbeats < 2:
            await asyncio.sleep(0.05)
        stop.set()
        await task
        return agent

    first = asyncio.run(run_agent())
    assert first.counters.enrolments == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    credential = path.read_text().strip()
    assert as_node(ctl, credential, "GET", "/v1/nodes/relay-a").status_code == 200
    # Restart: the join token is spent, the file's credential is used.
    second = asyncio.run(run_agent())
    assert second.counters.enrolments == 0 and second.counters.registrations == 1
    assert path.read_text().strip() == credential


def test_daemon_without_credential_or_join_token_says_so(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("JASPER_NODE_TOKEN", "JASPER_JOIN_TOKEN")
    }
    cmd = [sys.executable, "-m", "jasper_cli.main", "relay", "--controller", "http://127.0.0.1:9",
           "--node-name", "relay-a", "--state-dir", str(tmp_path)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "no credential" in r.stderr and "join token" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [*cmd, "--join-token-file", str(tmp_path / "missing")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0 and "missing or empty" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
