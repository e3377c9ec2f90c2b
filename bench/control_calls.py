"""Control calls to a real controller: a new HTTP client per call vs the one pooled client.

Run: python3 bench/control_calls.py [--subscriptions 200] [--calls 200]

Starts `jasper controller` on loopback (`LoopbackController`) with two receiver hosts and one
stream, then, in the same run and in alternating blocks (so a database that grows or a
machine that gets busier weighs on both ways alike):
- per call: GET /healthz and GET /v1/nodes (admin token);
- per subscription: what the demo does for each MP, create it (POST /v1/mps) and subscribe
  its endpoint (POST /v1/subscriptions).
"one-shot" is module-level `httpx.get/request`, a new client and connection for every call
(what controller/loopback.py did); "pooled" goes through the controller's own methods, one
keep-alive client. Figures are milliseconds per call or per subscription: median, p90, mean.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from controller.loopback import LoopbackController

BLOCK = 25


def one_shot_call(
    ctl: LoopbackController, method: str, path: str, *, token: str | None = None, json: Any = None
) -> Any:
    r = httpx.request(
        method,
        ctl.url + path,
        json=json,
        headers={"Authorization": f"Bearer {token or ctl.admin_token}"},
        timeout=10,
    )
    r.raise_for_status()
    return r.json() if r.content else None


def measure(n: int, ways: dict[str, Callable[[int], object]]) -> dict[str, list[float]]:
    """`n` timed runs of each way, ms, in alternating blocks of BLOCK."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    i = 0
    while i < n:
        k = min(BLOCK, n - i)
        for name, fn in ways.items():
            for j in range(i, i + k):
                t0 = time.perf_counter()
                fn(j)
                times[name].append(1e3 * (time.perf_counter() - t0))
        i += k
    return times


def row(what: str, name: str, ms: list[float]) -> str:
    s = sorted(ms)
    p90 = s[min(len(s) - 1, int(0.9 * len(s)))]
    return (
        f"{what:<22} {name:<9} {statistics.median(s):8.2f} {p90:8.2f} "
        f"{statistics.fmean(s):8.2f} {len(s):6d}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscriptions", type=int, default=200, help="per way")
    ap.add_argument("--calls", type=int, default=200, help="per way and per call kind")
    args = ap.parse_args()
    if not 0 < args.subscriptions <= 1000:
        ap.error("--subscriptions: 1 to 1000 (one receiver host of 1,000 endpoints per way)")

    with LoopbackController(heartbeat_timeout_s=600.0) as ctl:
        for h, port in (("rx0", 30_000), ("rx1", 31_000)):
            body = {"name": h, "role": "receiver", "data_addr": "127.0.0.1", "port": port}
            ctl.call("POST", "/v1/nodes", json={**body, "capacity": 1000})
        ctl.create_stream(1, "md")

        def old_sub(i: int) -> None:
            doc = one_shot_call(ctl, "POST", "/v1/mps", json={"name": f"old{i}"})
            body = {"stream_id": 1, "endpoint": {"addr": "127.0.0.1", "port": 30_000 + i}}
            one_shot_call(ctl, "POST", "/v1/subscriptions", token=doc["token"], json=body)

        def new_sub(i: int) -> None:
            _, token = ctl.create_mp(f"new{i}")
            ctl.subscribe(token, 1, "127.0.0.1", 31_000 + i)

        calls = {
            "GET /healthz": measure(
                args.calls,
                {
                    "one-shot": lambda i: httpx.get(ctl.url + "/healthz", timeout=10),
                    "pooled": lambda i: ctl.call_text("/healthz"),
                },
            ),
            "GET /v1/nodes": measure(
                args.calls,
                {
                    "one-shot": lambda i: one_shot_call(ctl, "GET", "/v1/nodes"),
                    "pooled": lambda i: ctl.nodes(),
                },
            ),
            "subscription (2 calls)": measure(
                args.subscriptions, {"one-shot": old_sub, "pooled": new_sub}
            ),
        }
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    print(f"{'ms per':<22} {'way':<9} {'median':>8} {'p90':>8} {'mean':>8} {'n':>6}")
    for what, times in calls.items():
        for name, ms in times.items():
            print(row(what, name, ms))


if __name__ == "__main__":
    main()
