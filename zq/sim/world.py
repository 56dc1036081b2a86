"""The world every simulator shares: a heap of timed events with its trace hash, and the seed runner.

`EventHeap` is a simulator's only scheduler: events `(time_ms, sequence, kind, args)`, the sequence
breaking ties in push order, so one seed always runs the same events in the same order. Each event
popped is recorded in the heap's trace hash (blake2b, 16 bytes) as `time|kind|args;`; the caller
gives the args' text, so each simulator keeps its own trace format. A simulator with two heaps on one
clock (a membership layer and its host's faults) records both into one trace.

`seed_parser` is the command line (`--seed S` replays one seed, `--seeds N [--start K]` runs many,
`-v`); `run_seeds` runs many seeds with progress every K seeds, the failures' reports and the
counters' totals; `report_failure` prints a failure with its replay command; `main_guard` runs a
simulator's `main` so that `| head` is not an error.
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


class EventHeap:
    def __init__(self) -> None:
        self.events: list[tuple[int, int, str, tuple]] = []
        self.seq = 0
        self.trace = hashlib.blake2b(digest_size=16)

    def __len__(self) -> int:
        return len(self.events)

    def next_seq(self) -> int:
        """The next sequence number: events' tie-breaker, and an id unique in this run for the caller."""
        self.seq += 1
        return self.seq

    def push(self, time_ms: int, kind: str, args: tuple) -> None:
        heapq.heappush(self.events, (time_ms, self.next_seq(), kind, args))

    def next_ms(self) -> int | None:
        return self.events[0][0] if self.events else None

    def pop(self) -> tuple[int, str, tuple]:
        time_ms, _seq, kind, args = heapq.heappop(self.events)
        return time_ms, kind, args

    def keep(self, kinds: tuple[str, ...]) -> None:
        """Drop every event whose kind is not in `kinds`, keeping the list as it was, as zq/sim/members.py
        always did: the rest is not re-heapified, so it may pop out of time order. Heapifying would change
        no result of membership seeds 0-249; it is left to a change that may alter traces."""
        self.events = [e for e in self.events if e[2] in kinds]

    def record(self, time_ms: int, kind: str, args_text: str) -> None:
        self.trace.update(f"{time_ms}|{kind}|{args_text};".encode())

    def trace_hash(self) -> str:
        return self.trace.hexdigest()


# ------------------------------------------------------------------------------------------------
# Command line


def seed_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """`--seed S` replays one seed, `--seeds N [--start K]` runs many; each simulator adds its own options."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--seed", type=int, help="replay one seed")
    group.add_argument("--seeds", type=int, help="run this many seeds")
    ap.add_argument("--start", type=int, default=0, help="first seed with --seeds")
    ap.add_argument("-v", "--verbose", action="store_true", help="print faults and phases")
    return ap


def report_failure(r: Any, replay: str) -> None:
    """A failed seed: its invariant, the step and phase where it broke (if the result has them), the replay."""
    if hasattr(r, "failed_step"):
        print(f"FAIL seed {r.seed}: invariant '{r.invariant}' broken at step {r.failed_step} ({r.phase} phase)")
        print(f"  {r.detail}")
        print(f"  replay: {replay}")
    else:
        print(f"FAIL seed {r.seed}: {r.invariant}: {r.detail}\n  replay: {replay}")


@dataclass
class SeedRun:
    count: int
    totals: dict[str, int]
    failures: list = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)

    def summary(self, counters: str | None = None) -> str:
        """`N seeds in T s: F failed; <counters>`, by default the totals as `value name, ...`."""
        if counters is None:
            counters = ", ".join(f"{v} {k}" for k, v in self.totals.items())
        return f"{self.count} seeds in {time.monotonic() - self.began:.1f} s: {len(self.failures)} failed; {counters}"

    def print_replays(self, replay: Callable[[Any], str]) -> None:
        for r in self.failures:
            print(f"  {replay(r)}   # {r.invariant}")

    def exit_code(self) -> int:
        return 1 if self.failures else 0


def run_seeds(run_seed: Callable[[int], Any], seeds: Iterable[int], totals: Iterable[str],
              replay: Callable[[Any], str], progress_every: int = 100,
              on_result: Callable[[Any], None] | None = None) -> SeedRun:
    """Run each seed; sum the named counters of its result; report each failure with its replay command
    as it happens; print `k/N seeds, f failed, s` every `progress_every` seeds (0: never) and at the end."""
    seeds = list(seeds)
    run = SeedRun(len(seeds), dict.fromkeys(totals, 0))
    for i, seed in enumerate(seeds, 1):
        r = run_seed(seed)
        for k in run.totals:
            run.totals[k] += getattr(r, k)
        if on_result is not None:
            on_result(r)
        if not r.ok:
            run.failures.append(r)
            report_failure(r, replay(r))
        if progress_every and (i % progress_every == 0 or i == run.count):
            print(f"  {i}/{run.count} seeds, {len(run.failures)} failed, {time.monotonic() - run.began:.1f} s",
                  flush=True)
    return run


def main_guard(main: Callable[[], int]) -> None:
    """Exit with `main()`'s code; `python -m zq.sim... | head` is a normal way to look, not an error."""
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
