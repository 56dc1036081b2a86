"""`zq.Client`: the entry point of the Python API, and the admin calls.

Theory of operation
-------------------
A Client owns one `Connection` (one I/O thread, one DEALER per node) and one `ClusterView`
(zq.client.cluster: the metadata snapshot, leader hints, the known addresses, refreshes and
retries), through which it and its producers, consumers and group members reach the cluster. It
starts from bootstrap addresses (the argument, then `$ZQ_BOOTSTRAP`, then zeroconf discovery).

Admin requests (create, delete) go to any node; a node that is not the metadata leader answers
NotLeader with the leader's address, and the request is sent there instead (at most
`redirects_max` hops per attempt, attempts until `api_timeout_ms`). Producers and consumers
made by a client share its connection and metadata; closing the client closes them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from datetime import datetime
from typing import Any, Callable, NamedTuple

from zq import protocol
from zq.client.cluster import ClusterView
from zq.client.connection import Connection, check_reply
from zq.client.metadata import Metadata, resolve_bootstrap, time_spec
from zq.core.metadata import COMPACT_NOT_BUILT  # one sentence, said by the client and the node
from zq.errors import ConnectionFailed, InvalidRequest, LeaderNotAvailable, NotLeader, UnknownTopic, ZqError
from zq.limits import DEFAULT, Limits

log = logging.getLogger("zq.client")

redirects_max = 3                  # NotLeader hops followed by one admin or offsets request
default_replication = 1            # see create_topic


class Offsets(NamedTuple):
    """A ListOffsets answer: the offset asked for, and the partition's bounds now."""

    offset: int
    log_start: int
    high_watermark: int


class Client:
    """A connection to one zq cluster. Use as a context manager, or call close()."""

    def __init__(self, bootstrap: str | list[str] | None = None, cluster: str = "zq", limits: Limits = DEFAULT,
                 discovery_timeout_s: float = 3.0, interface: str | None = None, security: Any = None,
                 api_timeout_ms: int | None = None) -> None:
        """`security`: a zq.io.security.ClientKeys for a cluster with [security] (CurveZMQ); without
        it, the key files named by $ZQ_CLUSTER_KEY and $ZQ_CLIENT_KEY are used if set.

        `api_timeout_ms` (default `limits.api_timeout_ms`, 60,000): how long one call (creating a
        consumer, list_offsets, a seek_to_*, an admin call, joining a group) keeps retrying
        refusals that pass by themselves, such as an election, before it raises."""
        self.cluster = cluster
        if api_timeout_ms is not None:
            if type(api_timeout_ms) is not int or api_timeout_ms < 0:
                raise ValueError("api_timeout_ms is a whole number of milliseconds, 0 or more")
            limits = dataclasses.replace(limits, api_timeout_ms=api_timeout_ms)
        self.limits = limits
        if security is None and (os.environ.get("ZQ_CLUSTER_KEY") or os.environ.get("ZQ_CLIENT_KEY")):
            from zq.io.security import client_keys_from_env
            security = client_keys_from_env()
        self.bootstrap = resolve_bootstrap(bootstrap, cluster, discovery_timeout_s, interface)
        self._conn = Connection(limits, security=security)
        # Told once per call that has been retrying for 2 s: (what, last refusal, ms left). The CLI
        # prints it, so a command waiting out an election or an unreachable cluster says so.
        self.on_waiting: Callable[[str, str, float], None] | None = None
        # What this client knows of the cluster and how it asks (leaders, addresses, refreshes,
        # retries): its producers, consumers and group members reach the cluster through it.
        self.cluster_view = self._view = ClusterView(self._conn, limits, cluster, self.bootstrap, self._waiting)
        self._children: list[Any] = []  # producers and consumers, closed with the client
        self._children_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self, timeout: float | None = 5.0) -> None:
        """Flush and close every producer and consumer of this client, then the connection."""
        if self._closed:
            return
        self._closed = True
        with self._children_lock:
            children = list(self._children)
            self._children.clear()
        for child in children:
            try:
                child.close(timeout) if hasattr(child, "flush") else child.close()
            except ZqError as e:
                log.warning("closing %r: %s", child, e)
        self._conn.close()

    # ------------------------------------------------------------------ factories

    def producer(self, acks: Any = "quorum", idempotent: bool = False, linger_ms: float = 5, **options: Any):
        """A Producer; options: batch_size, compression, max_block_ms, buffer_bytes, request_timeout_ms,
        retries, max_in_flight (see zq.client.producer)."""
        from zq.client.producer import Producer
        p = Producer(self, acks=acks, idempotent=idempotent, linger_ms=linger_ms, **options)
        self._adopt(p)
        return p

    def consumer(self, topic: str, group: str | None = None, start: Any = None,
                 partitions: list[int] | None = None, **options: Any):
        """A Consumer of every partition of `topic` (or `partitions`) from `start` (default latest);
        with `group`, a GroupConsumer (zq.client.groups) whose group, when it has nothing committed,
        starts at `start` (default earliest)."""
        if group is not None:
            from zq.client.groups import GroupConsumer
            c: Any = GroupConsumer(self, topic, group, start=start, partitions=partitions, **options)
            self._adopt(c)
            return c
        from zq.client.consumer import Consumer
        c = Consumer(self, topic, group=group, start="latest" if start is None else start, partitions=partitions,
                     **options)
        self._adopt(c)
        return c

    def _adopt(self, child: Any) -> None:
        with self._children_lock:
            if self._closed:
                raise ConnectionFailed("the client is closed; create a new zq.Client")
            self._children.append(child)

    # ------------------------------------------------------------------ admin

    def create_topic(self, name: str, partitions: int = 1, replication: int = default_replication,
                     **config: Any) -> dict:
        """Create a topic; returns {"topic": name, "id": topic_id}.

        `replication` defaults to 1: a node refuses a factor above the live nodes, so a default of
        3 would fail on a one-node cluster. Pass replication=3 for durability on a real cluster.
        `config` holds topic settings (retention, retention_bytes, max_deliveries, durability, ...)."""
        if not isinstance(name, str) or not name:
            raise ValueError("a topic name is a non-empty string")
        if type(partitions) is not int or partitions < 1 or type(replication) is not int or replication < 1:
            raise ValueError("partitions and replication are positive integers")
        if config.get("compact"):
            raise InvalidRequest(COMPACT_NOT_BUILT)
        reply = self._admin(lambda rid: protocol.CreateTopic(rid, name, partitions, replication, dict(config)),
                            f"creating topic {name!r}")
        self._view.refresh_until(lambda m: name in m.topics, self.limits.request_timeout_ms)
        return dict(reply.data)

    def delete_topic(self, name: str) -> dict:
        reply = self._admin(lambda rid: protocol.DeleteTopic(rid, name), f"deleting topic {name!r}")
        self._view.refresh_until(lambda m: name not in m.topics, self.limits.request_timeout_ms)
        return dict(reply.data)

    def reassign_partition(self, topic: str, partition: int, replicas: list[str]) -> dict:
        """Set the target replica set of one partition (preferred leader first). Returns once the
        change is logged in the cluster metadata; the partition's leader then moves it one replica at
        a time (a new replica catches up before it counts, the set never drops below a quorum).
        `status()` shows progress: a partition is done when its `replicas` equal its `target`."""
        if type(partition) is not int or partition < 0:
            raise ValueError("partition is a non-negative integer")
        if not replicas or not all(isinstance(r, str) and r for r in replicas):
            raise ValueError("replicas is a non-empty list of node names")
        reply = self._admin(lambda rid: protocol.ReassignPartition(rid, topic, partition, list(replicas)),
                            f"reassigning {topic}/{partition}")
        return dict(reply.data)

    def drain_node(self, name: str, wait_s: float = 10.0, leave: bool = False) -> dict:
        """Ask node `name` to hand every partition it leads to another in-sync replica and to stop
        standing for election; with `leave`, it then leaves the cluster and stops. Returns
        {"node", "led_before", "led_after", "still_leading", "leaving"} after at most `wait_s`."""
        address = self.refresh_metadata().nodes.get(name)
        if address is None:
            raise InvalidRequest(f"node {name!r} is not a member of the cluster; `zq status` lists the nodes")
        wait_ms = max(0, int(wait_s * 1000))
        reply, _ = self._view.call(address, protocol.DrainNode(self._conn.new_req_id(), wait_ms, leave),
                                   timeout_ms=wait_ms + self.limits.request_timeout_ms)
        return dict(check_reply(reply, protocol.OkReply).data)

    def topics(self) -> list[dict]:
        """Every topic, by name: [{"name", "id", "partitions": count, "replication", "config"}]."""
        meta = self.refresh_metadata()
        out = []
        for name in sorted(meta.topics):
            t = meta.topics[name]
            parts = t["partitions"]
            replication = len(parts[0].get("replicas") or []) if parts else 0
            out.append({"name": name, "id": t["id"], "partitions": len(parts), "replication": replication,
                        "config": dict(t["config"])})
        return out

    def describe_topic(self, name: str) -> dict:
        """{"name", "partitions": [status partition objects], "config"}, as `zq topic describe --json`.

        Log positions come from each partition leader's status; a leader that does not answer
        leaves them None."""
        meta = self.refresh_metadata()
        t = meta.topics.get(name)
        if t is None:
            raise UnknownTopic(f"topic {name!r} does not exist; `zq topic list` shows the topics")
        leaders = sorted({meta.nodes[p["leader"]] for p in t["partitions"] if p.get("leader") in meta.nodes})
        futures = {a: self._conn.call(a, protocol.StatusRequest(self._conn.new_req_id())) for a in leaders}
        by_partition: dict[tuple[str, int], dict] = {}
        for address, fut in futures.items():
            try:
                reply, _ = fut.result(self.limits.request_timeout_ms / 1000.0 + 1.0)
                status = check_reply(reply, protocol.StatusReply).status
            except ZqError as e:
                log.info("status from %s: %s", address, e)
                continue
            for p in status.get("partitions", []) if isinstance(status, dict) else []:
                if isinstance(p, dict) and p.get("topic") == name and meta.leader_address(name, p.get("partition", -1)) == address:
                    by_partition[(name, p["partition"])] = p
        partitions = []
        for p in t["partitions"]:
            entry = {"topic": name, "partition": p["partition"], "leader": p.get("leader"), "epoch": p.get("epoch"),
                     "replicas": list(p.get("replicas") or []), "in_sync": None, "log_start": None,
                     "log_end": None, "high_watermark": None, "replication_lag": None}
            entry.update(by_partition.get((name, p["partition"]), {}))
            partitions.append(entry)
        return {"name": name, "partitions": partitions, "config": dict(t["config"])}

    def status(self) -> dict:
        """The `zq status --json` document, from the first node that answers."""
        reply, _ = self._view.until_deadline("asking for the cluster status",
                                             lambda: self._view.call_any(lambda rid: protocol.StatusRequest(rid)))
        return check_reply(reply, protocol.StatusReply).status

    def list_offsets(self, topic: str, partition: int, spec: str | int | datetime = "latest") -> Offsets:
        """The offset for `spec` ("earliest", "latest", a datetime, or a time in ms: the first offset
        at or after that time, the high watermark when it is past everything)."""
        wire_spec = time_spec(spec)
        reply, _ = self._view.until_deadline(
            f"list_offsets of {topic}/{partition}",
            lambda: self._leader_call(topic, partition,
                                      lambda rid: protocol.ListOffsets(rid, topic, partition, wire_spec)))
        r = check_reply(reply, protocol.OffsetsReply)
        return Offsets(r.offset, r.log_start, r.high_watermark)

    # ------------------------------------------------------------------ metadata

    def _waiting(self, what: str, refusal: str, left_ms: float) -> None:
        if self.on_waiting is not None:
            self.on_waiting(what, refusal, left_ms)

    @property
    def metadata(self) -> Metadata:
        return self._view.metadata

    def refresh_metadata(self) -> Metadata:
        """Ask the nodes for metadata, trying the known addresses in turn, until `api_timeout_ms`."""
        return self._view.until_deadline("fetching the cluster metadata", self._view.refresh)

    def _admin(self, make: Any, what: str = "the admin request") -> Any:
        """An admin request to the metadata leader, retried until `api_timeout_ms` while the
        cluster has none (an election, nodes starting). Not resent after a Timeout: the node may
        have acted on it, so the caller sees the Timeout."""
        return self._view.until_deadline(what, lambda: self._admin_once(make), idempotent=False)

    def _admin_once(self, make: Any) -> Any:
        """One admin request through any node, following NotLeader to the leader it names (bounded)."""
        address: str | None = None
        for hop in range(redirects_max + 1):
            try:
                if address is None:
                    reply, address = self._view.call_any(make, with_address=True, resend_on_timeout=False)
                else:
                    reply, _ = self._view.call(address, make(self._conn.new_req_id()))
                return check_reply(reply, protocol.OkReply)
            except NotLeader as e:
                hint = e.address
                if hop == redirects_max or hint is None or hint == address:
                    raise
                address = hint
        raise AssertionError("unreachable: the last hop returns or raises")

    def _leader_call(self, topic: str, partition: int, make: Any) -> tuple[Any, list]:
        """One request to the partition's leader, following one NotLeader hint; a refusal that
        passes (no leader now, NotLeader) is raised for `_until_deadline` to retry, after
        refreshing what this client knows."""
        address = self._view.leader_address(topic, partition)
        if address is None:
            if self._view.partition_count(topic, self.limits.request_timeout_ms) <= partition:
                from zq.errors import UnknownPartition
                raise UnknownPartition(f"topic {topic!r} has no partition {partition}")
            self._view.refresh()
            address = self._view.leader_address(topic, partition)
            if address is None:
                raise LeaderNotAvailable(f"{topic}/{partition} has no leader right now (an election is under way)")
        try:
            return self._view.call(address, make(self._conn.new_req_id()))
        except NotLeader as e:
            hint = e.address
            if hint is None or hint == address:
                self._view.refresh()
                raise
            self._view.hint_leader(topic, partition, hint)
            return self._view.call(hint, make(self._conn.new_req_id()))
        except ZqError as e:
            if e.retriable:
                self._view.refresh()
            raise
