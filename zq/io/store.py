"""The RocksDB store: durable, verified storage of stored batches, partition state and node metadata.

Theory of operation
-------------------
This is an I/O shell. It makes no protocol decisions; the node's cores decide what to write and
the node's event loop gathers one loop pass of writes into one `WriteTxn`, which wraps one
RocksDB `WriteBatch`, and commits it with one `db.write` (group commit: one fsync for every batch
of the pass when `sync=True`). A WriteBatch is atomic, so after a crash or a failed write either
all of a pass is on disk or none of it is.

A partition's log is a run of *stored batches* (`zq.batch`: 48-byte header + blob) keyed by base
offset, contiguous: each batch starts where the one before ends. Beside the log the store keeps,
per partition, a small *state* record (log start, log end, bytes, first and last append time)
and a *time index*, both written in the same WriteBatch as the log, so that on restart the store
knows every partition's extent by reading one key per partition, never by scanning a log.

Invariants (per partition, after every commit):
- log keys cover exactly the batches [first batch containing log_start, log_end); they are contiguous;
- log_start <= log_end; both are batch boundaries except that log_start may fall inside the first
  batch after `delete_below` with an offset inside a batch (whole batches only are deleted);
- the time index holds one entry per retained batch, and its key order is the log's order: the
  index time of a batch is max(its append_time_ms, the previous batch's index time), so a clock
  that stepped back on a new leader cannot break the seek;
- `size_bytes` is the sum of the retained stored values' lengths; `cum_bytes_end` counts every
  byte appended since the partition began (minus truncated suffixes), so the size of any prefix of
  the log is one subtraction and retention/truncation never need to sum over batches.

A `WriteTxn` stages its partition states in memory while it is built; the store's cached states
change only after `db.write` has succeeded, so a failed write (StorageFull) leaves the cache and
the disk as they were. Reads see committed data only. One transaction at a time: a transaction
built before another one's commit is refused at commit (it would overwrite newer state).

Key layout
----------
All integers are unsigned big-endian, so byte order is numeric order and a range scan is a replay.

| family          | key                                                              | value                                     |
|-----------------|------------------------------------------------------------------|-------------------------------------------|
| log             | b"L" u32 topic_id u32 partition u64 base_offset                  | stored batch (zq.batch: header + blob)    |
| time index      | b"T" u32 topic_id u32 partition u64 index_time_ms u64 base_offset | u64 next_offset u64 cum_bytes_end         |
| partition state | b"S" u32 topic_id u32 partition                                  | u8 version=1, u64 log_start, u64 log_end, u64 size_bytes, u64 cum_bytes_end, i64 first_append_time_ms, i64 last_append_time_ms (-1 = none) |
| meta            | b"M" name                                                        | value (node state: epochs, group state, ...) |

`index_time_ms` is the batch's append_time_ms clamped to be non-decreasing (see above);
`cum_bytes_end` is the partition's cumulative stored bytes through the end of that batch.
Truncation, retention and topic deletion are `delete_range` on the WriteBatch over whole key
ranges, never a delete per key.

Errors
------
- A write that fails for lack of space (ENOSPC, quota) raises `StorageFull`; nothing of the
  transaction is applied. RocksDB then refuses every write until the DB is reopened, so the
  next `commit` reopens it first (which succeeds once space is free) and reloads the cached
  partition states from disk.
- Opening a data dir that another process holds raises `ZqError` saying so; other open failures
  raise `ZqError` (or `CorruptData` / `StorageFull`) naming the data dir.
- A stored batch that fails its checksums, or sits under the wrong key, raises `CorruptData`
  naming the partition and offset; so does every read whose RocksDB iterator stops on an error (a
  block checksum mismatch): an iterator's `valid()` turning False is checked against its
  `status()` (`Store._valid`), so damage is never read as "no more data".
- A damaged WAL record at open: see `Store._open` (the tail after it is dropped, and reported in
  `dropped_wal_tail` until the node has recorded the loss; RocksDB's own lines about it are in
  `recovery_warnings`).

Opening, the WAL-damage recovery at open and `set_aside` (a damaged store moved out of the way) are
in zq/io/store_recovery.py (`StoreOpening`, which `Store` opens through); their names are
importable from here too.

Also: `Store(path, read_only=True)` opens without taking RocksDB's lock, beside a running node
(tools/inspect_data.py); `Store.scan(prefix)` yields raw pairs for tools and tests.

Two rocksdict 0.3.29 quirks shape the read code (see `Store._iter`): an iterator does not keep
its ReadOptions alive, and `set_iterate_lower_bound` sets the upper bound.

Not thread-safe: the node's single event loop owns the store.
"""
from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import rocksdict

from zq.batch import HEADER_SIZE, BatchHeader, verify_stored
from zq.errors import CorruptData, StorageFull, ZqError
from zq.io.store_recovery import StoreOpening, _is_no_space
# Re-exported: the node, tools/inspect_data.py and the tests import these from zq.io.store.
from zq.io.store_recovery import (MARKER_BYTES_MAX, ROCKSDB_LOG_READ_BYTES_MAX, ROCKSDB_WARNINGS_MAX,  # noqa: F401
                                  WAL_TAIL_MARKER, set_aside)
from zq.limits import DEFAULT, Limits
from zq.types import TopicPartition

# Bounds of this module (candidates for zq.limits.Limits).
RETENTION_SCAN_BATCHES_MAX = 100_000   # batches one retention-by-bytes pass walks; the next pass goes on
INDEX_SEEK_STEPS_MAX = 1_000_000       # guard on the walk that finds a batch's time-index key

_U64_MAX = 2**64 - 1

_LOG = struct.Struct(">cIIQ")
_TIME = struct.Struct(">cIIQQ")
_TIME_VALUE = struct.Struct(">QQ")
_PART = struct.Struct(">cII")
_STATE_VALUE = struct.Struct(">BQQQQqq")
_STATE_VERSION = 1
_BASE_OFFSET = struct.Struct(">Q")  # at byte 8 of a stored batch (zq.batch layout)


def log_key(tp: TopicPartition, base_offset: int) -> bytes:
    return _LOG.pack(b"L", tp[0], tp[1], base_offset)


def time_key(tp: TopicPartition, index_time_ms: int, base_offset: int) -> bytes:
    return _TIME.pack(b"T", tp[0], tp[1], index_time_ms, base_offset)


def state_key(tp: TopicPartition) -> bytes:
    return _PART.pack(b"S", tp[0], tp[1])


def meta_key(name: bytes) -> bytes:
    return b"M" + name


def _prefix(family: bytes, tp: TopicPartition) -> bytes:
    return _PART.pack(family, tp[0], tp[1])


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with `prefix` (exclusive range end)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        raise ValueError("prefix of 0xff bytes has no successor")
    p[-1] += 1
    return bytes(p)


@dataclass(frozen=True, slots=True)
class PartitionState:
    """What the store knows about a partition without reading its log."""

    log_start: int                      # first offset retained
    log_end: int                        # offset the next batch will have
    size_bytes: int                     # stored bytes retained (headers + blobs)
    cum_bytes_end: int                  # bytes appended since the partition began, minus truncated suffixes
    first_append_time_ms: int | None    # index time of the oldest retained batch; None when empty
    last_append_time_ms: int | None     # index time of the newest batch; None when empty

    @property
    def empty(self) -> bool:
        return self.log_start == self.log_end


def _pack_state(st: PartitionState) -> bytes:
    first = -1 if st.first_append_time_ms is None else st.first_append_time_ms
    last = -1 if st.last_append_time_ms is None else st.last_append_time_ms
    return _STATE_VALUE.pack(_STATE_VERSION, st.log_start, st.log_end, st.size_bytes, st.cum_bytes_end, first, last)


def _unpack_state(tp: TopicPartition, value: bytes) -> PartitionState:
    if len(value) != _STATE_VALUE.size or value[0] != _STATE_VERSION:
        raise CorruptData(f"partition state of topic {tp[0]} partition {tp[1]} is malformed ({len(value)} bytes)",
                          topic_id=tp[0], partition=tp[1])
    _, start, end, size, cum, first, last = _STATE_VALUE.unpack(value)
    return PartitionState(start, end, size, cum, None if first < 0 else first, None if last < 0 else last)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One batch as the time index knows it."""

    base_offset: int
    next_offset: int
    index_time_ms: int
    cum_bytes_end: int
    size_bytes: int


class _Staged:
    """A partition's state while a transaction is built: the state it will commit, plus the
    batches appended in this transaction (not yet readable from the DB). Pending entries always
    form the top of the log: [pending[0].base_offset, state.log_end)."""

    __slots__ = ("state", "pending", "pending_bases")

    def __init__(self, state: PartitionState | None) -> None:
        self.state = state
        self.pending: list[_Entry] = []
        self.pending_bases: list[int] = []

    def drop_pending_from(self, offset: int) -> None:
        i = bisect.bisect_left(self.pending_bases, offset)
        del self.pending[i:], self.pending_bases[i:]

    def drop_pending_below(self, base_offset: int) -> None:
        # Entries below log start are never looked up again; dropping them keeps the list short.
        i = bisect.bisect_left(self.pending_bases, base_offset)
        del self.pending[:i], self.pending_bases[:i]


class WriteTxn:
    """Writes of one event-loop pass, applied atomically by `Store.commit`."""

    def __init__(self, store: Store, generation: int) -> None:
        self._store = store
        self._generation = generation
        self._wb = rocksdict.WriteBatch(raw_mode=True)
        self._staged: dict[TopicPartition, _Staged] = {}
        self._dropped: set[TopicPartition] = set()
        self._done = False

    def __len__(self) -> int:
        return self._wb.len()

    # --- staging helpers

    def _stage(self, tp: TopicPartition) -> _Staged:
        s = self._staged.get(tp)
        if s is None:
            s = _Staged(None if tp in self._dropped else self._store._states.get(tp))
            self._staged[tp] = s
        return s

    def _locate(self, tp: TopicPartition, s: _Staged, offset: int) -> _Entry:
        """The batch containing `offset` (which must lie in [log_start, log_end))."""
        if s.pending_bases and offset >= s.pending_bases[0]:
            i = bisect.bisect_right(s.pending_bases, offset) - 1
            return s.pending[i]
        return self._store._locate_committed(tp, offset)

    def _delete_all(self, tp: TopicPartition) -> None:
        for family in (b"L", b"T"):
            p = _prefix(family, tp)
            self._wb.delete_range(p, _prefix_end(p))

    # --- writes

    def append(self, tp: TopicPartition, stored: bytes, header: BatchHeader) -> None:
        """Store one batch at its base offset, right after the partition's log end."""
        self._check_open()
        if len(stored) < HEADER_SIZE or _BASE_OFFSET.unpack_from(stored, 8)[0] != header.base_offset:
            raise ValueError(f"stored batch does not carry the header's base offset {header.base_offset}")
        if header.count < 1:
            raise ValueError(f"batch at offset {header.base_offset} has {header.count} records")
        s = self._stage(tp)
        st = s.state
        if st is not None and header.base_offset != st.log_end:
            raise ValueError(f"append at offset {header.base_offset} to topic {tp[0]} partition {tp[1]}, "
                             f"whose log ends at {st.log_end}")
        last_time = None if st is None else st.last_append_time_ms
        index_time = header.append_time_ms if last_time is None else max(header.append_time_ms, last_time)
        size = len(stored)
        cum = (0 if st is None else st.cum_bytes_end) + size
        next_offset = header.base_offset + header.count
        self._wb.put(log_key(tp, header.base_offset), stored)
        self._wb.put(time_key(tp, index_time, header.base_offset), _TIME_VALUE.pack(next_offset, cum))
        entry = _Entry(header.base_offset, next_offset, index_time, cum, size)
        s.pending.append(entry)
        s.pending_bases.append(header.base_offset)
        if st is None or st.empty:
            s.state = PartitionState(header.base_offset, next_offset, size, cum, index_time, index_time)
        else:  # the constructor, not dataclasses.replace: this is the hot path and replace costs 3x more
            s.state = PartitionState(st.log_start, next_offset, st.size_bytes + size, cum, st.first_append_time_ms,
                                     index_time)

    def truncate_from(self, tp: TopicPartition, offset: int) -> None:
        """Delete every batch with base_offset >= offset (a batch boundary); log end becomes `offset`.

        An offset at or below log start empties the partition and sets log start = log end = offset."""
        self._check_open()
        s = self._stage(tp)
        st = s.state
        if st is None or offset >= st.log_end:
            if st is not None and offset > st.log_end:
                raise ValueError(f"truncate_from({offset}) past log end {st.log_end} of topic {tp[0]} partition {tp[1]}")
            return
        if offset <= st.log_start:
            self._delete_all(tp)
            s.pending.clear(), s.pending_bases.clear()
            s.state = PartitionState(offset, offset, 0, st.cum_bytes_end - st.size_bytes, None, None)
            return
        first_cut = self._locate(tp, s, offset)
        if first_cut.base_offset != offset:
            raise ValueError(f"truncate_from({offset}) is inside the batch at {first_cut.base_offset} "
                             f"of topic {tp[0]} partition {tp[1]}; truncate at a batch boundary")
        kept = self._locate(tp, s, offset - 1)
        lp, tpfx = _prefix(b"L", tp), _prefix(b"T", tp)
        self._wb.delete_range(log_key(tp, offset), _prefix_end(lp))
        self._wb.delete_range(time_key(tp, first_cut.index_time_ms, offset), _prefix_end(tpfx))
        s.drop_pending_from(offset)
        s.state = replace(st, log_end=offset, size_bytes=st.size_bytes - (st.cum_bytes_end - kept.cum_bytes_end),
                          cum_bytes_end=kept.cum_bytes_end, last_append_time_ms=kept.index_time_ms)

    def delete_below(self, tp: TopicPartition, new_log_start: int) -> None:
        """Retention (or a follower catching up to its leader's log start): delete whole batches
        whose last offset < new_log_start and set log start = new_log_start. An offset at or past
        log end empties the partition, and moves log end up to it if it is beyond."""
        self._check_open()
        s = self._stage(tp)
        st = s.state
        if st is None or new_log_start <= st.log_start:
            return
        if new_log_start >= st.log_end:
            self._delete_all(tp)
            s.pending.clear(), s.pending_bases.clear()
            cum = st.cum_bytes_end
            s.state = PartitionState(new_log_start, new_log_start, 0, cum, None, None)
            return
        keep = self._locate(tp, s, new_log_start)
        lp, tpfx = _prefix(b"L", tp), _prefix(b"T", tp)
        self._wb.delete_range(lp, log_key(tp, keep.base_offset))
        self._wb.delete_range(tpfx, time_key(tp, keep.index_time_ms, keep.base_offset))
        s.drop_pending_below(keep.base_offset)
        cum_before_keep = keep.cum_bytes_end - keep.size_bytes
        s.state = replace(st, log_start=new_log_start, size_bytes=st.cum_bytes_end - cum_before_keep,
                          first_append_time_ms=keep.index_time_ms)

    def reset(self, tp: TopicPartition, offset: int) -> None:
        """Empty the partition and make its log start and end `offset`: a replica whose log ends
        below its leader's log start (retention deleted the rest) starts again there."""
        self._check_open()
        s = self._stage(tp)
        st = s.state
        self._delete_all(tp)
        s.pending.clear(), s.pending_bases.clear()
        cum = st.cum_bytes_end - st.size_bytes if st is not None else 0
        s.state = PartitionState(offset, offset, 0, cum, None, None)

    def drop_partition(self, tp: TopicPartition) -> None:
        """Delete all data and state of a partition (its topic was deleted)."""
        self._check_open()
        self._delete_all(tp)
        self._wb.delete(state_key(tp))
        self._staged.pop(tp, None)
        self._dropped.add(tp)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self._check_open()
        self._wb.put(meta_key(name), value)

    def delete_meta(self, name: bytes) -> None:
        self._check_open()
        self._wb.delete(meta_key(name))

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("this write transaction was committed already; begin a new one")

    def _finish(self) -> tuple[rocksdict.WriteBatch, dict[TopicPartition, PartitionState | None]]:
        """Put the staged states into the batch; return it and the states to cache on success."""
        self._done = True
        states: dict[TopicPartition, PartitionState | None] = {tp: None for tp in self._dropped}
        for tp, s in self._staged.items():
            if s.state is not None:
                self._wb.put(state_key(tp), _pack_state(s.state))
            states[tp] = s.state
        return self._wb, states


class Store(StoreOpening):
    """A node's RocksDB: partition logs, their state and time index, and node metadata."""

    def __init__(self, path: str | os.PathLike, *, limits: Limits = DEFAULT, read_only: bool = False) -> None:
        self.path = Path(path)
        self.limits = limits
        self.read_only = read_only
        self._generation = 0
        self._needs_reopen = False
        self._write_sync = rocksdict.WriteOptions()
        self._write_sync.sync = True             # fsync the WAL before the write returns: the `fsync` durability
        self._write_sync.disable_wal = False     # every write goes through the WAL: a crash loses no acked write
        self._write_async = rocksdict.WriteOptions()
        self._write_async.sync = False           # WAL written, not fsynced: the `replicated` durability
        self._write_async.disable_wal = False
        self.dropped_wal_tail: str | None = None   # RocksDB's error, while the node has not recorded the loss
        self.wal_damage: str | None = None         # read-only: the WAL holds a damaged record (a node would drop the rest)
        self.recovery_warnings: list[str] = []     # RocksDB's LOG lines about corruption from the last open
        self._db = self._open()
        self._states = self._load_states()

    # --- opening (RocksDB's open and its recovery: StoreOpening, zq/io/store_recovery.py)

    def _load_states(self) -> dict[TopicPartition, PartitionState]:
        states = {}
        p = b"S"
        it, _keep = self._iter(_prefix_end(p))
        it.seek(p)
        while self._valid(it, None, None, what="partition states"):
            key = it.key()
            if len(key) != _PART.size:
                raise CorruptData(f"data dir {self.path} holds a malformed partition-state key {key.hex()}")
            _, topic_id, partition = _PART.unpack(key)
            tp = TopicPartition(topic_id, partition)
            states[tp] = _unpack_state(tp, it.value())
            it.next()
        return states

    def close(self) -> None:
        if self._db is None:
            return
        db, self._db = self._db, None
        try:
            db.close()
        except Exception:  # after a failed write RocksDB reports the old error again; the DB is closed anyway
            pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _iter(self, upper_bound: bytes) -> tuple[rocksdict.RdictIter, rocksdict.ReadOptions]:
        """An iterator that stops before `upper_bound`, and the ReadOptions that the caller must keep
        referenced while it uses the iterator: rocksdict 0.3.29's iterator does not keep its
        ReadOptions alive, and once they are freed the bound is garbage. There is no lower bound:
        that version's ReadOptions.set_iterate_lower_bound sets the *upper* bound, so callers that
        step backwards (seek_for_prev) check the key's prefix themselves."""
        ro = rocksdict.ReadOptions()
        ro.set_verify_checksums(True)  # every block read is checked (RocksDB's default, spelled out: we rely on it)
        ro.set_iterate_upper_bound(upper_bound)  # forward scans end at the partition's last key, not the next one's
        return self._live().iter(ro), ro

    def _live(self) -> rocksdict.Rdict:
        if self._db is None:
            if self._needs_reopen:
                raise ZqError(f"the data dir {self.path} could not be reopened after a failed write; "
                              "the next commit tries again")
            raise ZqError(f"the store at {self.path} is closed")
        return self._db

    def _valid(self, it: rocksdict.RdictIter, tp: TopicPartition | None, offset: int | None, *,
               what: str = "") -> bool:
        """`it.valid()`, except that an iterator that stopped on an error (a block checksum
        mismatch, an unreadable file) raises CorruptData instead of looking like the end of the
        data: RocksDB reports a failed read only through the iterator's status."""
        if it.valid():
            return True
        try:
            it.status()
        except Exception as e:  # rocksdict raises plain Exception carrying RocksDB's status text
            where = what or (f"topic {tp[0]} partition {tp[1]}" + ("" if offset is None else f" near offset {offset}")
                             if tp is not None else "the store")
            raise self._read_error(e, where, tp, offset) from e
        return False

    def _read_error(self, e: Exception, where: str, tp: TopicPartition | None = None,
                    offset: int | None = None) -> ZqError:
        text = str(e)
        fields: dict = {"path": str(self.path)}
        if tp is not None:
            fields.update(topic_id=tp[0], partition=tp[1])
        if offset is not None:
            fields["offset"] = offset
        if text.startswith("Corruption") or "checksum" in text.lower():
            return CorruptData(f"reading {where} in data dir {self.path} met corruption ({text}); restart the "
                               "node: it sets the damaged store aside and copies its partitions from the other "
                               "replicas", **fields)
        return ZqError(f"reading {where} in data dir {self.path} failed: {text}", **fields)

    # --- writes

    def begin(self) -> WriteTxn:
        if self.read_only:
            raise ZqError(f"the store at {self.path} is open read-only")
        self._live()
        return WriteTxn(self, self._generation)

    def commit(self, txn: WriteTxn, *, sync: bool) -> None:
        """Apply the transaction atomically: one db.write, fsynced when `sync`. Raises StorageFull
        (nothing applied) when the disk is full."""
        if txn._store is not self or txn._generation != self._generation:
            raise RuntimeError("this write transaction was begun before another commit; begin a new one")
        if self._needs_reopen:
            self._reopen()
        wb, states = txn._finish()
        try:
            self._live().write(wb, self._write_sync if sync else self._write_async)
        except Exception as e:
            raise self._write_error(e) from e
        self._generation += 1
        for tp, st in states.items():
            if st is None:
                self._states.pop(tp, None)
            else:
                self._states[tp] = st

    def sync(self) -> None:
        """Make every write committed so far durable (an fsync of the WAL), as a commit with
        `sync=True` would have: a write, then this, costs what one synced write does."""
        try:
            self._live().flush_wal(True)
        except Exception as e:
            raise self._write_error(e) from e

    def _write_error(self, e: Exception) -> ZqError:
        text = str(e)
        # RocksDB keeps a failed WAL writer in error until the DB is reopened: whatever the cause,
        # the next commit reopens it.
        self._needs_reopen = True
        self._generation += 1  # transactions begun before the failure were staged on stale state
        if _is_no_space(text):
            return StorageFull(f"the disk of data dir {self.path} is full ({text}); free space or add nodes; "
                               "nothing was written", path=str(self.path))
        return ZqError(f"write to data dir {self.path} failed: {text}", path=str(self.path))

    def _reopen(self) -> None:
        """Reopen read-write after a failed write. If that fails too (RocksDB needs space to flush
        its WAL), reopen read-only so that reads go on being served, and raise StorageFull: the
        next commit tries again."""
        self.close()
        try:
            # Not strict: the write that failed may have left a torn last record, which was never
            # acknowledged (the caller got StorageFull); dropping it loses nothing.
            self._db = self._open(strict=False)
        except ZqError as e:
            self._db = rocksdict.Rdict(str(self.path), self._options(), access_type=rocksdict.AccessType.read_only())
            self._states = self._load_states()
            raise StorageFull(f"data dir {self.path} cannot take writes yet ({e.message}); it serves reads "
                              "until space is freed; nothing was written", path=str(self.path)) from None
        self._states = self._load_states()
        self._needs_reopen = False

    # --- reads

    def read(self, tp: TopicPartition, offset: int, max_bytes: int, *, upto: int | None = None) -> list[bytes]:
        """Stored batches from the one containing `offset` on, at most `max_bytes` in all but always at
        least one if there is any, none whose base offset is >= `upto`. Each is verified.

        `max_bytes` is capped at limits.fetch_bytes_max. An offset below the first retained batch
        reads from that batch on: whether that is OffsetOutOfRange is the caller's decision."""
        if upto is not None and offset >= upto:
            return []
        max_bytes = min(max_bytes, self.limits.fetch_bytes_max)
        lp = _prefix(b"L", tp)
        it, _keep = self._iter(_prefix_end(lp) if upto is None else log_key(tp, upto))
        it.seek_for_prev(log_key(tp, offset))
        if not (self._valid(it, tp, offset) and it.key().startswith(lp)):  # below the first batch: start at the first one
            it.seek(lp)
        out: list[bytes] = []
        total = 0
        first = True
        while self._valid(it, tp, offset):
            value = it.value()
            header = self._verify(tp, it.key(), value)
            if first and header.next_offset <= offset:   # the batch before `offset` ends before it
                first = False
                it.next()
                continue
            first = False
            if out and total + len(value) > max_bytes:
                break
            out.append(value)
            total += len(value)
            if total >= max_bytes:
                break
            it.next()
        return out

    def _verify(self, tp: TopicPartition, key: bytes, value: bytes) -> BatchHeader:
        key_offset = _LOG.unpack(key)[3]
        try:
            header = verify_stored(value)
        except CorruptData as e:
            raise CorruptData(f"stored batch at offset {key_offset} of topic {tp[0]} partition {tp[1]} in "
                              f"{self.path} is corrupt: {e.message}", topic_id=tp[0], partition=tp[1],
                              offset=key_offset) from e
        if header.base_offset != key_offset:
            raise CorruptData(f"stored batch under offset {key_offset} of topic {tp[0]} partition {tp[1]} in "
                              f"{self.path} says it starts at {header.base_offset}", topic_id=tp[0],
                              partition=tp[1], offset=key_offset)
        return header

    def _locate_committed(self, tp: TopicPartition, offset: int) -> _Entry:
        """The committed batch containing `offset`, as the time index knows it: one log seek, one
        index seek (plus a short walk only where append times stood still or stepped back)."""
        lp = _prefix(b"L", tp)
        it, _keep = self._iter(_prefix_end(lp))
        it.seek_for_prev(log_key(tp, offset))
        if not (self._valid(it, tp, offset) and it.key().startswith(lp)):
            raise CorruptData(f"topic {tp[0]} partition {tp[1]} has no batch holding offset {offset} in {self.path}",
                              topic_id=tp[0], partition=tp[1], offset=offset)
        value = it.value()
        header = self._verify(tp, it.key(), value)
        if header.next_offset <= offset:
            raise CorruptData(f"topic {tp[0]} partition {tp[1]} has a gap at offset {offset} in {self.path}",
                              topic_id=tp[0], partition=tp[1], offset=offset)
        ti, _keep = self._iter(_prefix_end(_prefix(b"T", tp)))
        ti.seek(time_key(tp, header.append_time_ms, header.base_offset))
        for _ in range(INDEX_SEEK_STEPS_MAX):
            if not self._valid(ti, tp, offset):
                break
            _, _, _, index_time, base = _TIME.unpack(ti.key())
            if base == header.base_offset:
                next_offset, cum = _TIME_VALUE.unpack(ti.value())
                return _Entry(base, next_offset, index_time, cum, len(value))
            if base > header.base_offset:
                break
            ti.next()
        raise CorruptData(f"time index of topic {tp[0]} partition {tp[1]} lacks the batch at {header.base_offset} "
                          f"in {self.path}", topic_id=tp[0], partition=tp[1], offset=header.base_offset)

    def partition_state(self, tp: TopicPartition) -> PartitionState | None:
        return self._states.get(tp)

    def partitions(self) -> dict[TopicPartition, PartitionState]:
        return {tp: self._states[tp] for tp in sorted(self._states)}

    def offset_for_time(self, tp: TopicPartition, time_ms: int) -> int | None:
        """The first offset whose batch was appended at or after `time_ms`; None when every batch is older."""
        st = self._states.get(tp)
        if st is None or st.empty:
            return None
        it, _keep = self._iter(_prefix_end(_prefix(b"T", tp)))
        it.seek(time_key(tp, max(time_ms, 0), 0))
        if not self._valid(it, tp, None):
            return None
        return max(_TIME.unpack(it.key())[4], st.log_start)

    def retention_candidates(self, tp: TopicPartition, *, now_ms: int, retention_ms: int | None,
                             retention_bytes: int | None) -> int | None:
        """The new log start that retention allows (a batch boundary <= log end), or None."""
        st = self._states.get(tp)
        if st is None or st.empty:
            return None
        candidate = st.log_start
        if retention_ms is not None and now_ms - retention_ms > 0:
            candidate = max(candidate, self._time_retention(tp, now_ms - retention_ms))
        if retention_bytes is not None and st.size_bytes > retention_bytes:
            candidate = max(candidate, self._bytes_retention(tp, st, st.size_bytes - retention_bytes))
        candidate = min(candidate, st.log_end)
        return candidate if candidate > st.log_start else None

    def _time_retention(self, tp: TopicPartition, cutoff_ms: int) -> int:
        """End of the last batch appended before cutoff_ms (0 when none): one seek."""
        tpfx = _prefix(b"T", tp)
        it, _keep = self._iter(_prefix_end(tpfx))
        it.seek_for_prev(time_key(tp, cutoff_ms - 1, _U64_MAX))
        return _TIME_VALUE.unpack(it.value())[0] if self._valid(it, tp, None) and it.key().startswith(tpfx) else 0

    def _bytes_retention(self, tp: TopicPartition, st: PartitionState, excess_bytes: int) -> int:
        """End of the shortest prefix of whole batches holding at least excess_bytes, walking at most
        RETENTION_SCAN_BATCHES_MAX batches (the next pass continues)."""
        cum_before_first = st.cum_bytes_end - st.size_bytes
        tpfx = _prefix(b"T", tp)
        it, _keep = self._iter(_prefix_end(tpfx))
        it.seek(tpfx)
        candidate = 0
        for _ in range(RETENTION_SCAN_BATCHES_MAX):
            if not self._valid(it, tp, None):
                break
            candidate, cum = _TIME_VALUE.unpack(it.value())
            if cum - cum_before_first >= excess_bytes:
                break
            it.next()
        return candidate

    def get_meta(self, name: bytes) -> bytes | None:
        try:
            return self._live().get(meta_key(name))
        except Exception as e:  # rocksdict raises plain Exception carrying RocksDB's status text
            raise self._read_error(e, f"meta key {name!r}") from e

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Raw (key, value) pairs whose key starts with `prefix`, in key order: for offline tools
        (tools/inspect_data.py) and tests, never the node's loop. Values are not verified. Finish
        with the generator before closing the store."""
        it, _keep = self._iter(_prefix_end(prefix) if prefix.strip(b"\xff") else b"\xff" * 64)
        it.seek(prefix)
        while self._valid(it, None, None, what=f"keys under prefix {prefix!r}"):
            yield it.key(), it.value()
            it.next()

    def disk_free_bytes(self) -> int:
        s = os.statvfs(self.path)
        return s.f_bavail * s.f_frsize
