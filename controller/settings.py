"""Controller settings, validated from JASPER_* environment variables or given explicitly."""

from __future__ import annotations

import posixpath
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jasper.tree import DEFAULT_FANOUT


class Settings(BaseSettings):
    """Everything the controller needs to start; read once, passed to `create_app`."""

    model_config = SettingsConfigDict(env_prefix="JASPER_", extra="ignore")

    db_path: str = Field("jasper-controller.db", min_length=1)
    """SQLite file holding MPs, subscriptions, nodes and plans (":memory:" for throwaway)."""
    admin_token: SecretStr
    """Bearer token for node and stream administration."""
    node_token: SecretStr | None = None
    """Legacy shared node token, off by default. When set, any holder may register, heartbeat
    and poll as any node, as before per-node credentials; keep it unset and enrol each node
    with a join token instead (docs/security-nodes.md)."""
    heartbeat_timeout_s: float = Field(5.0, gt=0)
    """A node that sent no heartbeat for this long is declared dead."""
    long_poll_max_s: float = Field(30.0, gt=0)
    """Upper bound on how long a config request may wait for a change."""
    switch_timeout_s: float = Field(3.0, gt=0)
    """Make-before-break: the publisher moves to a new plan once every node of it applied
    the plan, or after this long."""
    monitor_interval_s: float = Field(0.25, gt=0)
    """How often dead nodes and pending plans are checked."""
    lemon_factor: float = Field(2.0, gt=1)
    """A relay scoring above this multiple of the median latency is kept out of the tree."""
    default_fanout: int = Field(DEFAULT_FANOUT, ge=2, le=1000)
    """Fan-out F for streams that do not set one."""
    hold_window_s: float = Field(2.0, gt=0)
    """Adaptive hold: a delay window closes when every receiver host of the stream reported,
    or this long after its first report."""
    hold_objective_late_fraction: float = Field(0.01, gt=0, lt=1)
    """Adaptive hold: at most this fraction of one endpoint's messages late per window."""
    mp_deliver_dir: str = Field("/run/jasper/mp/", pattern=r"^/[A-Za-z0-9._/-]{0,80}$")
    """Folder on receiver hosts under which an MP may name a `unix:` deliver target (an
    absolute path, normalised; targets must lie strictly inside it)."""
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    """Largest request body accepted (413 beyond): checked from Content-Length before the
    body is read, and counted chunk by chunk for chunked bodies."""
    auth_failure_burst: int = Field(20, ge=1, le=100_000)
    """Failed authentications (401) a client address may cause in a burst before its API
    requests get 429."""
    auth_failure_per_s: float = Field(1.0, gt=0, le=100_000)
    """Refill rate of that budget: failed authentications per second, sustained."""
    auth_failure_clients: int = Field(4096, ge=16, le=1_000_000)
    """Client addresses the failed-auth limiter tracks at most (least recently seen go)."""
    metrics_endpoint_series: int = Field(2000, ge=0, le=100_000)
    """/metrics: per-endpoint series (released, late, parents) while the nodes report at most
    this many endpoints in all; above it only per-node sums (docs/metrics.md). 0: never."""
    link_model: dict[str, Any] | None = None
    """Emulation only: the link model (docs/link-model.md) every topology carries
    (JASPER_LINK_MODEL as JSON). None: the data plane runs on the bare network."""

    @field_validator("link_model")
    @classmethod
    def _valid_link_model(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        from jasper.linkmodel import parse_link_model

        parse_link_model(v)  # raises ValueError naming the field
        return v

    @field_validator("mp_deliver_dir")
    @classmethod
    def _normal_folder(cls, v: str) -> str:
        if ".." in v.split("/"):
            raise ValueError("mp_deliver_dir must not contain '..'")
        return posixpath.normpath(v).rstrip("/") + "/"
