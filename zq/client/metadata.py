"""The client's view of the cluster: pure parsing of a MetadataReply into an immutable snapshot.

A snapshot is replaced whole, never changed in place, so any thread can read the current one
without a lock (one attribute read is atomic). A node's reply is peer input: its shape is
checked and a wrong one is a ProtocolError, never an assertion.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from zq.client.connection import parse_address
from zq.errors import ConnectionFailed, ProtocolError

_UNSPECIFIED_HOSTS = ("", "0.0.0.0", "::", "*")


@dataclass(frozen=True, slots=True)
class Metadata:
    cluster: str = ""
    nodes: dict[str, str] = field(default_factory=dict)           # node name -> "host:port"
    node_states: dict[str, str] = field(default_factory=dict)     # node name -> alive|suspect|dead|left
    topics: dict[str, dict] = field(default_factory=dict)         # topic name -> {"name","id","partitions","config"}
    leaders: dict[tuple[str, int], str | None] = field(default_factory=dict)  # (topic, partition) -> node name

    def leader_address(self, topic: str, partition: int) -> str | None:
        name = self.leaders.get((topic, partition))
        return self.nodes.get(name) if name is not None else None

    def partition_count(self, topic: str) -> int | None:
        t = self.topics.get(topic)
        return len(t["partitions"]) if t is not None else None

    def addresses(self) -> list[str]:
        """Node addresses, live ones first, each group by name: a fixed order to try them in."""
        live = [a for n, a in sorted(self.nodes.items()) if self.node_states.get(n, "alive") == "alive"]
        rest = [a for n, a in sorted(self.nodes.items()) if self.node_states.get(n, "alive") != "alive"]
        return live + rest


def parse_metadata(reply: Any, asked_address: str) -> Metadata:
    """A snapshot from a MetadataReply; ProtocolError when its shape is wrong."""
    try:
        nodes, states = {}, {}
        for n in reply.nodes:
            name, host, port = n["name"], n["host"], n["port"]
            if not isinstance(name, str) or not isinstance(host, str) or type(port) is not int:
                raise TypeError("node entry")
            if host in _UNSPECIFIED_HOSTS:
                # A node bound to every interface: reach it where we reached the one that answered.
                host = parse_address(asked_address)[0]
            nodes[name] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            states[name] = str(n.get("state", "alive"))
        topics, leaders = {}, {}
        for t in reply.topics:
            name = t["name"]
            if not isinstance(name, str):
                raise TypeError("topic name")
            parts = sorted(t["partitions"], key=lambda p: p["partition"])
            for i, p in enumerate(parts):
                if p["partition"] != i:
                    raise ValueError(f"topic {name} lists partition {p['partition']} at position {i}")
                leader = p.get("leader")
                if leader is not None and not isinstance(leader, str):
                    raise TypeError("partition leader")
                leaders[(name, i)] = leader
            topics[name] = {"name": name, "id": t.get("id"), "partitions": parts, "config": dict(t.get("config") or {})}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProtocolError(f"metadata from {asked_address} is malformed ({e.__class__.__name__}: {e})") from None
    return Metadata(str(reply.cluster), nodes, states, topics, leaders)


def parse_bootstrap(bootstrap: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """"host:port[,host:port]" or a list of them -> checked, de-duplicated addresses, in order."""
    if bootstrap is None:
        return []
    items = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"bootstrap entries are 'host:port' strings, not {type(item).__name__}")
        item = item.strip()
        if not item:
            continue
        parse_address(item)  # raises ValueError with a sentence
        if item not in out:
            out.append(item)
    return out


def resolve_bootstrap(bootstrap: Any, cluster: str, discovery_timeout_s: float, interface: str | None) -> list[str]:
    """The addresses to start from: the argument, else $ZQ_BOOTSTRAP, else zeroconf discovery."""
    addresses = parse_bootstrap(bootstrap)
    if addresses:
        return addresses
    if bootstrap is None:
        addresses = parse_bootstrap(os.environ.get("ZQ_BOOTSTRAP") or None)
        if addresses:
            return addresses
    try:
        from zq.io.discovery import discover_cluster  # lazily: zeroconf is only needed to discover
    except ImportError:
        raise ConnectionFailed(f"no bootstrap address given and zeroconf discovery is not available; pass "
                               f"bootstrap='HOST:PORT' or set ZQ_BOOTSTRAP") from None
    found = discover_cluster(cluster, discovery_timeout_s, interface)
    addresses = parse_bootstrap(_as_addresses(found))
    if not addresses:
        raise ConnectionFailed(f"found no node of cluster {cluster!r} by zeroconf within {discovery_timeout_s} s; "
                               f"pass bootstrap='HOST:PORT', set ZQ_BOOTSTRAP, or check the cluster name")
    return addresses


def _as_addresses(found: Any) -> list[str]:
    """Discovery results as "host:port" strings, whatever shape the discovery module returns."""
    out = []
    for item in found or ():
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, tuple) and len(item) in (2, 3):  # (host, port) or (node, host, port)
            out.append(f"{item[-2]}:{item[-1]}")
        elif isinstance(item, dict) and "host" in item and "port" in item:
            out.append(f"{item['host']}:{item['port']}")
        elif hasattr(item, "host") and hasattr(item, "port"):
            out.append(f"{item.host}:{item.port}")
        elif hasattr(item, "address"):
            out.append(str(item.address))
    return out


def time_spec(spec: Any) -> str | int:
    """ListOffsets spec from "earliest" | "latest" | datetime | int ms. A naive datetime is local time."""
    if isinstance(spec, datetime):
        return int(spec.timestamp() * 1000)
    if spec in ("earliest", "latest"):
        return spec
    if type(spec) is int:
        return spec
    raise ValueError(f"{spec!r} is not 'earliest', 'latest', a datetime or a time in ms")
