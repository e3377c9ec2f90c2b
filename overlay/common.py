"""Pieces every daemon shares: topology files, process figures, malformed-datagram counting."""

from __future__ import annotations

import json
import resource
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from jasper.dedup import AHEAD_WINDOW, DedupRing, Verdict
from jasper.linkmodel import LinkModel, parse_link_model
from jasper.topology import Topology, TopologyError, parse_topology


@dataclass
class CopyCounters:
    """What a node that receives hedged copies saw: shared by relays and receiver endpoints."""

    received: int = 0
    """Datagrams received on the node's socket (before the link model)."""
    malformed: Counter[str] = field(default_factory=Counter)
    """Datagrams dropped as not Jasper, by WireError.reason."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Well-formed datagrams refused by wire_spec.REJECT_REASONS (stream, key, mac, session,
    ahead), never delivered."""
    accepted: int = 0
    """First copies kept."""
    duplicates: int = 0
    """Later hedged copies dropped."""
    stale: int = 0
    """Copies older than the dedup window or from an older session, dropped."""
    heartbeats: int = 0
    """Heartbeats received."""
    copies_from: Counter[str] = field(default_factory=Counter)
    """Valid copies received per sender (parent) name."""
    kept_from: Counter[str] = field(default_factory=Counter)
    """First copies kept per sender name."""
    kernel_drops: int = 0
    """Datagrams the kernel dropped for a full receive buffer (SO_RXQ_OVFL)."""

    def admit(
        self, rings: dict[int, DedupRing], ring_size: int, stream: int, session: int, seq: int
    ) -> bool:
        """Run one copy through its stream's dedup ring (made on first use); count the verdict."""
        ring = rings.get(stream)
        if ring is None:
            ring = rings[stream] = DedupRing(size=ring_size)
        verdict = ring.check(session, seq, AHEAD_WINDOW)
        if verdict is Verdict.ACCEPT:
            self.accepted += 1
            return True
        if verdict is Verdict.DUPLICATE:
            self.duplicates += 1
        elif verdict is Verdict.AHEAD:
            self.rejected["ahead"] += 1
        else:
            self.stale += 1
        return False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Counter) else value
        out["malformed_total"] = sum(self.malformed.values())
        return out


def load_topology(path: str | Path) -> Topology:
    """Read a topology file (.json or .toml) and validate it; TopologyError names the problem."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        doc = tomllib.loads(raw.decode()) if path.suffix.lower() == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TopologyError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}"
        ) from exc
    return parse_topology(doc)


def link_model_of(topo: Topology) -> LinkModel | None:
    """The topology's link model, validated (None when off)."""
    try:
        return parse_link_model(topo.link_model)
    except ValueError as exc:
        raise TopologyError(str(exc)) from exc


def hop_model_of(topo: Topology) -> LinkModel | None:
    """The link model a relay applies to the copies it receives: none when the receivers
    emulate whole paths (emulated_at "receivers"), so relays forward at once."""
    model = link_model_of(topo)
    return model if model is not None and model.emulated_at == "hops" else None


def process_figures(started_ns: int) -> dict[str, Any]:
    """CPU seconds, peak RSS and wall time of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_user_s": ru.ru_utime,
        "cpu_system_s": ru.ru_stime,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_kb": peak_rss_kb(),
        "wall_s": (time.time_ns() - started_ns) / 1e9,
    }


def peak_rss_kb() -> int:
    """Peak resident set of this process image (VmHWM).

    ru_maxrss survives fork and exec, so a daemon started by a big parent would report the
    parent's peak; VmHWM belongs to the current address space only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def write_json(path: str | Path, doc: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
