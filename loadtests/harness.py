"""What a measuring tool starts before the systems it measures: a private Redis, the
minimal backend, the benchmark's plans, and wrk's script with their tokens."""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis

from gateway import keys
from gateway.auth import issue_token
from gateway.embedded_redis import EmbeddedRedis, TlsFiles
from loadtests import systems, wrk
from loadtests.procs import Child, free_port, wait_http

# One request of each priced route in turn; the backend answers all of them alike.
BENCH_PATHS = ("/signals", "/signals/history/AAPL", "/export/csv", "/export/pdf")


@contextlib.contextmanager
def services(
    work: Path, tls: TlsFiles | None = None
) -> Iterator[tuple[systems.Environment, Child]]:
    """A private Redis (also over TLS when ``tls`` is given) and the backend; the
    environment systems start against, and the backend's process."""
    with EmbeddedRedis(work / "redis", persistent=False, tls=tls) as server:
        backend_port = free_port()
        backend = Child(
            "backend",
            [sys.executable, "-m", "loadtests.backend", str(backend_port)],
            work,
            cwd=systems.ROOT,
        )
        try:
            wait_http(backend_port, "/__bench/stats")
            yield (
                systems.Environment(
                    backend_port,
                    server.url,
                    secrets.token_hex(32),
                    work,
                    redis_tls_url=server.tls_url() if tls is not None else "",
                ),
                backend,
            )
        finally:
            backend.stop()


@contextlib.contextmanager
def stage(
    work: Path, accounts: int = 8, *, close: bool = False
) -> Iterator[tuple[systems.Environment, Path]]:
    """services(), with plans for ``accounts`` accounts and the wrk script that loads them
    (``close``: a connection per request)."""
    with services(work) as (env, _):
        names = [f"load-{i}" for i in range(accounts)]
        with redis.Redis.from_url(env.redis_url) as client:
            write_plans(client, names)
        script = work / "load.lua"
        tokens = [issue_token(env.secret, a, ttl=3600) for a in names]
        wrk.write_script(script, BENCH_PATHS, tokens, close=close)
        yield env, script


def write_plans(client: redis.Redis, accounts: Sequence[str]) -> None:
    """Enterprise, active, a period around now: overage keeps every request allowed."""
    now = int(time.time())
    pipe = client.pipeline(transaction=False)
    for account in accounts:
        pipe.hset(
            keys.plan_key(account),
            mapping={
                "tier": "enterprise",
                "status": "active",
                "period_start": now - 86400,
                "period_end": now + 30 * 86400,
                "updated_at": now,
            },
        )
    pipe.execute()
