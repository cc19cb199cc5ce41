"""Which gateway modules run compiled with mypyc, and the way back to their source.

The request's hot path is compiled with mypyc where the build can (``make`` compiles it in
place; ``pip install .`` into the wheel): the same code, 10-30% less CPU per request by the CPU
(README, Performance). The source stays the truth and still runs:

- ``METERGATE_PURE_PYTHON=1`` runs the source: for py-spy, which cannot see into compiled
  code, or to rule the compiler out;
- compiled modules built from another source than the one beside them (an edit since the
  last ``make``, another checkout) are not used: the source runs, with a warning, rather
  than code that no longer matches it. The build records in ``SOURCES_RECORD`` the digests
  of every module of ``gateway`` and ``config``, not only the compiled ones: the compiled
  code checks the types it reads from the others (a field of config.model, say).

It is all or none: compiled modules call each other's classes directly, so one from source
beside compiled ones would not work. Stdlib only, as ``setup.py`` imports it to build.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The modules on every request's way, compiled together into one extension group.
MODULES = (
    "front",
    "headers",
    "metrics",
    "periods",
    "proxy",
    "quota",
    "redis_pipe",
    "redis_quota",
    "resp",
    "routing",
    "token_cache",
    "upstream",
    "upstream_protocol",
)
GROUP = "gateway._hot"  # mypyc's shared library: gateway/_hot__mypyc.<abi>.so
_SHARED = GROUP.rpartition(".")[2] + "__mypyc"
# {"gateway/front.py": its sha256, ...} at the build, one per interpreter ABI: a build for
# another Python beside this one must not vouch for this one's extensions.
SOURCES_RECORD = f"_hot_sources{importlib.machinery.EXTENSION_SUFFIXES[0].rsplit('.', 1)[0]}.json"
PURE_ENV = "METERGATE_PURE_PYTHON"
PACKAGE_DIR = Path(__file__).resolve().parent
_INPUT_PACKAGES = ("gateway", "config")  # what mypy reads the compiled code's types from


class StaleCompiledModules(UserWarning):
    """Compiled modules were built from another source; the source runs instead."""


def _extension(directory: Path, name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = directory / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def extension_files(directory: Path = PACKAGE_DIR) -> dict[str, Path]:
    """The compiled module beside each source in ``directory``, where there is one."""
    found = {name: _extension(directory, name) for name in MODULES}
    return {name: path for name, path in found.items() if path is not None}


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:  # unreadable now: never equal to what a build recorded
        return f"unreadable: {exc.__class__.__name__}"


def input_digests(root: Path) -> dict[str, str]:
    """sha256 of every module of the project's packages under ``root``."""
    return {
        f"{package}/{path.name}": _digest(path)
        for package in _INPUT_PACKAGES
        for path in sorted((root / package).glob("*.py"))
        if not path.name.startswith(".")  # an editor's lock or swap file is no module
    }


def _strays(directory: Path) -> list[str]:
    """Extensions in ``directory`` that are not of the build: a module compiled once and
    since taken off MODULES would still load ahead of its source. Only those this Python
    would load: another version's are its own build's business."""
    ours = {*MODULES, _SHARED}
    suffixes = set(importlib.machinery.EXTENSION_SUFFIXES)
    strays = []
    for path in directory.iterdir():
        module, dot, rest = path.name.partition(".")  # a module's name has no dot
        if dot and f".{rest}" in suffixes and module not in ours:
            strays.append(path.name)
    return sorted(strays)


def remove_strays(directory: Path) -> list[str]:
    """Deleted by the build: extensions a former module list left (an older checkout, say)
    would otherwise keep every later build running the source."""
    strays = _strays(directory)
    for name in strays:
        (directory / name).unlink(missing_ok=True)
    return strays


def record_sources(directory: Path, digests: dict[str, str]) -> None:
    """Written by the build beside the modules it compiled (digests taken before it began)."""
    (directory / SOURCES_RECORD).write_text(json.dumps(digests, indent=1, sort_keys=True))


def stale(directory: Path = PACKAGE_DIR) -> list[str]:
    """Why the compiled modules in ``directory`` must not run: the sources changed since
    they were built, or the build is incomplete or unrecorded; empty when they may.

    Digests, not modification times: a build that finds its C code unchanged leaves the
    old files in place, and a checkout touches files it did not change.
    """
    found, strays = extension_files(directory), _strays(directory)
    if strays:
        return [f"extensions not of the build: {', '.join(strays)}"]
    if not found:
        return []
    if len(found) != len(MODULES) or _extension(directory, _SHARED) is None:
        return ["an incomplete build"]  # compiled and source modules cannot mix
    try:
        built = json.loads((directory / SOURCES_RECORD).read_text())
    except (OSError, ValueError):
        return ["no record of the sources it was built from"]
    if not isinstance(built, dict):
        return ["no record of the sources it was built from"]
    now = input_digests(directory.parent)
    return sorted(name for name in built.keys() | now.keys() if built.get(name) != now.get(name))


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds every gateway module's ``.py`` file ahead of any extension beside it."""

    def __init__(self, directory: Path) -> None:
        self._paths = {
            f"gateway.{path.stem}": path
            for path in directory.glob("*.py")
            if path.stem.isidentifier() and path.stem != "__init__"
        }

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self._paths.get(fullname)
        return importlib.util.spec_from_file_location(fullname, source) if source else None


def pure_requested() -> bool:
    """Whether the environment asks for the source (``METERGATE_PURE_PYTHON``, not 0)."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


_reason = ""  # why the source runs although compiled modules exist; empty when they run


def choose() -> None:
    """Run the source instead of the compiled modules when asked to or when they are stale.

    Called by ``gateway/__init__.py``, before any of the modules is imported.
    """
    global _reason
    if not extension_files() and not _strays(PACKAGE_DIR):
        return
    if pure_requested():
        _reason = f"{PURE_ENV} is set"
    elif outdated := stale():
        more = f" and {len(outdated) - 3} more" if len(outdated) > 3 else ""
        listed = ", ".join(outdated[:3]) + more
        # Files changed since the build, or why the build is unusable as a whole.
        _reason = f"changed since the build: {listed}" if "/" in outdated[0] else listed
        warnings.warn(
            f"compiled gateway modules are stale ({_reason}); running the source "
            "(make compiles them again)",
            StaleCompiledModules,
            stacklevel=2,
        )
    else:
        return
    sys.meta_path.insert(0, _SourceFinder(PACKAGE_DIR))


def describe() -> str:
    """How the hot path runs in this process, for the start-up log and the benchmark."""
    front = sys.modules.get("gateway.front") or importlib.import_module("gateway.front")
    if not (front.__file__ or "").endswith(".py"):
        return f"compiled with mypyc ({len(MODULES)} modules)"
    return f"source ({_reason})" if _reason else "source (not compiled)"
