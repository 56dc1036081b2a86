"""Opening a store and recovering from damage: RocksDB's options, the open that finds a damaged
WAL record and reports the tail it drops (zq/io/store.py, "Errors", tells what the node makes of
it), RocksDB's own recovery lines, the store's marker files, and `set_aside`, which moves a
damaged store's files out of the way so that the node can start empty and copy its partitions
from the other replicas. `zq.io.store.Store` opens through `StoreOpening`; the read and write API
is in zq/io/store.py.

Not thread-safe: the node's single event loop owns the store.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import rocksdict

from zq.errors import CorruptData, StorageFull, ZqError

ROCKSDB_LOG_READ_BYTES_MAX = 1 << 20   # of RocksDB's info LOG read after an open, for its recovery warnings
ROCKSDB_WARNINGS_MAX = 20              # RocksDB recovery lines passed on to node.log per open
MARKER_BYTES_MAX = 4096                # text kept in a marker file

WAL_TAIL_MARKER = "ZQ-WAL-TAIL-DROPPED"  # in the data dir: the last open dropped a damaged WAL tail


class StoreOpening:
    """How `Store` opens its RocksDB: set in `Store.__init__` before `_open` runs."""
    path: Path
    read_only: bool
    dropped_wal_tail: str | None   # RocksDB's error, while the node has not recorded the loss
    wal_damage: str | None         # read-only: the WAL holds a damaged record (a node would drop the rest)
    recovery_warnings: list[str]   # RocksDB's LOG lines about corruption from the last open

    def _options(self, *, strict_wal: bool = False) -> rocksdict.Options:
        o = rocksdict.Options(raw_mode=True)     # keys and values are raw bytes: no pickling, no type tags
        o.create_if_missing(True)                # a fresh data dir is a new, empty node
        o.set_paranoid_checks(True)              # refuse to open over detected corruption rather than serve it
        if strict_wal:  # any damaged WAL record fails the open: how `_open` learns that a tail would be dropped
            o.set_wal_recovery_mode(rocksdict.DBRecoveryMode.absolute_consistency())
        else:           # replay the WAL up to the first damaged record, no further (and drop the rest)
            o.set_wal_recovery_mode(rocksdict.DBRecoveryMode.point_in_time())
        o.set_write_buffer_size(64 * 1024 * 1024)    # 64 MiB memtables: ~5000 batches of 12 KB before a flush
        o.set_max_write_buffer_number(3)         # one filling, up to two flushing: writes do not stall on a flush
        o.set_max_total_wal_size(512 * 1024 * 1024)  # backstop on WAL size (and replay time after a crash)
        o.set_max_background_jobs(2)             # the node's machines are small; compaction must not starve the loop
        o.set_bytes_per_sync(1024 * 1024)        # write SSTs out steadily instead of in one burst at close
        o.set_level_compaction_dynamic_level_bytes(True)  # steadier space use when retention deletes old ranges
        o.set_compression_type(rocksdict.DBCompressionType.lz4())  # cheap; skips blocks that do not compress
        o.set_max_open_files(1024)               # bound file descriptors; the node also holds sockets
        o.set_keep_log_file_num(4)               # RocksDB's own info LOG files, bounded
        return o

    def _open(self, *, strict: bool = True) -> rocksdict.Rdict:
        """Open strictly first (absolute WAL consistency): a WAL that replays cleanly opens as usual.
        If the strict open finds a damaged WAL record, RocksDB's point-in-time recovery would drop
        every write after it, silently: the store writes a marker file (fsynced) saying so before
        it opens that way, and reports it (`dropped_wal_tail`) until the node has recorded what it
        implies (`clear_dropped_wal_tail`): the hard state of every partition may be gone with the
        tail, so the node cannot find the loss by comparing with it. The marker comes first
        because the point-in-time open rewrites the WAL: a crash right after it would otherwise
        leave no trace. Costs nothing on the write path; one failed open when the WAL is damaged.
        (A power loss can leave a torn, never-synced last record too: that is reported as well,
        which costs the node a catch-up of its partitions, never data.)"""
        try:
            if self.read_only:
                try:
                    return rocksdict.Rdict(str(self.path), self._options(strict_wal=True),
                                           access_type=rocksdict.AccessType.read_only())
                except Exception as e:
                    if not str(e).startswith("Corruption"):
                        raise
                    self.wal_damage = str(e)  # a read-only open cannot drop it: report what a node would do
                    return rocksdict.Rdict(str(self.path), self._options(), access_type=rocksdict.AccessType.read_only())
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                db = rocksdict.Rdict(str(self.path), self._options(strict_wal=strict))
            except Exception as e:
                if not strict or not str(e).startswith("Corruption"):
                    raise
                self._write_marker(WAL_TAIL_MARKER, str(e))
                db = rocksdict.Rdict(str(self.path), self._options())  # raises if it was not the WAL after all
            self.dropped_wal_tail = self._read_marker(WAL_TAIL_MARKER)
            self.recovery_warnings = self._rocksdb_warnings()
            return db
        except OSError as e:
            raise ZqError(f"cannot open data dir {self.path}: {e.strerror or e}", path=str(self.path)) from e
        except ZqError:
            raise
        except Exception as e:  # rocksdict raises plain Exception carrying RocksDB's status text
            raise _open_error(self.path, e) from e

    def _write_marker(self, name: str, text: str) -> None:
        marker = self.path / name
        with open(marker, "w", encoding="utf-8") as f:
            f.write(text[:MARKER_BYTES_MAX] + "\n")
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the marker's directory entry is durable too
        finally:
            os.close(fd)

    def _read_marker(self, name: str) -> str | None:
        try:
            with open(self.path / name, encoding="utf-8", errors="replace") as f:
                return f.read(MARKER_BYTES_MAX).strip() or "damaged WAL"
        except FileNotFoundError:
            return None

    def clear_dropped_wal_tail(self) -> None:
        """The node has durably recorded that every partition here lost its tail: forget it."""
        try:
            os.unlink(self.path / WAL_TAIL_MARKER)
        except FileNotFoundError:
            pass
        self.dropped_wal_tail = None

    def _rocksdb_warnings(self) -> list[str]:
        """RocksDB's own lines about corruption or dropped records from this open (its LOG file),
        so that the node's log says what RocksDB found; at most ROCKSDB_WARNINGS_MAX lines."""
        out: list[str] = []
        try:
            with open(self.path / "LOG", encoding="utf-8", errors="replace") as f:
                text = f.read(ROCKSDB_LOG_READ_BYTES_MAX)
        except OSError:
            return out
        for line in text.splitlines():
            lowered = line.lower()
            if ("corrupt" in lowered or "dropping" in lowered) and "[" in line and "keydrop" not in lowered:
                out.append(line.strip())
                if len(out) >= ROCKSDB_WARNINGS_MAX:
                    break
        return out


_ROCKSDB_FILE = re.compile(r"\d+\.(sst|log|blob)|CURRENT|IDENTITY|LOCK|LOG|LOG\.old\.\d+|MANIFEST-\d+|OPTIONS-\d+")


def set_aside(path: str | os.PathLike, label: str) -> Path:
    """Move a closed store's RocksDB files into `path/damaged-<label>` (kept for inspection), so
    that a store opened at `path` next starts empty. Only RocksDB's files (and the store's marker)
    move: the data dir may hold others, such as the node's own log."""
    path = Path(path)
    aside = path / f"damaged-{label}"
    aside.mkdir()
    for f in sorted(path.iterdir()):
        if f.is_file() and (_ROCKSDB_FILE.fullmatch(f.name) or f.name == WAL_TAIL_MARKER):
            f.rename(aside / f.name)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the moves are durable before an empty store is created in their place
    finally:
        os.close(fd)
    return aside


def _is_no_space(text: str) -> bool:
    lowered = text.lower()
    return "no space" in lowered or "enospc" in lowered or "quota exceeded" in lowered


def _open_error(path: Path, e: Exception) -> ZqError:
    text = str(e)
    if "LOCK" in text or "lock hold" in text:
        return ZqError(f"data dir {path} is in use by another zq node (RocksDB lock); stop it or pick another "
                       "--data-dir", path=str(path))
    if _is_no_space(text):
        return StorageFull(f"the disk of data dir {path} is full ({text}); free space to start the node",
                           path=str(path))
    if text.startswith("Corruption"):
        return CorruptData(f"data dir {path} is corrupt ({text}); restore it or move it aside and let the node "
                           "copy its partitions from the other replicas", path=str(path))
    return ZqError(f"cannot open data dir {path}: {text}", path=str(path))
