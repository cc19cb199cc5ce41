"""/metrics: requests, units, denials, upstream and Redis errors, batch sizes.

Prometheus counters are process-global and other tests run in this process too, so every
assertion is on the change between two scrapes.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.periods import calendar_month
from tests.conftest import Clock, auth, echo, load_test_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _scrape(session: aiohttp.ClientSession, gateway) -> Samples:
    async with session.get(gateway.make_url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_count_requests_units_denials_and_errors(
    start_upstream, start_gateway, redis_client: redis.Redis, clock: Clock
) -> None:
    async def backend(request: web.Request) -> web.StreamResponse:
        if request.path == "/export/pdf":
            return web.Response(status=503)
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": backend})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    await redis_client.hset(
        "mg:{acct-m-full}:usage",
        mapping={"period_start": calendar_month(clock.now)[0], "used": 100, "overage": 0},
    )
    async with aiohttp.ClientSession() as session:
        before = await _scrape(session, gateway)
        for path, account in [
            ("/signals", "acct-m"),
            ("/signals", "acct-m"),
            ("/export/csv", "acct-m"),
            ("/export/pdf", "acct-m"),  # 503 from the backend: refunded
            ("/signals", "acct-m-full"),  # 429
        ]:
            async with session.get(gateway.make_url(path), headers=auth(account)) as resp:
                await resp.read()
        async with session.get(gateway.make_url("/signals")) as resp:  # no token: 401
            await resp.read()
        async with session.get(gateway.make_url("/nowhere"), headers=auth()) as resp:
            assert resp.status == 404
        after = await _scrape(session, gateway)

    def d(name: str, **labels: str) -> float:
        return _delta(before, after, name, **labels)

    assert d("metergate_requests_total", route="/signals", status="200") == 2
    assert d("metergate_requests_total", route="/signals", status="429") == 1
    assert d("metergate_requests_total", route="/signals", status="401") == 1
    assert d("metergate_requests_total", route="/export/pdf", status="503") == 1
    assert d("metergate_requests_total", route="(unmatched)", status="404") == 1
    assert d("metergate_units_charged_total", tier="free", route="/signals") == 2
    assert d("metergate_units_charged_total", tier="free", route="/export/csv") == 3
    assert d("metergate_units_charged_total", tier="free", route="/export/pdf") == 5
    assert d("metergate_units_refunded_total", route="/export/pdf") == 5
    assert d("metergate_denials_total", reason="quota_exceeded") == 1
    assert d("metergate_denials_total", reason="unauthorized") == 1
    assert d("metergate_upstream_errors_total", upstream="default", kind="503") == 1
    assert d("metergate_request_duration_seconds_count", route="/signals") == 4
    assert d("metergate_charge_batch_size_count") >= 5  # 5 charges + 1 refund, maybe coalesced
    assert d("metergate_charge_batch_size_sum") == 6


async def test_redis_errors_are_counted(start_upstream, start_gateway) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    upstream = await start_upstream({"/{tail:.*}": echo})
    gateway = await start_gateway(
        load_test_config(str(upstream.make_url(""))), url=f"redis://127.0.0.1:{closed}/0"
    )
    async with aiohttp.ClientSession() as session:
        before = await _scrape(session, gateway)
        async with session.get(gateway.make_url("/signals"), headers=auth()) as resp:
            assert resp.status == 503
        after = await _scrape(session, gateway)
    assert _delta(before, after, "metergate_redis_errors_total", op="charge") == 1
    assert _delta(before, after, "metergate_denials_total", reason="metering_unavailable") == 1


async def test_upstream_connection_errors_are_counted(start_gateway) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    gateway = await start_gateway(load_test_config(f"http://127.0.0.1:{closed}"))
    async with aiohttp.ClientSession() as session:
        before = await _scrape(session, gateway)
        async with session.get(gateway.make_url("/signals"), headers=auth("acct-me")) as resp:
            assert resp.status == 502
        after = await _scrape(session, gateway)
    assert (
        _delta(before, after, "metergate_upstream_errors_total", upstream="default", kind="connect")
        == 1
    )
    assert _delta(before, after, "metergate_units_refunded_total", route="/signals") == 1


def _samples(registry: CollectorRegistry) -> Samples:
    """The gateway's own samples (the process and GC ones move on their own)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if s.name.startswith("metergate_")
    }


async def test_tallies_written_after_flush_seconds_equal_prometheus_own_observations() -> None:
    # The same answers and batches through the tallies and straight into Histograms and a
    # Counter of a private registry: /metrics must not differ in any bucket or count.
    reference = CollectorRegistry()
    latency = Histogram(
        "metergate_request_duration_seconds",
        "reference",
        ["route"],
        buckets=metrics.LATENCY_BUCKETS,
        registry=reference,
    )
    requests = Counter(
        "metergate_requests_total", "reference", ["route", "status"], registry=reference
    )
    units = Counter(
        "metergate_units_charged_total", "reference", ["tier", "route"], registry=reference
    )
    batches = Histogram(
        "metergate_charge_batch_size",
        "reference",
        buckets=metrics.BATCH._upper_bounds[:-1],
        registry=reference,
    )
    route = "/tally-check"
    answers = [(200, 0.0004), (200, 0.0005), (200, 0.0006), (429, 0.003), (200, 12.0), (200, 0.0)]
    answers += [(200, b / 1000) for b in range(1, 400, 7)]
    rm = metrics.RouteMetrics(route)
    before = _samples(REGISTRY)
    for status, seconds in answers:
        rm.answered(status, seconds)
        latency.labels(route).observe(seconds)
        requests.labels(route, str(status)).inc()
    rm.charged("pro", 3)
    rm.charged("pro", 2)
    units.labels("pro", route).inc(5)
    for size in (1, 3, 16, 16, 17, 128, 300):
        metrics.BATCH_SIZES.observe(size)
        batches.observe(size)
    await asyncio.sleep(0)
    assert _samples(REGISTRY) == before  # tallied, not written yet
    await asyncio.sleep(metrics.FLUSH_SECONDS + 0.05)  # written by the timer
    after = _samples(REGISTRY)
    expected = _samples(reference)
    for key, value in expected.items():
        if key[0].endswith("_created"):
            continue
        assert after.get(key, 0.0) - before.get(key, 0.0) == pytest.approx(value), key
    rm.answered(200, 0.1)
    metrics.render()  # a scrape writes what is tallied without waiting for the loop
    assert (
        _samples(REGISTRY)[
            ("metergate_requests_total", frozenset({("route", route), ("status", "200")}))
        ]
        == sum(1 for s, _ in answers if s == 200) + 1
    )


async def test_a_stopping_gateway_writes_its_tallies(
    start_upstream, start_gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that stops does not leave its last FLUSH_SECONDS of counts unwritten."""
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 60.0)  # only the stop can write them
    upstream = await start_upstream({"/{tail:.*}": echo})
    gateway = await start_gateway(load_test_config(str(upstream.make_url(""))))
    key = ("metergate_requests_total", frozenset({("route", "/signals"), ("status", "200")}))
    before = _samples(REGISTRY).get(key, 0.0)
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=auth("acct-stop")) as resp:
            assert resp.status == 200
    assert _samples(REGISTRY).get(key, 0.0) == before  # tallied, not written yet
    await gateway.close()
    assert _samples(REGISTRY).get(key, 0.0) == before + 1


async def test_a_failed_metrics_write_writes_nothing_twice_and_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    route = "/tally-failing"
    rm = metrics.RouteMetrics(route)
    failing = metrics.REQUESTS.labels(route, "500")
    calls = {"n": 0}
    real_inc = failing.inc

    def inc_once_failing(amount: float = 1) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full")
        real_inc(amount)

    monkeypatch.setattr(failing, "inc", inc_once_failing)

    def count(status: str) -> float:
        key = ("metergate_requests_total", frozenset({("route", route), ("status", status)}))
        return _samples(REGISTRY).get(key, 0.0)

    rm.answered(200, 0.001)
    rm.answered(500, 0.001)
    await asyncio.sleep(metrics.FLUSH_SECONDS + 0.05)  # the flush: the 500 count fails
    assert (count("200"), count("500")) == (1.0, 0.0)
    await asyncio.sleep(1.1)  # tried again a second later, without another request
    assert (count("200"), count("500")) == (1.0, 1.0)


def test_open_connections_are_counted_at_each_scrape_and_zero_once_stopped() -> None:
    open_now = 3
    metrics.count_connections(lambda: open_now)
    try:
        open_now = 7  # a scrape reads the count then, not the last sample's
        assert b"\nmetergate_open_connections 7.0\n" in metrics.render()[0]
    finally:
        metrics.count_connections(None)
    assert b"\nmetergate_open_connections 0.0\n" in metrics.render()[0]
