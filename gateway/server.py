"""Running aiohttp apps: uvloop, graceful stop on SIGINT/SIGTERM, N workers on one port.

Workers are separate processes that each bind the port with SO_REUSEPORT, so the kernel
spreads connections across them; they share metrics through PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass
class Site:
    app: web.Application
    host: str
    port: int
    reuse_port: bool = False
    runner_args: dict[str, Any] = field(default_factory=dict)
    # Serve this low-level handler, made from the started app, instead of the app's router.
    handler: Callable[[web.Application], Handler] | None = None


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
    runners: list[web.BaseRunner] = []
    try:
        for site in sites:
            runner: web.BaseRunner = web.AppRunner(
                site.app, handler_cancellation=False, shutdown_timeout=shutdown_timeout,
                **site.runner_args,
            )  # fmt: skip
            await runner.setup()  # runs the app's startup: its cleanup contexts
            runners.append(runner)
            if site.handler is not None:
                server = web.Server(site.handler(site.app), **site.runner_args)
                runner = web.ServerRunner(
                    server, handler_cancellation=False, shutdown_timeout=shutdown_timeout
                )
                await runner.setup()
                runners.append(runner)
            await web.TCPSite(
                runner, site.host, site.port, reuse_port=site.reuse_port, backlog=1024
            ).start()
        _settle_gc()
        if started is not None:
            started()
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


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


def run_workers(target: Callable[[int], None], workers: int) -> None:
    """Start ``workers`` processes running ``target(index)``; restart any that crash."""
    metrics_dir = tempfile.mkdtemp(prefix="metergate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def start(index: int) -> None:
        proc = ctx.Process(target=target, args=(index,), name=f"metergate-worker-{index}")
        proc.start()
        procs[index] = proc

    try:
        for index in range(workers):
            start(index)
        while not stopping:
            time.sleep(0.2)
            for index, proc in list(procs.items()):
                if not proc.is_alive() and not stopping:
                    log.error("worker %d exited with %s; restarting", index, proc.exitcode)
                    _mark_dead(metrics_dir, proc.pid)
                    start(index)
    finally:
        for proc in procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _mark_dead(metrics_dir: str, pid: int | None) -> None:
    if pid is None:
        return
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
