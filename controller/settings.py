"""Controller settings, validated from JASPER_* environment variables or given explicitly."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the controller needs to start; read once, passed to `create_app`."""

    model_config = SettingsConfigDict(env_prefix="JASPER_", extra="ignore")

    db_path: str = Field("jasper-controller.db", min_length=1)
    """SQLite file holding MPs, subscriptions, nodes and plans (":memory:" for throwaway)."""
    admin_token: SecretStr
    """Bearer token for node and stream administration."""
    node_token: SecretStr
    """Bearer token agents present to register, heartbeat and fetch configs."""
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
    default_fanout: int = Field(10, ge=2, le=1000)
    """Fan-out F for streams that do not set one."""
    hold_window_s: float = Field(2.0, gt=0)
    """Adaptive hold: a delay window closes when every receiver host of the stream reported,
    or this long after its first report."""
    hold_objective_late_fraction: float = Field(0.01, gt=0, lt=1)
    """Adaptive hold: at most this fraction of one endpoint's messages late per window."""
    link_model: dict[str, Any] | None = None
    """Emulation only: the link model (docs/link-model.md) every topology carries
    (JASPER_LINK_MODEL as JSON). None: the data plane runs on the bare network."""

    @field_validator("link_model")
    @classmethod
    def _valid_link_model(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        from jasper.linkmodel import parse_link_model

        parse_link_model(v)  # raises ValueError naming the field
        return v
