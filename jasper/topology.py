"""Static topology: who forwards to whom at which address, validated from JSON or TOML data."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jasper.wire import StreamKey
from jasper.wire_spec import KEY_LEN

SCHEMA_VERSION = 1


class TopologyError(ValueError):
    """The topology document is invalid; the message names the offending path."""


MAX_HOLD_NS = 10_000_000_000
"""The longest hold a topology may carry (10 s): beyond it a stream is not a live feed."""

DEFAULT_HOLD_NS = 500_000
"""The hold of a stream that names none (500 µs): the lab's layouts, a topology document
without `hold_ns`, and the controller's new streams."""


@dataclass(frozen=True)
class Target:
    """One forwarding target of a publisher or relay."""

    node: str
    """Name of a relay or an endpoint."""
    hedge: bool = False
    """True when this copy is a sibling hedge rather than the own-child copy."""


@dataclass(frozen=True)
class StreamConfig:
    """The market-data stream the topology carries."""

    id: int
    """Stream id on the wire (u32)."""
    name: str = "default"
    """Human name."""
    hedge: int = 2
    """Hedging H: every endpoint gets H+1 copies where the tree allows."""
    hold_ns: int = DEFAULT_HOLD_NS
    """Time from root send to release (deadline − send time), in nanoseconds."""
    auth: StreamAuth | None = None
    """The stream's MAC keys; None: an unauthenticated lab stream (the controller always issues
    keys)."""
    session: int | None = None
    """The publisher session the control plane announced; receivers and relays take no other.
    None: follow the newest session seen (static lab topologies)."""


@dataclass(frozen=True)
class StreamAuth:
    """The keys a node holds for one stream (docs/security.md: life cycle)."""

    keys: tuple[StreamKey, ...]
    """Every key epoch valid now: one, or two during a rotation (make before break)."""
    sign_epoch: int
    """The epoch the publisher signs with; one of `keys`."""

    def by_epoch(self) -> dict[int, bytes]:
        """Key epoch -> key, as the node cores take them."""
        return {k.epoch: k.key for k in self.keys}

    def signing_key(self) -> StreamKey:
        return next(k for k in self.keys if k.epoch == self.sign_epoch)

    @classmethod
    def fresh(cls, epoch: int = 1) -> StreamAuth:
        """One new random key (a lab run without a controller makes its own)."""
        return cls(keys=(StreamKey(epoch, secrets.token_bytes(KEY_LEN)),), sign_epoch=epoch)


@dataclass(frozen=True)
class PublisherConfig:
    """The exchange's side: sends every message to its targets (normally the root relay)."""

    name: str
    addr: str
    targets: tuple[Target, ...]
    port: int | None = None
    """UDP port the publisher sends from and takes NAKs on (docs/recovery.md); None: no loss
    recovery (receivers send no NAKs, the publisher keeps no retransmit buffer)."""

    @property
    def nak_addr(self) -> tuple[str, int] | None:
        """Where receivers send NAKs, or None when the plan names no publisher port."""
        return None if self.port is None else (self.addr, self.port)


@dataclass(frozen=True)
class RelayConfig:
    """A relay VM: receives on (addr, port) and sends a copy to each target."""

    name: str
    addr: str
    port: int
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class EndpointConfig:
    """One MP delivery endpoint (a leaf of the tree), hosted by a receiver."""

    name: str
    """Leaf name, e.g. "e17"."""
    port: int
    """UDP port on the receiver host's address where copies arrive."""
    parents: tuple[str, ...] = ()
    """Relays that send to it (own parent first); used for source filtering and checks."""
    deliver: str | None = None
    """Where released messages go: "udp:HOST:PORT", "unix:/path", or None (in-process)."""
    mp: str | None = None
    """The market participant that subscribed this endpoint, when known."""


@dataclass(frozen=True)
class ReceiverConfig:
    """A receiver host: one process hosting many endpoints."""

    name: str
    addr: str
    endpoints: tuple[EndpointConfig, ...]


@dataclass(frozen=True)
class Topology:
    """A whole static plan for one stream."""

    stream: StreamConfig
    publisher: PublisherConfig
    relays: tuple[RelayConfig, ...]
    receivers: tuple[ReceiverConfig, ...]
    plan_epoch: int = 1
    """Plan epoch stamped into the header; a new plan takes a larger one."""
    link_model: Mapping[str, Any] | None = None
    """Emulated link conditions (see docs/link-model.md); None = off."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Unknown top-level keys starting with "x-", kept for tools."""

    def relay(self, name: str) -> RelayConfig:
        for r in self.relays:
            if r.name == name:
                return r
        raise KeyError(name)

    def receiver(self, name: str) -> ReceiverConfig:
        for h in self.receivers:
            if h.name == name:
                return h
        raise KeyError(name)

    def endpoints(self) -> list[tuple[ReceiverConfig, EndpointConfig]]:
        return [(h, e) for h in self.receivers for e in h.endpoints]

    def address_of(self, node: str) -> tuple[str, int]:
        """(addr, port) a copy for `node` is sent to."""
        return self.addresses()[node]

    def addresses(self) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {r.name: (r.addr, r.port) for r in self.relays}
        for h in self.receivers:
            for e in h.endpoints:
                out[e.name] = (h.addr, e.port)
        return out

    def to_dict(self) -> dict[str, Any]:
        def targets(ts: Sequence[Target]) -> list[dict[str, Any]]:
            return [{"node": t.node, "hedge": t.hedge} for t in ts]

        doc: dict[str, Any] = {
            "version": SCHEMA_VERSION,
            "plan_epoch": self.plan_epoch,
            "stream": stream_dict(self.stream),
            "publisher": {
                "name": self.publisher.name,
                "addr": self.publisher.addr,
                "targets": targets(self.publisher.targets),
                **({"port": self.publisher.port} if self.publisher.port is not None else {}),
            },
            "relays": [
                {"name": r.name, "addr": r.addr, "port": r.port, "targets": targets(r.targets)}
                for r in self.relays
            ],
            "receivers": [
                {
                    "name": h.name,
                    "addr": h.addr,
                    "endpoints": [
                        {
                            "name": e.name,
                            "port": e.port,
                            "parents": list(e.parents),
                            "deliver": e.deliver,
                            "mp": e.mp,
                        }
                        for e in h.endpoints
                    ],
                }
                for h in self.receivers
            ],
            "link_model": dict(self.link_model) if self.link_model is not None else None,
        }
        doc.update(self.extra)
        return doc


def stream_dict(stream: StreamConfig) -> dict[str, Any]:
    """The document form of a StreamConfig (keys as hex)."""
    out: dict[str, Any] = {
        "id": stream.id,
        "name": stream.name,
        "hedge": stream.hedge,
        "hold_ns": stream.hold_ns,
    }
    if stream.auth is not None:
        out["auth"] = {
            "keys": [{"epoch": k.epoch, "key": k.key.hex()} for k in stream.auth.keys],
            "sign_epoch": stream.auth.sign_epoch,
        }
    if stream.session is not None:
        out["session"] = stream.session
    return out


StreamRules = tuple[dict[int, bytes] | None, int | None]
"""(keys by epoch, or None for an unauthenticated stream; the announced session, or None)."""


def stream_rules(topo: Topology) -> dict[int, StreamRules]:
    """What a node admits, per stream id, under `topo` (and its x-previous plan's stream)."""
    auth = topo.stream.auth
    return {topo.stream.id: (auth.by_epoch() if auth is not None else None, topo.stream.session)}


# --- parsing -------------------------------------------------------------------------------


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    if key not in obj:
        raise TopologyError(f"{path}.{key}: required field missing")
    value = obj[key]
    if (
        isinstance(value, bool)
        and kind is not bool
        and (kind is int or bool not in _as_tuple(kind))
    ):
        raise TopologyError(f"{path}.{key}: expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise TopologyError(
            f"{path}.{key}: expected {_kind_name(kind)}, got {type(value).__name__}"
        )
    return value


def _opt(
    obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str, default: Any
) -> Any:
    if key not in obj or obj[key] is None:
        return default
    return _get(obj, key, kind, path)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "bool": "a boolean", "list": "a list"}
    names["dict"] = "an object"
    return " or ".join(names.get(k.__name__, k.__name__) for k in _as_tuple(kind))


def _port(value: int, path: str) -> int:
    if not 1 <= value <= 65535:
        raise TopologyError(f"{path}: port {value} out of range 1..65535")
    return value


def _addr(value: str, path: str) -> str:
    parts = value.split(".")
    if len(parts) != 4 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise TopologyError(f"{path}: {value!r} is not an IPv4 address")
    return value


def _name(value: str, path: str) -> str:
    if not value or len(value) > 64 or not all(c.isalnum() or c in "._-:" for c in value):
        raise TopologyError(f"{path}: {value!r} is not a valid name (1-64 of [A-Za-z0-9._-:])")
    return value


def _targets(obj: Mapping[str, Any], path: str) -> tuple[Target, ...]:
    raw = _get(obj, "targets", list, path)
    out = []
    for i, t in enumerate(raw):
        tp = f"{path}.targets[{i}]"
        if isinstance(t, str):
            out.append(Target(node=_name(t, tp)))
            continue
        if not isinstance(t, dict):
            raise TopologyError(f"{tp}: expected a node name or an object")
        out.append(
            Target(
                node=_name(_get(t, "node", str, tp), tp + ".node"),
                hedge=_opt(t, "hedge", bool, tp, False),
            )
        )
    return tuple(out)


def _auth(obj: Any, path: str) -> StreamAuth:
    if not isinstance(obj, Mapping):
        raise TopologyError(f"{path}: expected an object")
    entries = _get(obj, "keys", list, path)
    if not 1 <= len(entries) <= 4:
        raise TopologyError(f"{path}.keys: {len(entries)} keys, expected 1..4")
    keys = []
    for i, entry in enumerate(entries):
        kp = f"{path}.keys[{i}]"
        if not isinstance(entry, Mapping):
            raise TopologyError(f"{kp}: expected an object")
        epoch = _get(entry, "epoch", int, kp)
        text = _get(entry, "key", str, kp)
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            raise TopologyError(f"{kp}.key: not hexadecimal") from None
        if len(secret) != KEY_LEN:
            raise TopologyError(f"{kp}.key: {len(secret)} bytes, a stream key has {KEY_LEN}")
        if not 1 <= epoch <= 2**32 - 1:
            raise TopologyError(f"{kp}.epoch: {epoch} out of range 1..2^32-1")
        keys.append(StreamKey(epoch, secret))
    if len({k.epoch for k in keys}) != len(keys):
        raise TopologyError(f"{path}.keys: an epoch appears twice")
    sign_epoch = _opt(obj, "sign_epoch", int, path, max(k.epoch for k in keys))
    if sign_epoch not in {k.epoch for k in keys}:
        raise TopologyError(f"{path}.sign_epoch: {sign_epoch} is not one of the keys' epochs")
    return StreamAuth(keys=tuple(keys), sign_epoch=sign_epoch)


def parse_topology(doc: Mapping[str, Any]) -> Topology:
    """Validate a topology document (already parsed from JSON or TOML) into a Topology."""
    if not isinstance(doc, Mapping):
        raise TopologyError("$: expected an object at the top level")
    p = "$"
    version = _opt(doc, "version", int, p, SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise TopologyError(
            f"$.version: unsupported schema version {version}, expected {SCHEMA_VERSION}"
        )
    known = {"version", "plan_epoch", "stream", "publisher", "relays", "receivers", "link_model"}
    unknown = [k for k in doc if k not in known and not str(k).startswith("x-")]
    if unknown:
        raise TopologyError(f"$: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    plan_epoch = _opt(doc, "plan_epoch", int, p, 1)
    if not 0 <= plan_epoch <= 2**32 - 1:
        raise TopologyError(f"$.plan_epoch: {plan_epoch} out of range 0..2^32-1")

    s = _get(doc, "stream", dict, p)
    sp = "$.stream"
    session = _opt(s, "session", int, sp, None)
    if session is not None and not 0 <= session <= 2**32 - 1:
        raise TopologyError(f"$.stream.session: {session} out of range 0..2^32-1")
    stream = StreamConfig(
        id=_get(s, "id", int, sp),
        name=_opt(s, "name", str, sp, "default"),
        hedge=_opt(s, "hedge", int, sp, 2),
        hold_ns=_opt(s, "hold_ns", int, sp, DEFAULT_HOLD_NS),
        auth=_auth(s["auth"], f"{sp}.auth") if s.get("auth") is not None else None,
        session=session,
    )
    if not 0 <= stream.id <= 2**32 - 1:
        raise TopologyError(f"$.stream.id: {stream.id} out of range 0..2^32-1")
    if not 0 <= stream.hedge <= 16:
        raise TopologyError(f"$.stream.hedge: {stream.hedge} out of range 0..16")
    if not 0 <= stream.hold_ns <= MAX_HOLD_NS:
        raise TopologyError(f"$.stream.hold_ns: {stream.hold_ns} out of range 0..10 s")

    pub = _get(doc, "publisher", dict, p)
    pub_port = _opt(pub, "port", int, "$.publisher", None)
    publisher = PublisherConfig(
        name=_name(_get(pub, "name", str, "$.publisher"), "$.publisher.name"),
        addr=_addr(_get(pub, "addr", str, "$.publisher"), "$.publisher.addr"),
        targets=_targets(pub, "$.publisher"),
        port=None if pub_port is None else _port(pub_port, "$.publisher.port"),
    )

    relays = []
    for i, r in enumerate(_get(doc, "relays", list, p)):
        rp = f"$.relays[{i}]"
        if not isinstance(r, dict):
            raise TopologyError(f"{rp}: expected an object")
        relays.append(
            RelayConfig(
                name=_name(_get(r, "name", str, rp), rp + ".name"),
                addr=_addr(_get(r, "addr", str, rp), rp + ".addr"),
                port=_port(_get(r, "port", int, rp), rp + ".port"),
                targets=_targets(r, rp),
            )
        )

    receivers = []
    for i, h in enumerate(_get(doc, "receivers", list, p)):
        hp = f"$.receivers[{i}]"
        if not isinstance(h, dict):
            raise TopologyError(f"{hp}: expected an object")
        eps = []
        for j, e in enumerate(_get(h, "endpoints", list, hp)):
            ep = f"{hp}.endpoints[{j}]"
            if not isinstance(e, dict):
                raise TopologyError(f"{ep}: expected an object")
            parents = _opt(e, "parents", list, ep, [])
            if not all(isinstance(x, str) for x in parents):
                raise TopologyError(f"{ep}.parents: expected a list of relay names")
            # Checked by the receiver, per endpoint (jasper/deliver.py): one malformed target
            # leaves out that endpoint, never the whole plan.
            deliver = _opt(e, "deliver", str, ep, None)
            eps.append(
                EndpointConfig(
                    name=_name(_get(e, "name", str, ep), ep + ".name"),
                    port=_port(_get(e, "port", int, ep), ep + ".port"),
                    parents=tuple(parents),
                    deliver=deliver,
                    mp=_opt(e, "mp", str, ep, None),
                )
            )
        receivers.append(
            ReceiverConfig(
                name=_name(_get(h, "name", str, hp), hp + ".name"),
                addr=_addr(_get(h, "addr", str, hp), hp + ".addr"),
                endpoints=tuple(eps),
            )
        )

    link_model = _opt(doc, "link_model", dict, p, None)
    topo = Topology(
        stream=stream,
        publisher=publisher,
        relays=tuple(relays),
        receivers=tuple(receivers),
        plan_epoch=plan_epoch,
        link_model=link_model,
        extra={k: v for k, v in doc.items() if str(k).startswith("x-")},
    )
    _check_references(topo)
    return topo


def _check_references(topo: Topology) -> None:
    names: dict[str, str] = {topo.publisher.name: "$.publisher"}
    for i, r in enumerate(topo.relays):
        if r.name in names:
            raise TopologyError(f"$.relays[{i}].name: {r.name!r} already used at {names[r.name]}")
        names[r.name] = f"$.relays[{i}]"
    for i, h in enumerate(topo.receivers):
        if h.name in names:
            raise TopologyError(
                f"$.receivers[{i}].name: {h.name!r} already used at {names[h.name]}"
            )
        names[h.name] = f"$.receivers[{i}]"
        for j, e in enumerate(h.endpoints):
            if e.name in names:
                where = names[e.name]
                raise TopologyError(
                    f"$.receivers[{i}].endpoints[{j}].name: {e.name!r} already used at {where}"
                )
            names[e.name] = f"$.receivers[{i}].endpoints[{j}]"
    seen: dict[tuple[str, int], str] = {}
    if topo.publisher.nak_addr is not None:
        seen[topo.publisher.nak_addr] = topo.publisher.name
        names[topo.publisher.name] = "$.publisher"
    for node, addr in topo.addresses().items():
        if addr in seen:
            raise TopologyError(
                f"{names[node]}: address {addr[0]}:{addr[1]} already used by {seen[addr]!r}"
            )
        seen[addr] = node
    relay_names = {r.name for r in topo.relays}
    targets_ok = relay_names | {e.name for _, e in topo.endpoints()}
    for owner, path in [(topo.publisher, "$.publisher")] + [
        (r, f"$.relays[{i}]") for i, r in enumerate(topo.relays)
    ]:
        seen_targets: set[str] = set()
        for k, t in enumerate(owner.targets):
            if t.node not in targets_ok:
                raise TopologyError(f"{path}.targets[{k}]: unknown relay or endpoint {t.node!r}")
            if t.node == owner.name:
                raise TopologyError(f"{path}.targets[{k}]: {owner.name!r} forwards to itself")
            if t.node in seen_targets:
                raise TopologyError(f"{path}.targets[{k}]: {t.node!r} listed twice")
            seen_targets.add(t.node)
    for i, h in enumerate(topo.receivers):
        for j, e in enumerate(h.endpoints):
            for k, parent in enumerate(e.parents):
                if parent not in relay_names and parent != topo.publisher.name:
                    raise TopologyError(
                        f"$.receivers[{i}].endpoints[{j}].parents[{k}]: unknown relay {parent!r}"
                    )
