"""Quorum arithmetic: unit cases and properties."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zq.core import quorum


def test_majority_sizes() -> None:
    assert [quorum.majority(n) for n in (1, 2, 3, 4, 5, 7)] == [1, 2, 2, 3, 3, 4]
    with pytest.raises(ValueError):
        quorum.majority(0)


def test_committed_end_examples() -> None:
    assert quorum.committed_end([10, 7, 3], 3) == 7
    assert quorum.committed_end([10, 7], 3) == 7  # the silent third voter counts as 0
    assert quorum.committed_end([10], 3) == 0
    assert quorum.committed_end([5, 5, 9, 1, 0], 5) == 5
    with pytest.raises(ValueError):
        quorum.committed_end([1, 2, 3, 4], 3)


ends_and_voters = st.integers(min_value=1, max_value=9).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, 1000), min_size=0, max_size=n), st.just(n)))


@given(ends_and_voters)
def test_committed_end_is_held_by_a_majority_and_is_the_highest_such(case: tuple[list[int], int]) -> None:
    ends, voters = case
    end = quorum.committed_end(ends, voters)
    holders = sum(1 for e in ends if e >= end)
    if end > 0:
        assert holders >= quorum.majority(voters)
    # No higher offset is held by a majority.
    assert sum(1 for e in ends if e >= end + 1) < quorum.majority(voters)


@given(ends_and_voters, st.data())
def test_committed_end_is_monotonic_in_each_report(case: tuple[list[int], int], data: st.DataObject) -> None:
    ends, voters = case
    if not ends:
        return
    i = data.draw(st.integers(0, len(ends) - 1))
    bigger = list(ends)
    bigger[i] += data.draw(st.integers(0, 100))
    assert quorum.committed_end(bigger, voters) >= quorum.committed_end(ends, voters)


@given(st.integers(1, 9), st.data())
def test_two_majorities_always_intersect(voters: int, data: st.DataObject) -> None:
    members = list(range(voters))
    a = data.draw(st.sets(st.sampled_from(members)))
    b = data.draw(st.sets(st.sampled_from(members)))
    if quorum.has_majority(a, voters) and quorum.has_majority(b, voters):
        assert a & b


@given(st.dictionaries(st.sampled_from("abcde"), st.integers(0, 10_000)))
def test_quorum_contact_is_the_majority_th_most_recent(contacts: dict[str, int]) -> None:
    voters = 5
    heard = quorum.quorum_contact_ms(contacts, voters)
    if len(contacts) < 3:
        assert heard is None
    else:
        assert heard is not None
        assert sum(1 for t in contacts.values() if t >= heard) >= 3
        assert sum(1 for t in contacts.values() if t > heard) < 3
