"""The node's `__meta` follower, decided without I/O: seeds, registration, following `__meta` by
long-poll fetch (a node that does not vote), applying committed or learned commands, and the
answers to topic changes that wait for every live node.

`MetaFollower` is a state machine. The host asks it what to do next and tells it what came back;
it answers with effects (dataclasses below) the host carries out: send a RegisterNode to the
`__meta` leader, fetch `__meta` from it at an offset, wait, write these batches, open or close
these replicas. It reads no clock (delays are returned, not slept), opens no socket and touches
no store, so the real node (zq/io/node_meta.py) and the follower simulator (zq/sim/meta.py, run by
tests/test_meta_follower.py) run the same code.

Its rules:

- Registration: a node is registered once `__meta` holds its name AT ITS CURRENT ADDRESS (a node
  restarted on another port registers again). The `__meta` leader registers itself by appending
  the command; any other node sends RegisterNode to the leader it believes in, and retries
  (META_RETRY_MS) on a timeout or refusal, following a NotLeader's hint.
- Following (a node that does not vote): register first, then long-poll fetch `__meta` from its
  leader at the learner copy's log end (`LearnerLog.learner_end`: what is on this node's disk, so
  a restart resumes from the stored offset). A fetched batch is taken only if it starts exactly
  at that log end: one already held (a duplicate or late reply) or past it (a gap) is skipped, and
  the next fetch asks again from the log end. The first batch failing its checksum ends the reply.
- Applying: fetched commands are applied only once the host says their write is durable
  (`apply_learned`); a voter applies what its replica committed (`apply_committed`, never past
  the high watermark). A command at an offset already applied is never applied again. Each
  command's effects are yielded as it is applied, so the host acts on them in log order.

Standard library only (zq.core.metadata is pure).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Hashable

from zq.core.metadata import MetadataState, TopicMeta
from zq.node.host import LearnerLog
from zq.types import META_TOPIC, TopicPartition

META_FETCH_WAIT_MS = 1_000        # long-poll of a learner on __meta
META_FETCH_BYTES = 4 * 1024 * 1024  # one __meta fetch asks for at most this much
META_RETRY_MS = 200               # pause before a failed __meta fetch or registration is sent again
SELF_REGISTER_CHECK_MS = META_RETRY_MS * 5   # the __meta leader looks again whether its own registration committed
PENDING_ADMIN_MAX = 1_000         # creates/deletes waiting for every node to apply them before the reply
PENDING_CHECK_MS = 20             # how often those waiting answers are looked at again


# ---------------------------------------------------------------- effects

@dataclass(frozen=True, slots=True)
class Wait:
    """Ask again after `delay_ms`."""
    delay_ms: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Nothing more to do on this path (the node stops, or it votes and no longer follows)."""


@dataclass(frozen=True, slots=True)
class Registered:
    """`__meta` holds this node at its current address."""


@dataclass(frozen=True, slots=True)
class AppendRegistration:
    """This node leads `__meta`: append `command` itself, and look again after `recheck_ms`."""
    command: dict
    recheck_ms: int


@dataclass(frozen=True, slots=True)
class SendRegistration:
    """Send RegisterNode(name, host, port, incarnation) to `leader`."""
    leader: str


@dataclass(frozen=True, slots=True)
class RegisterFirst:
    """Not registered yet: register (ask `register_step`), then follow again after `delay_ms`."""
    delay_ms: int


@dataclass(frozen=True, slots=True)
class Fetch:
    """Fetch `__meta` from `leader` at `offset` (a long poll of `wait_ms`)."""
    leader: str
    offset: int
    max_bytes: int = META_FETCH_BYTES
    wait_ms: int = META_FETCH_WAIT_MS


@dataclass(frozen=True, slots=True)
class OpenTopic:
    """A topic was created: open this node's replicas of it."""
    topic: TopicMeta


@dataclass(frozen=True, slots=True)
class CloseTopic:
    """A topic was deleted: drop this node's replicas of it, with their data."""
    topic: TopicMeta


@dataclass(frozen=True, slots=True)
class Retarget:
    """A partition this node holds a replica of has a new target replica set: tell the replica
    (its leader carries the move out in the partition's log); connect to `peers`."""
    topic: TopicMeta
    partition: int
    target: tuple[str, ...]
    peers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OpenMoved:
    """A partition was moved onto this node: open a replica of it (it joins as a learner)."""
    topic: TopicMeta
    partition: int


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """`__meta` says where node `name` listens."""
    name: str
    address: str


@dataclass(frozen=True, slots=True)
class Noted:
    """A command is applied (the first effect of each): the host notes what it keeps of it (the
    offset that made each replica set)."""
    offset: int
    command: dict


@dataclass(frozen=True, slots=True)
class Applied:
    """Commands were applied up to `applied`: tell the others (heartbeats) at once."""
    applied: int


@dataclass(frozen=True, slots=True)
class FetchedBatch:
    """One stored batch of a `__meta` fetch reply, as the host read it: its offsets, the bytes to
    write unchanged (opaque here), and a function giving its `(offset, command)` records."""
    base_offset: int
    next_offset: int
    value: Any
    records: Callable[[], Iterable[tuple[int, dict]]]


BAD_BATCH = None   # in a fetch reply's batch list: a batch that failed its checksum


@dataclass(frozen=True, slots=True)
class SeedNews:
    """What a seed's metadata answer teaches a node."""
    foreign: bool                       # the seed belongs to another cluster: ignore it
    addresses: tuple[tuple[str, str], ...] = ()   # (name, "host:port") of nodes not known before
    voters: tuple[str, ...] = ()        # `__meta`'s voters, when this node knew none


def read_seed_reply(me: str, cluster: str, reply_cluster: str, nodes: Iterable[Mapping[str, Any]],
                    topics: Iterable[Mapping[str, Any]], known: Mapping[str, str] | Iterable[str],
                    have_voters: bool) -> SeedNews:
    """A seed answered a MetadataRequest: the nodes it names that this node did not know (not
    itself, not one whose host the seed does not know), and `__meta`'s voters if this node had none."""
    if reply_cluster != cluster:
        return SeedNews(True)
    known = set(known)
    addresses = tuple((n["name"], f"{n['host']}:{n['port']}") for n in nodes
                      if n["name"] != me and n["name"] not in known and n.get("host") not in (None, "?"))
    voters: tuple[str, ...] = ()
    if not have_voters:
        for t in topics:
            if t["name"] == META_TOPIC and t["partitions"][0]["replicas"]:
                voters = tuple(t["partitions"][0]["replicas"])
    return SeedNews(False, addresses, voters)


# ---------------------------------------------------------------- the follower

class MetaFollower:
    """One node's `__meta` follower: registration, fetching, applying (see the module doc).

    `meta` is the node's applied metadata (the follower applies commands to it); `log` its copy
    of `__meta` (for a node that does not vote). `address` is (host, port), where this node
    listens now; `incarnation` tells its starts apart."""

    def __init__(self, name: str, address: tuple[str, int], incarnation: int, meta: MetadataState,
                 log: LearnerLog) -> None:
        self.name = name
        self.host, self.port = address
        self.incarnation = incarnation
        self.meta = meta
        self.log = log
        self.registered = False
        self.learned: list[tuple[int, dict]] = []   # fetched commands awaiting the durability of their write

    # ------------------------------------------------------------ registration

    def registration_command(self) -> dict:
        return {"op": "register_node", "name": self.name, "host": self.host, "port": self.port,
                "incarnation": self.incarnation}

    def is_registered(self) -> bool:
        """`__meta` (as applied here) holds this node at its current address."""
        known = self.meta.nodes.get(self.name)
        return known is not None and (known.host, known.port) == (self.host, self.port)

    def register_step(self, stopping: bool, leads_meta: bool, leader: str | None,
                      leader_reachable: bool) -> Stop | Registered | AppendRegistration | SendRegistration | Wait:
        """What to do to get registered now. `leader`: who this node believes leads `__meta`."""
        if stopping:
            return Stop()
        if self.is_registered():
            self.registered = True
            return Registered()
        if leads_meta:
            return AppendRegistration(self.registration_command(), SELF_REGISTER_CHECK_MS)
        if leader is None or leader == self.name or not leader_reachable:
            return Wait(META_RETRY_MS)
        return SendRegistration(leader)

    def on_register_reply(self, ok: bool) -> Registered | Wait:
        """The leader answered RegisterNode: Ok (committed), or anything else (ask again later)."""
        if ok:
            self.registered = True
            return Registered()
        return Wait(META_RETRY_MS)

    # ------------------------------------------------------------ following (a node that does not vote)

    def follow_step(self, stopping: bool, voters: tuple[str, ...], leader: str | None,
                    leader_reachable: bool) -> Stop | Wait | RegisterFirst | Fetch:
        """What a follower does next: stop, wait, register first, or fetch from the log end."""
        if stopping or self.name in voters:
            return Stop()
        if not voters:
            return Wait(META_RETRY_MS)     # still waiting for a seed to answer
        if not self.registered:
            return RegisterFirst(META_RETRY_MS)
        if leader is None or not leader_reachable:
            return Wait(META_RETRY_MS)
        return Fetch(leader, self.log.learner_end)

    def on_fetch_failed(self) -> Wait:
        """The fetch got no data (a timeout, a refusal, NotLeader): fetch again a little later."""
        return Wait(META_RETRY_MS)

    def on_fetched(self, batches: Iterable[FetchedBatch | None]) -> list[FetchedBatch]:
        """A fetch reply's batches, in order: those to write, now (the log end moves past them;
        their commands wait, in `learned`, until the host says the write is durable). The next
        fetch goes out after that write (`follow_step` at once)."""
        take = []
        for batch in batches:
            if batch is BAD_BATCH:
                break                       # fetched again, from the log end
            if batch.base_offset != self.log.learner_end:
                continue                    # already held, or a gap: the next fetch starts from our log end
            take.append(batch)
            self.log.learner_end = batch.next_offset
            self.learned.extend(batch.records())
        return take

    def write_failed(self, stored_end: int) -> None:
        """The write of the fetched batches failed: forget them; fetch again from what is stored."""
        self.learned.clear()
        self.log.learner_end = stored_end

    # ------------------------------------------------------------ applying

    def apply_learned(self, holds: Callable[[Hashable], bool]) -> Iterator[Any]:
        """The fetched batches are durable: apply their commands, yielding each one's effects."""
        learned, self.learned = self.learned, []
        for offset, command in learned:
            yield from self.apply(offset, command, holds)
        if learned:
            self.meta.skip_to(self.log.learner_end)
            yield Applied(self.meta.applied)

    def apply_committed(self, high_watermark: int, read: Callable[[int, int], Iterable[tuple[int, dict]]],
                        holds: Callable[[Hashable], bool]) -> Iterator[Any]:
        """A voter's replica committed up to `high_watermark`: apply what lies between the applied
        offset and it (`read(start, upto)` gives the stored commands), yielding their effects."""
        if self.meta.applied >= high_watermark:
            return
        for offset, command in read(self.meta.applied, high_watermark):
            if offset >= high_watermark:
                break
            yield from self.apply(offset, command, holds)
        self.meta.skip_to(high_watermark)
        yield Applied(self.meta.applied)

    def apply(self, offset: int, command: dict, holds: Callable[[Hashable], bool]) -> Iterator[Any]:
        """Apply one command (unless applied already) and yield what the node must do for it.
        `holds(tp)`: whether this node has a replica of a partition (zq.types.TopicPartition)."""
        if offset < self.meta.applied:
            return
        yield Noted(offset, command)
        before = self.meta.topics.get(command.get("name", ""))
        self.meta.apply(offset, command)
        op = command.get("op")
        if op == "create_topic":
            yield OpenTopic(self.meta.topics[command["name"]])
        elif op == "delete_topic" and before is not None:
            yield CloseTopic(before)
        elif op == "reassign_partition":
            yield from self._reassigned(command, holds)
        elif op == "register_node" and command["name"] != self.name:
            n = self.meta.nodes[command["name"]]
            yield PeerAddress(n.name, n.address)

    def _reassigned(self, command: dict, holds: Callable[[Hashable], bool]) -> Iterator[Any]:
        t = self.meta.topics_by_id.get(command["id"])
        p = command["partition"]
        if t is None or not 0 <= p < len(t.partitions):
            return
        target = tuple(t.partitions[p])
        if holds(TopicPartition(t.id, p)):
            yield Retarget(t, p, target, tuple(peer for peer in target if peer != self.name))
        elif self.name in target:
            yield OpenMoved(t, p)


# ---------------------------------------------------------------- topic changes waiting for every node

class PendingChanges:
    """Answers to committed topic changes, held until every live node has applied them (or a
    deadline passed): a create answered only then lets a client use the topic on any node at once."""

    def __init__(self, limit: int = PENDING_ADMIN_MAX) -> None:
        self.limit = limit
        self.waiting: list[tuple[int, int, Any]] = []   # (end offset, deadline ms, the host's answer)

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, end: int, deadline_ms: int, answer: Any) -> bool:
        """Hold `answer` until every live node has applied `__meta` up to `end`; False when too
        many wait already (answer now: the change is committed, only the courtesy wait is skipped)."""
        if len(self.waiting) >= self.limit:
            return False
        self.waiting.append((end, deadline_ms, answer))
        return True

    def due(self, now_ms: int, positions: Iterable[int]) -> tuple[list[Any], int | None]:
        """(the answers to give now, when to look again or None). `positions`: the applied
        `__meta` offsets of this node and of every live node."""
        positions = list(positions)
        answers, keep = [], []
        for end, deadline, answer in self.waiting:
            if all(pos >= end for pos in positions) or now_ms >= deadline:
                answers.append(answer)
            else:
                keep.append((end, deadline, answer))
        self.waiting = keep
        return answers, (now_ms + PENDING_CHECK_MS if keep else None)
