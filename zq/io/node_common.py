"""What every room of the node shares: its timing constants and bounds, its two clocks, its
logger, and the rate-limited warning log. (zq/io/node.py re-exports the names tests use.)"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from zq.errors import ZqError


log = logging.getLogger("zq.node")

PEER_REQUEST_TIMEOUT_MS = 3_000   # a peer request with no answer by then is given up
NODE_HEARTBEAT_MS = 250           # how often a node tells each peer it is alive and what it leads
NODE_ALIVE_MS = 3_000             # a node heard from within this long counts as alive
IN_SYNC_READ_BYTES = 64 * 1024    # read to find the oldest batch a replica lacks (past control batches)
NODE_DEAD_MS = 10_000             # ... and as dead after this long
RETENTION_INTERVAL_MS = 5_000     # how often retention runs
METRICS_REFRESH_MS = 1_000        # how often the /metrics snapshot of partitions is taken
DISK_CHECK_INTERVAL_MS = 1_000    # how often free disk space is read
DISK_FREE_BYTES_MIN = 64 * 1024 * 1024  # below this, produce is refused with StorageFull
PEER_PENDING_MAX = 1_000          # requests awaiting an answer, per peer
# ZMTP heartbeats on each DEALER to a peer, answered by the peer's libzmq I/O thread (so a busy
# node still answers): a peer whose process is stopped (SIGSTOP) or cut off is disconnected after
# the timeout, and the replicas it leads here elect at once (Replica.peer_lost), instead of after
# one or two election timeouts (1 s). A false disconnect costs at most a refused pre-vote.
PEER_HEARTBEAT_IVL_MS = 200
PEER_HEARTBEAT_TIMEOUT_MS = 600
PREFERRED_LEADER_DELAY_MS = 300  # a new partition created without a leader (an older version's command), or
                                 # whose replica was lost: its preferred leader stands this soon after opening
PREFERRED_STAND_TRIES_MAX = 10    # ... tried again this often while its replica still polls (recovering)
REQUESTS_BUDGET_MS = 250          # client requests handled per loop pass, in time (see Node.run)
SLOW_PASS_MS = 250                # a loop pass longer than this is logged: it delays heartbeats
PUB_SNDHWM = 10_000               # Appends queued per subscriber before PUB drops them (followers fetch the gap)
FETCH_PENDING_SWEEP_MS = 1_000    # how often fetch replies written out are struck off their clients' accounts
FETCH_TRACK_BYTES_MIN = 64 * 1024  # a fetch reply this large is always tracked (zero-copy, libzmq says when written)
FETCH_TRACK_EVERY = 16            # else one small reply in this many is tracked: a tracked send costs ~40 us more
LOG_REPEAT_MS = 10_000            # a repeated warning is logged at most once per this long (the next says how many)
CLOCK_JUMP_MS = 1_000             # the wall clock moving this far against the monotonic one between reads is a jump
CLOCK_SKEW_WARN_MS = 10_000       # a leader's clock this far off its replica set's median is logged
TEST_CLOCK_OFFSET_ENV = "ZQ_TEST_CLOCK_OFFSET_MS"  # tests only: shifts this node's wall clock (README, "Clocks")
BORN_META = b"zq-born"            # meta key: the __meta offset from which this store has held everything it was given


def _test_clock_offset_ms() -> int:
    """For tests only: a wall-clock offset from the environment, read once (a node a day ahead)."""
    text = os.environ.get(TEST_CLOCK_OFFSET_ENV, "").strip()
    try:
        return int(text or 0)
    except ValueError:
        raise ZqError(f"{TEST_CLOCK_OFFSET_ENV}={text!r} is not a whole number of milliseconds; "
                      "unset it (it is for tests)") from None


_CLOCK_OFFSET_MS = _test_clock_offset_ms()


def now_ms() -> int:
    """This node's wall clock (the only place that reads it)."""
    return int(time.time() * 1000) + _CLOCK_OFFSET_MS


def mono_ms() -> int:
    return int(time.monotonic() * 1000)


class _LimitedLog:
    """Repeated warnings of the loop, at most one line per kind per LOG_REPEAT_MS; the next line
    of a kind says how many were left out. Kinds are a fixed set of names (bounded)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}   # kind -> (mono ms logged, left out since)

    def log(self, level: int, kind: str, fmt: str, *args: Any, exc_info: bool = False) -> None:
        now = mono_ms()
        last = self._last.get(kind)
        if last is not None and now - last[0] < LOG_REPEAT_MS:
            self._last[kind] = (last[0], last[1] + 1)
            return
        if last is not None and last[1]:
            fmt, args = fmt + " (and %d more like it in %d s)", (*args, last[1], (now - last[0]) // 1000)
        self._last[kind] = (now, 0)
        log.log(level, fmt, *args, exc_info=exc_info)
