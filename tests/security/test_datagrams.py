"""An attacker on the data network while a stream flows: forged, replayed, far-ahead and
new-session datagrams at the root relay and at every endpoint, over real loopback sockets, on
the user-space relay and both receive paths (and the eBPF relay and receiver filter in a
namespace). None may be released, the real stream must arrive whole, and each is counted."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections import Counter
from typing import Any

import pytest

from jasper.mp_spec import payloads as mp_payloads
from jasper.topology import StreamAuth, Topology
from jasper.wire import Header, StreamKey, encode, encode_batch
from jasper.wire_spec import FLAG_HEARTBEAT
from tests.test_overlay_path import DATAPATHS, Overlay, make_topology, settle

KEY = StreamKey(1, os.urandom(32))
SESSION = 4242
MESSAGES = 60
EVIL = b"EVIL-INJECTED"


def keyed(topo: Topology) -> Topology:
    """The topology as the controller hands it out: keyed, with the session announced."""
    stream = dataclasses.replace(
        topo.stream, auth=StreamAuth(keys=(KEY,), sign_epoch=KEY.epoch), session=SESSION
    )
    return dataclasses.replace(topo, stream=stream)


def attacks(real: list[bytes]) -> dict[str, list[bytes]]:
    """Datagrams an attacker sends, by the reject reason each must be counted under."""
    stolen = StreamKey(1, os.urandom(32))  # a guess at the key
    insider = KEY  # a node that holds the key but plays foul

    def header(**kw: Any) -> Header:
        base: dict[str, Any] = dict(
            stream_id=1, session=SESSION, seq=1, send_time_ns=1, deadline_ns=0
        )
        return Header(**{**base, **kw})

    return {
        # The attack of the issue: session 0xFFFFFFFF, seq 1, no MAC.
        "key": [encode(header(session=0xFFFFFFFF, seq=s), EVIL) for s in range(1, 40)]
        + [encode(header(seq=10**12 + s), EVIL) for s in range(40)]
        + [encode(header(flags=FLAG_HEARTBEAT, seq=5)) for _ in range(5)],
        "mac": [encode(header(seq=s), EVIL, key=stolen) for s in range(1, 40)]
        # A real datagram with its payload changed after signing.
        + [d[: -len(EVIL)] + EVIL for d in real if len(d) > 64 + 2 + len(EVIL)][:20],
        "stream": [encode(header(stream_id=99, seq=s), EVIL, key=insider) for s in range(1, 20)],
        "session": [
            encode(header(session=SESSION + 1, seq=s), EVIL, key=insider) for s in range(1, 20)
        ],
        "ahead": [encode(header(seq=2**40 + s), EVIL, key=insider) for s in range(20)],
    }


class Captured(Overlay):
    """The overlay, with every datagram the publisher signs kept for replay."""

    def __init__(self, topo: Topology, **kw: Any) -> None:
        super().__init__(topo, **kw)
        self.sent: list[bytes] = []
        send = self.pub._send

        def keep(data: bytes) -> None:
            self.sent.append(data)
            send(data)

        self.pub._send = keep  # type: ignore[method-assign]


async def run_under_attack(o: Captured, topo: Topology) -> dict[str, int]:
    """Publish MESSAGES while the attacker sends everything at the root relay and each
    endpoint, then replays every real datagram; returns how many of each kind it sent."""
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    root = topo.address_of(topo.publisher.targets[0].node)
    endpoints = [topo.address_of(e.name) for _, e in topo.endpoints()]
    sent: Counter[str] = Counter()
    try:
        for i in range(MESSAGES):
            o.pub.publish(b"real %d" % i)
            if i % 10 == 5:
                for reason, datagrams in attacks(o.sent).items():
                    for d in datagrams:
                        for addr in (root, *endpoints[:: max(1, len(endpoints) // 4)]):
                            attacker.sendto(d, addr)
                            sent[reason] += 1
            await asyncio.sleep(0.002)
        for d in o.sent:  # replays of the real stream, at the relay and at an endpoint
            attacker.sendto(d, root)
            attacker.sendto(d, endpoints[0])
            sent["replay"] += 2
        await settle(o.rx, MESSAGES * len(endpoints))
        await asyncio.sleep(0.2)  # anything forged would be released by now
    finally:
        attacker.close()
    return dict(sent)


@pytest.mark.parametrize("datapath", DATAPATHS)
async def test_forged_replayed_far_ahead_and_new_session_datagrams_change_nothing(
    datapath: str,
) -> None:
    topo = keyed(make_topology(hold_ns=20_000_000))
    o = Captured(topo, datapath=datapath)
    o.start()
    try:
        sent = await run_under_attack(o, topo)
    finally:
        o.close()
    assert sum(sent.values()) >= 1000
    recs = o.rx.records.array()
    n_endpoints = len(topo.endpoints())
    # The stream is whole: every real message exactly once at every endpoint, no other.
    assert len(recs) == MESSAGES * n_endpoints
    assert {int(s) for s in recs["seq"]} == set(range(1, MESSAGES + 1))
    assert {int(s) for s in recs["session"]} == {SESSION}
    status = o.rx.status()["endpoints"]
    rejected: Counter[str] = Counter()
    for name, c in status.items():
        assert c["delivered"] == MESSAGES, name
        rejected.update(c["rejected"])
    relay = o.relay.status()["nodes"]
    relay_rejected: Counter[str] = Counter()
    for c in relay.values():
        relay_rejected.update(c["rejected"])
    # Every kind was seen and counted where it was sent, under its own reason.
    for reason in ("key", "mac", "stream", "session", "ahead"):
        assert rejected[reason] > 0, (reason, dict(rejected))
        assert relay_rejected[reason] > 0, (reason, dict(relay_rejected))
    # The relay forwarded none of them: endpoints it did not hit directly saw no forgery.
    hit = {e.name for _, e in topo.endpoints()[:: max(1, n_endpoints // 4)]}
    for name, c in status.items():
        if name not in hit:
            assert not c["rejected"], (name, c["rejected"])


async def test_payloads_delivered_to_the_mp_are_the_publishers_only() -> None:
    """What reaches an MP's socket under attack: the real blocks, never the forged ones."""
    topo = keyed(make_topology(n=4, fanout=2, hedge=1, hold_ns=20_000_000, deliver=True))
    sinks = []
    for _, e in topo.endpoints():
        assert e.deliver is not None
        host, port = e.deliver.removeprefix("udp:").rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, int(port)))
        s.setblocking(False)
        sinks.append(s)
    o = Captured(topo, datapath="python")
    o.start()
    try:
        await run_under_attack(o, topo)
    finally:
        o.close()
    got: list[bytes] = []
    for s in sinks:
        while True:
            try:
                got += mp_payloads(s.recv(65536))
            except BlockingIOError:
                break
        s.close()
    assert got and not [m for m in got if EVIL in m]
    assert Counter(got) == Counter({b"real %d" % i: len(sinks) for i in range(MESSAGES)})


def test_ten_thousand_forgeries_at_a_receiver_core_release_nothing() -> None:
    """The target figure, on the core both paths implement: 10,000 forged or replayed
    datagrams interleaved with 1,000 real ones; 0 forgeries released."""
    from jasper.receiver_core import ReceiverCore

    core = ReceiverCore(endpoints=1)
    core.set_stream(1, keys={KEY.epoch: KEY.key}, session=SESSION)
    real = [
        encode_batch(
            Header(stream_id=1, session=SESSION, seq=i, send_time_ns=1, deadline_ns=0),
            [b"real %d" % i],
            key=KEY,
        )
        for i in range(1, 1001)
    ]
    forged = [d for ds in attacks(real).values() for d in ds]
    released: list[bytes] = []
    now = 10
    i = 0
    count = 0
    while count < 10_000:
        for d in forged:
            core.datagram_received(0, d, 1, now, now)
            count += 1
        core.datagram_received(0, real[i % len(real)], 2, now, now)  # and replays of it
        i += 1
        released += [r.payload for r in core.releases()]
    for d in real[i:]:
        core.datagram_received(0, d, 2, now, now)
    released += [r.payload for r in core.releases()]
    assert count >= 10_000
    assert not [p for p in released if EVIL in p]
    assert len(released) == len(real)
    c = core.counters(0)
    assert c["released"] == len(real)
    assert (
        sum(v for k, v in c.items() if k.startswith("rejected_")) + c["stale"] + c["duplicates"]
        >= count
    )


@pytest.mark.privileged
@pytest.mark.parametrize("datapath", DATAPATHS)
async def test_the_kernel_path_forwards_forgeries_only_for_the_receivers_to_reject(
    datapath: str,
) -> None:
    """eBPF relays cannot check a MAC: they forward what they cannot judge, keyed on the MAC tag
    so a forgery never shadows a real copy; the receivers' kernel filter drops strangers, and
    user space rejects what a relay forwarded. The stream arrives whole."""
    from ebpf import loader
    from tests.conftest import can_netns, require_privileged

    require_privileged("network namespaces", can_netns())
    ok, why = loader.fast_path_available()
    require_privileged(f"eBPF fast path ({why})", ok)
    from ebpf.netlab import entered, sh

    ns = f"jt-sec-{os.getpid()}-{datapath}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        with entered(ns):
            topo = keyed(make_topology(hold_ns=20_000_000))
            o = Captured(topo, datapath=datapath)
            o.start()
            try:
                assert o.relay.enable_fast_path("ebpf") == "ebpf"
                assert o.rx.enable_fast_path("ebpf") == "ebpf"
                await run_under_attack(o, topo)
                kernel = o.rx.fast_path.counters()
                relay_kernel = [fp.counters() for fp in o.relay.fast_path.values()]
            finally:
                o.close()
    finally:
        sh("ip", "netns", "del", ns)
    recs = o.rx.records.array()
    assert len(recs) == MESSAGES * len(topo.endpoints())
    assert {int(s) for s in recs["seq"]} == set(range(1, MESSAGES + 1))
    rejected: Counter[str] = Counter()
    for c in o.rx.status()["endpoints"].values():
        assert c["delivered"] == MESSAGES
        rejected.update(c["rejected"])
    # Sent straight at endpoints, forgeries die in the kernel (not a parent); sent at the root,
    # the eBPF relay forwards what claims a stream it serves and user space rejects each by its
    # reason; a stream it has no table for dies in the relay's kernel (no_targets: the
    # per-stream tables of a relay in several trees).
    assert kernel["not_parent"] > 0, kernel
    for reason in ("key", "mac", "session", "ahead"):
        assert rejected[reason] > 0, (reason, dict(rejected))
    assert rejected["stream"] == 0, dict(rejected)
    assert sum(c["no_targets"] for c in relay_kernel) > 0, relay_kernel
