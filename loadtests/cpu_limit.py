"""A CPU limit on a process tree, the way containers get ``--cpus``: a cgroup CFS quota.

The benchmark's scaling curve needs more CPU for the gateway than a small machine has
free once wrk, the backend and Redis run on it. Capping the gateway's processes together
at ``workers x slice`` CPUs (``docker run --cpus``, a Kubernetes CPU limit) leaves the
load side the rest, so the curve shows whether throughput grows with the CPU the
workers are given, which is what more cores would give them.

Needs root and a cgroup cpu controller: cgroup v1 (``/sys/fs/cgroup/cpu``) or v2 with
``cpu`` enabled for the root's children.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from loadtests.procs import tree

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")
# The quota is spent per period; a group over it waits for the next one. The kernel's
# default, as containers get it. In single-round runs on a 2-core VM, one worker at 0.25
# CPUs spent 67 µs a request with a 10 ms period against 48 µs with 100 ms, and with 1 ms
# it used 0.62 CPUs: the quota did not hold.
PERIOD_US = 100_000


def _root() -> tuple[Path, int]:
    """The hierarchy to make groups in, and its cgroup version."""
    if (_V1 / "cpu.cfs_quota_us").exists():
        return _V1, 1
    controllers = _V2 / "cgroup.subtree_control"
    with contextlib.suppress(OSError):
        if "cpu" in controllers.read_text().split():
            return _V2, 2
    raise OSError("no cgroup cpu controller (cgroup v1 cpu, or v2 with +cpu in subtree_control)")


def unavailable() -> str | None:
    """Why CPU limits cannot be set here, or None when they can."""
    try:
        root, _ = _root()
    except OSError as exc:
        return str(exc)
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (needs root)"
    return None


class CpuLimit:
    """A cgroup holding at most ``cpus`` CPUs of time; removed by ``close``."""

    def __init__(self, name: str, cpus: float) -> None:
        if cpus <= 0:
            raise ValueError("a CPU limit must be above 0")
        root, self.version = _root()
        self.path = root / f"{name}-{os.getpid()}"
        self.path.mkdir()
        quota = max(1000, round(cpus * PERIOD_US))  # the kernel's least quota is 1 ms
        try:
            if self.version == 1:
                (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        except OSError:
            self.path.rmdir()
            raise
        self.cpus = cpus

    def add_tree(self, pid: int) -> None:
        """Move ``pid`` and its descendants in; children they start later stay in."""
        for member in tree(pid):
            with contextlib.suppress(ProcessLookupError):  # a member may exit meanwhile
                (self.path / "cgroup.procs").write_text(str(member))

    def throttled(self) -> tuple[int, int]:
        """Periods the group ran in, and those it used up its quota in (cpu.stat)."""
        stat = dict(
            line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if line
        )
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))

    def close(self) -> None:
        """Remove the group, once its processes have exited (stop them first): raises
        OSError if one is still in it after a few tries, which leaves the group behind."""
        for attempt in range(20):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY: a process is still in it (exiting, or not reaped)
                if attempt == 19:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> CpuLimit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
