"""The replication core over a log whose first entries retention deleted (log start > 0)."""
from __future__ import annotations

import random

from zq.core.replication import Replica
from zq.core.repl_types import NO_PRODUCER, Entry, HardState


class TailReader:
    """A stable log whose entries below `start` are gone: a read below it starts at the first kept."""

    def __init__(self, entries: list[Entry], start: int):
        self.entries = [e for e in entries if e.base_offset >= start]

    def read(self, offset: int, max_bytes: int) -> list[Entry]:
        out = [e for e in self.entries if e.end_offset > offset]
        return out[:1] if max_bytes <= 0 else out


def test_a_replica_restarts_over_a_log_whose_start_was_deleted():
    entries = [Entry(0, 1, 1, NO_PRODUCER, NO_PRODUCER, b"")] + [
        Entry(1 + 2 * i, 2, 1, 7, 2 * i, b"batch%d" % i) for i in range(4)]
    reader = TailReader(entries, start=1)      # the epoch marker at offset 0 was deleted by retention
    hs = HardState(epoch=1, voted_for="a", epoch_history=((1, 0),), high_watermark=9)
    r = Replica("a", ["a", "b", "c"], reader, rng=random.Random(1), hard_state=hs, log_end=9)
    assert r.log_end == 9 and r.high_watermark == 9
    # The idempotent producer's batches were found from the first kept entry on: a retry of the
    # last one is answered with its original offset once this replica leads.
    assert r._producers[7][-1][:3] == (6, 2, 7)


def test_a_replica_restarts_over_a_log_that_retention_emptied():
    reader = TailReader([Entry(0, 1, 1, NO_PRODUCER, NO_PRODUCER, b"")], start=1)   # only the marker, deleted
    hs = HardState(epoch=1, voted_for="a", epoch_history=((1, 0),), high_watermark=1)
    r = Replica("a", ["a", "b", "c"], reader, rng=random.Random(1), hard_state=hs, log_end=1)
    assert r.log_end == 1 and r.high_watermark == 1 and not r._producers
