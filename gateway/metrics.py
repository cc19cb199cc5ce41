"""Prometheus metrics, correct across worker processes.

With several workers the process that starts them sets PROMETHEUS_MULTIPROC_DIR before
this module is imported, so every worker writes its samples to shared files and /metrics
(served by any worker) aggregates them all.

The per-request metrics (requests, latency, units) and the charge batch sizes are
tallied in plain ints and written to the Prometheus metrics at most FLUSH_SECONDS after
the first tally: each write to a shared file costs about 1.5 µs (3 µs for a histogram
observation), which was 6 µs a request with several workers, and writing once per
event-loop iteration still showed in a profile under load, where an iteration serves
a few requests. A scrape writes this process's tallies first, and another
worker's are at most FLUSH_SECONDS behind; a worker that stops writes its tallies as it
stops (gateway.app).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
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

# How long a tally waits to be written: far below any scrape interval.
FLUSH_SECONDS = 0.1

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
OPEN_CONNECTIONS = Gauge(
    "metergate_open_connections",
    "Client connections this gateway worker holds open, sampled every second and at each "
    "scrape; one series per worker (pid) when there are several.",
    multiprocess_mode="liveall",
)
# How often a worker writes its open connections (server.serve samples them).
CONNECTIONS_SAMPLE_SECONDS = 1.0
# What counts this process's open connections (set by server.serve), if anything does.
_count_connections: Callable[[], int] | None = None


def count_connections(count: Callable[[], int] | None) -> None:
    """Have OPEN_CONNECTIONS read from ``count`` (None: from nothing, as a stopped server)."""
    global _count_connections
    _count_connections = count
    if count is None:
        OPEN_CONNECTIONS.set(0)
    sample_connections()


def sample_connections() -> None:
    count = _count_connections
    if count is not None:
        OPEN_CONNECTIONS.set(count())


BATCH = Histogram(
    "metergate_charge_batch_size",
    "Charges sent to Redis in one pipelined write.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


class _HistogramTally:
    """Observations of one histogram (or label child), counted by bucket and written at
    once. The buckets and sum are the values Histogram.observe increments: it has no
    public call for many observations (tests/gateway/test_metrics.py checks the result
    against observe() itself, so a change in prometheus_client shows)."""

    __slots__ = ("_bounds", "_counts", "_histogram", "_sum")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._bounds: tuple[float, ...] = tuple(histogram._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # The bucket observe() would count it in: the first bound >= value.
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def write(self) -> None:
        """Each count leaves its tally once written: a failure part way writes none twice."""
        counts = self._counts
        if any(counts):
            buckets = self._histogram._buckets
            for index, count in enumerate(counts):
                if count:
                    buckets[index].inc(count)
                    counts[index] = 0
        if self._sum:  # also a sum left by a write that failed after the buckets
            self._histogram._sum.inc(self._sum)
            self._sum = 0.0


class BatchSizes:
    """The charges of each pipelined Redis write (BATCH), tallied like a route's metrics."""

    __slots__ = ("_queued", "_tally", "route")

    def __init__(self) -> None:
        self.route = "(charge batches)"  # what a failed write's log line names
        self._tally = _HistogramTally(BATCH)
        self._queued = False

    def observe(self, charges: int) -> None:
        self._tally.observe(charges)
        if not self._queued:
            self._queued = True
            _mark(self)

    def _write(self) -> None:
        self._tally.write()
        self._queued = False


def render() -> tuple[bytes, str]:
    flush()
    sample_connections()  # the scraping worker's own, exact; the others' a second old at most
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


BATCH_SIZES = BatchSizes()
_dirty: list[RouteMetrics | BatchSizes] = []  # with tallies not yet written
# The loop whose timer will flush them: a timer of a loop that has since closed (one per
# test) never fires, so another loop schedules its own.
_flush_loop: asyncio.AbstractEventLoop | None = None


def _mark(tally: RouteMetrics | BatchSizes) -> None:
    """Queue ``tally`` for the next flush, which is due FLUSH_SECONDS after the first."""
    global _flush_loop
    _dirty.append(tally)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop: written now
        flush()
        return
    if _flush_loop is not loop:
        loop.call_later(FLUSH_SECONDS, flush)
        _flush_loop = loop


def flush() -> None:
    """Write every route's tallies to the Prometheus metrics."""
    global _flush_loop
    _flush_loop = None
    routes = _dirty[:]
    _dirty.clear()
    for route in routes:
        try:
            route._write()
        except Exception:  # one route's failure (a full disk, say) must not stall the others
            log.exception("writing the metrics of %s failed", route.route)
            _dirty.append(route)  # what is left of its tallies: tried again in a second
    if _dirty:
        with contextlib.suppress(RuntimeError):  # no loop: the next flush tries again
            loop = asyncio.get_running_loop()
            loop.call_later(1.0, flush)
            _flush_loop = loop


class RouteMetrics:
    """One route's requests, latency and units: tallied per request, written within
    FLUSH_SECONDS (see the module's docstring). Label children are bound once per route."""

    __slots__ = (
        "_latency",
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
        self._latency = _HistogramTally(LATENCY.labels(route))
        self._requests: dict[int, Counter] = {}
        self._units: dict[str, Counter] = {}
        self._status_counts: dict[int, int] = {}
        self._units_counts: dict[str, int] = {}
        self._queued = False

    def answered(self, status: int, seconds: float) -> None:
        """A request answered with ``status``, its head sent ``seconds`` after it came."""
        counts = self._status_counts
        counts[status] = counts.get(status, 0) + 1
        self._latency.observe(seconds)
        if not self._queued:
            self._queued = True
            _mark(self)

    def charged(self, tier: str, units: int) -> None:
        counts = self._units_counts
        counts[tier] = counts.get(tier, 0) + units
        if not self._queued:
            self._queued = True
            _mark(self)

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
        self._latency.write()
        self._queued = False
