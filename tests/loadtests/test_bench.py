"""loadtests.bench: which systems a run measures."""

from __future__ import annotations

import pytest

from loadtests.bench import _choose, _curve


def test_the_default_systems_add_exact_balance_where_there_are_several_cpus() -> None:
    names = [s.name for s in _choose(None, 2, scaling=False)]
    assert names[-2:] == ["metergate-2w", "metergate-2w-exact"]
    assert "metergate-1w-exact" not in [s.name for s in _choose(None, 1, scaling=False)]


def test_systems_are_chosen_by_name() -> None:
    chosen = _choose("metergate-3w-exact,metergate-3w", 2, scaling=False)
    assert [(s.workers, s.balance) for s in chosen] == [(3, "exact"), (3, "kernel")]
    with pytest.raises(SystemExit, match="metergate-<N>w-exact"):
        _choose("metergate-fast", 2, scaling=False)


def test_the_curve_has_one_worker_per_cpu_and_half_the_machine_at_most() -> None:
    assert [(s.workers, s.cpu_limit) for s in _curve(0.25, None, 2)] == [(1, 0.25), (2, 0.5)]
    assert [(s.workers, s.cpu_limit) for s in _curve(0.5, None, 8)] == [
        (w, w * 0.5) for w in range(1, 9)
    ]
    assert [s.workers for s in _curve(0.25, 4, 2)] == [1, 2, 3, 4]
    assert _curve(0.25, None, 2)[1].name == "metergate-2w-cpus0.5"
    for bad in (0.0, 1.5):
        with pytest.raises(SystemExit):
            _curve(bad, None, 2)
    with pytest.raises(SystemExit):
        _curve(0.25, 0, 2)
