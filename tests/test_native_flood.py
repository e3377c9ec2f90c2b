"""100,000 random, corrupted and forged datagrams at a running native receiver of a keyed stream
while real traffic flows: every one counted under its reason, none delivered, the stream
unharmed."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import struct

import pytest

from jasper.topology import StreamAuth
from jasper.wire import Header, StreamKey, encode_batch
from jasper.wire_spec import HEADER_LEN, MALFORMED_REASONS, offsets
from overlay.nativepath import native_available
from tests.test_overlay_path import Overlay, make_topology, settle

pytestmark = pytest.mark.skipif(not native_available()[0], reason=native_available()[1])


PAYLOAD_LEN, MSG_COUNT = offsets()["payload_len"], offsets()["msg_count"]


def corrupted(count: int, seed: int = 3) -> list[bytes]:
    """Random bytes and valid batches cut, with bad versions, counts, lengths and blocks."""
    rng = random.Random(seed)
    h = Header(stream_id=1, session=1, seq=7, send_time_ns=1, deadline_ns=2)
    batch = encode_batch(h, [b"x" * 30, b"y" * 5, b""])
    at, mc, block = PAYLOAD_LEN, MSG_COUNT, HEADER_LEN
    out: list[bytes] = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            b = rng.randbytes(rng.randrange(0, 1600))
            out.append(b"X" + b[1:] if b[:2] == b"JS" else b)
        elif kind == 1:
            out.append(batch[: rng.randrange(0, len(batch))])
        elif kind == 2:
            out.append(batch[:2] + bytes((rng.choice([0, 1, 2, 4, 255]),)) + batch[3:])
        elif kind == 3:
            length = rng.randrange(0, 65535)
            length += length == len(batch) - HEADER_LEN  # never the true one
            out.append(batch[:at] + struct.pack("!H", length) + batch[at + 2 :])
        elif kind == 4:  # msg_count disagreeing with the blocks
            out.append(
                batch[:mc] + struct.pack("!H", rng.choice([0, 1, 2, 4, 700])) + batch[mc + 2 :]
            )
        else:  # a block length running past the end
            out.append(
                batch[:block] + struct.pack("!H", rng.randrange(40, 65536)) + batch[block + 2 :]
            )
    return out


def forged(count: int, seed: int = 4) -> tuple[list[bytes], dict[str, int]]:
    """Well-formed datagrams of the stream without its key: unsigned, signed with a guessed key,
    and a guessed MAC; with how many each reject reason must count."""
    rng = random.Random(seed)
    guess = StreamKey(1, rng.randbytes(32))
    out: list[bytes] = []
    want = {"key": 0, "mac": 0}
    for i in range(count):
        h = Header(stream_id=1, session=1, seq=1 + i, send_time_ns=1, deadline_ns=0)
        if i % 3 == 0:
            out.append(encode_batch(h, [b"EVIL"]))
            want["key"] += 1
        elif i % 3 == 1:
            out.append(encode_batch(h, [b"EVIL"], key=guess))
            want["mac"] += 1
        else:
            d = bytearray(encode_batch(h, [b"EVIL"], key=guess))
            d[HEADER_LEN - 16 : HEADER_LEN] = rng.randbytes(16)
            out.append(bytes(d))
            want["mac"] += 1
    return out, want


@pytest.mark.slow
async def test_native_receiver_counts_a_flood_of_junk_and_keeps_the_stream() -> None:
    topo = make_topology(n=4, fanout=2, hedge=1)
    topo = dataclasses.replace(
        topo, stream=dataclasses.replace(topo.stream, auth=StreamAuth.fresh())
    )
    o = Overlay(topo, datapath="native", realtime=False)
    assert o.rx.datapath == "native"
    fakes, want_rejected = forged(10_000)
    junk = corrupted(90_000) + fakes
    random.Random(5).shuffle(junk)
    target = topo.address_of("e2")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    o.start()
    try:
        for i in range(0, len(junk), 500):
            for b in junk[i : i + 500]:
                s.sendto(b, target)
            o.pub.publish(b"real %d" % i)
            await asyncio.sleep(0.002)  # below the socket buffers: none lost to the kernel
        await settle(o.rx, 200 * 4)
    finally:
        s.close()
        o.close()
    e2 = o.rx.status()["endpoints"]["e2"]
    assert e2["kernel_drops"] == 0
    assert e2["malformed_total"] == len(junk) - len(fakes)
    assert e2["rejected"] == want_rejected
    assert set(e2["malformed"]) <= set(MALFORMED_REASONS)
    assert {"length", "count", "overrun", "version"} <= set(e2["malformed"])
    recs = o.rx.records.array()
    assert sorted(int(r["seq"]) for r in recs if str(r["endpoint"]) == "e2") == list(range(1, 201))
    assert len(recs) == 200 * 4  # every endpoint got every real message, nothing else
