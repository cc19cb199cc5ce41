"""Instructions per request of metergate, counted by valgrind's callgrind under wrk's load.

``make bench`` measures CPU time, which on a shared VM moves by a few µs a request between
runs: more than most single changes to the hot path are worth. callgrind counts the
instructions the gateway's process executes in user space instead, the same count for the
same code and load however busy the machine is, so two builds compare to a few tenths of a
percent. It does not see the kernel (socket calls) nor cache misses, and under callgrind
the gateway runs about fifty times slower, so more requests wait per event-loop
iteration and each charge batch is larger than at full speed: a figure for comparing
builds and for finding where a request's instructions go, not one for the issue's targets.

For each system (metering off and complete, one worker, by default) it starts the same
private Redis, backend and plans as the benchmark, starts metergate under callgrind with
instrumentation off, warms it up, counts only while wrk runs, and divides by the requests
wrk had answered. ``--keep DIR`` keeps each callgrind file, for callgrind_annotate.

    .venv/bin/python -m loadtests.instructions [--seconds 10] [--connections 64]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from loadtests import harness, systems, wrk

_TOTALS = re.compile(r"^(?:totals|summary):\s*(\d+)", re.M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.instructions", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="counted seconds")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--systems", default="metergate-off,metergate-1w", help="metergate-off, metergate-1w"
    )
    parser.add_argument("--keep", default="", help="a directory to copy callgrind's files to")
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="each request on a new connection (Connection: close), as bench's option",
    )
    args = parser.parse_args(argv)
    wrk_bin = wrk.find_wrk()
    tools = [shutil.which(t) for t in ("valgrind", "callgrind_control")]
    if wrk_bin is None or None in tools:
        needs = "instructions: needs valgrind and wrk (apt-get install valgrind wrk)"
        print(needs, file=sys.stderr)
        return 2
    chosen = {"metergate-off": False, "metergate-1w": True}
    names = [n for n in args.systems.split(",") if n]
    unknown = [n for n in names if n not in chosen]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)} (known: {', '.join(chosen)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="metergate-instructions-") as tmp:
        work = Path(tmp)
        with harness.stage(work, close=args.new_connections) as (env, script):
            for name in names:
                out = work / f"{name}.callgrind"
                wrapper = (
                    "valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={out}.%p",
                )  # fmt: skip
                system = replace(systems.metergate(1), metering=chosen[name], wrapper=wrapper)
                child, port = systems.start(system, env)
                assert child is not None
                try:
                    url = f"http://127.0.0.1:{port}"
                    load = {"connections": args.connections, "threads": 1}
                    wrk.run(wrk_bin, url, script, seconds=args.warmup, **load)
                    _control("--instr=on", child.pid)
                    result = wrk.run(wrk_bin, url, script, seconds=args.seconds, **load)
                    _control("--instr=off", child.pid)
                    _control("--dump", child.pid)
                finally:
                    child.stop()
                counted = instructions(work, out.name)
                if args.keep:
                    Path(args.keep).mkdir(parents=True, exist_ok=True)
                    for path in work.glob(f"{out.name}.*"):
                        shutil.copy(path, Path(args.keep) / path.name)
                rows.append((name, result.requests, counted / max(result.requests, 1)))
    each = ", a connection per request" if args.new_connections else ""
    print(f"wrk: {args.connections} connections{each}, {args.seconds:g} s counted")
    print("| system | requests | instructions/request |\n|---|---:|---:|")
    for name, requests, per_request in rows:
        print(f"| {name} | {requests:,} | {per_request:,.0f} |")
    counts = {name: per_request for name, _, per_request in rows}
    if counts.get("metergate-off") and "metergate-1w" in counts:
        added = counts["metergate-1w"] / counts["metergate-off"] - 1
        print(f"\nmetering adds {added:+.1%} instructions per request")
    return 0


def _control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


def instructions(directory: Path, prefix: str) -> int:
    """The instructions callgrind counted, from the files of one run (the dump's, and the
    one written at exit, which holds what ran after the dump)."""
    total = 0
    for path in directory.glob(f"{prefix}.*"):
        # A file may state its total twice (summary: and totals:).
        total += max((int(n) for n in _TOTALS.findall(path.read_text(errors="replace"))), default=0)
    return total


if __name__ == "__main__":
    raise SystemExit(main())
