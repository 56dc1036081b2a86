"""Record batches: what a producer sends, what a node stores and forwards, what a consumer decodes.

Theory of operation
-------------------
The producer encodes the records of one partition into one *blob*: a CBOR array of records,
each `[create_time_ms, key, value, headers]` (key may be null; headers a map of str to bytes or
null), optionally compressed (codec in `flags`). It sends the blob with its CRC-32 and record
count. The node never decodes the blob: it checks the CRC, prepends a fixed 48-byte header that
fixes the batch's base offset, epoch and append time, and stores header + blob as one value. A
consumer receives stored values unchanged and decodes the records itself. So the node's cost per
batch does not grow with the number of records in it.

Stored batch layout (big-endian):

    offset size field
    0      1    magic            0x5A ('Z')
    1      1    version          1
    2      2    flags            bits 0-2: codec (0 none, 1 zlib); bit 3: control batch (see below)
    4      4    header_crc       CRC-32 of bytes 2..4 and 8..48 of this header (all but magic, version, itself)
    8      8    base_offset      offset of the first record
    16     4    count            records in the batch (>= 1)
    20     4    epoch            leader epoch that appended the batch
    24     8    append_time_ms   leader's clock when it appended (non-decreasing per partition)
    32     8    producer_id      0 when the producer is not idempotent
    40     4    base_sequence    idempotent producer's sequence of the first record
    44     4    blob_crc         CRC-32 of the blob
    48     ...  blob

Checksums are verified when a node accepts a batch, when it reads one back, and by the consumer.

A *control batch* (flag bit 3) holds no records a consumer sees: a new partition leader writes
one, of one offset and an empty blob, at the start of its epoch (see zq.core.replication), as
Kafka writes control records. Consumers skip it and go on from its next offset.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import cbor2

from zq.errors import CorruptData, InvalidRequest, MessageTooLarge

MAGIC = 0x5A
VERSION = 1
HEADER = struct.Struct(">BBHIQIIQQII")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 48
_CRC_SPAN = struct.Struct(">QIIQQII")  # the fields after header_crc

CODEC_NONE = 0
CODEC_ZLIB = 1
CODECS = {"none": CODEC_NONE, "zlib": CODEC_ZLIB}
FLAG_CONTROL = 0x8


@dataclass(frozen=True, slots=True)
class BatchHeader:
    flags: int
    base_offset: int
    count: int
    epoch: int
    append_time_ms: int
    producer_id: int
    base_sequence: int
    blob_crc: int

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.count - 1

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.count


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


def encode_records(records: list[list[Any]], codec: int = CODEC_NONE) -> bytes:
    """Encode `[[create_time_ms, key, value, headers], ...]` into a blob."""
    blob = cbor2.dumps(records)
    if codec == CODEC_ZLIB:
        blob = zlib.compress(blob, 1)
    return blob


def decode_records(blob: bytes, flags: int) -> list[list[Any]]:
    codec = flags & 0x7
    if codec == CODEC_ZLIB:
        blob = zlib.decompress(blob)
    elif codec != CODEC_NONE:
        raise CorruptData(f"batch uses unknown codec {codec}")
    records = cbor2.loads(blob)
    if not isinstance(records, list):
        raise CorruptData("batch blob is not a CBOR array")
    return records


def crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def pack_header(h: BatchHeader) -> bytes:
    span = _CRC_SPAN.pack(h.base_offset, h.count, h.epoch, h.append_time_ms, h.producer_id,
                          h.base_sequence, h.blob_crc)
    flags = struct.pack(">H", h.flags)
    return struct.pack(">BB", MAGIC, VERSION) + flags + struct.pack(">I", zlib.crc32(span, zlib.crc32(flags)) & 0xFFFFFFFF) + span


def unpack_header(value: bytes | memoryview) -> BatchHeader:
    """Parse and verify the header of a stored batch. Raises CorruptData."""
    if len(value) < HEADER_SIZE:
        raise CorruptData(f"stored batch is {len(value)} bytes, shorter than its header")
    magic, version, flags, header_crc, *rest = HEADER.unpack_from(value, 0)
    if magic != MAGIC or version != VERSION:
        raise CorruptData(f"stored batch has magic {magic:#x} version {version}, expected {MAGIC:#x} {VERSION}")
    view = memoryview(value)
    if zlib.crc32(view[8:HEADER_SIZE], zlib.crc32(view[2:4])) & 0xFFFFFFFF != header_crc:
        raise CorruptData("stored batch header fails its checksum")
    return BatchHeader(flags, *rest)


def restamp(stored: bytes, base_offset: int, epoch: int) -> bytes:
    """The same batch with its base offset and epoch set: what a leader fixes when it appends a
    produced batch, and what a follower checks it holds (the header CRC is recomputed)."""
    h = unpack_header(stored)
    if h.base_offset == base_offset and h.epoch == epoch:
        return stored
    fixed = BatchHeader(h.flags, base_offset, h.count, epoch, h.append_time_ms, h.producer_id, h.base_sequence,
                        h.blob_crc)
    return pack_header(fixed) + stored[HEADER_SIZE:]


def control_batch(base_offset: int, epoch: int, append_time_ms: int, blob: bytes = b"") -> bytes:
    """A one-record batch of zq's own that consumers skip: a leader's epoch marker (empty blob) or a
    replica-set configuration (the blob is the replication core's encoding of it)."""
    return make_stored(FLAG_CONTROL, base_offset, 1, epoch, append_time_ms, 0, 0, crc(blob), blob)


def make_stored(flags: int, base_offset: int, count: int, epoch: int, append_time_ms: int,
                producer_id: int, base_sequence: int, blob_crc: int, blob: bytes) -> bytes:
    """Header + blob, as the store keeps it and a fetch returns it."""
    h = BatchHeader(flags, base_offset, count, epoch, append_time_ms, producer_id, base_sequence, blob_crc)
    return pack_header(h) + blob


def verify_stored(value: bytes | memoryview) -> BatchHeader:
    """Header and blob checksums both hold, or CorruptData."""
    h = unpack_header(value)
    if crc(memoryview(value)[HEADER_SIZE:]) != h.blob_crc:
        raise CorruptData(f"batch at offset {h.base_offset} fails its checksum")
    return h


def check_incoming(blob: bytes, blob_crc: int, count: int, batch_bytes_max: int, batch_records_max: int) -> None:
    """What a node checks of a produced batch before it assigns offsets. Raises a Rejected error."""
    if len(blob) > batch_bytes_max:
        raise MessageTooLarge(f"batch of {len(blob)} bytes exceeds the limit of {batch_bytes_max} bytes; send smaller batches")
    if not 1 <= count <= batch_records_max:
        raise InvalidRequest(f"batch claims {count} records; a batch holds 1 to {batch_records_max}")
    if crc(blob) != blob_crc:
        raise InvalidRequest("batch fails its checksum; it was damaged in transit, send it again")


def iter_records(value: bytes, start_offset: int = 0, verify: bool = True) -> list[Record]:
    """The records of one stored batch at or after `start_offset`."""
    h = verify_stored(value) if verify else unpack_header(value)
    if h.flags & FLAG_CONTROL:
        return []
    raw = decode_records(memoryview(value)[HEADER_SIZE:].tobytes() if isinstance(value, memoryview) else value[HEADER_SIZE:], h.flags)
    if len(raw) != h.count:
        raise CorruptData(f"batch at offset {h.base_offset} holds {len(raw)} records, header says {h.count}")
    out = []
    base = h.base_offset
    for i, r in enumerate(raw):
        off = base + i
        if off < start_offset:
            continue
        ts, key, val, headers = r
        out.append(Record(off, ts, key, val, headers or {}))
    return out
