"""Verified bearer tokens, kept until they expire; bounded, the oldest insertion going first.

Looked up on every authenticated request, so compiled with the hot path
(gateway/compiled.py): interpreted, the lookup was the one function of the gateway's own
that a known request still ran as bytecode. TokenVerifier fills it as it verifies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import final

from gateway.claims import Claims


@final
class TokenCache:
    def __init__(self, size: int, leeway: float, clock: Callable[[], float]) -> None:
        self._size = size  # 0: nothing is kept
        self._leeway = leeway
        self._clock = clock
        self._claims: dict[str, Claims] = {}

    def __len__(self) -> int:
        return len(self._claims)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._claims))

    def get(self, token: str) -> Claims | None:
        """A verification of ``token`` still in date; an expired one leaves the cache."""
        claims = self._claims.get(token)
        if claims is None:
            return None
        if claims.exp + self._leeway > self._clock():
            return claims
        del self._claims[token]
        return None

    def for_header(self, header: str | None) -> Claims | None:
        """The claims of the bearer token in an Authorization value, verified before and
        not expired; else None, and TokenVerifier.verify_header decides."""
        if header is None or header[:7].lower() != "bearer ":
            return None
        return self.get(header[7:].strip())

    def put(self, token: str, claims: Claims) -> None:
        if not self._size:
            return
        if len(self._claims) >= self._size:
            # Evict the oldest insertion: bounded memory without LRU bookkeeping.
            del self._claims[next(iter(self._claims))]
        self._claims[token] = claims
