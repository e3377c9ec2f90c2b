"""overlay._datapath.ReceivePump over real UDP sockets on 127.0.0.1: delivery at the deadline,
hedged duplicates, the link model, malformed floods, authenticated streams (forgeries counted
by reason, keys rotated by plan), drain on stop, records and counters."""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from jasper import mp_spec
from jasper.wire import Header, StreamKey, encode, encode_batch, pack_blocks
from jasper.wire_spec import MAX_DATAGRAM, REJECT_REASONS
from overlay.kernel import open_udp
from overlay.releasec import sockaddr

try:
    from overlay import _datapath
except ImportError as exc:  # the extension is built by scripts/setup.sh
    if os.environ.get("JASPER_REQUIRE_PRIVILEGED"):
        raise
    pytest.skip(f"overlay._datapath not built: {exc}", allow_module_level=True)

RECORD = np.dtype(list(_datapath.RECORD_FIELDS))
STREAM = 7
MS = 1_000_000


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


def datagram(
    seq: int,
    deadline_ns: int,
    payload: bytes = b"",
    *,
    stream: int = STREAM,
    session: int = 1,
    key: StreamKey | None = None,
) -> bytes:
    header = Header(
        stream_id=stream,
        session=session,
        seq=seq,
        send_time_ns=time.time_ns(),
        deadline_ns=deadline_ns,
    )
    return encode(header, payload or b"m%d" % seq, key=key)


OPEN = [(STREAM, None, None)]
"""set_streams of the rigs: STREAM unauthenticated, following the newest session."""


class Rig:
    """A pump with endpoints on real sockets, parents 1..n on their own sender sockets."""

    def __init__(
        self,
        *,
        endpoints: int,
        parents: int,
        sink: bool,
        streams: list[tuple[int, dict[int, bytes] | None, int | None]],
        **kwargs: Any,
    ) -> None:
        self.pump = _datapath.ReceivePump(endpoints=0, **kwargs)
        self.pump.set_streams(streams)
        self.rx = [open_udp("127.0.0.1", 0) for _ in range(endpoints)]
        self.sinks: list[socket.socket] = []
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i, sock in enumerate(self.rx):
            if sink:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("127.0.0.1", 0))
                s.settimeout(10.0)
                self.sinks.append(s)
                addr = sockaddr(socket.AF_INET, s.getsockname())
                self.pump.add_endpoint(i, sock.fileno(), self.out.fileno(), addr)
            else:
                self.pump.add_endpoint(i, sock.fileno())
        self.tx = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(parents)]
        for s in self.tx:
            s.bind(("127.0.0.1", 0))
        self.pump.set_parents(
            [("127.0.0.1", s.getsockname()[1], i + 1) for i, s in enumerate(self.tx)]
        )

    def send(self, data: bytes, *, parents: list[int] | None = None, endpoint: int = 0) -> None:
        for p in parents or range(1, len(self.tx) + 1):
            self.tx[p - 1].sendto(data, self.rx[endpoint].getsockname())

    def counters(self, endpoint: int = 0) -> dict[str, Any]:
        eps: Any = self.pump.counters()["endpoints"]
        return dict(eps[endpoint])

    def records(self) -> np.ndarray:
        return np.frombuffer(self.pump.take_records(), dtype=RECORD)

    def close(self) -> None:
        self.pump.close()
        for s in (*self.rx, *self.sinks, *self.tx, self.out):
            s.close()


@contextmanager
def rig(
    *,
    endpoints: int = 1,
    parents: int = 3,
    sink: bool = False,
    streams: list[tuple[int, dict[int, bytes] | None, int | None]] | None = None,
    **kw: Any,
) -> Iterator[Rig]:
    r = Rig(endpoints=endpoints, parents=parents, sink=sink, streams=streams or OPEN, **kw)
    try:
        yield r
    finally:
        r.close()


def deliveries(pump: Any, n: int, timeout: float = 10.0) -> list[tuple[Any, ...]]:
    """At least n in-process deliveries, waiting on notify_fd."""
    got: list[tuple[Any, ...]] = []
    end = time.monotonic() + timeout
    while len(got) < n:
        left = end - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} deliveries"
        ready, _, _ = select.select([pump.notify_fd], [], [], left)
        if ready:
            got.extend(pump.take_deliveries())
    return got


def test_record_layout_is_documented() -> None:
    assert RECORD.itemsize == _datapath.RECORD_SIZE == 72
    assert struct.calcsize(_datapath.RECORD_FORMAT) == 72
    assert RECORD.names is not None
    assert RECORD.names[0] == "endpoint" and RECORD.names[-1] == "handed_ns"
    assert all(name in _datapath.RECORD_DOC for name in RECORD.names)
    assert _datapath.UNKNOWN_PARENT == 0xFFFFFFFE
    assert _datapath.SLOT_BYTES == MAX_DATAGRAM + 1


def test_sink_delivery_at_or_after_deadline() -> None:
    with rig(endpoints=2, sink=True) as r:
        r.pump.start()
        base = time.time_ns() + 30 * MS
        for seq in range(1, 21):
            d = datagram(seq, base + seq * 500_000)
            r.send(d, endpoint=0)
            r.send(d, endpoint=1)
        for ep, sink in enumerate(r.sinks):
            got = [mp_spec.parse(sink.recv(2048)) for _ in range(20)]
            assert [[m.payload for m in d] for d in got] == [[b"m%d" % s] for s in range(1, 21)]
            first = [d[0] for d in got]
            assert [m.seq for m in first] == list(range(1, 21)), ep
            assert {(m.stream_id, m.session, m.flags) for m in first} == {(STREAM, 1, 0)}
            # Framed with the core's release time (node clock = kernel clock here).
            # The deadline in force: the stamp, or raised to the stream's previous one (the
            # other endpoint's copies may have been processed first).
            assert all(m.deadline_ns >= base + m.seq * 500_000 for m in first)
            assert all(m.release_ns >= m.deadline_ns for m in first), [
                (m.seq, m.release_ns - m.deadline_ns) for m in first
            ]
        wait_until(lambda: r.pump.counters()["records_waiting"] >= 40)
        rec = r.records()
        assert len(rec) == 40
        assert (rec["kind"] == 0).all() and (rec["ok"] == 1).all() and (rec["err"] == 0).all()
        assert (rec["release_ns"] >= rec["deadline_ns"]).all()
        assert (rec["handed_ns"] >= rec["deadline_ns"]).all()  # clock offset 0
        assert (rec["arrival_ns"] <= rec["release_ns"]).all()
        assert sorted(rec["seq"][rec["endpoint"] == 1].tolist()) == list(range(1, 21))
        c = r.counters(1)
        assert c["released"] == 20 and c["delivered"] == 20 and c["deliver_errors"] == {}


def test_sink_delivery_flags_gap_before_and_late() -> None:
    """The native path's MP framing: a skipped seq sets gap-before on the next delivery and is
    counted; a copy past its deadline is delivered at once, flagged late."""
    with rig(endpoints=1, sink=True) as r:
        r.pump.start()
        base = time.time_ns() + 30 * MS
        for seq in (1, 2, 5):
            r.send(datagram(seq, base + seq * MS, b"m%d" % seq), endpoint=0)
        r.send(datagram(6, time.time_ns() - MS, b"m6"), endpoint=0)  # late: out at once
        sink = r.sinks[0]
        got = [mp_spec.parse(sink.recv(2048))[0] for _ in range(4)]
        late, gap = mp_spec.MP_FLAG_LATE, mp_spec.MP_FLAG_GAP_BEFORE
        # The late 6 is released first and sets the baseline (next expected: 7); the held ones
        # below it come later, out of order, and raise no gap. 8 then skips 7.
        assert [(m.seq, m.flags) for m in got] == [(6, late), (1, 0), (2, 0), (5, 0)]
        r.send(datagram(8, time.time_ns() + 5 * MS, b"m8"), endpoint=0)
        m = mp_spec.parse(sink.recv(2048))[0]
        assert (m.seq, m.flags, m.payload) == (8, gap, b"m8")
        c = r.counters(0)
        assert (c["gaps"], c["gap_messages"], c["late"]) == (1, 1, 1)


def test_in_process_deliveries_and_records_agree() -> None:
    with rig(parents=1) as r:
        r.pump.start()
        base = time.time_ns() + 20 * MS
        msgs = [b"alpha", b"beta", b"gamma"]
        r.send(encode_batch(Header(STREAM, 1, 1, time.time_ns(), base), msgs))
        r.send(datagram(4, base + MS, b"delta"))
        r.send(datagram(5, 0, b"now"))  # unstamped: at once
        got = deliveries(r.pump, 3)
        assert [d[3] for d in got] == [5, 1, 4]
        (ep, stream, session, seq, count, kind, deadline, handed, payload, flags) = got[1]
        assert flags == 0
        assert (ep, stream, session, seq, count, kind) == (0, STREAM, 1, 1, 3, 0)
        assert payload == pack_blocks(msgs)
        assert handed >= deadline == base
        assert got[0][5] == 2 and got[0][6] == 0  # UNSTAMPED, no deadline
        assert r.pump.take_deliveries() == []
        assert not select.select([r.pump.notify_fd], [], [], 0)[0]  # cleared by the take
        rec = r.records()
        assert rec["seq"].tolist() == [5, 1, 4]
        assert rec["parent"].tolist() == [1, 1, 1]
        assert rec["count"].tolist() == [1, 3, 1]
        assert rec["handed_ns"].tolist() == [d[7] for d in got]
        assert (rec["release_ns"][1:] >= rec["deadline_ns"][1:]).all()
        assert rec["deadline_ns"].tolist() == [d[6] for d in got]
        assert (rec["ok"] == 1).all()


def test_an_endpoint_without_a_reader_is_stamped_and_counted_not_queued() -> None:
    with rig(parents=1) as r:
        r.pump.set_deliver(0, -2)  # in process, nobody iterates it (NativeDatapath.set_deliver)
        r.pump.start()
        base = time.time_ns() + 5 * MS
        for seq in (1, 2, 3):
            r.send(datagram(seq, base, b"x"))
        end = time.monotonic() + 10
        parts = [r.records()]
        while sum(len(p) for p in parts) < 3 and time.monotonic() < end:
            time.sleep(0.01)
            parts.append(r.records())
        recs = np.concatenate(parts)
        assert recs["seq"].tolist() == [1, 2, 3] and (recs["ok"] == 1).all()
        assert (recs["handed_ns"] >= recs["deadline_ns"]).all()  # released at the deadline
        assert r.counters()["delivered"] == 3
        assert r.pump.take_deliveries() == []  # nothing copied for Python to drain
        assert not select.select([r.pump.notify_fd], [], [], 0)[0]
        r.pump.set_deliver(0, -1)  # a reader came: queued from now on
        r.send(datagram(4, time.time_ns() + MS, b"y"))
        assert [d[3] for d in deliveries(r.pump, 1)] == [4]


def test_hedged_duplicates_release_once() -> None:
    n = 50
    with rig(parents=3) as r:
        r.pump.start()
        base = time.time_ns() + 50 * MS
        for seq in range(1, n + 1):
            r.send(datagram(seq, base))
        got = deliveries(r.pump, n)
        assert sorted(d[3] for d in got) == list(range(1, n + 1))
        wait_until(lambda: r.counters()["received"] == 3 * n)
        c = r.counters()
        assert (c["accepted"], c["duplicates"], c["released"]) == (n, 2 * n, n)
        parents = c["parents"]
        assert set(parents) == {1, 2, 3}
        assert all(copies == n for copies, _ in parents.values())
        assert sum(kept for _, kept in parents.values()) == n
        assert r.pump.take_deliveries() == []


def test_unknown_source_and_growing_endpoints() -> None:
    with rig(endpoints=1, parents=1) as r:
        extra = open_udp("127.0.0.1", 0)
        try:
            r.pump.add_endpoint(1, extra.fileno())  # index == count: grows the core
            extra_fd = extra.fileno()
            with pytest.raises(ValueError):
                r.pump.add_endpoint(5, extra_fd)
            assert r.pump.endpoints == 2
            r.pump.start()
            stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stranger.sendto(datagram(1, 0), extra.getsockname())
            stranger.close()
            got = deliveries(r.pump, 1)
            assert got[0][0] == 1
            assert r.counters(1)["parents"] == {_datapath.UNKNOWN_PARENT: (1, 1)}
            assert r.records()["parent"].tolist() == [_datapath.UNKNOWN_PARENT]
        finally:
            extra.close()


def test_link_model_factor_changes_which_copy_wins() -> None:
    n = 20
    for model, winner in ((False, 1), (True, 2)):
        with rig(parents=2) as r:
            if model:
                # Parent 1's copies take 1000 x 20 us = 20 ms, parent 2's 20 us (sigma 0).
                r.pump.set_link_model(median_ns=20_000, p99_ns=20_000, factors={(1, 0): 1000.0})
            r.pump.start()
            base = time.time_ns() + 200 * MS
            for seq in range(1, n + 1):
                d = datagram(seq, base)
                r.send(d, parents=[1])
                time.sleep(0.0005)  # the kernel hands parent 1's copy over first
                r.send(d, parents=[2])

            def settled(r: Rig = r) -> bool:
                return r.counters()["received"] == 2 * n and r.pump.pending == 0

            wait_until(settled)
            parents = r.counters()["parents"]
            assert parents[winner] == (n, n), (model, parents)
            assert parents[3 - winner] == (n, 0), (model, parents)
            got = deliveries(r.pump, n)
            assert len(got) == n
            rec = r.records()
            assert (rec["parent"] == winner).all()
            assert (rec["release_ns"] >= rec["deadline_ns"]).all()


def test_link_model_spikes_delay_arrival() -> None:
    with rig(parents=1) as r:
        r.pump.set_link_model(
            median_ns=1000, spike_prob=1.0, spike_min_ns=5 * MS, spike_max_ns=6 * MS, seed=3
        )
        r.pump.start()
        for seq in range(1, 11):
            r.send(datagram(seq, 0))
        got = deliveries(r.pump, 10)
        assert len(got) == 10
        rec = r.records()
        flight = rec["arrival_ns"] - rec["send_ns"]
        assert (flight >= 5 * MS).all() and (flight < 5 * MS + 500 * MS).all()
        assert (rec["release_ns"] >= rec["arrival_ns"]).all()


def test_link_loss() -> None:
    with rig(parents=3) as r:
        r.pump.set_link_model(median_ns=1000, loss=1.0)
        r.pump.start()
        for seq in range(1, 31):
            r.send(datagram(seq, 0))
        wait_until(lambda: r.pump.counters()["datagrams"] == 90)
        totals = r.pump.counters()
        assert totals["link_lost"] == 90 and r.counters()["link_lost"] == 90
        assert r.counters()["received"] == 0
        assert r.pump.take_deliveries() == [] and len(r.records()) == 0
        # Half the copies lost, drawn per link: about half of 3 x 400.
        r.pump.set_link_model(median_ns=1000, loss=0.5, seed=9)
        for seq in range(31, 431):
            r.send(datagram(seq, 0))
        wait_until(lambda: r.pump.counters()["datagrams"] == 90 + 1200)
        lost = r.pump.counters()["link_lost"] - 90
        assert 450 < lost < 750
        kept = r.pump.take_deliveries()
        assert 0 < len(kept) <= 400 and r.counters()["released"] == len(kept)
        r.pump.set_link_model(None)
        r.send(datagram(1000, 0))
        assert [d[3] for d in deliveries(r.pump, 1)] == [1000]


def malformed(rng: random.Random, template: bytes) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
    if kind == 1:
        return template[: rng.randrange(0, 48)]  # short
    if kind == 2:
        return b"\xff" * rng.choice([MAX_DATAGRAM + 1, 3000])  # oversize
    data = bytearray(template)
    if kind == 3:
        data[rng.randrange(0, 3)] ^= 1 + rng.randrange(255)  # magic or version
        data[3] |= rng.choice([0, 0x80])  # and maybe an unknown flag
    elif kind == 4:
        data += b"x" * rng.randrange(1, 10)  # length disagrees
    else:
        data[42:44] = struct.pack("!H", rng.randrange(2, 60))  # msg_count disagrees
    return bytes(data)


def test_malformed_flood_is_counted_and_valid_traffic_delivered() -> None:
    rng = random.Random(1234)
    template = encode(Header(99, 5, 1, 1, 0), b"payload-of-the-template")
    with rig(parents=2, record_capacity=0) as r:
        r.pump.start()
        base = time.time_ns() + 30 * MS
        sent = valid = 0
        for chunk in range(40):
            for _ in range(500):
                r.send(malformed(rng, template), parents=[2])
            valid += 1
            r.send(datagram(valid, base + chunk * MS), parents=[1])
            sent += 501

            # Paced so the kernel never drops: the test asserts counts, not speed.
            def caught_up(sent: int = sent) -> bool:
                return int(r.pump.counters()["datagrams"]) >= sent

            wait_until(caught_up)
        got = deliveries(r.pump, valid)
        assert sorted(d[3] for d in got if d[1] == STREAM) == list(range(1, valid + 1))
        c = r.counters()
        bad = sum(v for k, v in c.items() if k.startswith("malformed_"))
        assert c["received"] == sent == 20_040
        assert bad + c["accepted"] + c["duplicates"] + c["stale"] + c["heartbeats"] == sent
        assert bad == 20_000
        assert c["truncated"] > 0 and c["malformed_length"] >= c["truncated"]
        assert c["malformed_count"] + c["malformed_overrun"] > 0
        for reason in ("short", "magic", "version", "length"):
            assert c[f"malformed_{reason}"] > 0, reason
        assert c["kernel_drops"] == 0
        assert r.pump.counters()["records_dropped"] == 0  # records off: none counted


KEY_1 = StreamKey(1, bytes(range(32)))
KEY_2 = StreamKey(2, bytes(range(40, 72)))


def test_a_keyed_stream_releases_signed_datagrams_and_counts_forgeries() -> None:
    """Real sockets, in-process delivery: only copies with a good MAC under a key the plan holds
    are released; every forgery is counted under its reason; keys rotate by plan."""
    guess = StreamKey(1, bytes(32))
    streams: list[tuple[int, dict[int, bytes] | None, int | None]] = [(STREAM, {1: KEY_1.key}, 5)]
    with rig(parents=1, streams=streams) as r:
        r.pump.start()
        good = [datagram(s, 0, stream=STREAM, session=5, key=KEY_1) for s in range(1, 11)]
        tampered = bytearray(good[0])
        tampered[-1] ^= 0x20  # a payload byte, after signing
        forged = {
            "key": [datagram(s, 0, b"EVIL", session=5) for s in range(11, 16)]  # unsigned
            + [datagram(16, 0, b"EVIL", session=5, key=StreamKey(2, KEY_1.key))],
            "mac": [datagram(s, 0, b"EVIL", session=5, key=guess) for s in range(17, 22)]
            + [bytes(tampered)],
            "stream": [datagram(1, 0, b"EVIL", stream=STREAM + 1, session=5, key=KEY_1)],
            "session": [datagram(30, 0, b"EVIL", session=6, key=KEY_1)],
            "ahead": [datagram(2**40, 0, b"EVIL", session=5, key=KEY_1)],
        }
        for d in [x for kind in forged.values() for x in kind] + good:
            r.send(d)
        got = deliveries(r.pump, 10)
        wait_until(lambda: r.counters()["received"] == 10 + sum(map(len, forged.values())))
        assert sorted(g[3] for g in got) == list(range(1, 11))
        assert all(b"EVIL" not in g[8] for g in got)
        c = r.counters()
        assert {k: c[f"rejected_{k}"] for k in REJECT_REASONS} == {
            k: len(v) for k, v in forged.items()
        }
        assert c["accepted"] == 10
        # A rotation is a new plan with both keys, then one without the old.
        r.pump.set_streams([(STREAM, {1: KEY_1.key, 2: KEY_2.key}, 5)])
        r.send(datagram(11, 0, session=5, key=KEY_2))
        r.send(datagram(12, 0, session=5, key=KEY_1))
        assert sorted(g[3] for g in deliveries(r.pump, 2)) == [11, 12]
        r.pump.set_streams([(STREAM, {2: KEY_2.key}, 5)])
        r.send(datagram(13, 0, session=5, key=KEY_1))
        r.send(datagram(14, 0, session=5, key=KEY_2))
        assert [g[3] for g in deliveries(r.pump, 1)] == [14]
        wait_until(lambda: r.counters()["rejected_key"] == len(forged["key"]) + 1)
        # A plan without the stream: refused from then on.
        r.pump.set_streams([])
        r.send(datagram(15, 0, session=5, key=KEY_2))
        wait_until(lambda: r.counters()["rejected_stream"] == 2)
        assert r.pump.take_deliveries() == []
        with pytest.raises(ValueError):
            r.pump.set_streams([(STREAM, {1: b"short"}, None)])
        with pytest.raises(ValueError):
            r.pump.set_streams([(STREAM, {0: KEY_1.key}, None)])
        with pytest.raises(ValueError):
            r.pump.set_streams([(STREAM, {e: KEY_1.key for e in range(1, 6)}, None)])
        with pytest.raises(ValueError):
            r.pump.set_streams([(2**32, None, None)])
        with pytest.raises(TypeError):
            r.pump.set_streams([(STREAM, None)])  # type: ignore[list-item]


def test_stop_drain_releases_held_on_time() -> None:
    with rig(parents=1) as r:
        r.pump.start()
        deadline = time.time_ns() + 300 * MS
        for seq in range(1, 6):
            r.send(datagram(seq, deadline))
        wait_until(lambda: r.pump.held == 5)
        assert r.pump.stop(drain=True, timeout_s=10.0) == 0
        rec = r.records()
        assert len(rec) == 5 and (rec["release_ns"] >= deadline).all()
        assert (rec["kind"] == 0).all()
        assert r.pump.held == 0 and not r.pump.running


def test_stop_drain_timeout_flushes_the_rest() -> None:
    with rig(parents=1) as r:
        r.pump.start()
        deadline = time.time_ns() + 60_000 * MS
        for seq in range(1, 6):
            r.send(datagram(seq, deadline))
        wait_until(lambda: r.pump.held == 5)
        assert r.pump.stop(drain=True, timeout_s=0.05) == 5
        rec = r.records()
        assert len(rec) == 5 and (rec["release_ns"] < deadline).all()
        assert [d[3] for d in r.pump.take_deliveries()] == [1, 2, 3, 4, 5]


def test_stop_without_drain_keeps_held_and_close_is_idempotent() -> None:
    with rig(parents=1) as r:
        r.pump.start()
        r.send(datagram(1, time.time_ns() + 60_000 * MS))
        wait_until(lambda: r.pump.held == 1)
        assert r.pump.stop(drain=False) == 0
        assert r.pump.held == 1 and len(r.records()) == 0
        r.pump.close()
        r.pump.close()
        with pytest.raises(ValueError):
            r.pump.counters()


def test_clock_offset_moves_the_node_clock() -> None:
    offset = 3_000 * MS  # the node clock runs 3 s ahead of the kernel's
    with rig(parents=1) as r:
        r.pump.set_clock_offset(offset)
        r.pump.start()
        deadline = time.time_ns() + offset + 20 * MS
        r.send(datagram(1, deadline))
        got = deliveries(r.pump, 1)
        assert got[0][5] == 0  # on time, not late: the deadline is in node time
        rec = r.records()
        assert rec["release_ns"][0] >= deadline
        assert rec["handed_ns"][0] + offset >= deadline
        assert rec["arrival_ns"][0] >= rec["send_ns"][0] + offset


def test_send_errors_are_counted_per_errno() -> None:
    with rig(parents=1) as r:
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.connect(closed.getsockname())
        closed.close()  # nobody listens: ICMP port unreachable, then ECONNREFUSED
        try:
            r.pump.set_deliver(0, dead.fileno(), b"")
            r.pump.start()
            for seq in range(1, 11):
                r.send(datagram(seq, 0))
                time.sleep(0.005)
            wait_until(lambda: r.counters()["released"] == 10)
            errs = r.counters()["deliver_errors"]
            assert errs.get("ECONNREFUSED", 0) >= 1, errs
            rec = r.records()
            refused = rec[rec["ok"] == 0]
            assert len(refused) == errs["ECONNREFUSED"]
            assert (refused["err"] == errno.ECONNREFUSED).all()
        finally:
            dead.close()


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError):
        _datapath.ReceivePump()  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        _datapath.ReceivePump(endpoints=1, ring_size=1000)
    pump = _datapath.ReceivePump(endpoints=1)
    try:
        with pytest.raises(ValueError):
            pump.set_link_model(median_ns=100, p99_ns=50)
        with pytest.raises(ValueError):
            pump.set_link_model(median_ns=100, loss=1.5)
        with pytest.raises(TypeError):
            pump.set_link_model(p99_ns=50)
        with pytest.raises(ValueError):
            pump.set_parents([("not-an-ip", 1, 1)])
        with pytest.raises(TypeError):
            pump.set_parents([("127.0.0.1", 1)])  # type: ignore[list-item]
        r, w = os.pipe()
        try:
            with pytest.raises(OSError):
                pump.add_endpoint(0, r)  # not a socket
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(ValueError):
            pump.set_deliver(3, -1)
        pump.start()
        with pytest.raises(RuntimeError):
            pump.start()
    finally:
        pump.close()


def test_close_releases_every_descriptor() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with rig(endpoints=3, parents=1, sink=True) as r:
            r.pump.start()
            r.send(datagram(1, 0))
            r.sinks[0].recv(2048)
    assert len(os.listdir("/proc/self/fd")) == before


def test_link_delays_follow_the_linkmodel_distribution() -> None:
    from jasper.linkmodel import LinkModel

    model = LinkModel(
        seed=5,
        median_ns=4 * MS,
        p99_ns=12 * MS,
        spike_prob=0.2,
        spike_min_ns=20 * MS,
        spike_max_ns=30 * MS,
    )
    n = 600
    with rig(parents=1) as r:
        r.pump.set_link_model(
            median_ns=model.median_ns,
            p99_ns=model.p99_ns,
            spike_prob=model.spike_prob,
            spike_min_ns=model.spike_min_ns,
            spike_max_ns=model.spike_max_ns,
            seed=model.seed,
        )
        r.pump.start()
        for seq in range(1, n + 1):
            r.send(datagram(seq, 0))
        deliveries(r.pump, n)
        rec = r.records()
    # arrival - send = loopback latency (microseconds) + the sampled delay (milliseconds).
    flight = (rec["arrival_ns"] - rec["send_ns"]).astype(float)
    for q, tolerance in ((0.25, 0.2), (0.5, 0.15), (0.7, 0.2), (0.9, 0.1)):
        want = model.quantile_ns(q)
        got = float(np.quantile(flight, q))
        assert abs(got - want) <= tolerance * want, (q, got, want)
    assert 0.12 < float(np.mean(flight >= 20 * MS)) < 0.28  # the spikes


def test_a_coalesced_round_keeps_the_first_copy_in_emulated_time() -> None:
    # Parent 1's copy reaches the socket first but its link takes 2 ms; parent 2's, sent just
    # after, takes 20 us. With a 5 ms coalescing window both are read in one round, after both
    # emulated arrivals have passed: the core must still keep parent 2's copy.
    n = 20
    with rig(parents=2, coalesce_ns=5 * MS) as r:
        r.pump.set_link_model(median_ns=20_000, p99_ns=20_000, factors={(1, 0): 100.0})
        r.pump.start()
        base = time.time_ns() + 500 * MS
        for seq in range(1, n + 1):
            d = datagram(seq, base)
            r.send(d, parents=[1])
            r.send(d, parents=[2])
            time.sleep(0.01)

        def settled() -> bool:
            return r.counters()["received"] == 2 * n and r.pump.pending == 0

        wait_until(settled)
        parents = r.counters()["parents"]
        assert parents[2] == (n, n) and parents[1] == (n, 0), parents
        totals = r.pump.counters()
        assert totals["coalesced"] >= 1 and totals["rounds"] >= 1


def test_timing_counters_and_coalesce_bounds() -> None:
    with pytest.raises(ValueError):
        _datapath.ReceivePump(endpoints=1, coalesce_ns=-1)
    with pytest.raises(ValueError):
        _datapath.ReceivePump(endpoints=1, coalesce_ns=20 * MS)
    with rig(parents=1, spin_ns=300_000, coalesce_ns=0) as r:
        c = r.pump.counters()
        assert c["lead_ns"] == 300_000  # no oversleep seen yet: the cap
        r.pump.start()
        base = time.time_ns() + 20 * MS
        for seq in range(1, 11):
            r.send(datagram(seq, base + seq * 5 * MS))
        got = deliveries(r.pump, 10)
        assert [d[5] for d in got] == [0] * 10  # all on time
        c = r.pump.counters()
        keys = ("rounds", "rounds_cut", "coalesced", "spins", "spin_ns", "late_wakes")
        assert all(isinstance(c[k], int) for k in keys)
        assert c["coalesced"] == 0  # coalescing off
        assert 1 <= c["spins"] <= 10 and c["warmups"] <= c["spins"]
        assert 0 < c["lead_ns"] <= 300_000
        rec = r.records()
        assert (rec["handed_ns"] >= rec["deadline_ns"]).all()


# -- the path model: every hop of the plan emulated at the receiver --------------------------

# A depth-2 plan with sibling hedging: pub -> root -> a, b, c -> d, e, f -> the endpoint. Each
# level-2 relay hears from its own parent and the two others (H=2); the endpoint gets one copy
# from each of d, e, f (the rig's parents 1, 2, 3).
PLAN_IDS = {"pub": 10, "root": 11, "a": 12, "b": 13, "c": 14, "d": 1, "e": 2, "f": 3}
PLAN_EDGES = [("pub", "root"), ("root", "a"), ("root", "b"), ("root", "c")] + [
    (s, t) for t in "def" for s in "abc"
]
ENDPOINT = "mp-0"


def path_model_kwargs(
    ids: dict[str, int], *, lossy_into: str | None = None, lemons: tuple[str, ...] = ()
) -> dict[str, Any]:
    from overlay.nativepath import node_key

    def f(name: str) -> float:
        return 3.0 if name in lemons else 1.0

    return {
        "publisher": ids["pub"],
        "nodes": [(i, node_key(name), f(name)) for name, i in ids.items()],
        "edges": [(ids[s], ids[t], 1.0 if t == lossy_into else None) for s, t in PLAN_EDGES],
        "endpoints": [(0, node_key(ENDPOINT), f(ENDPOINT))],
    }


def test_path_model_is_the_same_on_every_host() -> None:
    # Two receiver hosts number the nodes differently (their own parent-id tables); the keys
    # come from the names, so both draw the same fate for the shared relays' links.
    other = {name: 100 + i for i, name in enumerate(reversed(list(PLAN_IDS)))}
    link: dict[str, Any] = {"median_ns": MS, "p99_ns": 3 * MS, "spike_prob": 0.05, "loss": 0.1}
    a = _datapath.ReceivePump(endpoints=1)
    b = _datapath.ReceivePump(endpoints=1)
    try:
        for pump, ids in ((a, PLAN_IDS), (b, other)):
            pump.set_link_model(**link, seed=7)
            pump.set_path_model(**path_model_kwargs(ids))
        send = time.time_ns()
        seen: dict[str, list[int | None]] = {}
        for seq in range(1, 301):
            for name in ("root", "a", "e"):
                ea = a.path_forward(PLAN_IDS[name], STREAM, 1, seq, send)
                eb = b.path_forward(other[name], STREAM, 1, seq, send)
                assert ea == eb, (name, seq)
                seen.setdefault(name, []).append(ea)
            assert a.path_arrival(PLAN_IDS["d"], 0, STREAM, 1, seq, send) == b.path_arrival(
                other["d"], 0, STREAM, 1, seq, send
            )
        # Deterministic, yet a draw per datagram: delays vary and about 10% of root's copies
        # (one lossy link from the publisher) are lost.
        root = seen["root"]
        assert len({x for x in root if x is not None}) > 250
        assert 10 <= sum(x is None for x in root) <= 55
        assert all(x is None or x > send for x in seen["e"])
        # Another seed is another emulation.
        b.set_link_model(**link, seed=8)
        reseeded = [b.path_forward(other["e"], STREAM, 1, s, send) for s in range(1, 50)]
        assert reseeded != seen["e"][:49]
        with pytest.raises(ValueError):
            a.path_forward(999, STREAM, 1, 1, send)
        a.set_path_model(None)
        with pytest.raises(ValueError):
            a.path_forward(PLAN_IDS["root"], STREAM, 1, 1, send)
    finally:
        a.close()
        b.close()


def monte_carlo_delays(model: Any, n: int) -> np.ndarray:
    """End-to-end delay at the endpoint over the plan, drawn with jasper.linkmodel's samplers."""
    links = {(s, t): model.link(s, t) for s, t in PLAN_EDGES}
    links.update({(s, ENDPOINT): model.link(s, ENDPOINT) for s in "def"})
    out = []
    for _ in range(n):
        e: dict[str, float] = {"pub": 0.0}
        for s, t in PLAN_EDGES:
            d = links[(s, t)].sample()
            if s in e and d is not None:
                e[t] = min(e.get(t, float("inf")), e[s] + d)
        arrivals = [e[s] + d for s in "def" if s in e and (d := links[(s, ENDPOINT)].sample())]
        if arrivals:
            out.append(min(arrivals))
    return np.array(out)


def test_path_delays_follow_a_monte_carlo_of_the_link_model() -> None:
    from jasper.linkmodel import LinkModel

    model = LinkModel(
        seed=11, median_ns=2 * MS, p99_ns=6 * MS, spike_prob=0.05, spike_min_ns=8 * MS,
        spike_max_ns=12 * MS, lemons=("b",), lemon_factor=3.0,
    )  # fmt: skip
    n = 500
    with rig(parents=3, coalesce_ns=0) as r:
        r.pump.set_link_model(
            median_ns=model.median_ns, p99_ns=model.p99_ns, spike_prob=model.spike_prob,
            spike_min_ns=model.spike_min_ns, spike_max_ns=model.spike_max_ns, seed=model.seed,
        )  # fmt: skip
        r.pump.set_path_model(**path_model_kwargs(PLAN_IDS, lemons=("b",)))
        r.pump.start()
        for seq in range(1, n + 1):
            r.send(datagram(seq, 0))
            if seq % 50 == 0:
                time.sleep(0.005)  # paced: the kernel never drops
        deliveries(r.pump, n)
        rec = r.records()
        totals = r.pump.counters()
    assert totals["path_copies"] == 3 * n and totals["path_floored"] == 0
    assert totals["link_lost"] == 0
    got = (rec["arrival_ns"] - rec["send_ns"]).astype(float)
    want = monte_carlo_delays(model, 20_000)
    for q, tolerance in ((0.1, 0.1), (0.5, 0.08), (0.9, 0.1)):
        g, w = float(np.quantile(got, q)), float(np.quantile(want, q))
        assert abs(g - w) <= tolerance * w, (q, g, w)
    # The records are what the hook computes: the first of the three copies in emulated time.
    with rig(parents=3) as check:
        check.pump.set_link_model(
            median_ns=model.median_ns, p99_ns=model.p99_ns, spike_prob=model.spike_prob,
            spike_min_ns=model.spike_min_ns, spike_max_ns=model.spike_max_ns, seed=model.seed,
        )  # fmt: skip
        check.pump.set_path_model(**path_model_kwargs(PLAN_IDS, lemons=("b",)))
        for row in rec[:50]:
            firsts = [
                check.pump.path_arrival(pid, 0, STREAM, 1, int(row["seq"]), int(row["send_ns"]))
                for pid in (1, 2, 3)
            ]
            kept = min(x for x in firsts if x is not None)
            assert int(row["arrival_ns"]) == kept
            assert firsts[int(row["parent"]) - 1] == kept


def test_path_loss_into_a_relay_leaves_the_hedges() -> None:
    n = 40
    with rig(parents=3, coalesce_ns=0) as r:
        r.pump.set_link_model(median_ns=200_000, p99_ns=400_000, seed=3)
        r.pump.set_path_model(**path_model_kwargs(PLAN_IDS, lossy_into="d"))
        r.pump.start()
        send = time.time_ns()
        assert r.pump.path_forward(PLAN_IDS["d"], STREAM, 1, 1, send) is None
        assert r.pump.path_forward(PLAN_IDS["e"], STREAM, 1, 1, send) is not None
        for seq in range(1, n + 1):
            r.send(datagram(seq, 0))
        got = deliveries(r.pump, n)
        assert sorted(d[3] for d in got) == list(range(1, n + 1))

        def settled() -> bool:
            return r.counters()["received"] == 2 * n and r.pump.pending == 0

        wait_until(settled)
        c = r.counters()
        assert c["link_lost"] == n  # every copy from d: d never forwards
        assert c["parents"].get(1, (0, 0)) == (0, 0)
        assert c["parents"][2][0] == n and c["parents"][3][0] == n
        assert set(r.records()["parent"].tolist()) <= {2, 3}


@pytest.mark.parametrize("offset_ns", [-400_000, 400_000])
def test_path_model_on_a_node_clock_off_the_kernel_clock(offset_ns: int) -> None:
    # Regression: with a negative offset, an overflow guard once made every emulated arrival
    # INT64_MAX, so the copies waited until shutdown.
    n = 20
    with rig(parents=3, coalesce_ns=0) as r:
        r.pump.set_clock_offset(offset_ns)
        r.pump.set_link_model(median_ns=200_000, p99_ns=400_000, seed=3)
        r.pump.set_path_model(**path_model_kwargs(PLAN_IDS))
        r.pump.start()
        for seq in range(1, n + 1):
            r.send(datagram(seq, 0))
        got = deliveries(r.pump, n)
        assert sorted(d[3] for d in got) == list(range(1, n + 1))
        wait_until(lambda: r.pump.pending == 0)
        rec = r.records()
    delay = rec["arrival_ns"] - offset_ns - rec["send_ns"]
    assert len(rec) == n and (delay > 0).all() and (delay < 1_000_000_000).all()


def test_path_graph_of_a_hedged_plan() -> None:
    from types import SimpleNamespace

    from jasper.layout import topology_from_plan
    from jasper.linkmodel import LinkModel
    from jasper.tree import tree_shape
    from overlay.nativepath import path_graph

    plan = tree_shape(100, fanout=5, hedge=2)
    topo = topology_from_plan(
        plan, addr="127.0.0.1", port_base=20000, hold_ns=MS, endpoints_per_receiver=20
    )
    ids: dict[str, int] = {}

    def parent_id(name: str) -> int:
        return ids.setdefault(name, len(ids))

    host = topo.receivers[0]
    eps: Any = [SimpleNamespace(index=i, name=e.name) for i, e in enumerate(host.endpoints)]
    graph = path_graph(topo, LinkModel(seed=3), parent_id, eps)
    senders: dict[int, list[int]] = {}
    for src, dst in graph["edges"]:
        senders.setdefault(dst, []).append(src)
    relays = {ids[r.name] for r in topo.relays}
    assert set(senders) == relays  # every relay hears from someone
    assert max(len(s) for s in senders.values()) == 3  # own parent + H=2 hedges
    pump = _datapath.ReceivePump(endpoints=len(eps))
    try:
        pump.set_link_model(median_ns=50_000, p99_ns=150_000, seed=3)
        pump.set_path_model(**graph)
        send = time.time_ns()
        for seq in (1, 2, 3):
            e: dict[int, int] = {graph["publisher"]: send}
            for i in relays:
                t = pump.path_forward(i, STREAM, 1, seq, send)
                assert t is not None  # no loss: every relay forwards
                e[i] = t
            for dst, srcs in senders.items():
                assert e[dst] > min(e[s] for s in srcs)
            parents = {ids[r.name] for r in topo.relays for t in r.targets if t.node == eps[0].name}
            arrivals = [pump.path_arrival(p, 0, STREAM, 1, seq, send) for p in parents]
            assert len(parents) == 3 and all(a is not None and a > send for a in arrivals)
    finally:
        pump.close()


async def test_receivers_emulate_the_paths_of_relays_that_forward_at_once() -> None:
    import asyncio

    from jasper.layout import ports_needed, topology_from_plan
    from jasper.tree import tree_shape
    from overlay.launch import free_port_base
    from overlay.publisher import Publisher
    from overlay.receiver import Receiver
    from overlay.relay import Relay

    # r1.1 is a lemon (5x): with the whole path emulated at the receiver, endpoints keep the
    # other relays' copies although every relay forwards at once.
    model = {"seed": 5, "median_ns": 2 * MS, "p99_ns": 4 * MS, "lemons": ["r1.1"],
             "lemon_factor": 5.0, "emulated_at": "receivers"}  # fmt: skip
    plan = tree_shape(20, fanout=5, hedge=2)
    base = free_port_base("127.0.0.1", ports_needed(plan))
    topo = topology_from_plan(
        plan, addr="127.0.0.1", port_base=base, hold_ns=60 * MS, link_model=model,
        endpoints_per_receiver=20,
    )  # fmt: skip
    relay = Relay(topo, [r.name for r in topo.relays])
    rx = Receiver(topo, topo.receivers[0].name, datapath="native", realtime=False)
    pub = Publisher(topo)
    assert relay.delay.model is None  # relays forward at once
    relay.start()
    rx.start()
    try:
        for i in range(20):
            pub.publish(b"update %d" % i)
            await asyncio.sleep(0.005)
        end = time.monotonic() + 20
        while len(rx.records) < 20 * 20 and time.monotonic() < end:
            await asyncio.sleep(0.01)
    finally:
        rx.stop()
        rx.close()
        relay.close()
        pub.close()
    assert rx.native is not None
    status = rx.native.status()
    assert status["path_copies"] > 0 and status["link_lost"] == 0
    recs = rx.records.array()
    assert len(recs) == 20 * 20
    kept = np.array([str(p) for p in recs["parent"]])
    assert (kept == "r1.1").sum() <= 3
    # End-to-end delays are whole paths (pub -> r0.0 -> r1.x -> r2.x -> endpoint: 4 hops of a
    # 2 ms median; the deadline is the send time + the 60 ms hold), not one hop.
    flight = float(np.median(recs["arrival_ns"] - recs["deadline_ns"] + 60 * MS))
    assert flight > 3.5 * MS  # one hop: ~1.5 ms (the first of three 2 ms links)


async def test_a_native_receiver_takes_its_keys_from_each_plan() -> None:
    """Receiver -> NativeDatapath.apply_plan -> set_streams: the plan's keys and announced
    session, replaced by every new plan (make before break), reported in the status."""
    import asyncio
    import dataclasses

    from jasper.topology import StreamAuth, Topology
    from overlay.receiver import Receiver
    from tests.test_overlay_path import make_topology

    def keyed(topo: Topology, *keys: StreamKey) -> Topology:
        auth = StreamAuth(keys=keys, sign_epoch=keys[-1].epoch)
        return dataclasses.replace(
            topo, stream=dataclasses.replace(topo.stream, auth=auth, session=9)
        )

    base = make_topology(n=2, fanout=2, hedge=0)
    topo = keyed(base, KEY_1)
    rx = Receiver(topo, topo.receivers[0].name, datapath="native", realtime=False)
    assert rx.datapath == "native"
    ep = topo.receivers[0].endpoints[0].name
    target = topo.address_of(ep)
    sid = topo.stream.id
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(seq: int, key: StreamKey | None, session: int = 9) -> None:
        tx.sendto(datagram(seq, 0, stream=sid, session=session, key=key), target)

    async def settled(n: int) -> list[int]:
        end = time.monotonic() + 10
        while rx.native is not None and time.monotonic() < end:
            rx.native.book()
            if rx.status()["endpoints"][ep]["received"] >= n:
                break
            await asyncio.sleep(0.01)
        recs = rx.records.array()
        return sorted(int(r["seq"]) for r in recs if str(r["endpoint"]) == ep)

    rx.start()
    try:
        send(1, KEY_1)
        send(2, KEY_2)  # an epoch this plan does not hold
        send(3, None)  # unsigned
        send(4, KEY_1, session=10)  # not the announced session
        assert await settled(4) == [1]
        rx.apply_topology(keyed(base, KEY_1, KEY_2))  # make: both keys
        send(5, KEY_1)
        send(6, KEY_2)
        assert await settled(6) == [1, 5, 6]
        rx.apply_topology(keyed(base, KEY_2))  # break: the old key retires
        send(7, KEY_1)
        send(8, KEY_2)
        assert await settled(8) == [1, 5, 6, 8]
        status = rx.status()["endpoints"][ep]
        assert status["rejected"] == {"key": 3, "session": 1}
    finally:
        tx.close()
        rx.stop()
        rx.close()


def test_a_retransmission_is_not_drawn_by_the_path_model() -> None:
    """The path model drops every copy from relay d (loss 1 into it), the fate of (stream,
    session, seq) on that path. A retransmission of the same datagrams from the same sender is
    off the tree (docs/recovery.md): it takes the last hop's own draw, no loss here, and
    arrives; were it drawn again from the datagram's key it would be lost on every retry."""
    from jasper.wire import retransmission

    n = 20
    with rig(parents=3, coalesce_ns=0) as r:
        r.pump.set_link_model(median_ns=200_000, p99_ns=400_000, seed=3)
        r.pump.set_path_model(**path_model_kwargs(PLAN_IDS, lossy_into="d"))
        r.pump.start()
        for seq in range(1, n + 1):
            r.send(retransmission(datagram(seq, 0), None), parents=[1])
        got = deliveries(r.pump, n)
        assert sorted(d[3] for d in got) == list(range(1, n + 1))
        wait_until(lambda: r.counters()["received"] == n and r.pump.pending == 0)
        c = r.counters()
        assert c["link_lost"] == 0
        assert c["parents"][1] == (n, n)


def test_a_hole_is_naked_from_the_endpoints_socket_and_the_retransmission_released() -> None:
    """Recovery on the native path (docs/recovery.md): seq 2 never comes; the pump NAKs it from
    the endpoint's own socket to the publisher's port, signed with the stream key, after the
    schedule's delay; the publisher's buffer answers and the retransmission is released on time,
    flagged recovered. A stream no port is named for gets no NAK (counted, not sent)."""
    from jasper.mp_spec import MP_FLAG_RECOVERED
    from jasper.recovery import RecoveryConfig, RetransmitBuffer
    from jasper.wire import NakRange, decode_nak, mac_matches

    key = StreamKey(2, bytes(range(32)))
    config = RecoveryConfig(nak_delay_ns=100_000, nak_jitter_ns=100_000, seed=5)
    streams = [(STREAM, {1: bytes(32), 2: key.key}, None), (STREAM + 1, None, None)]
    with rig(parents=1, coalesce_ns=0, streams=streams) as r:
        publisher = r.tx[0]
        publisher.settimeout(10.0)
        port = publisher.getsockname()[1]
        r.pump.set_recovery(config, [(STREAM, "127.0.0.1", port)])
        r.pump.start()
        buf = RetransmitBuffer()
        deadline = time.time_ns() + 300 * MS
        for seq in (1, 2, 3):
            d = datagram(seq, deadline + seq, key=key)
            buf.add(1, seq, 1, d)
            if seq != 2:
                r.send(d)
        nak, source = publisher.recvfrom(MAX_DATAGRAM)
        assert source == r.rx[0].getsockname()
        assert mac_matches(nak, {2: key.key}) is None
        got = decode_nak(nak)
        assert (got.stream_id, got.session, got.ranges) == (STREAM, 1, (NakRange(2, 1, 1),))
        for again in buf.serve(got, source, time.time_ns(), key):
            publisher.sendto(again, source)
        out = sorted(deliveries(r.pump, 3), key=lambda d: d[3])
        assert [(d[3], d[5], d[9]) for d in out] == [
            (1, 0, 0),
            (2, 0, MP_FLAG_RECOVERED),
            (3, 0, 0),
        ]
        c = r.counters()
        assert (c["naks_sent"], c["recovered"], c["recovered_late"], c["unrecoverable"]) == (
            1, 1, 0, 0,
        )  # fmt: skip
        # Stream STREAM + 1 has no publisher port: its hole is NAKed by the core (each attempt,
        # then given up), never sent.
        for seq in (1, 3):
            r.send(datagram(seq, 0, stream=STREAM + 1))
        wait_until(lambda: r.pump.counters()["open_gaps"] == 0 and r.counters()["unrecoverable"])
        totals = r.pump.counters()
        assert (totals["naks_sent"], totals["naks_unaddressed"], totals["nak_errors"]) == (
            1, config.attempts, 0,
        )  # fmt: skip
        assert r.counters()["naks_sent"] == 1 + config.attempts
        r.send(datagram(5, 0, stream=STREAM + 1))
        r.pump.set_recovery(None, [])  # off: the open range is forgotten, uncounted
        assert r.pump.counters()["open_gaps"] == 0


def test_a_heartbeat_does_not_share_the_fate_of_the_message_it_names() -> None:
    """A tail heartbeat carries the newest seq. Keyed by (stream, session, seq) alone it would
    be lost on exactly the links the message was lost on, every time, and an endpoint that
    missed the last message would never learn of it (docs/recovery.md). Each heartbeat is a
    datagram of its own (its send time is in the key), the same on every host."""
    pump = _datapath.ReceivePump(endpoints=1)
    try:
        pump.set_link_model(median_ns=MS, p99_ns=3 * MS, loss=0.1, seed=5)
        pump.set_path_model(**path_model_kwargs(PLAN_IDS))
        send = time.time_ns()
        lost = [
            seq
            for seq in range(1, 200)
            if pump.path_arrival(PLAN_IDS["d"], 0, STREAM, 1, seq, send) is None
        ]
        assert len(lost) > 10
        for seq in lost[:10]:
            beats = [
                pump.path_arrival(PLAN_IDS["d"], 0, STREAM, 1, seq, send + k * MS, True)
                for k in range(1, 21)
            ]
            assert sum(b is not None for b in beats) >= 10, seq
            assert beats == [
                pump.path_arrival(PLAN_IDS["d"], 0, STREAM, 1, seq, send + k * MS, True)
                for k in range(1, 21)
            ]  # deterministic
    finally:
        pump.close()
