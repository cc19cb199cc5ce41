"""pyproject.toml: what pip's isolated build needs to compile the hot path."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_build_has_every_library_the_compiled_code_reads_types_from() -> None:
    # mypyc compiles by the types mypy reads from the libraries (setup.py); a dependency
    # missing from the build's requirements would leave the wheel uncompiled.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = set(pyproject["project"]["dependencies"])
    build = set(pyproject["build-system"]["requires"])
    assert {d for d in runtime if not d.startswith("stripe")} <= build
    assert any(r.startswith("mypy") for r in build)
