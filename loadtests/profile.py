"""Profile metergate under the benchmark's load with py-spy, and summarize it in text.

Starts the same private Redis, backend and ``metergate gateway`` (one worker, metering on)
as ``make bench``, drives it with wrk, records with ``py-spy record --format raw`` and
prints the functions with the most self time, self time by module, and the inclusive time
of the gateway's own steps. Needs py-spy (``pip install py-spy``) and, as root or with
ptrace allowed, permission to attach. The gateway runs its source (METERGATE_PURE_PYTHON=1)
unless ``--compiled``: py-spy sees no frame of the compiled modules.

    .venv/bin/python -m loadtests.profile [--seconds 10] [--out /tmp/metergate.raw]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from gateway import compiled
from loadtests import harness, systems, wrk

# Inclusive time of these frames says where a request's CPU goes, step by step.
_STEPS = {
    "Proxy.handle": "gateway: whole request handler",
    "TokenVerifier.cached": "gateway: JWT (a token seen before)",
    "TokenVerifier.verify_header": "gateway: JWT (a token not seen before)",
    "RedisQuotaStore.charge": "gateway: charge (encode, await decision)",
    "RedisPipe.send": "gateway: pipelined Redis write",
    "Proxy._forward": "gateway: forward (client request + relay)",
    "UpstreamPool.request": "gateway: backend request",
    "Proxy._relay": "gateway: relay the answer",
    "upstream_request_head": "gateway: request header rewrite",
    "client_response_head": "gateway: response header rewrite",
    "RouteMetrics.request": "metrics: request counter",
    "canonicalize": "gateway: path canonicalization",
}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="", help="keep py-spy's raw output here")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--native", action="store_true", help="include C frames")
    parser.add_argument(
        "--no-metering", action="store_true", help="profile metergate with metering off"
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="profile the compiled hot path as it is (py-spy sees none of its frames)",
    )
    args = parser.parse_args(argv)
    if not args.compiled:
        # py-spy reads Python frames only: compiled modules would all count as the loop's.
        os.environ[compiled.PURE_ENV] = "1"
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    wrk_bin = wrk.find_wrk()
    if not Path(pyspy).exists() or wrk_bin is None:
        print("profile: needs py-spy (pip install py-spy) and wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="metergate-profile-") as tmp:
        work = Path(tmp)
        raw = Path(args.out) if args.out else work / "profile.raw"
        with harness.stage(work) as (env, script):
            system = systems.metergate(args.workers)
            if args.no_metering:
                system = replace(system, metering=False)
            child, port = systems.start(system, env)
            assert child is not None
            try:
                rate = _record(pyspy, wrk_bin, child.pid, port, script, raw, args)
            finally:
                child.stop()
        # py-spy samples the process only while it runs, so samples / rate / requests is
        # CPU per request, comparable between two profiles (metering on and off, say).
        print(f"{rate:,.0f} requests/s under load")
        requests = rate * round(args.seconds)  # served while py-spy recorded
        print(summarize(raw.read_text(), args.top, us_per_sample=1e6 / args.rate / requests))
    return 0


def _record(
    pyspy: str,
    wrk_bin: str,
    pid: int,
    port: int,
    script: Path,
    raw: Path,
    args: argparse.Namespace,
) -> float:
    """Record while wrk runs; the requests per second wrk measured over its whole run."""
    results: list[wrk.WrkResult] = []
    load = threading.Thread(
        target=lambda: results.append(
            wrk.run(
                wrk_bin,
                f"http://127.0.0.1:{port}",
                script,
                seconds=args.seconds + 4,
                connections=args.connections,
                threads=2,
            )
        )
    )
    load.start()
    time.sleep(2)  # warm: connections open, token cache filled, scripts loaded
    subprocess.run(
        [pyspy, "record", "--pid", str(pid), "--format", "raw", "--function",
         "--subprocesses", "--duration", str(round(args.seconds)), "--output", str(raw),
         "--rate", str(args.rate), *(["--native"] if args.native else [])],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    load.join()
    return results[0].rps if results else 0.0


def summarize(raw: str, top: int = 25, us_per_sample: float = 0.0) -> str:
    """Self time by function and by module, and inclusive time of the gateway's steps."""
    self_time: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        func, module = frames[-1]
        self_time[f"{func}  [{module}]"] += count
        by_module[module] += count
        for step in {f for f, _ in frames if f in _STEPS}:
            inclusive[step] += count
    if not total:
        return "no samples"

    def share(n: int) -> str:
        # With the request rate known, also CPU µs per request.
        per_request = f" {n * us_per_sample:6.2f} µs" if us_per_sample else ""
        return f"  {n / total:6.1%}{per_request}"

    lines = [f"{total} samples", "", f"Top {top} functions by self time:"]
    lines += [f"{share(n)}  {name}" for name, n in self_time.most_common(top)]
    lines += ["", "Self time by module:"]
    lines += [f"{share(n)}  {name}" for name, n in by_module.most_common(top)]
    lines += ["", "Inclusive time of the request's steps:"]
    lines += [
        f"{share(inclusive[step])}  {step}  ({what})"
        for step, what in sorted(_STEPS.items(), key=lambda kv: -inclusive[kv[0]])
    ]
    return "\n".join(lines)


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip(), "?"
    return match["func"], _module(match["file"])


def _module(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    for marker in ("/gateway/", "/config/", "/lib/python3"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return path


if __name__ == "__main__":
    sys.exit(main())
