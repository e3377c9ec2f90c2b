"""Publisher -> eBPF relay -> receiver namespaces over veth: each endpoint gets each copy once."""

from __future__ import annotations

import collections
import select
import socket
import time
from collections.abc import Iterator

import pytest

from jasper import wire
from jasper.wire_spec import FLAG_HEDGE_COPY
from tests.conftest import require_privileged

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

LISTEN_PORT = 7000
PORTS = (9000, 9001, 9002)
MESSAGES = 300
STREAM, SESSION = 5, 77
SO_RCVBUFFORCE = 33  # not exported by the socket module


def _drain(socks: list[socket.socket], quiet_s: float = 0.3) -> dict[int, list[bytes]]:
    """Read every socket until none has had anything for `quiet_s`."""
    got: dict[int, list[bytes]] = collections.defaultdict(list)
    by_fd = {s.fileno(): s for s in socks}
    while True:
        ready, _, _ = select.select(list(by_fd.values()), [], [], quiet_s)
        if not ready:
            return got
        for s in ready:
            while True:
                try:
                    got[s.fileno()].append(s.recv(65535))
                except BlockingIOError:
                    break


def _snmp_udp(ns: str) -> dict[str, int]:
    from ebpf.netlab import sh

    lines = [ln.split() for ln in sh("cat", "/proc/net/snmp", ns=ns).splitlines()]
    udp = [ln for ln in lines if ln[0] == "Udp:"]
    return dict(zip(udp[0][1:], (int(x) for x in udp[1][1:]), strict=True))


@pytest.fixture
def lab() -> Iterator[object]:
    from ebpf.loader import fast_path_available

    ok, why = fast_path_available()
    require_privileged(f"eBPF fast path ({why})", ok)
    from ebpf.netlab import FanoutLab

    with FanoutLab(receivers=3) as lab:
        yield lab


@pytest.mark.parametrize(
    ("arrival", "csum_helpers"),
    [("full", False), ("partial", False), ("full", True), ("partial", True)],
)
def test_every_endpoint_gets_every_message_once_through_the_fast_path(
    lab: object, arrival: str, csum_helpers: bool
) -> None:
    """`arrival` full: the publisher computes checksums (a NIC's CHECKSUM_NONE/UNNECESSARY);
    partial: it leaves them to offload, so the relay sees CHECKSUM_PARTIAL seeds, and the relay's
    egress completes them in software (TX offload off there), so that they are verified too."""
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from ebpf import loader
    from ebpf.loader import ReceiverFastPath, RelayFastPath
    from ebpf.netlab import FanoutLab, entered, sh

    assert isinstance(lab, FanoutLab)
    if arrival == "partial":
        sh("ethtool", "-K", lab.pub_if, "tx", "on", ns=lab.pub)
        sh("ethtool", "-K", lab.relay_out, "tx", "off", ns=lab.relay)
    relay = RelayFastPath(
        node=f"{lab.prefix}-relay",
        ifname=lab.relay_in,
        listen_port=LISTEN_PORT,
        csum_helpers=csum_helpers,
    )
    receivers: list[ReceiverFastPath] = []
    socks: list[socket.socket] = []
    owner: dict[int, tuple[str, int]] = {}
    try:
        with entered(lab.relay):
            assert loader.interface_of(lab.relay_in_ip) == lab.relay_in
            assert loader.interface_of("127.0.0.9") == "lo"
            relay.attach()
            # Every endpoint twice: once as own child, once as a sibling's hedge target.
            targets = [
                (ep.ip, port, hedge) for ep in lab.endpoints for port in PORTS for hedge in (0, 1)
            ]
            relay.set_targets([(ip, port, bool(h)) for ip, port, h in targets])
            assert relay.counters()["targets_fib"] == 0  # static neighbours were found
            stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stranger.bind((lab.relay_out_ip, LISTEN_PORT + 100))
        for ep in lab.endpoints:
            with entered(ep.ns):
                fp = ReceiverFastPath(node=f"{ep.ns}-recv", ifname=ep.ifname, ports=PORTS)
                fp.attach()
                fp.set_parents([(lab.relay_in_ip, LISTEN_PORT)])
                receivers.append(fp)
                for port in PORTS:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
                    s.bind((ep.ip, port))
                    s.setblocking(False)
                    socks.append(s)
                    owner[s.fileno()] = (ep.ns, port)
        with entered(lab.endpoints[0].ns):
            # ETH_P_ALL taps run before TC ingress: they see the copies the filter drops too.
            cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            cap.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
            cap.bind((lab.endpoints[0].ifname, 0))
            cap.setblocking(False)
        with entered(lab.pub):
            pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            pub.bind((lab.pub_ip, 6000))

        # Each message twice into the relay (the publisher's own hedge), plus malformed ones.
        for seq in range(1, MESSAGES + 1):
            header = wire.Header(
                stream_id=STREAM, session=SESSION, seq=seq, send_time_ns=seq, deadline_ns=0
            )
            data = wire.encode(header, f"msg {seq}".encode())
            pub.sendto(data, (lab.relay_in_ip, LISTEN_PORT))
            pub.sendto(wire.set_flags(data, FLAG_HEDGE_COPY), (lab.relay_in_ip, LISTEN_PORT))
            if seq % 50 == 0:
                pub.sendto(b"JS\x01junk", (lab.relay_in_ip, LISTEN_PORT))
                # A non-parent aiming at an endpoint: must never reach the socket.
                stranger.sendto(data, (lab.endpoints[1].ip, PORTS[0]))
            if seq % 20 == 0:
                time.sleep(0.002)  # let softirq drain; the test is about correctness
        got = _drain(socks)

        for s in socks:
            ns, port = owner[s.fileno()]
            seqs = [wire.decode(d).header.seq for d in got.get(s.fileno(), [])]
            assert sorted(seqs) == list(range(1, MESSAGES + 1)), (ns, port, len(seqs))
            assert all(wire.decode(d).header.stream_id == STREAM for d in got[s.fileno()])

        malformed = MESSAGES // 50
        c = relay.counters()
        assert c["in"] == 2 * MESSAGES + malformed
        assert c["duplicates"] == MESSAGES
        assert c["malformed"] == malformed
        assert c["copies"] == MESSAGES * len(targets)
        assert c["clone_failed"] == c["no_neighbour"] == 0
        for i, fp in enumerate(receivers):
            rc = fp.counters()
            assert rc["accepted"] == MESSAGES * len(PORTS)
            assert rc["duplicates"] == MESSAGES * len(PORTS)
            assert rc["not_parent"] == (malformed if i == 1 else 0)
            assert rc["malformed"] == 0
            # The kernel checked every UDP checksum on the way to the sockets.
            snmp = _snmp_udp(lab.endpoints[i].ns)
            assert snmp["InCsumErrors"] == 0
            assert snmp["InDatagrams"] == MESSAGES * len(PORTS)

        # Captured on the first MP's wire: every copy, own and hedge, with valid checksums.
        frames: list[bytes] = []
        while True:
            try:
                frames.append(cap.recv(65535))
            except BlockingIOError:
                break
        copies = [Ether(f) for f in frames]
        copies = [p for p in copies if UDP in p and p[UDP].dport in PORTS]
        assert len(copies) == MESSAGES * len(PORTS) * 2
        hedged: collections.Counter[tuple[int, bool]] = collections.Counter()
        for p in copies:
            ip_sum, udp_sum = p[IP].chksum, p[UDP].chksum
            assert udp_sum != 0
            q = p.copy()
            del q[IP].chksum
            del q[UDP].chksum
            q = Ether(raw(q))
            assert (q[IP].chksum, q[UDP].chksum) == (ip_sum, udp_sum)
            # From the address the relay was reached at, as its bound socket would send.
            assert (p[IP].src, p[UDP].sport) == (lab.relay_in_ip, LISTEN_PORT)
            msg = wire.decode(bytes(p[UDP].payload))
            hedged[(p[UDP].dport, bool(msg.header.flags & FLAG_HEDGE_COPY))] += 1
        for port in PORTS:
            assert hedged[(port, False)] == hedged[(port, True)] == MESSAGES
        cap.close()
        pub.close()
        stranger.close()
    finally:
        for s in socks:
            s.close()
        for fp in receivers:
            fp.close()
        relay.close()
    assert not loader.pin_dir(f"{lab.prefix}-relay").exists()
    assert "jasper" not in sh("tc", "filter", "show", "dev", lab.relay_in, "ingress", ns=lab.relay)


def test_relays_and_receiver_share_loopback() -> None:
    """The daemons' default: several relay nodes and a receiver filter on `lo` of one namespace.
    Clones re-enter lo ingress marked; relays pass them on to the receiver filter."""
    import os

    from ebpf.loader import ReceiverFastPath, RelayFastPath, fast_path_available
    from ebpf.netlab import entered, sh

    ok, why = fast_path_available()
    require_privileged(f"eBPF fast path ({why})", ok)
    ns = f"jt-ebpf-{os.getpid()}-lo"
    sh("ip", "netns", "add", ns)
    paths: list[RelayFastPath | ReceiverFastPath] = []
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        with entered(ns):
            a = RelayFastPath(node=f"{ns}-a", ifname="lo", listen_port=7000)
            b = RelayFastPath(node=f"{ns}-b", ifname="lo", listen_port=7001)
            rx = ReceiverFastPath(node=f"{ns}-rx", ifname="lo", ports=[9000, 9001])
            for fp in (a, b, rx):
                fp.attach()
                paths.append(fp)
            a.set_targets([("127.0.0.3", 9000, False), ("127.0.0.3", 9000, True)])
            b.set_targets([("127.0.0.3", 9001, False)])
            rx.set_parents([("127.0.0.2", 7000), ("127.0.0.4", 7001)])
            socks = []
            for port in (9000, 9001):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("127.0.0.3", port))
                s.setblocking(False)
                socks.append(s)
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for seq in range(1, 51):
            hdr = wire.Header(stream_id=1, session=1, seq=seq, send_time_ns=1, deadline_ns=0)
            tx.sendto(wire.encode(hdr, b"x"), ("127.0.0.2", 7000))
            tx.sendto(wire.encode(hdr, b"y"), ("127.0.0.4", 7001))
        got = _drain(socks, 0.2)
        seqs = [sorted(wire.decode(d).header.seq for d in got[s.fileno()]) for s in socks]
        assert seqs == [list(range(1, 51))] * 2
        assert a.counters()["copies"] == 100 and b.counters()["copies"] == 50
        assert rx.counters()["duplicates"] == 50 and rx.counters()["accepted"] == 100
        assert a.tc_prio != b.tc_prio != rx.tc_prio
        for s in (*socks, tx):
            s.close()
    finally:
        for fp in paths:
            fp.close()
        sh("ip", "netns", "del", ns, check=False)
