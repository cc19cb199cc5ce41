"""Prometheus metrics, correct across worker processes.

With several workers the process that starts them sets PROMETHEUS_MULTIPROC_DIR before
this module is imported, so every worker writes its samples to shared files and /metrics
(served by any worker) aggregates them all.

The per-request metrics (requests, latency, units) are tallied in plain ints by
RouteMetrics and written to the Prometheus metrics once per event-loop iteration: each
write to a shared file costs about 1.5 µs (3 µs for a histogram observation), which was
6 µs a request with several workers. A scrape writes this process's tallies first, and
another worker's are at most one of its loop iterations behind.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
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
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY = Histogram(
    "metergate_request_duration_seconds",
    "Time from request to response headers, by route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
_BOUNDS = (*LATENCY_BUCKETS, math.inf)

log = logging.getLogger(__name__)
UNITS = Counter(
    "metergate_units_charged_total", "Units charged, by tier and route.", ["tier", "route"]
)
REFUNDS = Counter(
    "metergate_units_refunded_total",
    "Units refunded: backend failures, and charges applied after their request was refused.",
    ["route"],
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
ABANDONED = Counter(
    "metergate_abandoned_charges_total",
    "Charges whose request stopped waiting before Redis answered (a timeout, or the client "
    "went away), by what became of them: refunded (Redis had charged them), refund_failed, "
    "not_charged, unknown (no reply came).",
    ["outcome"],
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
    flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_dirty: list[RouteMetrics] = []  # with tallies not yet written
_flush_scheduled = False


def flush() -> None:
    """Write every route's tallies to the Prometheus metrics."""
    global _flush_scheduled
    _flush_scheduled = False
    routes = _dirty[:]
    _dirty.clear()
    for route in routes:
        try:
            route._write()
        except Exception:  # one route's failure (a full disk, say) must not stall the others
            log.exception("writing the metrics of %s failed", route.route)
            _dirty.append(route)  # what is left of its tallies: tried again in a second
    if _dirty and not _flush_scheduled:
        with contextlib.suppress(RuntimeError):  # no loop: the next flush tries again
            asyncio.get_running_loop().call_later(1.0, flush)
            _flush_scheduled = True


class RouteMetrics:
    """One route's requests, latency and units: tallied per request, written per loop
    iteration (see the module's docstring). Label children are bound once per route."""

    __slots__ = (
        "_latency",
        "_latency_counts",
        "_latency_sum",
        "_queued",
        "_requests",
        "_status_counts",
        "_units",
        "_units_counts",
        "refunds",
        "route",
    )

    def __init__(self, route: str) -> None:
        self.route = route
        self.refunds = REFUNDS.labels(route)  # rare: written at once
        self._latency = LATENCY.labels(route)
        self._requests: dict[int, Counter] = {}
        self._units: dict[str, Counter] = {}
        self._status_counts: dict[int, int] = {}
        self._latency_counts = [0] * len(_BOUNDS)
        self._latency_sum = 0.0
        self._units_counts: dict[str, int] = {}
        self._queued = False

    def answered(self, status: int, seconds: float) -> None:
        """A request answered with ``status``, its head sent ``seconds`` after it came."""
        counts = self._status_counts
        counts[status] = counts.get(status, 0) + 1
        # The bucket Histogram.observe would count it in: the first bound >= seconds.
        self._latency_counts[bisect.bisect_left(_BOUNDS, seconds)] += 1
        self._latency_sum += seconds
        if not self._queued:
            self._mark()

    def charged(self, tier: str, units: int) -> None:
        counts = self._units_counts
        counts[tier] = counts.get(tier, 0) + units
        if not self._queued:
            self._mark()

    def _mark(self) -> None:
        global _flush_scheduled
        self._queued = True
        _dirty.append(self)
        if not _flush_scheduled:
            try:
                asyncio.get_running_loop().call_soon(flush)
            except RuntimeError:  # no loop: written now
                flush()
                return
            _flush_scheduled = True

    def _write(self) -> None:
        """Each count leaves its tally once written, so a failure part way writes none twice."""
        statuses = self._status_counts
        for status in list(statuses):
            child = self._requests.get(status)
            if child is None:
                child = self._requests[status] = REQUESTS.labels(self.route, str(status))
            child.inc(statuses[status])
            del statuses[status]
        units = self._units_counts
        for tier in list(units):
            child = self._units.get(tier)
            if child is None:
                child = self._units[tier] = UNITS.labels(tier, self.route)
            child.inc(units[tier])
            del units[tier]
        counts = self._latency_counts
        if any(counts):
            # Histogram has no public call for many observations at once; these are the
            # values its observe() increments (tests/gateway/test_metrics.py checks the
            # result against observe() itself, so a change in prometheus_client shows).
            buckets = self._latency._buckets
            for index, count in enumerate(counts):
                if count:
                    buckets[index].inc(count)
                    counts[index] = 0
            self._latency._sum.inc(self._latency_sum)
            self._latency_sum = 0.0
        self._queued = False
