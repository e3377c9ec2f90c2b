"""Restart: kill -9 the controller under live traffic, restart it on the same SQLite file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from controller.loopback import (
    DaemonSet,
    DeliverySink,
    LoopbackController,
    free_udp_block,
    wait_for,
)

RELAYS = [f"relay{i}" for i in range(4)]
HOSTS = ["rx0", "rx1"]
PER_HOST = 4


def snapshot(ctl: LoopbackController, mp_tokens: list[str]) -> dict[str, object]:
    tree = ctl.tree(1)
    # Predicted times depend on latency measurements that keep arriving; the plan must not.
    for e in tree["endpoints"]:
        e.pop("predicted_arrival_ns")
    for key in ("predicted_oml_ns", "predicted_median_ns", "lemons"):
        tree.pop(key)
    return {
        "mps": ctl.call("GET", "/v1/mps"),
        "subscriptions": ctl.call("GET", "/v1/subscriptions"),
        "own": [ctl.call("GET", "/v1/subscriptions", token=t) for t in mp_tokens],
        "streams": ctl.call("GET", "/v1/streams"),
        "tree": tree,
    }


def diagnostics(sink: DeliverySink, n: int, workdir: Path) -> str:
    """What each endpoint got and the tail of every daemon's log, for a failure message."""
    lines = [f"deliveries per endpoint: {[len(sink.times[i]) for i in range(n)]}"]
    for log in sorted(workdir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-8:]
        lines.append(f"== {log.name}")
        lines.extend(tail)
    return "\n".join(lines)


@pytest.mark.slow
def test_restart_keeps_state_and_traffic_flows(tmp_path: Path) -> None:
    n = len(HOSTS) * PER_HOST
    # A generous timeout: this test is about restarts, not about declaring nodes dead, and a
    # loaded CI machine may delay heartbeats by seconds.
    ctl = LoopbackController(db_path=tmp_path / "controller.db", heartbeat_timeout_s=20)
    ctl.start()
    daemons = DaemonSet(ctl, tmp_path)
    sink = DeliverySink(n)
    try:
        # depth 2, fan-out 3: a root and three leaf relays, so every endpoint gets H+1 = 3
        # copies even in this small tree.
        # Two relay processes hosting two relay nodes each (consecutive ports), as the demo
        # packs relays.
        for pair in (RELAYS[:2], RELAYS[2:]):
            base = free_udp_block(2)
            daemons.start("relay", ",".join(pair), "--port", str(base), "--fast-path", "user")
        bases = {}
        for h in HOSTS:
            bases[h] = free_udp_block(PER_HOST)
            daemons.start(
                "receiver",
                h,
                "--port-base",
                str(bases[h]),
                "--endpoints",
                str(PER_HOST),
                "--fast-path",
                "user",
                "--no-realtime",
            )
        daemons.start("publisher", "pub", "--stream", "1", "--rate", "100")
        ctl.wait_nodes({*RELAYS, *HOSTS, "pub"}, 60)
        # The stream is created once every relay has joined, so its first plan is the full tree
        # (as the demo does); planning while relays join is covered by the controller API tests.
        ctl.create_stream(1, "md", depth=2, fanout=3, hold_ns=2_000_000)

        tokens = []
        for i in range(n):
            _, token = ctl.create_mp(f"mp{i}")
            tokens.append(token)
            host = HOSTS[i // PER_HOST]
            ctl.subscribe(
                token,
                1,
                "127.0.0.1",
                bases[host] + i % PER_HOST,
                deliver=f"udp:127.0.0.1:{sink.port(i)}",
            )
        # Every endpoint receives before the controller goes away.
        try:
            wait_for(lambda: all(len(sink.times[i]) > 20 for i in range(n)), 60, "first deliveries")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{diagnostics(sink, n, tmp_path)}") from None
        ctl.wait_applied({*RELAYS, *HOSTS, "pub"}, 30)

        def fully_hedged() -> bool:
            tree = ctl.tree(1)
            parents_ok = all(len(set(e["parents"])) == 3 for e in tree["endpoints"])
            return tree["pending_epoch"] is None and parents_ok

        try:
            wait_for(fully_hedged, 15, "every endpoint planned with 3 parents")
        except AssertionError:
            # Known gap (about 1 run in 10 here): incremental attaches while relays are still
            # joining can leave an endpoint short of H+1 parents until a full re-plan, which
            # operators request through this endpoint.
            ctl.call("POST", "/v1/streams/1/replan")
            wait_for(fully_hedged, 30, "every endpoint planned with 3 parents after a re-plan")
            ctl.wait_applied({*RELAYS, *HOSTS, "pub"}, 30)
        before = snapshot(ctl, tokens)
        beats_before = {node["name"]: node["status"]["agent.heartbeats"] for node in ctl.nodes()}

        ctl.kill()
        down_at = time.monotonic()
        time.sleep(3.0)
        up_at = time.monotonic()
        # Traffic kept flowing to every endpoint while nobody answered the agents.
        during = [sink.count_between(i, down_at + 0.5, up_at) for i in range(n)]
        assert all(c >= 50 for c in during), during
        assert len(daemons.alive()) == 5

        ctl.start()
        after = snapshot(ctl, tokens)
        assert after == before

        # Agents reconnect: fresh heartbeats arrive, each counted a lost controller.
        def reconnected() -> bool:
            nodes = {node["name"]: node for node in ctl.nodes()}
            return all(
                nodes[name]["alive"]
                and nodes[name]["status"]["agent.heartbeats"] > beats_before[name]
                and nodes[name]["status"]["agent.disconnects"] >= 1
                for name in nodes
            )

        wait_for(reconnected, 30, "agents to reconnect")
        ctl.wait_applied({*RELAYS, *HOSTS, "pub"}, 30)
        mark = time.monotonic()
        wait_for(
            lambda: all(sink.count_between(i, mark, time.monotonic()) > 10 for i in range(n)),
            30,
            "deliveries after the restart",
        )
        assert snapshot(ctl, tokens) == before
    finally:
        codes = daemons.stop()
        sink.close()
        ctl.close()
    assert all(code == 0 for code in codes.values()), codes
