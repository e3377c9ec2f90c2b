"""The datagram MAC's cost on the native path, beside the rest of the path, side by side.

The same N datagrams go through `jasper._native.ReceiverCore.datagram_received` once on an
unkeyed stream and once on a keyed one (signed with the stream's key), in alternating rounds
of one run; the difference per datagram is what the MAC check costs (HMAC-SHA256 over header
and payload through OpenSSL's EVP_MAC, one keyed context per key re-initialised per copy, and a
constant-time compare). Every datagram is new (accepted and released unstamped; releases are
pulled every PULL datagrams, as a pump would), so "the rest of the path" is parse, admission,
release and the Python call. With --primitives, a small C program compares the ways libcrypto
offers to reuse a keyed HMAC (the choice made in native/receiver_core.c).

    .venv/bin/python bench/mac.py [--count 20000] [--rounds 7] [--copies 3] [--primitives]

With --copies 3 each datagram arrives three times in a row, as at H=2: only the first is
hashed (a duplicate of a kept copy is dropped before the MAC), so the MAC per copy is a third.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jasper import _native  # noqa: E402
from jasper.wire import Header, StreamKey, encode_batch  # noqa: E402
from jasper.wire_spec import BLOCK_HEADER_LEN, HEADER_LEN, MAX_DATAGRAM  # noqa: E402

KEY = StreamKey(1, bytes(range(32)))
UNKEYED, KEYED = 1, 2
PULL = 1024
TARGET_NS = 300
"""Issue 15: the MAC costs at most 0.3 µs per datagram on the native path."""

SIZES = (
    ("1 message", HEADER_LEN + BLOCK_HEADER_LEN + 14),
    ("~300 B", 300),
    ("full", MAX_DATAGRAM),
)
"""(label, datagram bytes): the smallest is one 14-byte message behind the 64-byte header."""


def datagrams(stream: int, size: int, count: int, *, signed: bool) -> list[bytes]:
    body = size - HEADER_LEN - BLOCK_HEADER_LEN
    out = []
    for seq in range(1, count + 1):
        h = Header(stream_id=stream, session=1, seq=seq, send_time_ns=seq, deadline_ns=0)
        out.append(encode_batch(h, [bytes([seq & 0xFF]) * body], key=KEY if signed else None))
    assert all(len(d) == size for d in out[:1])
    return out


def run_once(data: list[bytes], now: int, copies: int = 1) -> float:
    """ns per arriving copy through a fresh core (set-up outside the timing); with `copies`
    > 1 each datagram arrives that many times in a row, as H+1 hedged copies do."""
    core = _native.ReceiverCore(endpoints=1, ring_size=1 << 16)
    core.set_stream(UNKEYED, keys=None)
    core.set_stream(KEYED, keys={KEY.epoch: KEY.key})
    feed = core.datagram_received
    pull = core.releases
    t0 = time.perf_counter_ns()
    for i, d in enumerate(data):
        for parent in range(copies):
            feed(0, d, parent, now, now)
        if i % PULL == PULL - 1:
            pull()
    pull()
    elapsed = time.perf_counter_ns() - t0
    c = core.counters(0)
    assert c["accepted"] == len(data), c  # every datagram passed (the MAC too, when keyed)
    assert c.get("duplicates", 0) == (copies - 1) * len(data), c
    return elapsed / (len(data) * copies)


PRIMITIVES_C = r"""/* bench/mac.py --primitives: ways to reuse a keyed HMAC-SHA256 in OpenSSL 3. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 200000;
    unsigned char key[32], buf[1472], out[64];
    for (int i = 0; i < 32; i++)
        key[i] = (unsigned char)i;
    memset(buf, 7, sizeof buf);
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *m = EVP_MAC_CTX_new(mac);
    OSSL_PARAM p[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "SHA256", 0),
              OSSL_PARAM_construct_end()};
    EVP_MAC_init(m, key, 32, p);
    HMAC_CTX *h = HMAC_CTX_new(), *tmpl = HMAC_CTX_new(), *w = HMAC_CTX_new();
    HMAC_Init_ex(h, key, 32, EVP_sha256(), NULL);
    HMAC_Init_ex(tmpl, key, 32, EVP_sha256(), NULL);
    for (int a = 2; a < argc; a++) {
        size_t len = (size_t)atoi(argv[a]), ol;
        unsigned int ul;
        double t0 = now();
        for (int i = 0; i < n; i++) {
            EVP_MAC_init(m, NULL, 0, NULL);
            EVP_MAC_update(m, buf, 48);
            EVP_MAC_update(m, buf + 64, len - 64);
            EVP_MAC_final(m, out, &ol, sizeof out);
        }
        double evp = (now() - t0) / n;
        t0 = now();
        for (int i = 0; i < n; i++) {
            HMAC_Init_ex(h, NULL, 0, NULL, NULL);
            HMAC_Update(h, buf, 48);
            HMAC_Update(h, buf + 64, len - 64);
            HMAC_Final(h, out, &ul);
        }
        double reinit = (now() - t0) / n;
        t0 = now();
        for (int i = 0; i < n; i++) {
            HMAC_CTX_copy(w, tmpl);
            HMAC_Update(w, buf, 48);
            HMAC_Update(w, buf + 64, len - 64);
            HMAC_Final(w, out, &ul);
        }
        double copy = (now() - t0) / n;
        t0 = now();
        for (int i = 0; i < n; i++)
            HMAC(EVP_sha256(), key, 32, buf, len, out, &ul);
        double oneshot = (now() - t0) / n;
        printf("%zu %.0f %.0f %.0f %.0f\n", len, evp, reinit, copy, oneshot);
    }
    return 0;
}
"""


def primitives(sizes: list[int]) -> None:
    if shutil.which("gcc") is None:
        print("primitives: no gcc, skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp, "p.c"), Path(tmp, "p")
        src.write_text(PRIMITIVES_C)
        built = subprocess.run(
            ["gcc", "-O2", str(src), "-o", str(exe), "-lcrypto"], capture_output=True, text=True
        )
        if built.returncode:
            print(f"primitives: build failed: {built.stderr.strip()[:300]}")
            return
        run = subprocess.run(
            [str(exe), "200000", *map(str, sizes)], capture_output=True, text=True, check=True
        )
    print("\nHMAC-SHA256 alone in C, ns per datagram (key schedule reused unless one-shot):")
    print(
        f"{'bytes':>6} {'EVP_MAC reinit':>15} {'HMAC_Init_ex':>13} {'CTX_copy':>9} {'one-shot':>9}"
    )
    for line in run.stdout.splitlines():
        size, evp, reinit, copy, oneshot = line.split()
        print(f"{size:>6} {evp:>15} {reinit:>13} {copy:>9} {oneshot:>9}")
    print(
        "native/receiver_core.c uses EVP_MAC reinit: the supported API (HMAC_CTX is deprecated "
        "in OpenSSL 3), within a few tens of ns of the fastest."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20000, help="datagrams per round")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per case (median taken)")
    ap.add_argument("--primitives", action="store_true", help="also time libcrypto's HMAC APIs")
    ap.add_argument(
        "--copies",
        type=int,
        default=1,
        help="copies of each datagram in a row (3 = H=2: the MAC is paid by the first only)",
    )
    args = ap.parse_args()
    load = os.getloadavg()
    print(
        f"bench/mac.py: {args.count} datagrams x {args.copies} copies x {args.rounds} rounds, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    now = time.time_ns()
    print(
        f"per copy: {'datagram':>10} {'bytes':>5} {'unkeyed ns':>10} {'keyed ns':>9} {'MAC ns':>7} "
        f"{'ratio':>6}  target <= {TARGET_NS} ns"
    )
    for label, size in SIZES:
        plain = datagrams(UNKEYED, size, args.count, signed=False)
        signed = datagrams(KEYED, size, args.count, signed=True)
        run_once(plain[:1000], now, args.copies)  # warm the pools and caches
        run_once(signed[:1000], now, args.copies)
        a: list[float] = []
        b: list[float] = []
        for _ in range(args.rounds):  # alternate, so drift on a shared host hits both
            a.append(run_once(plain, now, args.copies))
            b.append(run_once(signed, now, args.copies))
        base, keyed = statistics.median(a), statistics.median(b)
        cost = keyed - base
        verdict = "met" if cost <= TARGET_NS else "missed"
        print(
            f"          {label:>10} {size:>5} {base:>10.0f} {keyed:>9.0f} {cost:>7.0f} "
            f"{keyed / base:>6.2f}  {verdict}"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.primitives:
        primitives([size for _, size in SIZES])


if __name__ == "__main__":
    main()
