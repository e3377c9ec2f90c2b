"""Link latency distributions for the simulator: uniform, lognormal with spikes, lemon VMs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class UniformLatency:
    """One-way link latency drawn uniformly from [low_us, high_us) for every copy."""

    low_us: float = 0.0
    """Smallest latency in microseconds."""
    high_us: float = 1.0
    """Largest latency in microseconds (exclusive)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_us <= self.high_us:
            raise ValueError(f"need 0 <= low_us <= high_us, got {self.low_us}, {self.high_us}")

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> FloatArray:
        """Independent latencies (µs) for an array of copies."""
        out = rng.random(shape)
        out *= self.high_us - self.low_us
        out += self.low_us
        return out

    def describe(self) -> str:
        return f"uniform [{self.low_us:g}, {self.high_us:g}) µs"


@dataclass(frozen=True, kw_only=True)
class LognormalLatency:
    """A cloud link: lognormal body plus rare spikes.

    latency = base_us + median_us * exp(sigma * Z), Z ~ N(0, 1); with probability
    spike_probability a copy is also delayed by U(spike_min_us, spike_max_us).
    """

    base_us: float = 5.0
    """Fixed part of the latency in microseconds (propagation and NIC)."""
    median_us: float = 10.0
    """Median of the lognormal part in microseconds."""
    sigma: float = 0.35
    """Shape of the lognormal part (standard deviation of its logarithm)."""
    spike_probability: float = 0.001
    """Chance that one copy hits a spike (a descheduled vCPU, a busy hypervisor)."""
    spike_min_us: float = 50.0
    """Smallest spike delay in microseconds."""
    spike_max_us: float = 250.0
    """Largest spike delay in microseconds."""

    def __post_init__(self) -> None:
        if self.base_us < 0 or self.median_us <= 0 or self.sigma < 0:
            raise ValueError("need base_us >= 0, median_us > 0, sigma >= 0")
        if not 0.0 <= self.spike_probability <= 1.0:
            raise ValueError(f"spike_probability must be in [0, 1], got {self.spike_probability}")
        if not 0.0 <= self.spike_min_us <= self.spike_max_us:
            raise ValueError("need 0 <= spike_min_us <= spike_max_us")

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> FloatArray:
        """Independent latencies (µs) for an array of copies."""
        out = rng.standard_normal(shape)
        out *= self.sigma
        np.exp(out, out=out)
        out *= self.median_us
        out += self.base_us
        if self.spike_probability > 0:
            # Draw how many copies spike, then which: far cheaper than a coin per copy when
            # spikes are rare. A copy drawn twice spikes once.
            flat = out.reshape(-1)
            count = int(rng.binomial(flat.size, self.spike_probability))
            if count:
                hit = rng.integers(0, flat.size, count)
                flat[hit] += rng.uniform(self.spike_min_us, self.spike_max_us, count)
        return out

    def describe(self) -> str:
        return (
            f"{self.base_us:g} µs + lognormal(median {self.median_us:g} µs, sigma {self.sigma:g})"
            f", spikes p={self.spike_probability:g} of +U({self.spike_min_us:g}, "
            f"{self.spike_max_us:g}) µs"
        )


LinkBody = UniformLatency | LognormalLatency


@dataclass(frozen=True, kw_only=True)
class LemonVMs:
    """Per-VM bias: a fixed share of VMs ("lemons") is slower on every packet they receive."""

    fraction: float = 0.0
    """Share of VMs (relays and endpoints) that are lemons, drawn once per run."""
    extra_us: float = 0.0
    """Extra latency in microseconds added to every copy a lemon VM receives."""
    endpoints_per_vm: int = 1
    """Endpoints hosted on one receiver VM (the paper emulated 10-20 per VM); endpoints
    e0..e{k-1} share the first VM, and so share its bias."""

    def __post_init__(self) -> None:
        if self.endpoints_per_vm < 1:
            raise ValueError(f"endpoints_per_vm must be >= 1, got {self.endpoints_per_vm}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"lemon fraction must be in [0, 1], got {self.fraction}")
        if self.extra_us < 0:
            raise ValueError(f"lemon extra_us must be >= 0, got {self.extra_us}")

    def bias(self, rng: np.random.Generator, count: int) -> FloatArray:
        """Receive-side bias (µs) of `count` VMs: extra_us for lemons, 0 for the rest."""
        if self.fraction <= 0 or self.extra_us <= 0:
            return np.zeros(count)
        return np.where(rng.random(count) < self.fraction, self.extra_us, 0.0)

    def endpoint_bias(self, rng: np.random.Generator, endpoints: int) -> FloatArray:
        """Receive-side bias (µs) of `endpoints` endpoints, grouped endpoints_per_vm per VM."""
        vms = -(-endpoints // self.endpoints_per_vm)
        return np.repeat(self.bias(rng, vms), self.endpoints_per_vm)[:endpoints]

    def describe(self) -> str:
        if self.fraction <= 0 or self.extra_us <= 0:
            return "no lemon VMs"
        return (
            f"{self.fraction:.1%} lemon VMs +{self.extra_us:g} µs, "
            f"{self.endpoints_per_vm} endpoint(s) per receiver VM"
        )


@dataclass(frozen=True, kw_only=True)
class LinkModel:
    """Latency of one copy from a sender to a receiver VM: body + receiver's lemon bias."""

    body: LinkBody = LognormalLatency()
    """Per-copy latency distribution."""
    lemons: LemonVMs = LemonVMs()
    """Per-VM bias, fixed for a run."""

    def describe(self) -> str:
        return f"{self.body.describe()}; {self.lemons.describe()}"
