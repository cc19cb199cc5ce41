"""The circuit breaker on its own, with a settable clock."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from admin.circuit import CircuitBreaker, CircuitOpen, CircuitState
from tests.conftest import Clock


def gauge() -> float | None:
    return REGISTRY.get_sample_value("metergate_stripe_circuit_state")


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(3, 10.0, clock=Clock())
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure("HTTP 500")
    breaker.before_call()
    breaker.record_success()  # a success in between resets the count
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.before_call()
    breaker.record_failure("APIConnectionError")
    assert breaker.state is CircuitState.OPEN
    assert gauge() == 2
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    snapshot = breaker.snapshot()
    assert snapshot["state"] == "open"
    assert snapshot["retry_in_seconds"] == 10.0
    assert snapshot["last_failure"] == "APIConnectionError"


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 10.0, clock=clock)
    breaker.before_call()
    breaker.record_failure()
    clock.advance(9.9)
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.advance(0.1)
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.before_call()  # the probe
    assert gauge() == 1
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # everyone else still fails fast while it runs
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert gauge() == 0
    breaker.before_call()


def test_a_failed_probe_opens_for_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(5, 10.0, clock=clock)
    for _ in range(5):
        breaker.record_failure()
    clock.advance(10)
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    clock.advance(5)
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.advance(5)
    breaker.before_call()
    breaker.release()  # a probe cancelled midway says nothing: the next call may probe
    breaker.before_call()
