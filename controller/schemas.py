"""Request and response bodies of the REST API: XCreate/XUpdate in, XPublic out."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from controller.deliver import validate_deliver
from jasper.topology import DEFAULT_HOLD_NS
from jasper.tree import DEFAULT_FANOUT, DEFAULT_HEDGE

NodeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$", examples=["relay-1"])]
Port = Annotated[int, Field(ge=1, le=65535)]
Role = Literal["relay", "receiver", "publisher"]


class Body(BaseModel):
    # NaN and infinities are no numbers any field means (the strict JSON decoder in
    # controller.limits already refuses them in request bodies; this covers direct use).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- nodes ---------------------------------------------------------------------------------


class NodeCreate(Body):
    """An agent registering its VM (repeating it updates the record)."""

    name: NodeName
    role: Role
    data_addr: IPv4Address = Field(description="Address data-plane copies are sent to")
    port: Port = Field(
        description="Relay: data port. Receiver: first endpoint port. Publisher: source port."
    )
    capacity: int = Field(
        1, ge=1, le=65535, description="Receiver: endpoint ports from `port`. Relay: hint."
    )
    probe_port: Port | None = Field(None, description="UDP port of the latency prober")


class NodePublic(BaseModel):
    name: str
    role: Role
    data_addr: str
    port: int
    capacity: int
    probe_port: int | None
    alive: bool
    applied_version: int
    clock: dict[str, Any] | None = None
    status: dict[str, Any] | None = None


class ClockStatus(Body):
    """The node's clock as the clock service sees it."""

    status: Annotated[str, Field(max_length=32)] = "unknown"
    bound_ns: int | None = Field(None, ge=0, le=10**12, description="Error bound, ns")
    offset_ns: int | None = Field(None, ge=-(10**15), le=10**15, description="Offset, ns")


class PeerLatency(Body):
    """Summary of probes from this node to one peer."""

    peer: NodeName
    owd_ns: int = Field(ge=-(10**12), le=10**12, description="Median one-way delay, ns")
    jitter_ns: int = Field(0, ge=0, le=10**12, description="Mean |successive OWD change|, ns")
    samples: int = Field(0, ge=0, le=10**9)
    rtt_ns: int | None = Field(None, ge=0, le=10**12)
    lost: int = Field(0, ge=0, le=10**9)


class OwdWindowReport(Body):
    """One-way delays from the root over one window, max-reduced over the node's endpoints
    (jasper.owd.OwdReport.as_dict)."""

    stream_id: int = Field(ge=0, le=2**32 - 1)
    start_ns: int = Field(ge=0, le=2**63 - 1, description="Window opened (node clock), ns")
    end_ns: int = Field(ge=0, le=2**63 - 1, description="Window closed (node clock), ns")
    count: int = Field(ge=0, le=10**12, description="Messages in the window")
    late: int = Field(ge=0, le=10**12, description="Messages that arrived after their deadline")
    p50_ns: int = Field(ge=0, le=2**40)
    p95_ns: int = Field(ge=0, le=2**40)
    p97_ns: int = Field(ge=0, le=2**40)
    p99_ns: int = Field(ge=0, le=2**40)
    max_ns: int = Field(ge=0, le=2**40)
    negative: int = Field(0, ge=0, le=10**12, description="Delays below zero (clock error)")
    worst_late_fraction: float = Field(0.0, ge=0.0, le=1.0)
    reporters: int = Field(1, ge=1, le=10**9, description="Endpoint windows it stands for")


class Heartbeat(Body):
    applied_version: int = Field(0, ge=0, le=2**62, description="Config version in force")
    clock: ClockStatus = Field(default_factory=lambda: ClockStatus(bound_ns=None, offset_ns=None))
    latency: list[PeerLatency] = Field(default_factory=list, max_length=4096)
    dead_neighbours: list[NodeName] = Field(default_factory=list, max_length=4096)
    status: dict[Annotated[str, Field(max_length=128)], float] = Field(
        default_factory=dict, max_length=4096, description="Daemon counters"
    )
    owd: list[OwdWindowReport] = Field(
        default_factory=list,
        max_length=1024,
        description="Receivers: delay windows closed since the last heartbeat, one per stream",
    )


class HeartbeatReply(BaseModel):
    version: int = Field(description="Latest config version; poll when newer than yours")
    alive: bool


class StreamPlan(BaseModel):
    stream_id: int
    plan_epoch: int
    topology: dict[str, Any] = Field(description="Topology document (jasper.topology schema)")


class Peer(BaseModel):
    name: str
    addr: str
    probe_port: int


class NodeConfig(BaseModel):
    version: int
    node: str
    streams: list[StreamPlan]
    peers: list[Peer]


# --- streams -------------------------------------------------------------------------------

HoldPolicy = Literal["fixed", "adaptive"]


class StreamCreate(Body):
    id: int = Field(ge=0, le=2**32 - 1, description="Stream id on the wire (u32)")
    name: Annotated[str, Field(min_length=1, max_length=64)]
    rate_hint: float = Field(100.0, ge=0, le=1e7, description="Expected messages per second")
    hedge: int = Field(DEFAULT_HEDGE, ge=0, le=16, description="Sibling hedging H")
    fanout: int | None = Field(
        None, ge=2, le=1000, description=f"Fan-out F (default {DEFAULT_FANOUT})"
    )
    depth: int | None = Field(None, ge=1, le=8, description="Levels D (default round(log_F N))")
    hold_ns: int = Field(
        DEFAULT_HOLD_NS,
        ge=0,
        le=10_000_000_000,
        description=(
            "Hold, ns: the whole gap from the root's send time to the release deadline. "
            "Fixed policy: always this. Adaptive: the starting hold, until delay reports arrive"
        ),
    )
    hold_policy: HoldPolicy = "adaptive"
    publisher: NodeName | None = None


class StreamUpdate(Body):
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    rate_hint: float | None = Field(None, ge=0, le=1e7)
    hedge: int | None = Field(None, ge=0, le=16)
    fanout: int | None = Field(None, ge=2, le=1000)
    depth: int | None = Field(None, ge=1, le=8)
    hold_ns: int | None = Field(None, ge=0, le=10_000_000_000)
    hold_policy: HoldPolicy | None = None
    publisher: NodeName | None = None


class StreamPublic(BaseModel):
    id: int
    name: str
    rate_hint: float
    hedge: int
    fanout: int
    depth: int | None
    hold_ns: int
    hold_policy: HoldPolicy
    publisher: str | None


class HoldDecisionPublic(BaseModel):
    """One window of a stream's deadline policy (jasper.deadline.HoldDecision)."""

    at_ns: int = Field(description="Controller clock when decided, ns since the epoch")
    action: str = Field(description="up, down, keep, fixed or no-data")
    late_fraction: float = Field(description="Worst endpoint's late fraction in the window")
    delay_estimate_ns: int = Field(description="Global one-way delay estimate (p97), ns")
    bounds_ns: int = Field(description="Root's plus largest receiver's clock bound, ns")
    extra_hold_ns: int = Field(description="Adaptive extra hold on top, ns")
    hold_ns: int = Field(description="Hold in force after the window (send -> deadline), ns")
    reporters: int = Field(description="Endpoint windows the max-reduced report stood for")
    count: int = Field(description="Messages the report covered")


class StreamHoldPublic(BaseModel):
    stream_id: int
    hold_policy: HoldPolicy
    hold_ns: int = Field(description="Hold in force now (what the publisher stamps with), ns")
    configured_hold_ns: int = Field(description="The stream's hold_ns setting")
    history: list[HoldDecisionPublic] = Field(description="Windows, oldest first (bounded)")


class StreamKeyEpochPublic(BaseModel):
    epoch: int = Field(description="Key epoch, carried in every datagram signed with it")
    signing: bool = Field(description="The publisher signs with this epoch")


class StreamKeysPublic(BaseModel):
    """A stream's MAC key epochs and rotation phase (docs/security-keys.md); never a secret:
    keys reach nodes in their own configs only."""

    stream_id: int
    phase: Literal["steady", "distributing", "signing", "retiring"]
    epochs: list[StreamKeyEpochPublic] = Field(description="Valid epochs, oldest first")
    sign_epoch: int
    config_version: int = Field(
        description="Config version whose documents began the phase; the rotation moves on "
        "once every live node of the stream runs it or a later one"
    )
    waiting_for: list[str] = Field(description="Live nodes of the stream not running it yet")
    grace_left_ns: int | None = Field(
        description="Retiring: time left until the old epoch is dropped, ns"
    )
    session: int | None = Field(
        description="Publisher session announced to the stream's nodes (None: none yet)"
    )


# --- MPs and subscriptions -----------------------------------------------------------------


class MpCreate(Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


class MpPublic(BaseModel):
    id: int
    name: str


class MpCreated(MpPublic):
    token: str = Field(description="Bearer token of this MP; shown once, stored hashed")


class EndpointAddr(Body):
    addr: IPv4Address
    port: Port


Deliver = Annotated[
    str,
    Field(
        max_length=1024,
        description=(
            "Where the receiver hands released messages: udp:ADDR:PORT with ADDR the "
            "endpoint's own address and PORT 1-65535, not a data-plane port; or unix:PATH, "
            "an absolute normalised path inside the controller's MP delivery folder "
            "(setting mp_deliver_dir, default /run/jasper/mp/). A target another MP uses is "
            "refused. Null: the receiver keeps messages in process."
        ),
        examples=["udp:10.0.1.5:40000", "unix:/run/jasper/mp/feed.sock"],
    ),
    AfterValidator(validate_deliver),
]


class SubscriptionCreate(Body):
    stream_id: int = Field(ge=0, le=2**32 - 1)
    endpoint: EndpointAddr = Field(description="Must be a port of a registered receiver host")
    deliver: Deliver | None = None


class SubscriptionPublic(BaseModel):
    id: int
    mp_id: int
    stream_id: int
    endpoint: EndpointAddr
    host: str
    deliver: str | None
    parents: list[str] = Field(description="Relays sending this endpoint a copy, own first")


class LinkPublic(BaseModel):
    src: str
    dst: str
    owd_ns: int = Field(description="Median one-way delay src -> dst, ns")
    jitter_ns: int
    samples: int


# --- tree ----------------------------------------------------------------------------------


class TreeSlot(BaseModel):
    slot: str
    node: str


class TreeEndpoint(BaseModel):
    name: str
    subscription_id: int
    mp: str | None
    host: str
    addr: str
    port: int
    parents: list[str]
    predicted_arrival_ns: int


class TreePublic(BaseModel):
    stream_id: int
    plan_epoch: int
    pending_epoch: int | None
    depth: int
    fanout: int
    hedge: int
    publisher: str
    levels: list[list[TreeSlot]]
    parents: dict[str, list[str]] = Field(description="Relay or endpoint -> senders, own first")
    hedge_edges: list[tuple[str, str]]
    endpoints: list[TreeEndpoint] = Field(
        description="Endpoints of the plan; for an MP token only its own"
    )
    other_endpoints: int = Field(
        0, description="Endpoints of other MPs, counted but not listed (MP view; 0 for admin)"
    )
    lemons: list[str]
    predicted_oml_ns: int = Field(description="Cost-model OML: slowest endpoint's first copy")
    predicted_median_ns: int
    topology: dict[str, Any]


# --- node credentials (docs/security-nodes.md) ---------------------------------------------


class JoinTokenCreate(Body):
    """An admin issuing a one-time join token for the node names one agent process runs."""

    nodes: list[NodeName] = Field(
        min_length=1, max_length=256, description="Node names the enrolled credential speaks for"
    )
    ttl_s: float = Field(
        3600.0, gt=0, le=30 * 86400, description="Seconds until the join token expires"
    )


class JoinTokenCreated(BaseModel):
    token: str = Field(description="The join token; shown only in this answer")
    nodes: list[str]
    expires_at: float = Field(description="Unix time, seconds, after which enrolment fails")


class Enrolment(Body):
    """A node trading its join token for its own credential."""

    join_token: Annotated[str, Field(min_length=1, max_length=256)]


class NodeCredential(BaseModel):
    credential: str = Field(description="The node's bearer token; shown only in this answer")
    nodes: list[str] = Field(description="Node names this credential may act as")
