"""The real entry points: `metergate up` and `metergate gateway` with several workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis

from gateway import compiled
from gateway.embedded_redis import EmbeddedRedis
from gateway.metrics import CONNECTIONS_SAMPLE_SECONDS, FLUSH_SECONDS
from tests.conftest import ROOT, SECRET, TEST_DB, auth, echo

METERGATE = str(Path(sys.executable).with_name("metergate"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERGATE_", "STRIPE_"))}
    if compiled.PURE_ENV in os.environ:  # PURE=1 make test: the commands run the source too
        env[compiled.PURE_ENV] = os.environ[compiled.PURE_ENV]
    env["METERGATE_CONFIG"] = str(ROOT / "gateway.toml")
    env.update(extra)
    return env


async def _wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[int, str]:
    """Signal the process, wait for it, close its pipes; returns (exit code, stderr)."""
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, stderr


async def test_up_runs_everything_and_stops_cleanly(tmp_path: Path) -> None:
    gw, admin, backend = _free_port(), _free_port(), _free_port()
    env = _env(
        METERGATE_GATEWAY_LISTEN=f"127.0.0.1:{gw}",
        METERGATE_ADMIN_LISTEN=f"127.0.0.1:{admin}",
        METERGATE_UPSTREAM_URL=f"http://127.0.0.1:{backend}",
    )
    proc = subprocess.Popen(
        [METERGATE, "up", "--data-dir", str(tmp_path / "var")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        output = "".join(lines)
        curl = re.search(r"curl -i -H 'Authorization: Bearer (\S+)' (\S+)", output)
        assert curl, output
        # How the hot path runs, as the process itself chose (compiled under make test).
        assert f"  hot path      {compiled.describe()}\n" in output
        token, url = curl.groups()
        assert url == f"http://127.0.0.1:{gw}/signals"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
                assert (await resp.json())["signals"]
                assert resp.headers["RateLimit"].startswith('"monthly";r=99;')
            for path, kind in [("/export/csv", "text/csv"), ("/export/pdf", "application/pdf")]:
                async with session.get(
                    f"http://127.0.0.1:{gw}{path}", headers={"Authorization": f"Bearer {token}"}
                ) as resp:
                    assert resp.status == 200
                    assert resp.content_type == kind
            async with session.get(f"http://127.0.0.1:{gw}/readyz") as resp:
                assert resp.status == 200
            # The admin app answers through the gateway on its moved port.
            async with session.get(f"http://127.0.0.1:{gw}/pricing") as resp:
                assert resp.status == 200
                pricing = await resp.json()
                assert pricing["mode"] == "local"
            subscribe = {"tier": "pro", "payment_method_id": "pm_card_visa"}
            async with session.post(
                f"http://127.0.0.1:{gw}/billing/subscribe",
                json=subscribe,
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status in (200, 201), await resp.text()
            async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
                assert resp.headers["RateLimit-Policy"].startswith('"monthly";q=10000;')
    finally:
        code, stderr = _stop(proc)
    assert code == 0, stderr
    assert "DEVELOPMENT secret" in stderr
    assert "Traceback" not in stderr
    # The embedded Redis kept its data append-only under the data dir.
    assert any((tmp_path / "var" / "redis").rglob("*.aof*"))


def _two_workers(
    upstream_url: str, redis_url: str, **env: str
) -> tuple[subprocess.Popen[str], int]:
    """`metergate gateway` with two workers in front of the upstream; its process and port."""
    port = _free_port()
    settings = _env(
        METERGATE_GATEWAY_LISTEN=f"127.0.0.1:{port}",
        METERGATE_GATEWAY_WORKERS="2",
        METERGATE_REDIS_URL=redis_url,
        METERGATE_JWT_SECRET=SECRET,
        METERGATE_UPSTREAM_URL=upstream_url.rstrip("/"),
        **env,
    )
    proc = subprocess.Popen(
        [METERGATE, "gateway"],
        env=settings,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, port


@pytest.mark.slow
async def test_gateway_workers_share_port_and_metrics(
    redis_url: str, redis_client: redis.Redis, start_upstream
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    proc, port = _two_workers(str(upstream.make_url("")), redis_url)
    try:
        base = f"http://127.0.0.1:{port}"
        await _wait_http(base + "/healthz")
        sent = 60
        # A fresh connection per request, so the kernel spreads them over both workers.
        for _ in range(sent):
            async with aiohttp.ClientSession() as session:
                async with session.get(base + "/signals", headers=auth("acct-workers")) as resp:
                    assert resp.status == 200
        used = int(await redis_client.hget("mg:{acct-workers}:usage", "used") or 0)
        assert used == sent
        # Whichever worker answers the scrape, it reports all workers' samples: the other
        # worker's as of its last write, at most metrics.FLUSH_SECONDS ago.
        await asyncio.sleep(FLUSH_SECONDS + 0.2)
        for _ in range(4):
            async with aiohttp.ClientSession() as session:
                async with session.get(base + "/metrics") as resp:
                    text = await resp.text()
            m = re.search(
                r'metergate_units_charged_total\{route="/signals",tier="free"\} (\S+)', text
            )
            assert m, text[:2000]
            assert float(m.group(1)) == sent
    finally:
        code, stderr = _stop(proc, signal.SIGTERM)
    assert code == 0, stderr


def _exact_config(tmp_path: Path, limits: str = "") -> str:
    text = (ROOT / "gateway.toml").read_text()
    text = text.replace("[gateway]\n", '[gateway]\nbalance = "exact"\n', 1)
    path = tmp_path / "exact.toml"
    path.write_text(text.replace("[limits]\n", f"[limits]\n{limits}\n", 1))
    return str(path)


def _served_by(client: socket.socket, port: int, workers: list[int]) -> int:
    """The worker process holding the server's end of ``client``'s connection."""
    mine = client.getsockname()[1]
    inode = next(
        fields[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if (fields := line.split())
        and int(fields[1].split(":")[1], 16) == port
        and int(fields[2].split(":")[1], 16) == mine
    )
    for pid in workers:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
    raise AssertionError(f"no worker holds the connection from port {mine}")


def _get(client: socket.socket, account: str) -> int:
    """One keep-alive GET /signals on ``client``; its status."""
    token = auth(account)["Authorization"]
    client.sendall(f"GET /signals HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += client.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += client.recv(65536)
    return int(head.split()[1])


@pytest.mark.slow
async def test_exact_balance_gives_each_worker_as_many_connections(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, start_upstream
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    proc, port = _two_workers(
        str(upstream.make_url("")), redis_url, METERGATE_CONFIG=_exact_config(tmp_path)
    )
    clients: list[socket.socket] = []
    try:
        await _wait_http(f"http://127.0.0.1:{port}/healthz")

        def workers() -> list[int]:
            return [
                int(p)
                for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            ]

        def connect(count: int) -> list[socket.socket]:
            new = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
            clients.extend(new)
            for client in new:  # served, on a connection kept open
                assert _get(client, "acct-exact") == 200
            return new

        def by_worker(group: list[socket.socket]) -> dict[int, list[socket.socket]]:
            out: dict[int, list[socket.socket]] = {}
            for client in group:
                out.setdefault(_served_by(client, port, workers()), []).append(client)
            return out

        first = await asyncio.to_thread(connect, 8)
        split = await asyncio.to_thread(by_worker, first)
        assert sorted(len(held) for held in split.values()) == [4, 4]
        # /metrics shows it too: each worker's open connections, as of its last sample
        # (every second), the scraping worker's own (holding the scrape's too) as it answers.
        await asyncio.sleep(CONNECTIONS_SAMPLE_SECONDS + 0.3)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
        held = {
            int(pid): float(value)
            for pid, value in re.findall(r'metergate_open_connections\{pid="(\d+)"\} (\S+)', text)
        }
        # (Among the starting process's children are its workers; it may have a helper too.)
        assert len(held) == 2 and set(held) <= set(workers()), held
        assert sorted(held.values()) == [4.0, 5.0], held
        # Three of one worker's connections end: the next three go to it.
        busy, other = split
        for client in split[busy][:3]:
            client.close()
        # Its note reaches the balancer within a loop pass and a poll (0.2 s): no sign of
        # it can be seen from here, so the wait is generous.
        await asyncio.sleep(1.0)
        later = await asyncio.to_thread(connect, 3)
        assert set(await asyncio.to_thread(by_worker, later)) == {busy}
        # A worker killed is restarted, and its successor, holding none, gets the next.
        children = len(workers())
        os.kill(other, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while other in workers() or len(workers()) < children:
            assert time.monotonic() < deadline, "the worker was not restarted"
            await asyncio.sleep(0.1)
        # Until its successor is ready, the next go to the other; then to it, holding none.
        successor = None
        probes = 0
        while successor is None:
            assert time.monotonic() < deadline, "the new worker was never handed one"
            probes += 1
            (holder,) = set(await asyncio.to_thread(by_worker, await asyncio.to_thread(connect, 1)))
            successor = holder if holder != busy else None
        assert successor != other
        after = await asyncio.to_thread(connect, 2)
        assert set(await asyncio.to_thread(by_worker, after)) == {successor}
        used = int(await redis_client.hget("mg:{acct-exact}:usage", "used") or 0)
        assert used == 13 + probes
    finally:
        for client in clients:
            client.close()
        code, stderr = _stop(proc, signal.SIGTERM)
    assert code == 0, stderr


@pytest.mark.slow
async def test_exact_balance_keeps_the_head_timeout(
    tmp_path: Path, redis_url: str, start_upstream
) -> None:
    """Handed-over connections keep the timeouts of listened ones: a stalled head, 408."""
    upstream = await start_upstream({"/{tail:.*}": echo})
    config = _exact_config(tmp_path, "client_body_timeout_seconds = 1")
    proc, port = _two_workers(str(upstream.make_url("")), redis_url, METERGATE_CONFIG=config)
    try:
        await _wait_http(f"http://127.0.0.1:{port}/healthz")

        def stalled() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"GET /signals HTTP/1.1\r\n")  # and no more
                return client.recv(65536)

        started = time.monotonic()
        answer = await asyncio.to_thread(stalled)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - started < 5
    finally:
        code, stderr = _stop(proc, signal.SIGTERM)
    assert code == 0, stderr


@pytest.mark.slow
async def test_gateway_serves_metrics_on_a_listener_of_its_own(
    redis_url: str, start_upstream
) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    metrics_port = _free_port()
    proc, port = _two_workers(
        str(upstream.make_url("")),
        redis_url,
        METERGATE_GATEWAY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
    )
    try:
        public, internal = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
        await _wait_http(public + "/healthz")
        await _wait_http(internal + "/healthz")
        async with aiohttp.ClientSession() as session:
            async with session.get(public + "/signals", headers=auth("acct-scrape")) as resp:
                assert resp.status == 200
            # Written by whichever worker served it; and each worker's connections sampled.
            await asyncio.sleep(max(FLUSH_SECONDS, CONNECTIONS_SAMPLE_SECONDS) + 0.2)
            async with session.get(internal + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            assert 'metergate_requests_total{route="/signals",status="200"}' in text
            # The session's one connection to the public port; its scrapes are not counted.
            held = re.findall(r'metergate_open_connections\{pid="\d+"\} (\S+)', text)
            assert sorted(float(v) for v in held) == [0.0, 1.0], text
            async with session.get(internal + "/readyz") as resp:
                assert resp.status == 200
            # The public port no longer answers it: it is routed like any other path.
            async with session.get(public + "/metrics") as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "route_not_found"
            async with session.get(internal + "/signals") as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "not_found"
            async with session.post(internal + "/metrics") as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "GET, HEAD"
    finally:
        code, stderr = _stop(proc, signal.SIGTERM)
    assert code == 0, stderr


async def test_gateway_charges_over_tls(tls_redis: EmbeddedRedis, start_upstream) -> None:
    upstream = await start_upstream({"/{tail:.*}": echo})
    proc, port = _two_workers(str(upstream.make_url("")), tls_redis.tls_url(TEST_DB))
    plain = redis.Redis(port=tls_redis.port, db=TEST_DB)
    await plain.config_resetstat()  # the server is the session's: count this test's calls
    try:
        base = f"http://127.0.0.1:{port}"
        await _wait_http(base + "/readyz")  # its ping went through TLS
        async with aiohttp.ClientSession() as session:

            async def get() -> int:
                async with session.get(base + "/signals", headers=auth("acct-tls")) as resp:
                    return resp.status

            assert await asyncio.gather(*(get() for _ in range(100))) == [200] * 100
        assert await plain.hget("mg:{acct-tls}:usage", "used") == b"100"
        # Coalesced through the pipeline: redis-py's path sends one script call per charge.
        evalsha = (await plain.info("commandstats"))["cmdstat_evalsha"]["calls"]
        assert evalsha < 100
    finally:
        code, stderr = _stop(proc, signal.SIGTERM)
        await plain.flushdb()  # the suite's own server: database 15 only
        await plain.aclose()
    assert code == 0, stderr
    assert "redis unavailable" not in stderr


def test_admin_refuses_a_cluster_url_in_one_line() -> None:
    result = subprocess.run(
        [METERGATE, "admin"],
        env=_env(METERGATE_REDIS_URL="redis+cluster://127.0.0.1:7000", METERGATE_JWT_SECRET=SECRET),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "metergate: config error: METERGATE_REDIS_URL: the admin app does not support "
        "Redis Cluster yet; give it a plain redis:// URL"
    ]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["gateway"], {}),
        (["gateway"], {"METERGATE_GATEWAY_WORKERS": "2"}),
        (["gateway", "exact"], {"METERGATE_GATEWAY_WORKERS": "2"}),
        (["gateway", "metrics"], {}),
        (["gateway", "metrics"], {"METERGATE_GATEWAY_WORKERS": "2"}),
        (["admin"], {}),
        (["up"], {}),
    ],
)
def test_a_port_in_use_is_one_line(tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = _free_port()
        listen = {"METERGATE_GATEWAY_LISTEN": f"127.0.0.1:{port}"}
        if args == ["admin"]:
            listen = {"METERGATE_ADMIN_LISTEN": f"127.0.0.1:{port}"}
        elif args == ["gateway", "exact"]:  # the port the balancer binds is the one taken
            args = ["gateway"]
            env = {**env, "METERGATE_CONFIG": _exact_config(tmp_path)}
        elif args == ["gateway", "metrics"]:  # the metrics listener's port is the one taken
            args = ["gateway"]
            listen = {
                "METERGATE_GATEWAY_LISTEN": f"127.0.0.1:{free}",
                "METERGATE_GATEWAY_METRICS_LISTEN": f"127.0.0.1:{port}",
            }
        elif args == ["up"]:
            args = ["up", "--data-dir", str(tmp_path / "var")]
            listen["METERGATE_ADMIN_LISTEN"] = f"127.0.0.1:{free}"
            listen["METERGATE_UPSTREAM_URL"] = f"http://127.0.0.1:{_free_port()}"
        result = subprocess.run(
            [METERGATE, *args],
            env=_env(METERGATE_JWT_SECRET=SECRET, **listen, **env),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("metergate: ")]
    assert errors == [f"metergate: cannot listen on 127.0.0.1:{port}: address already in use"]


def _exit_at_once(index: int) -> None:
    sys.exit(3)


def test_workers_that_crash_at_start_are_not_restarted_forever(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.server import run_workers

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # run_workers sets it; restore it
    started = time.monotonic()
    code = run_workers(_exit_at_once, 2, fast_exit_seconds=30, max_fast_exits=3)
    assert code == 1
    assert time.monotonic() - started < 30
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "exited with 3" in lines[0] and "3 times in a row; giving up" in lines[0]
