"""Produce, fetch and list-offsets: where a client's request meets a partition's leader, and
fetches parked until data arrives (long-poll). One implementation, run by the real node
(zq/io/node_clients.py decodes, calls this room, and encodes what it answers) and by the cluster
simulator (zq/sim/cluster.py's producers and consumers reach their nodes through it).

Produce. A batch goes to a partition this node leads (else `NotLeader`, naming the leader this
node believes in, or `LeaderNotAvailable` during an election), that is not fenced, on a node whose
disk has room; the whole batch, records included, is checked before it is proposed (one stored
bad batch would stop every consumer of the partition at its offset). It is stamped with the
leader's append time (`Replica.append_time_ms`: its replica set's clock) and proposed to the core.
With `acks` = 2 (quorum) the producer is answered when the core reports the batch's outcome, which
the persist-then-send pass (zq.node.replicas) hands over only after the pass that made the
commit durable; with `acks` = 1 (leader) once this node's own write of it is durable; with 0
never. An outcome other than COMMITTED becomes the error the client sees (`outcome_error`).

Fetch. An offset outside [log_start, high watermark] is `OffsetOutOfRange` (with both bounds);
what is read lies below the high watermark, never at or above it. A fetch at the high watermark
with a wait parks until the high watermark moves (`on_high_watermark`, called by the host once
the pass that moved it is durable), its wait runs out (a timer), or this node stops leading
(`refuse_parked`: the fetch learns where to go instead). One parked fetch per client and
partition (an earlier one is answered at once with what there is), at most
`limits.pending_fetches_max` in all (beyond that a fetch is answered at once), each waiting at
most `limits.fetch_wait_ms_max`. A client that leaves its fetch replies unread in this node is
refused with `Backpressure` (the host says how much it holds: `ClientHost.fetch_backlog`).

FetchMany (Kafka's multi-partition fetch). Several partitions of one topic in one request, each
answered as a Fetch of it alone would be (its batches below its high watermark, or its error, in
the reply's `errors`), within one reply's bytes and frames. It is answered at once when any of them
has data or an error, else parked on all of them and woken when any one's high watermark moves; a
partition this node stops leading answers the whole request (that partition with where to go).
"One parked fetch per client and partition" holds across both kinds. A consumer of many
partitions so asks once per pass of its node, not once per partition: with 64 partitions and one
message per pass, 64 fetch round trips become one.

Standard library only; the node comes in as `zq.node.host.ClientHost`, the replicas as the pass's
`zq.node.replicas.ReplicaSet`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from zq import batch as zbatch
from zq import protocol as P
from zq.core.repl_types import (BACKPRESSURE, COMMITTED, DUPLICATE_SEQUENCE, LEADER, NO_PRODUCER, NOT_LEADER,
                                OUT_OF_ORDER, Outcome)
from zq.errors import (Backpressure, InvalidRequest, LeaderNotAvailable, NotLeader, OffsetOutOfRange,
                       OutOfOrderSequence, PartitionFenced, ProtocolError, StorageFull, ZqError)
from zq.node.host import ClientHost
from zq.node.replicas import Part, ReplicaSet
from zq.types import META_TOPIC


@dataclass(slots=True)
class Parked:
    """A fetch waiting for data (long-poll)."""
    deadline_ms: int
    identity: bytes
    msg: P.Fetch | P.FetchMany
    tps: tuple           # the partitions it waits on: one for a Fetch
    done: bool = False


def core_producer(producer_id: int, base_sequence: int) -> tuple[int, int]:
    """The wire's producer (0: not idempotent) as the replication core names it."""
    return (producer_id, base_sequence) if producer_id else (NO_PRODUCER, NO_PRODUCER)


def _what(part: Part) -> str:
    return f"{part.name}/{getattr(part.tp, 'partition', part.tp)}"   # the simulator's partitions are numbers


class Clients:
    """A node's client-facing partition service: produce, fetch (with parked fetches), list-offsets."""

    def __init__(self, host: ClientHost, replicas: ReplicaSet) -> None:
        self.host = host
        self.replicas = replicas
        self.parked: dict[Hashable, list[Parked]] = defaultdict(list)
        self.parked_count = 0
        self.parked_by_client: dict[tuple[bytes, Hashable], Parked] = {}   # one long-poll per client and partition

    # ---------------------------------------------------------------- leaders

    def local_leader(self, topic: str, partition: int) -> tuple[Hashable, Part]:
        """The partition and our replica of it, if this node leads it; else the error that says where to go."""
        tp = self.host.resolve(topic, partition)
        part = self.replicas.parts.get(tp)
        if tp in self.replicas.fenced:
            raise PartitionFenced(f"{topic}/{partition} is fenced on node {self.host.name} after an internal error "
                                  "(its log says which); retry, and check that node's log", node=self.host.name)
        if part is not None and part.replica is not None and part.replica.role == LEADER:
            return tp, part
        raise self.not_leader(self.host.leader_of(tp)[0], f"{topic}/{partition}")

    def not_leader(self, leader: str | None, what: str) -> ZqError:
        if leader is None or leader == self.host.name:
            return LeaderNotAvailable(f"{what} has no leader right now (an election is under way); retry shortly")
        address = self.host.address_of(leader)
        return NotLeader(f"{self.host.name} does not lead {what}; {leader} ({address or 'address unknown'}) does",
                         leader=leader, address=address)

    # ---------------------------------------------------------------- produce

    def on_produce(self, identity: bytes, msg: P.Produce, payload: list[bytes]) -> None:
        host = self.host
        host.counters["produce_requests"] += 1
        if len(payload) != 1:
            raise ProtocolError(f"Produce carries one payload frame (the batch), got {len(payload)}")
        if msg.topic == META_TOPIC:
            raise InvalidRequest(f"{META_TOPIC} is written by zq itself, not by producers")
        _, part = self.local_leader(msg.topic, msg.partition)
        full = host.storage_full()
        if full is not None:
            raise StorageFull(f"{host.name} has {full}; free space or add nodes; nothing was written")
        blob = payload[0]
        limits = host.limits
        try:
            # The whole batch, records included, before it is proposed: one stored bad batch would stop
            # every consumer of the partition at its offset.
            zbatch.check_incoming(blob, msg.blob_crc, msg.count, limits.batch_bytes_max, limits.batch_records_max,
                                  msg.flags, msg.producer_id, msg.base_sequence, limits.batch_decoded_bytes_max)
        except ZqError:
            host.counters["produce_batches_refused"] += 1
            raise
        append_time = self.append_time(part)
        placeholder = zbatch.make_stored(msg.flags | zbatch.FLAG_VERIFIED, 0, msg.count, 0, append_time,
                                         msg.producer_id, msg.base_sequence, msg.blob_crc, blob)
        answer = None if msg.acks == 0 else lambda o: self._answer_produce(identity, msg, part, append_time, o)
        self.propose(part, msg.count, msg.producer_id, msg.base_sequence, placeholder, answer, leader_ack=msg.acks == 1)
        host.counters["produced_records"] += msg.count
        host.counters["produced_bytes"] += len(blob)

    def append_time(self, part: Part) -> int:
        """The append time of a batch proposed now on a partition we lead (see Replica.append_time_ms)."""
        part.replica.tick(self.host.now_ms(), self.host.wall_ms())
        self.replicas.dirty.add(part.tp)
        stamp = part.replica.append_time_ms()
        if stamp is None:
            raise LeaderNotAvailable(f"{_what(part)} has a new leader that has not yet heard its replicas' clocks; "
                                     "retry shortly")
        return stamp

    def propose(self, part: Part, count: int, producer_id: int, base_sequence: int, stored: bytes,
                callback: Callable[[Any], None] | None, leader_ack: bool = False) -> None:
        """Propose a stored batch on a partition we lead; `callback(outcome_or_ZqError)` runs once
        the pass made it durable: committed (quorum), or written here (`leader_ack`)."""
        replica = part.replica
        pid, seq = core_producer(producer_id, base_sequence)
        before = replica.log_end
        proposal = replica.propose(count, pid, seq, stored)
        self.replicas.dirty.add(part.tp)
        if callback is None:
            return
        if leader_ack and replica.log_end > before:
            # acks=leader: answer once this node holds the batch durably, not when a majority does.
            done = Outcome(proposal, COMMITTED, before, replica.epoch, self.host.name)
            part.leader_acks.append((replica.log_end, lambda error: callback(error or done)))
        else:
            part.waiters[proposal] = callback

    def _answer_produce(self, identity: bytes, msg: P.Produce, part: Part, append_time: int, outcome: Any) -> None:
        if isinstance(outcome, ZqError):
            self.host.reply_error(identity, msg.req_id, outcome)
        elif outcome.status == COMMITTED:
            self.host.reply(identity, P.ProduceReply(msg.req_id, outcome.base_offset, outcome.epoch, append_time,
                                                     part.log_start))
        else:
            self.host.reply_error(identity, msg.req_id, self.outcome_error(part, outcome))

    def outcome_error(self, part: Part, outcome: Outcome) -> ZqError:
        what = _what(part)
        if outcome.status == NOT_LEADER:
            return self.not_leader(outcome.leader_hint, what)
        if outcome.status == BACKPRESSURE:
            return Backpressure(f"{what} has too many writes waiting for replication; retry shortly")
        if outcome.status == OUT_OF_ORDER:
            return OutOfOrderSequence(f"the idempotent producer skipped sequence numbers on {what}; "
                                      "batches were lost in between: restart the producer")
        if outcome.status == DUPLICATE_SEQUENCE:
            return OutOfOrderSequence(f"the idempotent producer resent an old batch on {what}; it was written before")
        return ZqError(f"unexpected outcome {outcome.status} on {what}")

    # ---------------------------------------------------------------- fetch

    def on_fetch(self, identity: bytes, msg: P.Fetch) -> None:
        host = self.host
        host.counters["fetch_requests"] += 1
        tp, part = self.local_leader(msg.topic, msg.partition)
        self._check_range(msg.topic, msg.partition, msg.offset, part)
        self._check_backlog(identity, f"{msg.topic}/{msg.partition}")
        self._answer_earlier(identity, (tp,))
        if msg.offset < part.high_watermark or not self._may_park(msg.max_wait_ms):
            self._reply_fetch(identity, msg, tp, part)
            return
        self._park(identity, msg, (tp,))

    def on_fetch_many(self, identity: bytes, msg: P.FetchMany) -> None:
        """Several partitions of one topic at once: each is answered as a Fetch of it alone would
        be (its batches, or its error), in one reply; held while none of them has anything to give."""
        host = self.host
        host.counters["fetch_requests"] += 1
        if msg.topic == META_TOPIC:
            raise InvalidRequest(f"{META_TOPIC} is read with Fetch, one partition")
        if len({p for p, _ in msg.partitions}) != len(msg.partitions):
            raise InvalidRequest("FetchMany names a partition twice; name each once")
        self._check_backlog(identity, msg.topic)
        reply, values, tps = self._answer_many(msg)
        self._answer_earlier(identity, tps)
        if values or reply.errors or not msg.partitions or not self._may_park(msg.max_wait_ms):
            self._send_many(identity, reply, values)
        else:
            self._park(identity, msg, tuple(tps))

    @staticmethod
    def _check_range(topic: str, partition: int, offset: int, part: Part) -> None:
        hw = part.high_watermark
        if offset < part.log_start or offset > hw:
            raise OffsetOutOfRange(
                f"offset {offset} is outside the retained range [{part.log_start}, {hw}] of "
                f"{topic}/{partition}; read from earliest or latest", log_start=part.log_start,
                high_watermark=hw)

    def _may_park(self, max_wait_ms: int) -> bool:
        return max_wait_ms > 0 and self.parked_count < self.host.limits.pending_fetches_max

    def _answer_earlier(self, identity: bytes, tps) -> None:
        """One long-poll per client and partition: an earlier one of this client waiting on any of
        `tps` is answered now (with what there is), so a client cannot park fetches without bound."""
        for tp in tps:
            earlier = self.parked_by_client.get((identity, tp))
            if earlier is not None:
                self._unpark(earlier)
                self._reply_parked(earlier)

    def _park(self, identity: bytes, msg: P.Fetch | P.FetchMany, tps: tuple) -> None:
        wait_ms = min(msg.max_wait_ms, self.host.limits.fetch_wait_ms_max)
        parked = Parked(self.host.now_ms() + wait_ms, identity, msg, tps)
        for tp in tps:
            self.parked[tp].append(parked)
            self.parked_by_client[(identity, tp)] = parked
        self.parked_count += 1
        self.host.at(parked.deadline_ms, lambda: self._expire(parked))

    def _check_backlog(self, identity: bytes, what: str) -> None:
        """A client whose earlier fetch replies still wait in this node to be written (it does not
        read them) is slowed down: Backpressure until the host has written them out."""
        replies, size, total = self.host.fetch_backlog(identity)
        lim = self.host.limits
        if (size > lim.fetch_client_pending_bytes_max or replies > lim.fetch_client_pending_replies_max
                or total > lim.fetch_pending_bytes_max):
            self.host.counters["fetches_backpressured"] += 1
            raise Backpressure(f"fetch replies to this client are not being read ({what}); "
                               "read the replies already sent, then fetch again")

    def _reply_fetch(self, identity: bytes, msg: P.Fetch, tp: Hashable, part: Part) -> None:
        """Answer a fetch with what lies from its offset below the high watermark (maybe nothing)."""
        values: list = []
        hw = part.high_watermark
        lim = self.host.limits
        if msg.offset < hw:
            max_bytes = max(1, min(msg.max_bytes, lim.fetch_bytes_max))
            values = self.host.read(tp, msg.offset, max_bytes, hw)[0]
            del values[lim.frames_per_message_max - 2:]   # a reply must stay decodable
        self.host.counters["fetched_batches"] += len(values)
        self.host.reply_fetch(identity, P.FetchReply(msg.req_id, hw, part.log_start, part.log_end), values)

    def _answer_many(self, msg: P.FetchMany, refused: Hashable = None,
                     error: ZqError | None = None) -> tuple[P.FetchManyReply, list, list]:
        """A FetchMany's answer as things stand: for each partition, what a Fetch of it alone would
        get now (its batches below the high watermark, or its error; `error` for the partition
        `refused`), within one reply's bytes and frames; and the partitions answered without error.
        Partitions past the budget get no batches (and are fetched again): each partition answered
        gets at least one batch while room is left."""
        lim = self.host.limits
        budget = max(1, min(msg.max_bytes, lim.fetch_bytes_max))
        frames_left = lim.frames_per_message_max - 2   # a reply must stay decodable
        results, errors, values, tps = [], [], [], []
        read, topic = self.host.read, msg.topic
        for partition, offset in msg.partitions:
            try:
                if refused is not None and self.host.resolve(topic, partition) == refused:
                    raise self._refusal(refused, f"{topic}/{partition}", error)
                tp, part = self.local_leader(topic, partition)
                self._check_range(topic, partition, offset, part)
                hw = part.high_watermark
            except ZqError as e:
                errors.append([partition, e.code, e.message, P.error_reply(0, e).data])
                continue
            tps.append(tp)
            n = 0
            if offset < hw and budget > 0 and frames_left > 0:
                got, size = read(tp, offset, budget, hw)
                del got[frames_left:]
                budget -= size
                n = len(got)
                frames_left -= n
                values += got
            results.append([partition, hw, part.log_start, part.log_end, n])
        return P.FetchManyReply(msg.req_id, results, errors), values, tps

    def _send_many(self, identity: bytes, reply: P.FetchManyReply, values: list) -> None:
        self.host.counters["fetched_batches"] += len(values)
        self.host.reply_fetch(identity, reply, values)

    def _reply_parked(self, parked: Parked, refused: Hashable = None, error: ZqError | None = None) -> None:
        """Answer a fetch taken off the parked ones (by `_unpark`)."""
        msg = parked.msg
        if type(msg) is P.FetchMany:
            reply, values, _ = self._answer_many(msg, refused, error)
            self._send_many(parked.identity, reply, values)
            return
        tp = parked.tps[0]
        part = self.replicas.parts.get(tp)
        if tp == refused:
            self.host.reply_error(parked.identity, msg.req_id, self._refusal(tp, f"{msg.topic}/{msg.partition}", error))
        elif part is not None:
            self._reply_fetch(parked.identity, msg, tp, part)

    def _refusal(self, tp: Hashable, what: str, error: ZqError | None) -> ZqError:
        """What a parked fetch of `tp` learns when this node stops leading it: `error`, else where to go."""
        return error or self.not_leader(self.host.leader_of(tp)[0], what)

    def _unpark(self, parked: Parked) -> None:
        parked.done = True
        self.parked_count -= 1
        for tp in parked.tps:
            key = (parked.identity, tp)
            if self.parked_by_client.get(key) is parked:
                del self.parked_by_client[key]
            waiting = self.parked.get(tp)
            if waiting is not None and parked in waiting:
                waiting.remove(parked)
                if not waiting:
                    del self.parked[tp]

    def on_high_watermark(self, tp: Hashable, high_watermark: int) -> None:
        """The high watermark of `tp` moved, durably (the host calls this after the pass): its
        parked fetches are answered."""
        waiting = self.parked.pop(tp, None)
        if not waiting:
            return
        for parked in waiting:
            if not parked.done:
                self._unpark(parked)
                self._reply_parked(parked)

    def refuse_parked(self, tp: Hashable, error: ZqError | None = None) -> None:
        """This node stopped leading `tp` (or holds it no more): waiting fetches learn where to go
        instead, or `error` (a FetchMany: for that partition, the others answered as they stand)."""
        waiting = self.parked.pop(tp, None)
        for parked in waiting or ():
            if not parked.done:
                self._unpark(parked)
                self._reply_parked(parked, tp, error)

    def _expire(self, parked: Parked) -> None:
        if parked.done:
            return
        self._unpark(parked)
        self._reply_parked(parked)

    # ---------------------------------------------------------------- list offsets

    def on_list_offsets(self, identity: bytes, msg: P.ListOffsets) -> None:
        tp, part = self.local_leader(msg.topic, msg.partition)
        hw = part.high_watermark
        if msg.spec == "earliest":
            offset = part.log_start
        elif msg.spec == "latest":
            offset = hw
        elif isinstance(msg.spec, int):
            found = self.host.offset_for_time(tp, msg.spec)
            offset = hw if found is None else min(max(found, part.log_start), hw)
        else:
            raise InvalidRequest(f"offset spec must be 'earliest', 'latest' or a time in ms, got {msg.spec!r}")
        self.host.reply(identity, P.OffsetsReply(msg.req_id, offset, part.log_start, hw))
