"""What a verified bearer token says about its caller."""

from __future__ import annotations

import msgspec


class Claims(msgspec.Struct, frozen=True):
    sub: str
    exp: float
    is_admin: bool
