"""The consumer groups service's operator room: `ResetGroup` (replay, seek), carried to each
partition's leader, and `DescribeGroups` / the metrics rows, gathered from every node
(zq/node/groups.py, "Reset" and "Describe", tells how the service works).
"""
from __future__ import annotations

from typing import Any, Callable

from zq import batch as zbatch
from zq import protocol as P
from zq import group_protocol as G
from zq.core.grouplead import reset_epoch_floor
from zq.errors import InvalidRequest, LeaderNotAvailable, NotLeader, ProtocolError, UnknownPartition, ZqError
from zq.node.group_common import (GroupServiceState, Key, _check_name, _Held, describe_wait_ms, log,
                                  reset_wait_ms)
from zq.types import TopicPartition


class AdminRoom(GroupServiceState):
    """Resets and descriptions of groups, asked by an operator (`zq groups`)."""

    # ------------------------------------------------------------------ reset

    def on_reset_group(self, identity: bytes, msg: G.ResetGroup, payload: list) -> None:
        chosen = (msg.to_offset is not None) + (msg.to_time_ms is not None) + bool(msg.earliest)
        if chosen != 1:
            raise InvalidRequest("a reset goes to exactly one of an offset, a time or the earliest offset")
        if (msg.to_offset is not None and msg.to_offset < 0) or (msg.to_time_ms is not None and msg.to_time_ms < 0):
            raise InvalidRequest("offsets and times are >= 0")
        _check_name(msg.group, "group")
        t = self.host.meta.topic(msg.topic)
        n = len(t.partitions)
        if msg.partition is not None and not 0 <= msg.partition < n:
            raise UnknownPartition(f"topic {msg.topic!r} has partitions 0 to {n - 1}, not {msg.partition}")
        if msg.to_offset is not None and msg.partition is None and n > 1:
            raise InvalidRequest("an offset belongs to one partition: give the partition too")
        partitions = [msg.partition] if msg.partition is not None else list(range(n))
        results: dict[int, Any] = {}
        state = {"left": len(partitions), "done": False}

        def finish() -> None:
            if state["done"]:
                return
            state["done"] = True
            errors = [results[p] for p in sorted(results) if isinstance(results[p], ZqError)]
            missing = [p for p in partitions if p not in results]
            if errors:
                self.host.reply_error(identity, msg.req_id, errors[0])
            elif missing:
                self.host.reply_error(identity, msg.req_id, LeaderNotAvailable(
                    f"the leaders of partitions {missing} did not answer; retry the reset"))
            else:
                self.host.reply(identity, P.OkReply(msg.req_id, {
                    "group": msg.group, "topic": msg.topic,
                    "partitions": [{"partition": p, "offset": results[p][0], "epoch": results[p][1]}
                                   for p in sorted(results)]}))

        def done(p: int, result: Any) -> None:
            results[p] = result
            state["left"] -= 1
            if state["left"] <= 0:
                finish()

        for p in partitions:
            if self.host.leads(msg.topic, p):
                try:
                    done(p, self._reset_local(msg, t, p))
                except ZqError as e:
                    done(p, e)
            elif msg.forwarded:
                done(p, self._not_leader(msg.topic, p))
            else:
                self._forward_reset(msg, p, done)
        if not state["done"]:
            self.host.at(self.host.now_ms() + reset_wait_ms + 100, finish)

    def _not_leader(self, topic: str, p: int) -> ZqError:
        leader, address = self.host.leader_address(topic, p)
        if leader is None or leader == self.host.name:
            return LeaderNotAvailable(f"{topic}/{p} has no leader right now; retry shortly")
        return NotLeader(f"{self.host.name} does not lead {topic}/{p}; {leader} does", leader=leader,
                         address=address or "")

    def _forward_reset(self, msg: G.ResetGroup, p: int, done: Callable[[int, Any], None]) -> None:
        leader = self.host.leader_address(msg.topic, p)[0]
        if leader is None or leader == self.host.name:
            done(p, LeaderNotAvailable(f"{msg.topic}/{p} has no leader right now; retry shortly"))
            return
        forwarded = G.ResetGroup(self.host.next_req_id(), msg.group, msg.topic, p, msg.to_offset, msg.to_time_ms,
                                 msg.earliest, True)

        def on_reply(reply: Any, _payload: list) -> None:
            if isinstance(reply, P.OkReply):
                rows = reply.data.get("partitions") or [{}]
                done(p, (rows[0].get("offset"), rows[0].get("epoch", 0)))
            else:
                done(p, reply if isinstance(reply, ZqError) else ProtocolError("unexpected reply to a reset"))

        self.host.request_peer(leader, forwarded, on_reply, reset_wait_ms)

    def _reset_local(self, msg: G.ResetGroup, t: Any, p: int) -> tuple[int, int]:
        """(offset the group now starts at, the reset epoch that opened)."""
        log_start, hw = self.host.partition_bounds(t.name, p)
        if msg.earliest:
            target = log_start
        elif msg.to_time_ms is not None:
            found = self.host.offset_for_time(TopicPartition(t.id, p), msg.to_time_ms)
            target = hw if found is None else min(max(found, log_start), hw)
        else:
            target = min(max(msg.to_offset, log_start), hw)
        key = (msg.group, t.id, p)
        held = self._held_or_new(key, lambda: target)
        held.reset(target, reset_epoch_floor(self.host.wall_ms(), self.host.name))
        self.host.counters["group_resets"] += 1
        log.info("group %s: %s/%d reset to offset %d (epoch %d)", msg.group, t.name, p, target, held.state.reset_epoch)
        return target, held.state.reset_epoch

    # ------------------------------------------------------------------ describe

    def on_local_groups(self, identity: bytes, msg: G.LocalGroupsRequest, payload: list) -> None:
        self.host.reply(identity, G.LocalGroupsReply(msg.req_id, self.host.name, self._local_rows(msg.group)))

    def _local_rows(self, only: str | None) -> list[dict]:
        """Rows for the (group, partition) pairs whose partition this node leads."""
        node = self.host
        now = node.wall_ms()
        rows = []
        seen: set[Key] = set()
        for key in sorted(self.held):
            group, topic_id, p = key
            t = node.meta.topics_by_id.get(topic_id)
            if (only is not None and group != only) or t is None or not node.leads(t.name, p):
                continue
            held = self.held[key]
            seen.add(key)
            rows.append(self._row(group, t.name, p, held, now))
        for group in sorted(self.memberships):
            if only is not None and group != only:
                continue
            for topic, p in self._partitions_of(self.memberships[group]):
                t = node.meta.topics[topic]
                if (group, t.id, p) not in seen and node.leads(topic, p):
                    rows.append(self._row(group, topic, p, None, now))
        return rows

    def _row(self, group: str, topic: str, p: int, held: _Held | None, now: int) -> dict:
        log_start, hw = self.host.partition_bounds(topic, p)
        committed = held.state.committed if held is not None else None
        position = max(log_start, committed if committed is not None else log_start)
        lag = max(0, hw - position)
        lag_seconds = 0.0
        if lag:
            for value in self.host.read_committed(topic, p, position, 1):
                lag_seconds = round(max(0, now - zbatch.unpack_header(value).append_time_ms) / 1000.0, 3)
                break
        stats = held.state.stats() if held is not None else None
        return {"group": group, "topic": topic, "partition": p, "committed": committed, "lag": lag,
                "lag_seconds": lag_seconds, "in_flight": stats.in_flight if stats else 0,
                "retrying": stats.retrying if stats else 0,
                "dead_letter_due": stats.dead_letter_due if stats else 0,
                "dead_lettered": held.dead_lettered if held is not None else 0,
                "epoch": held.state.reset_epoch if held is not None else 0, "leader": self.host.name}

    def metrics_rows(self) -> list[dict]:
        """Consumer lag and delivery state of the (group, partition) pairs this node leads, for the
        node's /metrics snapshot (called on the loop thread about once a second)."""
        return self._local_rows(None)

    def on_describe_groups(self, identity: bytes, msg: G.DescribeGroups, payload: list) -> None:
        node = self.host
        rows: dict[str, list] = {node.name: self._local_rows(msg.group)}
        others = [n for n in node.known_nodes() if n != node.name]
        state = {"left": len(others), "done": False}

        def finish() -> None:
            if not state["done"]:
                state["done"] = True
                node.reply(identity, P.OkReply(msg.req_id, {"groups": self._describe_doc(msg.group, rows)}))

        def on_reply(name: str, reply: Any, _payload: list) -> None:
            if isinstance(reply, G.LocalGroupsReply) and isinstance(reply.rows, list):
                rows[name] = [r for r in reply.rows if isinstance(r, dict)]
            state["left"] -= 1
            if state["left"] <= 0:
                finish()

        for name in others:
            node.request_peer(name, G.LocalGroupsRequest(node.next_req_id(), msg.group),
                              lambda r, pl, name=name: on_reply(name, r, pl), describe_wait_ms)
        if not others:
            finish()
        else:
            node.at(node.now_ms() + describe_wait_ms + 50, finish)

    def _describe_doc(self, only: str | None, rows_by_node: dict[str, list]) -> list[dict]:
        best: dict[tuple[str, str, int], dict] = {}
        for name in sorted(rows_by_node):
            for row in rows_by_node[name]:
                try:
                    k = (row["group"], row["topic"], row["partition"])
                except (KeyError, TypeError):
                    continue
                # Two nodes may both lead for a moment: the newer epoch, then the further commit wins.
                rank = (row.get("epoch") or 0, row.get("committed") if row.get("committed") is not None else -1)
                old = best.get(k)
                if old is None or rank > (old.get("epoch") or 0, old.get("committed") if old.get("committed") is not None else -1):
                    best[k] = row
        groups = set(self.memberships) | {g for g, _, _ in best}
        out = []
        for group in sorted(groups):
            if only is not None and group != only:
                continue
            m = self.memberships.get(group)
            members = []
            if m is not None:
                for member_id in sorted(m.live_members()):
                    members.append({"id": member_id, "partitions": [{"topic": t, "partition": p}
                                                                    for t, p in m.assignment_of(member_id)]})
            parts = [{k: v for k, v in row.items() if k not in ("group", "epoch", "dead_letter_due")}
                     for (g, _, _), row in sorted(best.items()) if g == group]
            out.append({"group": group, "generation": m.generation if m is not None else 0, "members": members,
                        "partitions": parts})
        return out
