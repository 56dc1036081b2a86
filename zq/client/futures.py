"""Futures for produced records that cost far less than one `concurrent.futures.Future` each.

`concurrent.futures.Future()` makes a `threading.Condition` (and its lock) per instance, which
costs more than the rest of `Producer.send`. A record's future only ever completes together with
the rest of its batch, so all the futures of one batch share one Condition, and the batch
completes them in one pass under it with one `notify_all`. They are still real
`concurrent.futures.Future`s: `isinstance`, `result(timeout)`, `exception()`, `done()`,
`add_done_callback`, `concurrent.futures.wait` and `as_completed` all work, because those only
use the attributes set here.

A send cannot be taken back once handed to the producer, so the futures start RUNNING and
`cancel()` returns False, as for a task an executor has started.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from concurrent.futures._base import FINISHED, RUNNING
from typing import Any, Callable, Iterable

log = logging.getLogger("zq.client")


class BatchFuture(Future):
    """A Future that shares its Condition with the other records of its batch."""

    def __init__(self, condition: threading.Condition) -> None:  # noqa: super().__init__ on purpose not called
        self._condition = condition
        self._state = RUNNING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks = []


def new_condition() -> threading.Condition:
    # Re-entrant, as Future's own: `as_completed` and `wait` acquire the condition of every
    # future they are given, and here many of those are one and the same condition.
    return threading.Condition(threading.RLock())


def complete_all(condition: threading.Condition, futures: list[Future],
                 results: Iterable[Any] | None = None, error: BaseException | None = None) -> None:
    """Finish every future of one batch: with `results` (one per future, in order) or with `error`.

    One pass under the shared condition, one notify_all; done-callbacks run after, outside the
    lock, as `Future.set_result` does. A future finished already (never by us) is left alone."""
    with_callbacks = []
    with condition:
        if error is not None:
            for f in futures:
                if f._state == FINISHED:
                    continue
                f._exception = error
                f._state = FINISHED
                if f._waiters:
                    for w in f._waiters:
                        w.add_exception(f)
                if f._done_callbacks:
                    with_callbacks.append(f)
        else:
            assert results is not None
            for f, r in zip(futures, results):
                if f._state == FINISHED:
                    continue
                f._result = r
                f._state = FINISHED
                if f._waiters:
                    for w in f._waiters:
                        w.add_result(f)
                if f._done_callbacks:
                    with_callbacks.append(f)
        condition.notify_all()
    for f in with_callbacks:
        _invoke(f)


def _invoke(f: Future) -> None:
    cb: Callable[[Future], Any]
    for cb in f._done_callbacks:
        try:
            cb(f)
        except Exception:
            log.exception("exception calling callback for %r", f)
