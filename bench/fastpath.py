"""Fan-out 10 relay benchmark over veth: eBPF relay vs the Python relay vs a blocking loop."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ebpf import loader  # noqa: E402
from ebpf.netlab import FanoutLab, entered, mac, sh  # noqa: E402

LISTEN_PORT = 7000
SINK_PORTS = (9000, 9001)
SO_RCVBUFFORCE = 33
PAYLOAD = 100

# A paced C sender keeps the publisher's CPU small next to the relays under test.
PUBLISHER_C = r"""/* Paced Jasper datagram sender for bench/fastpath.py (sendmmsg batches). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include "jasper_wire.h"

#define BATCH 10

/* usage: SRC_IP DST_IP DST_PORT RATE_PER_S COUNT SESSION PAYLOAD_BYTES
 * Sends COUNT messages seq 1..COUNT at RATE_PER_S in batches of BATCH; prints the number sent
 * and its own CPU time in ns.
 * A C sender keeps the publisher's own CPU small next to what the relays under test spend. */
int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: %s SRC DST PORT RATE COUNT SESSION PAYLOAD\n", argv[0]);
        return 2;
    }
    long rate = atol(argv[4]), count = atol(argv[5]);
    uint32_t session = (uint32_t)atol(argv[6]);
    int payload = atoi(argv[7]);
    if (payload < 2 || payload > JASPER_MAX_PAYLOAD || rate <= 0)
        return 2;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    struct sockaddr_in src = {.sin_family = AF_INET}, dst = {.sin_family = AF_INET};
    inet_pton(AF_INET, argv[1], &src.sin_addr);
    inet_pton(AF_INET, argv[2], &dst.sin_addr);
    dst.sin_port = htons((uint16_t)atoi(argv[3]));
    if (bind(fd, (struct sockaddr *)&src, sizeof(src)) ||
        connect(fd, (struct sockaddr *)&dst, sizeof(dst))) {
        perror("bind/connect");
        return 1;
    }
    static unsigned char bufs[BATCH][JASPER_HEADER_LEN + JASPER_MAX_PAYLOAD];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof(msgs));
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    long period_ns = 1000000000L / rate * BATCH, sent = 0;
    for (long seq = 1; seq <= count;) {
        int n = 0;
        for (; n < BATCH && seq <= count; n++, seq++) {
            struct jasper_hdr *h = (struct jasper_hdr *)bufs[n];
            struct timespec now;
            clock_gettime(CLOCK_REALTIME, &now);
            memset(h, 0, sizeof(*h));
            h->magic = htons(JASPER_MAGIC);
            h->version = JASPER_VERSION;
            h->stream_id = htonl(1);
            h->session = htonl(session);
            h->seq = htobe64((uint64_t)seq);
            h->send_time_ns = htobe64((uint64_t)now.tv_sec * 1000000000ULL + now.tv_nsec);
            h->payload_len = htons((uint16_t)payload);
            h->msg_count = htons(1);
            /* one message block filling the payload: its length, then the bytes */
            bufs[n][JASPER_HEADER_LEN] = (unsigned char)((payload - 2) >> 8);
            bufs[n][JASPER_HEADER_LEN + 1] = (unsigned char)(payload - 2);
            memset(bufs[n] + JASPER_HEADER_LEN + 2, 'x', payload - 2);
            iov[n].iov_base = bufs[n];
            iov[n].iov_len = JASPER_HEADER_LEN + payload;
            msgs[n].msg_hdr.msg_iov = &iov[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
        }
        int r = sendmmsg(fd, msgs, n, 0);
        if (r > 0)
            sent += r;
        next.tv_nsec += period_ns;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    struct timespec cpu;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
    /* Own CPU includes the softirq work done in this process's context (the relay ingress and,
     * in eBPF mode, every clone's trip to the sinks). */
    printf("%ld %lld\n", sent, (long long)cpu.tv_sec * 1000000000LL + cpu.tv_nsec);
    return 0;
}
"""

# The plain baseline: one blocking socket, recvfrom, then one sendto per target.
BLOCKING_LOOP = r"""
import signal, socket, sys
targets = [(a, int(p)) for a, p in (t.split(":") for t in sys.argv[3:])]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
n = sent = 0
def stop(*_):
    print(n, sent, flush=True)
    raise SystemExit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
recv, send = s.recv, s.sendto
while True:
    d = recv(2048)
    n += 1
    for t in targets:
        send(d, t)
        sent += 1
"""

# Fallback when overlay.relay is missing: a minimal asyncio forwarding loop.
ASYNCIO_LOOP = r"""
import asyncio, signal, socket, sys
targets = [(a, int(p)) for a, p in (t.split(":") for t in sys.argv[3:])]
class P(asyncio.DatagramProtocol):
    n = sent = 0
    def connection_made(self, tr): self.tr = tr
    def datagram_received(self, d, a):
        P.n += 1
        for t in targets:
            self.tr.sendto(d, t); P.sent += 1
async def main():
    loop = asyncio.get_running_loop()
    tr, _ = await loop.create_datagram_endpoint(P, local_addr=(sys.argv[1], int(sys.argv[2])))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    print(P.n, P.sent, flush=True)
asyncio.run(main())
"""


def cpu_busy_ns() -> int:
    """Busy CPU time of the whole machine from /proc/stat, in ns: user, system, irq and softirq
    (where kernel packet work lands); idle, iowait and steal are not busy."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return sum(fields[:3] + fields[5:7]) * tick_ns


def task_cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` in ns (schedstat). Without IRQ time accounting (this
    kernel) softirq work is charged to the thread it interrupted."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def ksoftirqd_pids() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().startswith("ksoftirqd/"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


# The counting sink at the relay's wire: counts IPv4 leaving the relay's egress and drops it,
# at a cost of a few ns, so that "relay cost alone" holds the relay's work and little else.
WIRE_SINK_C = r"""
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} sink_count SEC(".maps");
SEC("tc")
int wire_sink(struct __sk_buff *skb)
{
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&sink_count, &k);
    if (v && skb->protocol == bpf_htons(ETH_P_IP))
        *v += 1;
    return 2; /* TC_ACT_SHOT */
}
char _license[] SEC("license") = "GPL";
"""


class WireSink:
    """WIRE_SINK_C at clsact egress of the relay's outgoing interface."""

    def __init__(self, work: Path, ns: str, ifname: str) -> None:
        src, obj = work / "wire_sink.c", work / "wire_sink.o"
        src.write_text(WIRE_SINK_C)
        multiarch = f"/usr/include/{os.uname().machine}-linux-gnu"
        subprocess.run(
            [
                "clang",
                "-O2",
                "-g",
                "-target",
                "bpf",
                "-I",
                multiarch,
                "-c",
                str(src),
                "-o",
                str(obj),
            ],
            check=True,
        )
        self.ns, self.ifname = ns, ifname
        self.obj = loader.BpfObject(obj)
        self.counts = self.obj.map("sink_count")
        with entered(ns):
            self.prio = loader.attach_tc(
                ifname, self.obj.prog_fd("wire_sink"), "wire_sink", egress=True
            )

    def take(self) -> int:
        """Packets counted since the last take."""
        n = self.counts.sum_u64(0)
        self.counts.zero_array()
        return n

    def close(self) -> None:
        with entered(self.ns):
            loader.detach_tc(self.ifname, self.prio, egress=True)
        self.obj.close()


DEAD_END_NET = "10.77.3"
"""Addresses behind the dead-end device: the relay's own address .1, copy targets .10 up."""


class DeadEnd:
    """A veth in the relay's namespace whose peer stays down: the kernel takes every packet
    queued to it and drops it at once (counted as the device's tx_dropped). Copies sent there
    cost the relay everything up to the device, as on a real host up to the NIC driver, and
    nothing after it: no receiver, and no counting program on the way (with bpf_stats on, a TC
    counting program at egress costs two clock reads per copy, the same for every relay)."""

    def __init__(self, lab: FanoutLab, hosts: int) -> None:
        self.ns = lab.relay
        sh("ip", "link", "add", "wire0", "type", "veth", "peer", "name", "wire1", ns=self.ns)
        sh("sysctl", "-qw", "net.ipv6.conf.wire0.disable_ipv6=1", ns=self.ns)
        sh("ip", "addr", "add", f"{DEAD_END_NET}.1/24", "dev", "wire0", ns=self.ns)
        sh("ip", "link", "set", "wire0", "up", ns=self.ns)
        self.hosts = [f"{DEAD_END_NET}.{10 + i}" for i in range(hosts)]
        for i, ip in enumerate(self.hosts):
            sh("ip", "neigh", "replace", ip, "lladdr", mac(4, i), "dev", "wire0",
               "nud", "permanent", ns=self.ns)  # fmt: skip
        self.last = self._dropped()

    def _dropped(self) -> int:
        link = json.loads(sh("ip", "-s", "-j", "link", "show", "wire0", ns=self.ns))[0]
        return int(link["stats64"]["tx"]["dropped"])

    def take(self) -> int:
        """Copies that reached the device since the last take."""
        now = self._dropped()
        n, self.last = now - self.last, now
        return n

    def close(self) -> None:
        sh("ip", "link", "del", "wire0", ns=self.ns, check=False)


@dataclass
class Result:
    """One run of one relay under test."""

    name: str
    offered: int
    """Messages the publisher sent."""
    relayed: int
    """Copies the relay reports it sent."""
    delivered: int
    """Copies that reached the sinks."""
    sink_drops: int
    """Copies the sinks' kernels dropped (receive buffer full, RcvbufErrors)."""
    busy_ns: int
    """System-wide busy CPU during the run (/proc/stat), softirq included; other load too."""
    pipeline_ns: int
    """CPU of the publisher, the relay process and ksoftirqd: the work of this pipeline only,
    softirq included (charged to the thread it ran on)."""
    own_ns: int
    """The relay's own CPU: its process (user-space relays) or its program's run time (eBPF,
    kernel.bpf_stats_enabled); both end where a copy is handed to the egress device."""
    seconds: float

    @property
    def copies_per_s(self) -> float:
        return self.delivered / self.seconds

    def per_copy(self, ns: float) -> float:
        return ns / self.delivered if self.delivered else float("nan")


class Bench:
    """The lab, the sinks and the publisher binary, and one method per relay under test."""

    def __init__(self, lab: FanoutLab, work: Path, rate: int, seconds: float) -> None:
        self.wire_sink: WireSink | DeadEnd | None = None
        """When set, copies are counted and dropped as they leave the relay (relay cost alone)."""
        self.lab = lab
        self.work = work
        self.rate = rate
        self.count = int(rate * seconds)
        self.session = 100
        self.last_drops = 0
        self.hosts = [ep.ip for ep in lab.endpoints]
        """Where copies go: the MP namespaces, or the dead end's addresses."""
        self.sinks: list[socket.socket] = []
        for ep in lab.endpoints:
            with entered(ep.ns):
                for port in SINK_PORTS:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
                    s.bind((ep.ip, port))
                    s.setblocking(False)
                    self.sinks.append(s)
        self.publisher = work / "publisher"
        (work / "publisher.c").write_text(PUBLISHER_C)
        subprocess.run(
            ["gcc", "-O2", "-I", str(ROOT / "ebpf" / "include"), str(work / "publisher.c"),
             "-o", str(self.publisher)],
            check=True,
        )  # fmt: skip

    @property
    def targets(self) -> list[tuple[str, int]]:
        """Fan-out 10: two endpoint ports on each of five hosts."""
        return [(ip, port) for ip in self.hosts for port in SINK_PORTS]

    def rcvbuf_errors(self) -> int:
        total = 0
        for ep in self.lab.endpoints:
            lines = [ln.split() for ln in sh("cat", "/proc/net/snmp", ns=ep.ns).splitlines()]
            udp = [ln for ln in lines if ln[0] == "Udp:"]
            total += int(dict(zip(udp[0][1:], udp[1][1:], strict=True))["RcvbufErrors"])
        return total

    def drain_sinks(self) -> int:
        if self.wire_sink is not None:
            return self.wire_sink.take()
        n = 0
        for s in self.sinks:
            while True:
                try:
                    s.recv(4096)
                    n += 1
                except BlockingIOError:
                    break
        return n

    def publish(self, relay_pid: int | None = None) -> tuple[int, int, int, int, float]:
        """Run the publisher. Returns (sent, system busy ns, pipeline ns, relay process ns, wall
        seconds) over the sending window plus a short settle time for queues to empty."""
        self.session += 1
        self.drain_sinks()
        errs0 = self.rcvbuf_errors()
        soft = ksoftirqd_pids()
        k0 = sum(task_cpu_ns(p) for p in soft)
        r0 = task_cpu_ns(relay_pid) if relay_pid else 0
        b0 = cpu_busy_ns()
        t0 = time.monotonic()
        out = sh(str(self.publisher), self.lab.pub_ip, self.lab.relay_in_ip, str(LISTEN_PORT),
                 str(self.rate), str(self.count), str(self.session), str(PAYLOAD),
                 ns=self.lab.pub)  # fmt: skip
        time.sleep(0.3)  # let the relay and sinks finish what is queued
        b1 = cpu_busy_ns()
        r1 = task_cpu_ns(relay_pid) if relay_pid else 0
        k1 = sum(task_cpu_ns(p) for p in soft)
        secs = time.monotonic() - t0
        self.last_drops = self.rcvbuf_errors() - errs0
        sent, pub_cpu = (int(x) for x in out.split())
        return sent, b1 - b0, pub_cpu + (r1 - r0) + (k1 - k0), r1 - r0, secs

    def run_ebpf(self, with_targets: bool = True, hedged: bool = False) -> Result:
        fp = loader.RelayFastPath(
            node=f"{self.lab.prefix}-bench", ifname=self.lab.relay_in, listen_port=LISTEN_PORT
        )
        hedges = (False, True) if hedged else (False,)
        with entered(self.lab.relay):
            fp.attach()
            try:
                if with_targets:
                    fp.set_targets([(ip, p, h) for ip, p in self.targets for h in hedges])
                t0, _ = fp.prog_stats()
                sent, busy, pipe, _, secs = self.publish()
                t1, _ = fp.prog_stats()
                copies = fp.counters()["copies"]
            finally:
                fp.close()
        name = "eBPF relay (TC clone+redirect)" if with_targets else "baseline: eBPF drop-all"
        delivered = self.drain_sinks()
        return Result(name, sent, copies, delivered, self.last_drops, busy, pipe, t1 - t0, secs)

    def run_receiver_filter(self, hook: str) -> Result:
        """eBPF relay sending every endpoint two copies (own + hedge); the MPs' filter at `hook`
        (tc or xdp) drops the second. `own_ns` is the filters' program time."""
        filters = []
        try:
            for ep in self.lab.endpoints:
                with entered(ep.ns):
                    f = loader.ReceiverFastPath(
                        node=f"{ep.ns}-bench-rx", ifname=ep.ifname, ports=SINK_PORTS, hook=hook
                    )
                    f.attach()
                    f.set_parents([(self.lab.relay_in_ip, LISTEN_PORT)])
                    filters.append(f)
            s0 = sum(f.prog_stats()[0] for f in filters)
            r = self.run_ebpf(hedged=True)
            r.own_ns = sum(f.prog_stats()[0] for f in filters) - s0
            dups = sum(f.counters()["duplicates"] for f in filters)
        finally:
            for f in filters:
                f.close()
        r.name = f"MP filter at {hook} ({dups} duplicates dropped)"
        return r

    def _process_relay(self, cmd: list[str], name: str, ready: Path | None) -> Result:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.relay, *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            if ready is not None:
                while not ready.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not start")
                    time.sleep(0.05)
            else:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"{name} did not start")
            time.sleep(0.2)
            sent, busy, pipe, own, secs = self.publish(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        relayed = int(out.split()[1]) if ready is None else -1
        delivered = self.drain_sinks()
        return Result(name, sent, relayed, delivered, self.last_drops, busy, pipe, own, secs)

    def run_python_relay(self) -> Result:
        """The project's relay daemon (overlay.relay via `jasper relay`) in user-space mode."""
        per_host = len(SINK_PORTS)
        topo = {
            "version": 1,
            "stream": {"id": 1, "hedge": 0},
            "publisher": {"name": "pub", "addr": self.lab.pub_ip, "targets": [{"node": "r1"}]},
            "relays": [
                {
                    "name": "r1",
                    "addr": self.lab.relay_in_ip,
                    "port": LISTEN_PORT,
                    "targets": [{"node": f"e{i}"} for i in range(len(self.targets))],
                }
            ],
            "receivers": [
                {
                    "name": f"h{j}",
                    "addr": ip,
                    "endpoints": [
                        {"name": f"e{j * per_host + k}", "port": port, "parents": ["r1"]}
                        for k, port in enumerate(SINK_PORTS)
                    ],
                }
                for j, ip in enumerate(self.hosts)
            ],
        }
        path = self.work / "topology.json"
        path.write_text(json.dumps(topo))
        ready = self.work / "relay.ready"
        ready.unlink(missing_ok=True)
        records = self.work / "records"
        records.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "jasper_cli.main", "relay", "--topology", str(path),
               "--node-name", "r1", "--fast-path", "user", "--no-link-model",
               "--ready-file", str(ready), "--records", str(records)]  # fmt: skip
        r = self._process_relay(cmd, "Python relay (overlay.relay)", ready)
        status = records / "status-relay-r1.json"
        if status.exists():
            node = json.loads(status.read_text())["nodes"]["r1"]
            r.relayed = int(node.get("sent", 0)) + int(node.get("sent_hedge", 0))
            status.unlink()
        return r

    def run_script(self, script: str, name: str) -> Result:
        args = [f"{ip}:{p}" for ip, p in self.targets]
        cmd = [sys.executable, "-c", script, self.lab.relay_in_ip, str(LISTEN_PORT), *args]
        return self._process_relay(cmd, name, None)


def have_python_relay() -> bool:
    try:
        from overlay.relay import Relay  # noqa: F401
    except Exception:
        return False
    return True


def median_run(runs: list[Result]) -> Result:
    """The run with the median pipeline CPU per copy (runs differ with the machine's load)."""
    ordered = sorted(
        runs, key=lambda r: r.per_copy(r.pipeline_ns) if r.delivered else r.pipeline_ns
    )
    return ordered[len(ordered) // 2]


@contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled on for the run (programs' own run time), restored after."""
    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = knob.read_text().strip()
    knob.write_text("1")
    try:
        yield
    finally:
        knob.write_text(before)


RELAYS = ("baseline", "blocking", "ebpf", "python")


def run_table(bench: Bench, rounds: int, python_relay: bool) -> dict[str, list[Result]]:
    """Every relay `rounds` times, interleaved so that load drifts hit all of them alike; each
    round starts with its own baseline run."""
    runs: dict[str, list[Result]] = {k: [] for k in RELAYS}
    for _ in range(rounds):
        runs["baseline"].append(bench.run_ebpf(with_targets=False))
        runs["blocking"].append(bench.run_script(BLOCKING_LOOP, "blocking-socket loop"))
        runs["ebpf"].append(bench.run_ebpf())
        if python_relay:
            runs["python"].append(bench.run_python_relay())
        else:
            name = "asyncio loop (overlay.relay MISSING)"
            runs["python"].append(bench.run_script(ASYNCIO_LOOP, name))
    return runs


@dataclass
class Summary:
    """One relay's figures over the rounds of a table, in ns per delivered copy: each the median
    over the rounds (other sessions' load comes in bursts that hit one round, not all)."""

    run: Result
    """The round with the median pipeline CPU per copy; its counts are the ones shown."""
    pipe: float
    """Pipeline CPU per copy."""
    net: float
    """Pipeline minus the same round's baseline run, per copy: what the relay adds."""
    own: float
    """The relay's own CPU per copy (process, or program run time)."""
    system: float
    """System-wide busy time per copy."""
    nets: list[float]
    """`net` of each round, for the spread."""


def summarize(runs: dict[str, list[Result]]) -> dict[str, Summary]:
    base = runs["baseline"]
    out: dict[str, Summary] = {}
    for k, rs in runs.items():
        nets = [r.per_copy(r.pipeline_ns - b.pipeline_ns) for r, b in zip(rs, base, strict=True)]
        out[k] = Summary(
            run=median_run(rs),
            pipe=statistics.median(r.per_copy(r.pipeline_ns) for r in rs),
            net=statistics.median(nets),
            own=statistics.median(r.per_copy(r.own_ns) for r in rs),
            system=statistics.median(r.per_copy(r.busy_ns) for r in rs),
            nets=nets,
        )
    return out


def report(title: str, runs: dict[str, list[Result]], fanout: int) -> list[dict[str, object]]:
    res = summarize(runs)
    base, block, ebpf, py = (res[k] for k in RELAYS)
    print()
    print(title)
    print(f"{'relay':32} {'offered':>7} {'relayed':>7} {'deliver':>7} {'drops':>5} "
          f"{'copy/s':>6} {'pipe ns':>7} {'net ns':>7} {'own ns':>7} {'sys ns':>7}")  # fmt: skip
    rows: list[dict[str, object]] = []
    for sm in (block, ebpf, py):
        r = sm.run
        print(f"{r.name:32} {r.offered * fanout:>7} {r.relayed:>7} {r.delivered:>7} "
              f"{r.sink_drops:>5} {r.copies_per_s:>6.0f} {sm.pipe:>7.0f} {sm.net:>7.0f} "
              f"{sm.own:>7.0f} {sm.system:>7.0f}")  # fmt: skip
        rows.append({**vars(r), "table": title, "pipeline_ns_per_copy": sm.pipe,
                     "net_ns_per_copy": sm.net, "net_ns_per_copy_rounds": sm.nets,
                     "own_ns_per_copy": sm.own, "system_ns_per_copy": sm.system})  # fmt: skip
    b = base.run
    base_ms = statistics.median(x.pipeline_ns for x in runs["baseline"]) / 1e6
    print(f"  baseline runs (no copies): pipeline {base_ms:.0f} ms CPU (median); system-wide "
          f"busy {b.busy_ns / 1e6:.0f} ms of {2 * b.seconds * 1e3:.0f} ms "
          f"(the rest of the machine's load shows here)")  # fmt: skip
    print(f"  net ns per round: eBPF {', '.join(f'{x:.0f}' for x in ebpf.nets)}; "
          f"Python {', '.join(f'{x:.0f}' for x in py.nets)}")  # fmt: skip

    def times(a: float, c: float) -> str:
        return f"{a / c:.1f}x" if c > 0 else "n/a"

    e = ebpf
    for o in (py, block):
        print(f"  {o.run.name} / eBPF relay, CPU per copy: net {times(o.net, e.net)}, "
              f"own {times(o.own, e.own)}, pipeline {times(o.pipe, e.pipe)}, "
              f"system-wide {times(o.system, e.system)}")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=4000, help="offered messages per second")
    ap.add_argument("--seconds", type=float, default=3.0, help="sending time per run")
    ap.add_argument("--rounds", type=int, default=5, help="runs per relay; medians are shown")
    ap.add_argument(
        "--sink",
        choices=("dead-end", "tc"),
        default="dead-end",
        help="where copies end in the relay-alone table: a device that drops them (default), "
        "or a TC counting program at the egress of the relay's veth (runs per copy, and with "
        "bpf_stats on reads the clock twice per copy for every relay alike)",
    )
    ap.add_argument("--skip-e2e", action="store_true", help="relay-alone table only")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    ok, why = loader.fast_path_available()
    if not ok:
        print(f"eBPF fast path unavailable: {why}", file=sys.stderr)
        return 2
    python_relay = have_python_relay()
    rows: list[dict[str, object]] = []
    # Fan-out 10: five MP namespaces with two endpoint ports each.
    with FanoutLab(receivers=5) as lab, tempfile.TemporaryDirectory() as tmp, bpf_stats():
        bench = Bench(lab, Path(tmp), args.rate, args.seconds)
        fanout = len(bench.targets)
        print(f"fan-out {fanout}, {args.rate} msg/s offered for {args.seconds} s per run, "
              f"{PAYLOAD}-byte payload, {os.cpu_count()} CPUs, medians of {args.rounds} "
              f"interleaved rounds; load average {os.getloadavg()[0]:.2f} at start")  # fmt: skip
        if not python_relay:
            print("overlay.relay is NOT importable: measuring a minimal asyncio loop instead")
        print(
            "pipe ns: CPU of publisher + relay process + ksoftirqd per delivered copy "
            "(schedstat; softirq is charged to the thread it interrupts)"
        )
        print(
            "net ns: pipe minus the same round's baseline run (publisher sends and relay "
            "ingress, no copies): everything the relay adds, softirq included -- the goal's "
            "figure; "
            "own ns: relay process CPU, or the eBPF program's run time (bpf_stats; the last "
            "copy's transmit runs after the program returns and is not in it); "
            "sys ns: system-wide /proc/stat busy time (other load included)"
        )
        e2e_hosts = bench.hosts
        if args.sink == "tc":
            bench.wire_sink = WireSink(Path(tmp), lab.relay, lab.relay_out)
            where = "a TC counting program at the relay's egress"
        else:
            dead_end = DeadEnd(lab, len(e2e_hosts))
            bench.wire_sink = dead_end
            bench.hosts = dead_end.hosts
            where = "a device that drops them (veth, peer down)"
        try:
            alone = run_table(bench, args.rounds, python_relay)
        finally:
            bench.wire_sink.close()
            bench.wire_sink = None
            bench.hosts = e2e_hosts
        rows += report(f"relay cost alone: copies handed to {where}", alone, fanout)
        if args.skip_e2e:
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
            return 0
        e2e = run_table(bench, args.rounds, python_relay)
        rows += report("end to end: copies delivered into 10 UDP sockets in 5 MP namespaces",
                       e2e, fanout)  # fmt: skip
        print()
        print("delivery at the MPs per copy (end-to-end pipe minus relay-alone pipe: bridge, "
              "MP veth, UDP receive into the socket; the MPs' work, not the relay's):")  # fmt: skip
        sa, se = summarize(alone), summarize(e2e)
        for k in ("blocking", "ebpf", "python"):
            extra = se[k].pipe - sa[k].pipe
            print(f"  {se[k].run.name:32} {extra:>7.0f} ns")
            rows.append({"table": "delivery at the MPs", "name": se[k].run.name,
                         "ns_per_copy": extra})  # fmt: skip

        # The MPs' filter: TC or XDP on their veth, measured side by side.
        hooks = {h: median_run([bench.run_receiver_filter(h) for _ in range(args.rounds)])
                 for h in ("tc", "xdp")}  # fmt: skip
        print()
        print("receiver filter: relay sends own + hedge copy to every endpoint, the MP drops one")
        print(f"{'filter':48} {'copies':>7} {'deliver':>7} {'drops':>5} {'pipe ns/copy':>12} "
              f"{'filter ns/copy':>14}")  # fmt: skip
        for r in hooks.values():
            per = r.pipeline_ns / max(r.relayed, 1)
            own = r.own_ns / max(r.relayed, 1)
            print(f"{r.name:48} {r.relayed:>7} {r.delivered:>7} {r.sink_drops:>5} {per:>12.0f} "
                  f"{own:>14.0f}")  # fmt: skip
            rows.append({**vars(r), "table": "receiver hook", "pipeline_ns_per_copy": per,
                         "filter_ns_per_copy": own})  # fmt: skip
        tc, xdp = hooks["tc"], hooks["xdp"]
        print(
            f"  XDP / TC, pipeline CPU per copy: "
            f"{(xdp.pipeline_ns / max(xdp.relayed, 1)) / (tc.pipeline_ns / max(tc.relayed, 1)):.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
