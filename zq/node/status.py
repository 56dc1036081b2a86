"""`zq status`, the metadata answer and /metrics, decided without I/O: pure functions of the
node's state. The host (zq/io/node_status.py, zq/io/node_meta.py) gathers what they read (its
replicas, its applied metadata, what it heard from its peers, the append times of stored
batches) and sends what they return.

- A leader's row of a partition: its replicas, learners, log bounds, and which replicas are in
  sync (as Kafka's ISR): heard within `alive_ms`, and holding everything but what is younger than
  IN_SYNC_LAG_MS (an exact "holds the high watermark" flickers under a steady load).
- The cluster's picture: for each partition, the row of the highest epoch any node reported
  (a node that answered is alive), or an "unknown" row when no leader answered.

Standard library only (zq.batch's header reading is pure).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from zq import batch as zbatch
from zq.core.repl_types import LEADER
from zq.types import META_TOPIC, META_TP, TopicPartition

STATUS_WAIT_MS = 400              # how long `zq status` waits for the other nodes' local views
IN_SYNC_LAG_MS = 1_000            # a replica lacking only batches younger than this is in sync


def age_of_first_batch_ms(values: Iterable[bytes], wall_now_ms: int, skip_control: bool) -> int:
    """How long ago the first stored batch of `values` was appended (0 if none). With
    `skip_control`, batches stamped 0 (markers, configurations) are passed over; without it,
    a first batch stamped 0 gives 0."""
    for value in values:
        append_ms = zbatch.unpack_header(value).append_time_ms
        if append_ms:
            return max(0, wall_now_ms - append_ms)
        if not skip_control:
            return 0
    return 0


def leader_row(me: str, tp: TopicPartition, part: Any, now_ms: int, alive_ms: int,
               missing_for_ms: Callable[[TopicPartition, int], int],
               lag_ms: Callable[[TopicPartition, int, int], int]) -> dict | None:
    """The row of a partition this node leads (None if it does not lead it). `missing_for_ms(tp,
    end)`: how long a replica holding the log up to `end` has lacked data; `lag_ms(tp, slowest,
    log_end)`: how old the oldest batch is that some replica lacks."""
    r = part.replica
    if r is None or r.role != LEADER:
        return None
    progress = r.replica_progress()
    in_sync = sorted(name for name, (end, heard_ms) in progress.items()
                     if name == me or (name in r.voters and now_ms - heard_ms <= alive_ms and (
                         end >= r.high_watermark or missing_for_ms(tp, end) <= IN_SYNC_LAG_MS)))
    slowest = min((end for end, _ in progress.values()), default=r.log_end)
    return {"topic": part.name, "partition": tp.partition, "leader": me, "epoch": r.epoch,
            "replicas": list(r.voters), "learners": list(r.learners), "in_sync": in_sync,
            "log_start": part.log_start, "log_end": r.log_end, "high_watermark": r.high_watermark,
            "replication_lag": r.log_end - slowest, "replication_lag_ms": lag_ms(tp, slowest, r.log_end)}


def local_partitions_view(me: str, parts: Mapping[Hashable, Any], now_ms: int, alive_ms: int,
                          missing_for_ms: Callable[[TopicPartition, int], int],
                          lag_ms: Callable[[TopicPartition, int, int], int]) -> list[dict]:
    """The partitions this node leads, with what only their leader knows."""
    rows = (leader_row(me, tp, part, now_ms, alive_ms, missing_for_ms, lag_ms) for tp, part in sorted(parts.items()))
    return [row for row in rows if row is not None]


def unknown_row(topic: str, partition: int, replicas: list[str]) -> dict:
    """A partition whose leader did not answer: no leader, nothing known of its log."""
    return {"topic": topic, "partition": partition, "leader": None, "epoch": None, "replicas": replicas,
            "learners": [], "in_sync": [], "log_start": None, "log_end": None, "high_watermark": None,
            "replication_lag": None, "replication_lag_ms": None}


def nodes_view(me: str, my_host: str, my_port: int, meta_nodes: Iterable[str], addresses: Mapping[str, str],
               state_of: Callable[[str], str], last_seen_ago_ms: Callable[[str], int | None]) -> list[dict]:
    """Every node this one knows of, with its address and state. A node heard from but not yet
    in `__meta` is "joining": it cannot be given partitions yet."""
    out = []
    meta_nodes = set(meta_nodes)
    for name in sorted(meta_nodes | set(addresses) | {me}):
        if name == me:
            host, port = my_host, my_port
        else:
            host, port = addresses.get(name, "?:0").rsplit(":", 1)
        state = state_of(name)
        if name not in meta_nodes and name != me and state == "alive":
            state = "joining"
        out.append({"name": name, "host": host, "port": int(port), "state": state,
                    "last_seen_ms": last_seen_ago_ms(name)})
    return out


def topics_view(meta: Any, names: list | None, voters: Iterable[str],
                leader_of: Callable[[TopicPartition], tuple[str | None, int]]) -> list[dict]:
    """The metadata answer's topics: `__meta` first, then every topic (or those in `names`)."""
    leader, epoch = leader_of(META_TP)
    out = [{"name": META_TOPIC, "id": 0, "config": {},
            "partitions": [{"partition": 0, "leader": leader, "epoch": epoch, "replicas": list(voters)}]}]
    for t in sorted(meta.topics.values(), key=lambda t: t.name):
        if names is not None and t.name not in names:
            continue
        parts = []
        for p, r in enumerate(t.partitions):
            leader, epoch = leader_of(TopicPartition(t.id, p))
            parts.append({"partition": p, "leader": leader, "epoch": epoch, "replicas": r})
        out.append({"name": t.name, "id": t.id, "config": t.config, "partitions": parts})
    return out


def status_doc(cluster: str, me: str, metadata_leader: str | None, views: Mapping[str, list[dict]], meta: Any,
               voters: Iterable[str], nodes: list[dict]) -> dict:
    """The whole cluster's picture from the local views of the nodes that answered (`views`:
    node -> its leader rows) and this node's metadata and view of the nodes (`nodes_view`)."""
    seen: dict[tuple[str, int], dict] = {}
    for rows in views.values():
        for row in rows:
            key = (row["topic"], row["partition"])
            if key not in seen or row["epoch"] > seen[key]["epoch"]:
                seen[key] = row
    partitions = [seen.get((META_TOPIC, 0)) or unknown_row(META_TOPIC, 0, list(voters))]
    for t in sorted(meta.topics.values(), key=lambda t: t.name):
        for p, replicas in enumerate(t.partitions):
            partitions.append(seen.get((t.name, p)) or unknown_row(t.name, p, replicas))
    for row in partitions:
        row["under_replicated"] = len(row["in_sync"]) < len(row["replicas"])
        t = meta.topics.get(row["topic"])
        target = t.partitions[row["partition"]] if t is not None else row["replicas"]
        row["target"] = list(target)
        row["moving"] = sorted(target) != sorted(row["replicas"])
        row.setdefault("learners", [])
    out_nodes = []
    for n in nodes:
        answered = n["name"] in views
        out_nodes.append({"name": n["name"], "address": f"{n['host']}:{n['port']}",
                          "state": "alive" if answered and n["state"] != "joining" else n["state"],
                          "last_seen_ms": 0 if answered else n["last_seen_ms"]})
    return {"cluster": cluster, "node": me, "metadata_leader": metadata_leader, "nodes": out_nodes,
            "partitions": partitions}


class StatusGather:
    """`zq status` on one node: its own view, then each other node's, until all answered or the
    wait (STATUS_WAIT_MS) ran out; `finish` gives the views once."""

    def __init__(self, me: str, own_view: list[dict], others: list[str]) -> None:
        self.views: dict[str, list[dict]] = {me: own_view}
        self.left = len(others)
        self.done = False

    def answered(self, name: str, partitions: list[dict] | None) -> bool:
        """A node answered (`partitions`), or failed to (None). True: every node has, finish now."""
        if partitions is not None:
            self.views[name] = partitions
        self.left -= 1
        return self.left <= 0

    def finish(self) -> dict[str, list[dict]] | None:
        """The views, the first time only (None after)."""
        if self.done:
            return None
        self.done = True
        return self.views
