"""Emulated link conditions: a seeded per-link delay distribution with spikes, lemons and loss."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# z-score of the 99th percentile of the standard normal distribution.
_Z99 = 2.3263478740408408


class LinkModelError(ValueError):
    """The link-model document is invalid; the message names the offending path."""


@dataclass(frozen=True)
class LinkModel:
    """Delay and loss of every link of an emulated region.

    A copy's delay on one link is drawn from a lognormal body (set by its median and 99th
    percentile); with probability `spike_prob` it is instead drawn uniformly from
    [spike_min_ns, spike_max_ns] (a rare stall). Links that touch a "lemon" node (a slow VM)
    have their delay multiplied by `lemon_factor`. Each copy is lost with probability `loss`.
    """

    seed: int = 1
    """Seed; each link draws from its own generator derived from (seed, source, destination)."""
    median_ns: int = 50_000
    """Median of the lognormal body, in nanoseconds."""
    p99_ns: int = 150_000
    """99th percentile of the lognormal body, in nanoseconds (>= median_ns)."""
    spike_prob: float = 0.0
    """Probability that a copy is delayed by a spike instead of the body."""
    spike_min_ns: int = 500_000
    """Smallest spike delay, in nanoseconds."""
    spike_max_ns: int = 2_000_000
    """Largest spike delay, in nanoseconds."""
    loss: float = 0.0
    """Probability that a copy is lost on a link."""
    lemons: tuple[str, ...] = ()
    """Nodes named as lemons."""
    lemon_fraction: float = 0.0
    """Fraction of all other nodes chosen (by seed) as lemons."""
    lemon_factor: float = 1.0
    """Delay multiplier for links into or out of a lemon."""
    emulated_at: str = "hops"
    """Where the model is applied. "hops": every relay and receiver delays the copies it
    receives (user space only). "receivers": relays forward at once (the kernel fast path
    works) and each receiver's native path draws every hop of a copy's path itself, the same
    draws on every host (docs/link-model.md)."""

    @property
    def sigma(self) -> float:
        """Shape of the lognormal body."""
        if self.p99_ns <= self.median_ns:
            return 0.0
        return math.log(self.p99_ns / self.median_ns) / _Z99

    def is_lemon(self, node: str) -> bool:
        """Whether `node` is a lemon: named, or picked by the seeded fraction."""
        if node in self.lemons:
            return True
        if self.lemon_fraction <= 0.0:
            return False
        return _unit(f"lemon:{self.seed}:{node}") < self.lemon_fraction

    def link(self, src: str, dst: str) -> LinkSampler:
        """The sampler of the directed link src -> dst."""
        return LinkSampler(self, src, dst)

    def body_quantile_ns(self, q: float) -> float:
        """Quantile q (0<q<1) of the lognormal body alone, in nanoseconds."""
        return self.median_ns * math.exp(self.sigma * _normal_ppf(q))

    def quantile_ns(self, q: float, *, factor: float = 1.0) -> float:
        """Quantile q of one link's delay (body and spikes mixed), times `factor` (lemons).

        Computed by bisection on the mixture's distribution function, so tests can compare
        measured percentiles with the exact configured ones.
        """
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {q}")
        lo, hi = 0.0, max(self.spike_max_ns, self.body_quantile_ns(1 - 1e-9)) * 2.0
        for _ in range(200):
            mid = (lo + hi) / 2
            if self._cdf(mid) < q:
                lo = mid
            else:
                hi = mid
        return hi * factor

    def _cdf(self, x: float) -> float:
        if x <= 0:
            return 0.0
        sigma = self.sigma
        if sigma == 0.0:
            body = 1.0 if x >= self.median_ns else 0.0
        else:
            z = (math.log(x) - math.log(self.median_ns)) / sigma
            body = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
        if self.spike_max_ns <= self.spike_min_ns:
            spike = 1.0 if x >= self.spike_min_ns else 0.0
        else:
            spike = min(
                1.0, max(0.0, (x - self.spike_min_ns) / (self.spike_max_ns - self.spike_min_ns))
            )
        return (1.0 - self.spike_prob) * body + self.spike_prob * spike

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "median_ns": self.median_ns,
            "p99_ns": self.p99_ns,
            "spike_prob": self.spike_prob,
            "spike_min_ns": self.spike_min_ns,
            "spike_max_ns": self.spike_max_ns,
            "loss": self.loss,
            "lemons": list(self.lemons),
            "lemon_fraction": self.lemon_fraction,
            "lemon_factor": self.lemon_factor,
            "emulated_at": self.emulated_at,
        }


class LinkSampler:
    """Draws the fate of successive copies on one directed link; deterministic per seed."""

    __slots__ = ("_loss", "_mu", "_rng", "_sigma", "_spike", "dst", "factor", "model", "src")

    def __init__(self, model: LinkModel, src: str, dst: str) -> None:
        self.model = model
        self.src = src
        self.dst = dst
        self._rng = random.Random(_seed_of(f"link:{model.seed}:{src}->{dst}"))
        self.factor = model.lemon_factor if model.is_lemon(src) or model.is_lemon(dst) else 1.0
        """Delay multiplier of this link (lemon_factor when it touches a lemon)."""
        self._mu = math.log(model.median_ns)
        self._sigma = model.sigma
        self._loss = model.loss
        self._spike = model.spike_prob

    def sample(self) -> int | None:
        """Delay in nanoseconds of the next copy, or None when the copy is lost."""
        rng = self._rng
        # The number of variates drawn per copy depends on the configuration only, so the
        # delay of copy k does not depend on whether earlier copies were lost or spiked.
        lost = self._loss > 0.0 and rng.random() < self._loss
        # gauss() caches its second variate: about half the cost of lognormvariate().
        delay = math.exp(self._mu + self._sigma * rng.gauss())
        if self._spike > 0.0:
            spiked = rng.random() < self._spike
            spike = rng.uniform(self.model.spike_min_ns, self.model.spike_max_ns)
            if spiked:
                delay = spike
        if lost:
            return None
        return int(delay * self.factor)


def _seed_of(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _unit(text: str) -> float:
    return _seed_of(text) / 2.0**64


def _normal_ppf(q: float) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < q:
            lo = mid
        else:
            hi = mid
    return hi


EMULATED_AT = ("hops", "receivers")
"""Where a link model can be applied (LinkModel.emulated_at)."""

_INT_FIELDS = ("seed", "median_ns", "p99_ns", "spike_min_ns", "spike_max_ns")
_PROB_FIELDS = ("spike_prob", "loss", "lemon_fraction")


def parse_link_model(
    doc: Mapping[str, Any] | None, *, path: str = "$.link_model"
) -> LinkModel | None:
    """Validate a link-model document; None, {} or {"enabled": false} mean off."""
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise LinkModelError(f"{path}: expected an object")
    if not doc or doc.get("enabled", True) is False:
        return None
    known = set(_INT_FIELDS) | set(_PROB_FIELDS)
    known |= {"lemons", "lemon_factor", "enabled", "emulated_at"}
    unknown = sorted(str(k) for k in doc if k not in known)
    if unknown:
        raise LinkModelError(f"{path}: unknown field(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for key in _INT_FIELDS:
        if key in doc:
            v = doc[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LinkModelError(f"{path}.{key}: expected an integer >= 0, got {v!r}")
            kwargs[key] = v
    for key in (*_PROB_FIELDS, "lemon_factor"):
        if key in doc:
            v = doc[key]
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise LinkModelError(f"{path}.{key}: expected a number, got {v!r}")
            kwargs[key] = float(v)
    if "lemons" in doc:
        lemons = doc["lemons"]
        if not isinstance(lemons, list) or not all(isinstance(x, str) for x in lemons):
            raise LinkModelError(f"{path}.lemons: expected a list of node names")
        kwargs["lemons"] = tuple(lemons)
    if "emulated_at" in doc:
        where = doc["emulated_at"]
        if where not in EMULATED_AT:
            raise LinkModelError(
                f"{path}.emulated_at: expected one of {', '.join(EMULATED_AT)}, got {where!r}"
            )
        kwargs["emulated_at"] = where
    model = LinkModel(**kwargs)
    if model.median_ns < 1:
        raise LinkModelError(f"{path}.median_ns: must be >= 1")
    if model.p99_ns < model.median_ns:
        raise LinkModelError(f"{path}.p99_ns: {model.p99_ns} is below median_ns {model.median_ns}")
    for key in _PROB_FIELDS:
        if not 0.0 <= getattr(model, key) <= 1.0:
            raise LinkModelError(f"{path}.{key}: must be within 0..1")
    if model.spike_max_ns < model.spike_min_ns:
        raise LinkModelError(f"{path}.spike_max_ns: below spike_min_ns")
    if model.lemon_factor < 1.0:
        raise LinkModelError(f"{path}.lemon_factor: must be >= 1")
    return model
