"""Metergate: the metering proxy."""

from gateway import compiled as _compiled

# Before any hot-path module is imported: compiled, or the source when asked or stale.
_compiled.choose()
