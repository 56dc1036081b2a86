"""The replication core's log and bookkeeping (appends, truncation, a reset to a new log start, the
configuration history, the producer table that deduplicates retries, the high watermark, sends):
one of the parts `zq.core.replication.Replica` is made of.
"""
from __future__ import annotations

import heapq

from zq.core.repl_epochs import appended, truncated
from zq.core.repl_types import (
    FOLLOWER, LEADER, NO_PRODUCER, NOT_LEADER, Append, Entry, Outbound, Outcome, encode_config,
)
from zq.errors import ProtocolError

_SCAN_BYTES = 1 << 20  # bytes per read while rebuilding the producer table


class LogKeeping:
    """`Replica`'s log and bookkeeping helpers."""

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
        # The configuration given is the one in effect at the leader's log start, which may end
        # inside this node's earlier membership (removed, its replica deleted, added again): the
        # StartAt's prefix is trusted as the join epoch's rule says (an entry of that epoch or
        # later), so a prefix from before the join leaves this replica knowing no configuration
        # until its leader sends it one (seed 392, --nodes 5 --steps 1000: a replica made again,
        # told the configuration of its old membership, stood and won with an empty-logged voter).
        if prev_epoch >= self.join_epoch:
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
