"""`zq status` and metrics, the real host's side: gather every node's local view (bounded wait)
and the /metrics snapshot. What the views and the picture say is zq.node.status (pure); this
room sends, waits and reads the stored batches' append times it needs.
"""
from __future__ import annotations

from typing import Any

from zq import protocol as P
from zq.errors import ZqError
from zq.node import status as S
from zq.types import META_TP, TopicPartition
from zq.io.node_common import IN_SYNC_READ_BYTES, METRICS_REFRESH_MS, NODE_ALIVE_MS, mono_ms, now_ms


class StatusMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    def on_status(self, identity: bytes, msg: P.StatusRequest, payload: list[bytes]) -> None:
        """Gather every reachable node's local view (bounded wait), then answer with the whole picture."""
        others = [n for n in sorted(set(self.meta.nodes) | set(self.addresses)) if n != self.name]
        gather = S.StatusGather(self.name, self._local_partitions_view(), others)

        def finish() -> None:
            views = gather.finish()
            if views is not None:
                self._send(identity, P.encode(P.StatusReply(msg.req_id, self._status_doc(views))))

        def on_reply(name: str, reply: Any, _payload: list) -> None:
            if gather.answered(name, reply.partitions if isinstance(reply, P.LocalStatusReply) else None):
                finish()

        for name in others:
            self._request(name, P.LocalStatusRequest(next(self._req_ids)),
                          lambda r, pl, name=name: on_reply(name, r, pl), timeout_ms=S.STATUS_WAIT_MS)
        if not others:
            finish()
        else:
            self._at(mono_ms() + S.STATUS_WAIT_MS + 50, finish)

    def on_local_status(self, identity: bytes, msg: P.LocalStatusRequest, payload: list[bytes]) -> None:
        self._send(identity, P.encode(P.LocalStatusReply(
            msg.req_id, {"name": self.name, "address": self.config.address, "incarnation": self.incarnation,
                         "started_ms": self.started_ms}, self._local_partitions_view())))

    def _local_partitions_view(self) -> list[dict]:
        """The partitions this node leads, with what only their leader knows (zq.node.status)."""
        return S.local_partitions_view(self.name, self.parts, mono_ms(), NODE_ALIVE_MS, self._missing_for_ms,
                                       self._lag_ms)

    def _missing_for_ms(self, tp: TopicPartition, end: int) -> int:
        """How long ago the first produced batch from `end` on was appended: how long a replica
        that holds the log up to `end` has lacked data. Control batches (markers, configurations,
        append time 0) do not count; nothing after `end` on this disk yet is 0."""
        try:
            return S.age_of_first_batch_ms(self.store.read(tp, end, IN_SYNC_READ_BYTES), now_ms(), skip_control=True)
        except ZqError:
            return 0

    def _lag_ms(self, tp: TopicPartition, slowest_end: int, log_end: int) -> int:
        """How old the oldest batch is that some replica does not hold yet (0 when all hold all)."""
        if slowest_end >= log_end:
            return 0
        try:
            # not yet on this node's disk either: younger than a loop pass (0)
            return S.age_of_first_batch_ms(self.store.read(tp, slowest_end, 1), now_ms(), skip_control=False)
        except ZqError:
            return 0

    def _status_doc(self, views: dict[str, list]) -> dict:
        return S.status_doc(self.config.cluster, self.name, self.leader_of(META_TP)[0], views, self.meta,
                            self.voters, self._nodes_view())

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
