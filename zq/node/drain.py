"""`zq node drain`, decided without I/O: what a drain hands off, when it is done, what it answers.

A drained node stops standing for election on every replica it holds (`set_draining`: the cores
hand each partition it leads to the most caught-up voter, by TimeoutNow). The drain is done when
the node leads no partition another voter could lead instead, or when its wait ran out; it then
answers (how many it led before, how many it still leads, which) and, with leave, the node stops
LEAVE_AFTER_ANSWER_MS later, so the answer goes out first. The host (zq/io/node_drain.py) asks
`check_drain` every DRAIN_CHECK_MS until it says done; tests/test_meta_follower.py drives it
against real replication cores.

Standard library only.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from zq.core.repl_types import LEADER

DRAIN_CHECK_MS = 20               # how often a drain looks whether leadership has moved away
LEAVE_AFTER_ANSWER_MS = 100       # a drained node stops this long after its answer, so the answer goes out


@dataclass(frozen=True, slots=True)
class PendingDrain:
    req_id: int
    deadline_ms: int
    answer_to: Any                # the host's address of whoever asked (a client identity)
    led_before: int
    leave: bool


@dataclass(frozen=True, slots=True)
class DrainCheck:
    done: bool
    next_check_ms: int | None = None     # not done: look again then
    answer: dict | None = None           # done: the reply's body
    leave_at_ms: int | None = None       # done, with leave: stop the node then


def led_elsewhere_possible(parts: Mapping[Hashable, Any]) -> list[Hashable]:
    """Partitions this node leads that another voter could lead instead (zq.node.replicas.Part)."""
    return [tp for tp, part in parts.items()
            if part.replica is not None and part.replica.role == LEADER and len(part.replica.voters) > 1]


def start_drain(parts: Mapping[Hashable, Any], req_id: int, answer_to: Any, wait_ms: int, wait_max_ms: int,
                leave: bool, now_ms: int) -> tuple[PendingDrain, list[Hashable]]:
    """A drain begins: (its pending state, the replicas to set draining: every one held here).
    The wait is bounded by `wait_max_ms`."""
    wait_ms = max(0, min(wait_ms, wait_max_ms))
    drain = PendingDrain(req_id, now_ms + wait_ms, answer_to, len(led_elsewhere_possible(parts)), leave)
    return drain, [tp for tp, part in parts.items() if part.replica is not None]


def check_drain(drain: PendingDrain, me: str, parts: Mapping[Hashable, Any], now_ms: int) -> DrainCheck:
    """Is the drain done (nothing led that another voter could lead, or the wait ran out)?"""
    still = led_elsewhere_possible(parts)
    if still and now_ms < drain.deadline_ms:
        return DrainCheck(False, now_ms + DRAIN_CHECK_MS)
    names = [f"{parts[tp].name}/{tp.partition}" for tp in still]
    answer = {"node": me, "led_before": drain.led_before, "led_after": len(still), "still_leading": names,
              "leaving": drain.leave}
    return DrainCheck(True, None, answer, now_ms + LEAVE_AFTER_ANSWER_MS if drain.leave else None)
