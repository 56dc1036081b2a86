"""The invariants of consumer groups that the groups simulator checks, after every step and after
the final drain.

The checker knows the truth the nodes do not: the committed log of every partition, every
message a consumer's application handled (acked), every dead-letter record in `TOPIC.dlq`, every
reset and every change of partition leader. Keys are `(group, partition, reset_epoch, offset)`.

- Accounting: whenever a node's delivery state says the group committed past an offset (in a
  reset epoch, above that epoch's start), that offset was handled by some consumer, or its
  dead-letter copy is in the dead-letter topic, or it is a control record. So the committed
  offset is never ahead of what the group processed, and a dead letter is written before its
  source counts as done. After the drain, every committed message of the last epoch is done on
  the leader, and is acknowledged or dead-lettered: exactly one of the two, unless its partition
  changed leader since its first delivery (a lost update can make a new leader take a late ack
  of a message whose copy is written, or write a copy of a message acked; counted, acked_and_dead).
- Attempts never go down: the attempt number handed out for an offset is at least every attempt
  number handed out for it before in that reset epoch, by any leader (a crash or a move starts a
  new one): a redelivery is served only once a majority holds the failure before it, and a new
  leader reads a majority's copies first (grouplead.py, quorum for retries). A drop across a
  leader change is counted (attempt_drops) and fails the seed like one within a term.
- Bounded deliveries: in each reset epoch, an offset is delivered at most `max_deliveries` times
  plus one per interruption since its first delivery: a poison message is never retried forever.
  A consumer that crashed or left, a rebalance that moved the partition and a lease the consumer
  let run out all end their delivery as a failure, which counts towards `max_deliveries`; what
  remains is a leader change, after which the new leader may hand out once more the number the
  old one handed out last. A delivery is a distinct (leader term, attempt) pair: a leader that
  hands its own live lease out again to the same owner (its reply was lost) delivers nothing new.
- Dead letters: each record in `TOPIC.dlq` names exactly one source (partition, offset), holds
  that source's value, and was written after `max_deliveries` failed deliveries; and there is at
  most one record per source message and group, across retries of its write, leader changes of
  the source and of the dead-letter partition, crashes and resets (a write answered "duplicate"
  by the dead-letter partition's idempotent-producer table counts as that copy).
- Fencing: an Ack from a member that the leader's own membership copy says is not live or does
  not hold the partition changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from zq.core.groupstate import DeliveryState
from zq.sim.checks import Violation

Key = tuple[str, int, int, int]   # (group, partition, reset_epoch, offset)


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """What the simulated `TOPIC.dlq` holds: the headers the service writes, and the value."""

    group: str
    source_partition: int
    source_offset: int
    epoch: int           # the reset epoch of the state that asked for it (the sim's own bookkeeping)
    attempts: int
    value: bytes


class GroupChecker:
    def __init__(self, max_deliveries: int) -> None:
        self.max_deliveries = max_deliveries
        self.values: dict[int, list[bytes]] = {}        # partition -> committed log (None: control record)
        self.epoch_start: dict[tuple[str, int, int], int] = {}   # (group, p, epoch) -> first offset
        self.handled: set[Key] = set()
        self.dead: dict[Key, int] = {}                  # dead-letter copies written
        self.dead_records: list[DeadLetterRecord] = []
        self.dead_sources: dict[tuple[str, int, int], DeadLetterRecord] = {}   # (group, p, offset) -> its copy
        self.attempt_max: dict[Key, tuple[int, int]] = {}   # (leader term, highest attempt in it)
        self.attempt_drops = 0
        self.deliveries_over = 0    # grants beyond max_deliveries + one per leader change (each fails the seed)
        self.applied: set[Key] = set()   # acks a leader applied (the state says acked)
        self.grants: dict[Key, set[tuple[int, int]]] = {}   # (leader term, attempt) pairs
        self.first_term: dict[Key, int] = {}
        self.leader_terms: dict[int, int] = {}          # partition -> leader changes so far
        self.checked: dict[tuple[str, str, int], tuple[int, int]] = {}   # (node, group, p) -> (epoch, committed)
        self.fenced_acks = 0

    # ---- facts

    def on_append(self, p: int, value: bytes | None) -> None:
        self.values.setdefault(p, []).append(value)

    def on_leader_change(self, p: int) -> None:
        self.leader_terms[p] = self.leader_terms.get(p, 0) + 1

    def on_epoch(self, group: str, p: int, epoch: int, start: int) -> None:
        key = (group, p, epoch)
        old = self.epoch_start.get(key)
        if old is not None and old != start:
            raise Violation("one start per reset epoch",
                            f"group {group} partition {p} epoch {epoch} started at {old} and at {start}")
        self.epoch_start[key] = start

    def on_handled(self, group: str, p: int, epoch: int, offset: int) -> None:
        self.handled.add((group, p, epoch, offset))

    def on_grant(self, group: str, p: int, epoch: int, offset: int, attempt: int) -> None:
        k = (group, p, epoch, offset)
        term = self.leader_terms.get(p, 0)
        seen_term, seen = self.attempt_max.get(k, (term, 0))
        if attempt < seen:
            self.attempt_drops += 1
            by = "by the same leader" if seen_term == term else f"{term - seen_term} leader changes before"
            raise Violation("attempts never go down",
                            f"group {group} {p}/{offset} epoch {epoch}: attempt {attempt} handed out after "
                            f"{seen} ({by})")
        if attempt >= seen:
            self.attempt_max[k] = (term, attempt)
        grants = self.grants.setdefault(k, set())
        grants.add((term, attempt))
        first = self.first_term.setdefault(k, term)
        changes = term - first
        if len(grants) > self.max_deliveries + changes:
            self.deliveries_over += 1
            raise Violation("deliveries bounded",
                            f"group {group} {p}/{offset} epoch {epoch}: {len(grants)} deliveries "
                            f"{sorted(grants)}, more than max_deliveries {self.max_deliveries} plus one per "
                            f"leader change ({changes})")

    def on_dead_letter(self, rec: DeadLetterRecord) -> None:
        log = self.values.get(rec.source_partition, [])
        if not 0 <= rec.source_offset < len(log) or log[rec.source_offset] is None:
            raise Violation("dead letter matches one source",
                            f"{rec} names no committed record")
        if log[rec.source_offset] != rec.value:
            raise Violation("dead letter matches one source",
                            f"{rec} holds another value than its source {log[rec.source_offset]!r}")
        if rec.attempts < self.max_deliveries:
            raise Violation("dead letter after max_deliveries",
                            f"{rec} written after {rec.attempts} < {self.max_deliveries} deliveries")
        source = (rec.group, rec.source_partition, rec.source_offset)
        if source in self.dead_sources:
            raise Violation("at most one dead letter per source message",
                            f"group {rec.group} {rec.source_partition}/{rec.source_offset} is in the dead-letter "
                            f"topic twice: {self.dead_sources[source]} and {rec}")
        self.dead_sources[source] = rec
        k = (rec.group, rec.source_partition, rec.epoch, rec.source_offset)
        self.dead[k] = self.dead.get(k, 0) + 1
        self.dead_records.append(rec)

    def on_dead_letter_duplicate(self, rec: DeadLetterRecord) -> None:
        """A dead-letter write answered as a duplicate of the copy already there (idempotent producer):
        the copy exists for the epoch that asked too."""
        first = self.dead_sources.get((rec.group, rec.source_partition, rec.source_offset))
        if first is None or first.value != rec.value:
            raise Violation("dead letter matches one source", f"{rec} was answered as a duplicate of {first}")
        k = (rec.group, rec.source_partition, rec.epoch, rec.source_offset)
        self.dead[k] = self.dead.get(k, 0) + 1

    def on_ack_applied(self, group: str, p: int, epoch: int, offset: int) -> None:
        self.applied.add((group, p, epoch, offset))

    def on_fenced_ack(self, before: DeliveryState | None, after: DeliveryState | None, detail: str) -> None:
        self.fenced_acks += 1
        if before != after:
            raise Violation("fenced acks change nothing", f"{detail}: {before} became {after}")

    # ---- state checks

    def _done_ok(self, group: str, p: int, epoch: int, offset: int) -> bool:
        k = (group, p, epoch, offset)
        log = self.values.get(p, [])
        return k in self.handled or k in self.dead or (offset < len(log) and log[offset] is None)

    def check_state(self, node: str, group: str, p: int, st: DeliveryState) -> None:
        """The committed offset of a node's copy is never ahead of what the group processed."""
        ck = (node, group, p)
        epoch, done_to = self.checked.get(ck, (-1, 0))
        if st.reset_epoch != epoch:
            start = self.epoch_start.get((group, p, st.reset_epoch))
            if start is None:
                raise Violation("known reset epochs", f"{node} holds group {group} {p} in epoch "
                                f"{st.reset_epoch}, which no reset opened")
            epoch, done_to = st.reset_epoch, start
        if st.committed <= done_to:
            self.checked[ck] = (epoch, done_to)
            return
        hw = len(self.values.get(p, []))
        if st.committed > hw:
            raise Violation("committed within the log", f"{node}: group {group} {p} committed {st.committed} > "
                            f"high watermark {hw}")
        for o in range(done_to, st.committed):
            if not self._done_ok(group, p, epoch, o):
                raise Violation("committed never ahead of processed",
                                f"{node}: group {group} {p} epoch {epoch} committed {st.committed}, but offset {o} "
                                "was neither acknowledged by a consumer nor dead-lettered")
        self.checked[ck] = (epoch, st.committed)

    def check_final(self, group: str, p: int, st: DeliveryState) -> dict[str, int]:
        """After the drain, on the leader: nothing pending, every message of the epoch accounted for."""
        hw = len(self.values.get(p, []))
        if st.committed != hw:
            raise Violation("nothing pending after the drain",
                            f"group {group} {p}: committed {st.committed}, high watermark {hw}, state {st}")
        start = self.epoch_start[(group, p, st.reset_epoch)]
        counts = {"acked": 0, "dead_lettered": 0, "both": 0, "control": 0}
        for o in range(start, hw):
            k = (group, p, st.reset_epoch, o)
            if self.values[p][o] is None:
                counts["control"] += 1
            elif k in self.applied and k in self.dead:
                # Only a lost update may do this: a new leader whose copy lacked "due for the
                # dead-letter topic" took a late ack, or one that lacked the ack wrote the copy.
                if self.leader_terms.get(p, 0) == self.first_term.get(k, 0):
                    raise Violation("exactly one of acknowledged or dead-lettered",
                                    f"group {group} {p}/{o} epoch {st.reset_epoch} was both, with one leader")
                counts["both"] += 1
            elif k in self.handled:
                counts["acked"] += 1
            elif k in self.dead:
                counts["dead_lettered"] += 1
            else:
                raise Violation("every message acknowledged or dead-lettered",
                                f"group {group} {p}/{o} epoch {st.reset_epoch} is done but was neither")
        return counts
