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

Founding. A new partition starts with a leader, so that its first produces wait for no election.
The command that creates it (`create_topic` in __meta, which every replica's node applies) names
its set's first replica, the founder, to lead epoch 1: as if every replica of the set had voted
for it there, durably, as part of applying the command. A replica created with `founded_by` starts
in epoch 1 with its vote the founder's (`founding_state`): the founder holds every vote, leads at
once and appends its marker; the others follow it, take its Appends at once, and ask it for its
log (with an acknowledgement of nothing, which tells it their clocks: it stamps batches only with
a majority's). That first Ready is durable before anything leaves (`must_sync`, and a role
change, so not even a leader's early Appends go before its commit). Epoch 1 has no other leader:
the members' votes there are the founder's, and a candidate stands in epoch 2 at least. The
members apply the command at different times (a node's metadata may lag a second under load):
the founder's check-quorum and its followers' election timers give them
`FOUNDING_GRACE_TIMEOUTS` election timeouts more at the start.
The danger is a replica taking the founding again after it lost what it did with it: a founder
whose disk was wiped would lead epoch 1 again with an empty log and write other entries where
epoch-1 entries are committed (two different entries of one epoch at one offset: log matching
broken); a follower would be an empty voter that forgot its acknowledgements. So only a replica
that provably never held the partition takes it (`_may_found`): the shell gives it neither a hard
state nor a log. A lost one comes `recovering` (the node tells a new replica from a lost one by
its store's birth marker, zq/io/node.py `_replica_lost`), one made again after a move with its
join epoch, one made by a reassignment with no founder, and one that wrote its founding has it
in its hard state; one that wrote nothing durable sent nothing, so taking it again is taking it
for the first time. Every other replica takes the usual path: the recovery poll, elections. A
command written by an older version names no founder (`TopicMeta.founded`): its partitions elect,
as their replicas may have elected another in epoch 1 already. (A cluster running both versions
is not covered: an older node may stand in epoch 1 itself. Create topics once every node runs
this one.)

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

Pre-vote (Raft thesis 9.6). A voter whose election timer runs out does not stand at once: it
asks its configuration's voters (and its target's) whether they would vote for it in the next
epoch (`PreVote`, epoch + 1), changing nothing durable. A voter says yes only if it hears no leader
itself (it is not one, and has heard none for an election timeout), the epoch asked about is past
its own, and the asker's log is at least as up to date as its own; a recovering voter answers as
it would a RequestVote (after its poll). With a majority of yeses (counting itself) the asker
stands as Raft says; without, its timer runs out again and it asks again. So a replica that was
paused, or cut off, past its election timeout raises no epoch when it comes back: it hears the
leader's next Append in the epoch it never left, and no working leader is deposed (without it, a
follower SIGSTOPped for 3 s deposed both leaders of a real cluster on SIGCONT, and writes stopped
for 1.5-3 s: tools and figures in the issue 11 note). A TimeoutNow hand-off stands at once, and
RequestVotes are handled as before. A refusal carries the voter's epoch: an asker behind it takes
it, as it would from any message. Two replicas that ask at once for the same epoch would each say
yes to the other, both stand, and split the vote (no leader for another election timeout: seen
when both followers of a killed leader were told at once, `peer_lost` below). So a replica that
is asking says yes to another asker for that epoch only if the other's log is more up to date,
or as up to date with a greater name, and then stops asking itself.

A closed connection (`peer_lost`). The shell tells the core when its connection to a node closes
(the node's process ended). A follower whose leader that is stops counting it as heard and brings
its election timer forward to within an election timeout / `PEER_LOST_ELECTION_FRACTION`; the
pre-vote round then runs as ever, and the other followers, whose connections closed too, say yes.
It is a hint: a false one (a connection that broke between running nodes) costs at most a
refused pre-vote, since a follower that hears the leader says no, and an Append that arrives
meanwhile counts as ever. Only timing changes, so no rule of safety depends on it; the simulator
delivers such hints on most crashes and, falsely, across network cuts.

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
previous stamp plus the monotonic time since. A leader is ticked at least every heartbeat; one
whose tick jumps past an election timeout was stopped (SIGSTOP, a stalled process) and steps
down: the acks waiting in its inbox carry clocks from before the stop, which would read as
heard just now (simulator seed 334, a founder within its founding grace).

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

The class is assembled from parts, one file each: the message handlers (repl_handlers), role
changes, the founding and the recovery poll (repl_roles), the `maybe_` decisions (repl_decisions), and the log
and bookkeeping with the producer table (repl_log); its data and messages are in repl_types.
"""
from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Sequence

from zq.core.repl_decisions import STRANGERS_MAX, Decisions  # noqa: F401 (STRANGERS_MAX: re-exported)
from zq.core.repl_epochs import epoch_at, truncated
from zq.core.repl_handlers import _FIELD_TYPES, Handlers
from zq.core.repl_log import LogKeeping
from zq.core.repl_roles import (  # noqa: F401 (re-exported)
    FOUNDING_GRACE_TIMEOUTS, VOTE_FORGOTTEN, WALL_OFFSET_KEPT_TIMEOUTS, Roles, founding_state,
)
from zq.core.repl_types import (
    BACKPRESSURE, DEFAULT_CONFIG, FOLLOWER, LEADER, NO_PRODUCER, NOT_LEADER, Append, AppendAck, Diverging,
    Entry, Fetch, HardState, LogReader, Outbound, Outcome, PreVote, PreVoteReply, Ready, RecoveryPoll,
    RecoveryState, ReplicationConfig, RequestVote, RoleChange, StartAt, TimeoutNow, Vote,
)
from zq.errors import ProtocolError

# A follower told that its leader's connection closed (`peer_lost`) stands within
# election_timeout_ms / this (random), instead of after one or two election timeouts.
PEER_LOST_ELECTION_FRACTION = 4


class Replica(Handlers, Roles, Decisions, LogKeeping):
    """One replica of one partition. See the module docstring for the rules."""

    def __init__(self, node_id: str, replicas: Sequence[str], reader: LogReader, *,
                 rng: random.Random, now_ms: int = 0, config: ReplicationConfig = DEFAULT_CONFIG,
                 hard_state: HardState | None = None, log_end: int = 0, log_start: int | None = None,
                 founded_by: str | None = None) -> None:
        """`log_start`: the first offset the shell's log still holds (retention deletes the
        front); None: the first entry the reader returns, or `log_end` if it returns none.
        `founded_by`: the replica (of `replicas`, the set the partition was created with) that the
        command creating the partition names to lead epoch 1; taken only by a replica that never
        held the partition (see "Founding")."""
        self.node_id = node_id
        if founded_by is not None and (founded_by not in replicas or node_id not in replicas):
            raise ValueError(f"a founding names a leader of the set it creates, and is given to its members: "
                             f"{founded_by!r} founds {list(replicas)} on {node_id!r}")
        # Whether this start takes the founding: its hard state (epoch 1, our vote the founder's).
        self.founded = founded_by is not None and self._may_found(founded_by, hard_state, log_end)
        hs = founding_state(founded_by) if self.founded else (hard_state or HardState())
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
        self._prevotes: set[str] | None = None   # while asking before standing: who said yes (see "Pre-vote")
        self._match: dict[str, int] = {}          # leader: each peer's acknowledged end
        self._contact_ms: dict[str, int] = {}     # leader: when each peer was last heard
        self._learner: str | None = None          # leader: the one node being caught up to join
        self._learner_taken_ms = 0                # leader: when it took that learner
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
        self._founding_grace_ms = 0                   # founder: no check-quorum step-down before this (see "Founding")
        self._rebuild_producers()
        if self.recovering:
            self._begin_recovery()
        elif self.founded:
            self._found(founded_by)

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
                due = min(due, self._quorum_due_ms())
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
        stalled = now_ms - self.now_ms > self.config.election_timeout_ms
        self.now_ms = max(self.now_ms, now_ms)
        if wall_ms is not None:
            self.wall_ms = wall_ms
        if self.role == LEADER:
            if stalled and self.config.check_quorum:
                # A leader is ticked at least every heartbeat: this one was stopped (SIGSTOP, a
                # stall of its process) for longer than an election timeout. Its voters may have
                # elected another, and what waits in its inbox is stale: acks whose clocks would
                # put the replica set's clock behind by the stall, and would count as a majority
                # heard just now (see "Time"). It steps down and stands again (PreVote).
                self.become_follower(self.epoch, None)
                return
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
                self.stand()
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

    def peer_lost(self, node: str) -> None:
        """The shell's connection to `node` closed (its process ended, or the connection broke): a
        hint, which may be false. A follower whose leader that is stops counting it as heard and
        brings its election timer forward to within `PEER_LOST_ELECTION_FRACTION` of an election
        timeout (random, as every election timer), so a killed leader is replaced in a fraction of
        an election timeout rather than in one or two; PreVote still asks a majority, and a voter
        grants only if it hears no leader either (its own connection closed too, or its timer ran
        out). An Append that comes meanwhile counts as ever: a false hint costs nothing. Timing
        is all it changes: no rule of safety depends on it. The shell ticks first."""
        self._check_not_handed_out()
        if self.role != FOLLOWER or self.leader != node or node == self.node_id:
            return
        self._leader_heard_ms = None
        soon = self.now_ms + self._rng.randrange(max(1, self.config.election_timeout_ms // PEER_LOST_ELECTION_FRACTION))
        self._election_deadline_ms = min(self._election_deadline_ms, soon)

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


_HANDLERS = {  # by name, so a test may replace one handler on the class
    Append: "on_append",
    AppendAck: "on_append_ack",
    Fetch: "on_fetch",
    Diverging: "on_diverging",
    RequestVote: "on_request_vote",
    Vote: "on_vote",
    PreVote: "on_pre_vote",
    PreVoteReply: "on_pre_vote_reply",
    TimeoutNow: "on_timeout_now",
    StartAt: "on_start_at",
    RecoveryPoll: "on_recovery_poll",
    RecoveryState: "on_recovery_state",
}
