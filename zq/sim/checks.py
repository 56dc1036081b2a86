"""The invariants the simulator checks after every step, kept incremental so thousands of
seeds fit in a test run.

The checker keeps, per partition, the committed log as every replica has reported it: each time
a replica's high watermark moves from `old` to `new`, its entries in `[old, new)` are added, or
compared with what is there. From that:

- committed prefixes agree: never two different batches at one (partition, offset) below any
  replica's high watermark;
- the high watermark of a replica never moves back (within one incarnation: a restart rebuilds
  the replica from its disk, and its prefix is checked again);
- at most one leader per (partition, epoch);
- an acknowledged write is in the committed log at the offset and epoch it was acknowledged
  with; every new leader holds the whole committed log; no replica ever deletes an entry of the
  committed log (so no future leader can lack one);
- an idempotent producer's batch is committed at most once, unless the replica that committed
  it again had deleted the first copy by retention (its producer table is built from its log, so
  a retry older than the log start is written again, as in Kafka once a producer's state
  expired; counted in `retention_duplicates`);
- what a consumer read below a leader's high watermark is committed, and stays in every log;
- a leader appends a configuration only after the one before it in its log is committed (below
  the high watermark some replica has reported), and only one differing by at most one voter
  from it;
- a replica restarts its log at an offset (StartAt) only at or below some replica's log start
  that retention made, and at or below the committed log;
- at the end, every voter of the final configuration holds every acknowledged write from its
  log start on.

Retention deletes the front of logs: everything here looks at a replica's log from its log start
on (the committed log below it was checked while the replica still held it).
"""
from __future__ import annotations

from dataclasses import dataclass

from zq.batch import HEADER_SIZE
from zq.core.repl_types import NO_PRODUCER, Entry


class Violation(Exception):
    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Ack:
    partition: int
    base_offset: int
    epoch: int
    payload: bytes     # the producer's record blob (what the stored batch holds after its header)


def records(payload: bytes) -> bytes:
    """A stored batch's record blob: what a producer sent (the header holds the leader's stamps)."""
    return payload[HEADER_SIZE:]


def _same(a: Entry, b: Entry) -> bool:
    return (a.base_offset, a.count, a.epoch, a.payload, a.producer_id, a.base_sequence) == (
        b.base_offset, b.count, b.epoch, b.payload, b.producer_id, b.base_sequence)


class Checker:
    def __init__(self, partitions: list[int]) -> None:
        self.committed: dict[int, dict[int, Entry]] = {p: {} for p in partitions}
        self.committed_end: dict[int, int] = {p: 0 for p in partitions}
        # Per committed offset, the lowest epoch of a replica seen holding it committed: the
        # epoch that committed it, or a later one (which only weakens the check, never falsely).
        self.commit_epoch: dict[int, dict[int, int]] = {p: {} for p in partitions}
        self.hw: dict[tuple[str, int], int] = {}
        self.leaders: dict[tuple[int, int], str] = {}
        self.acks: dict[int, list[Ack]] = {p: [] for p in partitions}
        self.reads: dict[int, dict[int, Entry]] = {p: {} for p in partitions}
        self.idempotent: dict[tuple[int, int, int], int] = {}  # (partition, producer, seq) -> offset
        self.retained: dict[int, int] = {p: 0 for p in partitions}  # highest log start retention made
        self.retention_duplicates = 0

    # -- events

    def on_high_watermark(self, node: str, p: int, new: int, replica) -> None:
        old = self.hw.get((node, p), 0)
        if new < old:
            raise Violation("high watermark moved back", f"{node} p{p}: {old} -> {new}")
        self.hw[(node, p)] = new
        self._absorb(node, p, old, new, replica)

    def on_restart(self, node: str, p: int, replica) -> None:
        self.hw[(node, p)] = replica.high_watermark
        self._absorb(node, p, 0, replica.high_watermark, replica)

    def on_log_start(self, node: str, p: int, offset: int) -> None:
        """Retention deleted `node`'s entries of p below `offset` (it checks they were committed)."""
        if offset > self.hw.get((node, p), 0):
            raise Violation("retention deleted uncommitted entries", f"{node} p{p} up to {offset}")
        self.retained[p] = max(self.retained[p], offset)

    def before_reset(self, node: str, p: int, offset: int) -> None:
        """`node` drops its log of p to restart it at `offset` (StartAt from its leader)."""
        if offset > self.retained[p] or offset > self.committed_end[p]:
            raise Violation("log restarted above what retention deleted",
                            f"{node} p{p} at {offset}: retention reached {self.retained[p]}, "
                            f"committed to {self.committed_end[p]}")

    def on_leader(self, node: str, p: int, epoch: int, replica) -> None:
        other = self.leaders.setdefault((p, epoch), node)
        if other != node:
            raise Violation("two leaders in one epoch", f"p{p} epoch {epoch}: {other} and {node}")
        # Leader completeness: an entry committed in epoch c is in the log of every leader of
        # an epoch after c. (A leader of an older epoch, elected with stale votes, may lack it;
        # it can commit nothing.)
        for offset in sorted(self.committed[p]):
            c = self.committed[p][offset]
            if self.commit_epoch[p][offset] >= epoch or offset < replica.log_start:
                continue
            got = replica.entries(offset, 1, 0)
            if not got or not _same(got[0], c):
                raise Violation("new leader lacks committed entries",
                                f"{node} leads p{p} epoch {epoch} without offset {offset} committed in epoch "
                                f"{self.commit_epoch[p][offset]}: has {got[:1]}")

    def on_config_appended(self, node: str, p: int, entry: Entry, replica) -> None:
        """A leader appended configuration `entry` (its high watermark already absorbed)."""
        before = [(o, v) for o, v in replica.config_history if o < entry.base_offset]
        if not before:
            raise Violation("configuration history lost", f"{node} p{p}: none before offset {entry.base_offset}")
        prev_offset, prev = before[-1]
        new = entry.config
        if len(set(prev) ^ set(new)) > 1:  # 0: a leader restating it in its own epoch
            raise Violation("configuration changed by more than one voter",
                            f"{node} p{p} offset {entry.base_offset}: {list(prev)} -> {list(new)}")
        if prev_offset >= self.committed_end[p]:
            raise Violation("configuration changed before the previous one committed",
                            f"{node} p{p} offset {entry.base_offset}: previous at {prev_offset}, "
                            f"committed to {self.committed_end[p]}")

    def before_truncate(self, node: str, p: int, offset: int, store) -> None:
        committed = self.committed[p]
        for e in store.read(offset, 1 << 62):
            if e.base_offset >= self.committed_end[p]:
                break
            c = committed.get(e.base_offset)
            if c is not None and _same(c, e):
                raise Violation("committed entry deleted",
                                f"{node} p{p} truncates at {offset}, cutting committed offset {e.base_offset}")

    def on_ack(self, ack: Ack) -> None:
        c = self.committed[ack.partition].get(ack.base_offset)
        if c is None or c.epoch != ack.epoch or records(c.payload) != ack.payload:
            raise Violation("acknowledged write not committed",
                            f"p{ack.partition} offset {ack.base_offset} epoch {ack.epoch}: committed has {c}")
        self.acks[ack.partition].append(ack)

    def on_read(self, node: str, p: int, entry: Entry) -> None:
        c = self.committed[p].get(entry.base_offset)
        if c is None or not _same(c, entry):
            raise Violation("consumer saw an uncommitted entry", f"{node} p{p} offset {entry.base_offset}: {entry}")
        self.reads[p][entry.base_offset] = entry

    # -- final

    def check_converged_logs(self, p: int, replicas: list) -> None:
        """Liveness end: every replica holds the committed log and every acknowledged write."""
        for node, r in replicas:
            self._compare(node, p, r.log_start, self.committed_end[p], r, "replica lacks committed entries")
            for ack in self.acks[p]:
                if ack.base_offset < r.log_start:
                    continue  # deleted by retention, as it may be
                got = r.entries(ack.base_offset, 1, 0)
                if not got or got[0].base_offset != ack.base_offset or records(got[0].payload) != ack.payload:
                    raise Violation("acknowledged write lost", f"{node} p{p} offset {ack.base_offset}")
            for offset, seen in self.reads[p].items():
                if offset < r.log_start:
                    continue
                got = r.entries(offset, 1, 0)
                if not got or not _same(got[0], seen):
                    raise Violation("entry a consumer saw was taken back", f"{node} p{p} offset {offset}")

    # -- helpers

    def _absorb(self, node: str, p: int, old: int, new: int, replica) -> None:
        committed = self.committed[p]
        pos = max(old, replica.log_start)
        while pos < new:
            chunk = replica.entries(pos, 256, 1 << 30)
            if not chunk or chunk[0].base_offset != pos:
                raise Violation("committed prefix has a hole", f"{node} p{p} at offset {pos} (hw {new})")
            for e in chunk:
                if e.base_offset >= new:
                    break
                c = committed.get(e.base_offset)
                epochs = self.commit_epoch[p]
                epochs[e.base_offset] = min(epochs.get(e.base_offset, replica.epoch), replica.epoch)
                if c is None:
                    if e.end_offset > new:
                        raise Violation("high watermark inside a batch", f"{node} p{p} hw {new}")
                    committed[e.base_offset] = e
                    self._note_idempotent(p, e, replica)
                elif not _same(c, e):
                    raise Violation("two different batches at one offset",
                                    f"{node} p{p} offset {e.base_offset}: {c} vs {e}")
                pos = e.end_offset
        if new > self.committed_end[p]:
            self.committed_end[p] = new

    def _note_idempotent(self, p: int, e: Entry, replica) -> None:
        if e.producer_id == NO_PRODUCER:
            return
        key = (p, e.producer_id, e.base_sequence)
        first = self.idempotent.setdefault(key, e.base_offset)
        if first != e.base_offset and first < replica.log_start:
            # The first replica to pass an entry with its high watermark is the leader that wrote
            # it; its log no longer held the first copy.
            self.retention_duplicates += 1
            self.idempotent[key] = e.base_offset
        elif first != e.base_offset:
            raise Violation("idempotent batch written twice",
                            f"p{p} producer {e.producer_id} seq {e.base_sequence} at {first} and {e.base_offset}")

    def _compare(self, node: str, p: int, start: int, end: int, replica, invariant: str) -> None:
        committed = self.committed[p]
        pos = start
        while pos < end:
            chunk = replica.entries(pos, 256, 1 << 30)
            if not chunk:
                raise Violation(invariant, f"{node} p{p} has nothing at offset {pos} (committed to {end})")
            for e in chunk:
                if e.base_offset >= end:
                    break
                c = committed.get(e.base_offset)
                if c is None or not _same(c, e):
                    raise Violation(invariant, f"{node} p{p} offset {e.base_offset}: {e} vs committed {c}")
                pos = e.end_offset
