"""The replication core: one `Replica` per (partition, node). No I/O, no clock, no randomness of
its own; the shell (or the simulator) feeds it events and applies the effects it returns.

Theory of operation
-------------------
Roles. A replica is a follower, a candidate or the leader of its partition's replica set, in an
epoch (Raft's term) that only grows. A follower that hears no leader for a randomised election
timeout ([t, 2t), drawn from the caller's `random.Random`) becomes a candidate: it moves to the
next epoch, votes for itself and asks the others. A voter grants one vote per epoch, only to a
log at least as up to date as its own by (last epoch, log end), and the vote is durable before
the reply leaves (`Ready.must_sync`). A candidate with a majority becomes leader and at once
appends a one-record marker entry of its epoch, so that older entries can commit without
waiting for a produce (Raft commits earlier epochs only through the current one). Any message
with a higher epoch turns the receiver into a follower of that epoch; any message with a lower
epoch is refused with the newer epoch, so a stale leader learns it is stale (fencing).

Replication. The leader appends proposals and broadcasts them as `Append` (prev_end, prev_epoch,
entries); with no entries it is a heartbeat. Broadcasts may be lost, duplicated or reordered
(they travel over PUB/SUB). A follower appends only an `Append` whose (prev_end, prev_epoch)
matches its log; on a gap or a mismatch it asks with `Fetch(from_end, last_epoch)`, one in
flight at a time. The leader answers a Fetch either with the entries from there, or, if the
follower's log diverges, with `Diverging(epoch, end)` (KIP-101/KIP-279): the follower truncates
to min(leader's end for that epoch, its own end for it) and fetches again; each round strictly
shortens the divergent suffix, and never cuts below the prefix already known to match this
leader (`match_end`, which starts at the high watermark), so it never removes a committed entry.

Commit. A replica counts as holding a batch only once it is durable (`on_persisted`). A
follower acknowledges min(durable end, match_end). The leader's high watermark is the largest
offset that a majority holds durably, provided the entry just below it is of the leader's own
epoch (Raft's rule); it never moves back, and a follower's follows the leader's, capped at its
own match_end. A proposal's outcome is COMMITTED (with the epoch that wrote it) once the high
watermark passes it; if the replica stops leading first, it is NOT_LEADER. A leader that has not
heard from a majority for an election timeout steps down (check-quorum), so a paused and
resumed old leader cannot acknowledge anything: it can only commit with a majority's acks,
which carry its epoch, and a majority that elected a successor refuses that epoch.

Idempotent producers. The leader keeps, per producer id, the last few batches' sequence numbers
and offsets, derived from the log itself (rebuilt after a truncation or a restart), so a new
leader knows them too. A retried batch returns the original offset; a batch that skips a
sequence number is refused with OUT_OF_ORDER.

Configurations (Raft's single-server changes, Ongaro's thesis ch. 4). The voters are a sorted
tuple of node names. The configuration of a replica is the latest configuration entry in its
log, committed or not (it takes effect on append); a truncation that cuts one brings the one
before it back. Before any, it is the set the replica was created with: the partition's initial
replica set, or none at all for a replica created by a reassignment (it must not count on a
membership its node had before its data was deleted). `HardState.configs` keeps them, so a
restart knows. Quorums (votes, the high watermark, check-quorum) count the voters of the
current configuration only; a leader counts itself only if it is one. A replica whose node is
not a voter is a LEARNER: it follows, appends and acknowledges what a leader sends, and votes as
Raft says (its log holds what it acknowledged), but stands only if it is still in the committed
configuration (one being removed, whose removal it has not seen commit, may still be needed:
Raft thesis 4.2.2; it then leads a configuration without itself and steps down once that
commits). A learner that hears no leader for an election timeout asks its last leader again, or
else the next of the nodes it knows of (voters and target), for what it lacks.

Nodes added again. A node removed from a partition deletes its replica; added again later, it
starts empty, and so has lost what made its old votes and acknowledgements safe (its log and
its epoch). Two rules make up for it. (1) The shell remembers the epoch the deleted replica had
reached and creates the new one in a later epoch (`HardState.join_epoch`): a leader that node
had already left behind (partitioned since, say) cannot use it. The new replica knows no
configuration until its log holds an entry of that epoch or later: a prefix of the log could
end inside its old membership. (2) A replica that knows no configuration neither votes nor
takes a candidate's epoch: a node that missed its removal and still believes in an old
configuration naming both must not win with its vote. Once its log holds such an entry and a
configuration entry, it holds everything committed before the leader that wrote the former,
its old removal included, and it is an ordinary replica. (3) A leader counts a voter's
acknowledgements only once it holds the entry that made it a voter: until then the node may
not know, and may delete its data when its target changes. So that a new voter always knows one, a leader restates the current configuration in
its own epoch when it takes a learner, and promotes the learner only once it holds that entry
(which also keeps acknowledgements from the node's earlier membership from counting).

Changing the replica set. `set_target(voters)` gives the desired voters; only a leader acts,
one step at a time, and only once its own marker and the latest configuration are committed
(so every configuration differs by at most one voter from one that is committed: any majority
of the new one meets any majority of the old). A missing node first becomes the leader's learner (one
at a time): it is sent Appends and its acknowledgements are tracked, and once it holds the
high watermark durably and is within `catch_up_records_max` of the log end, the leader appends
voters + {it}. Otherwise a surplus voter is removed, the leader itself last: it keeps leading
the new configuration, counting a majority of it without itself, and once that commits it tells
the most caught-up voter to stand (TimeoutNow) and steps down. `removed` turns True on a node in
neither the committed configuration nor its target whose log has caught up with its leader's
(so no configuration naming it is on the way, in which a leader may count it already): the
shell closes it and deletes its data.

Telling the removed. A leader also sends to the nodes that the configurations it remembers had
and the current one has not, so a removed node learns of its removal and, once it is committed
(its high watermark passes it), that it is removed. One that missed it entirely still believes
it is a voter and stands, alone, in ever later epochs; voters ignore a RequestVote from a node
outside their configuration while they hear their leader (leader stickiness, Raft thesis 4.2.3,
kept to strangers so that a voter's election, including a TimeoutNow hand-off, is plain Raft),
so it cannot depose anyone. It also asks the nodes of its target, among which the current leader
usually is: a leader that hears a stranger sends to it from then on (a bounded few), and if the
stranger's epoch is ahead of its own, stands again at once in a later epoch (the voters grant
it at once), so that its Appends reach the stranger, which then learns the configuration.

Hand-off. `transfer_leadership(to)` and `set_draining(True)` make a leader pick a voter (the
given one, or the one with the highest acknowledged end, ties by name), stop taking proposals
(NOT_LEADER with no hint, so clients look again), and once that voter holds the whole log
durably, send it TimeoutNow; the voter, if it still follows that leader in that epoch, stands at
once and wins (its log is the most up to date). The leader waits at most an election timeout,
then serves again (a draining one picks again). A draining replica never stands.

Log start. Retention deletes committed entries from the front of a replica's log (the shell
says so with `on_log_start(offset)`; a restarted replica takes it from the shell or its reader),
so a follower whose log ends below its leader's log start cannot get what it lacks: a replica
down for longer than the retention window, or an empty learner of a topic with retention. The
leader answers its Fetch with `StartAt(offset, prev_epoch, voters)`: the leader's log start (at
or below its high watermark, so everything below it is committed), the epoch of the entry before
it and the configuration there (Kafka's OffsetOutOfRange reset; Raft's snapshot install, with an
empty state machine). The follower, only from its leader in its epoch and only if its own log
ends below that offset, drops its whole log and restarts it empty at the offset
(`Ready.reset_to`), its history saying the entry before is of prev_epoch, its configuration the
one given, and its high watermark and matched prefix the offset. What it drops is committed (its
own high watermark is below its log end) or a divergent uncommitted tail, so it never removes
an entry the cluster still holds and it alone would have: the leader held all of it committed and
deleted it itself. The configuration comes from the leader of an epoch at or past the replica's
join epoch, so the replica trusts it (see "Nodes added again"); the producer table starts empty,
as the leader's holds nothing from below its log start either. (So an idempotent producer's
retry of a batch that retention already deleted, a retry older than the retention window, is
written again, as in Kafka once a producer's state expired.)

Who moves the log start. Only a leader decides what retention deletes (the shell runs retention
on the leader, with the replica set's clock below); its Appends carry its log start, and a
follower deletes below it once its own high watermark has reached it (`leader_log_start`), so
no follower's clock or disk fullness ever deletes anything on its own.

Time. The core reads no clock: `tick(now_ms, wall_ms)` gives it the monotonic time and the
node's wall clock. Followers put their wall clock in every AppendAck; the leader keeps each
voter's offset from its own (the largest recent sample: delays only lower it, refreshed within
an election timeout). `cluster_wall_ms()` is the median of the largest group of known clocks
that agree within `clock_agreement_ms`, and only if that group is a majority of the voters
(its own clock included). So a single node whose clock runs a day ahead or behind decides
neither what retention deletes nor the times stamped on batches: it is outvoted, or, with only
two clocks known that disagree, there is no time at all (None: the shell refuses stamped writes
for that moment, retention waits). Within an agreeing group of even size, retention takes the
earlier middle clock (it deletes later) and stamps the later one (batches look newer). A stamp
(`append_time_ms()`) never goes back and runs at most `append_time_ahead_ms_max` ahead of the
previous stamp plus the monotonic time since.

Disk. The shell says when its node is short of disk (`set_disk_low`); followers say so in their
acks. A leader short of disk hands leadership to a voter that has not said so, as a drain does
(and a drain prefers such voters too); with none, it keeps leading.

Recovering (protocol-aware recovery, Alagappan et al., FAST'18). Raft's safety rests on a voter
never forgetting its vote, its epoch or an entry it acknowledged. A replica whose log or hard
state is gone or damaged (a wiped or corrupt data dir, a WAL whose tail RocksDB dropped) has
forgotten some of it, and the shell creates it with `HardState.recovering`. Such a replica never
votes, never stands and, until it has polled, takes no Append (so no leader can count its
acknowledgement). It sends `RecoveryPoll` to the others of its voters and of its target (a
wiped replica may know only the set the partition was created with) and waits for
`RecoveryState` (epoch, high watermark, log end) answers from, in each of the two sets of n,
n - (n//2 + 1) + 1 of its other members (2 of RF3, 3 of RF5): every majority it belonged to
before the loss has n//2 other members, and only that many answers are sure to include one of
them. It then takes the largest epoch reported (a stale leader of an older epoch can no longer
use it) and follows a leader of at least that epoch as a learner would, acknowledging only what
it holds durably. A leader of such an epoch holds every committed entry, those this replica once
acknowledged included, so the replica becomes a voter again once its durable log, matching that
leader's, reaches both the largest high watermark reported and the leader's log end as its first
Append gave it (again with each new leader). Its vote in the epoch it ends in is its leader's:
a vote it cast there before the loss cannot have gone to anyone else who won. If every answer
says log end 0, nothing was ever committed there (a new cluster or partition; a committed entry
is held by a majority and never truncated, while the high watermark, a hint written lazily,
cannot say so): it is a voter at once, except in the epoch it took (VOTE_FORGOTTEN). Every
replica answers polls whatever its own state; a leader polled forgets what the poller had
acknowledged (it is not in sync any more). A partition may need its vote before any leader can
exist (seed 3371: a new configuration counting it, and a replica that knows none), so after its
poll it polls again and votes (never stands) in an epoch past the largest polled, once answers
from an epoch past that one came from n - n//2 of the others of each of its voters and target
that has it in it, for a candidate at least as up to date by (last epoch, log end) as that many
of those answers in each such set (`RecoveryState.last_epoch`); the vote is durable before the
reply, as every vote. Why: a leader that counts an acknowledgement of ours leads an epoch U at
most the largest polled (a member of the majority that elected it was in U before our loss, and
answered); the answers the candidate is as up to date as include one member of any majority
that counted it, which acknowledged in U before it answered from a later epoch, so that
answer's log held the entry, and a candidate at least as up to date holds it (Raft's election
safety, that answer standing in for our lost log). The poll's own answers would not do: a
member may answer before it acknowledges
(test_a_recovering_replica_does_not_vote_on_answers_given_before_a_peer_acknowledged). A target
that has it in it and a replica that knows no configuration (which takes no epoch, so never
answers from a later one) still leaves it without a vote (seed 41816 --steps 1000). Not
covered: a vote or acknowledgement of the replica's that was still in flight when it lost its
disk, and reaches its peer only after that peer answered the poll (the wipe would have to be
faster than the network); nor a vote it cast before the loss in an epoch past the largest
polled (the candidate's requests to the others slower than the wipe): it may vote there again,
as it may once recovered.

Effects. Events change state and queue effects; `ready()` hands them out as one `Ready`, and
`advance()` says the shell applied it. The shell must call `advance()` before the next event.
`on_persisted(end)` says every Ready advanced so far is durable, `end` being the log end of
the latest one (a shell that syncs once per loop pass calls it after the sync).
"""
from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Sequence

from zq.core import quorum
from zq.core.repl_epochs import appended, end_for_epoch, epoch_at, truncated
from zq.core.repl_types import (
    BACKPRESSURE, CANDIDATE, COMMITTED, CONFIG_VOTERS_MAX, DEFAULT_CONFIG, DUPLICATE_SEQUENCE, FOLLOWER, LEADER,
    MARKER_PAYLOAD, NO_PRODUCER, NOT_LEADER, OUT_OF_ORDER, Append, AppendAck, Diverging, Entry, Fetch,
    HardState, LogReader, Outbound, Outcome, Ready, RecoveryPoll, RecoveryState, ReplicationConfig, RequestVote,
    RoleChange, StartAt, TimeoutNow, Vote, encode_config,
)
from zq.errors import ProtocolError

_SCAN_BYTES = 1 << 20  # bytes per read while rebuilding the producer table
STRANGERS_MAX = 8      # nodes outside the configuration a leader keeps sending to
VOTE_FORGOTTEN = ""    # voted_for of an epoch whose vote a recovered replica may have cast and lost: no node's name


WALL_OFFSET_KEPT_TIMEOUTS = 4   # a voter's best clock offset sample is kept this many election timeouts


class Replica:
    """One replica of one partition. See the module docstring for the rules."""

    def __init__(self, node_id: str, replicas: Sequence[str], reader: LogReader, *,
                 rng: random.Random, now_ms: int = 0, config: ReplicationConfig = DEFAULT_CONFIG,
                 hard_state: HardState | None = None, log_end: int = 0, log_start: int | None = None) -> None:
        """`log_start`: the first offset the shell's log still holds (retention deletes the
        front); None: the first entry the reader returns, or `log_end` if it returns none."""
        hs = hard_state or HardState()
        self.node_id = node_id
        self.config = config
        self._reader = reader
        self._rng = rng
        self.now_ms = now_ms
        # Durable state, as restored.
        self.epoch: int = hs.epoch
        self.voted_for: str | None = hs.voted_for
        # Hard state and entries are written in one atomic batch, so the history never reaches
        # past the log; cutting it here keeps a hand-made or damaged one from misleading us.
        self.history: tuple = truncated(tuple(tuple(item) for item in hs.epoch_history), log_end)
        self.log_end: int = log_end
        if log_start is None:
            first = reader.read(0, 0)
            log_start = first[0].base_offset if first else log_end
        self.log_start: int = min(log_start, log_end)  # entries below it are deleted (retention, StartAt)
        self.durable_end: int = log_end  # after a restart, all that is on disk is durable
        # Only committed entries are ever deleted from the front, so the log start is committed.
        self.high_watermark: int = max(min(hs.high_watermark, log_end), self.log_start)
        # Configurations: ((offset, voters), ...) ascending, offset -1 being the one this replica
        # was created with. Cut with the log, like the history; never empty.
        configs = tuple((offset, tuple(voters)) for offset, voters in hs.configs if offset < log_end)
        self._configs: tuple = configs or ((-1, tuple(sorted(set(replicas)))),)
        self.join_epoch: int = hs.join_epoch     # configuration entries of older epochs are not ours
        self._target: tuple[str, ...] | None = None  # desired voters (from __meta), once told
        self.draining = False
        self.disk_low = False                     # the shell: this node is short of disk
        self.wall_ms = 0                          # the shell's wall clock (0: not told), see "Time"
        self.leader_log_start = 0                 # follower: its leader's log start (retention's decision)
        # Volatile state.
        self.role: str = FOLLOWER
        self.leader: str | None = None
        self.match_end: int = self.high_watermark  # follower: prefix known to match the leader
        self._election_deadline_ms = 0
        self._reset_election_timer()
        self._fetch_sent_ms: int | None = None
        self._ack_due = False
        self._votes: set[str] = set()
        self._match: dict[str, int] = {}          # leader: each peer's acknowledged end
        self._contact_ms: dict[str, int] = {}     # leader: when each peer was last heard
        self._learner: str | None = None          # leader: the one node being caught up to join
        self._transfer: tuple[str, int] | None = None  # leader: (hand-off to, give up at ms)
        self._timeout_now_sent = False
        self._transfer_failed: tuple[str, int] | None = None  # leader: (voter, when) of the last miss
        self._wall_offsets: dict[str, tuple[int, int, int]] = {}  # leader: voter -> (its wall - ours, since, heard)
        self._disk_low_peers: set[str] = set()    # leader: voters whose last ack said they are short of disk
        self._last_stamp: tuple[int, int] | None = None  # leader: (append time, now_ms) of its last stamp
        self._leader_heard_ms: int | None = None  # follower: when the leader was last heard
        self._caught_up = False                   # follower: our log reached the last Append's leader_end
        self._probe = 0                           # learner without a leader: whom it asked last
        # Nodes outside every configuration we know that asked us for votes: a node whose
        # addition was cut from the log, or that missed its removal. A leader sends to them
        # too, so they learn the configuration (bounded; the oldest is forgotten first).
        self._strangers: OrderedDict[str, None] = OrderedDict()
        self._heartbeat_due_ms = 0
        self._broadcast_from = log_end            # leader: first offset not yet broadcast
        self._waiters: list[tuple[int, int, int, int, bool]] = []  # (end, id, base, epoch, dup)
        self._next_proposal_id = 1
        self._producers: OrderedDict[int, list[tuple[int, int, int, int, int]]] = OrderedDict()
        # Effects not yet handed out, and log changes not yet applied by the shell.
        self._unstable: list[Entry] = []
        self._truncate_from: int | None = None
        self._reset_to: int | None = None
        self._pending_from: int | None = None
        self._messages: list[Outbound] = []
        self._outcomes: list[Outcome] = []
        self._role_change: RoleChange | None = None
        self._hw_changed = False
        self._hard_dirty = False
        self._must_sync = False
        self._handed_out = False
        # Recovering (see "Recovering"): durable flag, volatile progress.
        self.recovering: bool = hs.recovering
        self._poll_answers: dict[str, tuple[int, int, int]] = {}  # voter -> (epoch, high watermark, log end)
        self._polled: tuple[int, int] | None = None   # (largest epoch, largest high watermark) once enough answered
        self._fresh: dict[str, tuple[int, int]] = {}  # after the poll: voter -> (last epoch, log end), answered in a later epoch
        self._recover_until: int | None = None        # durable end that ends recovery under the current leader
        self._rebuild_producers()
        if self.recovering:
            self._begin_recovery()

    # ---------------------------------------------------------------- views

    @property
    def voters(self) -> tuple[str, ...]:
        """The current configuration: the latest in the log, committed or not (Raft); none while
        the log cannot be trusted yet (see "Nodes added again")."""
        return self._configs[-1][1] if self._trusted() else ()

    @property
    def replicas(self) -> tuple[str, ...]:
        """The voters (the name the status views use)."""
        return self.voters

    def _trusted(self) -> bool:
        """A replica created in a join epoch trusts its log's configurations once the log holds
        an entry of that epoch or later: a leader of such an epoch wrote it, and every entry
        before it is as that leader had it, the node's old removal included."""
        return self.join_epoch == 0 or (bool(self.history) and self.history[-1][0] >= self.join_epoch)

    @property
    def learners(self) -> tuple[str, ...]:
        """Leader: the nodes it is catching up to join (at most one)."""
        return (self._learner,) if self.role == LEADER and self._learner is not None else ()

    @property
    def peers(self) -> tuple[str, ...]:
        """Who this replica sends to. A leader: the voters, its learner, and the nodes that the
        configurations it remembers removed (so they learn it and can be deleted). Others: the
        voters and the leader they follow."""
        out = set(self.voters)
        if self.role == LEADER:
            out.update(self.learners)
            out.update(self._leaving())
            out.update(self._strangers)
        elif self.leader is not None:
            out.add(self.leader)
        out.discard(self.node_id)
        return tuple(sorted(out))

    @property
    def target(self) -> tuple[str, ...] | None:
        return self._target

    @property
    def config_history(self) -> tuple:
        """((offset, voters), ...) as the hard state holds it; offset -1: the initial one."""
        return self._configs

    def committed_voters(self) -> tuple[str, ...]:
        """The latest configuration below the high watermark (or the initial one)."""
        if not self._trusted():
            return ()
        for offset, voters in reversed(self._configs):
            if offset < self.high_watermark:
                return voters
        return self._configs[0][1]

    @property
    def removed(self) -> bool:
        """True once this node is in neither the committed configuration nor its target, and its
        log has reached the leader's (so no configuration naming it is on the way, which a
        leader might already count it in): the shell may close it and delete its data."""
        if self._target is None or self.node_id in self._target or self.role != FOLLOWER or not self._caught_up:
            return False
        return self.node_id not in self.committed_voters() and self.node_id not in self.voters

    def may_stand(self) -> bool:
        """A voter of the latest configuration stands when it hears no leader; so does one being
        removed whose removal it has not seen committed (Raft thesis 4.2.2: it may still be
        needed). A learner being added, a replica that knows no configuration, a recovering one
        and a draining one never do."""
        if self.draining or not self.voters or self.recovering:
            return False
        return self.node_id in self.voters or self.node_id in self.committed_voters()

    @property
    def transferring(self) -> str | None:
        """Leader: the voter it is handing leadership to, if it is."""
        return self._transfer[0] if self._transfer is not None and self.role == LEADER else None

    @property
    def last_epoch(self) -> int:
        return self.history[-1][0] if self.history else 0

    def epoch_at(self, offset: int) -> int:
        return epoch_at(self.history, offset)

    def next_timer_ms(self) -> int:
        """When `tick` next has something to do: the shell may sleep until then."""
        if self.role == LEADER:
            due = self._heartbeat_due_ms
            if self.config.check_quorum:
                heard = self._quorum_heard_ms()
                due = min(due, (self.now_ms if heard is None else heard) + self.config.election_timeout_ms)
            if self._transfer is not None:
                due = min(due, self._transfer[1])
            return due
        return self._election_deadline_ms

    def replica_progress(self) -> dict[str, tuple[int, int]]:
        """Leader only (empty otherwise): per replica, (durable end it has acknowledged, when it
        was last heard, ms). For status and metrics: in-sync replicas and replication lag."""
        if self.role != LEADER:
            return {}
        out = {peer: (self._match.get(peer, 0), self._contact_ms.get(peer, 0))
               for peer in (*self.voters, *self.learners) if peer != self.node_id}
        out[self.node_id] = (self.durable_end, self.now_ms)
        return dict(sorted(out.items()))

    def hard_state(self) -> HardState:
        return HardState(self.epoch, self.voted_for, self.history, self.high_watermark, self._configs,
                         self.join_epoch, self.recovering)

    def entries(self, offset: int, max_entries: int, max_bytes: int) -> list[Entry]:
        """Entries of this replica's log from `offset` (a boundary), applied or not."""
        return self._read(offset, max_entries, max_bytes)

    # ---------------------------------------------------------------- events in

    def tick(self, now_ms: int, wall_ms: int | None = None) -> None:
        """The clock moved to now_ms (monotonic): fire whichever timer is due. The shell calls
        this before each batch of events too (after every poll), since the core reads no clock.
        `wall_ms`: the node's wall clock, if the shell tells it (see "Time")."""
        self._check_not_handed_out()
        self.now_ms = max(self.now_ms, now_ms)
        if wall_ms is not None:
            self.wall_ms = wall_ms
        if self.role == LEADER:
            if self.config.check_quorum and self._lost_quorum():
                self.become_follower(self.epoch, None)
                return
            if self._transfer is not None and self.now_ms >= self._transfer[1]:
                # The hand-off did not happen in time: serve again (a draining leader tries
                # again after as long, with another voter if there is one).
                self._transfer_failed = (self._transfer[0], self.now_ms)
                self._transfer = None
            if self.now_ms >= self._heartbeat_due_ms:
                self._broadcast_heartbeat()
                self._maybe_send_timeout_now(resend=True)
        elif self.now_ms >= self._election_deadline_ms:
            if self.recovering and self._polled is None:
                self._send_polls()  # answers may have been lost: ask those that have not answered again
                return
            if self.may_stand():
                self.become_candidate()
            else:
                # A learner or a draining replica never stands. A learner that hears no leader
                # asks the one it knows, or else the next of the nodes it knows of (a removed
                # node learns its removal this way too).
                self._reset_election_timer()
                self._fetch_sent_ms = None
                if self.leader is not None and not self._hears_leader() and self.node_id not in self.voters:
                    # Its leader went quiet (gone, or no longer sending to us): look around.
                    self.leader = None
                    self._role_change = RoleChange(FOLLOWER, self.epoch, None)
                if self.leader is None and not self.draining:
                    known = sorted({*self.voters, *(self._target or ())} - {self.node_id})
                    if known:
                        self._probe = (self._probe + 1) % len(known)
                        self._send(known[self._probe], Fetch(self.epoch, self.node_id, self.log_end,
                                                             self.epoch_at(self.log_end - 1)))
                if self.recovering and self.leader is None and not self._fresh_covers(set(self._fresh)):
                    self._send_polls()  # so that it may vote, should no leader come (see "Recovering")
                self.maybe_fetch()

    def step(self, msg: object) -> None:
        """A message from a peer of this replica set. Bad input raises ProtocolError."""
        self._check_not_handed_out()
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            raise ProtocolError(f"not a replication message: {type(msg).__name__}")
        for name in msg.__slots__:  # type: ignore[attr-defined]
            want = _FIELD_TYPES.get(name, int)
            value = getattr(msg, name)
            if type(value) is not want or (want is int and value < 0):
                raise ProtocolError(f"{type(msg).__name__}.{name} must be {want.__name__}, got {value!r:.40}")
        # A sender outside the configuration is normal: a learner hears its leader before its log
        # names it, a leader hears its learner, a removed node may not know it yet.
        if msg.sender == self.node_id or not msg.sender:  # type: ignore[attr-defined]
            raise ProtocolError(f"{type(msg).__name__} from {msg.sender!r}, which is not a peer")  # type: ignore[attr-defined]
        getattr(self, handler)(msg)

    def set_target(self, voters: Sequence[str]) -> None:
        """The voters this partition should have (from the cluster metadata). Any replica may be
        told; only a leader acts on it, one voter at a time (see the module docstring)."""
        self._check_not_handed_out()
        target = tuple(sorted(set(voters)))
        if not target or not all(isinstance(v, str) and v for v in target):
            raise ValueError(f"a target replica set names at least one node: {list(voters)}")
        self._target = target
        if self.recovering and self._polled is None:
            self._send_polls()  # new members to ask, perhaps
            self._maybe_finish_poll()

    def set_draining(self, on: bool) -> None:
        """Draining: never stand for election, and as leader hand leadership to the best voter
        (retried every election timeout while it lasts)."""
        self._check_not_handed_out()
        self.draining = on
        if on:
            self._maybe_start_transfer(None, retry=True)

    def set_disk_low(self, on: bool) -> None:
        """This node is (no longer) short of disk: followers say so in their acks; a leader hands
        leadership to a voter that has room (retried every election timeout while it lasts)."""
        self._check_not_handed_out()
        self.disk_low = on
        if on:
            self._maybe_start_transfer(None, retry=True, roomy_only=True)

    def cluster_wall_ms(self, late: bool = False) -> int | None:
        """Leader: the median of the largest group of its voters' clocks (its own included) that
        agree within `clock_agreement_ms`, if that group is a majority; of an even group, the
        earlier middle one (`late`: the later). None when not leading or no majority agrees."""
        if self.role != LEADER or self.wall_ms <= 0:
            return None
        voters = self.voters
        fresh_ms = self.now_ms - self.config.election_timeout_ms
        offsets = [0] if self.node_id in voters else []
        offsets += [off for v, (off, _best_at, heard_at) in sorted(self._wall_offsets.items())
                    if v in voters and v != self.node_id and heard_at >= fresh_ms]
        offsets.sort()
        group: list[int] = []
        for i, low in enumerate(offsets):
            agreeing = [off for off in offsets[i:] if off - low <= self.config.clock_agreement_ms]
            if len(agreeing) > len(group):
                group = agreeing
        n = len(group)
        if n < len(voters) // 2 + 1:
            return None
        middle = group[n // 2] if n % 2 or late else group[n // 2 - 1]
        return self.wall_ms + middle

    def append_time_ms(self) -> int | None:
        """Leader: the time to stamp on a batch proposed now: the replica set's clock, never
        before the previous stamp and at most `append_time_ahead_ms_max` ahead of it plus the
        monotonic time since. None: no such clock yet (retry shortly)."""
        self._check_not_handed_out()
        t = self.cluster_wall_ms(late=True)
        if t is None:
            return None
        if self._last_stamp is not None:
            last, at = self._last_stamp
            t = max(last, min(t, last + (self.now_ms - at) + self.config.append_time_ahead_ms_max))
        self._last_stamp = (t, self.now_ms)
        return t

    def transfer_leadership(self, to: str | None = None) -> None:
        """Leader: hand leadership to voter `to` (None: the most caught-up one), once; proposals
        are refused meanwhile, for at most an election timeout. Not leading: nothing happens."""
        self._check_not_handed_out()
        self._maybe_start_transfer(to)

    def propose(self, count: int, producer_id: int, base_sequence: int, payload: bytes) -> int:
        """Offer a batch of `count` records. Returns a proposal id; its Outcome comes in a Ready."""
        self._check_not_handed_out()
        proposal_id = self._next_proposal_id
        self._next_proposal_id += 1
        if count < 1:
            raise ValueError("a batch holds at least one record")
        if self.role != LEADER:
            self._outcomes.append(Outcome(proposal_id, NOT_LEADER, leader_hint=self.leader))
            return proposal_id
        if self._transfer is not None:
            self._outcomes.append(Outcome(proposal_id, NOT_LEADER, leader_hint=None))  # handing off
            return proposal_id
        if len(self._waiters) >= self.config.pending_proposals_max:
            self._outcomes.append(Outcome(proposal_id, BACKPRESSURE, leader_hint=self.node_id))
            return proposal_id
        if producer_id != NO_PRODUCER and self._maybe_answer_retry(proposal_id, producer_id, base_sequence):
            return proposal_id
        entry = Entry(self.log_end, count, self.epoch, producer_id, base_sequence, payload)
        self._append(entry)
        heapq.heappush(self._waiters, (entry.end_offset, proposal_id, entry.base_offset, self.epoch, False))
        self.maybe_advance_high_watermark()
        return proposal_id

    def on_persisted(self, log_end: int) -> None:
        """Every Ready advanced so far is durable; `log_end` is the latest one's log end."""
        self._check_not_handed_out()
        limit = self.log_end if self._pending_from is None else min(self.log_end, self._pending_from)
        durable = min(log_end, limit)
        if durable <= self.durable_end:
            return
        self.durable_end = durable
        if self.role == LEADER:
            self.maybe_advance_high_watermark()
        elif self.leader is not None:
            self._ack_due = True
            self._maybe_end_recovery()

    def on_log_start(self, offset: int) -> None:
        """The shell deleted the entries below `offset` (retention: an entry boundary, at or below
        the high watermark). A leader answers a Fetch from below it with StartAt."""
        self._check_not_handed_out()
        if offset > self.high_watermark:
            raise ValueError(f"retention deletes committed entries only: {offset} > high watermark "
                             f"{self.high_watermark}")
        self.log_start = max(self.log_start, offset)

    # ---------------------------------------------------------------- effects out

    def ready(self) -> Ready:
        """Everything to do now. Call `advance()` once it is applied, before any other event."""
        self._check_not_handed_out()
        if self.role == LEADER:
            if self.draining or self.disk_low:
                self._maybe_start_transfer(None, retry=True, roomy_only=not self.draining)
            self.maybe_change_config()
            self._maybe_send_timeout_now()
            self._flush_broadcast()
        if self._ack_due and self.role == FOLLOWER and self.leader is not None:
            ack = AppendAck(self.epoch, self.node_id, min(self.durable_end, self.match_end), self.wall_ms,
                            self.disk_low)
            self._send(self.leader, ack)
        self._ack_due = False
        rd = Ready(
            truncate_from=self._truncate_from,
            entries=tuple(self._unstable),
            hard_state=self.hard_state() if self._hard_dirty else None,
            must_sync=self._must_sync,
            messages=tuple(self._messages),
            high_watermark=self.high_watermark if self._hw_changed else None,
            outcomes=tuple(self._outcomes),
            role=self._role_change,
            log_end=self.log_end,
            reset_to=self._reset_to,
        )
        self._messages.clear()
        self._outcomes.clear()
        self._role_change = None
        self._hw_changed = self._hard_dirty = self._must_sync = False
        self._handed_out = True
        return rd

    def advance(self) -> None:
        """The last Ready's writes are applied (synced if it asked): the reader now has them."""
        self._handed_out = False
        self._unstable.clear()
        self._truncate_from = None
        self._reset_to = None
        self._pending_from = None

    # ---------------------------------------------------------------- handlers

    def on_append(self, m: Append) -> None:
        if self.recovering and self._polled is None:
            return  # it might be a stale leader's: no epoch, no entries, no acknowledgement before the poll
        if m.epoch < self.epoch:
            self._send(m.sender, AppendAck(self.epoch, self.node_id, 0))  # fence the stale leader
            return
        if m.epoch == self.epoch and (self.role == LEADER or self.leader not in (None, m.sender)):
            raise ProtocolError(f"{m.sender} claims to lead epoch {m.epoch}, which {self.leader} leads")
        if m.epoch > self.epoch or self.role != FOLLOWER or self.leader != m.sender:
            self.become_follower(m.epoch, m.sender)
        self._reset_election_timer()
        self._leader_heard_ms = self.now_ms
        self._caught_up = False
        self._ack_due = True  # every Append is answered, so the leader's check-quorum sees us
        entries = _checked_entries(m)
        if m.log_start > m.high_watermark:
            raise ProtocolError(f"Append says the log starts at {m.log_start}, past its high watermark "
                                f"{m.high_watermark}: retention deletes committed entries only")
        self.leader_log_start = max(self.leader_log_start, m.log_start)
        if m.prev_end > self.log_end or self.epoch_at(m.prev_end - 1) != m.prev_epoch:
            self.maybe_fetch()
            return
        end = m.prev_end
        for entry in entries:
            if entry.end_offset <= self.log_start:
                # Below our log start: committed (a StartAt or retention moved it, both below a high
                # watermark), so this leader holds the same entry; a new leader whose own retention
                # has not yet run sends from further back than we start (simulator seed 2525).
                end = max(end, entry.end_offset)
                continue
            if entry.base_offset < self.log_end:
                if self.epoch_at(entry.base_offset) == entry.epoch:
                    end = entry.end_offset  # already held: same epoch at the same offset
                    continue
                self._truncate_checked(entry.base_offset)
            self._append(entry)
            end = entry.end_offset
        if end > self.match_end:
            self.match_end = end
        if entries:
            self._fetch_sent_ms = None  # progress: the next Fetch, if needed, may go at once
        self._maybe_follow_high_watermark(m.high_watermark)
        if self.recovering and self._recover_until is None:
            # This leader's epoch is at least the largest polled: its log holds every committed
            # entry, so its log end (and the largest high watermark polled) is how far we must get.
            assert self._polled is not None and self.epoch >= self._polled[0]
            self._recover_until = max(self._polled[1], m.leader_end)
        if end < m.leader_end:
            self.maybe_fetch()
        else:
            self._caught_up = True
        self._maybe_end_recovery()

    def on_append_ack(self, m: AppendAck) -> None:
        if m.epoch > self.epoch and self.role == LEADER and m.sender not in self.voters:
            self._note_stranger(m.sender, m.epoch)  # a removed node fenced us with its epoch
            return
        if m.epoch > self.epoch:
            self.become_follower(m.epoch, None)
            return
        if m.epoch < self.epoch or self.role != LEADER:
            return
        if m.durable_end > self.log_end or m.durable_end < 0:
            raise ProtocolError(f"{m.sender} acknowledges {m.durable_end}, past the log end {self.log_end}")
        if m.sender not in self._match:
            return  # not a voter, learner or leaving node of ours: nothing to count
        self._contact_ms[m.sender] = self.now_ms
        self._note_wall(m.sender, m.wall_ms)
        if m.disk_low:
            self._disk_low_peers.add(m.sender)
        else:
            self._disk_low_peers.discard(m.sender)
        if m.durable_end > self._match[m.sender]:
            self._match[m.sender] = m.durable_end
            self.maybe_advance_high_watermark()

    def on_fetch(self, m: Fetch) -> None:
        if m.sender not in self.voters:
            # A learner, a removed node or a stranger asking: only a leader answers (and takes
            # no epoch from it: one that started past ours makes it stand again, see above).
            if self.role != LEADER:
                return
            if m.epoch > self.epoch:
                self._note_stranger(m.sender, m.epoch)
                return
        if m.epoch > self.epoch:
            self.become_follower(m.epoch, None)
            return
        if self.role != LEADER:
            return
        if m.epoch < self.epoch:
            self._send(m.sender, self._heartbeat())  # tells the fetcher who leads now
            return
        if m.sender in self._match:
            self._contact_ms[m.sender] = self.now_ms
        if m.from_end < self.log_start:
            # What it lacks is deleted here (retention): it starts at our log start instead.
            # Everything below our log start is committed, so whatever it holds below is either
            # the same committed entries or an uncommitted tail that lost.
            prev_epoch = self.epoch_at(self.log_start - 1)
            if prev_epoch > 0:  # a history that does not reach there cannot describe it
                self._send(m.sender, StartAt(self.epoch, self.node_id, self.log_start, prev_epoch,
                                             list(self._config_at(self.log_start))))
            return
        if 0 <= m.from_end <= self.log_end and self.epoch_at(m.from_end - 1) == m.last_epoch:
            entries = self._read(m.from_end, self.config.append_entries_max, self.config.append_bytes_max)
            self._send(m.sender, self._append_message(m.from_end, entries))
        else:
            diverging_epoch, end = end_for_epoch(self.history, m.last_epoch, self.log_end)
            self._send(m.sender, Diverging(self.epoch, self.node_id, diverging_epoch, end))

    def on_diverging(self, m: Diverging) -> None:
        if m.epoch > self.epoch or (m.epoch == self.epoch and self.role == FOLLOWER and self.leader is None):
            # Only a leader answers a Fetch: one we asked while knowing no leader is it.
            self.become_follower(m.epoch, m.sender)
        if m.epoch < self.epoch or self.role != FOLLOWER or m.sender != self.leader:
            return
        _found, own_end = end_for_epoch(self.history, m.diverging_epoch, self.log_end)
        # The answer counts records; our batch holding that offset may start lower (the
        # leader's epoch ended inside it), and the whole batch goes.
        cut = self._entry_start(min(m.end_offset, own_end))
        # A legitimate answer never cuts into the prefix known to match this leader; one that
        # would is a stale duplicate of an earlier answer, and is ignored.
        if cut < self.match_end:
            return
        if cut < self.log_end:
            self._truncate(cut)
        self._fetch_sent_ms = None
        self.maybe_fetch()

    def on_start_at(self, m: StartAt) -> None:
        voters = _checked_voters(m.voters)
        if m.prev_epoch < 1 or m.prev_epoch > m.epoch or m.offset < 1:
            raise ProtocolError(f"StartAt at offset {m.offset} after epoch {m.prev_epoch} in epoch {m.epoch}")
        if m.epoch > self.epoch or (m.epoch == self.epoch and self.role == FOLLOWER and self.leader is None):
            # Only a leader answers a Fetch: one we asked while knowing no leader is it.
            self.become_follower(m.epoch, m.sender)
        if m.epoch < self.epoch or self.role != FOLLOWER or m.sender != self.leader:
            return
        if m.offset <= self.log_end:
            return  # a stale duplicate: our log reaches the leader's start, an ordinary Fetch serves it
        self._reset(m.offset, m.prev_epoch, voters)
        self._fetch_sent_ms = None
        self.maybe_fetch()

    def on_request_vote(self, m: RequestVote) -> None:
        if self.recovering:
            # Not before its poll, nor in the epoch it took (it may have voted there before the
            # loss): no vote, no epoch. Later, only with answers given since (see "Recovering").
            if self._polled is None or m.epoch <= self._polled[0]:
                return
            if not self._fresh_covers(set(self._fresh)):
                self._send_polls()  # ask for answers from a later epoch; the candidate asks again
                return
        if not self.voters:
            # A replica that knows no configuration yet (created by a reassignment) does not
            # vote: its node may have been a member before, whose log was deleted, and a node
            # that missed its removal could win in an old configuration with that vote. Nor does
            # it take the epoch, which would fence its leader. (A learner that knows one votes as
            # Raft says: its log holds everything committed before the leader that wrote it.)
            return
        if m.sender not in self.voters and (self.role == LEADER or self._hears_leader()):
            # Leader stickiness, for nodes outside our configuration only: a removed node that
            # missed its removal keeps standing, and must not depose a working leader. Without a
            # leader, a stranger's request is handled as Raft does: a voter whose log lags may not
            # know the configuration that added the candidate, and refusing every stranger left
            # such a partition without a leader for good (simulator seed 170, --steps 1000). A
            # forged sender is kept out by the cluster key under [security], and its epoch by the
            # wire bounds. (A voter's request is handled as Raft does, so a TimeoutNow hand-off
            # needs no exception.)
            if self.role == LEADER:
                self._note_stranger(m.sender, m.epoch)
            return
        if m.epoch > self.epoch:
            self.become_follower(m.epoch, None)
        granted = (
            m.epoch == self.epoch
            and self.voted_for in (None, m.sender)
            and (m.last_epoch, m.last_end) >= (self.last_epoch, self.log_end)
            and (not self.recovering or self._fresh_covers(
                {peer for peer, log in self._fresh.items() if (m.last_epoch, m.last_end) >= log}))
        )
        if granted:
            if self.voted_for != m.sender:
                self.voted_for = m.sender
                self._hard_dirty = self._must_sync = True  # the vote is durable before the reply
            self._reset_election_timer()
        self._send(m.sender, Vote(self.epoch, self.node_id, granted, self.wall_ms))

    def on_vote(self, m: Vote) -> None:
        if m.sender not in self.voters:
            return   # a vote from outside our configuration counts for nothing and moves no epoch
        if m.epoch > self.epoch:
            self.become_follower(m.epoch, None)
            return
        if m.epoch < self.epoch or self.role != CANDIDATE or not m.granted:
            return
        self._note_wall(m.sender, m.wall_ms)   # a new leader stamps at once, not after a round of acks
        self._votes.add(m.sender)
        if quorum.has_majority(self._votes & set(self.voters), len(self.voters)):
            self.become_leader()

    def on_timeout_now(self, m: TimeoutNow) -> None:
        if m.epoch > self.epoch:
            self.become_follower(m.epoch, m.sender)
            return
        if (m.epoch == self.epoch and self.role == FOLLOWER and self.leader == m.sender
                and self.node_id in self.voters and not self.draining and not self.recovering):
            self.become_candidate()  # the leader stopped taking writes and we hold its whole log

    def on_recovery_poll(self, m: RecoveryPoll) -> None:
        if self.join_epoch > 0 and self._configs == ((-1, ()),):
            # Made again after a move deleted our earlier replica, and told no configuration yet:
            # our empty log hides that we were a member once (and that our removal was committed),
            # so it must not tell a poller that nothing was ever committed (simulator seed 1233).
            return
        # Answered whatever our state: the poller takes the largest of several answers.
        self._send(m.sender, RecoveryState(self.epoch, self.node_id, self.high_watermark, self.log_end,
                                           self.last_epoch))
        if self.role == LEADER and m.sender in self._match:
            # What it acknowledged before is gone: it is not in sync (status, hand-offs) until it
            # acknowledges again. (The high watermark never moves back, so nothing commits less.)
            self._match[m.sender] = 0

    def on_recovery_state(self, m: RecoveryState) -> None:
        if m.last_epoch > m.epoch:
            raise ProtocolError(f"RecoveryState says its last entry is of epoch {m.last_epoch}, past its epoch {m.epoch}")
        if not self.recovering or m.sender not in self._poll_group():
            return
        if self._polled is None:
            self._poll_answers[m.sender] = (m.epoch, m.high_watermark, m.log_end)
            self._maybe_finish_poll()
        elif m.epoch > self._polled[0]:
            self._fresh[m.sender] = (m.last_epoch, m.log_end)  # given after the poll (see "Recovering")

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
            self.epoch = epoch
            self.voted_for = None  # no vote while recovering; see _maybe_end_recovery
            self._hard_dirty = self._must_sync = True
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

    def become_candidate(self) -> None:
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

    # ---------------------------------------------------------------- decisions

    def maybe_advance_high_watermark(self) -> None:
        """Leader: move the high watermark to what a majority holds durably, if it is ours."""
        if self.role != LEADER:
            return
        voters = self.voters
        ends = [self.durable_end if v == self.node_id else self._counted_match(v) for v in voters]
        end = quorum.committed_end(ends, len(voters))
        if end <= self.high_watermark or self.epoch_at(end - 1) != self.epoch:
            return
        self._set_high_watermark(end)
        while self._waiters and self._waiters[0][0] <= end:
            _end, proposal_id, base, epoch, dup = heapq.heappop(self._waiters)
            self._outcomes.append(Outcome(proposal_id, COMMITTED, base, epoch, self.node_id, dup))
        if self.node_id not in voters and self._configs[-1][0] < end:
            # Our own removal is committed: hand over to the most caught-up voter, step down.
            best = self._best_voter()
            if best is not None and self._match.get(best, 0) == self.log_end:
                self._send(best, TimeoutNow(self.epoch, self.node_id))
            self.become_follower(self.epoch, None)

    def _counted_match(self, voter: str) -> int:
        """A voter's acknowledged end, counted only once it holds the entry that made it a voter:
        until then it may not know it is one, and may delete its data (its target changed)."""
        added_at = -1
        for offset, voters in reversed(self._configs):
            if voter not in voters:
                break
            added_at = offset
        held = self._match.get(voter, 0)
        return held if held > added_at else 0

    def maybe_change_config(self) -> None:
        """Leader: take one step from the voters towards the target, if the last one is done.

        A step waits until this leader's marker is committed (so the configuration it sees as
        committed is the cluster's) and the latest configuration is committed; it then either
        catches up one learner and adds it, or removes one voter (the leader itself last)."""
        target = self._target
        if self.role != LEADER or target is None or self._transfer is not None:
            return
        hw = self.high_watermark
        own_start = self.history[-1][1] if self.history and self.history[-1][0] == self.epoch else hw
        if own_start >= hw or self._configs[-1][0] >= hw or self.node_id not in self.voters:
            return
        voters = set(self.voters)
        add = sorted(set(target) - voters)
        if self._learner is not None and self._learner not in add:
            self._learner = None  # the target changed under it
        if add:
            if self._learner is None:
                # Take a learner, and restate the configuration in our epoch. The learner is
                # promoted only once it holds that entry: so it knows a configuration it can
                # trust (see "Nodes added again") and votes as soon as it is made a voter, and
                # what the node acknowledged before counts for nothing (it may have been a
                # member before and deleted its data since; old acknowledgements stop short of
                # this entry).
                self._learner = add[0]
                self._match[self._learner] = 0
                self._contact_ms.setdefault(self._learner, self.now_ms)
                self._append_config(voters)
                return
            held = self._match[self._learner]
            if (held > self._configs[-1][0] and held >= hw
                    and self.log_end - held <= self.config.catch_up_records_max):
                self._append_config(voters | {self._learner})
                self._learner = None
            return
        remove = sorted(voters - set(target))
        if remove and len(voters) > 1:
            others = [v for v in remove if v != self.node_id]
            self._append_config(voters - {others[0] if others else self.node_id})

    def maybe_fetch(self) -> None:
        """Follower: ask the leader for what follows our log, unless a Fetch is already out."""
        if self.role != FOLLOWER or self.leader is None:
            return
        sent = self._fetch_sent_ms
        if sent is not None and self.now_ms - sent < self.config.fetch_retry_ms:
            return
        self._fetch_sent_ms = self.now_ms
        last = self.epoch_at(self.log_end - 1)
        self._send(self.leader, Fetch(self.epoch, self.node_id, self.log_end, last))

    def _maybe_follow_high_watermark(self, leader_hw: int) -> None:
        candidate = min(leader_hw, self.match_end)
        if candidate > self.high_watermark:
            self._set_high_watermark(candidate)

    def _quorum_heard_ms(self) -> int | None:
        """When a majority of the voters had last been heard from (the leader counts itself
        only if it is a voter)."""
        contacts = {v: self.now_ms if v == self.node_id else self._contact_ms[v]
                    for v in self.voters if v == self.node_id or v in self._contact_ms}
        return quorum.quorum_contact_ms(contacts, len(self.voters))

    def _lost_quorum(self) -> bool:
        heard = self._quorum_heard_ms()
        return heard is None or self.now_ms - heard >= self.config.election_timeout_ms

    def _hears_leader(self) -> bool:
        heard = self._leader_heard_ms
        return (self.leader is not None and heard is not None
                and self.now_ms - heard < self.config.election_timeout_ms)

    def _leaving(self) -> set[str]:
        """Nodes that the remembered configurations had and the current one has not."""
        out: set[str] = set()
        for _offset, voters in self._configs[:-1]:
            out.update(voters)
        return out - set(self.voters)

    def _note_stranger(self, node: str, epoch: int) -> None:
        """Leader: a node outside our configuration spoke. Send to it from now on; if its epoch
        is ahead (it stood, alone, again and again), stand at once in a later one, which the
        voters grant at once, so that our Appends reach it: it then learns the configuration."""
        if node not in self._match:
            self._strangers[node] = None
            self._strangers.move_to_end(node)
            while len(self._strangers) > STRANGERS_MAX:
                self._strangers.popitem(last=False)
            self._match.setdefault(node, 0)
        if epoch > self.epoch:
            self.become_follower(epoch, None)
            if self.node_id in self.voters and not self.draining:
                self.become_candidate()

    def _best_voter(self, avoid: str | None = None, roomy_only: bool = False) -> str | None:
        """The voter (not us) with the highest acknowledged end; ties go to the lower name.
        `avoid` is chosen only if it is the only one. Voters short of disk only if no other is
        (never, with `roomy_only`)."""
        others = [v for v in self.voters if v != self.node_id]
        roomy = [v for v in others if v not in self._disk_low_peers]
        if roomy or roomy_only:
            others = roomy
        if len(others) > 1 and avoid in others:
            others.remove(avoid)
        return min(others, key=lambda v: (-self._match.get(v, 0), v)) if others else None

    def _maybe_start_transfer(self, to: str | None, retry: bool = False, roomy_only: bool = False) -> None:
        if self.role != LEADER or self._transfer is not None:
            return
        failed = self._transfer_failed
        if retry and failed is not None and self.now_ms - failed[1] < self.config.election_timeout_ms:
            return  # serve a while between attempts, so a drain that cannot finish still writes
        if to is None:
            to = self._best_voter(failed[0] if retry and failed is not None else None, roomy_only)
        if to is None or to == self.node_id or to not in self.voters:
            return
        self._transfer = (to, self.now_ms + self.config.election_timeout_ms)
        self._timeout_now_sent = False
        self._maybe_send_timeout_now()

    def _maybe_send_timeout_now(self, resend: bool = False) -> None:
        """Leader handing off: once the chosen voter holds our whole log durably, tell it to
        stand (again on each heartbeat while we still lead: the message may be lost)."""
        if self.role != LEADER or self._transfer is None:
            return
        to = self._transfer[0]
        if self._match.get(to, 0) != self.log_end or (self._timeout_now_sent and not resend):
            return
        self._timeout_now_sent = True
        self._send(to, TimeoutNow(self.epoch, self.node_id))

    def _maybe_answer_retry(self, proposal_id: int, producer_id: int, base_sequence: int) -> bool:
        """True if this idempotent batch is answered without appending (retry or gap)."""
        recent = self._producers.get(producer_id)
        if not recent:
            return False  # a producer this log has not seen (or has forgotten) starts anywhere
        for seq, _count, base, epoch, end in recent:
            if seq == base_sequence:
                if end <= self.high_watermark:
                    self._outcomes.append(Outcome(proposal_id, COMMITTED, base, epoch, self.node_id, True))
                else:
                    heapq.heappush(self._waiters, (end, proposal_id, base, epoch, True))
                return True
        last_seq, last_count = recent[-1][0], recent[-1][1]
        expected = last_seq + last_count
        if base_sequence == expected:
            return False
        status = OUT_OF_ORDER if base_sequence > expected else DUPLICATE_SEQUENCE
        self._outcomes.append(Outcome(proposal_id, status, leader_hint=self.node_id))
        return True

    # ---------------------------------------------------------------- log and bookkeeping

    def _append(self, entry: Entry) -> None:
        assert entry.base_offset == self.log_end, (entry.base_offset, self.log_end)
        history = appended(self.history, entry.epoch, entry.base_offset)
        if history is not self.history:
            self.history = history
            self._hard_dirty = True
        self.log_end = entry.end_offset
        if self._pending_from is None:
            self._pending_from = entry.base_offset
        self._unstable.append(entry)
        self._note_producer(entry)
        voters = entry.config
        if voters is not None:
            # A configuration takes effect on append, committed or not (Raft).
            self._configs = self._configs + ((entry.base_offset, voters),)
            self._hard_dirty = True
            if self.role == LEADER:
                for peer in self.peers:
                    self._match.setdefault(peer, 0)
                    self._contact_ms.setdefault(peer, self.now_ms)

    def _append_config(self, voters: set[str]) -> None:
        entry = Entry(self.log_end, 1, self.epoch, NO_PRODUCER, NO_PRODUCER, encode_config(voters))
        self._append(entry)
        self.maybe_advance_high_watermark()

    def _truncate_checked(self, offset: int) -> None:
        if offset < self.match_end:
            raise ProtocolError(f"leader asks to replace offset {offset}, below the matched prefix {self.match_end}")
        self._truncate(offset)

    def _truncate(self, offset: int) -> None:
        assert self.role == FOLLOWER and offset >= self.high_watermark, "committed entries are never cut"
        self.log_end = offset
        self._caught_up = False
        self.durable_end = min(self.durable_end, offset)
        self.history = truncated(self.history, offset)
        # An uncommitted configuration cut with its entry: the one before it is back.
        self._configs = tuple(c for c in self._configs if c[0] < offset)
        assert self._configs, "the configuration a replica started with is never cut"
        self._hard_dirty = True
        self._unstable = [e for e in self._unstable if e.base_offset < offset]
        self._truncate_from = offset if self._truncate_from is None else min(self._truncate_from, offset)
        self._pending_from = offset if self._pending_from is None else min(self._pending_from, offset)
        self._rebuild_producers()

    def _reset(self, offset: int, prev_epoch: int, voters: tuple[str, ...]) -> None:
        """Follower: drop the whole log and restart it empty at `offset`, the leader's log start
        (see "Log start"). Our log ends below it, so all we drop is below the leader's high
        watermark: committed entries the leader itself deleted, or an uncommitted tail."""
        assert self.role == FOLLOWER and offset > self.log_end >= self.high_watermark
        self.log_start = self.log_end = offset
        self._caught_up = False
        self.history = ((prev_epoch, offset - 1),)  # epoch_at(offset - 1) == prev_epoch; nothing below
        # The configuration in effect at the leader's log start (the entry that made it is gone).
        self._configs = ((offset - 1, voters),) if voters else ((-1, ()),)
        # A leader of our epoch, at or past our join epoch, gave us its committed prefix: nothing
        # in our log comes from an earlier membership of this node any more.
        self.join_epoch = 0
        self.match_end = offset
        self._set_high_watermark(offset)
        self._hard_dirty = True
        self._unstable = []
        self._truncate_from = None
        self._reset_to = offset
        self._pending_from = offset
        self._producers.clear()  # the log is empty; entries from the leader fill it again

    def _config_at(self, offset: int) -> tuple[str, ...]:
        """The configuration in effect just below `offset`, if we still remember it; else ()."""
        if not self._trusted():
            return ()
        found: tuple[str, ...] = ()
        for at, voters in self._configs:
            if at >= offset:
                break
            found = voters
        return found

    def _entry_start(self, offset: int) -> int:
        """The base offset of our entry holding `offset` (`offset` itself at the log end)."""
        if offset >= self.log_end:
            return self.log_end
        if offset <= self.log_start:
            return self.log_start
        for e in reversed(self._unstable):
            if e.base_offset <= offset:
                return e.base_offset
        got = self._reader.read(offset, 0)
        if not got or got[0].base_offset > offset:
            # Below the log start: retention deleted the entry holding `offset` (a leader's marker
            # is stored with append time 0, so time retention takes it at once); the first one
            # kept, or the log end if none is, is where the log begins.
            return got[0].base_offset if got else self.log_end
        assert got[0].base_offset <= offset < got[0].end_offset, "the reader starts at the holding entry"
        return got[0].base_offset

    def _read(self, offset: int, max_entries: int, max_bytes: int) -> list[Entry]:
        out: list[Entry] = []
        size = 0
        stable_end = self.log_end if self._pending_from is None else self._pending_from
        pos = max(offset, self.log_start)  # below the log start: from the first entry kept
        while pos < stable_end and len(out) < max_entries:
            chunk = self._reader.read(pos, max_bytes - size)
            if not chunk:
                break
            for e in chunk:
                if e.base_offset >= stable_end or len(out) >= max_entries or (out and size + len(e.payload) > max_bytes):
                    return out
                out.append(e)
                size += len(e.payload)
                pos = e.end_offset
        for e in self._unstable:
            if e.base_offset < pos:
                continue
            if len(out) >= max_entries or (out and size + len(e.payload) > max_bytes):
                break
            out.append(e)
            size += len(e.payload)
            pos = e.end_offset
        return out

    def _note_producer(self, entry: Entry) -> None:
        if entry.producer_id == NO_PRODUCER:
            return
        recent = self._producers.setdefault(entry.producer_id, [])
        recent.append((entry.base_sequence, entry.count, entry.base_offset, entry.epoch, entry.end_offset))
        del recent[:-self.config.producer_batches_kept]
        self._producers.move_to_end(entry.producer_id)
        while len(self._producers) > self.config.producers_max:
            self._producers.popitem(last=False)

    def _rebuild_producers(self) -> None:
        """Producer state is derived from the log, so it is right after a truncation or restart.

        Only the last `producer_scan_records_max` records are read: a producer silent for longer
        is forgotten, which costs it deduplication of a retry that old, never data."""
        self._producers.clear()
        pos = self._entry_start(max(0, self.log_end - self.config.producer_scan_records_max))
        while pos < self.log_end:
            chunk = self._read(pos, self.config.append_entries_max, _SCAN_BYTES)
            if not chunk:
                break
            for entry in chunk:
                self._note_producer(entry)
            pos = chunk[-1].end_offset

    def _set_high_watermark(self, offset: int) -> None:
        assert offset > self.high_watermark, "the high watermark never moves back"
        self.high_watermark = offset
        self._hw_changed = self._hard_dirty = True
        # Forget configurations well below the committed one (a bounded few stay, so a leader
        # still tells the nodes they removed).
        committed = max(i for i, (o, _v) in enumerate(self._configs) if o < offset or i == 0)
        drop = committed - self.config.configs_kept
        if drop > 0:
            self._configs = self._configs[drop:]

    def _fail_waiters(self, leader: str | None) -> None:
        while self._waiters:
            _end, proposal_id, _base, _epoch, _dup = heapq.heappop(self._waiters)
            self._outcomes.append(Outcome(proposal_id, NOT_LEADER, leader_hint=leader))

    def _reset_election_timer(self) -> None:
        t = self.config.election_timeout_ms
        self._election_deadline_ms = self.now_ms + self._rng.randrange(t, 2 * t)

    def _append_message(self, prev_end: int, entries: list[Entry]) -> Append:
        return Append(self.epoch, self.node_id, prev_end, self.epoch_at(prev_end - 1), self.high_watermark,
                      self.log_end, [e.to_wire() for e in entries], self.log_start)

    def _heartbeat(self) -> Append:
        return self._append_message(self.log_end, [])

    def _broadcast_heartbeat(self) -> None:
        self._flush_broadcast()
        self._send(None, self._heartbeat())
        self._heartbeat_due_ms = self.now_ms + self.config.heartbeat_interval_ms

    def _flush_broadcast(self) -> None:
        # Retention may have deleted entries not yet broadcast; followers lacking them fetch.
        self._broadcast_from = max(self._broadcast_from, self.log_start)
        while self._broadcast_from < self.log_end:
            entries = self._read(self._broadcast_from, self.config.append_entries_max, self.config.append_bytes_max)
            assert entries, "the leader's own log is readable"
            self._send(None, self._append_message(self._broadcast_from, entries))
            self._broadcast_from = entries[-1].end_offset

    def _send(self, to: str | None, message: object) -> None:
        if to is not None or self.peers:
            self._messages.append(Outbound(to, message))

    def _check_not_handed_out(self) -> None:
        assert not self._handed_out, "call advance() after applying a Ready, before the next event"


def _checked_entries(m: Append) -> list[Entry]:
    if not isinstance(m.entries, list):
        raise ProtocolError("Append.entries is a list")
    entries = [Entry.from_wire(item) for item in m.entries]
    pos = m.prev_end
    for e in entries:
        if e.base_offset != pos:
            raise ProtocolError(f"Append entries are not contiguous at offset {e.base_offset} (expected {pos})")
        if e.epoch > m.epoch:
            raise ProtocolError(f"Append of epoch {m.epoch} carries an entry of epoch {e.epoch}")
        pos = e.end_offset
    if pos > m.leader_end:
        raise ProtocolError("Append entries reach past the leader's log end")
    return entries


# Field types of the replication messages that are not int; every int field (an offset or an
# epoch) is >= 0, epoch 0 being "before any entry".
_FIELD_TYPES = {"sender": str, "entries": list, "granted": bool, "voters": list, "disk_low": bool}


def _checked_voters(voters: list) -> tuple[str, ...]:
    """A StartAt's configuration: empty (unknown), or 1..CONFIG_VOTERS_MAX distinct sorted names."""
    if (len(voters) > CONFIG_VOTERS_MAX or not all(isinstance(v, str) and v for v in voters)
            or voters != sorted(set(voters))):
        raise ProtocolError(f"StartAt names voters {voters!r:.80}: distinct sorted node names expected")
    return tuple(voters)

_HANDLERS = {  # by name, so a test may replace one handler on the class
    Append: "on_append",
    AppendAck: "on_append_ack",
    Fetch: "on_fetch",
    Diverging: "on_diverging",
    RequestVote: "on_request_vote",
    Vote: "on_vote",
    TimeoutNow: "on_timeout_now",
    StartAt: "on_start_at",
    RecoveryPoll: "on_recovery_poll",
    RecoveryState: "on_recovery_state",
}
