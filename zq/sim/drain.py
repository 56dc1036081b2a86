"""The drain simulator: the shipped drain decisions (zq.node.drain) against real replication cores.

    python -m zq.sim.drain --seed S | --seeds N

Three or four nodes host a few partitions, each with three replicas (real
`zq.core.replication.Replica` cores, in-memory disks synced at once), over a network that loses
and delays messages, with leaders elected on their own. At a random time one node is drained as
zq/io/node_drain.py does it: `start_drain` names the replicas to set draining, and `check_drain`
is asked every DRAIN_CHECK_MS until it answers; new elections go on meanwhile. Some seeds run
without loss and with a long wait: those drains must finish. Time moves in fixed steps with a
list of messages in flight (not zq/sim/world.py's event heap, whose order would differ); the seed
runner and command line are zq/sim/world.py's.

Checks: the answer is true (the partitions it says the node still leads are exactly those it
leads that another voter could lead); a drain that answers before its deadline leads nothing;
once a drain answered with nothing led, the node never leads a partition with another voter
again (a draining replica never stands and refuses hand-offs); a drain on a quiet network ends
with nothing led.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from zq.core.repl_types import ReplicationConfig
from zq.core.replication import Replica
from zq.node import drain as D
from zq.node.replicas import Part
from zq.sim.checks import Violation
from zq.sim.disk import SimDisk
from zq.sim.world import main_guard, run_seeds, seed_parser
from zq.types import TopicPartition

CFG = ReplicationConfig(election_timeout_ms=100, heartbeat_interval_ms=20, fetch_retry_ms=30)
STEP_MS = 10                      # the simulated loop's pass
RUN_MS = 3_000
TOPIC_ID = 1


@dataclass
class DrainResult:
    seed: int
    ok: bool = True
    invariant: str = ""
    detail: str = ""
    drained: bool = False         # the drain answered
    led_before: int = 0
    led_after: int = -1


class DrainSim:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.names = ("a", "b", "c", "d")[:self.rng.choice((3, 4))]
        self.quiet = self.rng.random() < 0.5
        self.loss = 0.0 if self.quiet else self.rng.choice((0.02, 0.1))
        self.wait_ms = 1_500 if self.quiet else self.rng.choice((50, 500, 1_500))
        self.partitions = {p: tuple(self.rng.sample(self.names, 3)) for p in range(self.rng.randint(2, 6))}
        self.now = 0
        self.parts: dict[str, dict[TopicPartition, Part]] = {n: {} for n in self.names}
        self.disks = {n: SimDisk([p for p, rs in self.partitions.items() if n in rs]) for n in self.names}
        self.queue: list[tuple[int, str, TopicPartition, object]] = []   # (arrival, to, tp, message)
        for p, replicas in self.partitions.items():
            tp = TopicPartition(TOPIC_ID, p)
            for n in replicas:
                store = self.disks[n].volatile[p]
                r = Replica(n, replicas, store, rng=self.rng, now_ms=0, config=CFG)
                self.parts[n][tp] = Part(tp, "t", r, True)
        self.victim = self.rng.choice(self.names)
        self.drain_at = self.rng.randint(400, 1_000)
        self.pending: D.PendingDrain | None = None
        self.next_check = 0
        self.answered_clean = False     # the drain answered with nothing led

    def run(self) -> DrainResult:
        r = DrainResult(self.seed)
        try:
            while self.now < RUN_MS:
                self.step(r)
            if self.quiet and not (r.drained and r.led_after == 0):
                raise Violation("a drain on a quiet network hands everything off",
                                f"{self.victim}: answered {r.drained}, still leading {r.led_after}")
        except Violation as v:
            r.ok, r.invariant, r.detail = False, v.invariant, v.detail
        return r

    def step(self, r: DrainResult) -> None:
        self.now += STEP_MS
        arrived = [m for m in self.queue if m[0] <= self.now]
        self.queue = [m for m in self.queue if m[0] > self.now]
        for _, to, tp, msg in arrived:
            self.parts[to][tp].replica.step(msg)
        for n in self.names:
            for part in self.parts[n].values():
                part.replica.tick(self.now)
            self.flush(n)
        if self.pending is None and not r.drained and self.now >= self.drain_at:
            self.pending, hand_off = D.start_drain(self.parts[self.victim], 1, "client", self.wait_ms, 60_000, False,
                                                   self.now)
            r.led_before = self.pending.led_before
            for tp in hand_off:
                self.parts[self.victim][tp].replica.set_draining(True)
            self.flush(self.victim)
        if self.pending is not None and self.now >= self.next_check:
            self.check(r)
        if self.answered_clean and D.led_elsewhere_possible(self.parts[self.victim]):
            raise Violation("a drained node leads nothing", f"{self.victim} leads again at {self.now} ms")

    def check(self, r: DrainResult) -> None:
        verdict = D.check_drain(self.pending, self.victim, self.parts[self.victim], self.now)
        if not verdict.done:
            self.next_check = verdict.next_check_ms
            return
        led = D.led_elsewhere_possible(self.parts[self.victim])
        names = sorted(f"t/{tp.partition}" for tp in led)
        answer = verdict.answer
        if answer["led_after"] != len(led) or sorted(answer["still_leading"]) != names:
            raise Violation("a drain's answer is true", f"{answer} but {self.victim} leads {names}")
        if self.now < self.pending.deadline_ms and led:
            raise Violation("a drain that answers early leads nothing", f"{answer} at {self.now} ms")
        r.drained, r.led_after = True, answer["led_after"]
        self.answered_clean = not led
        self.pending = None

    def flush(self, n: str) -> None:
        """The node's pass: every replica's Ready written and synced, then its messages sent."""
        for tp, part in self.parts[n].items():
            replica = part.replica
            for _ in range(4):
                rd = replica.ready()
                if rd.empty:
                    replica.advance()
                    break
                self.disks[n].write(tp.partition, rd)
                self.disks[n].sync()
                replica.advance()
                if rd.has_writes:
                    replica.on_persisted(rd.log_end)
                for out in rd.messages:
                    for to in (replica.peers if out.to is None else (out.to,)):
                        if to in self.parts and tp in self.parts[to] and self.rng.random() >= self.loss:
                            self.queue.append((self.now + self.rng.randint(1, 15), to, tp, out.message))


PROGRESS_EVERY = 100   # seeds between progress lines


def run_seed(seed: int) -> DrainResult:
    return DrainSim(seed).run()


def main(argv: list[str] | None = None) -> int:
    args = seed_parser("python -m zq.sim.drain", "the drain simulator").parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    still_led = 0

    def observe(r: DrainResult) -> None:
        nonlocal still_led
        still_led += max(0, r.led_after)

    run = run_seeds(run_seed, seeds, ("drained", "led_before"), lambda r: f"python -m zq.sim.drain --seed {r.seed}",
                    0 if args.seed is not None else PROGRESS_EVERY, observe)
    print(run.summary(f"{run.totals['drained']} drains answered, {run.totals['led_before']} partitions led before, "
                      f"{still_led} still led after"))
    return run.exit_code()


if __name__ == "__main__":
    main_guard(main)
