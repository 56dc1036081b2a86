"""The replication core's message handlers (`on_<message>`): one of the parts `zq.core.replication.Replica`
is made of. Each checks its peer's message, then applies the rules in that module's docstring.
"""
from __future__ import annotations

from zq.core import quorum
from zq.core.repl_epochs import end_for_epoch
from zq.core.repl_types import (
    CANDIDATE, CONFIG_VOTERS_MAX, FOLLOWER, LEADER, Append, AppendAck, Diverging, Entry, Fetch, RecoveryPoll,
    PreVote, PreVoteReply, RecoveryState, RequestVote, StartAt, TimeoutNow, Vote,
)
from zq.errors import ProtocolError


class Handlers:
    """`Replica.on_<message>`: what a replica does with each replication message."""

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
        self._prevotes = None   # a leader is heard: no election to ask for
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
        # Never into the prefix known to match this leader (committed, or appended from it): an
        # answer that would is a stale duplicate of an earlier one, or comes from a leader whose
        # history no longer reaches back there (its log restarted by a StartAt: simulator seed
        # 50042 --nodes 5), and our log diverges past that prefix only.
        cut = max(self._entry_start(min(m.end_offset, own_end)), self.match_end)
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

    def on_pre_vote(self, m: PreVote) -> None:
        """Would we vote for m.sender in m.epoch? Nothing durable changes, no epoch moves."""
        if self.recovering:
            # As for a RequestVote (see "Recovering"): only after our poll, with fresh answers.
            if self._polled is None or m.epoch <= self._polled[0]:
                return
            if not self._fresh_covers(set(self._fresh)):
                self._send_polls()
                return
        if not self.voters:
            return   # we know no configuration yet: we vote in none (see on_request_vote)
        if self.role == LEADER and m.sender not in self.voters:
            # A stranger asking: send to it from now on; if its epoch is ahead of ours, stand
            # again past it, as for its RequestVote (see "Telling the removed").
            self._note_stranger(m.sender, m.epoch - 1)
            if self.role != LEADER:
                return
        granted = (
            m.epoch > self.epoch
            and self.role != LEADER and not self._hears_leader()
            and (m.last_epoch, m.last_end) >= (self.last_epoch, self.log_end)
            and (not self.recovering or self._fresh_covers(
                {peer for peer, log in self._fresh.items() if (m.last_epoch, m.last_end) >= log}))
        )
        if granted and self._prevotes is not None and m.epoch == self.epoch + 1:
            # We ask for the same epoch (see "Pre-vote": two askers at once). Of two logs as up
            # to date, the greater name gets the yes; the one saying yes stops asking.
            if (m.last_epoch, m.last_end, m.sender) < (self.last_epoch, self.log_end, self.node_id):
                granted = False
            else:
                self._prevotes = None
        self._send(m.sender, PreVoteReply(m.epoch if granted else self.epoch, self.node_id, granted))

    def on_pre_vote_reply(self, m: PreVoteReply) -> None:
        if m.sender not in self.voters:
            return   # as a Vote: from outside our configuration it counts for nothing
        if not m.granted:
            if m.epoch > self.epoch:
                self.become_follower(m.epoch, None)   # we are behind: take its epoch
            return
        if self._prevotes is None or m.epoch != self.epoch + 1 or self.role == LEADER:
            return   # not asking, or an answer to an earlier ask (a candidate whose election failed asks too)
        self._prevotes.add(m.sender)
        if quorum.has_majority(self._prevotes & set(self.voters), len(self.voters)):
            self.become_candidate()

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
