"""Cluster founding, decided without I/O: which waiting node founds a new cluster.

A node started with no voters (no topology, no seed that knows a cluster) waits FOUND_WAIT_MS
for an answer from a seed or a discovered peer. If none knows a cluster by then, the
lowest-named node among those waiting (itself and the peers it heard from lately) founds one,
holding the metadata alone; every other waiting node asks those peers again and learns the
cluster from the founder. The decision is this module's; zq/io/node.py acts on it.

Standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

FOUND_WAIT_MS = 3_000             # a node with no voters and no answer by then may found the cluster


@dataclass(frozen=True, slots=True)
class FoundDecision:
    found: bool                   # this node founds the cluster now (it becomes the only voter)
    ask: tuple[str, ...] = ()     # else: the waiting peers to ask again, in order
    retry_ms: int = 0             # ... and how long until the decision is taken again (0: never)


def decide_founding(me: str, known_voters: Iterable[str], alive_peers: Iterable[str], stopping: bool = False,
                    wait_ms: int = FOUND_WAIT_MS) -> FoundDecision:
    """What a node that has waited for a cluster does now. `alive_peers`: the nodes it heard
    from lately (heartbeats, seeds, discovery), itself excluded or not."""
    if tuple(known_voters) or stopping:
        return FoundDecision(False)    # a cluster was found (or we stop): nothing more to decide
    waiting = sorted({me, *alive_peers})
    if waiting[0] == me:
        return FoundDecision(True)
    return FoundDecision(False, tuple(n for n in waiting if n != me), wait_ms // 2)
