"""Quorum arithmetic for a replica set: pure functions, no state.

A replica set of n voters decides by majority: any two majorities share at least one voter,
which is what makes a committed batch survive the loss of any minority. Everything here is
plain arithmetic over the voters' reports, so it can be property-tested on its own (as
etcd-raft's `quorum` package is).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping


def majority(voters: int) -> int:
    """How many of `voters` make a majority (1 of 1, 2 of 3, 3 of 5)."""
    if voters < 1:
        raise ValueError(f"a replica set has at least one voter, got {voters}")
    return voters // 2 + 1


def committed_end(durable_ends: Iterable[int], voters: int) -> int:
    """The highest offset below which a majority of the voters hold everything durably.

    `durable_ends` has one entry per voter that has reported (voters that have not reported
    count as 0). The answer is the majority-th largest report: at least a majority hold
    everything below it, and no higher offset has that property.
    """
    ends = sorted(durable_ends, reverse=True)
    if len(ends) > voters:
        raise ValueError(f"{len(ends)} reports for {voters} voters")
    need = majority(voters)
    if len(ends) < need:
        return 0
    return ends[need - 1]


def has_majority(granted: Iterable[object], voters: int) -> bool:
    """True when the distinct voters in `granted` are a majority of `voters`."""
    return len(set(granted)) >= majority(voters)


def quorum_contact_ms(last_contact_ms: Mapping[object, int], voters: int) -> int | None:
    """The latest time by which a majority had been heard from (the leader counts itself).

    `last_contact_ms` maps each voter to the last time it was heard from. The answer is the
    majority-th most recent of those times, or None when fewer than a majority were ever heard.
    A leader whose answer is older than an election timeout has lost its quorum (check-quorum).
    """
    times = sorted(last_contact_ms.values(), reverse=True)
    need = majority(voters)
    if len(times) < need:
        return None
    return times[need - 1]
