"""A receiver opens sockets for endpoints a new plan adds, in place: held messages and records
stay, the new endpoint receives and delivers at once."""

from __future__ import annotations

import asyncio
import copy
import socket
import time
from typing import Any

import pytest

from jasper.layout import ports_needed, topology_from_plan
from jasper.mp_spec import payloads as mp_payloads
from jasper.topology import parse_topology
from jasper.tree import tree_shape
from jasper.wire import Header, encode
from overlay.launch import free_port_base
from overlay.receiver import Receiver

ADDR = "127.0.0.1"


def _docs(sink_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plan 1 with endpoint e0 only, plan 2 adding e1 which delivers to `sink_port`)."""
    plan = tree_shape(2, fanout=2, hedge=0)
    base = free_port_base(ADDR, ports_needed(plan))
    full = topology_from_plan(plan, addr=ADDR, port_base=base, hold_ns=20_000_000).to_dict()
    full["plan_epoch"] = 2
    full["receivers"][0]["endpoints"][1]["deliver"] = f"udp:{ADDR}:{sink_port}"
    first = copy.deepcopy(full)
    first["plan_epoch"] = 1
    first["receivers"][0]["endpoints"] = first["receivers"][0]["endpoints"][:1]
    first["relays"][0]["targets"] = first["relays"][0]["targets"][:1]
    return first, full


def _message(seq: int, deadline_ns: int) -> bytes:
    h = Header(
        stream_id=1,
        session=7,
        seq=seq,
        send_time_ns=time.time_ns(),
        deadline_ns=deadline_ns,
        plan_epoch=1,
    )
    return encode(h, b"update-%d" % seq)


async def _until(cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_new_endpoint_opens_in_place_keeping_held_messages_and_records() -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((ADDR, 0))
    sink.settimeout(10)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    first, full = _docs(sink.getsockname()[1])
    port = {e["name"]: e["port"] for e in full["receivers"][0]["endpoints"]}

    async def main() -> list[tuple[str, int, int, int]]:
        rx = Receiver(parse_topology(first), "h0", realtime=False, link_model=False)
        rx.start()
        try:
            assert set(rx.by_name) == {"e0"}
            records = rx.records
            # Held across the change: its deadline is well after the new plan arrives.
            held_deadline = time.time_ns() + 400_000_000
            sender.sendto(_message(1, held_deadline), (ADDR, port["e0"]))
            await _until(lambda: rx.held() == 1, 10)

            rx.apply_topology(parse_topology(full))
            assert set(rx.by_name) == {"e0", "e1"}
            assert rx.topo.plan_epoch == 2
            assert rx.held() == 1  # nothing dropped
            assert rx.records is records

            deadline = time.time_ns() + 100_000_000
            for name in ("e0", "e1"):
                sender.sendto(_message(2, deadline), (ADDR, port[name]))
            await _until(lambda: len(rx.records) == 3, 20)
            assert rx.by_name["e1"].counters.accepted == 1
            assert rx.by_name["e1"].counters.delivered == 1
            status = rx.status()
            assert set(status["endpoints"]) == {"e0", "e1"}
        finally:
            rx.stop()
            rx.close()
        arr = rx.records.array()
        return [
            (str(r["endpoint"]), int(r["seq"]), int(r["release_ns"]), int(r["deadline_ns"]))
            for r in arr
        ]

    try:
        rows = asyncio.run(main())
        # The new endpoint's socket delivery reached its MP.
        assert mp_payloads(sink.recv(65536)) == [b"update-2"]
    finally:
        sink.close()
        sender.close()
    assert sorted((e, s) for e, s, _, _ in rows) == [("e0", 1), ("e0", 2), ("e1", 2)]
    # Released at their deadlines, not at once (nothing was treated as late).
    assert all(release >= deadline for _, _, release, deadline in rows)


def _with_stream(doc: dict[str, Any], stream: int, endpoints: list[str]) -> dict[str, Any]:
    """`doc` as the plan of `stream` whose receiver host has only `endpoints`."""
    out = copy.deepcopy(doc)
    out["stream"]["id"] = stream
    host = out["receivers"][0]
    host["endpoints"] = [e for e in host["endpoints"] if e["name"] in endpoints]
    known = {r["name"] for r in out["relays"]} | set(endpoints)
    for relay in out["relays"]:
        relay["targets"] = [t for t in relay["targets"] if t["node"] in known]
    return out


def _copy_of(stream: int, seq: int, deadline_ns: int) -> bytes:
    h = Header(
        stream_id=stream, session=7, seq=seq, send_time_ns=time.time_ns(),
        deadline_ns=deadline_ns, plan_epoch=2,
    )  # fmt: skip
    return encode(h, b"s%d-%d" % (stream, seq))


def test_a_host_serves_endpoints_of_several_streams_and_one_can_go() -> None:
    """Endpoint e0 in stream 1's plan, e1 in stream 2's: each takes its own stream only;
    removing stream 2 leaves stream 1's held messages and state alone, releases what e1 held,
    and e1's port can serve a later stream."""
    _, full = _docs(0)
    for e in full["receivers"][0]["endpoints"]:
        e["deliver"] = None
    port = {e["name"]: e["port"] for e in full["receivers"][0]["endpoints"]}
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def main() -> list[tuple[str, int, int]]:
        rx = Receiver(
            parse_topology(_with_stream(full, 1, ["e0"])), "h0", realtime=False, link_model=False
        )
        rx.start()
        try:
            rx.apply_topology(parse_topology(_with_stream(full, 2, ["e1"])))
            assert set(rx.plans) == {1, 2} and set(rx.by_name) == {"e0", "e1"}
            later = time.time_ns() + 400_000_000
            sender.sendto(_copy_of(1, 1, later), (ADDR, port["e0"]))
            sender.sendto(_copy_of(2, 1, later), (ADDR, port["e1"]))
            sender.sendto(_copy_of(2, 2, later), (ADDR, port["e0"]))  # not e0's stream
            await _until(lambda: rx.held() == 2, 10)
            assert rx.by_name["e0"].counters.rejected["stream"] == 1

            rx.remove_stream(2)
            assert set(rx.plans) == {1} and rx.status()["streams"] == {"1": 2}
            assert rx.held() == 2  # what e1 held is still released, at its deadline
            sender.sendto(_copy_of(2, 3, later), (ADDR, port["e1"]))
            sender.sendto(_copy_of(1, 2, later), (ADDR, port["e0"]))
            await _until(lambda: rx.held() == 3, 10)
            await _until(lambda: rx.by_name["e1"].counters.rejected["stream"] == 1, 10)

            # A later stream's plan names e1's port again: the endpoint serves that stream.
            rx.apply_topology(parse_topology(_with_stream(full, 3, ["e1"])))
            assert not rx.plan_refused
            sender.sendto(_copy_of(3, 1, later), (ADDR, port["e1"]))
            await _until(lambda: rx.held() == 4, 10)
        finally:
            rx.stop()
            rx.close()
        arr = rx.records.array()
        return [(str(r["endpoint"]), int(r["stream_id"]), int(r["seq"])) for r in arr]

    try:
        rows = asyncio.run(main())
    finally:
        sender.close()
    assert sorted(rows) == [("e0", 1, 1), ("e0", 1, 2), ("e1", 2, 1), ("e1", 3, 1)]


def test_relay_forwards_by_plan_epoch_during_a_switch() -> None:
    """Make-before-break at a relay that is in both plans: copies stamped with the old epoch
    still reach the old plan's endpoint, new-epoch copies the new one; once the switch is
    over (no "x-previous"), every epoch takes the new plan."""
    from overlay.relay import Relay

    plan = tree_shape(2, fanout=2, hedge=0)
    base = free_port_base(ADDR, ports_needed(plan))
    full = topology_from_plan(plan, addr=ADDR, port_base=base, hold_ns=20_000_000).to_dict()
    eps = {e["name"]: e["port"] for e in full["receivers"][0]["endpoints"]}
    old = copy.deepcopy(full)
    old["plan_epoch"] = 1
    old["relays"][0]["targets"] = [{"node": "e0", "hedge": False}]
    new = copy.deepcopy(full)
    new["plan_epoch"] = 2
    new["relays"][0]["targets"] = [{"node": "e1", "hedge": False}]
    switching = {**copy.deepcopy(new), "x-previous": old}
    # The endpoints' sockets stand in for receivers: which one a copy reaches is the point.
    sinks = {}
    for name, port in eps.items():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ADDR, port))
        s.settimeout(0.3)
        sinks[name] = s
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay_port = full["relays"][0]["port"]

    def send(seq: int, epoch: int) -> None:
        h = Header(
            stream_id=1, session=7, seq=seq, send_time_ns=time.time_ns(),
            deadline_ns=time.time_ns() + 10**9, plan_epoch=epoch,
        )  # fmt: skip
        sender.sendto(encode(h, b"x"), (ADDR, relay_port))

    def got() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {n: [] for n in sinks}
        for name, s in sinks.items():
            while True:
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    break
                out[name].append(int.from_bytes(data[16:24], "big"))
        return out

    async def step(relay: Relay, sends: list[tuple[int, int]]) -> None:
        for seq, epoch in sends:
            send(seq, epoch)
        await asyncio.sleep(0.2)

    async def main() -> list[dict[str, list[int]]]:
        relay = Relay(parse_topology(old), ["r0.0"], link_model=False)
        relay.start()
        seen = []
        try:
            await step(relay, [(1, 1)])
            seen.append(await asyncio.to_thread(got))
            relay.apply_topology(parse_topology(switching))
            await step(relay, [(2, 1), (3, 2)])
            seen.append(await asyncio.to_thread(got))
            relay.apply_topology(parse_topology(new))
            await step(relay, [(4, 1), (5, 2)])
            seen.append(await asyncio.to_thread(got))
        finally:
            relay.close()
        return seen

    try:
        before, during, after = asyncio.run(main())
    finally:
        for s in sinks.values():
            s.close()
        sender.close()
    assert before == {"e0": [1], "e1": []}
    assert during == {"e0": [2], "e1": [3]}
    assert after == {"e0": [], "e1": [4, 5]}


@pytest.mark.parametrize("datapath", ["python", "native"])
def test_a_bad_deliver_target_leaves_out_that_endpoint_only(datapath: str) -> None:
    """Issue 15 item 4: a receiver applies the valid part of a plan and reports the rest; a
    bad entry never blocks the plan nor the next one (once, udp:…:99999 failed every later
    plan with struct.error)."""
    sinks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for s in sinks:
        s.bind((ADDR, 0))
        s.settimeout(10)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plan = tree_shape(3, fanout=3, hedge=0)
    base = free_port_base(ADDR, ports_needed(plan))
    first = topology_from_plan(plan, addr=ADDR, port_base=base, hold_ns=1_000_000).to_dict()
    eps = first["receivers"][0]["endpoints"]
    assert [e["name"] for e in eps] == ["e0", "e1", "e2"]
    eps[0]["deliver"] = f"udp:{ADDR}:{sinks[0].getsockname()[1]}"
    eps[1]["deliver"] = f"udp:{ADDR}:99999"
    eps[2]["deliver"] = "unix:relative/mp.sock"
    second = copy.deepcopy(first)
    second["plan_epoch"] = 2
    eps = second["receivers"][0]["endpoints"]
    eps[0]["deliver"] = "tcp:10.0.0.1:80"  # e0 keeps delivering where it did
    eps[1]["deliver"] = f"udp:{ADDR}:{sinks[1].getsockname()[1]}"  # e1 fixed: it opens
    port = {e["name"]: e["port"] for e in eps}

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        rx = Receiver(parse_topology(first), "h0", realtime=False, link_model=False,
                      datapath=datapath)  # fmt: skip
        rx.start()
        try:
            assert set(rx.by_name) == {"e0"}
            before = rx.status()
            rx.apply_topology(parse_topology(second))
            assert set(rx.by_name) == {"e0", "e1"}
            after = rx.status()
            deadline = time.time_ns() + 20_000_000
            for name in ("e0", "e1"):
                sender.sendto(_message(1, deadline), (ADDR, port[name]))
            await _until(lambda: len(rx.records) == 2, 20)
        finally:
            rx.stop()
            rx.close()
        return before, after

    try:
        before, after = asyncio.run(main())
        assert [mp_payloads(s.recv(65536)) for s in sinks] == [[b"update-1"]] * 2
    finally:
        for s in sinks:
            s.close()
        sender.close()
    assert before["refused_endpoints"] == 2
    assert "port 99999 is out of range" in before["refused"]["e1"]
    assert "not absolute" in before["refused"]["e2"]
    assert after["refused_endpoints"] == 2
    assert set(after["refused"]) == {"e0", "e2"}
    assert "deliver must be udp:ADDR:PORT" in after["refused"]["e0"]
