"""The group assignor: balanced, deterministic, sticky, every partition exactly once."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from zq.core.assignor import MemberInfo, assign

TOPICS = ["a", "b", "c"]

member_ids = st.lists(st.text("mnopqrstuvwxyz", min_size=1, max_size=3), min_size=1, max_size=8, unique=True)
partition_lists = st.lists(st.tuples(st.sampled_from(TOPICS), st.integers(0, 12)), max_size=40, unique=True)


@st.composite
def previous_for(draw, ids, parts):
    """An arbitrary (possibly unbalanced, overlapping, stale) previous assignment."""
    owners = ids + ["gone1", "gone2"]
    prev: dict[str, list] = {}
    for tp in parts:
        for m in draw(st.lists(st.sampled_from(owners), max_size=2)):
            prev.setdefault(m, []).append(tp)
    if draw(st.booleans()):
        prev.setdefault(owners[0], []).append(("deleted", 0))
    return prev


def moved(before, after):
    owner_before = {tp: m for m, tps in before.items() for tp in tps}
    return {tp for m, tps in after.items() for tp in tps if owner_before.get(tp) != m}


def check_exactly_once(result, parts, members):
    flat = [tp for tps in result.values() for tp in tps]
    assert sorted(flat) == sorted(set(parts))
    assert set(result) == set(members)
    for m, tps in result.items():
        assert tps == sorted(tps)
        info = members[m]
        assert info is None or all(t in info.topics for t, _ in tps)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), ids=member_ids, parts=partition_lists)
def test_balanced_exactly_once_and_deterministic(data, ids, parts):
    prev = data.draw(previous_for(ids, parts))
    members = {m: None for m in ids}
    result = assign(members, parts, prev)
    check_exactly_once(result, parts, members)
    counts = [len(v) for v in result.values()]
    assert max(counts) - min(counts) <= 1

    # Same inputs in another order: same answer.
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    ids2 = ids[:]
    rnd.shuffle(ids2)
    parts2 = parts[:]
    rnd.shuffle(parts2)
    prev_items = list(prev.items())
    rnd.shuffle(prev_items)
    prev2 = {m: rnd.sample(tps, len(tps)) for m, tps in prev_items}
    assert assign({m: None for m in ids2}, parts2, prev2) == result


@settings(max_examples=100, deadline=None)
@given(data=st.data(), ids=member_ids, parts=partition_lists)
def test_moves_are_minimal(data, ids, parts):
    """The number moved equals the least any balanced assignment must move, computed directly."""
    prev = data.draw(previous_for(ids, parts))
    result = assign({m: None for m in ids}, parts, prev)
    n, m_count = len(set(parts)), len(ids)
    q, extra = divmod(n, m_count)
    owner = {}
    for m in sorted(prev):
        if m in ids:
            for tp in prev[m]:
                if tp in set(parts):
                    owner.setdefault(tp, m)
    kept = [sum(1 for o in owner.values() if o == m) for m in ids]
    can_keep = sum(min(k, q) for k in kept) + min(extra, sum(1 for k in kept if k > q))
    moved_count = sum(1 for m, tps in result.items() for tp in tps if owner.get(tp) != m)
    assert moved_count == n - can_keep


@settings(max_examples=100, deadline=None)
@given(ids=member_ids, parts=partition_lists, data=st.data())
def test_member_leaving_moves_only_its_partitions(ids, parts, data):
    before = assign({m: None for m in ids}, parts, {})
    if len(ids) < 2:
        return
    leaver = data.draw(st.sampled_from(ids))
    after = assign({m: None for m in ids if m != leaver}, parts, before)
    assert moved(before, after) == set(before[leaver])


@settings(max_examples=100, deadline=None)
@given(ids=member_ids, parts=partition_lists)
def test_member_joining_moves_only_what_it_receives(ids, parts):
    before = assign({m: None for m in ids}, parts, {})
    after = assign({m: None for m in [*ids, "zz-new"]}, parts, before)
    n, m_count = len(set(parts)), len(ids) + 1
    assert moved(before, after) == set(after["zz-new"])
    assert n // m_count <= len(after["zz-new"]) <= -(-n // m_count)


def test_static_member_restart_keeps_its_partitions():
    parts = [("orders", p) for p in range(8)]
    before = assign({"s1": None, "s2": None, "s3": None}, parts, {})
    # s2 restarted within its session timeout: the same id, so the same partitions.
    assert assign({"s3": None, "s2": None, "s1": None}, parts, before) == before


def test_fresh_group_spreads_each_topic():
    parts = [(t, p) for t in ("a", "b") for p in range(4)]
    result = assign({"m1": None, "m2": None}, parts, {})
    assert result == {"m1": [("a", 0), ("a", 2), ("b", 0), ("b", 2)],
                      "m2": [("a", 1), ("a", 3), ("b", 1), ("b", 3)]}


def test_over_quota_owner_sheds_its_highest_partitions():
    parts = [("t", p) for p in range(6)]
    result = assign({"m1": None, "m2": None, "m3": None}, parts, {"m1": parts})
    assert result["m1"] == [("t", 0), ("t", 1)]
    assert sorted(result["m2"] + result["m3"]) == [("t", p) for p in range(2, 6)]


def test_mixed_subscriptions_are_respected_and_balanced_per_topic_set():
    members = {"x": MemberInfo(frozenset({"a"})), "y": MemberInfo(frozenset({"a", "b"})),
               "z": MemberInfo(frozenset({"b"}))}
    parts = [("a", p) for p in range(4)] + [("b", p) for p in range(4)] + [("c", 0)]
    result = assign(members, parts, {})
    check_exactly_once(result, [tp for tp in parts if tp[0] != "c"], members)
    assert len(result["x"]) == 2 and len(result["z"]) == 2 and len(result["y"]) == 4


@settings(max_examples=100, deadline=None)
@given(data=st.data(), ids=member_ids, parts=partition_lists)
def test_mixed_subscriptions_property(data, ids, parts):
    members = {m: (None if data.draw(st.booleans()) else
                   MemberInfo(frozenset(data.draw(st.lists(st.sampled_from(TOPICS), max_size=3)))))
               for m in ids}
    prev = data.draw(previous_for(ids, parts))
    result = assign(members, parts, prev)
    assignable = [tp for tp in parts if any(i is None or tp[0] in i.topics for i in members.values())]
    check_exactly_once(result, assignable, members)
    # Within the topics that one set of members shares, those members differ by at most one.
    shared: dict = {}
    for t in {t for t, _ in assignable}:
        who = frozenset(m for m, i in members.items() if i is None or t in i.topics)
        shared.setdefault(who, set()).add(t)
    for who, topics in shared.items():
        counts = [sum(1 for t, _ in result[m] if t in topics) for m in who]
        assert max(counts) - min(counts) <= 1


def test_keeping_in_one_topic_set_counts_when_extras_go_out_in_another():
    # m and mm take a and b; n takes only a. m keeps a0, so b0 goes to mm rather than piling on m.
    members = {"m": None, "n": MemberInfo(frozenset({"a"})), "mm": None}
    result = assign(members, [("a", 0), ("b", 0)], {"m": [("a", 0)]})
    assert result == {"m": [("a", 0)], "mm": [("b", 0)], "n": []}


def test_no_members_or_no_partitions():
    assert assign({}, [("t", 0)], {"gone": [("t", 0)]}) == {}
    assert assign({"m": None}, [], {"m": [("t", 0)]}) == {"m": []}
