"""Publisher ingress: a matching engine hands messages over a local socket (udp: or unix:)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jasper.wire import decode, pack_blocks
from jasper.wire_spec import MAX_MESSAGE
from overlay.publisher import Publisher, open_ingress, parse_source
from tests.test_overlay_path import ADDR, make_topology


def root_sink(topo: object) -> socket.socket:
    """Listen where the root relay would, to see exactly what the publisher sends."""
    addr = topo.address_of(topo.publisher.targets[0].node)  # type: ignore[attr-defined]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(addr)
    s.setblocking(False)
    return s


def drain(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(2048))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("kind", ["udp", "unix"])
async def test_ingress_messages_are_published_in_order_with_their_own_sequence_numbers(
    kind: str, tmp_path: Path
) -> None:
    topo = make_topology(n=4, fanout=2, hedge=1)
    sink = root_sink(topo)
    source = f"unix:{tmp_path / 'engine.sock'}" if kind == "unix" else f"udp:{ADDR}:0"
    ingress = open_ingress(source)
    assert ingress is not None
    pub = Publisher(topo)
    engine = socket.socket(ingress.family, socket.SOCK_DGRAM)
    stop = asyncio.Event()
    task = asyncio.create_task(pub.run_ingress(ingress, stop=stop))
    try:
        await asyncio.sleep(0.05)
        to = ingress.getsockname()
        engine.sendto(pack_blocks([b"a1"]), to)
        engine.sendto(pack_blocks([b"b1", b"b2", b"b3"]), to)
        engine.sendto(b"\x00\x09short", to)  # a block running past the end
        engine.sendto(b"", to)  # no message at all
        engine.sendto(pack_blocks([b"x" * (MAX_MESSAGE + 1)]), to)
        engine.sendto(pack_blocks([b"c1"]), to)
        await asyncio.sleep(0.2)
        stop.set()
        published = await asyncio.wait_for(task, 5)
    finally:
        engine.close()
        ingress.close()
        pub.close()
    got = [decode(d) for d in drain(sink)]
    sink.close()
    messages = [(m.header.seq + i, body) for m in got for i, body in enumerate(m.messages)]
    assert messages == [(1, b"a1"), (2, b"b1"), (3, b"b2"), (4, b"b3"), (5, b"c1")]
    assert published == 5
    c = pub.status()["ingress"]
    assert (c["datagrams"], c["messages"], c["malformed"], c["oversize"]) == (6, 5, 2, 1)


async def test_ingress_batch_window_packs_messages_arriving_together() -> None:
    topo = make_topology(n=4, fanout=2, hedge=1)
    sink = root_sink(topo)
    ingress = open_ingress(f"udp:{ADDR}:0")
    assert ingress is not None
    pub = Publisher(topo, batch_ns=50_000_000)  # 50 ms: the three sends below share it
    engine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = asyncio.Event()
    task = asyncio.create_task(pub.run_ingress(ingress, stop=stop))
    try:
        await asyncio.sleep(0.05)
        for i in range(3):
            engine.sendto(pack_blocks([b"m%d" % i]), ingress.getsockname())
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        engine.close()
        ingress.close()
        pub.close()
    got = [decode(d) for d in drain(sink)]
    sink.close()
    assert [m.messages for m in got] == [(b"m0", b"m1", b"m2")]
    assert pub.datagrams == 1


def test_source_errors_are_clear() -> None:
    for bad in ("tcp:1.2.3.4:5", "udp:host", "udp:h:-1", "udp:h:70000", "unix:"):
        with pytest.raises(ValueError, match="expected"):
            parse_source(bad)
    proc = subprocess.run(
        [sys.executable, "-m", "jasper_cli.main", "publisher", "--source", "udp:h:x",
         "--topology", "t.json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--source" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", ["udp", "unix"])
async def test_the_exchange_example_feeds_the_publisher(kind: str, tmp_path: Path) -> None:
    """examples/exchange_feed.py, run as a program, feeds a publisher's ingress: every update
    is published once, in the engine's order, batches kept together."""
    topo = make_topology(n=4, fanout=2, hedge=1)
    sink = root_sink(topo)
    source = f"unix:{tmp_path / 'engine.sock'}" if kind == "unix" else f"udp:{ADDR}:0"
    ingress = open_ingress(source)
    assert ingress is not None
    to = source if kind == "unix" else f"udp:{ADDR}:{ingress.getsockname()[1]}"
    pub = Publisher(topo)
    stop = asyncio.Event()
    task = asyncio.create_task(pub.run_ingress(ingress, stop=stop))
    example = Path(__file__).resolve().parent.parent / "examples" / "exchange_feed.py"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(example), "--to", to, "--count", "120", "--batch", "4",
            "--rate", "4000", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert out.decode().startswith("sent 120 messages")
        await asyncio.sleep(0.2)
        stop.set()
        published = await asyncio.wait_for(task, 5)
    finally:
        ingress.close()
        pub.close()
    got = [decode(d) for d in drain(sink)]
    sink.close()
    assert published == 120
    # The engine's own sequence number ends each update: in order, none lost or doubled.
    engine_seqs = [int.from_bytes(body[-8:], "big") for d in got for body in d.messages]
    assert engine_seqs == list(range(1, 121))
    wire_seqs = [d.header.seq + i for d in got for i in range(len(d.messages))]
    assert wire_seqs == list(range(1, 121))


def test_the_exchange_example_refuses_bad_values() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "exchange_feed.py"
    for argv, said in (
        (["--to", "synthetic"], "--to must be udp:HOST:PORT or unix:PATH"),
        (["--to", "tcp:x"], "expected synthetic, udp:HOST:PORT or unix:PATH"),
        (["--to", "udp:127.0.0.1:9", "--batch", "99"], "--batch must be 1..40"),
    ):
        run = subprocess.run([sys.executable, str(example), *argv], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert run.returncode == 2 and said in run.stderr and "Traceback" not in run.stderr
