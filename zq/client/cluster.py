"""`ClusterView`: the one object through which a client, its producers, consumers and group members
reach the cluster: the metadata snapshot, leader look-ups with NotLeader hints, the known
addresses, metadata refreshes, and requests to one node or to any node with retries until a
deadline.

Theory of operation
-------------------
The view starts from bootstrap addresses and learns every node's address from the first
MetadataReply. Metadata is refreshed when something says it is stale (NotLeader, UnknownTopic, a
partition with no leader, a timeout): from a caller's thread with `refresh` (bounded attempts over
the known addresses), or from the I/O thread with `refresh_soon` (coalesced, spaced by
`metadata_refresh_ms_min`, one address per attempt). A NotLeader that names the leader is followed
at once through a per-partition *hint* (`hint_leader`) that the next refresh clears. Any thread
may read `leader_address`: the snapshot and the hints are replaced by single stores (atomic under
the GIL), never mutated in place.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable

from zq import protocol
from zq.client.connection import Connection, check_reply
from zq.client.metadata import Metadata, parse_metadata
from zq.core import client_rules
from zq.core.retry import BackoffPolicy
from zq.errors import ConnectionFailed, ProtocolError, Timeout, UnknownTopic, ZqError
from zq.limits import Limits

log = logging.getLogger("zq.client")

metadata_attempts_max = 6          # addresses tried by one metadata refresh before it gives up
metadata_attempt_timeout_ms = 2_000  # one metadata request; short, so a dead node costs little
metadata_refresh_ms_min = 50       # refreshes asked for by the I/O thread are spaced at least this much
retry_notice_ms = 2_000            # a call retrying this long tells `on_waiting` (the CLI says it is waiting)


def _gave_up(error: ZqError, message: str) -> ZqError:
    """The same class of error as the last refusal, with the sentence that says how long we waited."""
    try:
        return type(error)(message, **error.data)
    except TypeError:   # a class with its own constructor: keep the error, reword its message
        error.message = message
        error.args = (message,)
        return error


class ClusterView:
    """What a client knows of the cluster, and how it asks. Made by `zq.Client` (`client.cluster`)."""

    def __init__(self, conn: Connection, limits: Limits, cluster: str, bootstrap: list[str],
                 on_waiting: Callable[[str, str, float], None] | None = None) -> None:
        self.conn = conn
        self.limits = limits
        self.cluster = cluster
        self.bootstrap = bootstrap
        self.metadata = Metadata()
        # Told once per call that has been retrying for `retry_notice_ms`: (what, last refusal, ms left).
        self.on_waiting = on_waiting
        self._hints: dict[tuple[str, int], str] = {}
        self._preferred: str | None = None  # the address that answered last
        self._rng = random.Random()  # jitter of retries
        self._backoff = BackoffPolicy(limits.retry_backoff_ms, max(limits.retry_backoff_ms, limits.retry_backoff_ms_max))
        self._metadata_timeout_ms = min(metadata_attempt_timeout_ms, limits.request_timeout_ms)
        # I/O thread only: coalesced background refresh.
        self._io_refreshing = False
        self._io_last_refresh_ms = 0.0
        self._io_refresh_attempt = 0

    # ------------------------------------------------------------------ what the client knows

    def leader_address(self, topic: str, partition: int) -> str | None:
        """Any thread: where to send requests for this partition now (a hint first, then the metadata)."""
        hint = self._hints.get((topic, partition))
        return hint if hint is not None else self.metadata.leader_address(topic, partition)

    def hint_leader(self, topic: str, partition: int, address: str) -> None:
        """A node said `address` leads the partition (NotLeader): use it until the next refresh."""
        self._hints[(topic, partition)] = address  # one dict store: atomic under the GIL

    def addresses(self) -> list[str]:
        """The known node addresses, the one that answered last first, then the metadata's, then bootstrap."""
        out = []
        for a in ([self._preferred] if self._preferred else []) + self.metadata.addresses() + self.bootstrap:
            if a not in out:
                out.append(a)
        return out

    def set_metadata(self, meta: Metadata) -> None:
        if meta.cluster and self.cluster and meta.cluster != self.cluster and self.metadata.cluster == "":
            log.warning("nodes say cluster %r, this client was made for %r", meta.cluster, self.cluster)
        self.metadata = meta
        self._hints = {}

    # ------------------------------------------------------------------ refreshing it

    def refresh(self) -> Metadata:
        """Caller's thread: one round of metadata requests over the known addresses (bounded by metadata_attempts_max)."""
        reply, address = self.call_any(lambda rid: protocol.MetadataRequest(rid, None),
                                       attempt_timeout_ms=self._metadata_timeout_ms, with_address=True)
        self.set_metadata(parse_metadata(check_reply(reply, protocol.MetadataReply), address))
        return self.metadata

    def refresh_until(self, ok: Any, wait_ms: float) -> Metadata:
        """Refresh until `ok(metadata)` or `wait_ms` pass (the metadata may still be spreading)."""
        deadline = time.monotonic() + wait_ms / 1000.0
        attempt = 0
        while True:
            meta = self.refresh()
            if ok(meta) or time.monotonic() >= deadline:
                return meta
            attempt += 1
            time.sleep(min(self.limits.retry_backoff_ms * attempt, self.limits.retry_backoff_ms_max,
                           max(0.0, deadline - time.monotonic()) * 1000.0) / 1000.0)

    def refresh_soon(self) -> None:
        """I/O thread: refresh in the background; many asks while one runs make one refresh."""
        if self._io_refreshing:
            return
        self._io_refreshing = True
        wait = self._io_last_refresh_ms + metadata_refresh_ms_min - time.monotonic() * 1000.0
        if wait > 0:
            self.conn.io_call_later(wait, self._io_send_refresh)
        else:
            self._io_send_refresh()

    def _io_send_refresh(self) -> None:
        addresses = self.addresses()
        address = addresses[self._io_refresh_attempt % len(addresses)]
        self._io_last_refresh_ms = time.monotonic() * 1000.0

        def done(reply: Any, frames: list, error: ZqError | None) -> None:
            self._io_refreshing = False
            if error is None:
                try:
                    self.set_metadata(parse_metadata(check_reply(reply, protocol.MetadataReply), address))
                    self._preferred = address
                    self._io_refresh_attempt = 0
                    return
                except ProtocolError as e:
                    error = e
            self._io_refresh_attempt += 1  # the next refresh asks the next address
            log.info("metadata refresh from %s failed: %s", address, error)

        self.conn.io_request(address, protocol.MetadataRequest(self.conn.new_req_id(), None),
                             (), self._metadata_timeout_ms, done)

    def partition_count(self, topic: str, wait_ms: float) -> int:
        """The topic's partition count, refreshing for up to `wait_ms` if it is not known yet. Raises UnknownTopic."""
        n = self.metadata.partition_count(topic)
        if n is None:
            n = self.refresh_until(lambda m: topic in m.topics, wait_ms).partition_count(topic)
        if n is None:
            raise UnknownTopic(f"topic {topic!r} does not exist; create it with `zq topic create {topic}` "
                               f"or client.create_topic({topic!r}, partitions=N)")
        return n

    def partitions_of(self, topic: str) -> list[int]:
        """Caller's thread: the topic's partitions, waiting out an unreachable cluster until
        `api_timeout_ms` (an unknown topic is raised after `request_timeout_ms`)."""
        return list(range(self.until_deadline(f"learning the partitions of {topic!r}",
                                              lambda: self.partition_count(topic, self.limits.request_timeout_ms))))

    # ------------------------------------------------------------------ asking it

    def call(self, address: str, msg: Any, timeout_ms: float | None = None) -> tuple[Any, list]:
        """Caller's thread: one request to `address`; (reply, payload frames). Raises what the node answers."""
        timeout = self.limits.request_timeout_ms if timeout_ms is None else timeout_ms
        fut = self.conn.call(address, msg, (), timeout)
        # The connection times the request out itself; the extra second only guards against a stuck I/O thread.
        return fut.result(timeout / 1000.0 + 1.0)

    def call_any(self, make: Any, attempt_timeout_ms: float | None = None, with_address: bool = False,
                 resend_on_timeout: bool = True) -> Any:
        """Send to the known nodes in turn until one answers (bounded); errors the node gives are raised.

        ConnectionFailed (nothing was sent) always moves on to the next node; Timeout (the node may
        have acted) only when `resend_on_timeout`, for requests that are safe to repeat."""
        last: ZqError | None = None
        addresses = self.addresses()
        for attempt in range(metadata_attempts_max):
            address = addresses[attempt % len(addresses)]
            try:
                reply, frames = self.call(address, make(self.conn.new_req_id()), attempt_timeout_ms)
            except (Timeout, ConnectionFailed) as e:
                last = e
                if self.conn.closed or (isinstance(e, Timeout) and not resend_on_timeout):
                    raise
                if attempt + 1 >= len(addresses):
                    time.sleep(min(self.limits.retry_backoff_ms * (attempt + 1), self.limits.retry_backoff_ms_max) / 1000.0)
                continue
            self._preferred = address
            return (reply, address) if with_address else (reply, frames)
        raise ConnectionFailed(f"no node of the cluster answered at {', '.join(addresses)} ({last}); "
                               "are the nodes running, and is the address right?")

    def until_deadline(self, what: str, attempt: Any, idempotent: bool = True) -> Any:
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
                if self.conn.closed or not client_rules.is_passing(e.code, e.retriable, isinstance(e, Timeout),
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

