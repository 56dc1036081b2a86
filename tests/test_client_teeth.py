"""Teeth on the shipped client rules: deliberate bugs put into `zq.core.client_rules.FetchCursors`
(the fetch-position rules the consumer's I/O thread runs), each caught by the seeded
interleavings of seeks, parked fetches and late replies in tests/test_client_rules.py, which
drive that very class. The correct code passes the same property there.
"""
from __future__ import annotations

import pytest

from tests import test_client_rules as rules
from zq.core import client_rules


def _seek_keeping_the_parked_fetch(self, partition: int, offset: int) -> int:
    """Bug: a seek that leaves the fetch parked at the node in flight (the consumer then waits
    for a reply it will drop, and fetches nothing from the new offset)."""
    c = self._cursors[partition]
    c.generation += 1
    c.fetch_offset = offset
    c.stopped = False
    c.failures = 0
    self.positions[partition] = offset
    return c.generation


def _seek_keeping_the_generation(self, partition: int, offset: int) -> int:
    """Bug: a seek that does not start a new generation, so the late reply of a fetch parked
    before it is taken as if it answered the new position."""
    c = self._cursors[partition]
    c.fetch_offset = offset
    c.in_flight = False
    c.stopped = False
    c.failures = 0
    self.positions[partition] = offset
    return c.generation


@pytest.mark.parametrize("bug", [_seek_keeping_the_parked_fetch, _seek_keeping_the_generation],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_broken_seek_in_the_shipped_cursors_is_caught(monkeypatch, bug):
    monkeypatch.setattr(client_rules.FetchCursors, "seek", bug)
    with pytest.raises(AssertionError):
        rules.test_any_interleaving_of_seeks_and_late_replies_hands_out_exactly_the_committed_messages_from_the_last_seek()
