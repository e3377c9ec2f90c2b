"""What an MP may see of a stream's plan: its own endpoints in full, other MPs' only as counts."""

from __future__ import annotations

from typing import Any

TOPOLOGY_KEYS = ("version", "plan_epoch", "x-hold-policy", "x-rate-hint", "x-hedging")
"""Top-level topology fields an MP sees as they are; anything else is rebuilt or left out, so
a field added to node documents later (keys, say) never reaches MPs by default."""


def mp_topology(doc: dict[str, Any], own: set[str]) -> dict[str, Any]:
    """The topology document `doc` as the MP owning endpoints `own` may see it.

    Relays and the publisher stay (the MP's copies come from them); receiver hosts appear only
    with the MP's own endpoints, hosts without any are left out, and forwarding targets that
    are other MPs' endpoints are dropped. The result is still a valid topology document; it
    says how many endpoints it leaves out in "x-other-endpoints".
    """
    own_hosts = []
    others = 0
    for rx in doc.get("receivers", ()):
        eps = [dict(e) for e in rx["endpoints"] if e["name"] in own]
        others += len(rx["endpoints"]) - len(eps)
        if eps:
            own_hosts.append({"name": rx["name"], "addr": rx["addr"], "endpoints": eps})
    endpoint_names = {e["name"] for rx in doc.get("receivers", ()) for e in rx["endpoints"]}

    def visible(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [dict(t) for t in targets if t["node"] not in endpoint_names or t["node"] in own]

    stream = doc["stream"]
    publisher = doc["publisher"]
    out: dict[str, Any] = {k: doc[k] for k in TOPOLOGY_KEYS if k in doc}
    out["stream"] = {k: stream[k] for k in ("id", "name", "hedge", "hold_ns") if k in stream}
    out["publisher"] = {
        "name": publisher["name"],
        "addr": publisher["addr"],
        "targets": visible(publisher.get("targets", [])),
    }
    out["relays"] = [
        {"name": r["name"], "addr": r["addr"], "port": r["port"], "targets": visible(r["targets"])}
        for r in doc.get("relays", ())
    ]
    out["receivers"] = own_hosts
    out["x-other-endpoints"] = others
    return out
