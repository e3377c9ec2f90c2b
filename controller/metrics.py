"""Prometheus metrics of one controller instance, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class StateCollector(Collector):
    """Gauges read from the planner at scrape time, so they can never drift from the state."""

    def __init__(self, read: Callable[[], dict[str, list[tuple[dict[str, str], float]]]]):
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        helps = {
            "jasper_nodes": "Registered nodes by role and liveness",
            "jasper_subscriptions": "Subscriptions per stream",
            "jasper_config_version": "Current config version",
            "jasper_plan_epoch": "Plan epoch of the active plan per stream",
            "jasper_predicted_oml_seconds": "Predicted OML of the active plan per stream",
            "jasper_plan_pending": "1 while a stream switches to a new plan",
            "jasper_key_sign_epoch": "Key epoch the publisher of a stream signs with",
            "jasper_key_rotating": "1 while a stream's key rotates",
        }
        for name, samples in self.read().items():
            labels = sorted({k for lab, _ in samples for k in lab})
            fam = GaugeMetricFamily(name, helps.get(name, name), labels=labels)
            for lab, value in samples:
                fam.add_metric([lab.get(k, "") for k in labels], value)
            yield fam


class ControllerMetrics:
    """Counters and histograms the service updates as it works."""

    def __init__(self) -> None:
        # A registry per app: tests build many apps in one process.
        self.registry = CollectorRegistry()
        self.heartbeats = Counter(
            "jasper_heartbeats", "Heartbeats received", registry=self.registry
        )
        self.replans = Counter(
            "jasper_replans", "Full re-plans by reason", ["reason"], registry=self.registry
        )
        self.requests = Counter(
            "jasper_http_requests",
            "API requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.attach_seconds = Histogram(
            "jasper_attach_seconds",
            "Time to attach one endpoint incrementally",
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
            registry=self.registry,
        )
        self.plan_seconds = Histogram(
            "jasper_plan_seconds",
            "Time of a full plan",
            buckets=(1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0),
            registry=self.registry,
        )

    def watch(self, read: Callable[[], dict[str, list[tuple[dict[str, str], float]]]]) -> None:
        self.registry.register(StateCollector(read))
