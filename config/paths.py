"""Route path patterns: ``/signals``, ``/signals/history/{symbol}``, ``/billing/{rest...}``.

A ``{name}`` segment matches exactly one non-empty path segment; a final ``{name...}``
matches one or more. Literal segments match byte for byte (paths are case-sensitive).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3986 pchar minus percent-encoding (patterns are written decoded) and ';' (which
# some servers treat as a parameter delimiter, so it never appears in a priced path).
_LITERAL = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@]+")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}")


class PatternError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Segment:
    literal: str | None  # None for a parameter
    tail: bool = False  # a {name...} parameter


@dataclass(frozen=True, slots=True)
class PathPattern:
    text: str
    segments: tuple[Segment, ...]

    @property
    def is_static(self) -> bool:
        return all(s.literal is not None for s in self.segments)

    def regex(self) -> re.Pattern[str]:
        parts = []
        for seg in self.segments:
            if seg.literal is not None:
                parts.append(re.escape(seg.literal))
            else:
                parts.append(".+" if seg.tail else "[^/]+")
        return re.compile("/" + "/".join(parts))

    def overlaps(self, other: PathPattern) -> bool:
        """True when some path would match both patterns."""
        a, b = self.segments, other.segments
        for i in range(max(len(a), len(b))):
            if i >= len(a) or i >= len(b):
                return False
            sa, sb = a[i], b[i]
            if sa.tail:
                return True
            if sb.tail:
                return True
            if sa.literal is not None and sb.literal is not None and sa.literal != sb.literal:
                return False
        return len(a) == len(b)


def parse_pattern(text: str) -> PathPattern:
    if not text.startswith("/"):
        raise PatternError(f"{text!r} must start with '/'")
    if text == "/":
        return PathPattern(text, ())
    if text.endswith("/"):
        raise PatternError(f"{text!r} must not end with '/'")
    raw_segments = text[1:].split("/")
    segments = []
    names: set[str] = set()
    for index, raw in enumerate(raw_segments):
        if raw in ("", ".", ".."):
            raise PatternError(f"{text!r} has an empty or dot segment")
        param = _PARAM.fullmatch(raw)
        if param:
            name, tail = param[1], bool(param[2])
            if name in names:
                raise PatternError(f"{text!r} names parameter {name!r} twice")
            names.add(name)
            if tail and index != len(raw_segments) - 1:
                raise PatternError(f"{text!r}: {{{name}...}} must be the last segment")
            segments.append(Segment(None, tail))
        elif _LITERAL.fullmatch(raw):
            segments.append(Segment(raw))
        else:
            raise PatternError(f"{text!r} has a segment {raw!r} with characters not allowed")
    return PathPattern(text, tuple(segments))
