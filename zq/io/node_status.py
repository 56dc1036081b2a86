"""`zq status` and metrics: this node's view of its partitions (lag, missing data), the whole
cluster's picture gathered from every node, and the /metrics snapshot.
"""
from __future__ import annotations

from typing import Any

from zq import batch as zbatch
from zq import protocol as P
from zq.core.repl_types import LEADER
from zq.errors import ZqError
from zq.types import META_TOPIC, META_TP, TopicPartition
from zq.io.node_common import (IN_SYNC_LAG_MS, IN_SYNC_READ_BYTES, METRICS_REFRESH_MS, NODE_ALIVE_MS, STATUS_WAIT_MS,
                               mono_ms, now_ms)


class StatusMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    def on_status(self, identity: bytes, msg: P.StatusRequest, payload: list[bytes]) -> None:
        """Gather every reachable node's local view (bounded wait), then answer with the whole picture."""
        views: dict[str, list] = {self.name: self._local_partitions_view()}
        others = [n for n in sorted(set(self.meta.nodes) | set(self.addresses)) if n != self.name]
        state = {"left": len(others), "done": False}

        def finish() -> None:
            if not state["done"]:
                state["done"] = True
                self._send(identity, P.encode(P.StatusReply(msg.req_id, self._status_doc(views))))

        def on_reply(name: str, reply: Any, _payload: list) -> None:
            if isinstance(reply, P.LocalStatusReply):
                views[name] = reply.partitions
            state["left"] -= 1
            if state["left"] <= 0:
                finish()

        for name in others:
            self._request(name, P.LocalStatusRequest(next(self._req_ids)),
                          lambda r, pl, name=name: on_reply(name, r, pl), timeout_ms=STATUS_WAIT_MS)
        if not others:
            finish()
        else:
            self._at(mono_ms() + STATUS_WAIT_MS + 50, finish)

    def on_local_status(self, identity: bytes, msg: P.LocalStatusRequest, payload: list[bytes]) -> None:
        self._send(identity, P.encode(P.LocalStatusReply(
            msg.req_id, {"name": self.name, "address": self.config.address, "incarnation": self.incarnation,
                         "started_ms": self.started_ms}, self._local_partitions_view())))

    def _local_partitions_view(self) -> list[dict]:
        """The partitions this node leads, with what only their leader knows."""
        out = []
        now = mono_ms()
        for tp, part in sorted(self.parts.items()):
            r = part.replica
            if r is None or r.role != LEADER:
                continue
            progress = r.replica_progress()
            # In sync (as Kafka's ISR): heard lately, and holding everything but what is younger than
            # IN_SYNC_LAG_MS; an exact "holds the high watermark" flickers under a steady load.
            in_sync = sorted(name for name, (end, heard_ms) in progress.items()
                             if name == self.name or (name in r.voters and now - heard_ms <= NODE_ALIVE_MS and (
                                 end >= r.high_watermark or self._missing_for_ms(tp, end) <= IN_SYNC_LAG_MS)))
            slowest = min((end for end, _ in progress.values()), default=r.log_end)
            out.append({"topic": part.name, "partition": tp.partition, "leader": self.name, "epoch": r.epoch,
                        "replicas": list(r.voters), "learners": list(r.learners), "in_sync": in_sync,
                        "log_start": part.log_start,
                        "log_end": r.log_end, "high_watermark": r.high_watermark,
                        "replication_lag": r.log_end - slowest,
                        "replication_lag_ms": self._lag_ms(tp, slowest, r.log_end)})
        return out

    def _missing_for_ms(self, tp: TopicPartition, end: int) -> int:
        """How long ago the first produced batch from `end` on was appended: how long a replica
        that holds the log up to `end` has lacked data. Control batches (markers, configurations,
        append time 0) do not count; nothing after `end` on this disk yet is 0."""
        try:
            for value in self.store.read(tp, end, IN_SYNC_READ_BYTES):
                append_ms = zbatch.unpack_header(value).append_time_ms
                if append_ms:
                    return max(0, now_ms() - append_ms)
        except ZqError:
            pass
        return 0

    def _lag_ms(self, tp: TopicPartition, slowest_end: int, log_end: int) -> int:
        """How old the oldest batch is that some replica does not hold yet (0 when all hold all)."""
        if slowest_end >= log_end:
            return 0
        try:
            values = self.store.read(tp, slowest_end, 1)
            if values:
                append_ms = zbatch.unpack_header(values[0]).append_time_ms
                return max(0, now_ms() - append_ms) if append_ms else 0
        except ZqError:
            pass
        return 0   # not yet on this node's disk either: younger than a loop pass

    def _status_doc(self, views: dict[str, list]) -> dict:
        seen: dict[tuple[str, int], dict] = {}
        for rows in views.values():
            for row in rows:
                key = (row["topic"], row["partition"])
                if key not in seen or row["epoch"] > seen[key]["epoch"]:
                    seen[key] = row
        partitions = [seen.get((META_TOPIC, 0)) or self._unknown_row(META_TOPIC, 0, list(self.voters))]
        for t in sorted(self.meta.topics.values(), key=lambda t: t.name):
            for p, replicas in enumerate(t.partitions):
                partitions.append(seen.get((t.name, p)) or self._unknown_row(t.name, p, replicas))
        for row in partitions:
            row["under_replicated"] = len(row["in_sync"]) < len(row["replicas"])
            t = self.meta.topics.get(row["topic"])
            target = t.partitions[row["partition"]] if t is not None else row["replicas"]
            row["target"] = list(target)
            row["moving"] = sorted(target) != sorted(row["replicas"])
            row.setdefault("learners", [])
        nodes = []
        for n in self._nodes_view():
            answered = n["name"] in views
            nodes.append({"name": n["name"], "address": f"{n['host']}:{n['port']}",
                          "state": "alive" if answered and n["state"] != "joining" else n["state"],
                          "last_seen_ms": 0 if answered else n["last_seen_ms"]})
        return {"cluster": self.config.cluster, "node": self.name, "metadata_leader": self.leader_of(META_TP)[0],
                "nodes": nodes, "partitions": partitions}

    @staticmethod
    def _unknown_row(topic: str, partition: int, replicas: list[str]) -> dict:
        """A partition whose leader did not answer: no leader, nothing known of its log."""
        return {"topic": topic, "partition": partition, "leader": None, "epoch": None, "replicas": replicas,
                "learners": [], "in_sync": [], "log_start": None, "log_end": None, "high_watermark": None, "replication_lag": None,
                "replication_lag_ms": None}

    def _refresh_metrics(self) -> None:
        if self.authenticator is not None:
            # The ZAP handler's thread counts CurveZMQ handshakes; the node's counters show them.
            auth = dict(self.authenticator.counters)
            self.counters["curve_allowed"] = auth["allowed"]
            self.counters["curve_refused"] = auth["refused"]
        if self.config.metrics:
            self.metrics_rows = self._local_partitions_view()
            group_rows = []
            for service in self.services:
                rows = getattr(service, "metrics_rows", None)
                if rows is not None:
                    try:
                        group_rows += rows()
                    except ZqError:
                        pass   # a partition changed hands mid-way: the next refresh has it
            self.group_metrics_rows = group_rows
            self._at(mono_ms() + METRICS_REFRESH_MS, self._refresh_metrics)
