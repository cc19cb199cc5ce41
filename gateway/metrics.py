"""Prometheus metrics, correct across worker processes.

With several workers the process that starts them sets PROMETHEUS_MULTIPROC_DIR before
this module is imported, so every worker writes its samples to shared files and /metrics
(served by any worker) aggregates them all.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

REQUESTS = Counter(
    "metergate_requests_total", "Requests answered, by route and status.", ["route", "status"]
)
LATENCY = Histogram(
    "metergate_request_duration_seconds",
    "Time from request to response headers, by route.",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
UNITS = Counter(
    "metergate_units_charged_total", "Units charged, by tier and route.", ["tier", "route"]
)
REFUNDS = Counter(
    "metergate_units_refunded_total", "Units refunded after backend failures.", ["route"]
)
DENIALS = Counter("metergate_denials_total", "Requests refused, by reason.", ["reason"])
UPSTREAM_ERRORS = Counter(
    "metergate_upstream_errors_total",
    "Backend failures, by upstream and kind.",
    ["upstream", "kind"],
)
REDIS_ERRORS = Counter(
    "metergate_redis_errors_total", "Charges or refunds that Redis failed.", ["op"]
)
FAIL_OPEN = Counter(
    "metergate_failopen_units_total", "Units let through unmetered while Redis was down.", ["route"]
)
BATCH = Histogram(
    "metergate_charge_batch_size",
    "Charges sent to Redis in one pipelined write.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class RouteMetrics:
    """Label children bound once per route, so a request does no label lookups."""

    __slots__ = ("_requests", "latency", "refunds", "route", "units")

    def __init__(self, route: str) -> None:
        self.route = route
        self.latency = LATENCY.labels(route)
        self.refunds = REFUNDS.labels(route)
        self._requests: dict[int, Counter] = {}
        self.units: dict[str, Counter] = {}

    def request(self, status: int) -> None:
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = REQUESTS.labels(self.route, str(status))
        child.inc()

    def charged(self, tier: str, units: int) -> None:
        child = self.units.get(tier)
        if child is None:
            child = self.units[tier] = UNITS.labels(tier, self.route)
        child.inc(units)
