"""The consumer groups service's delivery room: delivery states kept per (group, partition), leases
(served at once or parked as long polls), acks, and the sweep that expires leases and fails those
of departed members (zq/node/groups.py, "Delivery", tells how the service works). The rules are
zq.core.grouplead's `PartitionLead`; this room reads the stored batches a lease serves, answers,
and counts.
"""
from __future__ import annotations

from typing import Any, Callable

from zq import batch as zbatch
from zq import protocol as P
from zq import group_protocol as G
from zq.core.retry import BackoffPolicy, RetryPolicy
from zq.errors import InvalidRequest, ProtocolError, ZqError
from zq.node.group_common import (GroupServiceState, Key, _decode_held, _Held, _Parked, ack_items_max,
                                  batch_cache_max, lease_bytes_max, lease_messages_max, lease_read_bytes,
                                  lease_wait_ms_max, log, parked_leases_max, state_key, states_max,
                                  undecodable_logged_max)
from zq.types import TopicPartition


class DeliveryRoom(GroupServiceState):
    """Which offsets a member is leased, what its Ack settles, and what the sweep expires."""

    # ------------------------------------------------------------------ delivery states

    def _policy(self, topic_meta: Any) -> RetryPolicy:
        c = topic_meta.config
        spec = (c.get("max_deliveries", 5), c.get("backoff_initial_ms", 1_000), c.get("backoff_max_ms", 60_000))
        cached = self._policies.get(topic_meta.id)
        if cached is None or cached[0] != spec:
            initial = max(0, int(spec[1]))
            policy = RetryPolicy(max(1, int(spec[0])), BackoffPolicy(initial, max(initial, int(spec[2]))))
            cached = self._policies[topic_meta.id] = (spec, policy)
        return cached[1]

    def _held(self, key: Key) -> _Held | None:
        held = self.held.get(key)
        if held is None:
            raw = self.host.get_meta(state_key(*key))
            if raw is not None:
                try:
                    held = self.held[key] = _decode_held(raw)
                except ZqError as e:
                    log.warning("stored state of group %s, topic %d/%d is unreadable (%s); starting afresh",
                                key[0], key[1], key[2], e)
        return held

    def _held_or_new(self, key: Key, start_offset: Callable[[], int]) -> _Held:
        held = self._held(key)
        if held is None:
            if len(self.held) >= states_max:
                raise InvalidRequest(f"this node keeps at most {states_max} group delivery states")
            offset = start_offset()
            held = self.held[key] = _Held.fresh(offset)
        return held

    def _start_offset(self, topic: str, topic_id: int, partition: int, start: Any) -> int:
        log_start, hw = self.host.partition_bounds(topic, partition)
        if start == "latest":
            return hw
        if type(start) is int:
            found = self.host.offset_for_time(TopicPartition(topic_id, partition), start)
            return hw if found is None else min(max(found, log_start), hw)
        return log_start

    # ------------------------------------------------------------------ leases

    def on_lease(self, identity: bytes, msg: G.Lease, payload: list) -> None:
        if not 1 <= msg.max_messages or msg.lease_ms < 1 or msg.max_wait_ms < 0:
            raise InvalidRequest("a lease asks for at least one message, a positive lease time and a wait >= 0")
        if not (msg.start in ("earliest", "latest") or (type(msg.start) is int and msg.start >= 0)):
            raise InvalidRequest("a lease's start is earliest, latest or a time in ms")
        t = self.host.meta.topic(msg.topic)
        self.host.partition_bounds(msg.topic, msg.partition)   # NotLeader, UnknownPartition
        self._check_member(msg.group, msg.member_id, msg.generation, (msg.topic, msg.partition), strict=True)
        key = (msg.group, t.id, msg.partition)
        self.host.counters["group_leases"] += 1
        if self._ready_to_serve(t, msg.partition):   # else a new leader still reads a majority's copies
            self._held_or_new(key, lambda: self._start_offset(msg.topic, t.id, msg.partition, msg.start))
            if self._serve_lease(identity, msg, key):
                return
        wait_ms = min(msg.max_wait_ms, lease_wait_ms_max)
        if wait_ms <= 0 or len(self.parked) >= parked_leases_max:
            self._reply_empty(identity, msg, key)
            return
        self.parked.append(_Parked(self.host.now_ms() + wait_ms, identity, msg, key))

    def _reply_empty(self, identity: bytes, msg: G.Lease, key: Key) -> None:
        held = self.held.get(key)
        try:
            hw = self.host.partition_bounds(msg.topic, msg.partition)[1]
        except ZqError as e:
            self.host.reply_error(identity, msg.req_id, e)
            return
        self.host.reply(identity, G.LeaseReply(msg.req_id, held.state.reset_epoch if held else 0, [], hw))

    def _serve_lease(self, identity: bytes, msg: G.Lease, key: Key) -> bool:
        """Lease what may be delivered now and answer; False (nothing answered) when there is nothing."""
        held = self.held[key]
        topic, p = msg.topic, msg.partition
        log_start, hw = self.host.partition_bounds(topic, p)
        now = self.host.wall_ms()
        plan = held.plan_lease(now, min(msg.max_messages, lease_messages_max), log_start, hw)
        retries = plan.retries
        frames: dict[int, bytes] = {}
        # Retries are lowest first, and a stored batch holds thousands of them: read (and verify)
        # each batch once, not once per retry (measured: a lease of 1,000 retries after a
        # rebalance, each re-reading a 512 KiB batch and its checksum, held the loop 1.5 s, long
        # enough for the partition's followers to start an election).
        covered_lo = covered_hi = -1
        for o in retries:
            if covered_lo <= o < covered_hi:
                continue
            for f in self.host.read_committed(topic, p, o, 1):
                h = zbatch.unpack_header(f)
                frames.setdefault(h.base_offset, f)
                covered_lo, covered_hi = h.base_offset, h.next_offset
                break
        new: list[int] = []
        start, end = plan.start, plan.end
        if start < end:
            for f, h, undecodable in self._read_batches(topic, key[1], p, start, end):
                lo, hi = max(h.base_offset, start), min(h.next_offset, end)
                # A control batch's offsets, and an undecodable batch's, are done at once: the committed
                # offset moves past them and no member is leased what it cannot read.
                done = undecodable or bool(h.flags & zbatch.FLAG_CONTROL)
                if not done:
                    frames.setdefault(h.base_offset, f)
                    new.extend(range(lo, hi))
                elif undecodable:
                    self.host.counters["group_undecodable_offsets_skipped"] += hi - lo
                held.on_read(lo, hi, done)
        if not retries and not new:
            return False
        deliveries = held.grant(retries + new, msg.member_id, msg.lease_ms, now)
        if not deliveries:
            return False
        flat: list[int] = []
        redelivered = 0
        for d in deliveries:
            flat.append(d.offset)
            flat.append(d.attempt)
            redelivered += d.attempt > 1
        needed = _frames_for([d.offset for d in deliveries], frames)
        self.host.counters["group_delivered"] += len(deliveries)
        self.host.counters["group_redelivered"] += redelivered
        self.host.reply(identity, G.LeaseReply(msg.req_id, held.state.reset_epoch, flat, hw), *needed)
        return True

    def _read_batches(self, topic: str, topic_id: int, p: int, start: int, end: int) -> Any:
        """(stored batch, header, undecodable) from the one holding `start` to the one holding
        `end - 1`, at most `lease_bytes_max` in all (at least one). Read `lease_read_bytes` at a
        time, as the lease needs them, and the last one kept: the next lease of the partition
        starts in it, and reading a ~512 KiB batch again (with its checksum) for each of the ~5
        leases it holds cost ~7% of a node's time. A batch read from the store has its records
        verified once, before it is served or kept (see `_undecodable`)."""
        tp = (topic_id, p)
        total = 0
        o = start
        last: tuple[int, int, bytes] | None = None
        try:
            while o < end:
                cached = self._batches.get(tp)
                fresh = not (cached is not None and cached[0] <= o < cached[1])
                if not fresh:
                    frames = [cached[2]]   # verified when it was read
                else:
                    frames = self.host.read_committed(topic, p, o, lease_read_bytes)
                    if not frames:
                        return
                for f in frames:
                    h = zbatch.unpack_header(f)
                    if h.base_offset >= end or h.next_offset <= o or (total and total + len(f) > lease_bytes_max):
                        return
                    total += len(f)
                    undecodable = fresh and self._undecodable(topic, topic_id, p, f, h)
                    if not undecodable:
                        last = (h.base_offset, h.next_offset, f)
                    yield f, h, undecodable
                    o = h.next_offset
                    if o >= end:
                        return
        finally:
            if last is not None:
                if tp not in self._batches and len(self._batches) >= batch_cache_max:
                    self._batches.pop(next(iter(self._batches)))
                self._batches[tp] = last

    def _undecodable(self, topic: str, topic_id: int, p: int, value: bytes, h: zbatch.BatchHeader) -> bool:
        """True when a stored batch's records do not decode (an older version stored it unchecked):
        counted each time a group steps over it, logged once per batch (within `undecodable_logged_max`).
        A batch its leader verified when it accepted it (zq.batch.FLAG_VERIFIED) is not decoded again."""
        if h.flags & (zbatch.FLAG_VERIFIED | zbatch.FLAG_CONTROL):
            return False
        try:
            zbatch.stored_records(value, h)
            return False
        except ProtocolError as e:
            self.host.counters["group_undecodable_batches_skipped"] += 1
            seen = (topic_id, p, h.base_offset)
            if seen not in self._undecodable_logged:
                if len(self._undecodable_logged) >= undecodable_logged_max:
                    self._undecodable_logged.clear()
                self._undecodable_logged.add(seen)
                log.error("%s/%d: %s; groups step over its offsets (counted as "
                          "group_undecodable_offsets_skipped)", topic, p, e.message)
            return True

    def _serve_parked(self, now_ms: int) -> None:
        keep = []
        wall = self.host.wall_ms()
        for parked in self.parked:
            msg = parked.msg
            try:
                hw = self.host.partition_bounds(msg.topic, msg.partition)[1]
                # The member may have left, or lost the partition, while its lease waited: serving it
                # then would lease messages to nobody, and their expiry would count as failed attempts.
                self._check_member(msg.group, msg.member_id, msg.generation, (msg.topic, msg.partition), strict=True)
                t = self.host.meta.topic(msg.topic)
                if self._ready_to_serve(t, msg.partition):
                    held = self._held_or_new(parked.key, lambda: self._start_offset(
                        msg.topic, t.id, msg.partition, msg.start))
                    if held.ready(hw, wall) and self._serve_lease(parked.identity, msg, parked.key):
                        continue
            except ZqError as e:   # leadership moved, topic deleted: the member learns where to go
                self.host.reply_error(parked.identity, msg.req_id, e)
                continue
            if now_ms >= parked.deadline_ms:
                self._reply_empty(parked.identity, msg, parked.key)
                continue
            keep.append(parked)
        self.parked = keep

    # ------------------------------------------------------------------ acks

    def on_ack(self, identity: bytes, msg: G.Ack, payload: list) -> None:
        if len(msg.acked) + len(msg.nacks) + len(msg.extends) > ack_items_max:
            raise InvalidRequest(f"an Ack carries at most {ack_items_max} items")
        t = self.host.meta.topic(msg.topic)
        self.host.partition_bounds(msg.topic, msg.partition)
        self._check_member(msg.group, msg.member_id, msg.generation, (msg.topic, msg.partition), strict=False)
        key = (msg.group, t.id, msg.partition)
        held = self._held_or_new(key, lambda: self._start_offset(msg.topic, t.id, msg.partition, "earliest"))
        out = held.on_ack(msg.member_id, msg.reset_epoch, msg.acked, msg.nacks, msg.extends, self.host.wall_ms(),
                          self._policy(t) if msg.nacks else None, self.rng.random)
        counters = self.host.counters
        counters["group_acks"] += out.acked
        if msg.nacks:
            counters["group_nacks"] += out.nacked
            counters["group_retries"] += out.retries
            counters["group_dead_letters_due"] += out.dead_letters_due
        if out.nacked:
            self._failed.add(key)
        st = held.state
        self.host.reply(identity, P.OkReply(msg.req_id, {"committed": st.committed, "epoch": st.reset_epoch}))
        if out.dead_letters_due:
            for write in held.take_dead_letters():
                self._write_dead_letter(key, held, write)

    # ------------------------------------------------------------------ the sweep

    def _sweep(self) -> None:
        now = self.host.wall_ms()
        counters = self.host.counters
        for key in sorted(self.held):
            held = self.held[key]
            group, topic_id, p = key
            t = self.host.meta.topics_by_id.get(topic_id)
            if t is None:
                continue   # not applied yet here, or deleted (the store dropped its data)
            if not self.host.leads(t.name, p):
                continue
            out = held.sweep(now, self.memberships.get(group), (t.name, p), self._policy(t), self.rng.random)
            if out.expired:
                counters["group_lease_expiries"] += out.expired
            if out.departed:
                counters["group_departed_leases"] += out.departed
            if out.retries:
                counters["group_retries"] += out.retries
            if out.dead_letters_due:
                counters["group_dead_letters_due"] += out.dead_letters_due
            if out.expired or out.departed:
                self._failed.add(key)
            for write in out.writes:
                self._write_dead_letter(key, held, write)


def _frames_for(offsets: list[int], frames: dict[int, bytes]) -> list[bytes]:
    """The stored batches (by base offset) that hold any of `offsets`, in offset order."""
    bases = sorted(frames)
    out: list[bytes] = []
    wanted = sorted(offsets)
    i = 0
    for j, base in enumerate(bases):
        nxt = zbatch.unpack_header(frames[base]).next_offset
        while i < len(wanted) and wanted[i] < base:
            i += 1
        if i < len(wanted) and wanted[i] < nxt:
            out.append(frames[base])
    return out

