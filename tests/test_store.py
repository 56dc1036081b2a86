"""The RocksDB store shell: key order, reads, checksums, restart, truncation, retention, meta, locking."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import rocksdict
from hypothesis import given, settings
from hypothesis import strategies as st

from zq.batch import CODEC_NONE, crc, encode_records, iter_records, make_stored, unpack_header, verify_stored
from zq.errors import CorruptData, StorageFull, ZqError
from zq.io.store import PartitionState, Store, log_key, meta_key, state_key, time_key
from zq.types import TopicPartition

TP = TopicPartition(7, 3)
OTHER = TopicPartition(7, 4)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def batch(base: int, count: int = 3, time_ms: int = 1_000, size: int = 10) -> bytes:
    records = [[time_ms, b"k%08d" % (base + i), bytes([i % 256]) * size, None] for i in range(count)]
    blob = encode_records(records)
    return make_stored(CODEC_NONE, base, count, 1, time_ms, 0, 0, crc(blob), blob)


def append(store: Store, tp: TopicPartition, specs: list[tuple[int, int, int]], *, sync: bool = False) -> list[bytes]:
    """Append batches given as (base, count, time_ms) in one transaction; return the stored values."""
    txn = store.begin()
    out = []
    for base, count, time_ms in specs:
        stored = batch(base, count, time_ms)
        txn.append(tp, stored, unpack_header(stored))
        out.append(stored)
    store.commit(txn, sync=sync)
    return out


def bases(values: list[bytes]) -> list[int]:
    return [verify_stored(v).base_offset for v in values]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db")
    yield s
    s.close()


# --- keys


@settings(max_examples=300, deadline=None)
@given(a=st.tuples(u32, u32, u64), b=st.tuples(u32, u32, u64))
def test_log_keys_sort_like_their_numbers(a, b):
    ka, kb = log_key(TopicPartition(a[0], a[1]), a[2]), log_key(TopicPartition(b[0], b[1]), b[2])
    assert (ka < kb) == (a < b)
    assert (ka == kb) == (a == b)


@settings(max_examples=300, deadline=None)
@given(a=st.tuples(u32, u32, u64, u64), b=st.tuples(u32, u32, u64, u64))
def test_time_keys_sort_like_their_numbers(a, b):
    ka = time_key(TopicPartition(a[0], a[1]), a[2], a[3])
    kb = time_key(TopicPartition(b[0], b[1]), b[2], b[3])
    assert (ka < kb) == (a < b)


def test_key_families_do_not_overlap():
    keys = [log_key(TP, 5), time_key(TP, 5, 5), state_key(TP), meta_key(b"epoch")]
    assert len({k[:1] for k in keys}) == 4


# --- append and read


def test_read_from_base_inside_a_batch_and_past_the_end(store):
    stored = append(store, TP, [(0, 3, 10), (3, 2, 11), (5, 4, 12)])
    assert store.read(TP, 0, 1 << 20) == stored
    assert store.read(TP, 3, 1 << 20) == stored[1:]
    # From inside a batch: the batch that contains the offset comes first.
    assert store.read(TP, 4, 1 << 20) == stored[1:]
    assert store.read(TP, 8, 1 << 20) == stored[2:]
    assert store.read(TP, 9, 1 << 20) == []
    assert store.read(TP, 1000, 1 << 20) == []
    assert store.read(OTHER, 0, 1 << 20) == []
    # Records decode back, starting at the asked offset.
    assert [r.offset for r in iter_records(store.read(TP, 4, 1)[0], 4)] == [4]


def test_read_does_not_leak_into_neighbouring_partitions(store):
    append(store, TP, [(0, 2, 1)])
    append(store, OTHER, [(0, 2, 1), (2, 2, 1)])
    append(store, TopicPartition(7, 2), [(0, 2, 1)])
    assert bases(store.read(TP, 0, 1 << 20)) == [0]
    assert bases(store.read(TP, 5, 1 << 20)) == []
    assert bases(store.read(OTHER, 1, 1 << 20)) == [0, 2]


def test_max_bytes_bounds_the_read_but_gives_at_least_one_batch(store):
    stored = append(store, TP, [(i * 3, 3, 10) for i in range(10)])
    size = len(stored[0])
    assert all(len(v) == size for v in stored)
    assert len(store.read(TP, 0, 1)) == 1
    assert len(store.read(TP, 0, size)) == 1
    assert len(store.read(TP, 0, 2 * size + 1)) == 2
    assert len(store.read(TP, 0, 3 * size)) == 3
    assert bases(store.read(TP, 7, 2 * size)) == [6, 9]


def test_upto_stops_before_the_high_watermark(store):
    append(store, TP, [(0, 3, 10), (3, 2, 11), (5, 4, 12)])
    assert bases(store.read(TP, 0, 1 << 20, upto=5)) == [0, 3]
    assert bases(store.read(TP, 0, 1 << 20, upto=4)) == [0, 3]
    assert bases(store.read(TP, 0, 1 << 20, upto=3)) == [0]
    assert bases(store.read(TP, 0, 1 << 20, upto=0)) == []
    assert bases(store.read(TP, 5, 1 << 20, upto=5)) == []


def test_append_must_follow_the_log_end(store):
    append(store, TP, [(10, 3, 1)])
    assert store.partition_state(TP).log_start == 10
    txn = store.begin()
    stored = batch(14)
    with pytest.raises(ValueError, match="log ends at 13"):
        txn.append(TP, stored, unpack_header(stored))
    with pytest.raises(ValueError, match="base offset"):
        txn.append(TP, batch(14), unpack_header(batch(13)))


def test_partition_state_tracks_appends(store):
    stored = append(store, TP, [(0, 3, 10), (3, 2, 20)])
    assert store.partition_state(TP) == PartitionState(0, 5, sum(map(len, stored)), sum(map(len, stored)), 10, 20)
    assert store.partitions() == {TP: store.partition_state(TP)}
    assert store.partition_state(OTHER) is None


def test_a_transaction_is_applied_only_when_committed(store):
    txn = store.begin()
    stored = batch(0)
    txn.append(TP, stored, unpack_header(stored))
    txn.put_meta(b"epoch", b"1")
    assert store.read(TP, 0, 1 << 20) == [] and store.partition_state(TP) is None and store.get_meta(b"epoch") is None
    store.commit(txn, sync=True)
    assert store.read(TP, 0, 1 << 20) == [stored] and store.get_meta(b"epoch") == b"1"
    with pytest.raises(RuntimeError):
        txn.put_meta(b"epoch", b"2")


def test_a_stale_transaction_is_refused(store):
    old = store.begin()
    append(store, TP, [(0, 1, 1)])
    stored = batch(1)
    old.append(TP, stored, unpack_header(stored))  # staged on the state from before the commit
    with pytest.raises(RuntimeError, match="begun before another commit"):
        store.commit(old, sync=False)
    assert store.partition_state(TP).log_end == 1


# --- checksums


@pytest.mark.parametrize("where", ["blob", "header", "wrong_key"])
def test_corruption_is_detected_on_read(tmp_path, where):
    path = tmp_path / "db"
    with Store(path) as s:
        stored = append(s, TP, [(0, 3, 10), (3, 3, 11)])
    bad = bytearray(stored[1])
    if where == "blob":
        bad[-1] ^= 0x01
    elif where == "header":
        bad[20] ^= 0x01
    else:
        bad = bytearray(stored[0])  # a valid batch under the wrong key
    raw = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True))
    raw.put(log_key(TP, 3), bytes(bad))
    raw.close()
    with Store(path) as s:
        assert bases(s.read(TP, 0, len(stored[0]))) == [0]  # the good batch alone still reads
        with pytest.raises(CorruptData) as info:
            s.read(TP, 0, 1 << 20)
        assert "offset 3" in str(info.value) and "topic 7 partition 3" in str(info.value)
        assert info.value.offset == 3 and info.value.partition == 3


# --- restart


def test_restart_keeps_state_and_time_index_without_scanning_the_log(tmp_path):
    path = tmp_path / "db"
    with Store(path) as s:
        append(s, TP, [(0, 3, 100), (3, 3, 200), (6, 3, 300)], sync=True)
        append(s, OTHER, [(50, 1, 5)], sync=True)
        txn = s.begin()
        txn.delete_below(TP, 3)
        txn.put_meta(b"epoch", b"\x07")
        s.commit(txn, sync=True)
        before = s.partitions()
    # Remove every log key behind the store's back: a store that scanned the log on open would
    # now see empty partitions.
    raw = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True))
    wb = rocksdict.WriteBatch(raw_mode=True)
    wb.delete_range(b"L", b"M")
    raw.write(wb)
    raw.close()
    with Store(path) as s:
        assert s.partitions() == before
        assert s.partition_state(TP) == PartitionState(3, 9, before[TP].size_bytes, before[TP].cum_bytes_end, 200, 300)
        assert s.offset_for_time(TP, 250) == 6
        assert s.get_meta(b"epoch") == b"\x07"


def test_restart_then_append_and_read(tmp_path):
    path = tmp_path / "db"
    with Store(path) as s:
        first = append(s, TP, [(0, 3, 100)], sync=True)
    with Store(path) as s:
        second = append(s, TP, [(3, 2, 150)], sync=True)
        assert s.read(TP, 0, 1 << 20) == first + second
        assert s.partition_state(TP).log_end == 5


# --- truncation


def test_truncate_from_a_batch_boundary(store):
    stored = append(store, TP, [(0, 3, 10), (3, 2, 20), (5, 4, 30)])
    txn = store.begin()
    txn.truncate_from(TP, 3)
    store.commit(txn, sync=True)
    st = store.partition_state(TP)
    assert (st.log_start, st.log_end, st.size_bytes, st.last_append_time_ms) == (0, 3, len(stored[0]), 10)
    assert store.read(TP, 0, 1 << 20) == stored[:1]
    assert store.read(TP, 3, 1 << 20) == []
    assert store.offset_for_time(TP, 11) is None
    # The log goes on from the new end, with a different batch (a new leader's).
    again = append(store, TP, [(3, 5, 40)])
    assert store.read(TP, 0, 1 << 20) == stored[:1] + again
    assert store.offset_for_time(TP, 11) == 3
    assert store.partition_state(TP).size_bytes == len(stored[0]) + len(again[0])


def test_truncate_from_refuses_an_offset_inside_a_batch(store):
    append(store, TP, [(0, 3, 10), (3, 2, 20)])
    txn = store.begin()
    with pytest.raises(ValueError, match="batch boundary"):
        txn.truncate_from(TP, 4)


def test_truncate_everything_and_beyond_log_end(store):
    append(store, TP, [(0, 3, 10), (3, 2, 20)])
    txn = store.begin()
    txn.truncate_from(TP, 5)  # at log end: nothing to do
    store.commit(txn, sync=False)
    assert store.partition_state(TP).log_end == 5
    txn = store.begin()
    txn.truncate_from(TP, 0)
    store.commit(txn, sync=False)
    st = store.partition_state(TP)
    assert (st.log_start, st.log_end, st.size_bytes, st.first_append_time_ms) == (0, 0, 0, None)
    assert store.read(TP, 0, 1 << 20) == []
    assert store.offset_for_time(TP, 0) is None


@pytest.mark.parametrize("held", [[], [(0, 3, 10), (3, 2, 20)]])
def test_reset_starts_a_partition_again_empty_at_an_offset(store, tmp_path, held):
    """A replica behind its leader's log start (StartAt): whatever it held goes, the log starts
    and ends at the offset, and the next batch appends there; the state survives a reopen."""
    if held:
        append(store, TP, held)
    txn = store.begin()
    txn.reset(TP, 40)
    store.commit(txn, sync=True)
    st = store.partition_state(TP)
    assert (st.log_start, st.log_end, st.size_bytes) == (40, 40, 0)
    assert store.read(TP, 0, 1 << 20) == [] and store.offset_for_time(TP, 0) is None
    again = append(store, TP, [(40, 2, 50)])
    assert store.read(TP, 0, 1 << 20) == again
    path = store.path
    store.close()
    with Store(path) as reopened:
        st = reopened.partition_state(TP)
        assert (st.log_start, st.log_end) == (40, 42) and reopened.read(TP, 40, 1 << 20) == again


def test_append_then_truncate_in_one_transaction(store):
    stored = append(store, TP, [(0, 3, 10)])
    txn = store.begin()
    for base in (3, 5, 7):
        b = batch(base, 2, 20 + base)
        txn.append(TP, b, unpack_header(b))
    txn.truncate_from(TP, 5)
    b = batch(5, 1, 99)
    txn.append(TP, b, unpack_header(b))
    store.commit(txn, sync=True)
    assert bases(store.read(TP, 0, 1 << 20)) == [0, 3, 5]
    assert store.read(TP, 5, 1 << 20) == [b]
    st = store.partition_state(TP)
    assert st.log_end == 6
    assert st.size_bytes == sum(len(v) for v in store.read(TP, 0, 1 << 20))
    assert store.offset_for_time(TP, 30) == 5 and store.offset_for_time(TP, 23) == 3
    assert st.size_bytes == len(stored[0]) + len(batch(3, 2, 23)) + len(b)


def test_append_truncate_append_then_retention_in_one_transaction(store):
    """A new leader's suffix replaces an old one and retention follows, all in one loop pass."""
    txn = store.begin()
    for base, count, time_ms in [(0, 3, 10), (3, 3, 20), (6, 3, 30)]:
        b = batch(base, count, time_ms)
        txn.append(TP, b, unpack_header(b))
    txn.truncate_from(TP, 3)
    replacement = batch(3, 5, 40)
    txn.append(TP, replacement, unpack_header(replacement))
    txn.delete_below(TP, 5)  # inside the replacement batch, not the truncated one
    store.commit(txn, sync=True)
    st = store.partition_state(TP)
    assert (st.log_start, st.log_end, st.size_bytes, st.first_append_time_ms) == (5, 8, len(replacement), 40)
    assert store.read(TP, 0, 1 << 20) == [replacement]


# --- retention


def test_retention_by_time(store):
    append(store, TP, [(0, 3, 1_000), (3, 3, 2_000), (6, 3, 3_000)])
    args = dict(retention_bytes=None)
    assert store.retention_candidates(TP, now_ms=1_500, retention_ms=1_000, **args) is None
    assert store.retention_candidates(TP, now_ms=2_001, retention_ms=1_000, **args) == 3
    assert store.retention_candidates(TP, now_ms=3_000, retention_ms=1_000, **args) == 3
    assert store.retention_candidates(TP, now_ms=3_001, retention_ms=1_000, **args) == 6
    assert store.retention_candidates(TP, now_ms=10_000, retention_ms=1_000, **args) == 9  # all, never past log end
    assert store.retention_candidates(TP, now_ms=10_000, retention_ms=None, **args) is None
    assert store.retention_candidates(OTHER, now_ms=10_000, retention_ms=1, **args) is None
    txn = store.begin()
    txn.delete_below(TP, 6)
    store.commit(txn, sync=True)
    st = store.partition_state(TP)
    assert (st.log_start, st.log_end, st.first_append_time_ms) == (6, 9, 3_000)
    assert st.size_bytes == len(store.read(TP, 6, 1 << 20)[0])
    assert bases(store.read(TP, 0, 1 << 20)) == [6]  # below log start: the first retained batch
    assert store.retention_candidates(TP, now_ms=3_001, retention_ms=1_000, **args) is None
    assert store.offset_for_time(TP, 0) == 6


def test_retention_by_bytes(store):
    stored = append(store, TP, [(i * 2, 2, 100 + i) for i in range(10)])
    size = len(stored[0])
    args = dict(now_ms=10_000, retention_ms=None)
    assert store.retention_candidates(TP, retention_bytes=10 * size, **args) is None
    assert store.retention_candidates(TP, retention_bytes=10 * size - 1, **args) == 2
    assert store.retention_candidates(TP, retention_bytes=7 * size, **args) == 6
    assert store.retention_candidates(TP, retention_bytes=0, **args) == 20
    # Time and bytes together: the one that deletes more wins.
    assert store.retention_candidates(TP, now_ms=1_103, retention_ms=1_000, retention_bytes=7 * size) == 6
    assert store.retention_candidates(TP, now_ms=1_105, retention_ms=1_000, retention_bytes=7 * size) == 10
    txn = store.begin()
    txn.delete_below(TP, 6)
    store.commit(txn, sync=True)
    assert store.partition_state(TP).size_bytes == 7 * size
    assert store.retention_candidates(TP, retention_bytes=7 * size, **args) is None
    assert store.retention_candidates(TP, retention_bytes=5 * size, **args) == 10


def test_delete_below_inside_a_batch_keeps_the_batch(store):
    stored = append(store, TP, [(0, 3, 10), (3, 3, 20)])
    txn = store.begin()
    txn.delete_below(TP, 4)
    store.commit(txn, sync=True)
    st = store.partition_state(TP)
    assert (st.log_start, st.log_end, st.size_bytes) == (4, 6, len(stored[1]))
    assert store.read(TP, 4, 1 << 20) == stored[1:]
    assert store.offset_for_time(TP, 0) == 4


def test_delete_below_past_log_end_moves_the_log_forward(store):
    append(store, TP, [(0, 3, 10)])
    txn = store.begin()
    txn.delete_below(TP, 100)  # a follower whose leader's log now starts at 100
    store.commit(txn, sync=True)
    st = store.partition_state(TP)
    assert (st.log_start, st.log_end, st.size_bytes) == (100, 100, 0)
    assert store.read(TP, 0, 1 << 20) == []
    append(store, TP, [(100, 2, 50)])
    assert bases(store.read(TP, 0, 1 << 20)) == [100]


def test_append_then_delete_below_in_one_transaction(store):
    append(store, TP, [(0, 2, 10)])
    txn = store.begin()
    for base in (2, 4):
        b = batch(base, 2, 20)
        txn.append(TP, b, unpack_header(b))
    txn.delete_below(TP, 4)
    store.commit(txn, sync=True)
    assert bases(store.read(TP, 0, 1 << 20)) == [4]
    assert store.partition_state(TP).size_bytes == len(batch(4, 2, 20))


# --- time index


def test_offset_for_time(store):
    append(store, TP, [(0, 3, 1_000), (3, 3, 2_000), (6, 3, 2_000), (9, 1, 5_000)])
    assert store.offset_for_time(TP, 0) == 0
    assert store.offset_for_time(TP, 1_000) == 0
    assert store.offset_for_time(TP, 1_001) == 3
    assert store.offset_for_time(TP, 2_000) == 3
    assert store.offset_for_time(TP, 4_999) == 9
    assert store.offset_for_time(TP, 5_001) is None
    assert store.offset_for_time(OTHER, 0) is None


def test_a_clock_that_steps_back_keeps_the_index_ordered(store):
    append(store, TP, [(0, 3, 5_000), (3, 3, 4_000), (6, 3, 6_000)])
    assert store.offset_for_time(TP, 4_500) == 0
    assert store.offset_for_time(TP, 5_001) == 6
    assert store.partition_state(TP).last_append_time_ms == 6_000
    txn = store.begin()
    txn.truncate_from(TP, 6)  # finds the clamped index entry of batch 3
    store.commit(txn, sync=True)
    assert store.offset_for_time(TP, 5_001) is None
    txn = store.begin()
    txn.delete_below(TP, 3)
    store.commit(txn, sync=True)
    assert store.offset_for_time(TP, 0) == 3
    assert store.partition_state(TP).first_append_time_ms == 5_000


# --- drop, meta


def test_drop_partition(store):
    append(store, TP, [(0, 3, 10), (3, 3, 20)])
    kept = append(store, OTHER, [(0, 3, 10)])
    txn = store.begin()
    txn.drop_partition(TP)
    store.commit(txn, sync=True)
    assert store.partition_state(TP) is None and TP not in store.partitions()
    assert store.read(TP, 0, 1 << 20) == [] and store.offset_for_time(TP, 0) is None
    assert store.read(OTHER, 0, 1 << 20) == kept
    # The partition can start again from nothing.
    append(store, TP, [(0, 1, 30)])
    assert store.partition_state(TP).log_end == 1 and store.offset_for_time(TP, 0) == 0


def test_drop_then_recreate_in_one_transaction_survives_restart(tmp_path):
    path = tmp_path / "db"
    with Store(path) as s:
        append(s, TP, [(0, 3, 10)])
        txn = s.begin()
        txn.drop_partition(TP)
        b = batch(0, 1, 30)
        txn.append(TP, b, unpack_header(b))
        s.commit(txn, sync=True)
    with Store(path) as s:
        assert s.read(TP, 0, 1 << 20) == [b]
        assert s.partition_state(TP).log_end == 1


def test_meta_put_get_delete(store):
    txn = store.begin()
    txn.put_meta(b"epoch/7/3", b"\x00\x05")
    txn.put_meta(b"node", b"n1")
    store.commit(txn, sync=True)
    assert store.get_meta(b"epoch/7/3") == b"\x00\x05" and store.get_meta(b"node") == b"n1"
    assert store.get_meta(b"missing") is None
    txn = store.begin()
    txn.delete_meta(b"node")
    store.commit(txn, sync=False)
    assert store.get_meta(b"node") is None and store.get_meta(b"epoch/7/3") == b"\x00\x05"


def test_disk_free_bytes(store):
    assert store.disk_free_bytes() > 0


# --- errors


def test_two_stores_cannot_open_one_dir(tmp_path):
    path = tmp_path / "db"
    with Store(path):
        with pytest.raises(ZqError, match="in use by another zq node") as info:
            Store(path)
        assert "--data-dir" in str(info.value) and str(path) in str(info.value)
        code = textwrap.dedent(f"""
            from zq.io.store import Store
            from zq.errors import ZqError
            try:
                Store({str(path)!r})
            except ZqError as e:
                print(e)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "in use by another zq node (RocksDB lock)" in out.stdout, out.stderr
    with Store(path) as s:  # free again once closed
        assert s.partitions() == {}


def test_read_only_store_reads_while_a_node_holds_the_dir(tmp_path):
    path = tmp_path / "db"
    with Store(path) as s:
        stored = append(s, TP, [(0, 3, 10)], sync=True)
        with Store(path, read_only=True) as ro:
            assert ro.read(TP, 0, 1 << 20) == stored
            with pytest.raises(ZqError, match="read-only"):
                ro.begin()


def test_a_full_disk_raises_storage_full_and_applies_nothing(tmp_path):
    """A small tmpfs in a private mount namespace (needs root; skipped elsewhere)."""
    import os
    import shutil
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small tmpfs in a private mount namespace")
    script = textwrap.dedent("""
        import os, sys
        from zq.batch import crc, make_stored, unpack_header
        from zq.errors import StorageFull
        from zq.io.store import Store
        from zq.types import TopicPartition
        tp = TopicPartition(1, 0)
        root = sys.argv[1]
        with open(os.path.join(root, "ballast"), "wb") as f:
            f.write(b"x" * 8_000_000)
        s = Store(os.path.join(root, "db"))
        blob = os.urandom(200_000)
        offset, error = 0, None
        while error is None and offset < 1000:
            txn = s.begin()
            for i in range(4):
                stored = make_stored(0, offset, 1, 1, offset, 0, 0, crc(blob), blob)
                txn.append(tp, stored, unpack_header(stored))
                offset += 1
            try:
                s.commit(txn, sync=True)
            except StorageFull as e:
                error = e
        assert error is not None, "the disk never filled"
        committed = s.partition_state(tp).log_end
        assert committed == offset - 4, (committed, offset)
        assert len(s.read(tp, 0, 1 << 30)) == committed
        os.remove(os.path.join(root, "ballast"))
        txn = s.begin()
        stored = make_stored(0, committed, 1, 1, committed, 0, 0, crc(b"x"), b"x")
        txn.append(tp, stored, unpack_header(stored))
        s.commit(txn, sync=True)  # reopens the DB, now that there is room
        assert s.partition_state(tp).log_end == committed + 1
        s.close()
        s = Store(os.path.join(root, "db"))
        assert s.partition_state(tp).log_end == committed + 1
        assert len(s.read(tp, 0, 1 << 30)) == committed + 1
        print("OK", committed, type(error).__name__)
    """)
    mnt = tmp_path / "small"
    mnt.mkdir()
    cmd = f'mount -t tmpfs -o size=14m tmpfs "{mnt}" && exec "{sys.executable}" -c "$0" "{mnt}"'
    out = subprocess.run(["unshare", "-m", "sh", "-c", cmd, script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr


# --- the offline inspector (tools/inspect_data.py)


def test_inspector_verifies_a_data_dir_and_finds_damage(tmp_path):
    import json
    from pathlib import Path
    tool = Path(__file__).resolve().parent.parent / "tools" / "inspect_data.py"
    path = tmp_path / "db"
    with Store(path) as s:
        stored = append(s, TP, [(0, 3, 10), (3, 3, 20), (6, 3, 30)], sync=True)
        txn = s.begin()
        txn.delete_below(TP, 4)
        txn.put_meta(b"node", b"n1")
        s.commit(txn, sync=True)

    def inspect() -> tuple[int, dict]:
        out = subprocess.run([sys.executable, str(tool), str(path), "--verify", "--json"],
                             capture_output=True, text=True, timeout=60)
        return out.returncode, json.loads(out.stdout)

    code, doc = inspect()
    assert code == 0, doc
    assert doc["partitions"] == [{"topic_id": 7, "partition": 3, "log_start": 4, "log_end": 9,
                                  "size_bytes": len(stored[1]) + len(stored[2]), "first_append_time_ms": 20,
                                  "last_append_time_ms": 30}]
    assert doc["meta"][0]["name"] == "node"
    assert doc["verify"][0]["problems"] == 0
    bad = bytearray(stored[2])
    bad[-1] ^= 0xFF
    raw = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True))
    raw.put(log_key(TP, 6), bytes(bad))
    raw.close()
    code, doc = inspect()
    assert code == 1
    assert any("batch at 6" in d for d in doc["verify"][0]["details"]), doc["verify"]


# --- a model check: random transactions of appends, truncations and retention


class _Model:
    """What the store should hold for one partition: a plain list of (base, next, index_time, stored)."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, int, bytes]] = []
        self.log_start = self.log_end = 0
        self.last_time: int | None = None
        self.exists = False

    def copy(self) -> _Model:
        m = _Model()
        m.batches, m.log_start, m.log_end, m.last_time, m.exists = (list(self.batches), self.log_start,
                                                                    self.log_end, self.last_time, self.exists)
        return m

    def append(self, count: int, time_ms: int) -> bytes:
        stored = batch(self.log_end, count, time_ms)
        index_time = time_ms if self.last_time is None else max(time_ms, self.last_time)
        if not self.batches:
            self.log_start = self.log_end
        self.batches.append((self.log_end, self.log_end + count, index_time, stored))
        self.log_end += count
        self.last_time = index_time
        self.exists = True
        return stored

    def clear_to(self, offset: int) -> None:
        self.batches, self.log_start, self.log_end, self.last_time = [], offset, offset, None

    def truncate_from(self, offset: int) -> None:
        if not self.exists or offset >= self.log_end:
            return
        if offset <= self.log_start:
            self.clear_to(offset)
            return
        self.batches = [b for b in self.batches if b[0] < offset]
        self.log_end = offset
        self.last_time = self.batches[-1][2]

    def delete_below(self, offset: int) -> None:
        if not self.exists or offset <= self.log_start:
            return
        if offset >= self.log_end:
            self.clear_to(offset)
            return
        self.batches = [b for b in self.batches if b[1] > offset]
        self.log_start = offset

    def size(self) -> int:
        return sum(len(b[3]) for b in self.batches)


_append = st.tuples(st.just("append"), st.integers(1, 4), st.integers(-50, 100))
_ops = st.lists(st.one_of(
    _append, _append, _append, _append,
    st.tuples(st.just("truncate"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("delete_below"), st.integers(0, 40), st.just(0)),
    st.tuples(st.just("commit"), st.booleans(), st.just(0)),
    st.tuples(st.just("commit"), st.booleans(), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0)),
), min_size=5, max_size=50)


@settings(max_examples=80, deadline=None)
@given(ops=_ops)
def test_random_transactions_match_a_model(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("model") / "db"
    store = Store(path)
    committed, staged = _Model(), _Model()
    txn = store.begin()
    clock = 1_000
    try:
        for op, a, b in ops + [("commit", True, 0)]:
            if op == "append":
                clock = max(0, clock + b)
                stored = staged.append(a, clock)
                txn.append(TP, stored, unpack_header(stored))
            elif op == "truncate":
                # Truncation happens at batch boundaries (or at/below log start, or at log end).
                boundaries = [staged.log_start] + [x[0] for x in staged.batches] + [staged.log_end]
                offset = boundaries[a % len(boundaries)] if a % 3 else max(0, staged.log_start - a % 5)
                staged.truncate_from(offset)
                txn.truncate_from(TP, offset)
            elif op == "delete_below":
                # Mostly inside the log (and often inside a batch), sometimes at or past its end.
                offset = staged.log_start + a % (staged.log_end - staged.log_start + 3)
                staged.delete_below(offset)
                txn.delete_below(TP, offset)
            elif op == "commit":
                store.commit(txn, sync=a)
                committed = staged.copy()
                txn = store.begin()
                _check(store, committed)
            else:
                store.close()
                store = Store(path)
                staged = committed.copy()
                txn = store.begin()
                _check(store, committed)
    finally:
        store.close()


def _check(store: Store, m: _Model) -> None:
    st_ = store.partition_state(TP)
    if not m.exists:
        assert st_ is None
        return
    assert (st_.log_start, st_.log_end, st_.size_bytes) == (m.log_start, m.log_end, m.size())
    assert st_.first_append_time_ms == (m.batches[0][2] if m.batches else None)
    assert st_.last_append_time_ms == (m.batches[-1][2] if m.batches else None)
    assert store.read(TP, m.log_start, 1 << 30) == [x[3] for x in m.batches]
    for x in m.batches:
        assert store.read(TP, x[1] - 1, 1)[0] == x[3]
    for t in sorted({x[2] for x in m.batches} | {0, 10**6}):
        expect = next((max(x[0], m.log_start) for x in m.batches if x[2] >= t), None)
        assert store.offset_for_time(TP, t) == expect
    for keep in (0, m.size() // 2, m.size()):
        expect = None
        if m.size() > keep:
            removed = 0
            for x in m.batches:
                removed += len(x[3])
                if removed >= m.size() - keep:
                    expect = x[1]
                    break
            expect = expect if expect > m.log_start else None
        assert store.retention_candidates(TP, now_ms=0, retention_ms=None, retention_bytes=keep) == expect


# --- damage on disk (issue 12, finding 3)


def flip_sst_block(path, count: int = 16) -> str:
    """Flip `count` bytes in the middle of the data dir's largest .sst file; return its name."""
    ssts = sorted(path.glob("*.sst"), key=lambda f: f.stat().st_size)
    assert ssts, "flush first: there is no .sst to damage"
    target = ssts[-1]
    size = target.stat().st_size
    with open(target, "r+b") as f:
        f.seek(size // 2)
        data = f.read(count)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    return target.name


def test_a_damaged_sst_block_raises_corrupt_data_on_read_never_an_empty_or_restarted_read(tmp_path):
    s = Store(tmp_path / "db")
    for base in range(0, 3000, 3):
        append(s, TP, [(base, 3, 1_000)])
    s._db.flush()
    s.close()
    flip_sst_block(tmp_path / "db")
    s = Store(tmp_path / "db")
    try:
        offset, seen = 0, 0
        with pytest.raises(CorruptData) as info:
            for _ in range(10_000):  # bounded: 1000 batches in all, so a read that restarts would run out
                values = s.read(TP, offset, 64 * 1024)
                assert values, f"read at {offset} came back empty although the log ends at 3000"
                assert verify_stored(values[0]).base_offset <= offset, "a read went back to the start"
                offset = verify_stored(values[-1]).next_offset
                seen += len(values)
        assert "corrupt" in info.value.message and "topic 7 partition 3" in info.value.message
        assert info.value.partition == 3
        with pytest.raises(CorruptData):
            list(s.scan(b"L"))
    finally:
        s.close()


_WRITER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from tests.test_store import TP, append
    from zq.io.store import Store
    s = Store({path!r})
    for base in range(0, 4500, 3):
        append(s, TP, [(base, 3, 1_000)], sync=True)
    os._exit(0)  # a kill: no close, no flush, the WAL holds every write
""")


def write_then_kill(path) -> None:
    from pathlib import Path
    root = str(Path(__file__).resolve().parent.parent)
    subprocess.run([sys.executable, "-c", _WRITER.format(root=root, path=str(path))], check=True, timeout=120)


def flip_wal(path, count: int = 16) -> None:
    wal = max(path.glob("*.log"), key=lambda f: f.stat().st_size)
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        f.seek(size // 2)
        data = f.read(count)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_dropped_wal_tail_is_reported_until_the_node_has_recorded_it(tmp_path):
    path = tmp_path / "db"
    write_then_kill(path)
    with Store(path) as s:  # an intact WAL: nothing to report
        assert s.dropped_wal_tail is None and s.partition_state(TP).log_end == 4500
    write_then_kill(tmp_path / "db2")
    path = tmp_path / "db2"
    flip_wal(path)
    s = Store(path)
    try:
        kept = s.partition_state(TP).log_end
        assert kept < 4500, "the damage was in the middle: point-in-time recovery drops the rest"
        assert s.dropped_wal_tail is not None and "Corruption" in s.dropped_wal_tail
        assert any("dropping" in line for line in s.recovery_warnings), s.recovery_warnings
    finally:
        s.close()
    with Store(path) as s:  # a crash before the node recorded it: still reported
        assert s.dropped_wal_tail is not None and s.partition_state(TP).log_end == kept
        s.clear_dropped_wal_tail()
    with Store(path) as s:
        assert s.dropped_wal_tail is None


def test_inspector_reports_a_damaged_wal_and_a_damaged_block(tmp_path):
    import json
    from pathlib import Path
    tool = Path(__file__).resolve().parent.parent / "tools" / "inspect_data.py"
    path = tmp_path / "db"
    write_then_kill(path)
    flip_wal(path)

    def inspect() -> tuple[int, dict]:
        out = subprocess.run([sys.executable, str(tool), str(path), "--verify", "--json"],
                             capture_output=True, text=True, timeout=60)
        return out.returncode, json.loads(out.stdout)

    code, doc = inspect()
    assert code == 1 and any("damaged record" in w for w in doc["wal"]), doc["wal"]
    with Store(path) as s:  # a node's open drops the tail and leaves the marker until it has recovered
        s._db.flush()
    code, doc = inspect()
    assert code == 1 and any("dropped a damaged WAL tail" in w for w in doc["wal"]), doc["wal"]
    with Store(path) as s:
        s.clear_dropped_wal_tail()
    flip_sst_block(path)
    code, doc = inspect()
    assert code == 1 and doc["wal"] == []
    assert any("unreadable" in d and "corrupt" in d for d in doc["verify"][0]["details"]), doc["verify"]
