"""BPF_PROG_TEST_RUN fixtures: Scapy-built input -> expected output packets and action."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pytest

from ebpf.loader import ReceiverFastPath, RelayFastPath
from jasper import wire
from jasper.wire_spec import FLAG_HEARTBEAT, FLAG_HEDGE_COPY, FLAG_RETRANSMIT, HEADER_LEN
from tests.conftest import require_privileged

TC_ACT_UNSPEC, TC_ACT_SHOT = 0xFFFFFFFF, 2  # UNSPEC: pass on to later filters, then the stack
TC_ACT_REDIRECT = 7  # the relay sends the original itself to its last target
XDP_DROP, XDP_PASS = 1, 2
CLONE_MARK = 0x4A530000 | 7000  # the relay's mark: base | its listen port
LISTEN_PORT = 7000
RELAY_IP, SENDER_IP = "10.9.0.1", "10.9.0.9"
ETH_P_ALL = 0x0003

pytestmark = pytest.mark.privileged


def _available() -> tuple[bool, str]:
    from ebpf.loader import fast_path_available

    return fast_path_available()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    ok, why = _available()
    require_privileged(f"eBPF fast path ({why})", ok)
    from ebpf.loader import ReceiverFastPath, RelayFastPath
    from ebpf.netlab import entered, mac, sh

    ns = f"jt-ebpf-{os.getpid()}-fx"
    sh("ip", "netns", "add", ns)
    relay = receiver = None
    try:
        sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", ns=ns)
        sh("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", ns=ns)
        sh(
            "ip",
            "-n",
            ns,
            "link",
            "add",
            "ja",
            "address",
            mac(9, 1),
            "type",
            "veth",
            "peer",
            "name",
            "jb",
            "address",
            mac(9, 2),
        )
        for dev in ("lo", "ja", "jb"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "addr", "add", f"{RELAY_IP}/24", "dev", "ja")
        for i in range(2, 60):
            sh(
                "ip",
                "-n",
                ns,
                "neigh",
                "replace",
                f"10.9.0.{i}",
                "lladdr",
                mac(10, i),
                "dev",
                "ja",
                "nud",
                "permanent",
            )

        with entered(ns):
            relay = RelayFastPath(
                node=f"jt-fx-relay-{os.getpid()}", ifname="ja", listen_port=LISTEN_PORT
            )
            relay.attach()
            receiver = ReceiverFastPath(
                node=f"jt-fx-recv-{os.getpid()}", ifname="jb", ports=[9000, 9001]
            )
            receiver.attach()
            cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            cap.bind(("jb", 0))
            cap.setblocking(False)
        yield Lab(ns=ns, relay=relay, receiver=receiver, cap=cap, entered=entered)
        cap.close()
    finally:
        for fp in (relay, receiver):
            if fp is not None:
                with entered(ns):
                    fp.close()
        sh("ip", "netns", "del", ns, check=False)


@dataclass
class Lab:
    """The fixture namespace: relay on ja, receiver filter on jb, a capture socket on jb."""

    ns: str
    relay: RelayFastPath
    receiver: ReceiverFastPath
    cap: socket.socket
    entered: Callable[[str], AbstractContextManager[None]]

    def drain(self, wait_s: float = 0.05) -> list[bytes]:
        """Frames that arrived on jb (the far end of the relay's target interface)."""
        frames: list[bytes] = []
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([self.cap], [], [], left)
            if not r:
                break
            while True:
                try:
                    frames.append(self.cap.recv(4096))
                except BlockingIOError:
                    break
        return [f for f in frames if len(f) > 23 and f[12:14] == b"\x08\x00" and f[23] == 17]


def jasper_packet(
    *,
    seq: int = 1,
    stream: int = 7,
    session: int = 3,
    flags: int = 0,
    payload: bytes = b"market-data",
    dport: int = LISTEN_PORT,
    src: str = SENDER_IP,
    sport: int = 5555,
    dst: str = RELAY_IP,
    udp_chksum: int | None = None,
    sent_ns: int = 11,
) -> Any:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    body = wire.encode(
        wire.Header(
            stream_id=stream,
            session=session,
            seq=seq,
            send_time_ns=sent_ns,
            deadline_ns=22,
            flags=flags,
        ),
        payload,
    )
    udp = (
        UDP(sport=sport, dport=dport)
        if udp_chksum is None
        else UDP(sport=sport, dport=dport, chksum=udp_chksum)
    )
    return (
        Ether(src="02:00:00:00:00:09", dst="02:4a:53:00:09:01")
        / IP(src=src, dst=dst, ttl=33, id=4321)
        / udp
        / body
    )


def expected_copy(inp: Any, ip: str, port: int, hedge: bool, zero_csum: bool = False) -> bytes:
    """What the relay must send for one target: built from scratch, checksums by Scapy."""
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from ebpf.netlab import mac

    body = bytearray(bytes(inp[UDP].payload))
    body[3] = (body[3] & ~FLAG_HEDGE_COPY) | (FLAG_HEDGE_COPY if hedge else 0)
    last = int(ip.rsplit(".", 1)[1])
    udp = (
        UDP(sport=LISTEN_PORT, dport=port, chksum=0)
        if zero_csum
        else UDP(sport=LISTEN_PORT, dport=port)
    )
    pkt = (
        Ether(dst=mac(10, last), src=mac(9, 1))
        / IP(src=RELAY_IP, dst=ip, ttl=33, id=4321)
        / udp
        / bytes(body)
    )
    return raw(pkt)


def raw_packet(**kw: Any) -> bytes:
    from scapy.compat import raw

    return bytes(raw(jasper_packet(**kw)))


def run(lab: Lab, prog_fd: int, pkt: Any, mark: int = 0) -> int:
    from scapy.compat import raw

    from ebpf.loader import prog_test_run

    with lab.entered(lab.ns):
        return prog_test_run(
            prog_fd, raw(pkt) if not isinstance(pkt, bytes) else pkt, mark=mark
        ).retval


def fan_out(lab: Lab, pkt: Any, mark: int = 0, wait_s: float = 0.05) -> tuple[int, list[bytes]]:
    """Run the relay once: (action, copies). Clones leave for real and are captured on jb; with
    TC_ACT_REDIRECT the packet as the program left it is the last copy (BPF_PROG_TEST_RUN does
    not carry out the redirect itself)."""
    from scapy.compat import raw

    from ebpf.loader import prog_test_run

    with lab.entered(lab.ns):
        res = prog_test_run(
            lab.relay.prog_fd, raw(pkt) if not isinstance(pkt, bytes) else pkt, mark=mark
        )
    copies = lab.drain(wait_s)
    if res.retval == TC_ACT_REDIRECT:
        copies.append(res.data)
    return res.retval, copies


@pytest.fixture(params=["inline", "helpers"])
def relay(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The relay with an empty table, patching UDP checksums with its own arithmetic or with
    bpf_l4_csum_replace (both must write the same bytes)."""
    lab.relay.csum_helpers = request.param == "helpers"
    with lab.entered(lab.ns):
        lab.relay.reset()
        lab.relay.set_targets([])
        for stream in list(lab.relay.stream_targets):
            lab.relay.remove_stream(stream)
    lab.drain(0.01)
    yield lab


def set_targets(lab: Lab, targets: list[tuple[str, int, bool]]) -> None:
    with lab.entered(lab.ns):
        lab.relay.set_targets(targets)


def counters(lab: Lab) -> dict[str, int]:
    return lab.relay.counters()


def test_relay_copies_to_every_target_with_exact_headers(relay: Lab) -> None:
    targets = [("10.9.0.2", 9000, False), ("10.9.0.3", 9001, False), ("10.9.0.4", 9002, True)]
    set_targets(relay, targets)
    pkt = jasper_packet(flags=FLAG_RETRANSMIT)
    action, got = fan_out(relay, pkt)
    assert action == TC_ACT_REDIRECT
    want = [expected_copy(pkt, ip, port, hedge) for ip, port, hedge in targets]
    assert sorted(got) == sorted(want)
    # Clones for all but the last target, in table order; the original goes to the last.
    assert got[-1] == want[-1]
    c = counters(relay)
    assert (c["in"], c["copies"], c["duplicates"], c["malformed"]) == (1, 3, 0, 0)


def test_relay_clears_hedge_flag_for_own_children(relay: Lab) -> None:
    """A copy that reached this relay as a hedge goes on to its own children as a normal copy."""
    set_targets(relay, [("10.9.0.2", 9000, False), ("10.9.0.3", 9000, True)])
    pkt = jasper_packet(flags=FLAG_HEDGE_COPY)
    action, got = fan_out(relay, pkt)
    assert action == TC_ACT_REDIRECT
    assert sorted(got) == sorted(
        [expected_copy(pkt, "10.9.0.2", 9000, False), expected_copy(pkt, "10.9.0.3", 9000, True)]
    )


def test_relay_forwards_only_first_copy_of_a_message(relay: Lab) -> None:
    set_targets(relay, [("10.9.0.2", 9000, False), ("10.9.0.3", 9000, False)])
    sent = [
        fan_out(relay, jasper_packet(seq=5)),
        fan_out(relay, jasper_packet(seq=5, flags=FLAG_HEDGE_COPY)),
        fan_out(relay, jasper_packet(seq=5, session=4)),  # new session: new message
        fan_out(relay, jasper_packet(seq=5, flags=FLAG_HEARTBEAT)),  # own key space
        # Heartbeats repeat the last seq: told apart by send time, hedged copies still deduped.
        fan_out(relay, jasper_packet(seq=5, flags=FLAG_HEARTBEAT, sent_ns=12)),
        fan_out(relay, jasper_packet(seq=5, flags=FLAG_HEARTBEAT, sent_ns=12)),
    ]
    assert [a for a, _ in sent] == [TC_ACT_REDIRECT, TC_ACT_SHOT] + [TC_ACT_REDIRECT] * 3 + [
        TC_ACT_SHOT
    ]
    assert [len(c) for _, c in sent] == [2, 0, 2, 2, 2, 0]
    c = counters(relay)
    assert (c["in"], c["copies"], c["duplicates"]) == (6, 8, 2)


def test_relay_in_several_trees_forwards_each_stream_by_its_own_table(relay: Lab) -> None:
    one, two = [("10.9.0.2", 9000, False)], [("10.9.0.3", 9001, False), ("10.9.0.4", 9002, True)]
    with relay.entered(relay.ns):
        relay.relay.set_targets(one, stream=1)
        relay.relay.set_targets(two, stream=2)
    for stream, table in ((1, one), (2, two)):
        # The same (session, seq) in two streams: two messages, each copied by its own table.
        pkt = jasper_packet(stream=stream, seq=9)
        action, got = fan_out(relay, pkt)
        assert action == TC_ACT_REDIRECT
        assert sorted(got) == sorted(expected_copy(pkt, ip, p, h) for ip, p, h in table)
    # A stream without a table of its own meets the node's table, empty here: dropped.
    assert fan_out(relay, jasper_packet(stream=3, seq=9)) == (TC_ACT_SHOT, [])
    assert counters(relay)["stream_tables"] == 2
    with relay.entered(relay.ns):
        relay.relay.remove_stream(2)
    assert fan_out(relay, jasper_packet(stream=2, seq=10)) == (TC_ACT_SHOT, [])
    pkt = jasper_packet(stream=1, seq=10)
    assert fan_out(relay, pkt) == (TC_ACT_REDIRECT, [expected_copy(pkt, "10.9.0.2", 9000, False)])
    c = counters(relay)
    assert (c["in"], c["copies"], c["no_targets"], c["stream_tables"]) == (5, 4, 2, 1)


def test_relay_reaches_thirty_and_more_targets(relay: Lab) -> None:
    """F·(H+1) = 10·3 = 30 targets and beyond: the bounded loop goes to 56 here."""
    targets = [(f"10.9.0.{2 + i // 2}", 9000 + i % 2, i % 3 != 0) for i in range(56)]
    set_targets(relay, targets)
    pkt = jasper_packet(payload=b"x" * 300)
    action, got = fan_out(relay, pkt, wait_s=0.2)
    assert action == TC_ACT_REDIRECT
    assert sorted(got) == sorted(expected_copy(pkt, ip, p, h) for ip, p, h in targets)
    assert counters(relay)["copies"] == 56


def test_relay_keeps_zero_udp_checksum_zero(relay: Lab) -> None:
    set_targets(relay, [("10.9.0.2", 9000, True), ("10.9.0.5", 9001, False)])
    pkt = jasper_packet(udp_chksum=0)
    action, got = fan_out(relay, pkt)
    assert action == TC_ACT_REDIRECT
    assert sorted(got) == sorted(
        [
            expected_copy(pkt, "10.9.0.2", 9000, True, zero_csum=True),
            expected_copy(pkt, "10.9.0.5", 9001, False, zero_csum=True),
        ]
    )


def test_relay_rewrites_packets_with_ip_options(relay: Lab) -> None:
    """IP options move the UDP header: the ports are written apart from Ethernet and IP."""
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP, IPOption_NOP, IPOption_Timestamp
    from scapy.layers.l2 import Ether

    from ebpf.netlab import mac

    options = [IPOption_NOP(), IPOption_NOP(), IPOption_Timestamp(length=8, pointer=9)]
    targets = [("10.9.0.2", 9000, False), ("10.9.0.3", 9001, True), ("10.9.0.3", 9000, False)]
    set_targets(relay, targets)
    inp = jasper_packet()
    inp[IP].options = options
    inp = Ether(raw(inp))
    assert inp[IP].ihl > 5
    action, got = fan_out(relay, inp)
    assert action == TC_ACT_REDIRECT
    want = []
    for ip, port, hedge in targets:
        body = bytearray(bytes(inp[UDP].payload))
        body[3] = (body[3] & ~FLAG_HEDGE_COPY) | (FLAG_HEDGE_COPY if hedge else 0)
        last = int(ip.rsplit(".", 1)[1])
        want.append(
            raw(
                Ether(dst=mac(10, last), src=mac(9, 1))
                / IP(src=RELAY_IP, dst=ip, ttl=33, id=4321, options=options)
                / UDP(sport=LISTEN_PORT, dport=port)
                / bytes(body)
            )
        )
    assert sorted(got) == sorted(want)


def test_relay_uses_fib_lookup_when_neighbour_was_unknown(relay: Lab) -> None:
    """No neighbour entry at set_targets time: resolved per packet, counted; none at all: counted
    as no_neighbour and skipped."""
    from ebpf.netlab import sh

    sh("ip", "-n", relay.ns, "neigh", "del", "10.9.0.77", "dev", "ja", check=False)
    sh("ip", "-n", relay.ns, "neigh", "del", "10.9.0.78", "dev", "ja", check=False)
    # The kernel answers FIB lookups from BPF only on interfaces that forward.
    sh("sysctl", "-qw", "net.ipv4.conf.ja.forwarding=1", ns=relay.ns)
    set_targets(relay, [("10.9.0.77", 9000, False), ("10.9.0.78", 9000, False)])
    c = counters(relay)
    assert c["targets_fib"] == 2
    sh(
        "ip",
        "-n",
        relay.ns,
        "neigh",
        "replace",
        "10.9.0.77",
        "lladdr",
        "02:4a:53:00:0a:4d",
        "dev",
        "ja",
        "nud",
        "permanent",
    )
    try:
        pkt = jasper_packet()
        # The last target has no neighbour: the first got a clone, the original is dropped.
        assert fan_out(relay, pkt) == (TC_ACT_SHOT, [expected_copy(pkt, "10.9.0.77", 9000, False)])
        c = counters(relay)
        assert (c["copies"], c["fib_fallback"], c["no_neighbour"]) == (1, 1, 1)
    finally:
        sh("ip", "-n", relay.ns, "neigh", "del", "10.9.0.77", "dev", "ja", check=False)
        sh("sysctl", "-qw", "net.ipv4.conf.ja.forwarding=0", ns=relay.ns)


def test_relay_passes_what_is_not_its_own(relay: Lab) -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import ARP, Ether

    set_targets(relay, [("10.9.0.2", 9000, False)])
    fd = relay.relay.prog_fd
    assert run(relay, fd, jasper_packet(dport=7001)) == TC_ACT_UNSPEC
    assert run(relay, fd, Ether() / ARP(pdst=RELAY_IP)) == TC_ACT_UNSPEC
    assert run(relay, fd, Ether() / IP(dst=RELAY_IP) / TCP(dport=LISTEN_PORT)) == TC_ACT_UNSPEC
    # One of our own clones looping back is passed untouched, never copied again.
    assert run(relay, fd, jasper_packet(), mark=CLONE_MARK) == TC_ACT_UNSPEC
    assert relay.drain() == []
    c = counters(relay)
    assert (c["passed"], c["clone_seen"], c["in"], c["copies"]) == (3, 1, 0, 0)
    # A clone made by another relay node on the same interface is a real arrival.
    action, got = fan_out(relay, jasper_packet(), mark=0x4A530000 | 7001)
    assert (action, len(got)) == (TC_ACT_REDIRECT, 1)


def malformed_packets() -> list[tuple[str, bytes]]:
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    good = raw(jasper_packet())
    eth_ip_udp = 14 + 20 + 8
    out: list[tuple[str, bytes]] = []

    def patched(offset: int, value: bytes) -> bytes:
        # Patch the Jasper header and recompute checksums, so only the header is wrong.
        b = bytearray(good)
        b[eth_ip_udp + offset : eth_ip_udp + offset + len(value)] = value
        p = Ether(bytes(b))
        del p[IP].chksum
        del p[UDP].chksum
        return raw(p)

    out.append(("bad magic", patched(0, b"\x4a\x54")))
    out.append(("bad version", patched(2, b"\x01")))  # version 1: no batches
    out.append(("unknown flag", patched(3, b"\x80")))
    out.append(("data without messages", patched(42, b"\x00\x00")))
    out.append(("heartbeat with payload", patched(3, b"\x04")))
    out.append(("payload_len too long", patched(40, b"\x00\x63")))
    out.append(("payload_len too short", patched(40, b"\x00\x01")))
    cut = good[eth_ip_udp : eth_ip_udp + HEADER_LEN - 1]
    out.append(("header cut short", raw(Ether() / IP(dst=RELAY_IP) / UDP(dport=LISTEN_PORT) / cut)))
    out.append(("empty datagram", raw(Ether() / IP(dst=RELAY_IP) / UDP(dport=LISTEN_PORT))))
    out.append(("truncated frame", good[:-5]))
    out.append(("truncated in header", good[: eth_ip_udp + 20]))
    p = jasper_packet()
    p[UDP].len = len(p[UDP]) + 4
    out.append(("udp length lies", raw(p)))
    p = jasper_packet()
    p[IP].flags = "MF"
    out.append(("first fragment", raw(p)))
    return out


def test_relay_counts_and_drops_malformed_never_forwards(relay: Lab) -> None:
    set_targets(relay, [("10.9.0.2", 9000, False), ("10.9.0.3", 9000, True)])
    fd = relay.relay.prog_fd
    cases = malformed_packets()
    for name, pkt in cases:
        assert run(relay, fd, pkt) == TC_ACT_SHOT, name
    assert relay.drain(0.1) == []
    c = counters(relay)
    assert (c["malformed"], c["copies"], c["in"]) == (len(cases), 0, len(cases))
    # Truncated below the UDP header: cannot be ours, the stack drops it itself.
    assert run(relay, fd, raw_packet()[:40]) == TC_ACT_UNSPEC


def test_relay_with_no_targets_still_swallows_data(relay: Lab) -> None:
    assert run(relay, relay.relay.prog_fd, jasper_packet()) == TC_ACT_SHOT
    assert counters(relay)["no_targets"] == 1


def test_relay_replaces_table_in_one_step(relay: Lab) -> None:
    set_targets(relay, [("10.9.0.2", 9000, False)])
    set_targets(relay, [("10.9.0.3", 9001, True), ("10.9.0.4", 9001, False)])
    pkt = jasper_packet()
    _, got = fan_out(relay, pkt)
    assert sorted(got) == sorted(
        [expected_copy(pkt, "10.9.0.3", 9001, True), expected_copy(pkt, "10.9.0.4", 9001, False)]
    )


# --- receiver ---------------------------------------------------------------------------------


@pytest.fixture
def receiver(lab: Lab) -> Iterator[Lab]:
    with lab.entered(lab.ns):
        lab.receiver.reset()
        lab.receiver.set_parents([("10.9.0.1", 7000), ("10.9.0.50", 0)])
    yield lab


def to_receiver(**kw: Any) -> Any:
    kw.setdefault("src", "10.9.0.1")
    kw.setdefault("sport", 7000)
    kw.setdefault("dst", "10.9.0.2")
    kw.setdefault("dport", 9000)
    return jasper_packet(**kw)


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_receiver_outcomes(receiver: Lab, hook: str) -> None:
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from ebpf.build import build
    from ebpf.loader import BpfObject

    if hook == "tc":
        fd = receiver.receiver.prog_fd
        ok, drop = TC_ACT_UNSPEC, TC_ACT_SHOT
        stats = receiver.receiver
        obj = None
    else:
        # The XDP flavour of the same filter, loaded on its own (maps of its own).
        obj = BpfObject(build("receiver"))
        fd = obj.prog_fd("jasper_receiver_xdp")
        ok, drop = XDP_PASS, XDP_DROP
        import struct

        obj.map("recv_ports").update(struct.pack("!H", 9000), b"\1")
        obj.map("recv_ports").update(struct.pack("!H", 9001), b"\1")
        for ip, port in (("10.9.0.1", 7000), ("10.9.0.50", 0)):
            key = socket.inet_aton(ip) + struct.pack("!H", port) + b"\0\0"
            obj.map("recv_parents").update(key, b"\1")
        stats = None
    try:
        assert run(receiver, fd, to_receiver(seq=1)) == ok
        assert run(receiver, fd, to_receiver(seq=1, flags=FLAG_HEDGE_COPY)) == drop  # hedge dup
        assert run(receiver, fd, to_receiver(seq=1, dport=9001)) == ok  # other endpoint
        assert run(receiver, fd, to_receiver(seq=2, src="10.9.0.50", sport=1234)) == ok  # any port
        assert run(receiver, fd, to_receiver(seq=3, sport=7001)) == drop  # wrong source port
        assert run(receiver, fd, to_receiver(seq=4, src="10.9.0.66")) == drop  # stranger
        assert run(receiver, fd, to_receiver(seq=1, flags=FLAG_HEARTBEAT)) == ok  # own space
        assert run(receiver, fd, to_receiver(seq=5, dport=9100)) == ok  # not an endpoint port
        for name, pkt in malformed_packets():
            p = Ether(pkt)
            if UDP in p:
                # Re-address to an endpoint; the malformation stays (checksums are not checked).
                p[IP].src, p[IP].dst = "10.9.0.1", "10.9.0.2"
                p[UDP].sport, p[UDP].dport = 7000, 9000
                pkt = raw(p)
            assert run(receiver, fd, pkt) == drop, name
        if stats is not None:
            c = stats.counters()
            n_bad = len(malformed_packets())
            assert c == {
                "in": 7 + n_bad,
                "accepted": 4,
                "duplicates": 1,
                "not_parent": 2,
                "malformed": n_bad,
                "passed": 1,
            }
    finally:
        if obj is not None:
            obj.close()


def test_cleanup_removes_crashed_relay_leftovers() -> None:
    """A process that attaches and dies without close(): cleanup() removes filter and pins."""
    ok, why = _available()
    require_privileged(f"eBPF fast path ({why})", ok)
    from ebpf import loader
    from ebpf.netlab import entered, sh

    ns = f"jt-ebpf-{os.getpid()}-crash"
    node = f"jt-crash-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "ca", "type", "veth", "peer", "name", "cb")
        sh("ip", "-n", ns, "link", "set", "ca", "up")
        code = (
            "import os; from ebpf.loader import RelayFastPath; "
            f"r = RelayFastPath(node='{node}', ifname='ca', listen_port=7000); r.attach(); "
            "os._exit(0)"
        )
        subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        assert "jasper_relay" in sh("tc", "filter", "show", "dev", "ca", "ingress", ns=ns)
        assert (loader.pin_dir(node) / "relay_ring").exists()
        # A restarted relay with the same node name takes over: the leftovers go first.
        with entered(ns):
            again = loader.RelayFastPath(node=node, ifname="ca", listen_port=7000)
            again.attach()
        filters = sh("tc", "filter", "show", "dev", "ca", "ingress", ns=ns)
        assert filters.count("jasper_relay direct-action") == 1
        with entered(ns):
            again.close()
        assert not loader.pin_dir(node).exists()
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
        removed = loader.cleanup(node)
        assert any("ca" in r for r in removed)
        assert not loader.pin_dir(node).exists()
        assert "jasper_relay" not in sh("tc", "filter", "show", "dev", "ca", "ingress", ns=ns)
        assert loader.cleanup(node) == []
    finally:
        sh("ip", "netns", "del", ns, check=False)
        loader.cleanup(node, force=True)


def test_relay_parser_agrees_with_python_decoder(relay: Lab) -> None:
    """Fuzz: random Jasper headers (IP/UDP kept consistent). The kernel forwards exactly the
    datagrams whose header jasper.wire.decode_header accepts, and counts every other one as
    malformed (the message blocks are the receivers' to walk)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    # Two targets: one clone and the original, both paths of the fan-out.
    set_targets(relay, [("10.9.0.2", 9000, False), ("10.9.0.3", 9000, True)])
    good = wire.encode(
        wire.Header(stream_id=1, session=1, seq=1, send_time_ns=1, deadline_ns=0), b"abc"
    )

    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        edits=st.lists(st.tuples(st.integers(0, HEADER_LEN - 1), st.integers(0, 255)), max_size=4),
        extra=st.binary(max_size=40),
        cut=st.integers(0, HEADER_LEN + 40),
    )
    def check(edits: list[tuple[int, int]], extra: bytes, cut: int) -> None:
        body = bytearray(good + extra)
        for at, value in edits:
            body[at] = value
        body = body[: max(len(body) - cut, 0)] if cut > 40 else body
        with relay.entered(relay.ns):
            relay.relay.reset()
        pkt = (
            Ether(dst="02:4a:53:00:09:01")
            / IP(src=SENDER_IP, dst=RELAY_IP)
            / UDP(sport=5555, dport=LISTEN_PORT)
            / bytes(body)
        )
        try:
            wire.decode_header(bytes(body))
            valid = True
        except wire.WireError:
            valid = False
        action, frames = fan_out(relay, raw(pkt), wait_s=0.05 if valid else 0.005)
        assert action == (TC_ACT_REDIRECT if valid else TC_ACT_SHOT)
        c = counters(relay)
        assert (c["copies"], c["malformed"]) == ((2, 0) if valid else (0, 1)), bytes(body).hex()
        assert len(frames) == (2 if valid else 0)

    check()
