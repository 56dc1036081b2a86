"""The consumer groups service's dead-letter room: the copy of a message that failed
`max_deliveries` times, with zq-* headers, produced to `TOPIC.dlq` (same partition index) with
acks=quorum, here or at that partition's leader, under an idempotent producer id derived from the
group and the source message (zq/node/groups.py, "Delivery", tells how the service works). Only
an acknowledged copy marks the source offset done (zq.core.grouplead's `on_dead_letter_written`).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

from zq import batch as zbatch
from zq import protocol as P
from zq.core.bounds import PRODUCER_ID_MAX
from zq.core.grouplead import DeadLetterWrite
from zq.core.repl_types import COMMITTED
from zq.errors import ProtocolError, ZqError
from zq.node.group_common import GroupServiceState, Key, _Held, dead_letter_wait_ms, log


class DeadLetterRoom(GroupServiceState):
    """Dead-letter copies written once, and their outcome handed back to the partition's rules."""

    # ------------------------------------------------------------------ dead letters

    def _write_dead_letter(self, key: Key, held: _Held, write: DeadLetterWrite) -> None:
        group, topic_id, p = key
        node = self.host
        d = write.letter
        t = node.meta.topics_by_id.get(topic_id)
        if t is None:
            held.abandon_dead_letter(write)
            return
        source = self._source_record(t.name, p, d.offset)
        dlq = node.meta.topics.get(t.name + ".dlq")
        if source is None or dlq is None:
            # Retention deleted the message, or it has no dead-letter topic (it is one): nothing
            # can be copied, so the group moves on, loudly.
            log.warning("group %s: %s/%d offset %d cannot be dead-lettered (%s); skipped", group, t.name, p,
                        d.offset, "no longer stored" if source is None else f"no topic {t.name}.dlq")
            node.counters["group_dead_letters_skipped"] += 1
            self._on_dead_letter_written(key, write, True, counted=False)
            return
        headers = dict(source.headers or {})
        headers.update({
            "zq-source-topic": t.name.encode(), "zq-source-partition": str(p).encode(),
            "zq-source-offset": str(d.offset).encode(), "zq-attempts": str(d.attempts).encode(),
            "zq-last-error": d.last_error.encode(), "zq-first-failure-ms": str(d.first_failure_ms).encode(),
            "zq-last-failure-ms": str(d.last_failure_ms).encode(), "zq-group": group.encode(),
        })
        record = [node.wall_ms(), source.key, source.value, headers]
        dp = p % len(dlq.partitions)
        # Idempotent across retries and leader changes: one producer id per source message, sequence 0,
        # so a copy written whose answer was lost, or written by an earlier leader of the source
        # partition, is answered as a duplicate instead of written again (a hostile test once found
        # one poison message twice in its TOPIC.dlq).
        producer_id = dead_letter_producer_id(group, topic_id, p, d.offset)
        if node.leads(dlq.name, dp):
            def local_done(outcome: Any) -> None:
                ok = not isinstance(outcome, ZqError) and getattr(outcome, "status", None) == COMMITTED
                self._on_dead_letter_written(key, write, ok)
            node.produce_local(dlq.name, dp, [record], local_done, acks_quorum=True, producer_id=producer_id,
                               base_sequence=0)
            return
        leader = node.leader_address(dlq.name, dp)[0]
        if leader is None:
            held.abandon_dead_letter(write)   # the next sweep tries again
            return
        blob = zbatch.encode_records([record])
        request = P.Produce(node.next_req_id(), dlq.name, dp, 2, 1, zbatch.crc(blob), producer_id, 0, 0)
        self._request_with_frames(leader, request, [blob], lambda reply, _: self._on_dead_letter_written(
            key, write, isinstance(reply, P.ProduceReply)))

    def _source_record(self, topic: str, partition: int, offset: int) -> Any:
        for value in self.host.read_committed(topic, partition, offset, 1):
            try:
                records = zbatch.iter_records(value, offset)
            except ProtocolError as e:   # undecodable: nothing to copy, skipped as a deleted record is
                log.error("%s/%d offset %d: %s", topic, partition, offset, e.message)
                return None
            for rec in records:
                if rec.offset == offset:
                    return rec
            break
        return None

    def _on_dead_letter_written(self, key: Key, write: DeadLetterWrite, ok: bool, counted: bool = True) -> None:
        held = self.held.get(key)
        if held is None:
            return
        if not ok:
            self.host.counters["group_dead_letter_failures"] += 1
        if held.on_dead_letter_written(write, ok, counted) and counted:
            self.host.counters["group_dead_letters"] += 1

    def _request_with_frames(self, name: str, msg: Any, frames: list[bytes], on_reply: Callable[[Any, list], None]) -> None:
        """A request to a peer with payload frames (a Produce of dead letters to a remote leader)."""
        self.host.request_peer(name, msg, on_reply, dead_letter_wait_ms, frames=frames)


def dead_letter_producer_id(group: str, topic_id: int, partition: int, offset: int) -> int:
    """The idempotent producer id of the dead-letter copy of one source message: derived from the
    group and the source's topic id, partition and offset, so every writer of that copy (a retry,
    a later leader of the source partition) uses the same one; 63 bits, never 0 (not idempotent)."""
    digest = hashlib.blake2b(f"zq-dlq|{group}|{topic_id}|{partition}|{offset}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") & PRODUCER_ID_MAX) or 1
