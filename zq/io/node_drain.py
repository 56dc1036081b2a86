"""`zq node drain`, the real host's side: set every replica draining, look every DRAIN_CHECK_MS
whether the drain is done, answer, and with leave stop the loop. What a drain hands off and when
it is done is zq.node.drain (pure).
"""
from __future__ import annotations

from zq import protocol as P
from zq.errors import InvalidRequest
from zq.node import drain as D
from zq.io.node_common import log, mono_ms


class DrainMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    def on_drain_node(self, identity: bytes, msg: P.DrainNode, payload: list[bytes]) -> None:
        """Stop standing for election everywhere and hand every partition we lead to an in-sync
        replica (the cores do it: TimeoutNow to the most caught-up voter). The answer comes when
        we lead nothing that has another voter, or after `wait_ms` (bounded by drain_wait_ms_max)."""
        if self.pending_drain is not None:
            raise InvalidRequest(f"node {self.name} is being drained already; wait for that drain to answer")
        self.draining = True
        now = mono_ms()
        drain, hand_off = D.start_drain(self.parts, msg.req_id, identity, msg.wait_ms, self.limits.drain_wait_ms_max,
                                        msg.leave, now)
        for tp in hand_off:
            self.parts[tp].replica.set_draining(True)
            self.dirty.add(tp)
        log.info("node %s: draining (hand leadership away within %d ms%s)", self.name, drain.deadline_ms - now,
                 ", then leave" if msg.leave else "")
        self.pending_drain = drain
        self._check_drain()

    def _check_drain(self) -> None:
        if self.pending_drain is None:
            return
        verdict = D.check_drain(self.pending_drain, self.name, self.parts, mono_ms())
        if not verdict.done:
            self._at(verdict.next_check_ms, self._check_drain)
            return
        drain, self.pending_drain = self.pending_drain, None
        self._send(drain.answer_to, P.encode(P.OkReply(drain.req_id, verdict.answer)))
        if verdict.leave_at_ms is not None:
            log.info("node %s: drained (still leading %d); leaving the cluster", self.name, verdict.answer["led_after"])
            self._at(verdict.leave_at_ms, self._request_leave)   # the answer goes out first

    def _request_leave(self) -> None:
        self.leave_requested = True
