"""The control plane inside the emulation: the real controller in its own namespace, nodes
registered, MPs created and every endpoint subscribed through the REST API, and the
controller's plan turned into the topology the data plane runs.

The runner talks to the controller from a thread that has entered the controller's namespace
(setns is per thread), so no route between the caller's namespace and the emulated region is
ever needed.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from jasper.topology import Topology, parse_topology
from overlay.emulation.netns import enter

if TYPE_CHECKING:
    from controller.loopback import ControllerClient

T = TypeVar("T")

CONTROLLER_PORT = 8080


@dataclass
class SubscriptionStats:
    """What subscribing the MPs through the REST API took."""

    mps: int = 0
    subscriptions: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    """Per subscribe request, ms (MP creation excluded)."""

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

        return {
            "mps": self.mps,
            "subscriptions": self.subscriptions,
            "failures": self.failures[:10],
            "failure_count": len(self.failures),
            "subscribe_ms_p50": pct(0.5),
            "subscribe_ms_p99": pct(0.99),
            "subscribe_ms_max": round(lat[-1], 2) if lat else None,
        }


class ControlPlane:
    """REST client of a controller running at http://ADDR:8080 inside namespace `netns`."""

    def __init__(self, *, netns: str, addr: str, port: int = CONTROLLER_PORT) -> None:
        self.url = f"http://{addr}:{port}"
        self.admin_token = secrets.token_urlsafe(18)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, initializer=enter, initargs=(netns,), thread_name_prefix="ctl"
        )
        self._client: ControllerClient | None = None

    def env(self) -> dict[str, str]:
        """Environment of the controller process (no shared node token: nodes enrol)."""
        return {"JASPER_ADMIN_TOKEN": self.admin_token}

    def _in_ns(self, fn: Callable[[], T]) -> T:
        return self._pool.submit(fn).result()

    def _http(self) -> ControllerClient:
        """The controller's one pooled client (controller.loopback.ControllerClient), built in
        the namespace thread on first use, so its connections open in the namespace."""
        if self._client is None:
            import logging

            from controller.loopback import ControllerClient

            # One line per request would drown the progress bar (thousands of subscriptions).
            logging.getLogger("httpx").setLevel(logging.WARNING)
            self._client = ControllerClient(self.url, admin_token=self.admin_token, timeout_s=30)
        return self._client

    def call(self, method: str, path: str, *, token: str | None = None, json: Any = None) -> Any:
        def go() -> Any:
            r = self._http().request(method, path, token=token, json=json)
            if r.status_code >= 400:
                raise RuntimeError(f"{method} {path} -> {r.status_code}: {r.text[:300]}")
            return r.json() if r.content else None

        return self._in_ns(go)

    def wait_healthy(
        self, timeout_s: float = 30.0, alive: Callable[[], bool] = lambda: True
    ) -> None:
        end = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < end:
            if not alive():
                raise RuntimeError("the controller exited at start")
            try:
                self.call("GET", "/healthz")
                return
            except Exception as exc:
                last = str(exc)
                time.sleep(0.2)
        raise RuntimeError(f"controller not healthy after {timeout_s:g} s: {last}")

    def register(
        self, *, name: str, role: str, addr: str, port: int, capacity: int = 1
    ) -> dict[str, Any]:
        """Register a node ahead of its agent (as the admin may)."""
        body = {"name": name, "role": role, "data_addr": addr, "port": port, "capacity": capacity}
        doc: dict[str, Any] = self.call("POST", "/v1/nodes", json=body)
        return doc

    def join_token(self, *nodes: str, ttl_s: float = 3600.0) -> str:
        """A one-time join token for the node names one agent process runs."""
        doc = self.call("POST", "/v1/join-tokens", json={"nodes": list(nodes), "ttl_s": ttl_s})
        return str(doc["token"])

    def create_stream(self, **fields: Any) -> dict[str, Any]:
        doc: dict[str, Any] = self.call("POST", "/v1/streams", json=fields)
        return doc

    def subscribe_all(
        self,
        stream_id: int,
        endpoints: Sequence[tuple[str, str, int]],
        stats: SubscriptionStats,
        mp_tokens: dict[str, str],
        progress: Callable[[float], None] = lambda f: None,
    ) -> None:
        """One MP per endpoint (name, addr, port): create it once, then subscribe it."""
        for i, (name, addr, port) in enumerate(endpoints):
            try:
                if name not in mp_tokens:
                    doc = self.call("POST", "/v1/mps", json={"name": f"mp-{name}"})
                    mp_tokens[name] = str(doc["token"])
                    stats.mps += 1
                t0 = time.perf_counter()
                self.call(
                    "POST",
                    "/v1/subscriptions",
                    token=mp_tokens[name],
                    json={"stream_id": stream_id, "endpoint": {"addr": addr, "port": port}},
                )
                stats.latencies_ms.append(1e3 * (time.perf_counter() - t0))
                stats.subscriptions += 1
            except Exception as exc:
                stats.failures.append(f"{name}: {exc}")
            if i % 25 == 0:
                progress(i / max(1, len(endpoints)))

    def set_hold(self, stream_id: int, hold_ns: int) -> None:
        """The stream's fixed hold (PATCH): the publisher's agent stamps deadlines with it."""
        self.call("PATCH", f"/v1/streams/{stream_id}", json={"hold_ns": int(hold_ns)})

    def tree(self, stream_id: int) -> dict[str, Any]:
        doc: dict[str, Any] = self.call("GET", f"/v1/streams/{stream_id}/tree")
        return doc

    def settled_tree(self, stream_id: int, timeout_s: float = 60.0) -> dict[str, Any]:
        """The tree once no plan is pending: with no agent acknowledging, the controller
        switches to its pending (full) plan after its switch timeout."""
        end = time.monotonic() + timeout_s
        doc = self.tree(stream_id)
        while doc.get("pending_epoch") is not None and time.monotonic() < end:
            time.sleep(0.5)
            doc = self.tree(stream_id)
        return doc

    def close(self) -> None:
        def shut() -> None:
            if self._client is not None:
                self._client.reset()

        try:
            self._in_ns(shut)
        finally:
            self._pool.shutdown(wait=False)


def topology_from_tree(
    tree: Mapping[str, Any], endpoint_names: Mapping[tuple[str, int], str]
) -> Topology:
    """The controller's plan as a topology, endpoints renamed to the emulation's leaf names
    (by address and port) so records of every configuration name endpoints alike."""
    doc = dict(tree["topology"])
    by_host_addr = {h["name"]: h["addr"] for h in doc["receivers"]}
    rename: dict[str, str] = {}
    receivers = []
    for h in doc["receivers"]:
        eps = []
        for e in h["endpoints"]:
            new = endpoint_names[(by_host_addr[h["name"]], int(e["port"]))]
            rename[e["name"]] = new
            eps.append({**e, "name": new})
        receivers.append({**h, "endpoints": eps})
    doc["receivers"] = receivers

    def targets(ts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{**t, "node": rename.get(t["node"], t["node"])} for t in ts]

    doc["relays"] = [{**r, "targets": targets(r["targets"])} for r in doc["relays"]]
    doc["publisher"] = {**doc["publisher"], "targets": targets(doc["publisher"]["targets"])}
    doc.pop("x-previous", None)
    return parse_topology(doc)


@dataclass(frozen=True)
class TreeView:
    """Levels, children and edges of a topology's relay tree (whatever planned it)."""

    levels: tuple[tuple[str, ...], ...]
    """Relays per level, root first."""
    children: Mapping[str, tuple[str, ...]]
    """Own children (no hedges) of every relay."""
    edges: tuple[tuple[str, str, bool], ...]
    """(relay, target, hedge) for every forwarding entry."""
    leaves: tuple[str, ...]

    @staticmethod
    def of(topo: Topology) -> TreeView:
        relays = {r.name: r for r in topo.relays}
        children = {r.name: tuple(t.node for t in r.targets if not t.hedge) for r in topo.relays}
        level = [t.node for t in topo.publisher.targets if t.node in relays]
        levels: list[tuple[str, ...]] = []
        seen: set[str] = set()
        while level:
            levels.append(tuple(level))
            seen.update(level)
            level = [c for r in level for c in children[r] if c in relays and c not in seen]
        edges = tuple((r.name, t.node, t.hedge) for r in topo.relays for t in r.targets)
        leaves = tuple(e.name for _, e in topo.endpoints())
        return TreeView(levels=tuple(levels), children=children, edges=edges, leaves=leaves)
