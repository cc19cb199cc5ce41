"""What a measuring tool starts before the system it measures: a private Redis with the
benchmark's plans, the minimal backend, and wrk's script with their tokens."""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import redis

from gateway.auth import issue_token
from gateway.embedded_redis import EmbeddedRedis
from loadtests import systems, wrk
from loadtests.bench import BENCH_PATHS, write_plans
from loadtests.procs import Child, free_port, wait_http


@contextlib.contextmanager
def stage(work: Path, accounts: int = 8) -> Iterator[tuple[systems.Environment, Path]]:
    """The environment systems start against, and the wrk script that loads them."""
    with EmbeddedRedis(work / "redis", persistent=False) as server:
        backend_port = free_port()
        backend = Child(
            "backend",
            [sys.executable, "-m", "loadtests.backend", str(backend_port)],
            work,
            cwd=systems.ROOT,
        )
        try:
            wait_http(backend_port, "/__bench/stats")
            env = systems.Environment(backend_port, server.url, secrets.token_hex(32), work)
            names = [f"load-{i}" for i in range(accounts)]
            write_plans(redis.Redis.from_url(server.url), names)
            script = work / "load.lua"
            tokens = [issue_token(env.secret, a, ttl=3600) for a in names]
            wrk.write_script(script, BENCH_PATHS, tokens)
            yield env, script
        finally:
            backend.stop()
