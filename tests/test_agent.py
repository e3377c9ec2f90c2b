"""Node agent and latency prober: real sockets, a real controller process on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from controller.loopback import LoopbackController
from controller.planner import hash_token
from jasper.latency import (
    ECHO,
    PROBE,
    LinkWindow,
    ProbeError,
    ProbePacket,
    decode_probe,
    echo_for,
)
from jasper.topology import Topology
from jasper_cli.controller import seed_join_tokens
from overlay.agent import Agent, ControllerClient, ControllerRefused, ControllerUnavailable
from overlay.credential import NodeCredentialSource
from overlay.prober import Prober

# --- probe bookkeeping (sans-IO) -----------------------------------------------------------


def test_probe_round_trip_and_malformed() -> None:
    p = ProbePacket(PROBE, 7, 123, 0, "relay-1")
    assert decode_probe(p.encode()) == p
    for bad in (b"", b"JPRB", b"XXXX" + p.encode()[4:], p.encode()[:4] + b"\x09" + p.encode()[5:]):
        with pytest.raises(ProbeError):
            decode_probe(bad)


def test_link_window_summary_with_a_hand_clock() -> None:
    w = LinkWindow("b", size=8)
    now = 1_000_000
    owds = [100, 120, 100, 140]
    for owd in owds:
        probe = w.probe(sender="a", now_ns=now)
        echo = echo_for(probe, responder="b", now_ns=now + owd)
        assert echo.kind == ECHO
        assert w.echo(echo, now_ns=now + 2 * owd)
        assert not w.echo(echo, now_ns=now + 2 * owd)  # duplicates do not count twice
        now += 1000
    w.probe(sender="a", now_ns=now)  # in flight: not lost yet
    s = w.summary()
    assert s is not None
    assert s.owd_ns == 120 and s.rtt_ns == 240 and s.samples == 4 and s.lost == 0
    assert s.jitter_ns == (20 + 20 + 40) // 3
    w.probe(sender="a", now_ns=now + 10)
    summary = w.summary()
    assert summary is not None and summary.lost == 1
    assert w.silent_for_ns(now + 5000) == now + 5000 - (now - 1000 + 280)


# --- prober on real UDP sockets ------------------------------------------------------------


async def test_probers_measure_each_other_and_notice_a_dead_peer() -> None:
    a = Prober(name="a", addr="127.0.0.1", port=0, interval_s=0.02, dead_after_s=0.3)
    b = Prober(name="b", addr="127.0.0.1", port=0, interval_s=0.02)
    await a.start()
    await b.start()
    # A port nobody answers on: the "dead" peer.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        a.set_peers([("b", "127.0.0.1", b.port), ("c", "127.0.0.1", silent.getsockname()[1])])
        b.set_peers([("a", "127.0.0.1", a.port)])
        await asyncio.sleep(0.6)
        sa = {s.peer: s for s in a.summaries()}
        assert set(sa) == {"b"}
        assert sa["b"].samples >= 5 and 0 < sa["b"].rtt_ns < 50_000_000
        assert 0 < sa["b"].owd_ns <= sa["b"].rtt_ns
        assert {s.peer for s in b.summaries()} == {"a"}
        assert a.dead_peers() == ["c"]
        assert b.echoes_sent >= 5
        # Garbage is counted and dropped, never raised.
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        junk.sendto(b"not a probe", ("127.0.0.1", a.port))
        junk.close()
        await asyncio.sleep(0.05)
        assert a.malformed["length"] == 1
    finally:
        a.close()
        b.close()
        silent.close()


# --- agent against a controller process ----------------------------------------------------


class RecordingDaemon:
    """Takes plans like a relay daemon does and remembers them."""

    def __init__(self) -> None:
        self.plans: list[Topology] = []

    def apply_topology(self, topo: Topology) -> None:
        self.plans.append(topo)

    def status(self) -> dict[str, Any]:
        return {"plans": len(self.plans), "nested": {"sent": 5}}


join_tokens: dict[str, str] = {}
"""The join token each agent of make_agent enrolled with, by node name."""


async def until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_agent(ctl: LoopbackController, name: str, role: str, port: int, **kw: Any) -> Agent:
    """An agent that enrols with its own join token (kept in `join_tokens` for re-seeding)."""
    join_tokens[name] = ctl.join_token(name)
    return Agent(
        controller=ctl.url,
        credential=NodeCredentialSource(credential_file=None, join_token=join_tokens[name]),
        node_name=name,
        role=role,
        data_addr="127.0.0.1",
        port=port,
        heartbeat_s=0.2,
        poll_wait_s=5,
        max_backoff_s=0.5,
        **kw,
    )


@pytest.mark.slow
async def test_agent_follows_plans_survives_outage_and_reregisters(tmp_path: Path) -> None:
    ctl = LoopbackController(db_path=tmp_path / "c.db", heartbeat_timeout_s=5)
    await asyncio.to_thread(ctl.start)
    relay_daemon, rx_daemon = RecordingDaemon(), RecordingDaemon()
    relay = make_agent(ctl, "relay0", "relay", 17000, daemon=relay_daemon, probe_port=0)
    rx = make_agent(ctl, "rx0", "receiver", 17100, capacity=8, daemon=rx_daemon, probe_port=0)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in (relay, rx)]
    try:
        await asyncio.to_thread(ctl.create_stream, 1, "md")
        topo = await asyncio.wait_for(relay.wait_topology(), 20)
        assert topo.relay("relay0").port == 17000
        _, token = await asyncio.to_thread(ctl.create_mp, "mp")
        await asyncio.to_thread(ctl.subscribe, token, 1, "127.0.0.1", 17101)
        await until(lambda: any(p.endpoints() for p in rx_daemon.plans), 10, "endpoint in plan")
        assert [e.port for _, e in rx_daemon.plans[-1].endpoints()] == [17101]

        # Heartbeats carry daemon counters, clock status and probe summaries.
        def reported() -> bool:
            node = ctl.call("GET", "/v1/nodes/relay0")
            status = node["status"] or {}
            return status.get("nested.sent") == 5.0 and node["clock"]["status"] == "unknown"

        await until(lambda: reported(), 10, "status in heartbeats")
        await until(lambda: relay.prober is not None and relay.prober.summaries(), 10, "probes")
        await until(
            lambda: any(src == "relay0" for src, *_ in _latency_rows(ctl)), 10, "latency rows"
        )

        # Controller gone: the daemons keep their last plan, the agents notice and retry.
        plans_before = len(relay_daemon.plans)
        last = relay_daemon.plans[-1]
        await asyncio.to_thread(ctl.kill)
        await until(lambda: not relay.connected and not rx.connected, 10, "disconnect")
        await asyncio.sleep(1.0)
        assert len(relay_daemon.plans) == plans_before and relay.topology == last

        # Back with the same database: reconnect, same plan, no re-apply.
        await asyncio.to_thread(ctl.start)
        await until(lambda: relay.connected and rx.connected, 20, "reconnect")
        assert relay.counters.disconnects >= 1 and relay.counters.registrations == 1
        await asyncio.to_thread(ctl.subscribe, token, 1, "127.0.0.1", 17102)
        await until(lambda: len(rx_daemon.plans[-1].endpoints()) == 2, 10, "plan after the restart")

        # Back with an empty database: the agents register again. Their join tokens are seeded
        # into it as a deployment's controller does at boot (--seed-join-tokens), so the
        # agents, whose credentials the new database does not know, enrol again.
        await asyncio.to_thread(ctl.kill)
        for suffix in ("", "-wal", "-shm"):
            Path(str(ctl.db_path) + suffix).unlink(missing_ok=True)
        seeds = {name: hash_token(token) for name, token in join_tokens.items()}
        assert seed_join_tokens(str(ctl.db_path), seeds, ttl_s=600) == 2
        await asyncio.to_thread(ctl.start)
        # Both agents come back, each at its own retry time.
        await until(
            lambda: relay.counters.registrations >= 2 and rx.counters.registrations >= 2,
            20,
            "re-registration",
        )
        nodes = {n["name"] for n in await asyncio.to_thread(ctl.nodes)}
        assert nodes == {"relay0", "rx0"}
        # The new controller counts versions from scratch; the agents still follow it.
        epoch_before = relay.topology.plan_epoch if relay.topology else None
        await asyncio.to_thread(ctl.create_stream, 1, "md", hedge=1)
        await until(
            lambda: relay_daemon.plans[-1].stream.hedge == 1, 10, "plan of the new controller"
        )
        assert epoch_before is not None
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.to_thread(ctl.close)


def _latency_rows(ctl: LoopbackController) -> list[tuple[str, str]]:
    import sqlite3

    conn = sqlite3.connect(ctl.db_path)
    try:
        return [(r[0], r[1]) for r in conn.execute("SELECT src, dst FROM latency")]
    finally:
        conn.close()


async def test_client_errors_are_classified(tmp_path: Path) -> None:
    # Nothing listens on this port: unavailable, not a crash.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ControllerClient(f"http://127.0.0.1:{port}", "t")
    with pytest.raises(ControllerUnavailable):
        await client.request("GET", "/healthz", timeout_s=1)
    with pytest.raises(ValueError):
        ControllerClient("ftp://example.com", "t")  # http and https only
    ctl = LoopbackController(db_path=tmp_path / "c.db")
    await asyncio.to_thread(ctl.start)
    try:
        bad = ControllerClient(ctl.url, "wrong-token")
        with pytest.raises(ControllerRefused) as info:
            await bad.request("GET", "/v1/nodes")
        assert info.value.status == 401
        good = ControllerClient(ctl.url, ctl.admin_token)
        assert (await good.request("GET", "/healthz"))["status"] == "ok"
        assert await good.request("GET", "/v1/nodes") == []
    finally:
        await asyncio.to_thread(ctl.close)


@pytest.mark.slow
def test_daemon_flags_turn_the_prober_off_and_set_the_heartbeat(tmp_path: Path) -> None:
    """`--probe-port -1` registers no prober; `--heartbeat-s` sets how often the agent reports."""
    import subprocess
    import sys

    with LoopbackController(db_path=tmp_path / "c.db") as ctl:
        base = [sys.executable, "-m", "jasper_cli.main", "receiver", "--controller", ctl.url,
                "--no-realtime", "--endpoints", "2"]  # fmt: skip
        procs = [
            subprocess.Popen(
                [
                    *base,
                    "--node-name",
                    name,
                    "--port-base",
                    str(port),
                    *extra,
                    *credential_args(ctl, tmp_path, name),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / f"{name}.log", "wb"),  # noqa: SIM115
            )
            for name, port, extra in (
                ("rx-quiet", 17300, ["--probe-port", "-1", "--heartbeat-s", "0.2"]),
                ("rx-default", 17310, []),
            )
        ]
        try:
            deadline = time.monotonic() + 30
            beats: dict[str, float] = {}
            while time.monotonic() < deadline:
                nodes = {n["name"]: n for n in ctl.nodes()}
                beats = {
                    name: (node.get("status") or {}).get("agent.heartbeats", 0.0)
                    for name, node in nodes.items()
                }
                if beats.get("rx-quiet", 0) >= 12:
                    break
                time.sleep(0.2)
            logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
            assert set(nodes) == {"rx-quiet", "rx-default"}, logs
            assert nodes["rx-quiet"]["probe_port"] is None
            assert isinstance(nodes["rx-default"]["probe_port"], int)
            # Started together: 5 a second against the default 1 a second.
            assert beats["rx-quiet"] >= 12 and beats["rx-default"] <= beats["rx-quiet"] / 2, beats
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                assert p.wait(20) == 0


def credential_args(ctl: LoopbackController, folder: Path, name: str) -> list[str]:
    """A daemon's own join token and credential file (docs/security-nodes.md)."""
    join = ctl.write_join_token_file(folder / f"{name}.join", name)
    return ["--join-token-file", str(join), "--credential-file", str(folder / f"{name}.cred")]


def test_daemon_flags_are_validated() -> None:
    import subprocess
    import sys

    for flag, value, says in (("--probe-port", "-2", "-1 for no prober"),
                              ("--heartbeat-s", "0", "must be > 0")):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "jasper_cli.main", "relay", "--controller", "http://x",
             "--node-name", "r", flag, value],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
