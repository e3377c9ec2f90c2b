"""The MP client (jasper_client): subscribing with an MP token against a loopback controller
and real daemons, reading the framed feed in order, and reporting gaps and late messages that a
receiver saw (datagrams sent straight to a receiver, on both data paths)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from controller.loopback import DaemonSet, LoopbackController, free_udp_block
from jasper import mp_spec
from jasper.layout import ports_needed, topology_from_plan
from jasper.mp_spec import MP_FLAG_GAP_BEFORE, MP_FLAG_LATE
from jasper.topology import parse_topology
from jasper.tree import tree_shape
from jasper.wire import Header, encode, pack_blocks
from jasper_client import Event, FeedReader, Gap, Late, Malformed, Message, MpClient
from overlay.launch import free_port_base
from overlay.nativepath import native_available
from overlay.receiver import Receiver

ADDR = "127.0.0.1"
MS = 1_000_000


def _topology(deliver: str) -> tuple[dict[str, Any], int]:
    """A one-receiver plan whose endpoint e0 delivers to `deliver`; and e0's port."""
    plan = tree_shape(1, fanout=2, hedge=0)
    base = free_port_base(ADDR, ports_needed(plan))
    doc = topology_from_plan(plan, addr=ADDR, port_base=base, hold_ns=20_000_000).to_dict()
    ep = doc["receivers"][0]["endpoints"][0]
    ep["deliver"] = deliver
    return doc, int(ep["port"])


def _datagram(seq: int, deadline_ns: int) -> bytes:
    h = Header(stream_id=1, session=7, seq=seq, send_time_ns=time.time_ns(),
               deadline_ns=deadline_ns, plan_epoch=1)  # fmt: skip
    return encode(h, b"update-%d" % seq)


async def _collect(feed: FeedReader, messages: int, timeout_s: float = 10.0) -> list[Event]:
    """Events until `messages` messages came, reading between the loop's turns."""
    got: list[Event] = []
    end = time.monotonic() + timeout_s
    while sum(isinstance(e, Message) for e in got) < messages:
        assert time.monotonic() < end, f"only {got}"
        got += feed.receive(timeout_s=0.002)
        await asyncio.sleep(0)
    return got


@pytest.mark.parametrize("datapath", ["python", "native"])
def test_client_reports_the_gap_and_the_late_message_a_receiver_saw(datapath: str) -> None:
    if datapath == "native" and not native_available()[0]:
        pytest.skip("native data path not built")
    feed = FeedReader(f"udp:{ADDR}:0")
    doc, port = _topology(feed.target)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def main() -> tuple[list[Event], list[Event], dict[str, Any]]:
        rx = Receiver(parse_topology(doc), "h0", realtime=False, link_model=False,
                      datapath=datapath)  # fmt: skip
        rx.start()
        try:
            base = time.time_ns() + 30 * MS
            for seq in (1, 2, 4):  # seq 3 never reaches the receiver
                sender.sendto(_datagram(seq, base + seq * MS), (ADDR, port))
            first = await _collect(feed, 3)
            sender.sendto(_datagram(5, time.time_ns() - 2 * MS), (ADDR, port))  # past deadline
            second = await _collect(feed, 1)
            status = rx.status()["endpoints"]["e0"]
        finally:
            rx.stop()
            rx.close()
        return first, second, status

    try:
        first, second, status = asyncio.run(main())
    finally:
        sender.close()
        feed.close()
    msgs = [e for e in first if isinstance(e, Message)]
    assert [(m.stream_id, m.session, m.seq, m.payload) for m in msgs] == [
        (1, 7, s, b"update-%d" % s) for s in (1, 2, 4)
    ]
    assert [m.flags for m in msgs] == [0, 0, MP_FLAG_GAP_BEFORE]
    assert all(m.release_ns >= m.deadline_ns for m in msgs)  # held to the deadline
    # The gap event comes right before the message it precedes, one message missing.
    assert first[2:] == [Gap(1, 7, 4, 1), msgs[2]]
    assert len(second) == 2 and isinstance(second[0], Late) and isinstance(second[1], Message)
    late, m5 = second
    assert (late.seq, m5.seq, m5.flags) == (5, 5, MP_FLAG_LATE)
    assert late.late_by_ns == m5.release_ns - m5.deadline_ns >= 2 * MS
    assert (feed.messages, feed.gaps, feed.late) == (4, 1, 1)
    # The receiver counted the gap too.
    assert (status["gaps"], status["gap_messages"], status["late"]) == (1, 1, 1)


def test_feed_reader_sees_a_jump_a_receiver_did_not_flag() -> None:
    """A delivery datagram lost between the receiver and the MP is a gap for the MP."""
    feed = FeedReader(f"udp:{ADDR}:0")
    try:

        def one(seq: int, flags: int = 0) -> bytes:
            return mp_spec.frame(pack_blocks([b"x"]), stream_id=3, session=1, seq=seq, count=1,
                                 flags=flags, release_ns=2, deadline_ns=1)  # fmt: skip

        events = feed.events_of(one(10, MP_FLAG_GAP_BEFORE))  # first seen: the flag only
        assert isinstance(events[0], Gap) and events[0].missing is None
        assert not any(isinstance(e, Gap) for e in feed.events_of(one(11)))
        assert feed.events_of(one(14))[0] == Gap(3, 1, 14, 2)
        assert not any(isinstance(e, Gap) for e in feed.events_of(one(12)))  # late filler
        assert isinstance(feed.events_of(b"junk")[0], Malformed)
    finally:
        feed.close()


@pytest.mark.slow
def test_client_subscribes_with_its_token_and_reads_the_feed_in_order(tmp_path: Path) -> None:
    ctl = LoopbackController(db_path=tmp_path / "controller.db")
    ctl.start()
    daemons = DaemonSet(ctl, tmp_path)
    try:
        ctl.create_stream(1, "md", depth=1, fanout=3, hold_ns=5_000_000)
        daemons.start("relay", "relay0", "--port", str(free_udp_block(1)), "--fast-path", "user")
        base = free_udp_block(1)
        daemons.start("receiver", "rx0", "--port-base", str(base), "--endpoints", "1",
                      "--fast-path", "user", "--no-realtime")  # fmt: skip
        daemons.start("publisher", "pub", "--stream", "1", "--rate", "200")
        ctl.wait_nodes({"relay0", "rx0", "pub"}, 60)
        _, token = ctl.create_mp("mp")
        with MpClient(ctl.url, token, stream_id=1, endpoint=("127.0.0.1", base)) as client:
            assert client.subscription is not None
            sub_id = client.subscription["id"]
            assert client.subscription["deliver"] == client.feed.target
            events: list[Event] = []
            end = time.monotonic() + 60
            while sum(isinstance(e, Message) for e in events) < 200:
                assert time.monotonic() < end, f"{len(events)} events"
                events += client.receive(timeout_s=1.0)
        msgs = [e for e in events if isinstance(e, Message)]
        assert {(m.stream_id, m.session) for m in msgs} == {(1, msgs[0].session)}
        seqs = [m.seq for m in msgs]
        # Every message once, in order: the first one received is where this MP joined.
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert not [e for e in events if isinstance(e, Gap)]
        assert all(m.release_ns > 0 and m.deadline_ns > 0 for m in msgs)
        # Unsubscribed on close: the MP has no subscription left, the endpoint leaves the tree.
        assert ctl.call("GET", "/v1/subscriptions", token=token) == []
        r = ctl.client.request("GET", f"/v1/subscriptions/{sub_id}", token=token)
        assert r.status_code == 404
    finally:
        daemons.stop()
        ctl.close()


def test_unix_feed_target_binds_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "feed.sock"
    feed = FeedReader(f"unix:{path}")
    assert feed.target == f"unix:{path}" and path.exists()
    feed.close()
    assert not path.exists()
