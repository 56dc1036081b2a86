"""The event loop: poll the sockets (until a message, a node timer or the earliest replica timer;
not at all while a replica is still dirty), hand each message to its handler (every socket
bounded per pass in count and in time), tick the replicas whose timer is due (zq.node.replicas
keeps their deadlines: a pass costs what changed, not how many partitions the node holds) and
the services, finish the pass (persist, then send), run due timers; and the housekeeping timers
(retention, disk space).
"""
from __future__ import annotations


import heapq
import logging
import threading
import time
from typing import Callable

import zmq

from zq import protocol as P
from zq.core.repl_types import LEADER
from zq.errors import InvalidRequest, NotAuthorised, ProtocolError, ZqError
from zq.io import security
from zq.node.replicas import Part as _Part
from zq.io.node_common import (CLOCK_SKEW_WARN_MS, DISK_CHECK_INTERVAL_MS, REQUESTS_BUDGET_MS, SLOW_PASS_MS, log,
                               mono_ms, now_ms)


POLL_TIMEOUT_MS_MAX = 100   # the loop wakes at least this often (services' ticks, SIGTERM)
REPLICA_TIMER_SLACK_MS = 5  # a replica's timer may run this late (heartbeats every 100 ms, elections after 1 s)


def _user_id(frame: zmq.Frame) -> str | None:
    """The user id ZAP gave the connection a frame came on (zq.io.security), None if it has none."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


class LoopMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    def run(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.sub, zmq.POLLIN)
        polled_peers: set[str] = set()
        self._start_background()
        if self.config.metrics:
            from zq.io.metrics import serve_metrics
            self.metrics_server = serve_metrics(self, self.config.host, self.config.port + 2)
        log.info("node %s serving on %s (cluster %s, voters %s)", self.name, self.config.address,
                 self.config.cluster, ", ".join(self.voters) or "learnt from seeds")
        while not stop.is_set() and not self.leave_requested:
            for name, peer in self.peers.items():
                if name not in polled_peers:
                    poller.register(peer.sock, zmq.POLLIN)
                    poller.register(peer.monitor, zmq.POLLIN)
                    polled_peers.add(name)
            ready = dict(poller.poll(self._poll_timeout_ms()))
            pass_start = time.monotonic()
            continued = self.continued
            # Replication and peers' answers first: they are cheap and an election waits on them.
            # Client requests then. Every socket is drained within a count (inbox_drain_max) and
            # the pass's one time budget, whatever peers and clients send: a backlog of leases and
            # acks (each a few ms of work) or a flood of replication must not keep this pass from
            # writing, replicating and heartbeating; what is left waits in its socket for the next
            # pass (each socket still gets one message per pass, so none starves).
            until = pass_start + REQUESTS_BUDGET_MS / 1000
            if self.sub in ready:
                self._drain(self.sub, self._on_sub_frames, until)
            for peer in list(self.peers.values()):
                if peer.sock in ready:
                    self._drain(peer.sock, lambda frames, peer=peer: self._on_peer_frames(peer, frames), until)
                if peer.monitor in ready:
                    self._on_peer_monitor(peer)
            if self.router in ready:
                # Under [security] frames are received uncopied, so the CURVE user id ZAP gave them is readable.
                self._drain(self.router, self._on_router_frames, until, copy=self.keys is None)
            drained_at = time.monotonic()
            try:
                self._tick_replicas()
                for service in self.services:
                    try:
                        service.tick(mono_ms())
                    except Exception:
                        self.counters["internal_errors"] += 1
                        self.limited_log.log(logging.ERROR, "service_tick", "service %s failed in tick",
                                             type(service).__name__, exc_info=True)
                ticked_at = time.monotonic()
                self._finish_pass()
                finished_at = time.monotonic()
                self._run_timers()
            except Exception:
                # A bug of ours between the cores and the disk: going on could acknowledge what is not
                # stored, so the node stops, loudly; a restart rebuilds every core from the disk.
                log.critical("a loop pass failed; stopping so that a restart recovers from what is on disk",
                             exc_info=True)
                raise
            pass_ms = (time.monotonic() - pass_start) * 1000
            if pass_ms > SLOW_PASS_MS and self.continued != continued:
                # The process was stopped (SIGSTOP, a debugger) during the pass: the monotonic clock
                # ran on while nothing did. Not a stall of the loop, so not counted as one.
                self.counters["stopped_passes"] += 1
                log.info("the process was stopped during this %.0f ms loop pass (SIGSTOP/SIGCONT); "
                         "not a stall of the loop", pass_ms)
            elif pass_ms > SLOW_PASS_MS:
                self.counters["slow_passes"] += 1
                end = time.monotonic()
                self.limited_log.log(logging.WARNING, "slow_pass",
                            "a loop pass took %.0f ms (over %d ms starves heartbeats): requests %.0f ms, "
                            "ticks %.0f ms, write and send %.0f ms, timers %.0f ms", pass_ms, SLOW_PASS_MS,
                            (drained_at - pass_start) * 1000, (ticked_at - drained_at) * 1000,
                            (finished_at - ticked_at) * 1000, (end - finished_at) * 1000)
        self.close()

    def _poll_timeout_ms(self) -> int:
        """How long the next poll may wait: not at all while a replica is still dirty (the pass's
        rounds ran out: what is left goes on now, not after a poll timeout), else until the next
        node timer or replica timer (zq.node.replicas keeps their deadlines), at most 100 ms."""
        if self.dirty:
            return 0
        now = mono_ms()
        due = now + POLL_TIMEOUT_MS_MAX
        if self.timers:
            due = min(due, self.timers[0][0])
        replica_due = self.replica_set.next_deadline()
        if replica_due is not None:
            # A little late, so that one wake-up runs the timers due close together (64 idle
            # leaders' heartbeats wake the loop at most 1000 / REPLICA_TIMER_SLACK_MS times a second).
            due = min(due, replica_due + REPLICA_TIMER_SLACK_MS)
        return max(0, min(POLL_TIMEOUT_MS_MAX, due - now))

    def _drain(self, sock: zmq.Socket, handle: Callable[[list], None], until: float | None = None,
               copy: bool = True) -> None:
        """Handle what waits on `sock`: at most inbox_drain_max messages, and none after `until`
        (monotonic s) but the first."""
        for i in range(self.limits.inbox_drain_max):
            if i and until is not None and time.monotonic() >= until:
                self.counters["requests_deferred"] += 1   # the rest is served next pass
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                return
            handle(frames)

    def _on_router_frames(self, frames: list) -> None:
        user = None
        if frames and isinstance(frames[0], zmq.Frame):
            user = _user_id(frames[-1])
            frames = [f.bytes for f in frames]
        identity, body = frames[0], frames[1:]
        try:
            msg, payload = P.decode(body, self.limits)
        except ZqError as e:
            self.counters["invalid_requests" if isinstance(e, InvalidRequest) else "protocol_errors"] += 1
            log.debug("dropped a bad frame: %s", e)
            # Reply only when it looks like a zq peer (it can read the reply); garbage gets silence.
            if body and bytes(body[0])[:2] == b"ZQ":
                self._send(identity, P.encode(P.error_reply(getattr(e, "req_id", 0), e)))
            return
        if self.keys is not None and user != security.NODE_USER and P.from_nodes_only(msg):
            # Only a holder of the cluster secret key may speak as a node (ZAP names it NODE_USER).
            self.counters["not_authorised"] += 1
            self._warn_limited("not_authorised", "refused a %s from a client key: only nodes of the cluster send it",
                               type(msg).__name__)
            if hasattr(msg, "req_id"):
                self._send(identity, P.encode(P.error_reply(msg.req_id, NotAuthorised(
                    f"{type(msg).__name__} is sent by the cluster's nodes only, and this connection uses a client key"))))
            return
        handler = self.HANDLERS.get(type(msg))
        if handler is None and type(msg) in self.service_handlers:
            service_handler = self.service_handlers[type(msg)]
            handler = lambda node, identity, msg, payload: service_handler(identity, msg, payload)  # noqa: E731
        if handler is None:
            self.counters["protocol_errors"] += 1
            self._send(identity, P.encode(P.error_reply(getattr(msg, "req_id", 0), ProtocolError(
                f"{type(msg).__name__} is not a request a node serves"))))
            return
        try:
            handler(self, identity, msg, payload)
        except Exception as e:
            if not isinstance(e, ZqError):
                # Our bug, not the peer's: log it loudly, answer, and keep serving everyone else.
                log.exception("handling %s failed", type(msg).__name__)
                e = ZqError(f"the node failed to handle {type(msg).__name__} ({e.__class__.__name__}); "
                            "this is a bug in zq, please report it with the node's log")
            self.counters[f"errors_{e.code}"] += 1
            if hasattr(msg, "req_id") and not isinstance(msg, (P.Replicate, P.NodeHeartbeat)):   # one-way: no reply
                self._send(identity, P.encode(P.error_reply(msg.req_id, e)))

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            self.router.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            # Gone (EHOSTUNREACH under ROUTER_MANDATORY) or not reading (EAGAIN): it will retry or time out.
            self.counters["replies_dropped"] += 1

    def _at(self, when_ms: int, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when_ms, next(self._timer_seq), fn))

    def _run_timers(self) -> None:
        now = mono_ms()
        ran = 0
        while self.timers and self.timers[0][0] <= now and ran < self.limits.inbox_drain_max:
            _, _, fn = heapq.heappop(self.timers)
            try:
                fn()
            except Exception:
                # Our bug: log it loudly and keep serving; one broken timer must not stop the node.
                self.counters["internal_errors"] += 1
                self.limited_log.log(logging.ERROR, "timer_failed", "a timer of the node failed", exc_info=True)
            ran += 1
        if ran:
            self._finish_pass()

    def _retention(self) -> None:
        """A leader decides what retention deletes, by its replica set's median clock; a follower
        deletes only below its leader's log start, once it holds that much committed (see
        zq/core/replication.py, "Who moves the log start")."""
        for tp, part in list(self.parts.items()):
            t = self.meta.topics_by_id.get(tp.topic_id)
            if t is None or part.replica is None:
                continue
            r_ms, r_bytes = t.config.get("retention_ms"), t.config.get("retention_bytes")
            if r_ms is None and r_bytes is None:
                continue
            replica = part.replica
            if replica.role == LEADER:
                wall = replica.cluster_wall_ms()
                if wall is None:
                    continue   # its replicas' clocks are not known yet: the next round decides
                self._note_skew(part, wall)
                new_start = self.store.retention_candidates(tp, now_ms=wall, retention_ms=r_ms, retention_bytes=r_bytes)
            else:
                new_start = replica.leader_log_start if replica.leader_log_start <= part.high_watermark else None
            if new_start is not None and new_start > part.log_start:
                # Only committed data goes, so no leader change can need it back.
                new_start = min(new_start, part.high_watermark)
                if new_start > part.log_start:
                    self._begin().delete_below(tp, new_start)
                    part.log_start = new_start
                    self.counters["retention_deletes"] += 1
                    if part.replica is not None:
                        # A follower asking for what is gone is told to start here (StartAt).
                        part.replica.on_log_start(new_start)
                        self.dirty.add(tp)
        self._at(mono_ms() + self.config.retention_interval_ms, self._retention)

    def _note_skew(self, part: _Part, cluster_wall: int) -> None:
        own = now_ms()
        if abs(own - cluster_wall) > CLOCK_SKEW_WARN_MS:
            self.counters["clock_skewed"] += 1
            self.limited_log.log(logging.WARNING, "clock_skew", "the clock of %s is %+d ms off the median of its "
                                 "replica sets' clocks (e.g. %s/%d); it uses theirs, and its own clock needs fixing",
                                 self.name, own - cluster_wall, part.name, part.tp.partition)

    def _check_disk(self) -> None:
        try:
            full = self.store.disk_free_bytes() < self.config.disk_free_bytes_min
        except OSError:
            full = False
        if full != self.disk_full:
            log.warning("disk %s: produce %s%s", "nearly full" if full else "has room again",
                        "refused" if full else "accepted again",
                        "; leadership goes to replicas with room" if full else "")
        self.disk_full = full
        for tp, part in self.parts.items():
            # Followers say so in their acks; a leader hands off to a voter with room (the core).
            if part.replica is not None and part.replica.disk_low != full:
                part.replica.set_disk_low(full)
                self.dirty.add(tp)
        self._at(mono_ms() + DISK_CHECK_INTERVAL_MS, self._check_disk)
