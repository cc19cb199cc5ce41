"""The raw Redis pipeline: batches, FIFO replies, connection loss, AUTH and SELECT, real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
import uvloop
from prometheus_client import REGISTRY

from gateway import keys, redis_quota
from gateway.embedded_redis import EmbeddedRedis, find_redis_server
from gateway.errors import QuotaStoreUnavailable
from gateway.periods import calendar_month
from gateway.redis_client import create_redis
from gateway.redis_pipe import LOST, Call, RedisPipe, Script, supports
from gateway.redis_quota import RedisQuotaStore
from gateway.resp import command
from tests.conftest import Clock, load_test_config, replace_section

PASSWORD = "s3cret pass"


class Server:
    """A redis-server of this test's own, with whatever options the test needs."""

    def __init__(self, data_dir: Path, *options: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.socket_path = str(data_dir / "redis.sock")
        self.args = [
            find_redis_server(),
            "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(data_dir),
            "--save", "", "--appendonly", "no", "--unixsocket", self.socket_path,
            *options,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
            self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    box = Server(tmp_path)
    box.start()
    yield box
    box.stop()


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[Server]:
    box = Server(tmp_path, "--requirepass", PASSWORD)
    box.start()
    yield box
    box.stop()


@pytest.fixture
async def pipe(server: Server) -> AsyncIterator[RedisPipe]:
    client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
    pipe = RedisPipe(client, timeout=1.0)
    yield pipe
    await pipe.aclose()
    await client.aclose()


def _calls(*commands: bytes) -> list[Call]:
    loop = asyncio.get_running_loop()
    return [Call(loop.create_future(), c) for c in commands]


async def _results(calls: list[Call]) -> list[Any]:
    return await asyncio.gather(*(c.future for c in calls if c.future), return_exceptions=True)


async def test_a_batch_is_answered_in_order(pipe: RedisPipe) -> None:
    calls = _calls(*(command("INCRBY", "counter", i) for i in range(1, 201)))
    pipe.send(calls)
    assert await _results(calls) == [i * (i + 1) // 2 for i in range(1, 201)]


async def test_an_error_reply_fails_its_call_only(pipe: RedisPipe) -> None:
    calls = _calls(
        command("SET", "text", "abc"),
        command("INCR", "text"),
        command("ECHO", "after"),
    )
    pipe.send(calls)
    ok, error, after = await _results(calls)
    assert (ok, after) == (b"OK", b"after")
    assert isinstance(error, QuotaStoreUnavailable)
    assert "not an integer" in str(error)


async def test_closing_waits_for_calls_written_while_it_waits(server: Server) -> None:
    client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
    pipe = RedisPipe(client, timeout=1.0)
    try:
        first = _calls(command("ECHO", "first"))
        pipe.send(first)
        await _results(first)  # connected
        slow = _calls(command("BLPOP", "never-filled", "0.05"))  # answers after 50 ms
        pipe.send(slow)
        closing = asyncio.ensure_future(pipe.aclose())
        await asyncio.sleep(0.01)  # aclose is waiting for the slow call
        late = _calls(command("BLPOP", "never-filled", "0.05"))  # answered after the first
        pipe.send(late)
        await asyncio.wait_for(closing, 2)
        assert late[0].future is not None and late[0].future.done()  # not left waiting
        assert late[0].future.result() is None  # BLPOP's timeout: a nil reply
    finally:
        await client.aclose()


async def test_scripts_are_loaded_on_connecting_ahead_of_the_first_calls(
    server: Server,
) -> None:
    client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
    await client.script_flush()
    script = Script(b"return 'loaded'", hashlib.sha1(b"return 'loaded'").hexdigest())
    pipe = RedisPipe(client, timeout=1.0, scripts=[script])
    try:
        calls = _calls(command("SCRIPT", "EXISTS", script.sha))
        pipe.send(calls)
        assert await _results(calls) == [[1]]
    finally:
        await pipe.aclose()
        await client.aclose()


async def test_batches_sent_back_to_back_keep_their_replies(pipe: RedisPipe) -> None:
    batches = [_calls(*(command("ECHO", f"{b}-{i}") for i in range(b + 1))) for b in range(30)]
    for batch in batches:
        pipe.send(batch)
    for b, batch in enumerate(batches):
        assert await _results(batch) == [f"{b}-{i}".encode() for i in range(b + 1)]


async def test_connection_lost_mid_batch_fails_the_rest_and_never_resends(
    pipe: RedisPipe, server: Server
) -> None:
    # Redis closes the connection in the middle of the batch (QUIT): the INCR before it
    # ran, the one after it never did, and must not be sent again on a new connection.
    calls = _calls(command("INCR", "k"), command("QUIT"), command("INCR", "k"))
    pipe.send(calls)
    first, _quit, last = await _results(calls)
    assert first == 1
    assert isinstance(last, QuotaStoreUnavailable)
    (after,) = _calls(command("GET", "k"))
    pipe.send([after])
    assert await after.future == b"1"  # type: ignore[misc]


async def test_a_stopped_server_fails_fast_and_the_next_call_reconnects(
    pipe: RedisPipe, server: Server
) -> None:
    warm = _calls(command("PING"))
    pipe.send(warm)
    assert await _results(warm) == [b"PONG"]
    server.stop()
    started = time.monotonic()
    down = _calls(command("PING"), command("PING"))
    pipe.send(down)
    assert all(isinstance(r, QuotaStoreUnavailable) for r in await _results(down))
    assert time.monotonic() - started < 1.0
    server.start()
    back = _calls(command("PING"))
    pipe.send(back)
    assert await _results(back) == [b"PONG"]


async def test_a_server_that_does_not_answer_times_out_the_batch(
    pipe: RedisPipe, server: Server
) -> None:
    pipe.send(warm := _calls(command("PING")))
    await _results(warm)
    other = redis.Redis(port=server.port)
    try:
        await other.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        started = time.monotonic()
        pipe.send(slow := _calls(command("INCR", "paused")))
        (result,) = await _results(slow)
        assert isinstance(result, QuotaStoreUnavailable)
        assert 0.9 < time.monotonic() - started < 1.4
        await other.execute_command("CLIENT", "UNPAUSE")
    finally:
        await other.aclose()


async def test_password_and_database_from_the_url(protected: Server, clock: Clock) -> None:
    url = f"redis://:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{protected.port}/3"
    client = create_redis(url, timeout=1.0)
    assert supports(client)
    store = RedisQuotaStore(client, load_test_config("http://127.0.0.1:9"), clock=clock)
    try:
        decisions = await asyncio.gather(
            *(store.charge("acct-auth", "/signals", 1) for _ in range(5))
        )
        assert [d.used for d in sorted(decisions, key=lambda d: d.used)] == [1, 2, 3, 4, 5]
    finally:
        await store.aclose()
        await client.aclose()
    check = redis.Redis(port=protected.port, password=PASSWORD, db=3)
    try:
        assert await check.hget(keys.usage_key("acct-auth"), "used") == b"5"
        await check.select(0)  # type: ignore[no-untyped-call]
        assert await check.dbsize() == 0
    finally:
        await check.aclose()


async def test_a_username_and_password_log_in_with_acl_auth(protected: Server) -> None:
    client = create_redis(f"redis://default:{PASSWORD}@127.0.0.1:{protected.port}", timeout=1.0)
    pipe = RedisPipe(client, timeout=1.0)
    try:
        pipe.send(calls := _calls(command("PING")))
        assert await _results(calls) == [b"PONG"]
    finally:
        await pipe.aclose()
        await client.aclose()


async def _unavailable_at_once(url: str) -> None:
    """A call through a pipe to ``url`` fails with QuotaStoreUnavailable, and fast."""
    client = create_redis(url, timeout=1.0)
    pipe = RedisPipe(client, timeout=1.0)
    try:
        started = time.monotonic()
        pipe.send(calls := _calls(command("PING")))
        (result,) = await _results(calls)
        assert isinstance(result, QuotaStoreUnavailable)
        assert time.monotonic() - started < 0.5
    finally:
        await pipe.aclose()
        await client.aclose()


async def test_a_wrong_password_is_unavailable_not_a_hang(protected: Server) -> None:
    await _unavailable_at_once(f"redis://:wrong@127.0.0.1:{protected.port}")


async def test_a_unix_socket_url(server: Server, clock: Clock) -> None:
    client = create_redis(f"unix://{server.socket_path}?db=2", timeout=1.0)
    assert supports(client)
    store = RedisQuotaStore(client, load_test_config("http://127.0.0.1:9"), clock=clock)
    try:
        assert (await store.charge("acct-unix", "/export/pdf", 5)).used == 5
    finally:
        await store.aclose()
        await client.aclose()


def test_a_batch_on_uvloop(server: Server) -> None:
    async def main() -> list[Any]:
        client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
        pipe = RedisPipe(client, timeout=1.0)
        try:
            pipe.send(calls := _calls(command("PING"), command("ECHO", "uv")))
            return await _results(calls)
        finally:
            await pipe.aclose()
            await client.aclose()

    assert uvloop.run(main()) == [b"PONG", b"uv"]


def test_tls_urls_take_the_pipeline_resp3_does_not() -> None:
    assert supports(redis.Redis.from_url("rediss://127.0.0.1:6380/0"))
    assert not supports(redis.Redis.from_url("redis://127.0.0.1:6379/0", protocol=3))
    assert not supports(redis.Redis.from_url("rediss://127.0.0.1:6380/0", protocol=3))


async def test_over_tls_a_batch_is_answered_and_the_connection_goes_back_to_redis_py(
    tls_redis: EmbeddedRedis,
) -> None:
    client = create_redis(tls_redis.tls_url(), timeout=1.0)
    pipe = RedisPipe(client, timeout=1.0)
    try:
        calls = _calls(*(command("INCRBY", "tls-counter", i) for i in range(1, 201)))
        pipe.send(calls)
        assert await _results(calls) == [i * (i + 1) // 2 for i in range(1, 201)]
        await pipe.aclose()
        # The TLS connection went back to the pool in working order and is reused.
        assert await client.getdel("tls-counter") == b"20100"
        assert len(client.connection_pool._available_connections) == 1
    finally:
        await client.aclose()


def test_over_tls_on_asyncio_s_own_loop(tls_redis: EmbeddedRedis) -> None:
    # The suite runs on uvloop; asyncio's own TLS transport is another implementation.
    async def main() -> list[Any]:
        client = create_redis(tls_redis.tls_url(), timeout=1.0)
        pipe = RedisPipe(client, timeout=1.0)
        try:
            pipe.send(calls := _calls(command("PING"), command("ECHO", "asyncio")))
            results = await _results(calls)
            await pipe.aclose()
            return [*results, await client.echo("after")]  # handed back, in working order
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        assert runner.run(main()) == [b"PONG", b"asyncio", b"after"]


async def test_over_tls_an_untrusted_server_is_unavailable_not_a_hang(
    tls_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # Without ssl_ca_certs the system's CAs do not know the server's: its certificate fails.
    await _unavailable_at_once(f"rediss://127.0.0.1:{tls_redis.tls_port}/0")
    (warning,) = _outage_logs(caplog)
    assert "CERTIFICATE_VERIFY_FAILED" in warning  # the operator is told why


def _outage_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.redis"]


async def test_an_outage_is_logged_once_with_its_cause_and_its_end(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
    pipe = RedisPipe(client, timeout=1.0)
    try:
        server.stop()
        for _ in range(3):  # every request's charge fails; the log says it once
            pipe.send(calls := _calls(command("PING")))
            (result,) = await _results(calls)
            assert isinstance(result, QuotaStoreUnavailable)
        (down,) = _outage_logs(caplog)
        assert down.startswith("redis unavailable, charges fail") and "refused" in down
        server.start()
        pipe.send(calls := _calls(command("PING")))
        assert await _results(calls) == [b"PONG"]
        assert _outage_logs(caplog) == [down, "redis is back"]
    finally:
        await pipe.aclose()
        await client.aclose()


async def test_through_redis_py_an_outage_is_logged_once_too(
    server: Server, clock: Clock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(redis_quota, "RAW_PIPELINE", False)  # as for a cluster
    client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
    store = RedisQuotaStore(client, load_test_config("http://127.0.0.1:9"), clock=clock)
    try:
        server.stop()
        for _ in range(3):
            with pytest.raises(QuotaStoreUnavailable):
                await store.charge("acct-outage", "/signals", 1)
        (down,) = _outage_logs(caplog)
        assert down.startswith("redis unavailable, charges fail") and "refused" in down
        server.start()
        assert (await store.charge("acct-outage", "/signals", 1)).used == 1
        assert _outage_logs(caplog) == [down, "redis is back"]
    finally:
        await store.aclose()
        await client.aclose()


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "one-by-one"])
async def test_charges_are_written_once_per_loop_iteration_unless_told_otherwise(
    coalesce: bool, redis_url: str, redis_client: redis.Redis, clock: Clock
) -> None:
    config = replace_section(
        load_test_config("http://127.0.0.1:9"), metering={"coalesce": coalesce}
    )
    client = create_redis(redis_url, timeout=2.0)
    batches: list[int] = []
    store = RedisQuotaStore(client, config, clock=clock, on_batch=batches.append)
    try:
        decisions = await asyncio.gather(
            *(store.charge(f"acct-b{i % 4}", "/signals", 1) for i in range(440))
        )
    finally:
        await store.aclose()
        await client.aclose()
    assert batches == ([440] if coalesce else [1] * 440)
    assert sum(d.allowed for d in decisions) == 400  # 4 free accounts x 100 units
    for i in range(4):
        assert await redis_client.hget(keys.usage_key(f"acct-b{i}"), "used") == b"100"


async def test_the_connection_goes_back_to_the_clients_pool(server: Server, clock: Clock) -> None:
    client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0, max_connections=1)
    store = RedisQuotaStore(client, load_test_config("http://127.0.0.1:9"), clock=clock)
    try:
        assert (await store.charge("acct-pool", "/signals", 1)).used == 1
        await store.aclose()
        # The only connection of the pool served the pipeline; redis-py can use it again.
        assert await client.hget(keys.usage_key("acct-pool"), "used") == b"1"
    finally:
        await client.aclose()


async def test_closing_the_client_closes_a_store_never_closed(server: Server, clock: Clock) -> None:
    client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
    store = RedisQuotaStore(client, load_test_config("http://127.0.0.1:9"), clock=clock)
    assert (await store.charge("acct-left", "/signals", 1)).used == 1
    await client.aclose()  # no unclosed transport is left behind (warnings are errors)
    await asyncio.sleep(0.01)
    gc.collect()


async def test_a_batch_of_charges_is_encoded_exactly_as_redis_py_encodes_it() -> None:
    from redis.connection import Connection

    config = load_test_config("http://127.0.0.1:9")
    store = RedisQuotaStore(redis.Redis(), config)
    now, day = 1_790_000_000.123, "2026-09-21"
    charges = [
        ("acct-é", "/signals/history/{symbol}", 2, ""),
        ("acct-2", "/signals", 1, ",pro,enterprise,"),
        ("acct-é", "/signals", 1, ""),
    ]
    billing = config.billing
    args = (
        "EVALSHA", store._charge_sha, keys.CHARGE_KEYS * len(charges),
        *(k for account, *_ in charges for k in keys.account_keys(account, day)),
        int(now * 1000), store._tiers, *calendar_month(now),
        billing.daily_usage_ttl_seconds, billing.past_due_grace_seconds,
        *(a for _, route, cost, allowed in charges for a in (cost, route, allowed)),
    )  # fmt: skip
    expected = b"".join(Connection().pack_command(*args))
    future = asyncio.get_running_loop().create_future()
    for _ in range(2):  # built, then from the caches
        batch = [
            redis_quota._Charge(
                account, route, cost, store._route_args(route, cost, allowed), future
            )
            for account, route, cost, allowed in charges
        ]
        assert store._charge_call(batch, now) == (expected, day, batch)


@contextlib.asynccontextmanager
async def _paused(server: Server, ms: int, **pipe_options: Any) -> AsyncIterator[RedisPipe]:
    """A pipe, connected, to a server then paused for ``ms`` (its commands wait unanswered)."""
    client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
    pipe = RedisPipe(client, **pipe_options)
    other = redis.Redis(port=server.port)
    try:
        pipe.send(warm := _calls(command("PING")))
        await _results(warm)
        await other.execute_command("CLIENT", "PAUSE", ms, "ALL")
        yield pipe
    finally:
        with contextlib.suppress(redis.RedisError):
            await other.execute_command("CLIENT", "UNPAUSE")
        await pipe.aclose()
        await client.aclose()
        await other.aclose()


async def test_a_timed_out_call_is_told_its_late_reply(server: Server) -> None:
    async with _paused(server, 600, timeout=0.2) as pipe:
        told: list[Any] = []
        loop = asyncio.get_running_loop()
        late = [Call(loop.create_future(), command("INCR", "late"), late=told.append)]
        started = time.monotonic()
        pipe.send(late)
        (result,) = await _results(late)
        assert isinstance(result, QuotaStoreUnavailable)  # the caller does not wait ...
        assert time.monotonic() - started < 0.5
        async with asyncio.timeout(2):  # ... the connection does, far less than its window
            await pipe.drained()
        assert told == [1]  # Redis ran it once released
        pipe.send(after := _calls(command("INCR", "late")))  # the pipe goes on as before
        assert await _results(after) == [2]


async def test_a_timed_out_call_whose_connection_ends_is_told_lost(
    server: Server, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    client = create_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
    config = replace_section(
        load_test_config("http://127.0.0.1:9"), metering={"redis_timeout_seconds": 0.2}
    )
    store = RedisQuotaStore(client, config, clock=clock)
    other = redis.Redis(port=server.port)
    unknown = REGISTRY.get_sample_value("metergate_abandoned_charges_total", {"outcome": "unknown"})
    try:
        await store.charge("acct-lost", "/signals", 1)  # connected
        await other.execute_command("CLIENT", "PAUSE", 5000, "ALL")
        outcomes = await asyncio.gather(  # one script call: three charges, two accounts
            store.charge("acct-lost", "/signals", 2),
            store.charge("acct-lost", "/signals", 2),
            store.charge('a "quoted", spaced id', "/export/pdf", 5),
            return_exceptions=True,
        )
        assert all(isinstance(o, QuotaStoreUnavailable) for o in outcomes)
        assert server.proc is not None
        server.proc.kill()  # the server dies with the charges unanswered
        server.proc.wait()
        server.proc = None
        async with asyncio.timeout(5):
            await store.aclose()
    finally:
        await client.aclose()
        await other.aclose()
    after = REGISTRY.get_sample_value("metergate_abandoned_charges_total", {"outcome": "unknown"})
    assert (after or 0.0) == (unknown or 0.0) + 3
    (line,) = [r.getMessage() for r in caplog.records if "no reply from Redis" in r.getMessage()]
    assert line.startswith("no reply from Redis to 3 charges; they may have been")
    listed = json.loads(line.partition("(units by account and route): ")[2])
    assert listed == [["acct-lost", "/signals", 4], ['a "quoted", spaced id', "/export/pdf", 5]]


async def test_a_late_reply_past_the_window_is_told_lost_and_a_bad_hook_harms_no_other(
    server: Server,
) -> None:
    async with _paused(server, 1500, timeout=0.1, late_window=0.3) as pipe:
        told: list[Any] = []

        def broken(reply: Any) -> None:
            raise RuntimeError("a bug in a hook")

        loop = asyncio.get_running_loop()
        calls = [
            Call(loop.create_future(), command("INCR", "slow"), late=broken),
            Call(loop.create_future(), command("INCR", "slow"), late=told.append),
        ]
        pipe.send(calls)
        await _results(calls)
        with pytest.raises(TimeoutError):  # a waiter that gives up leaves the pipe intact
            async with asyncio.timeout(0.05):
                await pipe.drained()
        async with asyncio.timeout(2):
            await pipe.drained()  # the window ended before Redis answered
        assert told == [LOST]
