"""The simulated network: which messages arrive, when, and how many times.

Every send asks `deliveries` for a list of arrival times: empty when the message is lost (random
loss, a network partition between the two nodes, a PUB/SUB drop of a broadcast, or a
subscriber that has not finished joining), two when it is duplicated. Independent random delays
reorder messages between the same pair of nodes, as separate sockets may. Clients reach every
node (their link only loses and delays), so the simulator can drive an isolated old leader.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NetworkFaults:
    loss: float = 0.0            # probability a message is lost
    duplicate: float = 0.0       # probability a delivered message arrives twice
    delay_ms_max: int = 2        # one-way delay is uniform in [1, delay_ms_max]
    pub_drop: float = 0.0        # extra loss for the leader's broadcasts (PUB/SUB high-water mark)
    slow_joiner_ms_max: int = 0  # after a restart, broadcasts to the node are dropped this long


CALM = NetworkFaults()


class SimNetwork:
    def __init__(self, rng: random.Random, faults: NetworkFaults) -> None:
        self.rng = rng
        self.faults = faults
        self.blocked: frozenset[tuple[str, str]] = frozenset()  # directed (src, dst) pairs cut
        self.joined_at_ms: dict[str, int] = {}  # node -> when its subscriptions take effect

    def cut(self, side_a: list[str], side_b: list[str]) -> None:
        pairs = set()
        for a in side_a:
            for b in side_b:
                pairs.add((a, b))
                pairs.add((b, a))
        self.blocked = frozenset(pairs)

    def heal(self) -> None:
        self.blocked = frozenset()

    def rejoin(self, node: str, now_ms: int) -> None:
        if self.faults.slow_joiner_ms_max:
            self.joined_at_ms[node] = now_ms + self.rng.randrange(self.faults.slow_joiner_ms_max + 1)

    def deliveries(self, now_ms: int, src: str, dst: str, broadcast: bool) -> list[int]:
        f = self.faults
        rng = self.rng
        if (src, dst) in self.blocked:
            return []
        if broadcast and (now_ms < self.joined_at_ms.get(dst, 0) or (f.pub_drop and rng.random() < f.pub_drop)):
            return []
        return self._arrivals(now_ms)

    def client_deliveries(self, now_ms: int) -> list[int]:
        return self._arrivals(now_ms)

    def _arrivals(self, now_ms: int) -> list[int]:
        f = self.faults
        rng = self.rng
        if f.loss and rng.random() < f.loss:
            return []
        times = [now_ms + rng.randint(1, f.delay_ms_max)]
        if f.duplicate and rng.random() < f.duplicate:
            times.append(now_ms + rng.randint(1, f.delay_ms_max))
        return times
