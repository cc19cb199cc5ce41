"""The hot path compiled with mypyc: what runs, the way back to the source, and the one
rule compiled coroutines must keep."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from gateway import compiled

ROOT = Path(__file__).resolve().parents[2]
needs_compiled = pytest.mark.skipif(
    not compiled.extension_files(), reason="the hot path is not compiled here (make compiles it)"
)


def _suspensions(statements: list[ast.stmt]) -> list[int]:
    """Lines where these statements suspend: await, async for and with, async
    comprehensions, and yield (a compiled generator suspends the same way)."""
    suspending = (ast.Await, ast.AsyncFor, ast.AsyncWith, ast.Yield, ast.YieldFrom)
    comprehensions = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    found = []
    for statement in statements:
        for node in ast.walk(statement):
            is_async_comprehension = isinstance(node, comprehensions) and any(
                c.is_async for c in node.generators
            )
            if isinstance(node, suspending) or is_async_comprehension:
                found.append(node.lineno)
    return found


@pytest.mark.parametrize("module", compiled.MODULES)
def test_no_compiled_coroutine_suspends_inside_except_or_finally(module: str) -> None:
    # mypyc (2.4) leaks the exception being handled to the rest of the thread when a
    # coroutine suspends while handling it: another task's `finally` then raises it again,
    # and httptools reports a stale one as a callback's cause. Seen here: a Redis outage's
    # ConnectionRefusedError raised again from a later connection's hand-back. So the
    # compiled modules handle errors after their except and finally blocks.
    tree = ast.parse((compiled.PACKAGE_DIR / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Try, ast.TryStar)):
            blocks = [h.body for h in node.handlers] + [node.finalbody]
            found += [line for block in blocks for line in _suspensions(block)]
    assert found == [], f"gateway/{module}.py suspends in an except/finally block at {found}"


# Context managers whose exit never suspends: asyncio's timeouts, and redis_quota's
# asyncio.Semaphore of Redis calls (its exit only releases).
_EXITS_WITHOUT_SUSPENDING = {"asyncio.timeout", "asyncio.timeout_at", "self._slots"}


@pytest.mark.parametrize("module", compiled.MODULES)
def test_compiled_modules_async_with_only_what_exits_without_suspending(module: str) -> None:
    # An `async with` whose exit suspends would suspend while an exception is handled.
    tree = ast.parse((compiled.PACKAGE_DIR / f"{module}.py").read_text())
    others = [
        f"{node.lineno}: {ast.unparse(item.context_expr)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncWith)
        for item in node.items
        if ast.unparse(item.context_expr).split("(")[0] not in _EXITS_WITHOUT_SUSPENDING
    ]
    assert others == []


def _fake_build(root: Path, *, record: bool = True) -> Path:
    """A project under ``root`` with its hot path "compiled" (empty files)."""
    package = root / "gateway"
    package.mkdir()
    (root / "config").mkdir()
    (root / "config" / "model.py").write_text("# model\n")
    suffix = EXTENSION_SUFFIXES[0]
    for name in compiled.MODULES:
        (package / f"{name}.py").write_text(f"# {name}\n")
        (package / f"{name}{suffix}").write_bytes(b"")
    (package / f"_hot__mypyc{suffix}").write_bytes(b"")
    if record:
        compiled.record_sources(package, compiled.input_digests(root))
    return package


def test_stale_names_the_sources_changed_since_the_build(tmp_path: Path) -> None:
    assert compiled.stale(tmp_path) == []  # nothing compiled, nothing stale
    package = _fake_build(tmp_path)
    assert compiled.stale(package) == []
    (package / "proxy.py").write_text("# proxy, edited\n")
    assert compiled.stale(package) == ["gateway/proxy.py"]
    # Not only the compiled modules: the compiled code checks the types it reads from
    # the others, so they count too, edited, added or removed.
    (tmp_path / "config" / "model.py").write_text("# model, a field retyped\n")
    (package / "new.py").write_text("")
    assert compiled.stale(package) == ["config/model.py", "gateway/new.py", "gateway/proxy.py"]
    # Touched without a change (a checkout, say) is not stale: digests, not times.
    os.utime(package / "front.py", (2e9, 2e9))
    assert "gateway/front.py" not in compiled.stale(package)


def test_an_editors_lock_file_is_no_module(tmp_path: Path) -> None:
    package = _fake_build(tmp_path)
    # Emacs's lock file: a dangling symlink named like a module.
    (package / ".#proxy.py").symlink_to(tmp_path / "nowhere")
    assert compiled.stale(package) == []
    unreadable = package / "routing.py"
    unreadable.unlink()
    unreadable.symlink_to(tmp_path / "nowhere")  # a module that cannot be read is stale
    assert compiled.stale(package) == ["gateway/routing.py"]


def test_the_record_is_this_interpreters_own(tmp_path: Path) -> None:
    # A build for another Python beside this one writes its own record, never this one's.
    assert EXTENSION_SUFFIXES[0].rsplit(".", 1)[0] in compiled.SOURCES_RECORD
    package = _fake_build(tmp_path, record=False)
    (package / "_hot_sources.cpython-399-elsewhere.json").write_text(
        json.dumps(compiled.input_digests(tmp_path))
    )
    assert compiled.stale(package) == ["no record of the sources it was built from"]


def test_an_unrecorded_or_incomplete_build_is_stale(tmp_path: Path) -> None:
    package = _fake_build(tmp_path, record=False)
    assert compiled.stale(package) == ["no record of the sources it was built from"]
    (package / compiled.SOURCES_RECORD).write_text("not json")
    assert compiled.stale(package) == ["no record of the sources it was built from"]
    compiled.record_sources(package, compiled.input_digests(tmp_path))
    assert compiled.stale(package) == []
    # An extension the build did not make (a module compiled once, since taken off the
    # list) would load ahead of its source: nothing compiled runs then.
    stray = package / f"auth{EXTENSION_SUFFIXES[0]}"
    stray.write_bytes(b"")
    assert compiled.stale(package) == [f"extensions not of the build: {stray.name}"]
    # The next build removes it (setup.py), and its own modules run again.
    assert compiled.remove_strays(package) == [stray.name]
    assert not stray.exists()
    assert compiled.stale(package) == []
    # Another Python's extensions are none of this one's business: this one never loads them.
    other = package / "auth.cpython-399-elsewhere.so"
    other.write_bytes(b"")
    assert compiled.stale(package) == []
    assert compiled.remove_strays(package) == []
    assert other.exists()
    # Compiled modules without their shared library, or only some of them, cannot run.
    next(package.glob("_hot__mypyc*")).unlink()
    assert compiled.stale(package) == ["an incomplete build"]


def _import_in_child(env: dict[str, str]) -> list[str]:
    code = (
        "import gateway.compiled as c, gateway.front as f, gateway.proxy as p;"
        "print(f.__file__); print(p.__file__); print(c.describe())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


@needs_compiled
def test_the_suite_runs_the_compiled_hot_path() -> None:
    # make test compiles first, so what is tested is what runs in production.
    if compiled.pure_requested():
        pytest.skip(f"{compiled.PURE_ENV} asks for the source")
    assert compiled.stale() == []
    front, proxy, described = _import_in_child({compiled.PURE_ENV: ""})
    assert not front.endswith(".py") and not proxy.endswith(".py")
    assert described == f"compiled with mypyc ({len(compiled.MODULES)} modules)"


@needs_compiled
def test_pure_python_runs_every_hot_module_from_source() -> None:
    front, proxy, described = _import_in_child({compiled.PURE_ENV: "1"})
    assert front.endswith("gateway/front.py") and proxy.endswith("gateway/proxy.py")
    assert described == f"source ({compiled.PURE_ENV} is set)"
