"""Stable hashes: which partition a key goes to, and which nodes hold a partition.

Key to partition: `crc32(key) mod P`, zlib's CRC-32 (the IEEE polynomial, as in Ethernet and
gzip). It is part of the contract: it never changes between versions, so the same key always
reaches the same partition of a topic whose partition count is unchanged.

Placement: rendezvous (highest random weight) hashing. Each node gets the score
`blake2b(topic/partition/node)`; the replica set is the R nodes with the highest scores, and the
first of them is the preferred leader. Adding a node moves only the partitions it now wins.
"""
from __future__ import annotations

import hashlib
import zlib


def partition_for_key(key: bytes, partitions: int) -> int:
    return (zlib.crc32(key) & 0xFFFFFFFF) % partitions


def _score(topic: str, partition: int, node: str) -> bytes:
    return hashlib.blake2b(f"{topic}/{partition}/{node}".encode(), digest_size=8).digest()


def rendezvous(topic: str, partition: int, nodes: list[str], replicas: int) -> list[str]:
    """The `replicas` nodes that hold `topic/partition`, preferred leader first."""
    if replicas > len(nodes):
        raise ValueError(f"{replicas} replicas asked of {len(nodes)} nodes")
    ranked = sorted(nodes, key=lambda n: (_score(topic, partition, n), n), reverse=True)
    return ranked[:replicas]


def place_topic(topic: str, partitions: int, nodes: list[str], replicas: int) -> list[list[str]]:
    """Replica sets for every partition of a new topic.

    Pure rendezvous hashing can stack many leaders on one node for small clusters, so the
    preferred leaders are then balanced: partitions are visited in order and each takes as
    leader the member of its replica set that leads the fewest partitions so far (ties keep the
    rendezvous order). Replica sets themselves stay exactly the rendezvous choice."""
    counts = {n: 0 for n in nodes}
    out = []
    for p in range(partitions):
        rs = rendezvous(topic, p, nodes, replicas)
        leader = min(rs, key=lambda n: (counts[n], rs.index(n)))
        counts[leader] += 1
        rs.remove(leader)
        out.append([leader, *rs])
    return out
