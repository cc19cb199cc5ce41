"""The systems the benchmark compares, and how each one is started in its own process(es)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from loadtests.procs import Child, free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # direct | nginx | yardstick | metergate
    metering: bool = False
    workers: int = 1
    label: str = ""
    redis_tls: bool = False  # metergate's Redis over TLS (rediss://)
    # CPUs its processes may use together (a cgroup quota, see cpu_limit); 0: no limit.
    cpu_limit: float = 0.0
    balance: str = "kernel"  # metergate's gateway.balance, with several workers
    # A command metergate runs under (valgrind, for loadtests.instructions): it starts slower.
    wrapper: tuple[str, ...] = ()


@dataclass(frozen=True)
class Environment:
    """What every system is started against: one backend, one Redis, one secret."""

    backend_port: int
    redis_url: str
    secret: str
    work_dir: Path
    redis_tls_url: str = ""  # the same Redis over TLS, when a system asks for it


def default_systems(nproc: int) -> list[System]:
    exact = [exact_balance(nproc)] if nproc > 1 else []
    return [
        System("direct", "direct", label="direct to the backend (no proxy)"),
        System("nginx", "nginx", label="nginx proxy_pass, upstream keepalive"),
        System("yardstick", "yardstick", metering=True, label="aiohttp + redis-py EVALSHA"),
        System("metergate-off", "metergate", label="metergate, metering off"),
        System("metergate-1w", "metergate", metering=True, label="metergate complete, 1 worker"),
        System(
            f"metergate-{nproc}w",
            "metergate",
            metering=True,
            workers=nproc,
            label=f"metergate complete, {nproc} workers",
        ),
        *exact,
    ]


# Not among the defaults: the cost of TLS to Redis, measured when asked for.
TLS_SYSTEM = System(
    "metergate-1w-tls",
    "metergate",
    metering=True,
    label="metergate complete, 1 worker, Redis over TLS",
    redis_tls=True,
)


def metergate(workers: int, cpus_per_worker: float = 0.0) -> System:
    """Metergate complete; with ``cpus_per_worker``, limited to that many CPUs a worker."""
    label = f"metergate complete, {workers} worker{'s' if workers > 1 else ''}"
    if not cpus_per_worker:
        return System(f"metergate-{workers}w", "metergate", True, workers, label)
    cpus = workers * cpus_per_worker
    return System(
        f"metergate-{workers}w-cpus{cpus:g}",
        "metergate",
        True,
        workers,
        f"{label}, limited to {cpus:g} CPUs",
        cpu_limit=cpus,
    )


def exact_balance(workers: int) -> System:
    """Metergate complete, its connections handed out by gateway.balance = "exact"."""
    return System(
        f"metergate-{workers}w-exact",
        "metergate",
        True,
        workers,
        f"metergate complete, {workers} workers, exact balance",
        balance="exact",
    )


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def start(system: System, env: Environment) -> tuple[Child | None, int]:
    """Start ``system``; returns the process to measure (None: the backend) and its port."""
    if system.kind == "direct":
        return None, env.backend_port
    port = free_port()
    if system.kind == "nginx":
        child = _nginx(env, port)
    elif system.kind == "yardstick":
        argv = [
            sys.executable, "-m", "loadtests.yardstick", str(port), env.redis_url,
            f"http://127.0.0.1:{env.backend_port}", env.secret, str(ROOT / "gateway.toml"),
        ]  # fmt: skip
        child = Child(system.name, argv, env.work_dir, cwd=ROOT)
    else:
        child = _metergate(system, env, port)
    try:
        wait_http(
            port, "/healthz" if system.kind == "metergate" else "/", 120 if system.wrapper else 20
        )
        child.check_alive()
    except (TimeoutError, RuntimeError) as exc:
        child.stop()
        raise RuntimeError(f"{system.name} did not start: {exc}\n{child.tail()}") from None
    return child, port


def _metergate(system: System, env: Environment, port: int) -> Child:
    config = env.work_dir / f"{system.name}.toml"
    text = (ROOT / "gateway.toml").read_text()
    # Flip only [metering].enabled; the rest of the shipped pricing stays as it is.
    text, count = re.subn(
        r"(\[metering\][^\[]*?^enabled\s*=\s*)\w+",
        lambda m: m.group(1) + ("true" if system.metering else "false"),
        text,
        count=1,
        flags=re.MULTILINE | re.DOTALL,
    )
    if count != 1:
        raise RuntimeError("gateway.toml has no [metering] enabled = ... line to change")
    if system.balance != "kernel":
        text = text.replace("[gateway]\n", f'[gateway]\nbalance = "{system.balance}"\n', 1)
    config.write_text(text)
    if system.redis_tls and not env.redis_tls_url:
        raise RuntimeError("no Redis over TLS was started")
    child_env = {
        **os.environ,
        "METERGATE_CONFIG": str(config),
        "METERGATE_REDIS_URL": env.redis_tls_url if system.redis_tls else env.redis_url,
        "METERGATE_JWT_SECRET": env.secret,
        "METERGATE_UPSTREAM_URL": f"http://127.0.0.1:{env.backend_port}",
        "METERGATE_GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "METERGATE_GATEWAY_WORKERS": str(system.workers),
        "METERGATE_LOG_LEVEL": "WARNING",
    }
    child_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    binary = Path(sys.executable).parent / "metergate"
    argv = [*system.wrapper, str(binary) if binary.exists() else "metergate", "gateway"]
    return Child(system.name, argv, env.work_dir, env=child_env, cwd=ROOT)


_NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 10000000;
  upstream backend {{
    server 127.0.0.1:{backend};
    keepalive 64;
    keepalive_requests 10000000;
  }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def _nginx(env: Environment, port: int) -> Child:
    binary = find_nginx()
    assert binary is not None
    root = env.work_dir / "nginx"
    root.mkdir(exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=root, backend=env.backend_port, port=port))
    argv = [binary, "-p", str(root), "-e", str(root / "nginx-error.log"), "-c", str(conf),
            "-g", "daemon off;"]  # fmt: skip
    return Child("nginx", argv, env.work_dir)
