"""The leader-side rules of consumer groups: fencing, leasing, acks, the sweep, dead letters, merge, reset.

Theory of operation
-------------------
A partition's leader keeps one `PartitionLead` per group that reads the partition. It wraps the
lattice `DeliveryState` (groupstate.py) with what only the leader needs: a cursor (offsets from
`cursor` up were never leased by this node in this epoch), whether some offset may be waiting to
retry, which dead-letter copies are being written, and how many were written. The node's groups
service (zq/node/groups.py) drives it, in a real node and in the groups simulator (zq/sim/groups.py)
alike; it decides no delivery rule of its own. Every method takes the time and the random numbers it needs
and returns what happened as data; it reads no clock, sends nothing and stores nothing.

Fencing (`check_member`). A request names a member, the generation it believes in and a
partition. The leader's copy of the membership decides: no copy of the group, or a member it has
not heard of while the request's generation is ahead of its own, is `RebalanceInProgress` (the
leader is behind: retry) unless it has stayed unknown for a few gossip rounds; a member it has
not heard of otherwise, or one that left, is `Fenced` (join again). A lease (strict) must be in the leader's current generation and hold the
partition in it. An ack (not strict) must hold the partition in the leader's current view,
whatever generation it names: a rebalance that did not move the partition does not throw away
work that was done, and one that did move it fences the old owner, whose acks then change
nothing (the new owner gets the message again: at least once). A member ahead of the leader's
view that the leader does not yet see holding the partition is `RebalanceInProgress`.

Leasing, in two halves around the shell's reads. `plan_lease(now, want, log_start, hw)` first
skips what retention deleted, then picks the offsets whose retry time has passed (lowest first),
then the range `[cursor, end)` of never-leased offsets up to the high watermark, within the
state's tracked window, for the rest of `want`. The shell reads that range's stored batches and
reports each (`on_read(lo, hi, control)`): a control batch (a leader's epoch marker) holds no
record, so its offsets are done at once. `grant(offsets, owner, lease_ms, now)` then leases what
may be delivered and returns the `Delivery`s, each with its attempt number.

Acks (`on_ack`) apply acked offsets, nacks (the attempt that failed; a repeated nack counts
once) and lease extensions, all under the reset epoch the member was given, so acks from before
a replay are ignored; then the committed offset moves over the done prefix.

The sweep (`sweep`) is the leader's timer: leases past their deadline fail (a failed delivery,
retried after backoff, or due for the dead-letter topic after `max_deliveries`); leases of
members that left or lost the partition fail at once, but only when the leader's membership
copy is settled (its assignment is of its generation); then up to `dead_letter_writes_max` due
offsets are handed out as `DeadLetterWrite`s. Only `on_dead_letter_written(write, ok=True)`, said
when the copy is acknowledged by its quorum, makes the offset done; a failed or lost write is
handed out again by a later sweep (at least once).

Quorum for retries: attempt numbers never go down across leader changes. A first delivery
(attempt 1) is served at once: no number is lower. A redelivery (attempt k >= 2) is served only
once the failure of attempt k - 1 is held on disk by a majority of the partition's replicas
(counting the leader). Every change bumps `version`; the shell gossips the state with its
version and tells `note_held(holder, version, replicas)` when a replica (or the leader's own
store) holds it durably; `confirmed` is the highest version a majority holds. `grant`,
`due_retries` and `ready` leave out a retry whose failure (`unconfirmed[offset]`) or whose
whole copy (`gate`: set by every merge and by `on_taken_over`) is above `confirmed`. A new
leader first merges the copies of a majority of the replicas (the shell gathers them) and calls
`on_taken_over`, so any failure a majority held before (every failure a redelivery was served
after) is in its copy; majorities intersect. So it hands out at least the number any consumer
saw, and the same number again at most once per leader change (the boundary: the old leader
granted it, the new one had not heard). The cost is one round trip to a replica and a write
before a redelivery, and nothing on the first delivery, which is the common path.

Merge and reset. A replica merges a gossiped copy (`merge_from`): the lattice join, after which
the cursor moves to the committed offset (or, when a newer reset epoch arrived, is recomputed).
A new leader starts from its merged copy: offsets it never saw leased are leased again, which is
a redelivery, never a loss. `reset(to_offset, epoch_floor)` opens a new reset epoch, numbered by the
leader's clock and name (`reset_epoch_floor`) so that resets at two nodes never share a number;
dead-letter writes of the old epoch that finish later are ignored (their copy exists, but the
replay delivers the message again).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from zq.core.groups import GroupMembership
from zq.core.groupstate import DLQ_NONE, DeadLetter, Delivery, DeliveryState, Retry
from zq.core.retry import RetryPolicy
from zq.errors import ProtocolError

TP = tuple[str, int]

lease_ms_min, lease_ms_max = 100, 12 * 3_600_000
reason_chars_max = 1_000          # a nack's reason is cut to this
dead_letter_writes_max = 4        # dead-letter copies in flight per partition
moved_retry_delay_ms = 0          # a lease failed because its partition moved is delivered again this soon

FENCED, REBALANCING = "fenced", "rebalance_in_progress"
_NEVER = 1 << 62                  # a time after every deadline


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a member may not lease or settle now. `counted`: a fencing the node counts
    (group_fenced); `generation`: the leader's generation, for the member's error."""

    kind: str           # FENCED or REBALANCING
    message: str
    generation: int | None = None
    counted: bool = False


def unknown_member(m: GroupMembership | None, member_id: str, generation: int, long_unknown: bool,
                   where: str) -> Refusal | None:
    """A refusal if this node has no record of `member_id`, else None.

    A node that has not heard of the member may just be behind (the member joined elsewhere and
    gossip has not come yet): retry. But once the shell has had the member's requests for a few
    gossip rounds without a record coming (`long_unknown`), it is fenced, so that it joins again:
    the nodes that knew it may all have restarted (memberships are not stored), and answering
    "retry" for ever left its consumers heartbeating with no end (found by the groups simulator,
    seed 1652). Fencing at once instead would drop the first acks of every new member whose
    partitions another node leads."""
    if m is not None and member_id in m.records:
        return None
    if not long_unknown and (m is None or m.is_ahead(generation)):
        return Refusal(REBALANCING, f"{where} has not heard of member {member_id} of this group yet; retry shortly")
    return Refusal(FENCED, f"member {member_id} is not in this group; join again")


def check_member(m: GroupMembership | None, member_id: str, generation: int, tp: TP,
                 strict: bool, long_unknown: bool = False) -> Refusal | None:
    """None if `member_id` may lease (strict) or settle deliveries of `tp` now."""
    refusal = unknown_member(m, member_id, generation, long_unknown, f"the leader of {tp[0]}/{tp[1]}")
    if refusal is not None:
        return refusal
    assert m is not None
    group = m.group
    r = m.records[member_id]
    if r.left:
        return Refusal(FENCED, f"member {member_id} left group {group} or its session expired; join again")
    owns = tp in m.assignment_of(member_id)
    if m.is_ahead(generation) and (strict or not owns):
        return Refusal(REBALANCING, f"group {group} is in generation {generation} for the member but "
                                    f"{m.generation} here; retry shortly")
    if strict and generation != m.generation:
        return Refusal(FENCED, f"generation {generation} of group {group} is over (now {m.generation}); "
                               "fetch the new assignment", m.generation, True)
    if not owns:
        return Refusal(FENCED, f"{tp[0]}/{tp[1]} is not assigned to member {member_id} in generation "
                               f"{m.generation} of group {group}", m.generation, True)
    return None


def reset_epoch_floor(now_ms: int, node: str) -> int:
    """The least reset epoch a reset at `node` at `now_ms` opens: the time, with 10 bits naming the node.

    Two resets of one partition at two nodes that had not heard of each other's (a leadership
    change in between, a partition) used to open the same epoch number with different start
    offsets; merge then mixed them, and the later replay could silently skip messages (found by
    the groups simulator, seed 22). Numbered by time and node they differ, and the later one wins."""
    return (max(0, now_ms) << 10) | (zlib.crc32(node.encode()) & 1023)


# ---- effects


@dataclass(frozen=True, slots=True)
class LeasePlan:
    """What a lease may take: due `retries`, then never-leased offsets in `[start, end)`."""

    retries: list[int]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class AckOutcome:
    acked: int          # offsets newly acked
    nacked: int         # nacks that counted
    retries: int        # of which retried later
    dead_letters_due: int


@dataclass(frozen=True, slots=True)
class DeadLetterWrite:
    """Copy `letter.offset` to the dead-letter topic, then call `on_dead_letter_written` with this."""

    epoch: int
    letter: DeadLetter


@dataclass(frozen=True, slots=True)
class SweepOutcome:
    expired: int                  # leases that ran out
    departed: int                 # leases of members that left or lost the partition, failed now
    retries: int
    dead_letters_due: int
    writes: list[DeadLetterWrite]  # dead-letter copies to start now
    changed: bool


# ---- the state machine


@dataclass(slots=True)
class PartitionLead:
    """One (group, partition) as its leader (or a replica that may become it) keeps it."""

    state: DeliveryState
    dead_lettered: int = 0            # copies acknowledged in TOPIC.dlq, for `zq groups`
    cursor: int = 0                   # offsets from here up have never been leased by this node
    maybe_retries: bool = True        # there may be offsets waiting to be retried
    dead_letters_in_flight: set[int] = field(default_factory=set)
    dirty: bool = False               # changed since the shell last persisted it
    changed: bool = False             # changed since the shell last gossiped it
    # Quorum for retries (theory of operation).
    version: int = 0                  # bumped by every change; gossip carries it, acks name it
    confirmed: int = 0                # the highest version a majority of the replicas hold on disk
    needed: int = 0                   # the highest version a retry waits for (max of gate, unconfirmed)
    gate: int = 0                     # every retry waits for this version (a merge, a takeover)
    unconfirmed: dict[int, int] = field(default_factory=dict)   # offset -> version of its latest failure
    held_by: dict[str, int] = field(default_factory=dict)       # replica -> highest version it holds on disk
    # What the sweep may skip (each pass over the offsets costs ~1 ms per 1,000 tracked offsets).
    expire_due_ms: int = 0            # no lease runs out before this (lowered by every grant)
    maybe_dead_letters: bool = True   # some offset may be due for the dead-letter topic
    departed_seen: tuple = ()         # the membership view the last departed-lease pass was made in
    sweeps: int = 0

    @classmethod
    def fresh(cls, committed: int) -> PartitionLead:
        return cls(DeliveryState(committed=committed), cursor=committed, dirty=True, changed=True)

    @classmethod
    def from_state(cls, state: DeliveryState, dead_lettered: int = 0) -> PartitionLead:
        state.maybe_advance_committed()
        lead = cls(state, dead_lettered)
        lead.recompute_cursor()
        lead._close_gate()   # a copy read back or received: not known to be held by a majority
        return lead

    def recompute_cursor(self) -> None:
        """Start over from the committed offset. Not from past the highest tracked offset: an
        offset may be tracked without those below it ever having been delivered (an ack that
        reached a new leader before any lease did, a merged copy), and those were then never
        delivered: the partition stalled after a restart (found by the groups simulator, seed
        4309). Offsets that are tracked are skipped again by `lease` or come back as retries."""
        self.cursor = self.state.committed
        self.maybe_retries = True

    def mark(self) -> None:
        self.dirty = True
        self.changed = True
        self.version += 1

    # ---- quorum for retries

    def _close_gate(self) -> None:
        """Every retry waits until a majority holds this copy as it is now."""
        self.version += 1
        self.gate = self.needed = self.version

    def _failed(self, offsets: list[int]) -> None:
        """These offsets failed in this version: their retries wait until a majority holds it."""
        for o in offsets:
            self.unconfirmed[o] = self.version
        if offsets:
            self.needed = self.version

    def retry_ok(self, offset: int) -> bool:
        """May the next delivery of `offset` (a redelivery) be served now?"""
        if self.needed <= self.confirmed:
            return True
        return max(self.gate, self.unconfirmed.get(offset, 0)) <= self.confirmed

    def wants_confirmation(self) -> bool:
        """Does a retry wait for replicas to say they hold this copy? (the shell asks for acks)"""
        return self.needed > self.confirmed

    def note_held(self, holder: str, version: int, replicas: list[str] | tuple[str, ...]) -> bool:
        """`holder` (a replica, or the leader itself) holds version `version` of this copy on disk.
        True if that confirmed more: retries may have become servable."""
        if holder not in replicas or version <= self.held_by.get(holder, 0) or version > self.version:
            return False
        self.held_by[holder] = version
        need = len(replicas) // 2 + 1
        held = sorted((self.held_by.get(r, 0) for r in replicas), reverse=True)
        confirmed = held[need - 1]
        if confirmed <= self.confirmed:
            return False
        self.confirmed = confirmed
        if self.needed <= confirmed:
            self.unconfirmed.clear()
        else:
            committed = self.state.committed
            self.unconfirmed = {o: v for o, v in self.unconfirmed.items() if v > confirmed and o >= committed}
        return True

    def on_taken_over(self) -> None:
        """This node now leads the partition, with the copies of a majority merged into its own:
        no redelivery until a majority holds the merged copy."""
        self._close_gate()
        self.changed = True   # gossiped (asking for acks) ...
        self.dirty = True     # ... and written, so that the leader's own disk counts too
        self.recompute_cursor()

    # ---- leasing

    def plan_lease(self, now_ms: int, want: int, log_start: int, high_watermark: int) -> LeasePlan:
        st = self.state
        if st.committed < log_start:
            st.skip_to(log_start)   # retention deleted what was below: it can no longer be delivered
            self.mark()
        self.cursor = max(self.cursor, st.committed)
        retries = self.due_retries(now_ms, want)
        start = self.cursor
        end = min(high_watermark, st.committed + st.offsets_tracked_max, start + want - len(retries))
        return LeasePlan(retries, start, max(start, end))

    def due_retries(self, now_ms: int, want: int) -> list[int]:
        """Offsets whose retry time has passed, lowest first, at most `want`."""
        if not self.maybe_retries:
            return []
        out = []
        any_retrying = False
        for o, e in self.state.offsets.items():
            if e.failures > 0 and not e.in_progress and not e.done and e.dead_letter == DLQ_NONE:
                any_retrying = True
                if e.next_visible_ms <= now_ms and self.retry_ok(o):
                    out.append(o)
        self.maybe_retries = any_retrying
        out.sort()
        return out[:want]

    def on_read(self, lo: int, hi: int, control: bool) -> None:
        """The shell read offsets `[lo, hi)` of the planned range; a control batch's are done at once."""
        if control:
            st = self.state
            acked = False
            for o in range(lo, hi):
                acked |= st.ack(o)
            if acked:
                st.maybe_advance_committed()
                self.mark()
        self.cursor = hi

    def grant(self, offsets: list[int], owner: str, lease_ms: int, now_ms: int) -> list[Delivery]:
        lease_ms = min(max(lease_ms, lease_ms_min), lease_ms_max)
        self.expire_due_ms = min(self.expire_due_ms, now_ms + lease_ms)
        if self.needed > self.confirmed:
            # A redelivery waits for its failure to be held by a majority (theory of operation).
            # The range of never-leased offsets may hold retries too (after recompute_cursor).
            offsets_ = self.state.offsets
            offsets = [o for o in offsets if not ((e := offsets_.get(o)) is not None and not e.in_progress
                                                  and e.failures > 0 and not self.retry_ok(o))]
        deliveries = self.state.lease(offsets, owner, now_ms + lease_ms, now_ms)
        if deliveries:
            self.mark()
        return deliveries

    def ready(self, high_watermark: int, now_ms: int) -> bool:
        """May a parked lease find something now?"""
        st = self.state
        if high_watermark > max(self.cursor, st.committed):
            return True
        return self.maybe_retries and any(
            e.failures > 0 and not e.in_progress and not e.done and e.dead_letter == DLQ_NONE
            and e.next_visible_ms <= now_ms and self.retry_ok(o) for o, e in st.offsets.items())

    # ---- acks

    def on_ack(self, member_id: str, epoch: int, acked: Iterable[Any], nacks: Iterable[Any], extends: Iterable[Any],
               now_ms: int, policy: RetryPolicy | None, rnd: Callable[[], float]) -> AckOutcome:
        """Apply one Ack of a member that `check_member` let settle. Raises ProtocolError on a
        malformed row (the rows before it stay applied, as they would in any order)."""
        st = self.state
        n_acked = 0
        for o in acked:
            if type(o) is not int:
                raise ProtocolError("Ack.acked holds offsets")
            n_acked += st.ack(o, epoch)
        nacked = retries = dead = 0
        failed: list[int] = []
        for row in nacks:
            if not (isinstance(row, list) and len(row) == 4 and type(row[0]) is int and type(row[1]) is int
                    and (row[2] is None or type(row[2]) is int) and isinstance(row[3], str)):
                raise ProtocolError("Ack.nacks rows are [offset, attempt, delay_ms|null, reason]")
            assert policy is not None, "a nack needs the topic's retry policy"
            effect = st.nack(row[0], reason=row[3][:reason_chars_max], now_ms=now_ms, policy=policy,
                             rnd=rnd(), delay_ms=row[2], attempt=row[1], epoch=epoch)
            if effect is not None:
                nacked += 1
                r, d = self._count(effect, failed)
                retries += r
                dead += d
        for row in extends:
            if not (isinstance(row, list) and len(row) == 2 and type(row[0]) is int and type(row[1]) is int):
                raise ProtocolError("Ack.extends rows are [offset, lease_ms]")
            st.extend(row[0], member_id, now_ms + min(max(row[1], lease_ms_min), lease_ms_max), now_ms, epoch)
        st.maybe_advance_committed()
        self.mark()
        self._failed(failed)
        return AckOutcome(n_acked, nacked, retries, dead)

    def _count(self, effect: Retry | DeadLetter | None, failed: list[int]) -> tuple[int, int]:
        if isinstance(effect, Retry):
            self.maybe_retries = True
            failed.append(effect.offset)
            return 1, 0
        if isinstance(effect, DeadLetter):
            self.maybe_dead_letters = True
            return 0, 1
        return 0, 0

    # ---- the sweep

    def sweep(self, now_ms: int, m: GroupMembership | None, tp: TP, policy: RetryPolicy,
              rnd: Callable[[], float]) -> SweepOutcome:
        st = self.state
        retries = dead = 0
        failed: list[int] = []
        self.sweeps += 1
        effects: list[Retry | DeadLetter] = []
        if now_ms >= self.expire_due_ms:
            effects = st.expire(now_ms, policy, rnd())
            self.expire_due_ms = min((e.lease.deadline_ms for e in st.offsets.values()
                                      if e.in_progress and e.lease is not None), default=_NEVER)
        for effect in effects:
            r, d = self._count(effect, failed)
            retries += r
            dead += d
        departed, r, d = self._fail_departed(m, tp, now_ms, policy, rnd, failed)
        retries += r
        dead += d
        changed = bool(effects or departed)
        if changed:
            st.maybe_advance_committed()
            self.mark()
            self._failed(failed)
        if self.maybe_dead_letters and not self.dead_letters_in_flight:
            self.maybe_dead_letters = any(e.dead_letter != DLQ_NONE and not e.done for e in st.offsets.values())
        writes = self.take_dead_letters() if (dead or self.dead_letters_in_flight or self.maybe_dead_letters) else []
        return SweepOutcome(len(effects), departed, retries, dead, writes, changed)

    def _fail_departed(self, m: GroupMembership | None, tp: TP, now_ms: int, policy: RetryPolicy,
                       rnd: Callable[[], float], failed: list[int]) -> tuple[int, int, int]:
        """Leases held by members known to have left, or that lost the partition in a rebalance,
        fail now: their acks would be fenced anyway, so waiting for the lease deadline would only
        delay the redelivery to the partition's new owner."""
        if m is None or m.assignment is None or m.assignment.generation != m.generation:
            return 0, 0, 0   # no settled view of the group here yet: leave the leases to their deadlines
        # A lease is granted only to a live member holding the partition in this view, so while the
        # view stays the same no lease can have become a departed one: skip the pass over the
        # offsets (but make it every tenth sweep anyway, in case the view changed in a way this misses).
        seen = (m.generation, id(m.assignment), len(m.records), sum(r.left for r in m.records.values()))
        if seen == self.departed_seen and self.sweeps % 10:
            return 0, 0, 0
        self.departed_seen = seen
        st = self.state
        n_failed = retries = dead = 0
        # owner -> why its leases fail (None: they stand) and the retry delay (None: the topic's backoff)
        why_of: dict[str, tuple[str | None, int | None]] = {}
        for o, e in list(st.offsets.items()):
            if e.in_progress and e.lease is not None and not e.done:
                owner = e.lease.owner
                if owner not in why_of:
                    r = m.records.get(owner)
                    # A partition that moved is no failure of the message: the new owner gets it
                    # now, not after the topic's backoff (measured: with the backoff, a group of
                    # three stalled for a second or more per partition, its tracked window full
                    # behind the leases the first member took before the others joined). A member
                    # that left may have crashed on the message: that one keeps the backoff.
                    why_of[owner] = (None, None) if r is None else ("left the group", None) if r.left else (
                        (None, None) if tp in m.assignment_of(owner)
                        else ("lost the partition in a rebalance", moved_retry_delay_ms))
                why, delay_ms = why_of[owner]
                if why is not None:
                    effect = st.nack(o, reason=f"member {e.lease.owner} {why}", now_ms=now_ms,
                                     policy=policy, rnd=rnd(), attempt=e.attempts, delay_ms=delay_ms)
                    if effect is not None:
                        n_failed += 1
                        a, b = self._count(effect, failed)
                        retries += a
                        dead += b
        return n_failed, retries, dead

    # ---- dead letters

    def take_dead_letters(self) -> list[DeadLetterWrite]:
        """Due dead-letter copies to start now, at most `dead_letter_writes_max` in flight."""
        out = []
        for d in self.state.pending_dead_letters():
            if len(self.dead_letters_in_flight) >= dead_letter_writes_max:
                break
            if d.offset not in self.dead_letters_in_flight:
                self.dead_letters_in_flight.add(d.offset)
                out.append(DeadLetterWrite(self.state.reset_epoch, d))
        return out

    def on_dead_letter_written(self, write: DeadLetterWrite, ok: bool, counted: bool = True) -> bool:
        """The copy is acknowledged by its quorum (ok), or failed. True if the offset is now done."""
        if write.epoch != self.state.reset_epoch:
            return False   # a reset came in between: the in-flight set was cleared, the replay decides
        self.dead_letters_in_flight.discard(write.letter.offset)
        if not ok or not self.state.on_dead_lettered(write.letter.offset, write.epoch):
            return False
        if counted:
            self.dead_lettered += 1
        self.state.maybe_advance_committed()
        self.mark()
        return True

    def abandon_dead_letter(self, write: DeadLetterWrite) -> None:
        """The shell could not even start the write (no leader known): a later sweep tries again."""
        if write.epoch == self.state.reset_epoch:
            self.dead_letters_in_flight.discard(write.letter.offset)

    # ---- merge and reset

    def merge_from(self, other: DeliveryState, dead_lettered: int) -> None:
        st = self.state
        before = st.reset_epoch
        st.merge_from(other)
        # The join may put a done offset at `committed` (one copy acked it, the other had the
        # offsets below it done): move over them now, or no later ack would, and the partition
        # stalled with everything acked (found by the groups simulator, seed 19).
        if st.maybe_advance_committed():
            self.changed = True
        if st.reset_epoch != before:
            self.dead_letters_in_flight.clear()
            self.recompute_cursor()
        else:
            self.cursor = max(self.cursor, st.committed)
            self.maybe_retries = True
        self.dead_lettered = max(self.dead_lettered, dead_lettered)
        self.dirty = True
        self.expire_due_ms = 0            # leases and dead letters may have come in: the next sweep looks
        self.maybe_dead_letters = True
        self.departed_seen = ()
        if st.reset_epoch != before:
            self.unconfirmed.clear()
        # What came in may hold failures no majority holds yet: if this node leads (two leaders for
        # a moment) or comes to, its retries wait until a majority holds the merged copy.
        self._close_gate()

    def reset(self, to_offset: int, epoch_floor: int = 0) -> None:
        """Open a new reset epoch at `to_offset`: the next epoch, or `epoch_floor` if that is higher."""
        self.state.reset(to_offset, max(self.state.reset_epoch + 1, epoch_floor))
        self.cursor = to_offset
        self.maybe_retries = False
        self.dead_letters_in_flight.clear()
        self.unconfirmed.clear()
        self.mark()

    # ---- storage

    def to_dict(self) -> dict[str, Any]:
        return {"s": self.state.to_dict(), "dl": self.dead_lettered}

    @classmethod
    def from_dict(cls, d: Any) -> PartitionLead:
        """Raises ProtocolError."""
        if not isinstance(d, dict) or "s" not in d:
            raise ProtocolError("a stored group state is a map with the state under 's'")
        dl = d.get("dl", 0)
        if type(dl) is not int or dl < 0:
            raise ProtocolError("a stored group state's dead-letter count is an integer >= 0")
        return cls.from_state(DeliveryState.from_dict(d["s"]), dl)
