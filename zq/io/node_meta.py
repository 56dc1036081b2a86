"""The `__meta` partition as the real node uses it: metadata requests, topic changes, and the
shell of the `__meta` follower (zq.node.meta.MetaFollower decides: registration, which offset to
fetch, what to write, what to apply and what to open or close), founding (the decision:
zq.node.founding) and seeds. This room sends, writes, and carries out the follower's effects.
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
from zq.node import meta as M
from zq.node import status as S
from zq.node.founding import FOUND_WAIT_MS, decide_founding
from zq.node.replicas import Part as _Part
from zq.types import META_TOPIC, META_TP, TopicPartition
from zq.io.node_common import FETCH_PENDING_SWEEP_MS, PEER_REQUEST_TIMEOUT_MS, log, mono_ms, now_ms


class MetaMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    def on_metadata(self, identity: bytes, msg: P.MetadataRequest, payload: list[bytes]) -> None:
        self._send(identity, P.encode(P.MetadataReply(msg.req_id, self.config.cluster, self._nodes_view(),
                                                      self._topics_view(msg.topics))))

    def _topics_view(self, names: list | None) -> list[dict]:
        return S.topics_view(self.meta, names, self.voters, self.leader_of)

    def _nodes_view(self) -> list[dict]:
        now = mono_ms()
        return S.nodes_view(self.name, self.config.host, self.config.port, self.meta.nodes, self.addresses,
                            lambda name: self._node_state(name, now), lambda name: self._last_seen_ago_ms(name, now))

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
        if not self.pending_creates.add(end, mono_ms() + self.limits.create_wait_ms_max, (identity, reply)):
            self._send(identity, P.encode(reply))   # committed already; only the courtesy wait is skipped
            return
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

    @property
    def meta_learned(self) -> list[tuple[int, dict]]:
        """Fetched `__meta` commands awaiting the durability of their write (the follower's)."""
        return self.meta_follower.learned

    def _holds(self, tp: TopicPartition) -> bool:
        part = self.parts.get(tp)
        return part is not None and part.replica is not None

    def _apply_committed_meta(self) -> None:
        part = self.parts[META_TP]
        self._act_on_meta(self.meta_follower.apply_committed(part.high_watermark, self._read_meta_commands,
                                                             self._holds))

    def _apply_learned_meta(self) -> None:
        self._act_on_meta(self.meta_follower.apply_learned(self._holds))

    def _act_on_meta(self, effects: Any) -> None:
        """Carry out the follower's effects, each as it is yielded (in log order)."""
        for effect in effects:
            kind = type(effect)
            if kind is M.Noted:
                self._note_created(effect.offset, effect.command)
            elif kind is M.OpenTopic:
                self._open_topic(effect.topic)
            elif kind is M.CloseTopic:
                self._close_topic(effect.topic)
            elif kind is M.Retarget:
                log.info("%s/%d: reassigned to %s", effect.topic.name, effect.partition, ", ".join(effect.target))
                tp = TopicPartition(effect.topic.id, effect.partition)
                self.parts[tp].replica.set_target(list(effect.target))
                for peer in effect.peers:
                    self._connect_sub(peer)
                self.dirty.add(tp)
            elif kind is M.OpenMoved:
                log.info("%s/%d: reassigned to %s", effect.topic.name, effect.partition,
                         ", ".join(effect.topic.partitions[effect.partition]))
                self._open_topic_part(effect.topic, effect.partition)
            elif kind is M.PeerAddress:
                if self.addresses.get(effect.name) != effect.address:
                    self.addresses[effect.name] = effect.address
                    self._forget_peer(effect.name)
            elif kind is M.Applied:
                self._send_heartbeats(again=False)   # tells the metadata leader at once that we have it

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
        positions = [self.meta.applied] + [pos for name, pos in self.meta_applied_by.items() if self._alive(name)]
        answers, again = self.pending_creates.due(mono_ms(), positions)
        for identity, reply in answers:
            self._send(identity, P.encode(reply))
        if again is not None:
            self._at(again, self._check_pending_creates)

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
            self.meta_follower.log = self.parts[META_TP]
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
        news = M.read_seed_reply(self.name, self.config.cluster, reply.cluster, reply.nodes, reply.topics,
                                 self.addresses, bool(self.voters))
        if news.foreign:
            log.warning("a seed belongs to cluster %r, not %r: ignored", reply.cluster, self.config.cluster)
            return
        for name, address in news.addresses:
            self.addresses[name] = address
            self._forget_peer(name)
        if news.voters:
            self.voters = news.voters
            log.info("metadata voters are %s (learnt from a seed)", ", ".join(self.voters))

    def _leads_meta(self) -> bool:
        part = self.parts.get(META_TP)
        return part is not None and part.replica is not None and part.replica.role == LEADER

    def _register_self(self) -> None:
        """Voters and learners alike make sure `__meta` holds their address (zq.node.meta decides how)."""
        leader = self.leader_of(META_TP)[0]
        step = self.meta_follower.register_step(self.stopping, self._leads_meta(), leader,
                                                leader is not None and self._peer(leader) is not None)
        kind = type(step)
        if kind is M.AppendRegistration:
            self._append_meta([step.command], lambda end, err: None)
            self._at(mono_ms() + step.recheck_ms, self._register_self)
        elif kind is M.Wait:
            self._at(mono_ms() + step.delay_ms, self._register_self)
        elif kind is M.SendRegistration:
            self._request(step.leader, P.RegisterNode(next(self._req_ids), self.name, self.config.host,
                                                      self.config.port, self.incarnation), self._on_registered)

    def _on_registered(self, reply: Any, payload: list) -> None:
        if isinstance(reply, NotLeader) and reply.leader:
            self.leader_view[META_TP] = (reply.leader, self.leader_view.get(META_TP, ("", 0))[1])
            if reply.address:
                self.addresses.setdefault(reply.leader, reply.address)
        step = self.meta_follower.on_register_reply(isinstance(reply, P.OkReply))
        if type(step) is M.Wait:
            self._at(mono_ms() + step.delay_ms, self._register_self)

    def _follow_meta(self) -> None:
        """A learner's loop: register, then long-poll fetch __meta from its leader, forever (zq.node.meta decides)."""
        leader = self.leader_of(META_TP)[0]
        step = self.meta_follower.follow_step(self.stopping, self.voters, leader,
                                              leader is not None and self._peer(leader) is not None)
        kind = type(step)
        if kind is M.Wait:
            self._at(mono_ms() + step.delay_ms, self._follow_meta)
        elif kind is M.RegisterFirst:
            self._register_self()
            self._at(mono_ms() + step.delay_ms, self._follow_meta)
        elif kind is M.Fetch:
            self._request(step.leader, P.Fetch(next(self._req_ids), META_TOPIC, 0, step.offset, step.max_bytes,
                                               step.wait_ms, self.name),
                          self._on_meta_fetched, timeout_ms=step.wait_ms + PEER_REQUEST_TIMEOUT_MS)

    def _on_meta_fetched(self, reply: Any, payload: list) -> None:
        if not isinstance(reply, P.FetchReply):
            if isinstance(reply, NotLeader) and reply.leader:
                self.leader_view[META_TP] = (reply.leader, self.leader_view.get(META_TP, ("", 0))[1])
            elif isinstance(reply, ZqError):
                log.debug("fetching %s failed: %s", META_TOPIC, reply.message)
            self._at(mono_ms() + self.meta_follower.on_fetch_failed().delay_ms, self._follow_meta)
            return
        if self.born is None:
            # A learner with a new or damaged store: every command it could have acted on before
            # was committed, so lies below the leader's log end (Raft's leader completeness).
            self._note_born(reply.log_end)
        for batch in self.meta_follower.on_fetched(self._meta_batches(payload)):
            value, header = batch.value
            self._begin().append(META_TP, value, header)
            self.replica_set.sync_needed = True
        # The next fetch goes out after this pass's write, so the leader counts only what we hold.
        self._at(mono_ms(), self._follow_meta)

    @staticmethod
    def _meta_batches(payload: list) -> Any:
        """A fetch reply's stored batches as the follower takes them (up to the first failing its checksum)."""
        for value in payload:
            try:
                h = zbatch.verify_stored(value)
            except ZqError as e:
                log.warning("a %s batch failed its checksum (%s); fetching it again", META_TOPIC, e.message)
                yield M.BAD_BATCH
                return
            yield M.FetchedBatch(h.base_offset, h.next_offset, (value, h),
                                 lambda v=value, base=h.base_offset: [(rec.offset, cbor2.loads(rec.value))
                                                                      for rec in zbatch.iter_records(v, base, verify=False)])
