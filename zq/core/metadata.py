"""The cluster's metadata as a state machine over the `__meta` log.

Theory of operation
-------------------
Topics, their settings, the placement of their partitions and the directory of nodes are not
kept in any node's memory as the truth: they are the result of applying, in order, the commands
of the `__meta` partition. Every node follows that partition and applies each committed command
to a `MetadataState` with `apply`; because `apply` is deterministic and the log is totally
ordered, every node that has applied the same prefix holds the same state. The node that leads
`__meta` checks a request against the current state (`plan_create_topic`, `plan_delete_topic`)
and, if it is valid, appends the command; it changes its own state only when it applies the
command like everybody else.

Commands are CBOR maps with an `op`:

    register_node  {op, name, host, port, incarnation}
    create_topic   {op, name, id, partitions: [[leader, replica, ...], ...], config, created_ms, founded}
    delete_topic   {op, name, id}
    reassign_partition {op, name, id, partition, replicas: [replica, ...]}

Topic ids come from a counter in the state, so a topic deleted and created again gets a new id
and never sees the old data. Replica sets are chosen at creation by rendezvous hashing
(zq.hashing) and written into the command: they change only by another logged command, never
because a node came or went.

`founded` (true in every command this version writes) is the agreement that each partition
starts with a leader: the first replica of its set leads epoch 1 from the command on, as if every
replica of the set had voted for it there (zq.core.replication, "Founding"). A command without
it (written by an older version) leaves its partitions to elect their first leader: their
replicas may have done so already, in epoch 1, so no replica of theirs may take a founding.

A `reassign_partition` command records an operator's target replica set; it does not move data
by itself. The partition's leader carries it out in the partition's own log, one replica at a
time (a new replica catches up as a learner first, then joins the voters; a replica that leaves
goes last if it is the leader), so that every step keeps a quorum (zq.core.replication). The
set a partition was created with stays in `TopicMeta.initial`: it is the configuration a
replica created with the partition starts from, before it reads the log's own configuration
entries. A replica created later, by a reassignment (`TopicMeta.reassigned`), starts from no
configuration at all and learns it from the log (zq.core.replication explains why).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zq import hashing
from zq.core import bounds
from zq.errors import InvalidRequest, NotEnoughReplicas, TopicExists, UnknownTopic
from zq.limits import Limits
from zq.types import META_TOPIC, META_TOPIC_ID

TOPIC_NAME = bounds.TOPIC_NAME   # the one rule, matched whole (zq.core.bounds)
DLQ_SUFFIX = ".dlq"

# Topic settings a user may set, with their defaults and types.
CONFIG_DEFAULTS: dict[str, Any] = {
    "retention_ms": None,
    "retention_bytes": None,
    "max_deliveries": 5,
    "backoff_initial_ms": 1_000,
    "backoff_max_ms": 60_000,
    "compact": False,
    "durability": "fsync",
}
DURABILITIES = ("fsync", "replicated")


@dataclass(slots=True)
class TopicMeta:
    name: str
    id: int
    partitions: list[list[str]]   # replica set per partition, preferred leader first (the target)
    config: dict[str, Any]
    created_ms: int
    initial: list[list[str]] = field(default_factory=list)  # replica sets at creation (offset 0)
    reassigned: set[int] = field(default_factory=set)  # partitions a reassign_partition command named
    founded: bool = False         # each partition's first replica leads epoch 1 from creation (see above)

    def leader(self, partition: int) -> str:
        return self.partitions[partition][0]


@dataclass(slots=True)
class NodeMeta:
    name: str
    host: str
    port: int
    incarnation: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class MetadataState:
    topics: dict[str, TopicMeta] = field(default_factory=dict)
    topics_by_id: dict[int, TopicMeta] = field(default_factory=dict)
    nodes: dict[str, NodeMeta] = field(default_factory=dict)
    next_topic_id: int = META_TOPIC_ID + 1
    applied: int = 0   # offset of the next command to apply

    def apply(self, offset: int, command: dict) -> None:
        """Apply the command at `offset`. Commands below `applied` were applied already (a replay)."""
        if offset < self.applied:
            return
        # Offsets may skip: a new leader's control batch takes an offset and holds no command.
        self.applied = offset + 1
        op = command.get("op")
        if op == "register_node":
            self.nodes[command["name"]] = NodeMeta(command["name"], command["host"], command["port"],
                                                   command.get("incarnation", 0))
        elif op == "create_topic":
            t = TopicMeta(command["name"], command["id"], [list(r) for r in command["partitions"]],
                          dict(command["config"]), command.get("created_ms", 0),
                          [list(r) for r in command["partitions"]], founded=command.get("founded") is True)
            self.topics[t.name] = t
            self.topics_by_id[t.id] = t
            self.next_topic_id = max(self.next_topic_id, t.id + 1)
        elif op == "delete_topic":
            t = self.topics.pop(command["name"], None)
            if t is not None:
                self.topics_by_id.pop(t.id, None)
        elif op == "reassign_partition":
            t = self.topics_by_id.get(command["id"])
            if t is not None and 0 <= command["partition"] < len(t.partitions):
                t.partitions[command["partition"]] = list(command["replicas"])
                t.reassigned.add(command["partition"])
        # An unknown op comes from a newer version: skipping it keeps this node applying the rest.

    def skip_to(self, offset: int) -> None:
        """Every command below `offset` is applied (what lies between was control batches)."""
        self.applied = max(self.applied, offset)

    def topic(self, name: str) -> TopicMeta:
        t = self.topics.get(name)
        if t is None:
            raise UnknownTopic(f"topic {name!r} does not exist; create it with `zq topic create {name}`", topic=name)
        return t


COMPACT_NOT_BUILT = ("key compaction (compact = true) is not built yet, so a topic cannot ask for it; "
                     "leave it out (every message is kept until retention removes it)")


def normalise_config(config: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked; raises InvalidRequest naming the setting."""
    unknown = sorted(set(config) - set(CONFIG_DEFAULTS))
    if unknown:
        raise InvalidRequest(f"unknown topic setting {unknown[0]!r}; known settings: {', '.join(CONFIG_DEFAULTS)}")
    out = {**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    for key in ("retention_ms", "retention_bytes"):
        if out[key] is not None and (type(out[key]) is not int or out[key] <= 0):
            raise InvalidRequest(f"{key} must be a positive whole number, got {out[key]!r}")
    for key in ("max_deliveries", "backoff_initial_ms", "backoff_max_ms"):
        if type(out[key]) is not int or out[key] < 1:
            raise InvalidRequest(f"{key} must be a whole number of at least 1, got {out[key]!r}")
    if out["durability"] not in DURABILITIES:
        raise InvalidRequest(f"durability must be one of {', '.join(DURABILITIES)}, got {out['durability']!r}")
    if type(out["compact"]) is not bool:
        raise InvalidRequest(f"compact must be true or false, got {out['compact']!r}")
    if out["compact"]:
        # Refused here, where every client's CreateTopic is planned (not only zq's own client):
        # a stored "compact": true would promise a compaction no node carries out.
        raise InvalidRequest(COMPACT_NOT_BUILT)
    return out


def check_topic_name(name: str, limits: Limits, *, internal_ok: bool = False) -> None:
    problem = bounds.check_topic_name(name, chars_max=limits.topic_name_chars_max)
    if problem is not None:
        raise InvalidRequest(problem)
    if name.startswith("__") and not internal_ok:
        raise InvalidRequest(f"topic name {name!r} is reserved: names starting with '__' are zq's own")


def plan_create_topic(state: MetadataState, name: str, partitions: int, replication: int,
                      config: dict[str, Any], live_nodes: list[str], now_ms: int,
                      limits: Limits) -> list[dict]:
    """The commands that create `name` and its dead-letter topic `name.dlq`, or a Rejected error."""
    check_topic_name(name, limits)
    if name.endswith(DLQ_SUFFIX):
        raise InvalidRequest(f"topic name {name!r} ends with {DLQ_SUFFIX!r}, which zq keeps for dead-letter topics")
    if name in state.topics:
        raise TopicExists(f"topic {name!r} exists already; `zq topic describe {name}` shows it")
    if not 1 <= partitions <= limits.partitions_per_topic_max:
        raise InvalidRequest(f"partitions must be between 1 and {limits.partitions_per_topic_max}, got {partitions}")
    if not 1 <= replication <= limits.replication_max:
        raise InvalidRequest(f"replication must be between 1 and {limits.replication_max}, got {replication}")
    nodes = sorted(live_nodes)
    if replication > len(nodes):
        raise NotEnoughReplicas(
            f"replication {replication} needs {replication} live nodes but the cluster has {len(nodes)} "
            f"({', '.join(nodes) or 'none'}); lower --replication or start more nodes",
            live=len(nodes), replication=replication)
    cfg = normalise_config(config)
    commands = []
    next_id = state.next_topic_id
    for topic in (name, name + DLQ_SUFFIX):
        commands.append({"op": "create_topic", "name": topic, "id": next_id,
                         "partitions": hashing.place_topic(topic, partitions, nodes, replication),
                         "config": cfg, "created_ms": now_ms, "founded": True})
        next_id += 1
    return commands


def plan_delete_topic(state: MetadataState, name: str) -> list[dict]:
    """Deleting a topic deletes its dead-letter topic too; deleting `X.dlq` alone is allowed."""
    t = state.topic(name)
    out = [{"op": "delete_topic", "name": t.name, "id": t.id}]
    dlq = state.topics.get(name + DLQ_SUFFIX)
    if dlq is not None:
        out.append({"op": "delete_topic", "name": dlq.name, "id": dlq.id})
    return out


def plan_reassign(state: MetadataState, name: str, partition: int, replicas: list[str],
                  limits: Limits) -> list[dict]:
    """The command that sets a partition's target replica set, or an error saying what is wrong."""
    if name.startswith("__"):
        raise InvalidRequest(f"topic {name!r} is zq's own; its replicas are the topology's voters")
    t = state.topic(name)
    if not 0 <= partition < len(t.partitions):
        raise InvalidRequest(f"topic {name!r} has partitions 0 to {len(t.partitions) - 1}, not {partition}")
    if not replicas:
        raise InvalidRequest("a partition needs at least one replica; name them with --replicas n1,n2,n3")
    if len(set(replicas)) != len(replicas):
        raise InvalidRequest(f"replicas {', '.join(replicas)} name a node twice")
    unknown = [r for r in replicas if r not in state.nodes]
    if unknown:
        raise InvalidRequest(f"node {unknown[0]!r} is not a member of the cluster (known: "
                             f"{', '.join(sorted(state.nodes))}); start it first, `zq status` lists members")
    if len(replicas) > limits.replication_max:
        raise InvalidRequest(f"replication must be at most {limits.replication_max}, got {len(replicas)}")
    return [{"op": "reassign_partition", "name": t.name, "id": t.id, "partition": partition,
             "replicas": list(replicas)}]


def meta_topic_view(leader: str) -> dict:
    """How `__meta` appears in metadata replies: a topic with one partition whose leader is the controller."""
    return {"name": META_TOPIC, "id": META_TOPIC_ID,
            "partitions": [{"partition": 0, "leader": leader, "epoch": 0, "replicas": [leader]}], "config": {}}
