"""loadtests.cpu_limit against the kernel's real cgroups (skipped where they cannot be set)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.cpu_limit import PERIOD_US, CpuLimit, unavailable
from loadtests.procs import cpu_seconds

_WHY = unavailable()
needs_cgroups = pytest.mark.skipif(_WHY is not None, reason=f"no CPU limits here: {_WHY}")

# A parent that starts a busy child once told to (a line on stdin), so the child is born
# after the parent was put under the limit, as a gateway's restarted worker would be.
_SPIN_AND_FORK = """
import subprocess, sys
sys.stdin.readline()
child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
print(child.pid, flush=True)
while True:
    pass
"""


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", _SPIN_AND_FORK],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            yield proc
        finally:
            subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)


def _group_of(pid: int) -> str:
    """The process's group in the hierarchy CpuLimit uses: v1's cpu one, else v2's."""
    fields = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    v1 = [path for _, controllers, path in fields if "cpu" in controllers.split(",")]
    return v1[0] if v1 else next(path for number, _, path in fields if number == "0")


@needs_cgroups
def test_a_tree_under_a_limit_uses_no_more_cpu_than_it_was_given(
    spinner: subprocess.Popen[str],
) -> None:
    assert spinner.stdin is not None and spinner.stdout is not None
    with CpuLimit("metergate-test", 0.2) as limit:
        limit.add_tree(spinner.pid)
        spinner.stdin.write("go\n")
        spinner.stdin.flush()
        child = int(spinner.stdout.readline())
        assert _group_of(child) == _group_of(spinner.pid) == f"/{limit.path.name}"
        before, periods_before = cpu_seconds(spinner.pid), limit.throttled()
        time.sleep(2.0)
        used = cpu_seconds(spinner.pid) - before
        periods, throttled = (a - b for a, b in zip(limit.throttled(), periods_before, strict=True))
        # Two busy loops would take up to 4 CPU seconds in 2 s; the limit allows 0.4 (plus
        # a period's quota at each end).
        assert used <= 0.4 + 2 * 0.2 * PERIOD_US / 1e6 + 0.1
        assert periods > 0 and throttled > 0
        # A group with processes in it stays, and says so.
        with pytest.raises(OSError):
            limit.close()
        assert limit.path.exists()
        subprocess.run(["pkill", "-KILL", "-s", str(spinner.pid)], check=False)
        spinner.wait()
        _reaped(child)
    # Once they have exited, it is removed.
    assert not limit.path.exists()


def _reaped(pid: int) -> None:
    """Wait until ``pid`` (not our child: init reaps it) is gone."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_limit_must_be_above_zero() -> None:
    with pytest.raises(ValueError):
        CpuLimit("metergate-test", 0)
