"""A circuit breaker around Stripe calls.

After ``failure_threshold`` consecutive failures (Stripe unreachable, timing out or
answering 5xx) the circuit opens: calls fail at once instead of each waiting for timeouts
and retries, so billing endpoints answer 503 quickly and Stripe is not hammered while it
recovers. After ``cooldown_seconds`` one call is let through as a probe (half-open); its
success closes the circuit, its failure opens it for another cooldown.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from prometheus_client import Gauge

CIRCUIT_STATE = Gauge(
    "metergate_stripe_circuit_state",
    "Stripe circuit breaker: 0 closed, 1 half-open, 2 open.",
    multiprocess_mode="livemax",
)


class CircuitState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitOpen(Exception):
    """The circuit is open (or a probe is already in flight): the call was not made."""


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_seconds: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        gauge: Gauge | None = CIRCUIT_STATE,
    ) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._gauge = gauge
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.last_failure: str | None = None
        self._publish()

    @property
    def state(self) -> CircuitState:
        """The state now; an open circuit whose cooldown has passed reads as half-open."""
        if self._state is CircuitState.OPEN and self._cooled_down():
            return CircuitState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def before_call(self) -> None:
        """Raise CircuitOpen unless a call may go out now (claims the probe when half-open)."""
        if self._state is CircuitState.CLOSED:
            return
        if self._state is CircuitState.OPEN:
            if not self._cooled_down():
                raise CircuitOpen("Stripe circuit is open")
            self._state = CircuitState.HALF_OPEN
            self._probing = False
            self._publish()
        # Half-open: exactly one probe at a time; everyone else still fails fast.
        if self._probing:
            raise CircuitOpen("Stripe circuit is half-open and a probe is in flight")
        self._probing = True

    def record_success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._state is not CircuitState.CLOSED:
            self._state = CircuitState.CLOSED
            self._publish()

    def record_failure(self, reason: str = "") -> None:
        self._failures += 1
        self.last_failure = reason or None
        self._probing = False
        if self._state is CircuitState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = CircuitState.OPEN
            self._opened_at = self._clock()
            self._publish()

    def release(self) -> None:
        """The call ended without telling anything about Stripe's health (e.g. cancelled)."""
        self._probing = False

    def snapshot(self) -> dict[str, object]:
        state = self.state
        return {
            "state": state.name.lower(),
            "consecutive_failures": self._failures,
            "failure_threshold": self.failure_threshold,
            "cooldown_seconds": self.cooldown_seconds,
            "retry_in_seconds": (
                max(0.0, self._opened_at + self.cooldown_seconds - self._clock())
                if state is CircuitState.OPEN
                else 0.0
            ),
            "last_failure": self.last_failure,
        }

    def _cooled_down(self) -> bool:
        return self._clock() - self._opened_at >= self.cooldown_seconds

    def _publish(self) -> None:
        if self._gauge is not None:
            self._gauge.set(int(self._state))
