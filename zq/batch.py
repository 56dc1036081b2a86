"""Record batches: what a producer sends, what a node stores and forwards, what a consumer decodes.

Theory of operation
-------------------
The producer encodes the records of one partition into one *blob*: a CBOR array of records,
each `[create_time_ms, key, value, headers]` (key may be null; headers a map of str to bytes or
null), optionally compressed (codec in `flags`). It sends the blob with its CRC-32 and record
count. The leading node verifies the batch whole before it proposes it (`verify_produced`: the
header fields fit their stored widths, the codec is known, the blob matches its CRC, decompresses
within a bound, and decodes, with cbor2's C decoder, into exactly `count` records of the right
shape and types), so one bad batch is refused (`invalid_request`) rather than stored where it
would stop every consumer of the partition. It then prepends a fixed 48-byte header that fixes the
batch's base offset, epoch and append time, and stores header + blob as one value. A consumer
receives stored values unchanged and decodes the records itself (`decode_stored`, the same
checks); a stored batch that still fails them (written by an older version) raises ProtocolError
with its offsets known, so the reader can count it, log it and step past it.

Stored batch layout (big-endian):

    offset size field
    0      1    magic            0x5A ('Z')
    1      1    version          1
    2      2    flags            bits 0-2: codec (0 none, 1 zlib); bit 3: control batch (see below);
                                 bit 4: verified (see below); bits 5-15: zero
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

A *verified* batch (flag bit 4) is one whose records a leader checked with `verify_produced`
when it accepted it; the bit is the node's, never a producer's (a produced batch carries only a
codec). Readers trust it as far as it goes: its header and blob checksums show it unchanged
since, so a consumer only decodes it and checks its record count, and a group lease does not
decode it at all; a batch without the bit (stored by an older version) gets every check.
That keeps the checks' cost (~0.2 µs a record for the shapes, the whole decode for a lease) off
the read paths of everything stored from now on.

A *control batch* (flag bit 3) holds no records a consumer sees: a new partition leader writes
one, of one offset and an empty blob, at the start of its epoch (see zq.core.replication), as
Kafka writes control records. Consumers skip it and go on from its next offset.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from itertools import chain
from typing import Any

from zq.errors import CorruptData, InvalidRequest, MessageTooLarge, ProtocolError
from zq.limits import DEFAULT

MAGIC = 0x5A
VERSION = 1
HEADER = struct.Struct(">BBHIQIIQQII")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 48
_CRC_SPAN = struct.Struct(">QIIQQII")  # the fields after header_crc

CODEC_NONE = 0
CODEC_ZLIB = 1
CODECS = {"none": CODEC_NONE, "zlib": CODEC_ZLIB}
CODEC_MASK = 0x7
FLAG_CONTROL = 0x8
FLAG_VERIFIED = 0x10
# Largest values of the stored header's fields, by their widths in HEADER.
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
TIME_MS_MAX = 2**63 - 1           # a record's create time: a signed 64-bit millisecond count, as consumers keep it
_NONE = type(None)


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


# cbor2 is loaded at the first encode or decode, not on import (as in zq.protocol): the first call
# of each rebinds the module's name to cbor2's own function, so later calls cost what `cbor2.dumps` did.
def _dumps(obj: Any) -> bytes:
    _bind_cbor()
    return _dumps(obj)


def _loads(data: bytes, **options: Any) -> Any:
    _bind_cbor()
    return _loads(data, **options)


def _bind_cbor() -> None:
    global _dumps, _loads
    import cbor2
    _dumps, _loads = cbor2.dumps, cbor2.loads


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


def encode_records(records: list[list[Any]], codec: int = CODEC_NONE) -> bytes:
    """Encode `[[create_time_ms, key, value, headers], ...]` into a blob."""
    blob = _dumps(records)
    if codec == CODEC_ZLIB:
        blob = zlib.compress(blob, 1)
    return blob


def decode_records(blob: bytes, flags: int) -> list[list[Any]]:
    codec = flags & 0x7
    if codec == CODEC_ZLIB:
        blob = zlib.decompress(blob)
    elif codec != CODEC_NONE:
        raise CorruptData(f"batch uses unknown codec {codec}")
    records = _loads(blob)
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


def check_incoming(blob: bytes, blob_crc: int, count: int, batch_bytes_max: int, batch_records_max: int,
                   flags: int = CODEC_NONE, producer_id: int = 0, base_sequence: int = 0,
                   decoded_bytes_max: int = DEFAULT.batch_decoded_bytes_max) -> list[list[Any]]:
    """What a node checks of a produced batch before it assigns offsets: its size, then everything
    `verify_produced` checks. Returns the records; raises a Rejected error (nothing is written)."""
    if len(blob) > batch_bytes_max:
        raise MessageTooLarge(f"batch of {len(blob)} bytes exceeds the limit of {batch_bytes_max} bytes; send smaller batches")
    try:
        return verify_produced(blob, flags, count, blob_crc, producer_id, base_sequence,
                               records_max=batch_records_max, decoded_bytes_max=decoded_bytes_max)
    except ProtocolError as e:
        raise InvalidRequest(e.message) from None


def verify_produced(blob: bytes | memoryview, flags: int, count: int, blob_crc: int, producer_id: int = 0,
                    base_sequence: int = 0, *, records_max: int = DEFAULT.batch_records_max,
                    decoded_bytes_max: int = DEFAULT.batch_decoded_bytes_max) -> list[list[Any]]:
    """The whole check of a produced batch: header fields within their stored widths, a known
    codec, the CRC, decompression within `decoded_bytes_max`, a CBOR array of exactly `count`
    records, each `[create_time_ms, key, value, headers]` of the right types. Returns the records
    (lists, as decoded); raises ProtocolError with a sentence naming the first thing wrong."""
    _check_fields(flags, count, producer_id, base_sequence, records_max)
    if crc(blob) != blob_crc:
        raise ProtocolError("the batch fails its checksum; it was damaged in transit, send it again")
    return _verify_records(blob, flags & CODEC_MASK, count, decoded_bytes_max)


def decode_stored(value: bytes | memoryview,
                  decoded_bytes_max: int = DEFAULT.batch_decoded_bytes_max) -> tuple[BatchHeader, list[list[Any]] | None]:
    """The header and the verified records of one stored batch (None for a control batch).
    CorruptData if a checksum fails (the header cannot be trusted); ProtocolError if the checksums
    hold but the records do not decode as `verify_produced` requires (the header's offsets can be
    trusted, so a reader may step past the batch)."""
    h = verify_stored(value)
    return h, stored_records(value, h, decoded_bytes_max)


def stored_records(value: bytes | memoryview, h: BatchHeader,
                   decoded_bytes_max: int = DEFAULT.batch_decoded_bytes_max) -> list[list[Any]] | None:
    """The verified records of a stored batch whose header `h` was read from it (None for a control
    batch); the blob's checksum is the caller's to check. Raises ProtocolError, with the batch's
    `base_offset` and `next_offset`, when the records fail `verify_produced`'s checks (for a batch
    marked FLAG_VERIFIED: when they do not decode into `count` records)."""
    if h.flags & FLAG_CONTROL:
        return None
    try:
        _check_fields(h.flags & ~FLAG_VERIFIED, h.count, h.producer_id, h.base_sequence, U32_MAX)
        return _verify_records(memoryview(value)[HEADER_SIZE:], h.flags & CODEC_MASK, h.count, decoded_bytes_max,
                               shapes=not h.flags & FLAG_VERIFIED)
    except ProtocolError as e:
        raise ProtocolError(f"the stored batch at offsets {h.base_offset} to {h.last_offset} is undecodable: "
                            f"{e.message}", base_offset=h.base_offset, next_offset=h.next_offset) from None


def _check_fields(flags: int, count: int, producer_id: int, base_sequence: int, records_max: int) -> None:
    for name, v, hi in (("flags", flags, 0xFFFF), ("count", count, U32_MAX), ("producer id", producer_id, U64_MAX),
                        ("base sequence", base_sequence, U32_MAX)):
        if type(v) is not int or not 0 <= v <= hi:
            raise ProtocolError(f"the batch's {name} {v!r} is not an integer from 0 to {hi}")
    if flags & ~CODEC_MASK:
        raise ProtocolError(f"the batch's flags {flags:#x} set bits other than the codec's (bits 0-2)")
    if flags not in (CODEC_NONE, CODEC_ZLIB):
        raise ProtocolError(f"the batch uses unknown codec {flags}; this node knows {sorted(CODECS.values())}")
    if not 1 <= count <= min(records_max, U32_MAX):
        raise ProtocolError(f"the batch claims {count} records; a batch holds 1 to {records_max} records")


def _verify_records(blob: bytes | memoryview, codec: int, count: int, decoded_bytes_max: int,
                    shapes: bool = True) -> list[list[Any]]:
    raw = _decompress(blob, decoded_bytes_max) if codec == CODEC_ZLIB else blob
    try:
        records = _loads(raw, max_depth=3, tag_hook=_refuse_tag, semantic_decoders=_NO_SEMANTIC_TAGS,
                              strict_hashable_types=True)
    except Exception as e:  # cbor2 raises several types for garbage; none of them is our bug
        raise ProtocolError(f"the batch's records are not valid CBOR ({e.__class__.__name__}: {e})"[:300]) from None
    if type(records) is not list:
        raise ProtocolError(f"the batch's blob is a CBOR {type(records).__name__}, not an array of records")
    if len(records) != count:
        raise ProtocolError(f"the batch holds {len(records)} records, its header says {count}")
    if shapes:
        _check_shapes(records)
    return records


def _decompress(blob: bytes | memoryview, decoded_bytes_max: int) -> bytes:
    d = zlib.decompressobj()
    try:
        raw = d.decompress(blob, decoded_bytes_max + 1)
    except zlib.error as e:
        raise ProtocolError(f"the batch's zlib stream is damaged ({e})") from None
    if len(raw) > decoded_bytes_max:
        raise ProtocolError(f"the batch decompresses to more than {decoded_bytes_max} bytes, the limit")
    if not d.eof or d.unused_data:
        raise ProtocolError("the batch's zlib stream is truncated or has bytes after its end")
    return raw


def _check_shapes(records: list[Any]) -> None:
    """Every record is `[int time, bytes|None key, bytes value, {str: bytes}|None headers]`. Column
    by column, with set(map(type, ...)) in C, not a Python loop per record (~0.25 µs a record)."""
    if set(map(type, records)) != {list} or set(map(len, records)) != {4}:
        raise ProtocolError("a record of the batch is not an array [create_time_ms, key, value, headers]")
    n = len(records)
    fields = list(chain.from_iterable(records))
    times = fields[0::4]
    if set(map(type, times)) != {int} or min(times) < 0 or max(times) > TIME_MS_MAX:
        raise ProtocolError(f"a record's create time is not an integer from 0 to {TIME_MS_MAX} ms")
    keys = fields[1::4]
    if keys.count(None) != n and not set(map(type, keys)) <= {bytes, _NONE}:   # count(): most keys are null
        raise ProtocolError("a record's key is neither bytes nor null")
    if set(map(type, fields[2::4])) != {bytes}:
        raise ProtocolError("a record's value is not bytes")
    headers = fields[3::4]
    if headers.count(None) == n:
        return
    header_types = set(map(type, headers))
    if not header_types <= {dict, _NONE}:
        raise ProtocolError("a record's headers are neither a map nor null")
    for h in filter(None, headers):
        if not set(map(type, h)) <= {str} or not set(map(type, h.values())) <= {bytes}:
            raise ProtocolError("a record's headers do not map text names to bytes values")


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    raise ValueError(f"a record holds CBOR tag {tag.tag}, which no zq record uses")


def _refuse_semantic_tag(decoder: Any) -> Any:
    raise ValueError("a record holds a CBOR semantic tag, which no zq record uses")


# cbor2 decodes these tags itself (dates, bignums, fractions, shared references...): a record uses none,
# and some cost time out of proportion to their bytes (a fraction's gcd of two huge integers).
_NO_SEMANTIC_TAGS = {t: _refuse_semantic_tag for t in (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100, 256, 258,
                                                       260, 261, 262, 263, 1004, 55799)}


def iter_records(value: bytes, start_offset: int = 0, verify: bool = True) -> list[Record]:
    """The records of one stored batch at or after `start_offset`."""
    h = verify_stored(value) if verify else unpack_header(value)
    raw = stored_records(value, h)
    if raw is None:
        return []
    out = []
    base = h.base_offset
    for i, r in enumerate(raw):
        off = base + i
        if off < start_offset:
            continue
        ts, key, val, headers = r
        out.append(Record(off, ts, key, val, headers or {}))
    return out
