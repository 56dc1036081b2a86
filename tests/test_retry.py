"""Backoff: a monotone envelope, capped at max, jitter within its bounds."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zq.core.retry import BackoffPolicy, RetryPolicy

policies = st.builds(BackoffPolicy, initial_ms=st.integers(0, 10_000), max_ms=st.integers(10_000, 600_000),
                     multiplier=st.floats(1.0, 10.0), jitter=st.floats(0.0, 0.99))
rnds = st.floats(0.0, 1.0, exclude_max=True)


@given(policies, st.integers(1, 10_000), rnds)
def test_delay_within_jitter_envelope_and_cap(policy, attempt, rnd):
    base = policy.base_ms(attempt)
    d = policy.delay_ms(attempt, rnd)
    assert 0 <= d <= policy.max_ms
    assert int(base * (1 - policy.jitter)) - 1 <= d <= min(policy.max_ms, base * (1 + policy.jitter))


@given(policies, st.integers(1, 500), rnds)
def test_envelope_is_monotone(policy, attempt, rnd):
    assert policy.base_ms(attempt) <= policy.base_ms(attempt + 1) <= policy.max_ms
    # With the same random number, a later retry never waits less.
    assert policy.delay_ms(attempt, rnd) <= policy.delay_ms(attempt + 1, rnd)


def test_known_values_without_jitter():
    p = BackoffPolicy(initial_ms=1_000, max_ms=60_000, multiplier=2.0, jitter=0.0)
    assert [p.delay_ms(a, 0.5) for a in range(1, 9)] == [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
    assert p.delay_ms(10**9, 0.0) == 60_000   # no float overflow for huge attempt counts


def test_jitter_reaches_both_edges():
    p = BackoffPolicy(initial_ms=1_000, max_ms=60_000, jitter=0.2)
    assert p.delay_ms(1, 0.0) == 800
    assert p.delay_ms(1, 0.999999) == 1199
    assert p.delay_ms(20, 0.999999) == 60_000   # the cap holds after jitter too


@pytest.mark.parametrize("kwargs", [dict(initial_ms=-1, max_ms=10), dict(initial_ms=10, max_ms=5),
                                    dict(initial_ms=1, max_ms=5, multiplier=0.5),
                                    dict(initial_ms=1, max_ms=5, jitter=1.0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)
    with pytest.raises(ValueError):
        RetryPolicy(max_deliveries=0)
