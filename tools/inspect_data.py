#!/usr/bin/env python3
"""Offline inspector of a zq node's data dir (its RocksDB).

    python tools/inspect_data.py DATA_DIR                      # partitions and meta keys
    python tools/inspect_data.py DATA_DIR --verify             # also check every batch and index entry
    python tools/inspect_data.py DATA_DIR --batches 3:0         # list the batches of topic id 3, partition 0
    python tools/inspect_data.py DATA_DIR --json               # one JSON document instead of tables

It opens the DB read-only, so it works beside a running node (it then sees the data as of its
opening). `--verify` checks, per partition: each stored batch's header and blob checksums, that
each batch sits under its own base offset, that batches are contiguous, that the time index has
exactly one entry per batch with the right next offset and cumulative size, and that the
partition-state record agrees with the log; a block that fails RocksDB's own checksum is reported
for its partition (the scan stops there), a damaged WAL record (whose tail a node's next start
would drop) and a node's unfinished recovery from a dropped tail are reported for the dir. Exit status: 0 when clean, 1 when it found a problem,
2 when the data dir cannot be opened.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zq.batch import verify_stored  # noqa: E402
from zq.errors import CorruptData, ZqError  # noqa: E402
from zq.io.store import WAL_TAIL_MARKER, PartitionState, Store  # noqa: E402
from zq.types import TopicPartition  # noqa: E402

PROBLEMS_MAX = 100          # problems reported per partition before the rest are only counted
BATCHES_LISTED_MAX = 100_000  # rows `--batches` prints
META_PREVIEW_BYTES = 32

_LOG_KEY = struct.Struct(">cIIQ")
_TIME_KEY = struct.Struct(">cIIQQ")
_TIME_VALUE = struct.Struct(">QQ")


def _prefix(family: bytes, tp: TopicPartition) -> bytes:
    return struct.pack(">cII", family, tp.topic_id, tp.partition)


def state_row(tp: TopicPartition, st: PartitionState) -> dict:
    return {"topic_id": tp.topic_id, "partition": tp.partition, "log_start": st.log_start, "log_end": st.log_end,
            "size_bytes": st.size_bytes, "first_append_time_ms": st.first_append_time_ms,
            "last_append_time_ms": st.last_append_time_ms}


def meta_rows(store: Store) -> list[dict]:
    rows = []
    try:
        for key, value in store.scan(b"M"):
            name = key[1:]
            rows.append({"name": name.decode("utf-8", "backslashreplace"), "bytes": len(value),
                         "preview": value[:META_PREVIEW_BYTES].hex()})
    except CorruptData as e:
        rows.append({"name": "(unreadable)", "bytes": 0, "preview": e.message})
    return rows


def batch_rows(store: Store, tp: TopicPartition) -> list[dict]:
    rows = []
    for key, value in store.scan(_prefix(b"L", tp)):
        if len(rows) >= BATCHES_LISTED_MAX:
            break
        key_offset = _LOG_KEY.unpack(key)[3]
        row = {"key_offset": key_offset, "bytes": len(value)}
        try:
            h = verify_stored(value)
            row.update(base_offset=h.base_offset, count=h.count, epoch=h.epoch, append_time_ms=h.append_time_ms,
                       producer_id=h.producer_id, base_sequence=h.base_sequence, flags=h.flags, ok=True)
        except CorruptData as e:
            row.update(ok=False, error=e.message)
        rows.append(row)
    return rows


def verify_partition(store: Store, tp: TopicPartition, st: PartitionState | None) -> tuple[list[str], int]:
    """Problems found in one partition (the first PROBLEMS_MAX of them) and their total count."""
    problems: list[str] = []
    count = 0

    def problem(text: str) -> None:
        nonlocal count
        count += 1
        if len(problems) < PROBLEMS_MAX:
            problems.append(text)

    try:
        _verify_scan(store, tp, st, problem)
    except CorruptData as e:  # RocksDB's block checksum: what lies past the damage cannot be read
        problem(f"unreadable: {e.message}")
    return problems, count


def _verify_scan(store: Store, tp: TopicPartition, st: PartitionState | None, problem) -> None:
    batches: list[tuple[int, int, int]] = []  # (base, next, size)
    expected_next = None
    for key, value in store.scan(_prefix(b"L", tp)):
        key_offset = _LOG_KEY.unpack(key)[3]
        try:
            h = verify_stored(value)
        except CorruptData as e:
            problem(f"batch at {key_offset}: {e.message}")
            continue
        if h.base_offset != key_offset:
            problem(f"batch under offset {key_offset} says it starts at {h.base_offset}")
        if expected_next is not None and key_offset != expected_next:
            problem(f"gap or overlap: batch at {key_offset}, previous batch ended at {expected_next}")
        expected_next = h.next_offset
        batches.append((key_offset, h.next_offset, len(value)))

    index = []
    for key, value in store.scan(_prefix(b"T", tp)):
        _, _, _, index_time, base = _TIME_KEY.unpack(key)
        next_offset, cum = _TIME_VALUE.unpack(value)
        index.append((index_time, base, next_offset, cum))
    if [b for _, b, _, _ in index] != [b for b, _, _ in batches]:
        problem(f"time index lists {len(index)} batches, log holds {len(batches)}, or their offsets differ")
    else:
        for (_, base, next_offset, cum), (_, log_next, size) in zip(index, batches):
            if next_offset != log_next:
                problem(f"time index says batch {base} ends at {next_offset}, the batch says {log_next}")
        for prev, cur, (_, _, size) in zip(index, index[1:], batches[1:]):
            if cur[3] - prev[3] != size:
                problem(f"time index cumulative size at batch {cur[1]} grows by {cur[3] - prev[3]}, "
                        f"the batch holds {size} bytes")
            if cur[0] < prev[0]:
                problem(f"time index goes back in time at batch {cur[1]}")

    if st is None:
        if batches:
            problem(f"{len(batches)} batches but no partition-state record")
        return
    size = sum(s for _, _, s in batches)
    if size != st.size_bytes:
        problem(f"state says {st.size_bytes} bytes, the log holds {size}")
    if batches:
        if batches[-1][1] != st.log_end:
            problem(f"state says log end {st.log_end}, the last batch ends at {batches[-1][1]}")
        if not batches[0][0] <= st.log_start < batches[0][1]:
            problem(f"state says log start {st.log_start}, the first batch covers [{batches[0][0]}, {batches[0][1]})")
    elif st.log_start != st.log_end:
        problem(f"state says [{st.log_start}, {st.log_end}) but the log is empty")


def orphan_partitions(store: Store, known: set[TopicPartition]) -> list[TopicPartition]:
    """Partitions with log keys but no state record (a topic drop should leave none)."""
    found = []
    seen: set[TopicPartition] = set()
    try:
        for key, _ in store.scan(b"L"):
            _, topic_id, partition, _ = _LOG_KEY.unpack(key)
            tp = TopicPartition(topic_id, partition)
            if tp not in seen:
                seen.add(tp)
                if tp not in known:
                    found.append(tp)
    except CorruptData:
        pass  # the damaged block is reported with its partition; orphans past it cannot be seen
    return found


def wal_problems(store: Store, data_dir: Path) -> list[str]:
    out = []
    if store.wal_damage is not None:
        out.append(f"the WAL holds a damaged record ({store.wal_damage}): a node opening this dir drops every "
                   "write after it, and its partitions then recover from the other replicas")
    marker = store._read_marker(WAL_TAIL_MARKER)
    if marker is not None:
        out.append(f"the node dropped a damaged WAL tail ({marker}) and has not finished recording it; its "
                   "partitions recover from the other replicas when it starts")
    return out


def print_table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        print("  (none)")
        return
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  " + "  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def parse_tp(text: str) -> TopicPartition:
    try:
        topic_id, partition = text.split(":")
        return TopicPartition(int(topic_id), int(partition))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOPIC_ID:PARTITION, such as 3:0, not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inspect a zq node's data dir offline.")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--verify", action="store_true", help="check every batch, the time index and the state")
    parser.add_argument("--batches", type=parse_tp, metavar="TOPIC_ID:PARTITION", help="list one partition's batches")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    if not (args.data_dir / "CURRENT").exists():
        print(f"{args.data_dir} is not a zq data dir (no RocksDB CURRENT file)", file=sys.stderr)
        return 2
    try:
        store = Store(args.data_dir, read_only=True)
    except ZqError as e:
        print(e.message, file=sys.stderr)
        return 2
    try:
        states = store.partitions()
        doc: dict = {"data_dir": str(args.data_dir), "disk_free_bytes": store.disk_free_bytes(),
                     "partitions": [state_row(tp, st) for tp, st in states.items()],
                     "meta": meta_rows(store)}
        bad = False
        doc["wal"] = wal_problems(store, args.data_dir)
        if args.verify:
            bad = bad or bool(doc["wal"]) or any(r["name"] == "(unreadable)" for r in doc["meta"])
            report = []
            for tp in [*states, *orphan_partitions(store, set(states))]:
                problems, count = verify_partition(store, tp, states.get(tp))
                bad = bad or count > 0
                report.append({"topic_id": tp.topic_id, "partition": tp.partition, "problems": count,
                               "details": problems})
            doc["verify"] = report
        if args.batches is not None:
            doc["batches"] = batch_rows(store, args.batches)
            bad = bad or not all(r["ok"] for r in doc["batches"])
    finally:
        store.close()

    if args.json:
        print(json.dumps(doc, indent=2))
        return 1 if bad else 0
    print(f"data dir {doc['data_dir']}  ({doc['disk_free_bytes'] / 1e9:.1f} GB free)")
    print("partitions:")
    print_table(doc["partitions"], ["topic_id", "partition", "log_start", "log_end", "size_bytes",
                                    "first_append_time_ms", "last_append_time_ms"])
    print("meta:")
    print_table(doc["meta"], ["name", "bytes", "preview"])
    if doc["wal"]:
        print("wal:")
        for line in doc["wal"]:
            print(f"  - {line}")
    if "verify" in doc:
        print("verify:")
        for r in doc["verify"]:
            status = "ok" if r["problems"] == 0 else f"{r['problems']} problem(s)"
            print(f"  topic {r['topic_id']} partition {r['partition']}: {status}")
            for d in r["details"]:
                print(f"    - {d}")
    if "batches" in doc:
        print(f"batches of topic {args.batches.topic_id} partition {args.batches.partition}:")
        print_table(doc["batches"], ["key_offset", "count", "epoch", "append_time_ms", "producer_id",
                                     "base_sequence", "bytes", "ok", "error"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
