"""The replication core's role changes, the founding of a new partition and the recovering
replica's poll: one of the parts `zq.core.replication.Replica` is made of (the rules are in that
module's docstring).
"""
from __future__ import annotations

from zq.core import quorum
from zq.core.repl_types import (
    CANDIDATE, FOLLOWER, LEADER, MARKER_PAYLOAD, NO_PRODUCER, Entry, HardState, PreVote, RecoveryPoll, RequestVote,
    RoleChange,
)

VOTE_FORGOTTEN = ""    # voted_for of an epoch whose vote a recovered replica may have cast and lost: no node's name
WALL_OFFSET_KEPT_TIMEOUTS = 4   # a voter's best clock offset sample is kept this many election timeouts
FOUNDING_EPOCH = 1     # the epoch a new partition's founder leads from its creation (see "Founding")
FOUNDING_GRACE_TIMEOUTS = 2   # election timeouts a founding gives the set's members to apply the creating command


def founding_state(founder: str) -> HardState:
    """The hard state a founding gives: the founding epoch, our vote in it the founder's."""
    return HardState(epoch=FOUNDING_EPOCH, voted_for=founder)


class Roles:
    """`Replica.become_<role>`, the founding, and the recovery poll a replica runs before it may
    vote or stand."""

    # ---------------------------------------------------------------- founding

    def _may_found(self, founder: str, hard_state: HardState | None, log_end: int) -> bool:
        """Whether this start may take its partition's founding: only if the replica provably
        never held the partition, so that it can have cast no other vote nor written any entry.
        The shell says so by giving neither a hard state nor a log: one whose data was lost comes
        with `recovering`, one made again after a move deleted it with its join epoch, and one
        that wrote its founding has it in its hard state (see "Founding"). Whom the founding
        names (`founder`) does not matter here; tests/test_creation_teeth.py breaks this rule."""
        return hard_state is None and log_end == 0

    def _found(self, founder: str) -> None:
        """Start as the founding says: epoch 1 (set from `founding_state`), durable before
        anything is sent; the founder leads it at once (every vote of the set is its), the others
        follow it and ask it for its log."""
        self._hard_dirty = self._must_sync = True
        # The members apply the command at different times (a node's metadata may lag by a second
        # under load): neither the founder's check-quorum nor its followers' election timers give
        # up on the others before they have had time to apply it too.
        grace_ms = FOUNDING_GRACE_TIMEOUTS * self.config.election_timeout_ms
        if founder == self.node_id:
            self.role = CANDIDATE
            self._votes = set(self.voters)
            self.become_leader()
            self._founding_grace_ms = self.now_ms + grace_ms
            return
        self._election_deadline_ms += grace_ms
        self.leader = founder
        self._role_change = RoleChange(FOLLOWER, self.epoch, founder)
        # Its first Append may be broadcast before we listen: ask for the log at once. And tell it
        # our clock (an acknowledgement of nothing), which it needs from a majority to stamp batches.
        self.maybe_fetch()
        self._ack_due = True

    # ---------------------------------------------------------------- recovering

    def _poll_group(self) -> tuple[str, ...]:
        """Whom a recovering replica polls: the voters its log (or the shell) gives it and its
        target (the metadata's set). A replica that lost its log may know only the set the
        partition was created with, whose removed members no longer answer, while the target is
        where the cluster's configuration is (or is going)."""
        return tuple(sorted(set(self.voters) | set(self._target or ())))

    def _poll_covers(self, answered: set[str]) -> bool:
        """Enough answers: for each of the voters and the target (a set of n), n - (n//2 + 1) + 1
        of its members other than us (capped at those there are), so that the answers include
        one member of every majority of either set that this replica may have belonged to."""
        if not self.voters and not self._target:
            return False  # no one to ask yet
        for group in (self.voters, self._target or ()):
            others = set(group) - {self.node_id}
            n = len(group)
            if len(answered & others) < min(len(others), n - n // 2):
                return False
        return True

    def _fresh_covers(self, answered: set[str]) -> bool:
        """After the poll: `answered` (of those that answered from an epoch past the largest
        polled) holds n - n//2 of the other members of each of the voters and the target (a set
        of n) that has us in it: one of every majority that counted an acknowledgement of ours."""
        groups = [group for group in (self.voters, self._target or ()) if self.node_id in group]
        for group in groups:
            others = set(group) - {self.node_id}
            n = len(group)
            if len(answered & others) < min(len(others), n - n // 2):
                return False
        return bool(groups)

    def _begin_recovery(self) -> None:
        self.recovering = True
        self._hard_dirty = self._must_sync = True  # recovering is durable before anything is sent
        self._send_polls()
        self._maybe_finish_poll()

    def _send_polls(self) -> None:
        """The poll, to those that have not answered it; after it, to those with no later answer."""
        answered = self._poll_answers if self._polled is None else self._fresh
        for peer in sorted(set(self._poll_group()) - {self.node_id} - set(answered)):
            self._send(peer, RecoveryPoll(self.epoch, self.node_id))
        if self._polled is None:
            # Asked again as often as a Fetch (it cannot stand meanwhile, so the election timer is
            # free): at a cluster's start the first polls reach peers that are not up yet.
            self._election_deadline_ms = self.now_ms + self.config.fetch_retry_ms

    def _maybe_finish_poll(self) -> None:
        if not self._poll_covers(set(self._poll_answers)):
            return
        answers = self._poll_answers.values()
        epoch = max((a[0] for a in answers), default=0)
        hw = max((a[1] for a in answers), default=0)
        log_end = max((a[2] for a in answers), default=0)
        self._polled = (epoch, hw)
        if epoch > self.epoch:
            # No vote while recovering (see _maybe_end_recovery), and no leader: one heard in an
            # earlier epoch (its TimeoutNow may reach us before the poll ends) does not lead this
            # one (simulator seed 519 once the clients' room and the founding were both in).
            self.become_follower(epoch, None)
        if log_end == 0:
            # Nothing was ever committed among them (a new cluster or partition, where candidates
            # may have stood): no entry to have forgotten. Its vote in this epoch may have been
            # cast before the loss, so it casts none here; later epochs are new to everyone.
            if self.epoch > 0 and self.voted_for is None:
                self.voted_for = VOTE_FORGOTTEN
            self._end_recovery()
            # A whole new set ends its polls together: a fresh random timeout each, or they would
            # all stand at the next poll tick and split the vote (the shell's preferred leader
            # stands first; see Node._stand).
            self._reset_election_timer()
        elif self.leader is None:
            self._fetch_sent_ms = None  # look for the leader at once (as a learner does)
            self._election_deadline_ms = self.now_ms

    def _maybe_end_recovery(self) -> None:
        until = self._recover_until
        if (not self.recovering or until is None or self.role != FOLLOWER or self.leader is None
                or self.durable_end < until or self.match_end < until):
            return
        if self.voted_for is None:
            self.voted_for = self.leader  # the leader of this epoch won it: no one else can have our old vote
        self._end_recovery()

    def _end_recovery(self) -> None:
        self.recovering = False
        self._poll_answers.clear()
        self._fresh.clear()
        self._recover_until = None
        self._hard_dirty = self._must_sync = True

    # ---------------------------------------------------------------- role changes

    def become_follower(self, epoch: int, leader: str | None) -> None:
        assert epoch >= self.epoch, "epochs never go back"
        before = (self.role, self.leader, self.epoch)
        if self.role == LEADER:
            self._fail_waiters(leader)
        if epoch > self.epoch:
            self.epoch = epoch
            self.voted_for = None
            self._hard_dirty = self._must_sync = True
        self.role = FOLLOWER
        self.leader = leader
        self._prevotes = None
        self._learner = None
        self._transfer = None
        self._leader_heard_ms = None
        self._caught_up = False
        self.match_end = self.high_watermark  # committed entries are in every leader's log
        self._fetch_sent_ms = None
        self._ack_due = False
        if before[1:] != (leader, self.epoch):
            self._recover_until = None  # a new leader: its own log end is the mark (see "Recovering")
        if before[0] == LEADER:
            # Raft resets the timer only on a vote granted or a leader heard: a follower that
            # reset it on every higher epoch would let a candidate that cannot win (its log is
            # behind) keep everyone else from ever standing.
            self._reset_election_timer()
        if before != (FOLLOWER, leader, self.epoch):
            self._role_change = RoleChange(FOLLOWER, self.epoch, leader)

    def stand(self) -> None:
        """Our election timer ran out and we may stand: ask a majority first (see "Pre-vote"), or,
        with `config.pre_vote` off, stand at once."""
        if not self.config.pre_vote:
            self.become_candidate()
            return
        self._prevotes = {self.node_id}
        self._reset_election_timer()   # no majority by then: ask again
        if quorum.has_majority(self._prevotes & set(self.voters), len(self.voters)):
            self.become_candidate()
            return
        ask = PreVote(self.epoch + 1, self.node_id, self.last_epoch, self.log_end)
        for peer in sorted({*self.voters, *(self._target or ())}):
            if peer != self.node_id:
                self._send(peer, ask)

    def become_candidate(self) -> None:
        self._prevotes = None
        self.epoch += 1
        self.voted_for = self.node_id
        self._hard_dirty = self._must_sync = True
        self.role = CANDIDATE
        self.leader = None
        self._votes = {self.node_id}
        self._wall_offsets.clear()   # filled again by the clocks granted Votes carry, for the leader to be
        self._leader_heard_ms = None
        self._reset_election_timer()
        self._role_change = RoleChange(CANDIDATE, self.epoch, None)
        if quorum.has_majority(self._votes & set(self.voters), len(self.voters)):
            self.become_leader()
            return
        ask = RequestVote(self.epoch, self.node_id, self.last_epoch, self.log_end)
        # The target's nodes too: if our configuration is stale (we missed a change), the
        # leader of the current one is likely among them, and will bring us up to date.
        for peer in sorted({*self.voters, *(self._target or ())}):
            if peer != self.node_id:
                self._send(peer, ask)

    def _note_wall(self, voter: str, wall_ms: int) -> None:
        """A voter's wall clock, from an AppendAck or a granted Vote (see "Time")."""
        if wall_ms <= 0 or self.wall_ms <= 0:
            return
        # A sample is the voter's offset less the time the message spent in transit or queued
        # (ours, after a stall): the largest one of the last few election timeouts is the best.
        sample = wall_ms - self.wall_ms
        best = self._wall_offsets.get(voter)
        if (best is None or sample >= best[0]
                or self.now_ms - best[1] >= WALL_OFFSET_KEPT_TIMEOUTS * self.config.election_timeout_ms):
            self._wall_offsets[voter] = (sample, self.now_ms, self.now_ms)
        else:
            self._wall_offsets[voter] = (best[0], best[1], self.now_ms)

    def become_leader(self) -> None:
        assert self.role == CANDIDATE
        self._prevotes = None
        self.role = LEADER
        self.leader = self.node_id
        self._learner = None
        self._transfer = None
        self._transfer_failed = None
        self._disk_low_peers.clear()
        self._last_stamp = None
        self._match = {peer: 0 for peer in self.peers}
        self._contact_ms = {r: self.now_ms for r in self.peers}
        self._broadcast_from = self.log_end
        self._heartbeat_due_ms = self.now_ms + self.config.heartbeat_interval_ms
        self._role_change = RoleChange(LEADER, self.epoch, self.node_id)
        self._append(Entry(self.log_end, 1, self.epoch, NO_PRODUCER, NO_PRODUCER, MARKER_PAYLOAD))
        self.maybe_advance_high_watermark()
