"""Futures for produced records that cost next to nothing each.

A plain `concurrent.futures.Future()` makes a `threading.Condition` (with its lock) and two lists
per instance, and completing it takes that lock: together more than the rest of
`Producer.send`, and garbage for the collector to walk. A record's future only ever completes
together with the rest of its batch, so here the batch holds everything they share (one
Condition, the state, the error, the base offset and epoch), and each `BatchFuture` holds only
its batch and its index in it. Completing a batch is one assignment under its Condition and one
`notify_all`, whatever the number of records; a record's `RecordMetadata` is made when someone
asks for its result.

They are still real `concurrent.futures.Future`s: `isinstance`, `result(timeout)`,
`exception()`, `done()`, `add_done_callback`, `concurrent.futures.wait` and `as_completed` all
work, because the attributes those read (`_condition`, `_state`, `_result`, `_exception`,
`_waiters`, `_done_callbacks`) are properties here that read the batch. The lists of waiters and
callbacks are made only for the few futures that get one, and the batch remembers those futures
so that completing it touches only them.

A send cannot be taken back once handed to the producer, so a future is RUNNING from the start
and `cancel()` returns False, as for a task an executor has started. `set_result` and
`set_exception` are not for users of these futures: the batch completes them.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from concurrent.futures._base import FINISHED, RUNNING
from typing import Any, NamedTuple

log = logging.getLogger("zq.client")


class RecordMetadata(NamedTuple):
    """Where a record was written. offset and epoch are -1 when acks=none: the node did not say."""

    topic: str
    partition: int
    offset: int
    epoch: int


class FutureGroup:
    """What the futures of one batch share. The producer's batch is one of these."""

    __slots__ = ("topic", "partition", "condition", "state", "error", "base_offset", "epoch", "watched", "with_callbacks")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        # Re-entrant, as Future's own: `as_completed` and `wait` acquire the condition of every
        # future they are given, and here many of those are one and the same condition.
        self.condition = threading.Condition(threading.RLock())
        self.state = RUNNING
        self.error: BaseException | None = None
        self.base_offset = -1
        self.epoch = -1
        self.watched: list[BatchFuture] = []         # futures someone waits on through wait()/as_completed()
        self.with_callbacks: list[BatchFuture] = []  # futures with done-callbacks

    def complete(self, base_offset: int = -1, epoch: int = -1, error: BaseException | None = None) -> None:
        """Finish every future of the group: record i is at base_offset + i, or all fail with `error`.
        Callbacks run after, outside the lock, as `Future.set_result` does; a second call does nothing."""
        with self.condition:
            if self.state == FINISHED:
                return
            self.base_offset, self.epoch, self.error = base_offset, epoch, error
            self.state = FINISHED
            for f in self.watched:
                for w in f._waiters_list:
                    w.add_exception(f) if error is not None else w.add_result(f)
            self.condition.notify_all()
        for f in self.with_callbacks:
            for cb in f._callbacks_list:
                try:
                    cb(f)
                except Exception:
                    log.exception("exception calling callback for %r", f)


class BatchFuture(Future):
    """The future of record `_i` of the batch `_g`."""

    __slots__ = ("_g", "_i")
    _waiters_list: list | None = None     # made on first use, in the instance
    _callbacks_list: list | None = None

    def __init__(self, group: FutureGroup, index: int) -> None:  # Future.__init__ is not called on purpose
        self._g = group
        self._i = index

    @property
    def _condition(self) -> threading.Condition:
        return self._g.condition

    @property
    def _state(self) -> str:
        return self._g.state

    @_state.setter
    def _state(self, value: str) -> None:
        raise RuntimeError("a produced record's future is completed by its batch, not by set_result/cancel")

    @property
    def _result(self) -> RecordMetadata | None:
        g = self._g
        if g.state != FINISHED or g.error is not None:
            return None
        return RecordMetadata(g.topic, g.partition, g.base_offset + self._i if g.base_offset >= 0 else -1, g.epoch)

    @property
    def _exception(self) -> BaseException | None:
        return self._g.error

    @property
    def _waiters(self) -> list:
        """Read by wait()/as_completed() under the condition, to add or remove a waiter."""
        w = self._waiters_list
        if w is None:
            w = self._waiters_list = []
            self._g.watched.append(self)
        return w

    @property
    def _done_callbacks(self) -> list:
        """Read by add_done_callback() under the condition while the future is not done."""
        cbs = self._callbacks_list
        if cbs is None:
            cbs = self._callbacks_list = []
            self._g.with_callbacks.append(self)
        return cbs

    def __repr__(self) -> str:
        g = self._g
        return f"<BatchFuture {g.topic}/{g.partition} #{self._i} {g.state}>"


def completed(result: Any = None, error: BaseException | None = None) -> Future:
    """An ordinary finished Future (for paths that have no batch)."""
    f: Future = Future()
    if error is not None:
        f.set_exception(error)
    else:
        f.set_result(result)
    return f
