"""One partition as its leader sees it: offsets, the high watermark, idempotent producers.

Theory of operation
-------------------
The leader assigns offsets: a produced batch of `count` records takes `[log_end, log_end +
count)`, and `log_end` moves past it at once, so batches that arrive in the same loop pass get
consecutive ranges before any of them is on disk. A batch becomes visible to consumers only when
the shell reports it durable (`on_durable`): the high watermark is the first offset not yet
durable, it never moves back, and a fetch never returns anything at or above it. In a partition
with one replica "durable on the leader" is "committed"; the replication core generalises this
to a majority of the replica set.

Append times are the leader's clock, forced non-decreasing, so the time index can be searched.

An idempotent producer sends `(producer_id, base_sequence)` with each batch. The partition keeps,
per producer, the sequence it expects next and where its last batch went. A batch whose sequence
is below that is a retry of a batch already appended: it is not written again, and the original
offsets are returned. A batch above it means batches were lost in between: it is refused, because
writing it would break the producer's order. The table is bounded (`producers_max`); the least
recently seen producer is forgotten first, which costs that producer its deduplication, never data.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from zq.errors import OffsetOutOfRange, OutOfOrderSequence


@dataclass(frozen=True, slots=True)
class Append:
    base_offset: int
    append_time_ms: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The batch was appended before at `base_offset`; nothing is written."""
    base_offset: int
    append_time_ms: int


@dataclass(slots=True)
class _ProducerState:
    next_sequence: int
    last_base_sequence: int
    last_base_offset: int
    last_append_time_ms: int


class PartitionLog:
    producers_max = 10_000    # idempotent producers remembered per partition

    def __init__(self, log_start: int = 0, log_end: int = 0, epoch: int = 0, last_append_time_ms: int = 0):
        self.log_start = log_start
        self.log_end = log_end
        self.high_watermark = log_end     # what is on disk at start was durable before the restart
        self.epoch = epoch
        self.last_append_time_ms = last_append_time_ms
        self._producers: OrderedDict[int, _ProducerState] = OrderedDict()

    # ---- produce

    def on_produce(self, count: int, producer_id: int, base_sequence: int, now_ms: int) -> Append | Duplicate:
        assert count >= 1
        if producer_id:
            seen = self._producers.get(producer_id)
            if seen is not None:
                self._producers.move_to_end(producer_id)
                if base_sequence == seen.last_base_sequence:
                    return Duplicate(seen.last_base_offset, seen.last_append_time_ms)
                if base_sequence < seen.next_sequence:
                    # An older retry than the last batch: it was appended, but its offsets are no longer
                    # remembered. Answer with the sequence error rather than writing it twice.
                    raise OutOfOrderSequence(
                        f"producer {producer_id} resent sequence {base_sequence}, older than its last batch "
                        f"({seen.last_base_sequence}); it was written before", producer_id=producer_id)
                if base_sequence > seen.next_sequence:
                    raise OutOfOrderSequence(
                        f"producer {producer_id} skipped from sequence {seen.next_sequence} to {base_sequence}; "
                        "batches were lost in between: restart the producer", producer_id=producer_id)
        now_ms = max(now_ms, self.last_append_time_ms)
        base = self.log_end
        self.log_end += count
        self.last_append_time_ms = now_ms
        if producer_id:
            self._remember(producer_id, base_sequence, count, base, now_ms)
        return Append(base, now_ms)

    def _remember(self, producer_id: int, base_sequence: int, count: int, base_offset: int, time_ms: int) -> None:
        self._producers[producer_id] = _ProducerState(base_sequence + count, base_sequence, base_offset, time_ms)
        self._producers.move_to_end(producer_id)
        while len(self._producers) > self.producers_max:
            self._producers.popitem(last=False)

    def restore_producer(self, producer_id: int, base_sequence: int, count: int, base_offset: int,
                         time_ms: int) -> None:
        """Rebuild producer state from a batch header read back from the log at start."""
        if producer_id:
            self._remember(producer_id, base_sequence, count, base_offset, time_ms)

    # ---- durability and visibility

    def maybe_advance_high_watermark(self, durable_end: int) -> bool:
        """The shell made everything below `durable_end` durable. True if the high watermark moved."""
        new = min(durable_end, self.log_end)
        if new > self.high_watermark:
            self.high_watermark = new
            return True
        return False

    def check_fetch(self, offset: int) -> bool:
        """True if there is committed data at `offset` now, False if a fetch should wait for it."""
        if offset < self.log_start or offset > self.high_watermark:
            raise OffsetOutOfRange(
                f"offset {offset} is outside the retained range [{self.log_start}, {self.high_watermark}]; "
                "read from --from earliest or latest", log_start=self.log_start, high_watermark=self.high_watermark)
        return offset < self.high_watermark

    def abort_appends(self, log_end: int, last_append_time_ms: int, producer_ids: set[int]) -> None:
        """The write of this pass failed (disk full): forget the offsets it took and the producers it touched."""
        assert self.high_watermark <= log_end <= self.log_end
        self.log_end = log_end
        self.last_append_time_ms = last_append_time_ms
        for pid in producer_ids:
            self._producers.pop(pid, None)

    def on_retention(self, new_log_start: int) -> None:
        assert new_log_start <= self.high_watermark
        self.log_start = max(self.log_start, new_log_start)
