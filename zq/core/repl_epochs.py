"""Leader-epoch history: pure functions over `((epoch, start_offset), ...)`, ascending in both.

The history says which epoch wrote each offset: epoch e wrote `[start_e, start_next)`. Because
one epoch has one leader, two logs that hold the same epoch at the same offset hold the same
entries up to there (Raft's log matching, at batch granularity), so comparing epochs at an
offset is enough to know whether two logs agree below it.
"""
from __future__ import annotations

from bisect import bisect_right


def epoch_at(history: tuple, offset: int) -> int:
    """The epoch of the entry holding `offset`; 0 before the log (offset < first start)."""
    if offset < 0 or not history:
        return 0
    i = bisect_right(history, offset, key=lambda item: item[1])
    return history[i - 1][0] if i else 0


def end_for_epoch(history: tuple, epoch: int, log_end: int) -> tuple[int, int]:
    """(largest epoch <= `epoch` in the history, the offset where it ends), as the KIP-101 /
    KIP-279 OffsetsForLeaderEpoch answer. (0, start of the first epoch) when there is none."""
    found = 0
    end = history[0][1] if history else log_end
    for i, (e, _start) in enumerate(history):
        if e > epoch:
            break
        found = e
        end = history[i + 1][1] if i + 1 < len(history) else log_end
    return found, end


def truncated(history: tuple, offset: int) -> tuple:
    """The history of a log cut to end at `offset`."""
    return tuple(item for item in history if item[1] < offset)


def appended(history: tuple, epoch: int, base_offset: int) -> tuple:
    """The history after appending an entry of `epoch` at `base_offset`."""
    if history and history[-1][0] == epoch:
        return history
    assert not history or history[-1][0] < epoch, "epochs in a log only grow"
    return history + ((epoch, base_offset),)
