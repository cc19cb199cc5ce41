"""Driving wrk: a Lua script that rotates routes and accounts, and a parseable summary.

Every request carries ``Authorization: Bearer <token>``, also for the systems that do not
check it, so every system receives the same bytes. The script's ``done()`` prints one line
``BENCH k=v ...`` with the totals, errors and latency percentiles (microseconds).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "apt-get install -y nginx wrk"

_SCRIPT = """\
local specs = {
%(requests)s
}
local requests = {}
local n = #specs
local counter = 0
local threads = {}

function setup(thread)
  thread:set("offset", #threads * 7)
  table.insert(threads, thread)
end

function init(args)
  -- Formatted here, not at load: wrk sets the Host header just before init().
  for i, spec in ipairs(specs) do
    local headers = {["Authorization"] = "Bearer " .. spec[2]}
%(close)s    requests[i] = wrk.format("GET", spec[1], headers)
  end
  counter = offset or 0
end

function request()
  counter = counter + 1
  return requests[(counter %% n) + 1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%%d duration_us=%%d bytes=%%d connect=%%d read=%%d write=%%d " ..
    "status=%%d timeout=%%d p50_us=%%d p90_us=%%d p99_us=%%d max_us=%%d mean_us=%%.1f\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    errors: dict[str, int]  # connect, read, write, status (>= 400), timeout
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def find_wrk() -> str | None:
    return shutil.which("wrk")


def write_script(
    script: Path, paths: Sequence[str], tokens: Sequence[str], *, close: bool = False
) -> None:
    """Every (path, token) pair once, interleaved so consecutive requests differ in both;
    with ``close``, each asks for its connection to close (wrk then opens a new one)."""
    lines = []
    for i in range(len(paths) * len(tokens)):
        target, token = paths[i % len(paths)], tokens[(i // len(paths)) % len(tokens)]
        lines.append(f'  {{"{target}", "{token}"}},')
    close_line = '    headers["Connection"] = "close"\n' if close else ""
    script.write_text(_SCRIPT % {"requests": "\n".join(lines), "close": close_line})


def run(
    wrk: str, url: str, script: Path, *, seconds: float, connections: int, threads: int
) -> WrkResult:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout", "5s",
        "-s", str(script),
        url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            return _parse(line)
    raise RuntimeError(
        f"wrk printed no summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    )


def _parse(line: str) -> WrkResult:
    values = {k: float(v) for k, v in (item.split("=") for item in line.split()[1:])}
    return WrkResult(
        requests=int(values["requests"]),
        duration_s=values["duration_us"] / 1e6,
        errors={k: int(values[k]) for k in ("connect", "read", "write", "status", "timeout")},
        p50_ms=values["p50_us"] / 1000,
        p90_ms=values["p90_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        max_ms=values["max_us"] / 1000,
        mean_ms=values["mean_us"] / 1000,
    )
