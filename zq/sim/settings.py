"""What a simulator run draws from its seed (`Settings`), what it reports (`Result`), and the
simulated cluster's constants. (zq.sim.cluster re-exports them.)"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field, fields

from zq.core.membership import MembershipConfig
from zq.core.repl_types import ReplicationConfig
from zq.sim.network import NetworkFaults

REPLICATION_FACTOR = 3
NODES_DRAWN = (3, 3, 4, 5)   # cluster sizes a default (--nodes 3) seed draws from
PAUSED_INBOX_MAX = 1_000     # messages queued for a paused node before the rest are dropped
WALL_BASE_MS = 1_700_000_000_000   # simulated wall clocks start here (a day of skew keeps them positive)
DAY_MS = 86_400_000
SIM_CONFIG = ReplicationConfig(election_timeout_ms=150, heartbeat_interval_ms=40, fetch_retry_ms=60,
                               append_entries_max=16, append_bytes_max=256, pending_proposals_max=64)
# Clock error the retention checks allow (not skew): an ack's transit, or the time a leader
# stalled with acks queued (less than an election timeout, or it steps down).
CLOCK_MARGIN_MS = SIM_CONFIG.election_timeout_ms + 50
# The node's failure-detector timing (1 s periods, 400 ms ack timeout, 5 s suspicion and
# reconnect) scaled down ten times, so that faults outlive a suspicion within a run; the ack
# timeout still exceeds twice the simulated network's largest one-way delay (40 ms) plus the
# shell's tick latency, so a healed network holds no one suspect.
SIM_MEMBERSHIP = MembershipConfig(probe_interval_ms=200, ack_timeout_ms=100, suspicion_timeout_ms=500,
                                  reconnect_interval_ms=500)
# Small Appends split a leader's marker from the older entries before it, which is what Raft's
# figure 8 needs; a seed draws one of these.
APPEND_ENTRIES_CHOICES = (1, 2, 16)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run draws from its seed, printed first so a run explains itself."""

    nodes: int = 3
    partitions: int = 2
    producers: int = 3
    idempotent_share: float = 0.5
    steps: int = 400                 # events in the safety phase
    liveness_ms: int = 10_000        # simulated time allowed to converge after healing
    append_entries_max: int = 16
    durability: str = "fsync"        # or "replicated" (see the module docstring)
    readers: int = 1                 # consumers fetching from leaders (through their client rooms)
    sync_delay_ms_max: int = 3       # a pass's fsync takes up to this; its sends leave after it
    crash: bool = True
    pause: bool = True
    partition: bool = True
    fault_interval_ms_max: int = 300
    fault_duration_ms_max: int = 600
    reassign: bool = False           # move partitions to other nodes (needs more than 3 nodes)
    drain: bool = False              # drain a node for a while
    transfer: bool = False           # one-off leadership hand-offs
    change_interval_ms_max: int = 1000  # between reassignments, drains and hand-offs
    retention: bool = False          # delete the front of replicas' logs now and then
    retention_interval_ms_max: int = 300
    retention_ms: int = 1_000        # entries stamped this long before the leader's clock go
    clock_skew_ms: int = 0           # one node's wall clock is this far ahead (or behind)
    skewed_node: int = 0             # ... which one (index)
    disk_low: bool = False           # nodes short of disk for a while (leaders hand off)
    members: bool = False            # run the failure detector (and, with more than 3 nodes, the operator)
    crash_in_sync: bool = False      # a node may crash inside a pass's fsync, after a leader's early Appends left
    hostile: bool = False            # a hostile peer injects out-of-range and stranger messages
    hostile_interval_ms_max: int = 100
    operator_interval_ms_max: int = 1000  # between the operator's looks at a view
    disk: bool = False               # disk faults: flipped blocks, dropped WAL tails, wiped replicas and nodes
    disk_interval_ms_max: int = 1000
    early_wipe: bool = False         # a disk wiped soon after the partitions were created (epoch 1 may still lead)
    net: NetworkFaults = field(default_factory=NetworkFaults)

    @staticmethod
    def draw(rng: random.Random, nodes: int, steps: int) -> Settings:
        if nodes == 3:
            nodes = rng.choice(NODES_DRAWN)
        net = NetworkFaults(
            loss=rng.choice([0.0, 0.0, 0.02, 0.1, 0.3]),
            duplicate=rng.choice([0.0, 0.05, 0.2]),
            delay_ms_max=rng.choice([1, 3, 10, 40]),
            pub_drop=rng.choice([0.0, 0.1, 0.4]),
            slow_joiner_ms_max=rng.choice([0, 100, 300]),
        )
        return Settings(
            nodes=nodes, partitions=rng.choice([1, 2, 3]), producers=rng.choice([2, 3, 4]),
            append_entries_max=rng.choice(APPEND_ENTRIES_CHOICES),
            durability=rng.choice(["fsync", "fsync", "fsync", "replicated"]), readers=rng.choice([0, 1, 2]),
            idempotent_share=rng.choice([0.0, 0.5, 1.0]), steps=steps,
            sync_delay_ms_max=rng.choice([0, 3, 20]),
            crash=rng.random() < 0.7, pause=rng.random() < 0.5, partition=rng.random() < 0.6,
            fault_interval_ms_max=rng.choice([200, 500, 1000]),
            fault_duration_ms_max=rng.choice([200, 600, 1500]),
            reassign=nodes > REPLICATION_FACTOR and rng.random() < 0.8, drain=rng.random() < 0.4,
            transfer=rng.random() < 0.4, change_interval_ms_max=rng.choice([300, 1000, 3000]), net=net,
        )

    def draw_retention(self, rng: random.Random) -> Settings:
        """Retention is drawn from a random stream of its own, so a seed that draws none replays
        the history it had before retention was simulated."""
        return dataclasses.replace(self, retention=rng.random() < 0.6,
                                   retention_interval_ms_max=rng.choice([50, 200, 1000]),
                                   retention_ms=rng.choice([500, 1000, 2000]),
                                   clock_skew_ms=rng.choice([0, 1_000, -60_000, DAY_MS, DAY_MS, -DAY_MS]),
                                   skewed_node=rng.randrange(self.nodes))

    def draw_disk_low(self, rng: random.Random) -> Settings:
        """Nodes short of disk, from a stream of its own (see draw_retention)."""
        return dataclasses.replace(self, disk_low=rng.random() < 0.3)

    def draw_members(self, rng: random.Random) -> Settings:
        """Membership too, from a stream of its own (see draw_retention)."""
        return dataclasses.replace(self, members=rng.random() < 0.6,
                                   operator_interval_ms_max=rng.choice([100, 300, 1000]))

    def draw_hostile(self, rng: random.Random) -> Settings:
        """A hostile peer too, from a stream of its own (see draw_retention)."""
        return dataclasses.replace(self, hostile=rng.random() < 0.6, hostile_interval_ms_max=rng.choice([20, 100, 400]))

    def draw_sync_crash(self, rng: random.Random) -> Settings:
        """Crashes inside a pass's fsync too, from a stream of their own (see draw_retention)."""
        return dataclasses.replace(self, crash_in_sync=self.crash and rng.random() < 0.5)

    def draw_disk(self, rng: random.Random) -> Settings:
        """Disk faults too, from a stream of their own (see draw_retention)."""
        disk = rng.random() < 0.5
        return dataclasses.replace(self, disk=disk, disk_interval_ms_max=rng.choice([300, 1000, 2000]),
                                   early_wipe=disk and rng.random() < 0.5)

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "net"]
        parts += [f"{f.name}={getattr(self.net, f.name)}" for f in fields(self.net)]
        return " ".join(parts)


@dataclass(slots=True)
class Result:
    seed: int
    ok: bool
    settings: Settings
    steps: int = 0
    trace_hash: str = ""
    invariant: str = ""
    detail: str = ""
    failed_step: int = -1
    phase: str = "safety"
    acks: int = 0
    reads: int = 0                   # committed entries consumers read
    leader_acks: int = 0             # acks=leader answers (judged at the answer, not counted in acks)
    fetches: int = 0                 # fetch answers consumers got (FetchReply) from a node's client room
    parked: int = 0                  # of the fetches, those the room held (long-poll) past their request
    parked_woken: int = 0            # ... and answered with data (the high watermark moved)
    fetches_many: int = 0            # of the fetch answers, FetchManyReply (several partitions at once)
    elections: int = 0
    crashes: int = 0
    crashes_in_sync: int = 0         # of those, inside a pass's fsync (after a leader's Appends left early)
    pauses: int = 0
    cuts: int = 0
    peers_lost: int = 0              # closed connections seen that brought a follower's election forward
    reassignments: int = 0           # target changes drawn
    reassigned: int = 0              # times a partition's committed configuration reached its target
    config_changes: int = 0          # configuration entries leaders appended
    removals: int = 0                # replicas deleted once removed
    drains: int = 0
    transfers: int = 0               # hand-offs asked for (one-off)
    handoffs: int = 0                # elections a TimeoutNow started
    converged_ms: int = -1           # simulated time the liveness phase needed to converge
    retained: int = 0                # retention runs that deleted the front of a log
    start_ats: int = 0               # replicas that restarted their log at their leader's start
    start_ats_moved: int = 0         # of those, replicas a reassignment created
    retention_duplicates: int = 0    # idempotent retries written again, the first copy deleted
    false_deaths: int = 0            # a view declared a node DEAD whose process was running
    operator_moves: int = 0          # targets the operator changed away from nodes a view called dead
    operator_false_moves: int = 0    # of those, moves away from a node that was in fact running
    disk_lows: int = 0               # times a node ran short of disk
    hostile_sent: int = 0            # messages the hostile peer delivered to a running replica
    hostile_refused: int = 0         # of those, refused by the bounds check (as the node's decoding would)
    hostile_rejected: int = 0        # ... or by the core (ProtocolError)
    flips: int = 0                   # flipped blocks found by a restarted replica (set aside)
    tails_dropped: int = 0           # nodes that lost the tail of their synced writes
    wipes: int = 0                   # replicas or nodes whose disk was wiped
    recoveries: int = 0              # replicas opened recovering
    early_wipes: int = 0             # of the wipes, those soon after the partitions were created
