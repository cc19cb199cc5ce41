"""The gateway's hot path compiled with mypyc, where the build can (gateway/compiled.py).

Everything else about the package is in pyproject.toml. The compiled modules are optional:
no mypyc, no C compiler or code mypyc cannot type-check build the package without them,
which runs the same (and more slowly), with a warning on the way. ``METERGATE_COMPILE=0``
compiles nothing (an in-place build keeps what it compiled before, loaded while its
source is unchanged); ``METERGATE_COMPILE=required`` makes any failure to compile fail the
build (CI, where a compiler is known to be there).

    make                                   # in place, by the Makefile's compile step
    python setup.py build_ext --inplace    # the same by hand
    pip install .                          # into the wheel
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from gateway.compiled import (  # noqa: E402
    GROUP,
    MODULES,
    SOURCES_RECORD,
    input_digests,
    record_sources,
    remove_strays,
)

# The sources as mypyc reads them, before it compiles: an edit made during the build is
# then found stale, not recorded as compiled.
_DIGESTS = input_digests(ROOT)


_MODE = os.environ.get("METERGATE_COMPILE", "1")  # 0, 1 or required (the docstring)
_REQUIRED = _MODE == "required"


def _warn(message: str) -> None:
    if _REQUIRED:
        sys.exit(f"metergate: {message} (METERGATE_COMPILE=required)")
    print(f"metergate: {message}; the gateway runs from source", file=sys.stderr)


class _OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python package, which is complete, not no package."""

    def run(self) -> None:
        # Where the modules land, decided before build_ext.run changes its options.
        built = ROOT / "gateway" if self.inplace else Path(self.build_lib) / "gateway"
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, a missing compiler: all alike
            # Without a record, whatever was half built is never loaded.
            (built / SOURCES_RECORD).unlink(missing_ok=True)
            _warn(f"compiling the hot path failed ({exc})")
            return
        if self.extensions:
            for name in remove_strays(built):
                print(f"metergate: removed {name}, not of this build", file=sys.stderr)
            # What was compiled, so that after an edit the source runs, not stale code.
            record_sources(built, _DIGESTS)


def _extensions() -> list[Extension]:
    if _MODE == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not installed")
        return []
    try:
        return mypycify(
            [f"gateway/{name}.py" for name in MODULES],
            group_name=GROUP,
            target_dir="build/mypyc",
            opt_level="3",
        )
    except (Exception, SystemExit) as exc:  # mypy's type errors end in SystemExit
        # mypyc compiles by the types: without the libraries the code reads types from
        # (pyproject.toml's build requirements carry them for pip's isolated build),
        # mypy fails, and the package is built uncompiled rather than not at all.
        _warn(f"mypyc could not type-check the hot path ({exc!r})")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": _OptionalBuildExt})
