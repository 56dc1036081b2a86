"""The node's side of the persist-then-send pass (zq.node.replicas runs the pass): its
RocksDB storage, what it does with durable effects, and replication messages in and out.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import zmq

from zq import protocol as P
from zq.core.repl_types import LEADER, HardState
from zq.core.repl_types import RecoveryPoll, RecoveryState
from zq.errors import PartitionFenced, ProtocolError, StorageFull, ZqError
from zq.io import replicas as R
from zq.node.replicas import Part as _Part
from zq.types import META_TP, TopicPartition
from zq.io.node_common import CLOCK_JUMP_MS, log, mono_ms, now_ms
from zq.io.node_peers import _Peer

if TYPE_CHECKING:
    from zq.io.node import Node


class _StoreStorage:
    """The real host's storage for the pass (zq.node.host.Storage): RocksDB through zq.io.store."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def begin(self) -> Any:
        return self.node.store.begin()

    def write_ready(self, txn: Any, key: TopicPartition, reset_to: int | None, truncate_from: int | None,
                    entries: Any, hard_state: HardState | None) -> None:
        # Everything that can fail on bad data (restamping and verifying each batch, encoding the
        # hard state) happens before the first write to the pass's shared batch.
        stored = [R.stored_from_entry(entry) for entry in entries]
        encoded = None if hard_state is None else R.encode_hard_state(hard_state)
        if reset_to is not None:
            txn.reset(key, reset_to)
        if truncate_from is not None:
            txn.truncate_from(key, truncate_from)
        for value, header in stored:
            txn.append(key, value, header)
        if encoded is not None:
            txn.put_meta(R.hard_state_key(key), encoded)

    def put_hard_state(self, txn: Any, key: TopicPartition, hard_state: HardState) -> None:
        txn.put_meta(R.hard_state_key(key), R.encode_hard_state(hard_state))

    def commit(self, txn: Any, sync: bool) -> bool:
        return self.node._commit_store(txn, sync)

    def sync(self) -> None:
        self.node.store.sync()   # a failure raises out of the pass: the node stops and recovers from its disk


class _NodeReplicaEvents:
    """The node's reactions to the pass's durable effects (zq.node.host.ReplicaEvents)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def route(self, part: _Part, out: Any) -> None:
        self.node._route(part, out)

    def send_now(self) -> None:
        self.node._flush_outbox()

    def after_durable(self, part: _Part, rd: Any) -> None:
        self.node._after_durable(part, rd)

    def committed(self, part: _Part, high_watermark: int) -> bool:
        return self.node._committed(part, high_watermark)

    def after_round(self) -> None:
        self.node._apply_learned_meta()

    def write_failed(self, part: _Part) -> None:
        self.node._reopen_after_failed_write(part)

    def fence(self, part: _Part, doing: str, error: Exception) -> None:
        self.node._fence(part, doing, error)


class ReplicationMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    def _begin(self):
        """The pass's write transaction (zq.io.store.WriteTxn), committed once at the pass's end."""
        return self.replica_set.begin()

    def _finish_pass(self) -> None:
        """Write what the cores and handlers produced as one batch, then send what waited for it
        (zq.node.replicas: the same pass the simulator runs); then the peers' coalesced messages go."""
        self.replica_set.finish_pass()
        self._flush_outbox()

    def _commit(self) -> bool:
        return self.replica_set.commit()

    def _commit_store(self, txn: Any, sync: bool) -> bool:
        """The real host's commit (see _StoreStorage): RocksDB, fsynced if asked."""
        sync |= self.wal_marker_pending  # the loss is recorded (every replica recovering) before the marker goes
        try:
            self.store.commit(txn, sync=sync)
        except StorageFull as e:
            self.limited_log.log(logging.ERROR, "write_failed", "write failed, nothing of this pass was stored: %s",
                                 e.message)
            self.counters["storage_errors"] += 1
            self.disk_full = True   # refuse produce until the disk check sees room again
            self.storage_error = e
            if self.parts[META_TP].replica is None:   # a learner's fetched __meta batches were in this write
                st = self.store.partition_state(META_TP)
                self.meta_follower.write_failed(st.log_end if st else 0)
            else:
                self.meta_learned.clear()
            return False
        if self.wal_marker_pending:
            self.store.clear_dropped_wal_tail()
            self.wal_marker_pending = False
        return True

    def _reopen_after_failed_write(self, part: _Part) -> None:
        """The write of this pass failed: the core's view of its log is ahead of the disk, so the
        partition is reopened from what the store holds, and its waiting producers are told."""
        error = self.storage_error
        self._fail_waiters(part, error)
        tp = part.tp
        if self.parts.get(tp) is not part:
            return   # closed (topic deleted) in this pass
        del self.parts[tp]
        # What was committed stays committed, and all of it was on disk before this failed write:
        # the reopened replica keeps serving it, even if the stored high-watermark hint is older.
        if tp == META_TP:
            self._open_part(tp, part.name, list(self.voters), part.sync, hw_floor=part.replica.high_watermark)
            return
        t = self.meta.topics_by_id.get(tp.topic_id)
        if t is not None:
            self._open_part(tp, part.name, self._created_with(t, tp.partition), part.sync,
                            hw_floor=part.replica.high_watermark, target=t.partitions[tp.partition])

    def _after_durable(self, part: _Part, rd) -> None:
        """A durable Ready's effects beyond sends and answers (zq.node.replicas did those)."""
        replica = part.replica
        if part.tp in self.recovering and not replica.recovering:
            loud = self.recovering.pop(part.tp)
            log.log(logging.WARNING if loud else logging.INFO,
                    "%s/%d: recovered (caught up with leader %s in epoch %d); it votes again", part.name,
                    part.tp.partition, replica.leader or "none needed", replica.epoch)
            if part.tp == META_TP:
                self._note_born(replica.log_end)
        if rd.role is not None:
            log.info("%s/%d: %s in epoch %d (leader %s)", part.name, part.tp.partition, rd.role.role,
                     rd.role.epoch, rd.role.leader or "unknown")
            self.counters[f"became_{rd.role.role}"] += 1
            if rd.role.role != LEADER:
                self._refuse_parked(part.tp)
            if rd.role.leader not in (None, self.name):
                self._connect_sub(rd.role.leader)
        if replica.removed and self.parts.get(part.tp) is part:
            self._remove_part(part)
            return
        if rd.high_watermark is not None:
            self._high_watermark_moved(part, rd.high_watermark)

    def _committed(self, part: _Part, high_watermark: int) -> bool:
        """The high watermark moved, told between the pass's write and its fsync (zq.node.replicas):
        parked fetches and the services hear it now. Not `__meta`'s: applying metadata opens and closes
        partitions, which waits for the pass's writes (after_durable)."""
        if part.tp == META_TP:
            return False
        self._high_watermark_moved(part, high_watermark)
        return True

    def _high_watermark_moved(self, part: _Part, high_watermark: int) -> None:
        self.clients.on_high_watermark(part.tp, high_watermark)
        for service in self.services:
            hook = getattr(service, "on_high_watermark", None)
            if hook is not None:
                hook(part.name, part.tp.partition, high_watermark)
        if part.tp == META_TP:
            self._apply_committed_meta()

    def _route(self, part: _Part, out) -> None:
        """A core's message: a broadcast with entries goes on PUB; everything else by DEALER.
        (The partition may have been closed in this very pass, by a topic deletion: its last
        messages still go out, harmlessly.)"""
        tp = part.tp
        item = [tp.topic_id, tp.partition, P.to_array(out.message)]
        if out.to is None:
            if getattr(out.message, "entries", None):
                self.pub_out.append((tp, item))
                return
            for peer in part.replica.peers:
                self.outbox[peer].append(item)
        else:
            self.outbox[out.to].append(item)

    def _flush_outbox(self) -> None:
        for tp, item in self.pub_out:
            items, frames = R.pack_items([item])
            try:
                self.pub.send_multipart([R.tp_bytes(tp), *P.encode(P.Replicate(0, self.name, items), *frames)],
                                        zmq.NOBLOCK)
            except zmq.ZMQError:
                self.counters["pub_dropped"] += 1
        self.pub_out.clear()
        outbox, self.outbox = self.outbox, defaultdict(list)
        for name, items in outbox.items():
            peer = self._peer(name)
            if peer is None:
                self.counters["replication_unroutable"] += len(items)
                continue
            for chunk in R.chunk_items(items, self.limits.frames_per_message_max - 8):
                packed, frames = R.pack_items(chunk)
                self._peer_send(peer, P.Replicate(0, self.name, packed), frames)

    def _peer_send(self, peer: _Peer, msg: Any, frames: list[bytes] = ()) -> None:
        try:
            peer.sock.send_multipart(P.encode(msg, *frames), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters["peer_sends_dropped"] += 1

    def on_replicate(self, identity: bytes, msg: P.Replicate, payload: list[bytes]) -> None:
        self._heard(msg.sender)
        self._step_items(R.unpack_items(msg.items, payload))

    def _on_sub_frames(self, frames: list[bytes]) -> None:
        try:
            msg, payload = P.decode(frames[1:], self.limits)
            if not isinstance(msg, P.Replicate):
                raise ProtocolError("only Replicate travels on PUB/SUB")
            self._step_items(R.unpack_items(msg.items, payload))
        except ZqError as e:
            self.counters["protocol_errors"] += 1
            self._warn_limited("bad_broadcasts", "dropped a bad replication broadcast: %s", e)

    def _step_items(self, items: list) -> None:
        now, wall = mono_ms(), self._wall_clock()
        for item in items:
            part = None
            try:
                if not (isinstance(item, list) and len(item) == 3 and type(item[0]) is int and type(item[1]) is int):
                    raise ProtocolError("a Replicate item is [topic_id, partition, message]")
                tp = TopicPartition(item[0], item[1])
                part = self.parts.get(tp)
                if part is None or part.replica is None or tp in self.fenced:
                    if tp in self.fenced or not self._answer_poll_for_removed(tp, item[2]):
                        self.counters["replication_for_unknown_partition"] += 1   # topic not applied here yet
                    continue
                message = P.from_array(item[2])   # every field range-checked (zq.core.bounds)
                part.replica.tick(now, wall)
                part.replica.step(message)
                self.dirty.add(tp)
            except ZqError as e:
                self.counters["replication_dropped"] += 1
                self._warn_limited("replication_dropped", "dropped a replication message: %s", e)
            except Exception as e:
                if part is not None:
                    self._fence(part, "stepping a replication message", e)
                else:   # our bug before any partition was involved: this item only is lost
                    self.counters["internal_errors"] += 1
                    log.exception("dropped a replication item after an internal error")

    def _fence(self, part: _Part, doing: str, error: Exception) -> None:
        """Set a partition aside after an unexpected error (our bug, or input no check caught): its
        core is never stepped, ticked or written again until a restart rebuilds it from the disk,
        its waiting producers and fetches are told, and every other partition keeps serving."""
        tp = part.tp
        if not self.replica_set.fence(part, doing, error):
            return
        log.error("%s/%d is fenced: %s failed (%s: %s); its other replicas take over, this node serves its other "
                  "partitions, and a restart recovers this one from disk", part.name, tp.partition, doing,
                  error.__class__.__name__, error, exc_info=error)
        fenced = PartitionFenced(f"{part.name}/{tp.partition} is fenced on node {self.name} after an internal error "
                                 f"({error.__class__.__name__}); retry, and check that node's log", node=self.name)
        self._fail_waiters(part, fenced)
        self._refuse_parked(tp, fenced)

    def _fail_waiters(self, part: _Part, error: ZqError | None) -> None:
        """Every producer waiting on this partition (a quorum or a leader ack) is told `error`; a
        callback that fails is logged, and the others are still told."""
        waiters, part.waiters = part.waiters, {}
        acks, part.leader_acks = part.leader_acks, []
        for callback in [*waiters.values(), *(cb for _, cb in acks)]:
            try:
                callback(error)
            except Exception:
                log.exception("telling a producer of %s/%d failed", part.name, part.tp.partition)

    def _warn_limited(self, kind: str, text: str, *args: Any) -> None:
        """Bad peer input: counted by the caller, logged as a warning at most once per LOG_REPEAT_MS per kind."""
        self.limited_log.log(logging.WARNING, kind, text, *args)

    def _answer_poll_for_removed(self, tp: TopicPartition, arr: Any) -> bool:
        """A recovering replica polls a node whose copy a move deleted (its log still names it): the
        node says it holds nothing, in the epoch it had reached, so that the poll can end."""
        gone = self.store.get_meta(R.removed_key(tp))
        if gone is None:
            return False
        message = P.from_array(arr)
        if not isinstance(message, RecoveryPoll):
            return False
        reply = RecoveryState(int(gone), self.name, 0, 0, 0)
        self.outbox[message.sender].append([tp.topic_id, tp.partition, P.to_array(reply)])
        return True

    def _tick_replicas(self) -> None:
        """Tick the replicas whose timer is due, and only those (zq.node.replicas keeps their deadlines)."""
        self.replica_set.tick_due(mono_ms(), self._wall_clock())

    def _wall_clock(self) -> int:
        """The wall clock for the cores, noticing when it jumps against the monotonic clock (it is
        still passed on: the leaders' median of their replica sets' clocks outvotes it)."""
        wall, mono = now_ms(), mono_ms()
        if self._wall_minus_mono is not None and abs(wall - mono - self._wall_minus_mono) > CLOCK_JUMP_MS:
            self.counters["clock_jumps"] += 1
            self.limited_log.log(logging.WARNING, "clock_jump", "the wall clock of %s jumped by %+d ms; partitions "
                                 "it leads take their time from their replica sets' median clock",
                                 self.name, wall - mono - self._wall_minus_mono)
        self._wall_minus_mono = wall - mono
        return wall
