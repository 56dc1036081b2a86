"""Retry timing for nacked and timed-out deliveries: exponential backoff with jitter.

Pure arithmetic: the caller passes the attempt number and a random number in [0, 1), so the
same inputs always give the same delay (the simulator and the tests choose the random numbers;
only the shell makes a `random.Random`).

The delay before retry number `attempt` (1 for the retry after the first failed delivery) is

    base(attempt)  = min(max_ms, initial_ms * multiplier ** (attempt - 1))
    delay_ms       = min(max_ms, base(attempt) * (1 + jitter * (2 * rnd - 1)))

so every delay lies in the envelope [base * (1 - jitter), min(max_ms, base * (1 + jitter))],
whose two edges never go down as `attempt` grows, and no delay exceeds `max_ms`. Jitter spreads
the retries of many messages that failed together (a downstream outage) so they do not return
together as a retry storm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial_ms: int
    max_ms: int
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        # These come from topic settings, i.e. from a user: say which one is wrong.
        if self.initial_ms < 0:
            raise ValueError(f"backoff initial must be >= 0 ms, got {self.initial_ms}")
        if self.max_ms < self.initial_ms:
            raise ValueError(f"backoff max ({self.max_ms} ms) must be >= initial ({self.initial_ms} ms)")
        if not (self.multiplier >= 1.0 and math.isfinite(self.multiplier)):
            raise ValueError(f"backoff multiplier must be a finite number >= 1, got {self.multiplier}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def base_ms(self, attempt: int) -> float:
        """The centre of the envelope for retry number `attempt` (>= 1), before jitter."""
        assert attempt >= 1, attempt
        if self.initial_ms == 0:
            return 0.0
        if self.multiplier == 1.0:
            return float(self.initial_ms)
        # Compare exponents rather than computing multiplier ** n, which overflows a float for the
        # attempt counts a poison message reaches when max_deliveries is large.
        steps_to_cap = math.log(self.max_ms / self.initial_ms) / math.log(self.multiplier)
        if attempt - 1 >= steps_to_cap:
            return float(self.max_ms)
        return min(float(self.max_ms), self.initial_ms * self.multiplier ** (attempt - 1))

    def delay_ms(self, attempt: int, rnd: float) -> int:
        """Milliseconds to wait before retry number `attempt` (>= 1); `rnd` is uniform in [0, 1)."""
        assert 0.0 <= rnd < 1.0, rnd
        base = self.base_ms(attempt)
        return int(min(float(self.max_ms), base * (1.0 + self.jitter * (2.0 * rnd - 1.0))))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """What a topic says about redelivery: how many deliveries a message gets, and how far apart.

    The `max_deliveries`-th delivery that ends without an ack (a nack or an expired lease) sends
    the message to the dead-letter topic."""

    max_deliveries: int = 5
    backoff: BackoffPolicy = BackoffPolicy(initial_ms=1_000, max_ms=60_000)

    def __post_init__(self) -> None:
        if self.max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {self.max_deliveries}")
