"""200 concurrent subscribes against a real uvicorn: clean answers, rows equal to successes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from controller.loopback import LoopbackController


@pytest.fixture
def ctl() -> Iterator[LoopbackController]:
    with LoopbackController() as c:
        yield c


def test_200_concurrent_subscribes(ctl: LoopbackController) -> None:
    for i in range(4):
        ctl.call(
            "POST",
            "/v1/nodes",
            json={"name": f"relay{i}", "role": "relay", "data_addr": "127.0.0.1", "port": 9000 + i},
        )
    for h in range(2):
        ctl.call(
            "POST",
            "/v1/nodes",
            json={
                "name": f"rx{h}",
                "role": "receiver",
                "data_addr": "127.0.0.1",
                "port": 10_000 + 1000 * h,
                "capacity": 100,
            },
        )
    ctl.create_stream(1, "md")
    mps = [ctl.create_mp(f"mp{i}") for i in range(40)]
    rng = random.Random(4)
    # A pool smaller than the request count, so MPs race for endpoints (409), repeat
    # themselves (200) and sometimes aim at ports no receiver hosts (422).
    pool = [10_000 + p for p in range(60)] + [11_000 + p for p in range(60)] + [12_345]
    requests = []
    for _ in range(200):
        mp_id, token = rng.choice(mps)
        requests.append((mp_id, token, rng.choice(pool)))

    async def fire() -> list[tuple[int, int, int, httpx.Response]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=ctl.url, limits=limits, timeout=60) as client:
            start = asyncio.Event()

            async def one(mp_id: int, token: str, port: int) -> tuple[int, int, int, Any]:
                await start.wait()
                r = await client.post(
                    "/v1/subscriptions",
                    json={"stream_id": 1, "endpoint": {"addr": "127.0.0.1", "port": port}},
                    headers={"Authorization": f"Bearer {token}"},
                )
                return mp_id, token_index[token], port, r

            token_index = {t: i for i, (_, t) in enumerate(mps)}
            tasks = [asyncio.create_task(one(*req)) for req in requests]
            await asyncio.sleep(0.05)
            start.set()
            return await asyncio.gather(*tasks)

    results = asyncio.run(fire())
    statuses = sorted({r.status_code for *_, r in results})
    assert set(statuses) <= {200, 201, 409, 422}, statuses
    assert any(r.status_code == 201 for *_, r in results)
    successes: dict[int, tuple[int, int]] = {}
    for mp_id, _, port, r in results:
        body = r.json()
        if r.status_code in (200, 201):
            assert body["mp_id"] == mp_id and body["endpoint"]["port"] == port
            successes[body["id"]] = (mp_id, port)
        else:
            assert body["detail"]  # a clean, explained refusal
        if port == 12_345:
            assert r.status_code == 422
    # Exactly one 201 per stored row: the rest were idempotent repeats or refusals.
    assert sum(r.status_code == 201 for *_, r in results) == len(successes)
    rows = ctl.call("GET", "/v1/subscriptions")
    assert {row["id"]: (row["mp_id"], row["endpoint"]["port"]) for row in rows} == successes
    # Each endpoint is held by one MP only.
    ports = [row["endpoint"]["port"] for row in rows]
    assert len(ports) == len(set(ports))
    tree = ctl.tree(1)
    assert {e["subscription_id"] for e in tree["endpoints"]} == set(successes)


def test_subscribe_endpoints_helper(ctl: LoopbackController) -> None:
    ctl.call(
        "POST",
        "/v1/nodes",
        json={
            "name": "rx0",
            "role": "receiver",
            "data_addr": "127.0.0.1",
            "port": 20_000,
            "capacity": 5,
        },
    )
    ctl.create_stream(7, "md")
    subs = ctl.subscribe_endpoints(7, [("127.0.0.1", 20_000 + i, None) for i in range(5)])
    assert [s["endpoint"]["port"] for s in subs] == [20_000 + i for i in range(5)]
    assert len({s["mp_id"] for s in subs}) == 5
    assert len(ctl.tree(7)["endpoints"]) == 5
