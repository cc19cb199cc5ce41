"""Running aiohttp apps: uvloop, graceful stop on SIGINT/SIGTERM, N workers on one port.

Workers are separate processes that each bind the port with SO_REUSEPORT, so the kernel
spreads connections across them, or (gateway.balance = "exact") are handed each
connection by the process that starts them (gateway/balance.py); they share metrics
through PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from config.model import Limits
from gateway import metrics
from gateway.balance import Balancer, Receiver
from gateway.front import Admit, FrontServer, Handler

log = logging.getLogger(__name__)


class ListenError(Exception):
    """A site could not bind its address; the message is one line for the operator."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        # "address already in use", not aiohttp's "[Errno 98] error while attempting ...".
        if isinstance(exc, socket.gaierror) or not exc.errno:
            reason = exc.strerror or str(exc)
        else:
            reason = os.strerror(exc.errno)
        super().__init__(f"cannot listen on {address(host, port)}: {reason.lower()}")


def address(host: str, port: int) -> str:
    """host:port as a URL or a log line writes it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int, *, backlog: int = 1024) -> list[socket.socket]:
    """Sockets listening on every address of ``host`` at ``port``, as asyncio's
    create_server binds them; ListenError if one cannot."""
    bound: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # its own family only, as create_server does
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
    except OSError as exc:
        for sock in bound:
            sock.close()
        raise ListenError(host, port, exc) from None
    return bound


def check_listen(host: str, port: int, *, reuse_port: bool = False) -> None:
    """Raise ListenError when ``host:port`` cannot be bound now (in use, bad host, ...)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(address)
    except OSError as exc:  # gaierror included: an unknown host
        raise ListenError(host, port, exc) from None


@dataclass
class Site:
    app: web.Application
    host: str
    port: int
    reuse_port: bool = False
    runner_args: dict[str, Any] = field(default_factory=dict)
    # Serve this handler, made from the started app, on gateway.front's HTTP server
    # instead of the app's router (the app then only holds resources).
    handler: Callable[[web.Application], Handler] | None = None
    # And the handler's fast path, made the same way (gateway.front's Admit).
    admit: Callable[[web.Application], Admit | None] | None = None
    limits: Limits = field(default_factory=Limits)
    access_log: bool = False
    # Connections handed over by a Balancer on this channel, instead of listening.
    channel: socket.socket | None = None
    # Its connections count in metergate_open_connections (not a metrics listener's
    # scrapes: the gauge says how the clients' connections are shared).
    counted: bool = True


def run(main: Awaitable[None]) -> None:
    """Run a coroutine on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]


async def serve(
    sites: Sequence[Site],
    *,
    started: Callable[[], None] | None = None,
    shutdown_timeout: float = 10.0,
) -> None:
    """Serve the sites until SIGINT or SIGTERM, then stop them in reverse order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stops: list[Callable[[], Awaitable[None]]] = []
    receivers: list[Receiver] = []
    fronts: list[FrontServer] = []
    sampler: asyncio.Task[None] | None = None
    try:
        for site in sites:
            runner = web.AppRunner(
                site.app, handler_cancellation=False, shutdown_timeout=shutdown_timeout,
                **site.runner_args,
            )  # fmt: skip
            await runner.setup()  # runs the app's startup: its cleanup contexts
            stops.append(runner.cleanup)
            try:
                if site.handler is not None:
                    front = FrontServer(
                        site.handler(site.app),
                        site.limits,
                        admit=site.admit(site.app) if site.admit is not None else None,
                        access_log=site.access_log,
                    )
                    stops.append(functools.partial(front.shutdown, shutdown_timeout))
                    if site.counted:
                        fronts.append(front)
                    if site.channel is not None:
                        # The balancer gone, nothing more comes: this worker stops too.
                        receiver = Receiver(front, site.channel, on_closed=stop.set)
                        receivers.append(receiver)
                        stops.append(_closing(receiver))
                    else:
                        await front.listen(site.host, site.port, reuse_port=site.reuse_port)
                else:
                    tcp = web.TCPSite(
                        runner, site.host, site.port, reuse_port=site.reuse_port, backlog=1024
                    )
                    await tcp.start()
            except OSError as exc:
                raise ListenError(site.host, site.port, exc) from None
        if fronts:
            metrics.count_connections(lambda: sum(len(f.connections) for f in fronts))
            sampler = asyncio.create_task(_sample_connections())
        _settle_gc()
        for receiver in receivers:  # every site is up: connections may come
            receiver.ready()
        if started is not None:
            started()
        await stop.wait()
    finally:
        for stop_site in reversed(stops):
            await stop_site()  # a draining worker's gauge still counts what it holds
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            metrics.count_connections(None)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _sample_connections() -> None:
    # Written every second, not as connections come and go: a write to the shared
    # metrics file per connection would cost more than the figure is worth.
    while True:
        await asyncio.sleep(metrics.CONNECTIONS_SAMPLE_SECONDS)
        metrics.sample_connections()


def _closing(receiver: Receiver) -> Callable[[], Awaitable[None]]:
    async def close() -> None:  # first of the stops: no more connections come
        receiver.close()

    return close


# Allocations between young-generation collections (CPython's default is 700).
GC_THRESHOLD = 20_000


def _settle_gc() -> None:
    # What is alive once the sites listen (modules, config, apps) lives as long as the
    # process: frozen, the cyclic collector stops scanning it again and again. Requests'
    # garbage is freed by reference counting; a larger young generation only makes the
    # collector run less often for it (it cost ~9% of a worker's CPU under load).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


# A worker that dies this soon after starting, this many times in a row, is not
# going to come up (a port taken, a bad environment): restarting it forever only spins.
FAST_EXIT_SECONDS = 5.0
MAX_FAST_EXITS = 5


def run_workers(
    target: Callable[..., None],
    workers: int,
    *,
    balancer: Balancer | None = None,
    fast_exit_seconds: float = FAST_EXIT_SECONDS,
    max_fast_exits: int = MAX_FAST_EXITS,
) -> int:
    """Start ``workers`` processes running ``target(index)``, or with a ``balancer``
    ``target(index, channel)`` that it hands connections on; restart any that crash.

    Returns 0 after SIGINT/SIGTERM, 1 when a worker crash-loops at start.
    """
    metrics_dir = tempfile.mkdtemp(prefix="metergate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    started_at: dict[int, float] = {}
    fast_exits: dict[int, int] = {}
    stopping = False
    code = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def start(index: int) -> None:
        if balancer is None:
            proc = ctx.Process(target=target, args=(index,), name=f"metergate-worker-{index}")
            proc.start()
        else:
            channel = balancer.channel(index)
            proc = ctx.Process(
                target=target, args=(index, channel), name=f"metergate-worker-{index}"
            )
            with channel:  # the worker inherited its own copy
                proc.start()
        procs[index] = proc
        started_at[index] = time.monotonic()

    try:
        for index in range(workers):
            start(index)
        while not stopping:
            if balancer is None:
                time.sleep(0.2)
            else:
                balancer.poll(0.2)
                for index in balancer.lost():  # alive but unreachable: restarted
                    lost = procs.get(index)
                    if lost is not None and lost.is_alive() and lost.pid is not None:
                        os.kill(lost.pid, signal.SIGTERM)
            for index, proc in list(procs.items()):
                if proc.is_alive() or stopping:
                    continue
                _mark_dead(metrics_dir, proc.pid)
                if balancer is not None:
                    balancer.drop(index)
                if time.monotonic() - started_at[index] < fast_exit_seconds:
                    fast_exits[index] = fast_exits.get(index, 0) + 1
                else:
                    fast_exits[index] = 0
                if fast_exits[index] >= max_fast_exits:
                    print(
                        f"metergate: worker {index} exited with {proc.exitcode} within "
                        f"{fast_exit_seconds:g}s of starting {fast_exits[index]} times in a row; "
                        "giving up",
                        file=sys.stderr,
                        flush=True,
                    )
                    stopping, code = True, 1
                    break
                log.error("worker %d exited with %s; restarting", index, proc.exitcode)
                start(index)
    finally:
        if balancer is not None:
            balancer.close()  # first: new connections are refused while the workers drain
        for proc in procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _mark_dead(metrics_dir: str, pid: int | None) -> None:
    if pid is None:
        return
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
