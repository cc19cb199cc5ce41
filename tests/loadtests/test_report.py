"""The benchmark's arithmetic: combining rounds and judging the issue's targets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from loadtests.report import (
    Result,
    curve_rows,
    evaluate_targets,
    median_result,
    render,
    scaling_rows,
)

_MACHINE = {
    "date": "2026-11-25T00:00:00Z",
    "cpu_model": "test CPU",
    "nproc": 2,
    "kernel": "6",
    "python": "3.11",
    "commit": "abc",
}
_SETTINGS = {
    "threads": 2,
    "connections": 64,
    "duration": 10.0,
    "warmup": 2.0,
    "accounts": 8,
    "rounds": 3,
}


def _result(system: str = "metergate-1w", cpu: float = 40.0, **fields: object) -> Result:
    base = Result(
        system=system,
        label=system,
        kind="metergate",
        workers=1,
        metering=True,
        rps=1000.0,
        p50_ms=1.0,
        p90_ms=2.0,
        p99_ms=3.0,
        max_ms=9.0,
        requests_wrk=100,
        requests_warmup=10,
        requests_served=100,
        cpu_us_per_req=cpu,
        backend_cpu_us_per_req=5.0,
        redis_cpu_us_per_req=8.0,
        evalsha_per_req=1.0,
        round_trips_per_req=0.04,
        mean_batch=25.0,
        errors={"connect": 0, "status": 0},
        units_expected=250,
        units_charged=250,
        check_ok=True,
        cpu_us_min=cpu,
        cpu_us_max=cpu,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def test_rounds_combine_into_medians_sums_and_the_spread() -> None:
    runs = [
        _result(cpu=40.0, rps=900.0, p99_ms=5.0),
        _result(cpu=52.0, rps=1000.0, p99_ms=3.0, errors={"connect": 1, "status": 0}),
        _result(cpu=38.0, rps=1100.0, p99_ms=4.0),
    ]
    combined = median_result(runs)
    assert (combined.cpu_us_per_req, combined.rps, combined.p99_ms) == (40.0, 1000.0, 4.0)
    assert (combined.cpu_us_min, combined.cpu_us_max, combined.rounds) == (38.0, 52.0, 3)
    assert combined.requests_served == 300 and combined.units_charged == 750
    assert combined.errors == {"connect": 1, "status": 0}


def test_one_failed_round_fails_the_combined_result_and_names_its_round() -> None:
    bad = _result(check_ok=False, problems=["Redis used +249, served requests cost 250"])
    combined = median_result([_result(), bad, _result()])
    assert not combined.check_ok
    assert combined.problems == ["round 2: Redis used +249, served requests cost 250"]


def test_a_figure_missing_in_any_round_stays_missing() -> None:
    combined = median_result([_result(), _result(mean_batch=None)])
    assert combined.mean_batch is None


def test_no_rounds_is_an_error() -> None:
    with pytest.raises(ValueError):
        median_result([])


def test_the_metering_target_compares_the_two_medians() -> None:
    off = [_result("metergate-off", cpu=c, metering=False) for c in (30.0, 40.0, 32.0)]
    on = [_result("metergate-1w", cpu=c) for c in (36.0, 37.0, 60.0)]
    targets = evaluate_targets([median_result(off), median_result(on)], connections=64)
    metering = next(t for t in targets if t["target"].startswith("metering adds"))
    # 37 µs over 32 µs: +16%, over the 15% allowed (the means, 44.3 over 34, give +30%).
    assert metering["status"] == "FAIL" and "+16%" in metering["detail"]


def test_the_table_shows_the_spread_and_how_many_rounds() -> None:
    combined = median_result([_result(cpu=c) for c in (38.0, 40.0, 52.0)])
    text = render([combined], [], [], _MACHINE, _SETTINGS)
    assert "median of 3 rounds" in text
    assert "| 40.0 | 38.0-52.0 |" in text


def test_a_run_with_a_connection_per_request_checks_no_target() -> None:
    results = [_result(rps=1000.0)]
    targets = evaluate_targets(results, 64)
    assert targets  # as a keep-alive run would check them
    text = render(results, targets, [], _MACHINE, {**_SETTINGS, "new_connections": True})
    assert "each request on a new connection" in text
    assert "Not checked" in text and "**" not in text.split("### Targets")[1]


def test_the_scaling_curve_leaves_out_redis_over_tls() -> None:
    results = [
        _result(rps=1000.0),
        _result("metergate-2w", workers=2, rps=1500.0),
        _result("metergate-1w-tls", rps=800.0, redis_tls=True),
    ]
    rows = scaling_rows(results)
    assert [(r["workers"], r["rps"], r["speedup"]) for r in rows] == [
        (1, 1000.0, 1.0),
        (2, 1500.0, 1.5),
    ]


def _limited(workers: int, rps: float, cpus_per_worker: float = 0.25) -> Result:
    return _result(
        f"metergate-{workers}w-cpus{workers * cpus_per_worker:g}",
        workers=workers,
        rps=rps,
        p99_ms=80.0,
        cpu_limit=workers * cpus_per_worker,
        throttled=0.97,
    )


def _scaling_target(results: list[Result]) -> dict[str, object]:
    targets = evaluate_targets(results, connections=64)
    return next(t for t in targets if t["target"].startswith("throughput grows"))


def test_the_cpu_limited_curve_is_kept_apart_from_the_unlimited_runs() -> None:
    results = [
        _result("direct", kind="direct", metering=False, p99_ms=2.0),
        _result(rps=20000.0),
        _limited(1, 5000.0),
        _limited(2, 9000.0),
    ]
    assert [r["workers"] for r in scaling_rows(results)] == [1]
    assert curve_rows(results) == [
        {
            "workers": 1,
            "cpus": 0.25,
            "rps": 5000,
            "speedup": 1.0,
            "cpu_us_per_req": 40.0,
            "throttled": 0.97,
        },
        {
            "workers": 2,
            "cpus": 0.5,
            "rps": 9000,
            "speedup": 1.8,
            "cpu_us_per_req": 40.0,
            "throttled": 0.97,
        },
    ]
    # A limited run's latency is the quota's pauses: not judged against direct's.
    p99 = [t["target"] for t in evaluate_targets(results, 64) if "p99" in t["target"]]
    assert p99 == ["metergate-1w p99 at 64 connections <= direct + 2 ms"]


def test_each_worker_must_add_half_a_workers_throughput() -> None:
    grows = _scaling_target([_limited(1, 5000.0), _limited(2, 9000.0), _limited(3, 11600.0)])
    assert grows["status"] == "PASS"
    assert grows["detail"] == "speedup by workers 1: 1.00, 2: 1.80, 3: 2.32"
    # The third worker added 0.44 of the first's 5,000 req/s.
    flat = _scaling_target([_limited(1, 5000.0), _limited(2, 9000.0), _limited(3, 11200.0)])
    assert flat["status"] == "FAIL"


def test_a_step_over_a_missing_run_counts_per_worker_added() -> None:
    # 1 -> 3 workers added 4,000 req/s: 0.4 of the first worker's 5,000 a worker.
    assert _scaling_target([_limited(1, 5000.0), _limited(3, 9000.0)])["status"] == "FAIL"
    assert _scaling_target([_limited(1, 5000.0), _limited(3, 10000.0)])["status"] == "PASS"


def test_the_scaling_target_needs_a_curve_from_one_worker() -> None:
    assert _scaling_target([_result(), _limited(1, 5000.0)])["status"] == "n/a"
    assert _scaling_target([_limited(2, 9000.0), _limited(3, 13000.0)])["status"] == "n/a"


def test_the_table_shows_the_curve_and_how_often_the_limit_held() -> None:
    text = render([_limited(1, 5000.0), _limited(2, 9000.0)], [], [], _MACHINE, _SETTINGS)
    assert "### Scaling under CPU limits" in text
    assert "| 2 | 0.5 | 9,000 | 1.80 | 40.0 | 97% |" in text
