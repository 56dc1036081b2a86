"""The glue between the replication core and the node's store and sockets.

The core (`zq.core.replication.Replica`) speaks in `Entry` objects whose payload is opaque. In a
node that payload is the stored batch itself (zq.batch: header + blob), so that a follower
stores exactly the bytes the leader stored and a fetch returns them unchanged. Two details:

- a leader proposes a produced batch before it knows the batch's offset, so the payload's header
  carries a placeholder base offset and epoch; whoever stores an entry *restamps* the header
  from the entry's own fields (`stored_from_entry`), which also makes a follower check the
  batch's checksums before it writes anything;
- the core's one-record leader marker has an empty payload, and its one-record configuration
  entries (replica-set changes) carry the core's encoding of the voters; both are stored as
  control batches (zq.batch.FLAG_CONTROL) holding that payload as their blob, which consumers
  skip. A produced batch always starts with the batch magic, so it cannot pass for either.

Producer ids: the wire and the batch header use 0 for "not idempotent", the core uses -1.
"""
from __future__ import annotations

import struct

import cbor2

from zq import batch as zbatch
from zq.core.repl_types import MARKER_PAYLOAD, NO_PRODUCER, Entry, HardState
from zq.errors import CorruptData, ProtocolError
from zq.io.store import Store
from zq.types import TopicPartition

_HS = struct.Struct(">II")


def tp_bytes(tp: TopicPartition) -> bytes:
    """The PUB/SUB topic frame of a partition: 8 bytes, so prefix matching is exact matching."""
    return _HS.pack(tp.topic_id, tp.partition)


def tp_from_bytes(b: bytes) -> TopicPartition:
    if len(b) != _HS.size:
        raise ProtocolError("a replication topic frame is 8 bytes")
    return TopicPartition(*_HS.unpack(b))


def core_producer(producer_id: int, base_sequence: int) -> tuple[int, int]:
    return (producer_id, base_sequence) if producer_id else (NO_PRODUCER, NO_PRODUCER)


def entry_from_stored(value: bytes) -> Entry:
    h = zbatch.unpack_header(value)
    if h.flags & zbatch.FLAG_CONTROL:
        blob = bytes(value[zbatch.HEADER_SIZE:])
        return Entry(h.base_offset, 1, h.epoch, NO_PRODUCER, NO_PRODUCER, blob or MARKER_PAYLOAD)
    pid, seq = core_producer(h.producer_id, h.base_sequence)
    return Entry(h.base_offset, h.count, h.epoch, pid, seq, value)


def stored_from_entry(entry: Entry) -> tuple[bytes, zbatch.BatchHeader]:
    """The bytes to store for an entry, verified. Raises CorruptData for a damaged payload."""
    if entry.is_marker or entry.config is not None:
        # Append time 0, not this node's clock, so every replica stores the very same bytes (the
        # store's time index clamps it to the batch before, so time lookups are unaffected).
        value = zbatch.control_batch(entry.base_offset, entry.epoch, 0, entry.payload)
    else:
        value = zbatch.restamp(entry.payload, entry.base_offset, entry.epoch)
    header = zbatch.verify_stored(value)
    if header.count != entry.count:
        raise CorruptData(f"replicated batch at {entry.base_offset} holds {header.count} records, entry says {entry.count}")
    return value, header


class StoreReader:
    """The core's LogReader over one partition of the store (committed writes only)."""

    def __init__(self, store: Store, tp: TopicPartition):
        self.store = store
        self.tp = tp

    def read(self, offset: int, max_bytes: int) -> list[Entry]:
        return [entry_from_stored(v) for v in self.store.read(self.tp, offset, max(1, max_bytes))]


def hard_state_key(tp: TopicPartition) -> bytes:
    return b"hs" + _HS.pack(tp.topic_id, tp.partition)


def encode_hard_state(hs: HardState) -> bytes:
    return cbor2.dumps([hs.epoch, hs.voted_for, [list(x) for x in hs.epoch_history], hs.high_watermark,
                        [[offset, list(voters)] for offset, voters in hs.configs], hs.join_epoch, hs.recovering])


def load_hard_state(store: Store, tp: TopicPartition) -> HardState | None:
    raw = store.get_meta(hard_state_key(tp))
    if raw is None:
        return None
    fields = cbor2.loads(raw)
    epoch, voted_for, history, hw = fields[:4]
    configs = fields[4] if len(fields) > 4 else []   # written before replica sets could change: none
    join_epoch = fields[5] if len(fields) > 5 else 0
    recovering = bool(fields[6]) if len(fields) > 6 else False  # written before recovery existed: not recovering
    return HardState(epoch, voted_for, tuple(tuple(x) for x in history), hw,
                     tuple((offset, tuple(voters)) for offset, voters in configs), join_epoch, recovering)


def removed_key(tp: TopicPartition) -> bytes:
    """Meta key of the epoch a replica of `tp` had reached when this node deleted it (a move took
    it away): a replica made here again joins in a later epoch (HardState.join_epoch)."""
    return b"rm" + _HS.pack(tp.topic_id, tp.partition)


_APPEND_CODE = 20   # zq.protocol registers repl_types.Append under this code


def pack_items(items: list) -> tuple[list, list[bytes]]:
    """Move the entry payloads of Replicate items into frames of their own.

    An Append's entries carry whole stored batches; inside the CBOR header they would be copied,
    and would break the header's size bound. On the wire an entry's payload field is instead the
    index of the payload frame that holds it."""
    frames: list[bytes] = []
    out = []
    for tid, p, arr in items:
        if arr[0] == _APPEND_CODE and arr[7]:
            entries = []
            for e in arr[7]:
                entries.append([*e[:5], len(frames)])
                frames.append(e[5])
            arr = [*arr[:7], entries, *arr[8:]]   # fields after the entries (log_start) stay
        out.append([tid, p, arr])
    return out, frames


def unpack_items(items: list, frames: list) -> list:
    """The inverse of pack_items; a reference to a missing frame is the peer's error."""
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[2], list) and item[2]):
            raise ProtocolError("a Replicate item is [topic_id, partition, message]")
        tid, p, arr = item
        if arr[0] == _APPEND_CODE and len(arr) >= 8 and isinstance(arr[7], list) and arr[7]:
            entries = []
            for e in arr[7]:
                if not (isinstance(e, list) and len(e) == 6 and type(e[5]) is int and 0 <= e[5] < len(frames)):
                    raise ProtocolError("a replicated entry names a payload frame that is not there")
                entries.append([*e[:5], bytes(frames[e[5]])])
            arr = [*arr[:7], entries, *arr[8:]]
        out.append([tid, p, arr])
    return out


def chunk_items(items: list, frames_max: int) -> list[list]:
    """Split items so that no message carries more than `frames_max` payload frames."""
    chunks: list[list] = [[]]
    frames = 0
    for item in items:
        arr = item[2]
        n = len(arr[7]) if arr[0] == _APPEND_CODE else 0
        if chunks[-1] and frames + n > frames_max:
            chunks.append([])
            frames = 0
        chunks[-1].append(item)
        frames += n
    return chunks
