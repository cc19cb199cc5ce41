"""The gateway against a real three-node Redis Cluster on loopback (redis+cluster:// URL)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from gateway import keys
from gateway.embedded_redis import EmbeddedRedisError, find_redis_server
from gateway.errors import QuotaStoreUnavailable
from gateway.redis_client import create_client
from gateway.redis_quota import RedisQuotaStore
from tests.conftest import ROOT, Clock, auth, echo, load_test_config

SLOT_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))
START_TIMEOUT = 30.0
CHARGE_SHA = hashlib.sha1((ROOT / "gateway" / "lua" / "charge.lua").read_bytes()).hexdigest()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(taken: list[int]) -> int:
    """A free port whose cluster bus port (port + 10000, at most 65535) is free too."""
    while True:
        port = random.randint(20000, 55535)
        if port not in taken and _bindable(port) and _bindable(port + 10000):
            return port


def _command(port: int, *args: str | int, timeout: float = 2.0) -> bytes:
    """One command over a raw socket; the first reply line (enough for OK, :n, $len)."""
    parts = [str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        if reply.startswith(b"$"):  # a bulk string: read its body too
            size = int(reply.split(b"\r\n", 1)[0][1:])
            while len(reply.split(b"\r\n", 1)[1]) < size + 2:
                reply += sock.recv(65536)
        return reply


def _wait(check: object, what: str, deadline: float) -> None:
    assert callable(check)
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis cluster: timed out waiting for {what}")
        time.sleep(0.05)


def _answers(port: int) -> bool:
    try:
        return _command(port, "PING", timeout=0.5).startswith(b"+PONG")
    except OSError:
        return False


def _redis_server() -> str:
    try:
        binary = find_redis_server()
    except EmbeddedRedisError as exc:
        pytest.skip(f"no redis-server binary: {exc}")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    if "v=" not in version.stdout:
        pytest.skip(f"{binary} does not report a version: {version.stdout!r}")
    return binary


@contextlib.contextmanager
def _started_cluster(tmp: Path) -> Iterator[tuple[list[int], list[subprocess.Popen[bytes]]]]:
    """Three cluster-enabled redis-servers with all 16384 slots assigned; their ports and
    processes."""
    binary = _redis_server()
    ports: list[int] = []
    for _ in range(3):
        ports.append(_free_port(ports))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            # The process, not a daemon, so teardown can stop exactly what it started.
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled"]
            args += ["yes", "--cluster-config-file", str(tmp / f"nodes-{port}.conf")]
            args += ["--save", "", "--appendonly", "no", "--dir", str(tmp)]
            with (tmp / f"redis-{port}.log").open("wb") as log:
                procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + START_TIMEOUT
        for port, proc in zip(ports, procs, strict=True):
            _wait(lambda p=port, pr=proc: _answers(p) or pr.poll() is not None, "start", deadline)
            if proc.poll() is not None:
                output = (tmp / f"redis-{port}.log").read_text(errors="replace")
                if "cluster" in output.lower() and "directive" in output.lower():
                    pytest.skip(f"{binary} lacks cluster support: {output.strip()[-300:]}")
                raise RuntimeError(f"redis-server on {port} exited: {output[-1000:]}")
        info = _command(ports[0], "INFO", "server")
        if b"redis_mode:" in info and b"redis_mode:cluster" not in info:
            pytest.skip(f"{binary} did not start in cluster mode")
        for port, (first, last) in zip(ports, SLOT_RANGES, strict=True):
            for start in range(first, last + 1, 1000):
                slots = range(start, min(start + 1000, last + 1))
                assert _command(port, "CLUSTER", "ADDSLOTS", *slots).startswith(b"+OK")
        # Every pair meets directly: learning of a node only by gossip, or after a lost
        # handshake, sometimes took the cluster past START_TIMEOUT to agree.
        for i, port in enumerate(ports):
            for other in ports[i + 1 :]:
                assert _command(port, "CLUSTER", "MEET", "127.0.0.1", other).startswith(b"+OK")

        def ok() -> bool:
            return all(b"cluster_state:ok" in _command(p, "CLUSTER", "INFO") for p in ports)

        _wait(ok, "cluster_state:ok", deadline)
        yield ports, procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three cluster-enabled redis-servers with all 16384 slots assigned; their ports."""
    with _started_cluster(tmp_path_factory.mktemp("cluster")) as (ports, _):
        yield ports


@pytest.fixture
async def cluster_client(cluster: list[int]) -> AsyncIterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster[0])
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()


def _flush_scripts(cluster: list[int]) -> None:
    for port in cluster:
        assert _command(port, "SCRIPT", "FLUSH").startswith(b"+OK")


def _url(cluster: list[int]) -> str:
    return f"redis+cluster://127.0.0.1:{cluster[0]}"


def _port_of(client: RedisCluster, account: str) -> int:
    node = client.get_node_from_key(keys.usage_key(account))
    assert node is not None
    return int(node.port)


def _spread(client: RedisCluster, count_per_node: int) -> list[str]:
    """Accounts whose keys land on every node, count_per_node on each."""
    found: dict[int, list[str]] = {}
    n = 0
    while len(found) < 3 or any(len(v) < count_per_node for v in found.values()):
        account = f"acct-{n}"
        n += 1
        owners = found.setdefault(_port_of(client, account), [])
        if len(owners) < count_per_node:
            owners.append(account)
    return [a for accounts in found.values() for a in accounts]


async def _used(client: RedisCluster, account: str) -> int:
    raw = await client.hget(keys.usage_key(account), "used")
    return int(raw or 0)


async def _gateway(start_upstream: Any, start_gateway: Any, url: str) -> TestServer:
    upstream: TestServer = await start_upstream({"/{tail:.*}": echo})
    config = load_test_config(str(upstream.make_url("")))
    server: TestServer = await start_gateway(config, url=url)
    return server


async def test_free_tier_stops_at_exactly_100_on_every_node(
    cluster: list[int], cluster_client: RedisCluster, start_upstream, start_gateway
) -> None:
    gateway = await _gateway(start_upstream, start_gateway, _url(cluster))
    accounts = _spread(cluster_client, 1)
    assert {_port_of(cluster_client, a) for a in accounts} == set(cluster)

    async with aiohttp.ClientSession() as session:

        async def hit(account: str) -> int:
            async with session.get(gateway.make_url("/signals"), headers=auth(account)) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(hit(a) for a in accounts for _ in range(150)))
    for i, account in enumerate(accounts):
        mine = statuses[i * 150 : (i + 1) * 150]
        assert mine.count(200) == 100, (account, sorted(set(mine)))
        assert mine.count(429) == 50
        assert await _used(cluster_client, account) == 100
    # Each account's keys live on its own node; the others redirect (raw socket: no client
    # that would follow the MOVED).
    for account in accounts:
        port = _port_of(cluster_client, account)
        for other in cluster:
            reply = _command(other, "EXISTS", keys.usage_key(account))
            assert reply.startswith(b":1" if other == port else b"-MOVED"), (other, reply)


async def test_refund_on_503_and_noscript_recovery(
    cluster: list[int], cluster_client: RedisCluster, start_upstream, start_gateway
) -> None:
    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503)

    upstream: TestServer = await start_upstream(
        {"/signals/history/{symbol}": unavailable, "/{tail:.*}": echo}
    )
    config = load_test_config(str(upstream.make_url("")))
    gateway: TestServer = await start_gateway(config, url=_url(cluster))
    accounts = _spread(cluster_client, 1)

    async with aiohttp.ClientSession() as session:

        async def get(account: str, path: str) -> int:
            async with session.get(gateway.make_url(path), headers=auth(account)) as r:
                await r.read()
                return r.status

        # Refunded: the backend could not answer, so nothing stays charged.
        assert await asyncio.gather(*(get(a, "/signals/history/X") for a in accounts)) == [503] * 3
        assert [await _used(cluster_client, a) for a in accounts] == [0, 0, 0]

        # Every node forgets the scripts; the next charge on each reloads and runs once.
        _flush_scripts(cluster)
        assert await cluster_client.script_exists(CHARGE_SHA) == [False]
        assert await asyncio.gather(*(get(a, "/signals") for a in accounts)) == [200] * 3
        assert [await _used(cluster_client, a) for a in accounts] == [1, 1, 1]
        # Reloaded on each node that answered NOSCRIPT: here, every primary.
        assert await cluster_client.script_exists(CHARGE_SHA) == [True]

        # One alone, after another flush, is reloaded and run once too.
        _flush_scripts(cluster)
        assert await get(accounts[0], "/export/csv") == 200
        assert await _used(cluster_client, accounts[0]) == 4


async def test_paid_plan_written_through_the_cluster_is_honoured(
    cluster: list[int],
    cluster_client: RedisCluster,
    start_upstream,
    start_gateway,
    clock: Clock,
) -> None:
    gateway = await _gateway(start_upstream, start_gateway, _url(cluster))
    now = int(clock.now)
    await cluster_client.hset(
        keys.plan_key("acct-pro"),
        mapping={
            "tier": "pro",
            "status": "active",
            "period_start": now - 86400,
            "period_end": now + 86400 * 20,
        },
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.make_url("/signals"), headers=auth("acct-pro")) as r,
    ):
        assert r.status == 200
        assert "q=10000" in r.headers["RateLimit-Policy"]
    assert await _used(cluster_client, "acct-pro") == 1


async def test_readyz_and_the_client_factory(
    cluster: list[int], start_upstream, start_gateway
) -> None:
    gateway = await _gateway(start_upstream, start_gateway, _url(cluster))
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.make_url("/readyz")) as r,
    ):
        assert r.status == 200
        assert (await r.json())["redis"] is True
    client = create_client(_url(cluster), timeout=1.0)
    assert isinstance(client, RedisCluster)
    assert client.retry.get_retries() == 0
    try:
        with pytest.raises(NoScriptError):
            await client.evalsha("0" * 40, 1, "mg:{x}:usage")
    finally:
        await client.aclose()


async def test_a_node_down_fails_its_own_charges_and_not_the_others(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """One batch across the nodes, one of them stopped: its charge gets its 503 unsent,
    the others are decided and applied, and nothing is reported as perhaps charged."""
    with _started_cluster(tmp_path) as (ports, procs):
        client = create_client(f"redis+cluster://127.0.0.1:{ports[0]}", timeout=0.5)
        config = load_test_config("http://127.0.0.1:9")
        store = RedisQuotaStore(client, config, clock=clock)
        try:
            assert isinstance(client, RedisCluster)
            await client.initialize()
            # The stopped node is not the one the client learnt the cluster from: no
            # connection to it was made before, so its charge is refused at connect. The
            # scripts are loaded beside the client, which would connect to every node.
            source = (ROOT / "gateway" / "lua" / "charge.lua").read_text()
            for port in ports:
                assert _command(port, "SCRIPT", "LOAD", source).startswith(b"$40")
            accounts = sorted(_spread(client, 1), key=lambda a: _port_of(client, a) != ports[0])
            procs[ports.index(_port_of(client, accounts[2]))].kill()
            procs[ports.index(_port_of(client, accounts[2]))].wait()
            unknown = _abandoned("unknown")
            outcomes = await asyncio.gather(
                *(store.charge(a, "/signals", 1) for a in accounts), return_exceptions=True
            )
            assert [getattr(d, "used", None) for d in outcomes[:2]] == [1, 1]
            assert isinstance(outcomes[2], QuotaStoreUnavailable)
            assert _abandoned("unknown") == unknown
            assert [await _used(client, a) for a in accounts[:2]] == [1, 1]
            # Logged as an outage, though other nodes answered the same batch.
            assert "redis unavailable, charges fail until it is back" in caplog.text
        finally:
            await store.aclose()
            await client.aclose()


async def test_scripts_are_reloaded_on_the_nodes_that_lack_them_while_another_is_down(
    tmp_path: Path, clock: Clock
) -> None:
    """No node has the scripts yet (a new cluster, or after SCRIPT FLUSH) and one node is
    down: the charges of the nodes that answer NOSCRIPT are loaded there and run once;
    asking every primary would fail on the one that is down, and them with it."""
    with _started_cluster(tmp_path) as (ports, procs):
        client = create_client(f"redis+cluster://127.0.0.1:{ports[0]}", timeout=0.5)
        store = RedisQuotaStore(client, load_test_config("http://127.0.0.1:9"), clock=clock)
        try:
            assert isinstance(client, RedisCluster)
            await client.initialize()
            accounts = sorted(_spread(client, 1), key=lambda a: _port_of(client, a) != ports[0])
            down = procs[ports.index(_port_of(client, accounts[2]))]
            down.kill()
            down.wait()
            outcomes = await asyncio.gather(
                *(store.charge(a, "/signals", 1) for a in accounts), return_exceptions=True
            )
            assert [getattr(d, "used", None) for d in outcomes[:2]] == [1, 1], outcomes
            assert isinstance(outcomes[2], QuotaStoreUnavailable)
            assert [await _used(client, a) for a in accounts[:2]] == [1, 1]
            for account in accounts[:2]:
                reply = _command(_port_of(client, account), "SCRIPT", "EXISTS", CHARGE_SHA)
                assert reply == b"*1\r\n:1\r\n"
        finally:
            await store.aclose()
            await client.aclose()


def _abandoned(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("metergate_abandoned_charges_total", labels) or 0.0
