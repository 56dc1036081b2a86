"""`zq.Client`: the entry point of the Python API, and the admin calls.

Theory of operation
-------------------
A Client owns one `Connection` (one I/O thread, one DEALER per node) and one metadata snapshot
(`zq.client.metadata.Metadata`). It starts from bootstrap addresses (the argument, then
`$ZQ_BOOTSTRAP`, then zeroconf discovery) and learns every node's address from the first
MetadataReply. Metadata is refreshed when something says it is stale (NotLeader, UnknownTopic, a
partition with no leader, a timeout), with bounded attempts over the known addresses; a
NotLeader that names the leader is followed at once through a per-partition *hint* that the next
refresh clears.

Admin requests (create, delete) go to any node; a node that is not the metadata leader answers
NotLeader with the leader's address, and the request is sent there instead (at most
`redirects_max` hops per attempt, attempts until `api_timeout_ms`). Producers and consumers
made by a client share its connection and metadata; closing the client closes them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
import time
from datetime import datetime
from typing import Any, Callable, NamedTuple

from zq import protocol
from zq.client.connection import Connection, check_reply
from zq.client.metadata import Metadata, parse_metadata, resolve_bootstrap, time_spec
from zq.core import client_rules
from zq.core.retry import BackoffPolicy
from zq.errors import (ConnectionFailed, InvalidRequest, LeaderNotAvailable, NotLeader, ProtocolError, Timeout,
                       UnknownTopic, ZqError)
from zq.limits import DEFAULT, Limits

log = logging.getLogger("zq.client")

metadata_attempts_max = 6          # addresses tried by one metadata refresh before it gives up
metadata_attempt_timeout_ms = 2_000  # one metadata request; short, so a dead node costs little
metadata_refresh_ms_min = 50       # refreshes asked for by the I/O thread are spaced at least this much
redirects_max = 3                  # NotLeader hops followed by one admin or offsets request
retry_notice_ms = 2_000            # a call retrying this long tells `on_waiting` (the CLI says it is waiting)
default_replication = 1            # see create_topic
COMPACT_NOT_BUILT = ("key compaction (compact = true) is not built yet, so a topic cannot ask for it; "
                     "leave it out (every message is kept until retention removes it)")


def _gave_up(error: ZqError, message: str) -> ZqError:
    """The same class of error as the last refusal, with the sentence that says how long we waited."""
    try:
        return type(error)(message, **error.data)
    except TypeError:   # a class with its own constructor: keep the error, reword its message
        error.message = message
        error.args = (message,)
        return error


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
        self._rng = random.Random()  # jitter of retries
        # Told once per call that has been retrying for `retry_notice_ms`: (what, last refusal, ms left).
        # The CLI prints it, so a command waiting out an election or an unreachable cluster says so.
        self.on_waiting: Callable[[str, str, float], None] | None = None
        self._backoff = BackoffPolicy(limits.retry_backoff_ms,
                                      max(limits.retry_backoff_ms, limits.retry_backoff_ms_max))
        if security is None and (os.environ.get("ZQ_CLUSTER_KEY") or os.environ.get("ZQ_CLIENT_KEY")):
            from zq.io.security import client_keys_from_env
            security = client_keys_from_env()
        self.bootstrap = resolve_bootstrap(bootstrap, cluster, discovery_timeout_s, interface)
        self._conn = Connection(limits, security=security)
        self._meta = Metadata()
        self._hints: dict[tuple[str, int], str] = {}
        self._preferred: str | None = None  # the address that answered last
        self._children: list[Any] = []  # producers and consumers, closed with the client
        self._children_lock = threading.Lock()
        self._closed = False
        self._metadata_timeout_ms = min(metadata_attempt_timeout_ms, limits.request_timeout_ms)
        # I/O thread only: coalesced background refresh.
        self._io_refreshing = False
        self._io_last_refresh_ms = 0.0
        self._io_refresh_attempt = 0

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
        self._refresh_until(lambda m: name in m.topics, self.limits.request_timeout_ms)
        return dict(reply.data)

    def delete_topic(self, name: str) -> dict:
        reply = self._admin(lambda rid: protocol.DeleteTopic(rid, name), f"deleting topic {name!r}")
        self._refresh_until(lambda m: name not in m.topics, self.limits.request_timeout_ms)
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
        reply, _ = self._call(address, protocol.DrainNode(self._conn.new_req_id(), wait_ms, leave),
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
        reply, _ = self._until_deadline("asking for the cluster status",
                                        lambda: self._call_any(lambda rid: protocol.StatusRequest(rid)))
        return check_reply(reply, protocol.StatusReply).status

    def list_offsets(self, topic: str, partition: int, spec: str | int | datetime = "latest") -> Offsets:
        """The offset for `spec` ("earliest", "latest", a datetime, or a time in ms: the first offset
        at or after that time, the high watermark when it is past everything)."""
        wire_spec = time_spec(spec)
        reply, _ = self._until_deadline(
            f"list_offsets of {topic}/{partition}",
            lambda: self._leader_call(topic, partition,
                                      lambda rid: protocol.ListOffsets(rid, topic, partition, wire_spec)))
        r = check_reply(reply, protocol.OffsetsReply)
        return Offsets(r.offset, r.log_start, r.high_watermark)

    # ------------------------------------------------------------------ metadata

    @property
    def metadata(self) -> Metadata:
        return self._meta

    def refresh_metadata(self) -> Metadata:
        """Ask the nodes for metadata, trying the known addresses in turn, until `api_timeout_ms`."""
        return self._until_deadline("fetching the cluster metadata", self._refresh_once)

    def _refresh_once(self) -> Metadata:
        """One round of metadata requests over the known addresses (bounded by metadata_attempts_max)."""
        reply, address = self._call_any(lambda rid: protocol.MetadataRequest(rid, None),
                                        attempt_timeout_ms=self._metadata_timeout_ms, with_address=True)
        self._set_metadata(parse_metadata(check_reply(reply, protocol.MetadataReply), address))
        return self._meta

    def _set_metadata(self, meta: Metadata) -> None:
        if meta.cluster and self.cluster and meta.cluster != self.cluster and self._meta.cluster == "":
            log.warning("nodes say cluster %r, this client was made for %r", meta.cluster, self.cluster)
        self._meta = meta
        self._hints = {}

    def _refresh_until(self, ok: Any, wait_ms: float) -> Metadata:
        """Refresh until `ok(metadata)` or `wait_ms` pass (the metadata may still be spreading)."""
        deadline = time.monotonic() + wait_ms / 1000.0
        attempt = 0
        while True:
            meta = self._refresh_once()
            if ok(meta) or time.monotonic() >= deadline:
                return meta
            attempt += 1
            time.sleep(min(self.limits.retry_backoff_ms * attempt, self.limits.retry_backoff_ms_max,
                           max(0.0, deadline - time.monotonic()) * 1000.0) / 1000.0)

    def _partition_count(self, topic: str, wait_ms: float) -> int:
        n = self._meta.partition_count(topic)
        if n is None:
            n = self._refresh_until(lambda m: topic in m.topics, wait_ms).partition_count(topic)
        if n is None:
            raise UnknownTopic(f"topic {topic!r} does not exist; create it with `zq topic create {topic}` "
                               f"or client.create_topic({topic!r}, partitions=N)")
        return n

    def _partitions_of(self, topic: str) -> list[int]:
        """Caller's thread: the topic's partitions, waiting out an unreachable cluster until
        `api_timeout_ms` (an unknown topic is raised after `request_timeout_ms`)."""
        return list(range(self._until_deadline(f"learning the partitions of {topic!r}",
                                               lambda: self._partition_count(topic, self.limits.request_timeout_ms))))

    def _leader_address(self, topic: str, partition: int) -> str | None:
        """Any thread: where to send requests for this partition now."""
        hint = self._hints.get((topic, partition))
        return hint if hint is not None else self._meta.leader_address(topic, partition)

    def _hint_leader(self, topic: str, partition: int, address: str) -> None:
        self._hints[(topic, partition)] = address  # one dict store: atomic under the GIL

    def _addresses(self) -> list[str]:
        out = []
        for a in ([self._preferred] if self._preferred else []) + self._meta.addresses() + self.bootstrap:
            if a not in out:
                out.append(a)
        return out

    def _io_refresh_metadata(self) -> None:
        """I/O thread: refresh in the background; many asks while one runs make one refresh."""
        if self._io_refreshing:
            return
        self._io_refreshing = True
        wait = self._io_last_refresh_ms + metadata_refresh_ms_min - time.monotonic() * 1000.0
        if wait > 0:
            self._conn.io_call_later(wait, self._io_send_refresh)
        else:
            self._io_send_refresh()

    def _io_send_refresh(self) -> None:
        addresses = self._addresses()
        address = addresses[self._io_refresh_attempt % len(addresses)]
        self._io_last_refresh_ms = time.monotonic() * 1000.0

        def done(reply: Any, frames: list, error: ZqError | None) -> None:
            self._io_refreshing = False
            if error is None:
                try:
                    self._set_metadata(parse_metadata(check_reply(reply, protocol.MetadataReply), address))
                    self._preferred = address
                    self._io_refresh_attempt = 0
                    return
                except ProtocolError as e:
                    error = e
            self._io_refresh_attempt += 1  # the next refresh asks the next address
            log.info("metadata refresh from %s failed: %s", address, error)

        self._conn.io_request(address, protocol.MetadataRequest(self._conn.new_req_id(), None),
                              (), self._metadata_timeout_ms, done)

    # ------------------------------------------------------------------ request helpers

    def _call(self, address: str, msg: Any, timeout_ms: float | None = None) -> tuple[Any, list]:
        timeout = self.limits.request_timeout_ms if timeout_ms is None else timeout_ms
        fut = self._conn.call(address, msg, (), timeout)
        # The connection times the request out itself; the extra second only guards against a stuck I/O thread.
        return fut.result(timeout / 1000.0 + 1.0)

    def _call_any(self, make: Any, attempt_timeout_ms: float | None = None, with_address: bool = False,
                  resend_on_timeout: bool = True) -> Any:
        """Send to the known nodes in turn until one answers (bounded); errors the node gives are raised.

        ConnectionFailed (nothing was sent) always moves on to the next node; Timeout (the node may
        have acted) only when `resend_on_timeout`, for requests that are safe to repeat."""
        last: ZqError | None = None
        addresses = self._addresses()
        for attempt in range(metadata_attempts_max):
            address = addresses[attempt % len(addresses)]
            try:
                reply, frames = self._call(address, make(self._conn.new_req_id()), attempt_timeout_ms)
            except (Timeout, ConnectionFailed) as e:
                last = e
                if self._conn.closed or (isinstance(e, Timeout) and not resend_on_timeout):
                    raise
                if attempt + 1 >= len(addresses):
                    time.sleep(min(self.limits.retry_backoff_ms * (attempt + 1), self.limits.retry_backoff_ms_max) / 1000.0)
                continue
            self._preferred = address
            return (reply, address) if with_address else (reply, frames)
        raise ConnectionFailed(f"no node of the cluster answered at {', '.join(addresses)} ({last}); "
                               "are the nodes running, and is the address right?")

    def _until_deadline(self, what: str, attempt: Any, idempotent: bool = True) -> Any:
        """`attempt()`, tried again after each passing refusal (zq.core.client_rules.is_passing) with
        a jittered backoff, until `api_timeout_ms` has passed; then the last error, saying how long
        it waited. `idempotent`: a Timeout (the node may have acted) is retried too."""
        started_ms = time.monotonic() * 1000.0
        failures = 0
        noticed = False
        while True:
            try:
                return attempt()
            except ZqError as e:
                if self._conn.closed or not client_rules.is_passing(e.code, e.retriable, isinstance(e, Timeout),
                                                                     idempotent):
                    raise
                failures += 1
                now = time.monotonic() * 1000.0
                delay = client_rules.retry_delay_ms(failures, started_ms, now, self.limits.api_timeout_ms,
                                                    self._backoff, self._rng.random())
                if delay is None:
                    raise _gave_up(e, client_rules.gave_up_message(what, now - started_ms, e.message)) from e
                if self.on_waiting is not None and not noticed and now - started_ms >= retry_notice_ms:
                    noticed = True
                    self.on_waiting(what, e.message, started_ms + self.limits.api_timeout_ms - now)
                log.info("%s: %s; retrying in %d ms", what, e.code, delay)
                time.sleep(delay / 1000.0)

    def _admin(self, make: Any, what: str = "the admin request") -> Any:
        """An admin request to the metadata leader, retried until `api_timeout_ms` while the
        cluster has none (an election, nodes starting). Not resent after a Timeout: the node may
        have acted on it, so the caller sees the Timeout."""
        return self._until_deadline(what, lambda: self._admin_once(make), idempotent=False)

    def _admin_once(self, make: Any) -> Any:
        """One admin request through any node, following NotLeader to the leader it names (bounded)."""
        address: str | None = None
        for hop in range(redirects_max + 1):
            try:
                if address is None:
                    reply, address = self._call_any(make, with_address=True, resend_on_timeout=False)
                else:
                    reply, _ = self._call(address, make(self._conn.new_req_id()))
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
        address = self._leader_address(topic, partition)
        if address is None:
            if self._partition_count(topic, self.limits.request_timeout_ms) <= partition:
                from zq.errors import UnknownPartition
                raise UnknownPartition(f"topic {topic!r} has no partition {partition}")
            self._refresh_once()
            address = self._leader_address(topic, partition)
            if address is None:
                raise LeaderNotAvailable(f"{topic}/{partition} has no leader right now (an election is under way)")
        try:
            return self._call(address, make(self._conn.new_req_id()))
        except NotLeader as e:
            hint = e.address
            if hint is None or hint == address:
                self._refresh_once()
                raise
            self._hint_leader(topic, partition, hint)
            return self._call(hint, make(self._conn.new_req_id()))
        except ZqError as e:
            if e.retriable:
                self._refresh_once()
            raise
