"""Deduper: a bounded memory of recent message ids."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zq.dedupe import Deduper


def test_second_sight_is_a_duplicate():
    d = Deduper(capacity=3)
    assert [d.seen(x) for x in [b"a", b"b", b"a", b"c", b"b"]] == [False, False, True, False, True]


def test_least_recently_seen_is_forgotten_first():
    d = Deduper(capacity=2)
    d.seen("a"), d.seen("b"), d.seen("a")   # a is now the most recent
    assert d.seen("c") is False              # evicts b
    assert "b" not in d and "a" in d and len(d) == 2
    assert d.seen("b") is False


def test_forget_lets_a_redelivery_through():
    d = Deduper(capacity=2)
    d.seen("x")
    d.forget("x")
    assert d.seen("x") is False


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        Deduper(capacity=0)


@given(st.integers(1, 20), st.lists(st.integers(0, 30), max_size=200))
def test_matches_a_model_lru(capacity, ids):
    d = Deduper(capacity)
    model: list[int] = []
    for x in ids:
        assert d.seen(x) == (x in model)
        if x in model:
            model.remove(x)
        model.append(x)
        model = model[-capacity:]
        assert len(d) == len(model) <= capacity
