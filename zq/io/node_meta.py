"""The `__meta` partition as the node uses it: metadata requests, topic changes, applying committed
commands, and, on a node that does not vote, following `__meta` by long-poll fetch; founding a
cluster (the decision: zq.node.founding) and registering this node.
"""
from __future__ import annotations

from typing import Any, Callable

import cbor2
import zmq

from zq import batch as zbatch
from zq import protocol as P
from zq.core import metadata as meta
from zq.core.repl_types import COMMITTED, LEADER
from zq.errors import NotLeader, UnknownTopic, ZqError
from zq.io import replicas as R
from zq.node.founding import FOUND_WAIT_MS, decide_founding
from zq.node.replicas import Part as _Part
from zq.types import META_TOPIC, META_TP, TopicPartition
from zq.io.node_common import (FETCH_PENDING_SWEEP_MS, META_FETCH_WAIT_MS, META_RETRY_MS, PEER_REQUEST_TIMEOUT_MS,
                               PENDING_ADMIN_MAX, log, mono_ms, now_ms)


class MetaMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    def on_metadata(self, identity: bytes, msg: P.MetadataRequest, payload: list[bytes]) -> None:
        self._send(identity, P.encode(P.MetadataReply(msg.req_id, self.config.cluster, self._nodes_view(),
                                                      self._topics_view(msg.topics))))

    def _topics_view(self, names: list | None) -> list[dict]:
        leader, epoch = self.leader_of(META_TP)
        out = [{"name": META_TOPIC, "id": 0, "config": {},
                "partitions": [{"partition": 0, "leader": leader, "epoch": epoch, "replicas": list(self.voters)}]}]
        for t in sorted(self.meta.topics.values(), key=lambda t: t.name):
            if names is not None and t.name not in names:
                continue
            parts = []
            for p, r in enumerate(t.partitions):
                leader, epoch = self.leader_of(TopicPartition(t.id, p))
                parts.append({"partition": p, "leader": leader, "epoch": epoch, "replicas": r})
            out.append({"name": t.name, "id": t.id, "config": t.config, "partitions": parts})
        return out

    def _nodes_view(self) -> list[dict]:
        out = []
        now = mono_ms()
        for name in sorted(set(self.meta.nodes) | set(self.addresses) | {self.name}):
            if name == self.name:
                host, port = self.config.host, self.config.port
            else:
                host, port = self.addresses.get(name, "?:0").rsplit(":", 1)
            state = self._node_state(name, now)
            if name not in self.meta.nodes and name != self.name and state == "alive":
                state = "joining"   # heard from, not yet in __meta: cannot be given partitions yet
            out.append({"name": name, "host": host, "port": int(port), "state": state,
                        "last_seen_ms": self._last_seen_ago_ms(name, now)})
        return out

    def on_create_topic(self, identity: bytes, msg: P.CreateTopic, payload: list[bytes]) -> None:
        self._require_meta_leader()
        commands = meta.plan_create_topic(self.meta, msg.name, msg.partitions, msg.replication, msg.config,
                                          self._live_nodes(), now_ms(), self.limits)
        reply = P.OkReply(msg.req_id, {"topic": msg.name, "id": commands[0]["id"]})
        self._append_meta(commands, lambda end, err: self._meta_change_done(identity, msg.req_id, reply, end, err))

    def on_delete_topic(self, identity: bytes, msg: P.DeleteTopic, payload: list[bytes]) -> None:
        self._require_meta_leader()
        commands = meta.plan_delete_topic(self.meta, msg.name)
        reply = P.OkReply(msg.req_id, {"topic": msg.name})
        self._append_meta(commands, lambda end, err: self._meta_change_done(identity, msg.req_id, reply, end, err))

    def on_reassign_partition(self, identity: bytes, msg: P.ReassignPartition, payload: list[bytes]) -> None:
        self._require_meta_leader()
        commands = meta.plan_reassign(self.meta, msg.topic, msg.partition, [str(r) for r in msg.replicas], self.limits)
        reply = P.OkReply(msg.req_id, {"topic": msg.topic, "partition": msg.partition, "replicas": list(msg.replicas)})
        self._append_meta(commands, lambda end, err: self._meta_change_done(identity, msg.req_id, reply, end, err))

    def _meta_change_done(self, identity: bytes, req_id: int, reply: P.OkReply, end: int, error: ZqError | None) -> None:
        """A create or delete committed: answer once every live node has it too (bounded wait)."""
        if error is not None:
            self._send(identity, P.encode(P.error_reply(req_id, error)))
            return
        if len(self.pending_creates) >= PENDING_ADMIN_MAX:
            self._send(identity, P.encode(reply))   # committed already; only the courtesy wait is skipped
            return
        self.pending_creates.append((end, mono_ms() + self.limits.create_wait_ms_max, identity, reply))
        self._check_pending_creates()
        self._at(mono_ms() + self.limits.create_wait_ms_max, self._check_pending_creates)

    def on_register_node(self, identity: bytes, msg: P.RegisterNode, payload: list[bytes]) -> None:
        self._require_meta_leader()
        self._heard(msg.name)
        known = self.meta.nodes.get(msg.name)
        if known is not None and (known.host, known.port) == (msg.host, msg.port):
            self._send(identity, P.encode(P.OkReply(msg.req_id, {})))
            return
        command = {"op": "register_node", "name": msg.name, "host": msg.host, "port": msg.port,
                   "incarnation": msg.incarnation}
        self._append_meta([command], lambda end, err: self._send(identity, P.encode(
            P.error_reply(msg.req_id, err) if err else P.OkReply(msg.req_id, {}))))

    def _require_meta_leader(self) -> None:
        part = self.parts.get(META_TP)
        if part is None or part.replica is None or part.replica.role != LEADER:
            raise self._not_leader(self.leader_of(META_TP)[0], "the cluster metadata")

    def _append_meta(self, commands: list[dict], done: Callable[[int, ZqError | None], None]) -> None:
        """Propose commands to __meta (on its leader); `done(end, error)` runs when they commit."""
        part = self.parts[META_TP]
        blob = zbatch.encode_records([[now_ms(), None, cbor2.dumps(c), None] for c in commands])
        stored = zbatch.make_stored(0, 0, len(commands), 0, now_ms(), 0, 0, zbatch.crc(blob), blob)

        def on_outcome(outcome: Any) -> None:
            if isinstance(outcome, ZqError):
                done(0, outcome)
            elif outcome.status == COMMITTED:
                done(outcome.base_offset + len(commands), None)
            else:
                done(0, self._outcome_error(part, outcome))
        self._propose(part, len(commands), 0, 0, stored, on_outcome)

    def _apply_committed_meta(self) -> None:
        part = self.parts[META_TP]
        hw = part.high_watermark
        if self.meta.applied >= hw:
            return
        for offset, command in self._read_meta_commands(self.meta.applied, hw):
            self._apply_meta_command(offset, command)
        self.meta.skip_to(hw)
        self._send_heartbeats(again=False)   # tells the metadata leader at once that we have it

    def _apply_learned_meta(self) -> None:
        learned, self.meta_learned = self.meta_learned, []
        for offset, command in learned:
            self._apply_meta_command(offset, command)
        if learned:
            self.meta.skip_to(self.parts[META_TP].learner_end)
            self._send_heartbeats(again=False)

    def _apply_meta_command(self, offset: int, command: dict) -> None:
        self._note_created(offset, command)
        before = self.meta.topics.get(command.get("name", ""))
        self.meta.apply(offset, command)
        op = command.get("op")
        if op == "create_topic":
            self._open_topic(self.meta.topics[command["name"]])
        elif op == "delete_topic" and before is not None:
            self._close_topic(before)
        elif op == "reassign_partition":
            self._on_reassigned(command)
        elif op == "register_node" and command["name"] != self.name:
            n = self.meta.nodes[command["name"]]
            if self.addresses.get(n.name) != n.address:
                self.addresses[n.name] = n.address
                self._forget_peer(n.name)

    def _on_reassigned(self, command: dict) -> None:
        """A partition has a new target replica set: tell our replica (its leader carries the move
        out in the partition's log), or open a learner replica here if we are new to it."""
        t = self.meta.topics_by_id.get(command["id"])
        p = command["partition"]
        if t is None or not 0 <= p < len(t.partitions):
            return
        tp = TopicPartition(t.id, p)
        target = t.partitions[p]
        log.info("%s/%d: reassigned to %s", t.name, p, ", ".join(target))
        part = self.parts.get(tp)
        if part is not None and part.replica is not None:
            part.replica.set_target(list(target))
            for peer in target:
                if peer != self.name:
                    self._connect_sub(peer)
            self.dirty.add(tp)
        elif self.name in target:
            self._open_topic_part(t, p)

    def _remove_part(self, part: _Part) -> None:
        """The partition's committed configuration no longer names this node, and neither does
        its target: the replica and its data go (a later reassignment back starts it empty)."""
        tp = part.tp
        log.info("%s/%d: this node is no longer a replica; deleting its copy", part.name, tp.partition)
        self.counters["replicas_removed"] += 1
        self._begin().put_meta(R.removed_key(tp), str(max(part.replica.epoch, part.replica.join_epoch)).encode())
        self._drop_part(part, self._not_leader(self.leader_of(tp)[0], f"{part.name}/{tp.partition}"))

    def _close_topic(self, t: meta.TopicMeta) -> None:
        for p in range(len(t.partitions)):
            tp = TopicPartition(t.id, p)
            self._begin().delete_meta(R.removed_key(tp))
            part = self.parts.get(tp)
            if part is not None:
                self._drop_part(part, UnknownTopic(f"topic {t.name!r} was deleted"))

    def _drop_part(self, part: _Part, error: ZqError) -> None:
        """Our replica of a partition goes, with its data; whoever waits on it is told `error`."""
        tp = part.tp
        self.replica_set.forget(tp)
        self._begin().drop_partition(tp)
        self._begin().delete_meta(R.hard_state_key(tp))
        self.sub.setsockopt(zmq.UNSUBSCRIBE, R.tp_bytes(tp))
        self._fail_waiters(part, error)
        self._refuse_parked(tp, error)

    def _check_pending_creates(self) -> None:
        """Answer a create or delete once every live node has fetched or replicated past it, or its wait ran out."""
        if not self.pending_creates:
            return
        now = mono_ms()
        positions = [self.meta.applied] + [pos for name, pos in self.meta_applied_by.items() if self._alive(name)]
        keep = []
        for end, deadline, identity, reply in self.pending_creates:
            if all(pos >= end for pos in positions) or now >= deadline:
                self._send(identity, P.encode(reply))
            else:
                keep.append((end, deadline, identity, reply))
        self.pending_creates = keep
        if keep:
            self._at(now + 20, self._check_pending_creates)

    def _start_background(self) -> None:
        self._at(mono_ms(), self._send_heartbeats)
        self._at(mono_ms(), self._check_disk)
        self._at(mono_ms(), self._refresh_metrics)
        self._at(mono_ms() + FETCH_PENDING_SWEEP_MS, self._sweep_fetch_pending)
        self._at(mono_ms() + self.config.retention_interval_ms, self._retention)
        if self.config.seeds:
            self._ask_seeds()
        if not self.voters:
            self._at(mono_ms() + FOUND_WAIT_MS, self._maybe_found_cluster)
        if self.name in self.voters:
            self._at(mono_ms(), self._register_self)
        else:
            self._at(mono_ms(), self._follow_meta)

    def _maybe_found_cluster(self) -> None:
        """No cluster answered: the lowest-named node among those waiting founds one; the others
        keep asking, and learn it from the founder (the decision: zq.node.founding)."""
        decision = decide_founding(self.name, self.voters, [n for n in self.addresses if self._alive(n)],
                                   self.stopping)
        if decision.found:
            log.info("no cluster %r found: founding it, with this node holding its metadata", self.config.cluster)
            self.voters = (self.name,)
            del self.parts[META_TP]
            self._open_part(META_TP, META_TOPIC, [self.name], sync=True)
            self._register_self()
            return
        for name in decision.ask:
            self._ask(self.addresses[name])
        if decision.retry_ms:
            self._at(mono_ms() + decision.retry_ms, self._maybe_found_cluster)

    def _ask(self, address: str) -> None:
        if address != self.config.address:
            self._request(f"seed:{address}", P.MetadataRequest(next(self._req_ids), []), self._on_seed_metadata,
                          address=address)

    def _ask_seeds(self) -> None:
        """Each seed answers with its own name and address (and what it knows of the cluster)."""
        for address in self.config.seeds:
            self._ask(address)

    def _on_seed_metadata(self, reply: Any, payload: list) -> None:
        if not isinstance(reply, P.MetadataReply):
            return
        if reply.cluster != self.config.cluster:
            log.warning("a seed belongs to cluster %r, not %r: ignored", reply.cluster, self.config.cluster)
            return
        for n in reply.nodes:
            if n["name"] != self.name and n["name"] not in self.addresses and n.get("host") not in (None, "?"):
                self.addresses[n["name"]] = f"{n['host']}:{n['port']}"
                self._forget_peer(n["name"])
        if not self.voters:
            for t in reply.topics:
                if t["name"] == META_TOPIC and t["partitions"][0]["replicas"]:
                    self.voters = tuple(t["partitions"][0]["replicas"])
                    log.info("metadata voters are %s (learnt from a seed)", ", ".join(self.voters))

    def _register_self(self) -> None:
        """Voters and learners alike make sure `__meta` holds their address."""
        if self.stopping:
            return
        known = self.meta.nodes.get(self.name)
        if known is not None and (known.host, known.port) == (self.config.host, self.config.port):
            self._registered = True
            return
        part = self.parts.get(META_TP)
        if part is not None and part.replica is not None and part.replica.role == LEADER:
            command = {"op": "register_node", "name": self.name, "host": self.config.host,
                       "port": self.config.port, "incarnation": self.incarnation}
            self._append_meta([command], lambda end, err: None)
            self._at(mono_ms() + META_RETRY_MS * 5, self._register_self)
            return
        leader = self.leader_of(META_TP)[0]
        if leader is None or leader == self.name or self._peer(leader) is None:
            self._at(mono_ms() + META_RETRY_MS, self._register_self)
            return
        self._request(leader, P.RegisterNode(next(self._req_ids), self.name, self.config.host, self.config.port,
                                             self.incarnation), self._on_registered)

    def _on_registered(self, reply: Any, payload: list) -> None:
        if isinstance(reply, P.OkReply):
            self._registered = True
            return
        if isinstance(reply, NotLeader) and reply.leader:
            self.leader_view[META_TP] = (reply.leader, self.leader_view.get(META_TP, ("", 0))[1])
            if reply.address:
                self.addresses.setdefault(reply.leader, reply.address)
        self._at(mono_ms() + META_RETRY_MS, self._register_self)

    def _follow_meta(self) -> None:
        """A learner's loop: register, then long-poll fetch __meta from its leader, forever."""
        if self.stopping or self.name in self.voters:
            return
        if not self.voters:
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)   # still waiting for a seed to answer
            return
        if not self._registered:
            self._register_self()
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)
            return
        leader = self.leader_of(META_TP)[0]
        if leader is None or self._peer(leader) is None:
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)
            return
        part = self.parts[META_TP]
        self._request(leader, P.Fetch(next(self._req_ids), META_TOPIC, 0, part.learner_end, 4 * 1024 * 1024,
                                      META_FETCH_WAIT_MS, self.name),
                      self._on_meta_fetched, timeout_ms=META_FETCH_WAIT_MS + PEER_REQUEST_TIMEOUT_MS)

    def _on_meta_fetched(self, reply: Any, payload: list) -> None:
        if not isinstance(reply, P.FetchReply):
            if isinstance(reply, NotLeader) and reply.leader:
                self.leader_view[META_TP] = (reply.leader, self.leader_view.get(META_TP, ("", 0))[1])
            elif isinstance(reply, ZqError):
                log.debug("fetching %s failed: %s", META_TOPIC, reply.message)
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)
            return
        part = self.parts[META_TP]
        if self.born is None:
            # A learner with a new or damaged store: every command it could have acted on before
            # was committed, so lies below the leader's log end (Raft's leader completeness).
            self._note_born(reply.log_end)
        for value in payload:
            try:
                h = zbatch.verify_stored(value)
            except ZqError as e:
                log.warning("a %s batch failed its checksum (%s); fetching it again", META_TOPIC, e.message)
                break
            if h.base_offset != part.learner_end:
                continue   # already held, or a gap: the next fetch starts from our log end
            self._begin().append(META_TP, value, h)
            self.replica_set.sync_needed = True
            part.learner_end = h.next_offset
            for rec in zbatch.iter_records(value, h.base_offset, verify=False):
                self.meta_learned.append((rec.offset, cbor2.loads(rec.value)))
        # The next fetch goes out after this pass's write, so the leader counts only what we hold.
        self._at(mono_ms(), self._follow_meta)
