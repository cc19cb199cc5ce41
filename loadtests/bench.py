"""``make bench``: metergate against direct, nginx and a straightforward Python proxy.

One run on one machine starts a private redis-server, a minimal backend and, one after
the other, each system in its own process(es); drives each with wrk at the same
concurrency and duration; and reports requests per second, latency percentiles and CPU
microseconds per request (the proxy's own processes, read from /proc: the figure that
stays stable on a shared machine). It goes through all systems ``--rounds`` times (3 by
default), each system started afresh each time, and reports each figure's median over
the rounds, with the spread of CPU per request. Every run is checked: all answers 200, and for the
metering systems the units in Redis equal exactly the requests the backend served times
their routes' costs. Prints a markdown table with the issue's targets and writes JSON.

``--pin`` (two CPUs or more) runs each one-process system under test alone on CPU 0 and
everything else (wrk, the backend, Redis, this script) on the other CPUs, so a proxy does
not share its core with the load it is measured under; systems with several workers run
on all CPUs. On a machine with few cores that starves the load side (on 2 cores, wrk,
the backend and Redis share one), so it is not the default.

Needs wrk and nginx (``apt-get install -y nginx wrk``); without nginx that row is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from config.load import load_config
from gateway import compiled, keys
from gateway.auth import issue_token
from gateway.embedded_redis import self_signed_tls
from gateway.routing import PricedRoute, RouteTable
from loadtests import cpu_limit, harness, systems, wrk
from loadtests.harness import BENCH_PATHS, write_plans
from loadtests.procs import Child, cpu_seconds, pin
from loadtests.report import (
    Result,
    curve_rows,
    evaluate_targets,
    median_result,
    render,
    scaling_rows,
)
from loadtests.systems import Environment, System

_SETTLE_S = 0.4  # for requests in flight when wrk stops to finish before counting
# The scaling curve's CPUs a worker: at two workers, a quarter of a 2-core machine.
CURVE_CPUS = 0.25


@dataclass
class Snapshot:
    cpu_s: float
    backend_cpu_s: float
    served: dict[str, int]
    evalsha_calls: int
    redis_cpu_s: float
    batches: float | None
    batched_charges: float | None
    throttle: tuple[int, int] | None  # a CPU limit's periods: run, and at the limit


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    wrk_bin = wrk.find_wrk()
    if wrk_bin is None:
        print(f"bench: wrk is not installed; install it with `{wrk.INSTALL_HINT}`", file=sys.stderr)
        return 2
    nproc = os.cpu_count() or 1
    chosen = _choose(args.systems, nproc, args.scaling)
    # The curve comes with the default set of systems; asked for, with any set.
    curve = args.cpu_curve if args.cpu_curve is not None else 0 if args.systems else CURVE_CPUS
    if curve:
        chosen += _curve(curve, args.curve_workers, nproc)
    why = cpu_limit.unavailable() if any(s.cpu_limit for s in chosen) else None
    if why:
        print(f"bench: no CPU-limited runs ({why}), skipping them", file=sys.stderr)
        chosen = [s for s in chosen if not s.cpu_limit]
    if any(s.kind == "nginx" for s in chosen) and systems.find_nginx() is None:
        print(f"bench: nginx is not installed, skipping it (`{wrk.INSTALL_HINT}`)", file=sys.stderr)
        chosen = [s for s in chosen if s.kind != "nginx"]

    everywhere = set(range(nproc))
    if args.pin and nproc >= 2:
        # Inherited by Redis, the backend and wrk, started from here.
        os.sched_setaffinity(0, everywhere - {0})
    else:
        args.pin = False

    config = load_config(systems.ROOT / "gateway.toml")
    table = RouteTable(config)
    routes: dict[str, PricedRoute] = {}
    for path in BENCH_PATHS:
        match = table.match("GET", path)
        assert isinstance(match, PricedRoute), f"gateway.toml prices no GET {path}"
        routes[path] = match

    with tempfile.TemporaryDirectory(prefix="metergate-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's worker runs as another user and reads its paths here
        # TLS only when a system asks for it: a redis-server may be built without it.
        tls = self_signed_tls(work / "tls") if any(s.redis_tls for s in chosen) else None
        with harness.services(work, tls) as (env, backend):
            client = redis.Redis.from_url(env.redis_url)
            bench = _Bench(args, env, client, backend, routes, wrk_bin)
            rounds: dict[str, list[Result]] = {s.name: [] for s in chosen}
            failed: list[str] = []
            # Round after round through all systems, so a slow spell of a shared
            # machine touches every system alike, and the median drops one-off runs.
            for round_no in range(1, args.rounds + 1):
                for index, system in enumerate(chosen, 1):
                    if system.name in failed:
                        continue
                    print(
                        f"[round {round_no}/{args.rounds}] [{index}/{len(chosen)}] "
                        f"{system.name}: {system.label}",
                        file=sys.stderr,
                    )
                    try:
                        rounds[system.name].append(bench.measure(system, round_no))
                    except RuntimeError as exc:
                        # One system that cannot start must not cost the others' figures.
                        print(f"bench: {system.name} skipped: {exc}", file=sys.stderr)
                        failed.append(system.name)
            # A system that failed in a later round is reported as skipped, not as
            # the median of the rounds it managed.
            results = [
                median_result(runs) for name, runs in rounds.items() if runs and name not in failed
            ]

    machine = _machine(wrk_bin)
    targets = [] if args.new_connections else evaluate_targets(results, args.connections)
    scaling = scaling_rows(results)
    print(render(results, targets, scaling, machine, vars(args)))
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine,
        "settings": vars(args),
        "results": [asdict(r) for r in results],
        "targets": targets,
        "scaling": scaling,
        "cpu_curve": curve_rows(results),
        "skipped": failed,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0 if all(r.check_ok for r in results) and not failed else 1


class _Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        env: Environment,
        client: redis.Redis,
        backend: Child,
        routes: dict[str, PricedRoute],
        wrk_bin: str,
    ) -> None:
        self.args = args
        self.env = env
        self.redis = client
        self.backend = backend
        self.routes = routes
        self.wrk_bin = wrk_bin

    def measure(self, system: System, round_no: int = 1) -> Result:
        # Fresh accounts each round: their plans' periods start now, and an account charged
        # in an earlier round would start a new period, its count from zero.
        accounts = [f"bench-{system.name}-r{round_no}-{i}" for i in range(self.args.accounts)]
        write_plans(self.redis, accounts)
        tokens = [issue_token(self.env.secret, a, ttl=3600) for a in accounts]
        script = self.env.work_dir / f"{system.name}.lua"
        wrk.write_script(script, BENCH_PATHS, tokens, close=self.args.new_connections)
        child, port = systems.start(system, self.env)
        if child is not None and self.args.pin:
            cpus = {0} if system.workers == 1 else set(range(os.cpu_count() or 1))
            pin(child.pid, cpus)
        pid = child.pid if child is not None else self.backend.pid
        metrics_url = f"http://127.0.0.1:{port}/metrics" if system.kind == "metergate" else None
        url = f"http://127.0.0.1:{port}"
        loadavg = os.getloadavg()
        with contextlib.ExitStack() as stack:
            limit = None
            if child is not None:
                stack.callback(child.stop)
                if system.cpu_limit:
                    try:
                        limit = cpu_limit.CpuLimit(
                            f"metergate-bench-{system.name}", system.cpu_limit
                        )
                        # Last in, first out: the child is stopped, then its group removed.
                        stack.callback(_remove, limit)
                        stack.callback(child.stop)
                        limit.add_tree(child.pid)
                    except OSError as exc:  # skips this system, as one that cannot start
                        raise RuntimeError(f"cannot limit its CPU: {exc}") from None
            units_before = self._units(accounts)
            before_warmup = self._snapshot(pid, metrics_url, limit)
            warm = self._wrk(url, script, self.args.warmup)
            time.sleep(_SETTLE_S)
            before = self._snapshot(pid, metrics_url, limit)
            run = self._wrk(url, script, self.args.duration)
            time.sleep(_SETTLE_S)
            after = self._snapshot(pid, metrics_url, limit)
            units_after = self._units(accounts)
            if child is not None:
                child.check_alive()
        return self._result(
            system, warm, run, before_warmup, before, after, units_before, units_after, loadavg
        )

    def _wrk(self, url: str, script: Path, seconds: float) -> wrk.WrkResult:
        return wrk.run(
            self.wrk_bin,
            url,
            script,
            seconds=seconds,
            connections=self.args.connections,
            threads=self.args.threads,
        )

    def _units(self, accounts: list[str]) -> tuple[int, dict[str, int]]:
        """Units in the usage hashes, and the daily units by route, summed over accounts."""
        used = 0
        by_route: dict[str, int] = {}
        for account in accounts:
            used += int(self.redis.hget(keys.usage_key(account), "used") or 0)
            for key in self.redis.scan_iter(match=keys.daily_key(account, "*"), count=1000):
                for route, units in self.redis.hgetall(key).items():
                    name = route.decode() if isinstance(route, bytes) else route
                    by_route[name] = by_route.get(name, 0) + int(units)
        return used, by_route

    def _snapshot(
        self, pid: int, metrics_url: str | None, limit: cpu_limit.CpuLimit | None
    ) -> Snapshot:
        stats = self.redis.info("commandstats")
        cpu = self.redis.info("cpu")
        batches = charges = None
        if metrics_url is not None:
            batches, charges = _batch_histogram(metrics_url)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.env.backend_port}/__bench/stats", timeout=5
        ) as resp:
            served = json.loads(resp.read())
        return Snapshot(
            cpu_s=cpu_seconds(pid),
            backend_cpu_s=cpu_seconds(self.backend.pid),
            served=served,
            evalsha_calls=int(stats.get("cmdstat_evalsha", {}).get("calls", 0)),
            redis_cpu_s=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            batches=batches,
            batched_charges=charges,
            throttle=limit.throttled() if limit is not None else None,
        )

    def _result(
        self,
        system: System,
        warm: wrk.WrkResult,
        run: wrk.WrkResult,
        first: Snapshot,
        before: Snapshot,
        after: Snapshot,
        units_before: tuple[int, dict[str, int]],
        units_after: tuple[int, dict[str, int]],
        loadavg: tuple[float, float, float],
    ) -> Result:
        served_run = _served(before, after)
        served_all = _served(first, after)
        n = max(1, sum(served_run.values()))
        problems: list[str] = []

        errors = {k: warm.errors[k] + run.errors[k] for k in run.errors}
        if any(errors.values()):
            problems.append(f"wrk errors {errors}")
        counted = warm.requests + run.requests
        total = sum(served_all.values())
        # wrk does not count the requests in flight when it stops, the backend served them.
        slack = 2 * self.args.connections
        if not counted <= total <= counted + slack:
            problems.append(f"backend served {total}, wrk counted {counted} (+{slack} allowed)")
        unknown = set(served_all) - set(self.routes)
        if unknown:
            problems.append(f"backend saw unexpected paths {sorted(unknown)}")

        expected = {
            route.name: served_all.get(path, 0) * route.cost if system.metering else 0
            for path, route in self.routes.items()
        }
        used = units_after[0] - units_before[0]
        daily = {
            name: units_after[1].get(name, 0) - units_before[1].get(name, 0) for name in expected
        }
        if used != sum(expected.values()):
            problems.append(f"Redis used +{used}, served requests cost {sum(expected.values())}")
        if daily != expected:
            problems.append(f"daily units by route {daily} != served x cost {expected}")

        evalsha = after.evalsha_calls - before.evalsha_calls
        round_trips: float | None = None
        mean_batch: float | None = None
        if system.kind == "yardstick":
            round_trips = evalsha / n
        elif (
            system.metering
            and after.batches is not None
            and before.batches is not None
            and after.batched_charges is not None
            and before.batched_charges is not None
        ):
            batches = after.batches - before.batches
            round_trips = batches / n
            charges = after.batched_charges - before.batched_charges
            mean_batch = charges / batches if batches else 0.0
        cpu_us = (after.cpu_s - before.cpu_s) / n * 1e6
        throttled: float | None = None
        if after.throttle is not None and before.throttle is not None:
            periods = after.throttle[0] - before.throttle[0]
            throttled = (after.throttle[1] - before.throttle[1]) / periods if periods else 0.0
        return Result(
            system=system.name,
            label=system.label,
            kind=system.kind,
            workers=system.workers,
            metering=system.metering,
            redis_tls=system.redis_tls,
            rps=run.rps,
            p50_ms=run.p50_ms,
            p90_ms=run.p90_ms,
            p99_ms=run.p99_ms,
            max_ms=run.max_ms,
            requests_wrk=run.requests,
            requests_warmup=warm.requests,
            requests_served=sum(served_run.values()),
            cpu_us_per_req=cpu_us,
            cpu_us_min=cpu_us,
            cpu_us_max=cpu_us,
            backend_cpu_us_per_req=(after.backend_cpu_s - before.backend_cpu_s) / n * 1e6,
            redis_cpu_us_per_req=(after.redis_cpu_s - before.redis_cpu_s) / n * 1e6,
            evalsha_per_req=evalsha / n if system.metering else None,
            round_trips_per_req=round_trips,
            mean_batch=mean_batch,
            errors=errors,
            units_expected=sum(expected.values()),
            units_charged=used,
            check_ok=not problems,
            problems=problems,
            loadavg=loadavg,
            cpu_limit=system.cpu_limit,
            throttled=throttled,
            balance=system.balance,
        )


def _remove(limit: cpu_limit.CpuLimit) -> None:
    """A group that cannot be removed is reported, not fatal: the figures are measured."""
    try:
        limit.close()
    except OSError as exc:
        print(f"bench: could not remove the cgroup {limit.path}: {exc}", file=sys.stderr)


def _served(before: Snapshot, after: Snapshot) -> dict[str, int]:
    delta = {p: after.served.get(p, 0) - before.served.get(p, 0) for p in after.served}
    return {p: n for p, n in delta.items() if n}


_BATCH_LINE = re.compile(r"^metergate_charge_batch_size_(count|sum)(?:\{[^}]*\})? (\S+)$", re.M)


def _batch_histogram(url: str) -> tuple[float | None, float | None]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None, None
    totals: dict[str, float] = {}
    for kind, value in _BATCH_LINE.findall(text):
        totals[kind] = totals.get(kind, 0.0) + float(value)
    return totals.get("count"), totals.get("sum")


def _choose(names: str | None, nproc: int, scaling: bool) -> list[System]:
    defaults = systems.default_systems(nproc)
    by_name = {s.name: s for s in [*defaults, systems.TLS_SYSTEM]}
    if names:
        chosen = []
        for name in (n.strip() for n in names.split(",") if n.strip()):
            workers = re.fullmatch(r"metergate-(\d+)w(-exact)?", name)
            if name in by_name:
                chosen.append(by_name[name])
            elif workers and workers.group(2):
                chosen.append(systems.exact_balance(int(workers.group(1))))
            elif workers:
                chosen.append(systems.metergate(int(workers.group(1))))
            else:
                valid = ", ".join([*by_name, "metergate-<N>w", "metergate-<N>w-exact"])
                raise SystemExit(f"bench: unknown system {name!r}; choose from {valid}")
    else:
        chosen = list(defaults)
    if scaling:
        have = {
            s.workers
            for s in chosen
            if s.kind == "metergate" and s.metering and not s.redis_tls and s.balance == "kernel"
        }
        chosen += [systems.metergate(w) for w in range(1, nproc + 1) if w not in have]
    return chosen


def _curve(cpus_per_worker: float, most: int | None, nproc: int) -> list[System]:
    """Metergate complete at 1..most workers, each worker's share ``cpus_per_worker`` CPUs."""
    if not 0 < cpus_per_worker <= 1:
        raise SystemExit("bench: --cpu-curve takes a share of one CPU, above 0 and at most 1")
    if most is None:
        # One worker per CPU at most, and at most half the machine's CPUs for the gateway:
        # the rest is for the load that drives it.
        most = max(1, min(nproc, int(nproc / 2 / cpus_per_worker + 1e-9)))
    elif most < 1:
        raise SystemExit("bench: --curve-workers must be at least 1")
    return [systems.metergate(w, cpus_per_worker) for w in range(1, most + 1)]


def _machine(wrk_bin: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nginx = systems.find_nginx()
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=systems.ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk_bin,
        "nginx": nginx or "",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,  # the gateway measured, "-dirty" with uncommitted edits
        # Compiled or source: the children inherit this process's environment and files.
        "hot_path": compiled.describe(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds (default 2)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of every system, interleaved; each figure is their median (default 3)",
    )
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument(
        "--new-connections",
        action="store_true",
        help="each request on a new connection (Connection: close): what accepting costs, "
        "as for clients without keep-alive",
    )
    p.add_argument("--accounts", type=int, default=8, help="accounts the load rotates over")
    p.add_argument(
        "--systems",
        help="comma-separated: direct,nginx,yardstick,metergate-off,metergate-1w,"
        "metergate-<N>w,metergate-<N>w-exact (default: these, N = nproc; -exact: with "
        "gateway.balance = exact), metergate-1w-tls (Redis over TLS)",
    )
    p.add_argument(
        "--scaling", action="store_true", help="also metergate complete at workers = 1..nproc"
    )
    p.add_argument(
        "--cpu-curve",
        type=float,
        metavar="CPUS",
        help="also metergate complete at 1..N workers limited to CPUS a worker (a cgroup CPU "
        f"quota, as --cpus gives a container; needs root); 0: not (default {CURVE_CPUS:g} "
        "with the default systems)",
    )
    p.add_argument(
        "--curve-workers",
        type=int,
        metavar="N",
        help="the curve's most workers (default: as many as take half the machine's CPUs)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="give one-process systems CPU 0 to themselves, the load the other CPUs",
    )
    p.add_argument(
        "--json-out", default="bench-results/latest.json", help="where to write the JSON results"
    )
    return p


if __name__ == "__main__":
    sys.exit(main())
