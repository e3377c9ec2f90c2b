"""Several streams per node: two trees over shared relays and one receiver host, and one
stream removed while the other flows (real daemons under the controller)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from controller.loopback import (
    DaemonSet,
    DeliverySink,
    LoopbackController,
    free_udp_block,
    wait_for,
)
from jasper.mp_spec import MpMessage, parse
from overlay.nativepath import native_available

RELAYS = ("msr0", "msr1", "msr2")
"""Relay nodes of one process (eBPF pins are machine-wide by node name: names of their own)."""
STREAM_OF_ENDPOINT = (1, 1, 2, 2)
"""Endpoint i of the receiver host rx0 subscribes to this stream."""
HOLD_NS = 1_000_000_000
"""A fixed hold long enough that a loaded test machine releases every message on time."""
RATE = 50
DURATION_S = 14


def messages(sink: DeliverySink, i: int) -> list[MpMessage]:
    return [m for data in list(sink.datagrams[i]) for m in parse(data)]


def node_status(ctl: LoopbackController, name: str) -> dict[str, Any]:
    status: dict[str, Any] = ctl.call("GET", f"/v1/nodes/{name}")["status"] or {}
    return status


def served(ctl: LoopbackController, name: str) -> set[int]:
    """The streams a node's daemon reports serving in its last heartbeat."""
    return {int(k.split(".")[1]) for k in node_status(ctl, name) if k.startswith("streams.")}


def relay_sum(ctl: LoopbackController, suffix: str) -> float:
    """A counter summed over the relay nodes of the process."""
    status = node_status(ctl, RELAYS[0])
    return sum(v for k, v in status.items() if k.startswith("nodes.") and k.endswith(suffix))


def kernel_stream_tables(ctl: LoopbackController) -> list[float]:
    """Per relay node of the process: the stream tables its eBPF program holds."""
    status = node_status(ctl, RELAYS[0])
    return [status.get(f"nodes.{r}.fast_path.stream_tables", -1.0) for r in RELAYS]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("datapath", "relay_path"), [("python", "user"), ("native", "user"), ("native", "ebpf")]
)
def test_two_streams_share_relays_and_a_receiver_host(
    tmp_path: Path, datapath: str, relay_path: str
) -> None:
    if datapath == "native" and not native_available()[0]:
        pytest.skip(native_available()[1])
    if relay_path == "ebpf":
        from ebpf import loader

        ok, why = loader.fast_path_available()
        if not ok:
            pytest.skip(str(why))
    ctl = LoopbackController(db_path=tmp_path / "controller.db", heartbeat_timeout_s=5)
    ctl.start()
    daemons = DaemonSet(ctl, tmp_path)
    sink = DeliverySink(len(STREAM_OF_ENDPOINT))
    try:
        for stream in (1, 2):
            ctl.create_stream(
                stream,
                f"md{stream}",
                hedge=1,
                hold_ns=HOLD_NS,
                hold_policy="fixed",
                publisher=f"pub{stream}",
            )
        # One relay process hosting three relay nodes, one receiver process for both streams.
        daemons.start(
            "relay", ",".join(RELAYS), "--port", str(free_udp_block(3)), "--fast-path", relay_path
        )
        base = free_udp_block(len(STREAM_OF_ENDPOINT))
        daemons.start(
            "receiver", "rx0", "--port-base", str(base),
            "--endpoints", str(len(STREAM_OF_ENDPOINT)),
            "--fast-path", "user", "--no-realtime", "--datapath", datapath,
        )  # fmt: skip
        ctl.wait_nodes({*RELAYS, "rx0"}, 60)
        _, token = ctl.create_mp("mp")
        for i, stream in enumerate(STREAM_OF_ENDPOINT):
            ctl.subscribe(
                token, stream, "127.0.0.1", base + i, deliver=f"udp:127.0.0.1:{sink.port(i)}"
            )
        # Both trees run over the same three relays: a root and two hedging leaves each.
        for stream in (1, 2):
            assert ctl.wait_plan_over_relays(stream, 3, 60) == set(RELAYS)
        for stream in (1, 2):
            daemons.start(
                "publisher", f"pub{stream}", "--stream", str(stream),
                "--rate", str(RATE), "--duration", str(DURATION_S),
            )  # fmt: skip
        wait_for(
            lambda: all(len(messages(sink, i)) > 3 * RATE for i in range(4)), 90, "both streams"
        )
        wait_for(lambda: served(ctl, RELAYS[0]) == {1, 2}, 20, "the relays to report both")
        assert served(ctl, "rx0") == {1, 2}
        if relay_path == "ebpf":
            # Every relay forwards both streams in the kernel, each by its own table.
            wait_for(lambda: kernel_stream_tables(ctl) == [2.0] * 3, 20, "kernel tables")
            assert node_status(ctl, RELAYS[0])["fast_path_off"] == 0

        # Stream 2 goes; stream 1 keeps its relays' tables, dedup state and held messages.
        ctl.delete_stream(2)
        ctl.wait_applied({RELAYS[0], "rx0"}, 30)
        removed_ns = time.time_ns()
        wait_for(lambda: served(ctl, RELAYS[0]) == {1} and served(ctl, "rx0") == {1}, 20, "removal")
        if relay_path == "ebpf":
            wait_for(lambda: kernel_stream_tables(ctl) == [1.0] * 3, 20, "a kernel table gone")
        delivered_before = [len(messages(sink, i)) for i in range(4)]
        wait_for(
            lambda: all(len(messages(sink, i)) > delivered_before[i] + 2 * RATE for i in range(2)),
            60,
            "stream 1 after stream 2 was removed",
        )
        wait_for(lambda: "pub1" not in daemons.alive(), DURATION_S + 60, "publisher 1 done")
        time.sleep(HOLD_NS / 1e9 + 1.0)  # the last messages are held for one hold

        # Every endpoint got its own stream only, each message once, in order, on time.
        for i, stream in enumerate(STREAM_OF_ENDPOINT):
            got = messages(sink, i)
            assert {m.stream_id for m in got} == {stream}, f"endpoint {i}"
            seqs = [m.seq for m in got]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"endpoint {i} order"
            # (seq, flags, µs past the deadline) of any message released late or after a gap
            bad = [
                (m.seq, m.flags, (m.release_ns - m.deadline_ns) // 1000)
                for m in got
                if m.late or m.gap_before
            ]
            assert not bad, f"endpoint {i}: late or after a gap"
        # Stream 1 lost nothing across the removal: every message its publisher sent.
        for i in range(2):
            assert len(messages(sink, i)) == RATE * DURATION_S
        # Stream 2 stopped: no message it delivered arrived after the removal (its deadline
        # is its send time plus the hold), and its copies are refused at the relays now.
        last_stream2 = max(m.deadline_ns for i in (2, 3) for m in messages(sink, i))
        assert last_stream2 - HOLD_NS <= removed_ns
        assert len(messages(sink, 2)) < RATE * DURATION_S
        # User-space relays refuse it by stream; in the kernel it meets the node's empty table.
        refused = ".fast_path.no_targets" if relay_path == "ebpf" else ".rejected.stream"
        wait_for(
            lambda: relay_sum(ctl, refused) > 0, 20, f"the relays to drop stream 2 ({refused})"
        )
        assert set(daemons.stop().values()) == {0}
    finally:
        daemons.stop()
        sink.close()
        ctl.close()
