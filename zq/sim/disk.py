"""A simulated disk per node: what a Ready writes, what a sync keeps, what a crash loses.

Each Ready's writes (reset, truncation, entries, hard state) form one atomic write batch (zq.node.replicas
hands them over through zq.sim.cluster.SimStorage), as a RocksDB
WriteBatch does. Batches go to the volatile view at once (reads see them) and to the durable
view only at `sync`. A crash keeps the durable view plus a random prefix of the batches written
since the last sync (a write-ahead log that reached the platter partly), never a torn batch.
Retention (`retain`) deletes entries from the front of a partition whose writes are all synced,
in both views at once (a deletion that a crash undid would only keep committed data longer).

Disk faults (drawn by the simulator while the node is down): a flipped block (`flip`: reading
that entry raises CorruptData, as the store does on a checksum mismatch), a dropped WAL tail
(`drop_synced_tail`: the last few *synced* write batches vanish, storage that lied about an
fsync, as RocksDB's point-in-time recovery drops everything after a damaged record), and a
wiped replica or node (`wipe`). `lost` names the partitions whose loss the shell has detected
(as the real node does at open) and not yet recorded as recovering.
"""
from __future__ import annotations

import random
from bisect import bisect_left, bisect_right

from zq.core.repl_types import Entry, HardState, Ready
from zq.errors import CorruptData

SYNCED_TAIL_KEPT = 4   # synced states a dropped WAL tail may fall back to (each a copy of the durable view)


class PartitionStore:
    """One partition's log and hard state. Doubles as the core's `LogReader`."""

    __slots__ = ("entries", "bases", "hard", "start", "corrupt")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.bases: list[int] = []
        self.hard: HardState | None = None
        self.start = 0  # the log start: entries below it were deleted (retention, a reset)
        self.corrupt: set[int] = set()  # base offsets of entries on a flipped block: reading them fails

    @property
    def log_end(self) -> int:
        return self.entries[-1].end_offset if self.entries else self.start

    def copy(self) -> PartitionStore:
        other = PartitionStore()
        other.entries = list(self.entries)
        other.bases = list(self.bases)
        other.hard = self.hard
        other.start = self.start
        other.corrupt = set(self.corrupt)
        return other

    def retain(self, offset: int) -> None:
        """Delete the entries below `offset` (an entry boundary at or below the log end)."""
        assert offset <= self.log_end and (offset == self.log_end or self.entry_at(offset) is not None)
        i = bisect_left(self.bases, offset)
        del self.entries[:i]
        del self.bases[:i]
        self.start = max(self.start, offset)

    def apply(self, truncate_from: int | None, entries: tuple, hard: HardState | None,
              reset_to: int | None = None) -> None:
        if reset_to is not None:
            self.entries.clear()
            self.bases.clear()
            self.start = reset_to
        if truncate_from is not None:
            i = bisect_left(self.bases, truncate_from)
            del self.entries[i:]
            del self.bases[i:]
        for e in entries:
            assert e.base_offset == self.log_end, "the core appends at the log end"
            self.entries.append(e)
            self.bases.append(e.base_offset)
        if hard is not None:
            self.hard = hard

    def read(self, offset: int, max_bytes: int) -> list[Entry]:
        i = max(0, bisect_right(self.bases, offset) - 1)
        if i < len(self.entries) and self.entries[i].end_offset <= offset:
            i += 1
        out: list[Entry] = []
        size = 0
        while i < len(self.entries):
            e = self.entries[i]
            if out and size + len(e.payload) > max_bytes:
                break
            if e.base_offset in self.corrupt:
                raise CorruptData(f"entry at offset {e.base_offset} fails its checksum", offset=e.base_offset)
            out.append(e)
            size += len(e.payload)
            i += 1
        return out

    def entry_at(self, offset: int) -> Entry | None:
        i = bisect_left(self.bases, offset)
        if i < len(self.bases) and self.bases[i] == offset:
            return self.entries[i]
        return None


class SimDisk:
    def __init__(self, partitions: list[int]) -> None:
        self.partitions = list(partitions)
        self.durable = {p: PartitionStore() for p in self.partitions}
        self.volatile = {p: PartitionStore() for p in self.partitions}
        self.unsynced: list[tuple[int, int | None, tuple, HardState | None, int | None]] = []
        self.lost: set[int] = set()  # partitions found lost or damaged, not yet reopened as recovering
        self.keep_synced_tail = False  # keep SYNCED_TAIL_KEPT earlier durable views (a dropped tail needs them)
        self.synced_tail: list[dict[int, PartitionStore]] = []

    def add_partition(self, partition: int) -> None:
        """A replica created here (by a reassignment): an empty store."""
        assert partition not in self.durable, "a replica is created once, after any earlier one was deleted"
        self.partitions = sorted([*self.partitions, partition])
        self.durable[partition] = PartitionStore()
        self.volatile[partition] = PartitionStore()

    def drop_partition(self, partition: int) -> None:
        """A removed replica's data deleted, durably at once (the shell deletes, then syncs)."""
        self.partitions = [p for p in self.partitions if p != partition]
        del self.durable[partition]
        del self.volatile[partition]
        self.unsynced = [b for b in self.unsynced if b[0] != partition]

    def write(self, partition: int, rd: Ready) -> None:
        """A Ready's writes as one batch."""
        self.write_batch(partition, rd.truncate_from, rd.entries, rd.hard_state, rd.reset_to)

    def write_batch(self, partition: int, truncate_from: int | None, entries: tuple, hard: HardState | None,
                    reset_to: int | None) -> None:
        """One write batch of a partition (a Ready's writes, or a high-watermark hint alone)."""
        batch = (partition, truncate_from, tuple(entries), hard, reset_to)
        self.volatile[partition].apply(*batch[1:])
        self.unsynced.append(batch)

    def sync(self) -> None:
        if self.keep_synced_tail and self.unsynced:
            self.synced_tail.append({p: self.durable[p].copy() for p in self.partitions})
            del self.synced_tail[:-SYNCED_TAIL_KEPT]
        for p, trunc, entries, hard, reset in self.unsynced:
            self.durable[p].apply(trunc, entries, hard, reset)
        self.unsynced.clear()

    def crash(self, rng: random.Random, power_loss: bool = True) -> int:
        """Lose the volatile state; returns how many unsynced batches survived.

        A power loss keeps a random prefix of the unsynced batches (by luck); a process kill
        keeps them all, since they sit in the operating system's page cache."""
        if not power_loss:
            kept = len(self.unsynced)
        else:
            kept = rng.randrange(len(self.unsynced) + 1) if self.unsynced else 0
        for p, trunc, entries, hard, reset in self.unsynced[:kept]:
            self.durable[p].apply(trunc, entries, hard, reset)
        self.unsynced.clear()
        self.volatile = {p: self.durable[p].copy() for p in self.partitions}
        return kept

    def has_unsynced(self, partition: int) -> bool:
        return any(b[0] == partition for b in self.unsynced)

    def retain(self, partition: int, offset: int) -> None:
        """Retention: delete a partition's entries below `offset`, durably (all its writes synced)."""
        assert not self.has_unsynced(partition), "retention here runs on a synced partition only"
        self.durable[partition].retain(offset)
        self.volatile[partition].retain(offset)

    # -- faults (the node is down)

    def flip(self, partition: int, base_offset: int) -> None:
        """A flipped block under one entry: reading it raises CorruptData."""
        self.durable[partition].corrupt.add(base_offset)
        self.volatile[partition].corrupt.add(base_offset)  # the node is down: its next view is the disk's

    def drop_synced_tail(self, rng: random.Random) -> int:
        """The last 1..SYNCED_TAIL_KEPT synced batches vanish (all partitions: one WAL). Every
        partition is then lost (its hard state went with the tail). Returns how many syncs."""
        if not self.synced_tail:
            return 0
        k = rng.randint(1, len(self.synced_tail))
        view = self.synced_tail[-k]
        del self.synced_tail[-k:]
        self.durable = {p: view[p].copy() if p in view else PartitionStore() for p in self.partitions}
        self.volatile = {p: self.durable[p].copy() for p in self.partitions}
        self.lost.update(self.partitions)
        return k

    def wipe(self, partitions: list[int]) -> None:
        for p in partitions:
            self.durable[p] = PartitionStore()
            self.volatile[p] = PartitionStore()
        self.synced_tail.clear()
        self.lost.update(partitions)

    def set_aside(self, partition: int) -> None:
        """The shell found the partition corrupt: it starts again empty (and recovering)."""
        self.durable[partition] = PartitionStore()
        self.volatile[partition] = PartitionStore()
        self.unsynced = [b for b in self.unsynced if b[0] != partition]
        self.lost.add(partition)
