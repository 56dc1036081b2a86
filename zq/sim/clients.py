"""The cluster simulator's clients (part of zq.sim.cluster.Sim, a mixin) and the node side of them.

Clients. Producers and consumers (zq/sim/workload.py) reach a node as a client reaches the real
one: a real `Produce` (with a real record batch) or `Fetch`, encoded and decoded as on the wire,
handled by the shipped client room (zq.node.clients, which zq/io/node_clients.py runs) through
the simulated host `SimClientHost`. So the node's produce rules (leader check, fenced partitions,
disk short, the batch check, append times, the outcome and the error a client sees, an answer only
once the pass made the commit durable) and its fetch rules (range checks against the log start
and the high watermark, parked fetches woken when the high watermark moves, refused when the node
stops leading, one per client and partition, answered when their wait runs out) are the ones
simulated; an acknowledgement is a `ProduceReply`, a read is a batch in a `FetchReply` (or, for the
consumer that reads every partition in half the seeds, a `FetchManyReply`, each partition checked
alone). Two checks
judge the fetch side: no fetch answer holds an entry at or above the high watermark of the
replica answering (`SimClientHost.reply_fetch`), and a fetch the room holds is answered once a
high watermark its node reported passes its offset (`check_parked`, after every pass) and by
the end of the wait it asked for (`ev_fetch_deadline`; a paused node answers when it runs again).
The room's timers are simulator events of the node's incarnation (`ev_node_timer`). Half the
seeds hold each node to one parked fetch (`Sim.client_limits`), and no node holds more than its
bound. Plain producers may ask for acks=leader (idempotent ones never do, as Kafka requires):
their answers promise no commit, so they are not acknowledgements the replication checks hold
the cluster to; instead the answering node must hold the batch durably when it answers
(`check_leader_ack`).
"""
from __future__ import annotations

from zq import batch as zbatch
from zq import protocol as P
from zq.errors import NotLeader, OffsetOutOfRange, ZqError, from_wire
from zq.limits import DEFAULT
from zq.sim.checks import Ack, Violation, records
from zq.sim.settings import CLOCK_MARGIN_MS, WALL_BASE_MS
from zq.sim.simnode import SimNode
from zq.sim.workload import (BATCH_RECORDS_MAX, FETCH_WAITS_MS, REQUEST_TIMEOUT_MS, RETRY_BACKOFF_MS, THINK_MS_MAX,
                             ManyReader, Producer, Reader)


class ClientsMixin:
    """Part of zq.sim.cluster.Sim (the state it uses is set up in Sim.__init__)."""

    def serve_client(self, node: SimNode, identity: bytes, msg: object, payload: list) -> None:
        """A producer's or consumer's request reaches the node: decoded as the node decodes it, then
        the shipped client room (zq.node.clients) handles it, as the real node's shell does; an error
        it raises is the answer. Then the node's pass."""
        msg, payload = P.decode(P.encode(msg, *payload), DEFAULT)
        room = node.clients
        fetch = type(msg) in (P.Fetch, P.FetchMany)
        if fetch:
            spans = tuple(map(tuple, msg.partitions)) if type(msg) is P.FetchMany else ((msg.partition, msg.offset),)
            self.open_fetches[node.name][(identity, msg.req_id)] = (node.incarnation, spans, self.now + msg.max_wait_ms)
        try:
            if type(msg) is P.Fetch:
                room.on_fetch(identity, msg)
            elif fetch:
                room.on_fetch_many(identity, msg)
            else:
                self.produce(node, identity, msg, payload)
        except ZqError as e:
            room.host.reply_error(identity, msg.req_id, e)
        self.run_pass(node)
        if fetch and (identity, msg.req_id) in self.open_fetches[node.name]:
            self.result.parked += 1
            self.parked_now.add((node.name, identity, msg.req_id))
            self.at(self.now + msg.max_wait_ms + 1, "fetch_deadline", node.name, node.incarnation, identity, msg.req_id)

    def produce(self, node: SimNode, identity: bytes, msg: P.Produce, payload: list) -> None:
        p = msg.partition
        r = node.replicas.get(p)
        base, epoch = (r.log_end, r.epoch) if r is not None else (0, 0)
        node.clients.on_produce(identity, msg, payload)
        if r is not None and r.log_end > base:
            # The append time the room stamped the batch with, in its header as the node stores it.
            stamp = zbatch.unpack_header(r.entries(base, 1, 0)[0].payload).append_time_ms
            if stamp < WALL_BASE_MS + self.now - CLOCK_MARGIN_MS:
                raise Violation("an append time behind the true time",
                                f"{node.name} p{p} stamps {stamp - WALL_BASE_MS - self.now:+d} ms")
            self.stamps[(p, base, epoch)] = (stamp, self.now)

    def client_reply(self, node: SimNode, identity: bytes, msg: object, values: list) -> None:
        """The room answers a client (zq.node.host.ClientHost.reply): it leaves after the pass's fsync."""
        if self.open_fetches[node.name].pop((identity, msg.req_id), None) is not None and values:
            self.result.parked_woken += (node.name, identity, msg.req_id) in self.parked_now
        self.parked_now.discard((node.name, identity, msg.req_id))
        for t in self.net.client_deliveries(self.now + node.send_delay_ms):
            self.at(t, "client_reply", node.name, identity, msg, values)

    def check_leader_ack(self, node: SimNode, identity: bytes, msg: P.ProduceReply) -> None:
        """An acks=leader answer goes out only once the answering node holds the batch durably
        (fsynced with durability=fsync; written with durability=replicated)."""
        prod = self.clients_by_identity.get(identity)
        if not isinstance(prod, Producer) or prod.acks != 1:
            return
        blob = prod.requests[msg.req_id][2]
        disk = node.disk.durable if self.settings.durability == "fsync" else node.disk.volatile
        store = disk.get(prod.partition)
        entry = store.entry_at(msg.base_offset) if store is not None else None
        if entry is None or records(entry.payload) != blob:
            raise Violation("an acks=leader answer before the leader's write was durable",
                            f"{node.name} p{prod.partition} answers {prod.name} with offset {msg.base_offset}, "
                            f"its disk holds {entry}")

    def reader_partition(self, identity: bytes) -> int | None:
        reader = self.clients_by_identity.get(identity)
        return reader.partition if isinstance(reader, Reader) else None

    def check_parked(self, node: SimNode) -> None:
        """After a node's pass: no fetch it holds waits for data below a high watermark it reported,
        and it holds no more than its bound."""
        parked = sum((node.name, *key) in self.parked_now for key in self.open_fetches[node.name])
        if parked > self.client_limits.pending_fetches_max:
            raise Violation("a node holds more parked fetches than its bound",
                            f"{node.name}: {parked} > {self.client_limits.pending_fetches_max}")
        for (identity, req_id), (incarnation, spans, _deadline) in self.open_fetches[node.name].items():
            for p, offset in spans:
                hw = self.checker.hw.get((node.name, p), 0)
                if incarnation == node.incarnation and hw > offset:
                    raise Violation("a parked fetch was not answered when the high watermark passed it",
                                    f"{node.name} p{p}: fetch {identity!r}/{req_id} at offset {offset}, "
                                    f"high watermark {hw}")

    def ev_fetch_deadline(self, name: str, incarnation: int, identity: bytes, req_id: int) -> None:
        """A parked fetch's wait ran out: the node answered it (unless it stopped or runs no more)."""
        node = self.nodes[name]
        held = self.open_fetches[name].get((identity, req_id))
        # (A duplicate of the request, delivered later, may hold the same key with a later deadline.)
        if (held is not None and held[2] < self.now and node.alive and not node.paused
                and node.incarnation == incarnation == held[0]):
            raise Violation("a parked fetch was not answered within its max wait",
                            f"{name} {held[1]} (partition, offset): fetch {identity!r}/{req_id}, due at t={held[2]}")

    def ev_node_timer(self, name: str, incarnation: int, fn) -> None:
        """A timer the node's client room set (a parked fetch's wait)."""
        node = self.nodes[name]
        if not node.alive or node.incarnation != incarnation:
            return
        if node.paused:
            node.inbox.append(("call", (fn,)))   # runs when the node runs again (a timer is never dropped)
            return
        fn()
        self.run_pass(node)

    def ev_client_reply(self, sender: str, identity: bytes, msg: object, values: list) -> None:
        client = self.clients_by_identity[identity]
        if isinstance(client, Producer):
            self.on_produce_answer(client, msg)
        elif isinstance(client, ManyReader):
            self.on_fetch_many_answer(client, sender, msg, values)
        else:
            self.on_fetch_answer(client, sender, msg, values)

    def ev_produce(self, name: str) -> None:
        if self.phase != "safety":
            return
        prod = self.producers[name]
        if not prod.waiting:
            prod.new_batch(self.rng.randint(1, BATCH_RECORDS_MAX))
        self.send_request(prod)

    def send_request(self, prod: Producer) -> None:
        msg, blob = prod.request()
        for t in self.net.client_deliveries(self.now):
            self.at(t, "request", prod.target, prod.identity, msg, [blob])
        self.at(self.now + REQUEST_TIMEOUT_MS, "timeout", prod.name, prod.batch_no, prod.attempt)

    def ev_timeout(self, name: str, batch_no: int, attempt: int) -> None:
        prod = self.producers[name]
        if self.phase != "safety" or not prod.is_current(batch_no, attempt):
            return
        prod.target = self.rng.choice(self.targets[prod.partition])   # the nodes metadata names for it
        self.send_request(prod)

    def ev_retry(self, name: str, batch_no: int, attempt: int) -> None:
        prod = self.producers[name]
        if self.phase == "safety" and prod.is_current(batch_no, attempt):
            self.send_request(prod)

    def on_produce_answer(self, prod: Producer, msg: object) -> None:
        """A producer's answer from a node's client room: an acknowledgement, or an error to act on."""
        sent = prod.requests.get(msg.req_id)
        if sent is None:
            return
        batch_no, attempt, blob = sent
        if type(msg) is P.ProduceReply:
            if prod.acks == 2:   # acks=leader promises less: see check_leader_ack
                self.checker.on_ack(Ack(prod.partition, msg.base_offset, msg.epoch, blob))
            else:
                self.result.leader_acks += 1
            if prod.on_committed(batch_no) and self.phase == "safety":
                self.at(self.now + self.rng.randint(0, THINK_MS_MAX), "produce", prod.name)
            return
        error = from_wire(msg.code, msg.message, msg.data)
        if prod.idempotent and not error.retriable:
            raise Violation("idempotent producer refused", f"{prod.name} batch {batch_no}: {error.code}: {error.message}")
        if not prod.is_current(batch_no, attempt):
            return
        hint = error.leader if isinstance(error, NotLeader) else None
        prod.target = hint if hint in self.nodes else self.rng.choice(self.targets[prod.partition])
        self.at(self.now + RETRY_BACKOFF_MS, "retry", prod.name, batch_no, attempt)

    def ev_read(self, p: int, reader: int) -> None:
        """A consumer fetches from the node it believes leads (a real Fetch, maybe a long-poll),
        through that node's client room; what it gets must be committed and stay so."""
        if self.phase != "safety":
            return
        client = self.readers[reader]
        wait_ms = self.rng.choice(FETCH_WAITS_MS)
        if isinstance(client, ManyReader):
            for target, msg in client.fetches(wait_ms):
                for t in self.net.client_deliveries(self.now):
                    self.at(t, "request", target, client.identity, msg, [])
                self.at(self.now + wait_ms + REQUEST_TIMEOUT_MS, "fetch_timeout", reader, msg.req_id)
            return
        msg = client.fetch(wait_ms)
        for t in self.net.client_deliveries(self.now):
            self.at(t, "request", client.target, client.identity, msg, [])
        self.at(self.now + wait_ms + REQUEST_TIMEOUT_MS, "fetch_timeout", reader, msg.req_id)

    def ev_fetch_timeout(self, reader: int, req_id: int) -> None:
        client = self.readers[reader]
        if isinstance(client, ManyReader):
            partitions = client.in_flight.pop(req_id, None)
            if self.phase == "safety" and partitions is not None:
                for p in partitions:
                    client.targets[p] = self.rng.choice(self.targets[p])   # as metadata names them
                self.many_read_again(client)
            return
        if self.phase == "safety" and client.req_id == req_id:
            client.req_id = 0
            client.target = self.rng.choice(self.targets[client.partition])   # as metadata names them
            self.at(self.now, "read", client.partition, reader)

    def many_read_again(self, client: ManyReader) -> None:
        """A ManyReader asks again once every request of its round is answered or timed out."""
        if not client.in_flight and self.phase == "safety":
            self.at(self.now + self.rng.randint(5, 40), "read", 0, client.index)

    def on_fetch_many_answer(self, client: ManyReader, sender: str, msg: object, values: list) -> None:
        """Each partition of a FetchMany is answered as a Fetch of it alone: batches (each checked
        as committed), or its own error to act on; an error for the whole request re-aims them all."""
        partitions = client.in_flight.pop(msg.req_id, None)
        if partitions is None:
            return   # timed out already, or a duplicate
        if type(msg) is P.FetchManyReply:
            self.result.fetches += 1
            self.result.fetches_many += 1
            at = 0
            for p, _hw, _log_start, _log_end, n in msg.results:
                if p not in partitions:
                    raise Violation("a FetchMany answer names a partition not asked for", f"{sender}: p{p}")
                client.positions[p] = self.take_read(sender, p, client.positions[p], values[at:at + n])
                at += n
            errors = [(p, from_wire(code, message, data)) for p, code, message, data in msg.errors]
        else:
            error = from_wire(msg.code, msg.message, msg.data)
            errors = [(p, error) for p in partitions]
        for p, error in errors:
            target, client.positions[p] = self.after_fetch_error(p, client.positions[p], error)
            client.targets[p] = target or client.targets[p]
        self.many_read_again(client)

    def take_read(self, sender: str, p: int, position: int, entries: list) -> int:
        """A consumer at `position` of partition `p` reads `entries` from `sender`: each past its
        position is checked as committed. Returns its position after them."""
        for e in entries:
            if e.end_offset > position:
                self.checker.on_read(sender, p, e)
                position = e.end_offset
        return position

    def after_fetch_error(self, p: int, position: int, error: ZqError) -> tuple[str | None, int]:
        """Where a consumer of partition `p` asks next (None: where it asked) and from which
        position, after `error`: the leader a NotLeader names, the log start past what retention
        deleted, else a node metadata names for it."""
        if isinstance(error, NotLeader) and error.leader in self.nodes:
            return error.leader, position
        if isinstance(error, OffsetOutOfRange) and error.log_start is not None and position < error.log_start:
            return None, error.log_start   # retention deleted what it had not read
        return self.rng.choice(self.targets[p]), position

    def on_fetch_answer(self, client: Reader, sender: str, msg: object, values: list) -> None:
        if msg.req_id != client.req_id:
            return   # an earlier fetch's answer (or a duplicate)
        client.req_id = 0
        if type(msg) is P.FetchReply:
            self.result.fetches += 1
            client.position = self.take_read(sender, client.partition, client.position, values)
        else:
            target, client.position = self.after_fetch_error(client.partition, client.position,
                                                             from_wire(msg.code, msg.message, msg.data))
            client.target = target or client.target
        if self.phase == "safety":
            self.at(self.now + self.rng.randint(5, 40), "read", client.partition, client.index)
