"""`zq node drain`: hand every led partition away (never stand again), answer once leadership
moved, and, with leave, stop the node.
"""
from __future__ import annotations


from zq import protocol as P
from zq.core.repl_types import LEADER
from zq.errors import InvalidRequest
from zq.types import TopicPartition
from zq.io.node_common import DRAIN_CHECK_MS, LEAVE_AFTER_ANSWER_MS, log, mono_ms


class DrainMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    def on_drain_node(self, identity: bytes, msg: P.DrainNode, payload: list[bytes]) -> None:
        """Stop standing for election everywhere and hand every partition we lead to an in-sync
        replica (the cores do it: TimeoutNow to the most caught-up voter). The answer comes when
        we lead nothing that has another voter, or after `wait_ms` (bounded by drain_wait_ms_max)."""
        if self.pending_drain is not None:
            raise InvalidRequest(f"node {self.name} is being drained already; wait for that drain to answer")
        self.draining = True
        for tp, part in self.parts.items():
            if part.replica is not None:
                part.replica.set_draining(True)
                self.dirty.add(tp)
        wait_ms = max(0, min(msg.wait_ms, self.limits.drain_wait_ms_max))
        log.info("node %s: draining (hand leadership away within %d ms%s)", self.name, wait_ms,
                 ", then leave" if msg.leave else "")
        self.pending_drain = (msg.req_id, mono_ms() + wait_ms, identity, len(self._led_elsewhere_possible()), msg.leave)
        self._check_drain()

    def _led_elsewhere_possible(self) -> list[TopicPartition]:
        """Partitions we lead that another voter could lead instead."""
        return [tp for tp, part in self.parts.items()
                if part.replica is not None and part.replica.role == LEADER and len(part.replica.voters) > 1]

    def _check_drain(self) -> None:
        if self.pending_drain is None:
            return
        req_id, deadline, identity, led_before, leave = self.pending_drain
        still = self._led_elsewhere_possible()
        if still and mono_ms() < deadline:
            self._at(mono_ms() + DRAIN_CHECK_MS, self._check_drain)
            return
        self.pending_drain = None
        names = [f"{self.parts[tp].name}/{tp.partition}" for tp in still]
        self._send(identity, P.encode(P.OkReply(req_id, {"node": self.name, "led_before": led_before,
                                                         "led_after": len(still), "still_leading": names,
                                                         "leaving": leave})))
        if leave:
            log.info("node %s: drained (still leading %d); leaving the cluster", self.name, len(still))
            self._at(mono_ms() + LEAVE_AFTER_ANSWER_MS, self._request_leave)   # the answer goes out first

    def _request_leave(self) -> None:
        self.leave_requested = True
