"""The audit log: every billing change, who made it, when and from which event or request.

A capped Redis Stream (``mg:audit``, ``MAXLEN ~``) so it never grows without bound; an
operator reads it with ``XREVRANGE mg:audit + - COUNT 50``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import redis.asyncio as redis

from admin import keys

DEFAULT_MAXLEN = 100_000


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    who: str  # "stripe", "account:<id>", "operator:<id>", "local"
    what: str
    when: int
    account: str
    source: str  # the Stripe event id or the request id
    details: dict[str, object]


class AuditLog:
    def __init__(
        self,
        client: redis.Redis,
        *,
        clock: Callable[[], float] = time.time,
        maxlen: int = DEFAULT_MAXLEN,
    ) -> None:
        self._redis = client
        self._clock = clock
        self._maxlen = maxlen

    async def record(
        self,
        *,
        who: str,
        what: str,
        account: str,
        source: str,
        details: Mapping[str, object] | None = None,
    ) -> None:
        fields: dict[str, str | int] = {
            "who": who,
            "what": what,
            "when": int(self._clock()),
            "account": account,
            "source": source,
            "details": msgspec.json.encode(dict(details or {})).decode(),
        }
        await self._redis.xadd(
            keys.AUDIT_STREAM,
            fields,  # type: ignore[arg-type]
            maxlen=self._maxlen,
            approximate=True,
        )

    async def recent(self, count: int = 100) -> list[AuditEntry]:
        rows: Any = await self._redis.xrevrange(keys.AUDIT_STREAM, count=count)
        return [_entry(entry_id, fields) for entry_id, fields in rows]


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> AuditEntry:
    def get(name: str) -> str:
        return fields.get(name.encode(), b"").decode()

    details = msgspec.json.decode(fields.get(b"details", b"{}"))
    return AuditEntry(
        id=entry_id.decode(),
        who=get("who"),
        what=get("what"),
        when=int(get("when") or 0),
        account=get("account"),
        source=get("source"),
        details=details if isinstance(details, dict) else {},
    )
