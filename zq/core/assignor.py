"""Which member of a consumer group reads which partition: a pure, deterministic, sticky assignor.

Theory of operation
-------------------
`assign(members, partitions, previous)` is a function of its arguments alone: every node that
holds the same live members, partitions and previous assignment computes the same answer, in
any dict or list order (everything is sorted before it is used).

Members are grouped into *classes* by subscription: the topics of the partitions a member may
take. In the common case every member subscribes to every topic and there is one class. Within
a class of M members and N partitions each member gets a quota of q = N // M or q + 1, and
exactly N % M members get q + 1, so counts differ by at most one. The steps, per class:

1. Each partition keeps its previous owner if that owner is live and subscribed (if the
   previous assignment names two owners, the smallest member id keeps it).
2. The q + 1 quotas go first to members that already hold more than q partitions (they keep
   q + 1 and nothing moves), then to members with the smallest load in other classes (what
   they got in classes already done plus what they keep in classes still to do), then by id.
3. A member holding more than its quota releases its highest partitions.
4. Released and orphaned partitions, in (topic, partition) order, each go to the member still
   under its quota that holds the fewest, ties by member id; so a fresh group is dealt out
   round-robin and every topic is spread over the members.

Only partitions whose owner left or is over its quota move, which is the least any balanced
assignment can move: when a member leaves only its partitions move; when one joins (to an
assignment that was balanced) only the partitions it receives move.

A static member id is just a member id: a member that comes back under the same id before its
session times out is still in `members` and keeps what it had. A partition whose topic no live
member subscribes to is left unassigned.
"""
from __future__ import annotations

import heapq

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TopicPartitionName = tuple[str, int]


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """What the assignor needs to know of a member: the topics it subscribes to."""

    topics: frozenset[str]


def assign(members: Mapping[str, MemberInfo | None],
           partitions: Sequence[TopicPartitionName],
           previous: Mapping[str, Sequence[TopicPartitionName]]) -> dict[str, list[TopicPartitionName]]:
    """Partitions per live member, each list sorted; every live member is a key.

    `members` are the live members (None: subscribes to every topic in `partitions`);
    `previous` is the assignment this one replaces (members no longer live are ignored)."""
    parts = sorted(set(partitions))
    member_ids = sorted(members)
    subscribers = _subscribers_by_topic(members, member_ids, {t for t, _ in parts})
    owner = _previous_owners(previous, members, subscribers)

    classes: dict[tuple[str, ...], list[TopicPartitionName]] = {}
    for tp in parts:
        who = subscribers[tp[0]]
        if who:
            classes.setdefault(who, []).append(tp)

    out: dict[str, list[TopicPartitionName]] = {m: [] for m in member_ids}
    # What each member still holds in classes not yet done: part of its load when the q + 1
    # quotas of a class are handed out, so keeping a partition in one class does not pile up
    # on top of an extra in another.
    later: dict[str, int] = {m: 0 for m in member_ids}
    for tp, m in owner.items():
        if subscribers[tp[0]]:
            later[m] += 1
    for who in sorted(classes):
        _assign_class(who, classes[who], owner, out, later)
    for m in member_ids:
        out[m].sort()
    return out


def _subscribers_by_topic(members: Mapping[str, MemberInfo | None], member_ids: list[str],
                          topics: set[str]) -> dict[str, tuple[str, ...]]:
    return {t: tuple(m for m in member_ids if members[m] is None or t in members[m].topics)
            for t in sorted(topics)}


def _previous_owners(previous: Mapping[str, Sequence[TopicPartitionName]],
                     members: Mapping[str, MemberInfo | None],
                     subscribers: dict[str, tuple[str, ...]]) -> dict[TopicPartitionName, str]:
    """Partition -> previous owner, for owners still live and subscribed. Smallest id wins a tie."""
    owner: dict[TopicPartitionName, str] = {}
    for m in sorted(previous):
        if m not in members:
            continue
        for tp in previous[m]:
            tp = (tp[0], tp[1])
            if m in subscribers.get(tp[0], ()) and tp not in owner:
                owner[tp] = m
    return owner


def _assign_class(who: tuple[str, ...], parts: list[TopicPartitionName], owner: dict[TopicPartitionName, str],
                  out: dict[str, list[TopicPartitionName]], later: dict[str, int]) -> None:
    q, extra = divmod(len(parts), len(who))
    kept: dict[str, list[TopicPartitionName]] = {m: [] for m in who}
    orphans: list[TopicPartitionName] = []
    for tp in parts:   # sorted, so each kept list is sorted
        m = owner.get(tp)
        (kept[m] if m in kept else orphans).append(tp)
    for m in who:
        later[m] -= len(kept[m])

    # Step 2: who gets q + 1. Loads from earlier classes break ties so totals stay even too.
    order = sorted(who, key=lambda m: (len(kept[m]) <= q, len(out[m]) + later[m], m))
    quota = {m: q + (1 if i < extra else 0) for i, m in enumerate(order)}

    # Step 3: release what is over quota, highest partitions first.
    pool = orphans
    for m in who:
        pool.extend(kept[m][quota[m]:])
        del kept[m][quota[m]:]
    pool.sort()

    # Step 4: deal the pool to whoever is under quota and holds fewest.
    # A heap of (count, member) for members under quota: the same choice as scanning all of
    # them, in O(log M) per partition.
    hungry = [(len(kept[m]), m) for m in who if len(kept[m]) < quota[m]]
    heapq.heapify(hungry)
    for tp in pool:
        count, m = heapq.heappop(hungry)
        kept[m].append(tp)
        if count + 1 < quota[m]:
            heapq.heappush(hungry, (count + 1, m))
    for m in who:
        out[m].extend(kept[m])
