"""The replication core's decisions (`maybe_<verb>`: the high watermark, configuration changes, fetching,
leadership transfer, retried proposals): one of the parts `zq.core.replication.Replica` is made of.
"""
from __future__ import annotations

import heapq

from zq.core import quorum
from zq.core.repl_types import (
    COMMITTED, DUPLICATE_SEQUENCE, FOLLOWER, LEADER, OUT_OF_ORDER, Fetch, Outcome, TimeoutNow,
)

STRANGERS_MAX = 8      # nodes outside the configuration a leader keeps sending to
# Election timeouts a learner may take to hold the restated configuration before the next is tried.
LEARNER_STALL_ELECTIONS = 3


class Decisions:
    """`Replica.maybe_<verb>`: the steps that may do nothing, decided from the replica's state."""

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
                self._take_learner(add[0], voters)
                return
            held = self._match[self._learner]
            if (held > self._configs[-1][0] and held >= hw
                    and self.log_end - held <= self.config.catch_up_records_max):
                self._append_config(voters | {self._learner})
                self._learner = None
            elif (held <= self._configs[-1][0] and len(add) > 1 and self.now_ms - self._learner_taken_ms
                  >= LEARNER_STALL_ELECTIONS * self.config.election_timeout_ms):
                # It has not taken the restated configuration in that long (down, cut off, or
                # recovering and unable to end its poll, which may wait for another new replica
                # to learn a configuration: simulator seed 822 --nodes 5): the next one.
                self._take_learner(add[(add.index(self._learner) + 1) % len(add)], voters)
            return
        remove = sorted(voters - set(target))
        if remove and len(voters) > 1:
            others = [v for v in remove if v != self.node_id]
            self._append_config(voters - {others[0] if others else self.node_id})

    def _take_learner(self, name: str, voters: set[str]) -> None:
        """Catch `name` up to join, and restate the configuration in our epoch. The learner is
        promoted only once it holds that entry: so it knows a configuration it can trust (see
        "Nodes added again") and votes as soon as it is made a voter, and what the node
        acknowledged before counts for nothing (it may have been a member before and deleted its
        data since; old acknowledgements stop short of this entry)."""
        self._learner = name
        self._learner_taken_ms = self.now_ms
        self._match[name] = 0
        self._contact_ms.setdefault(name, self.now_ms)
        self._append_config(voters)

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
        return self.now_ms >= self._quorum_due_ms()

    def _quorum_due_ms(self) -> int:
        """Leader: when it steps down unless it hears from a majority first (check-quorum); a
        founder not before its grace ends (its followers may apply the creating command later)."""
        heard = self._quorum_heard_ms()
        due = self.now_ms if heard is None else heard + self.config.election_timeout_ms
        return max(due, self._founding_grace_ms)

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
