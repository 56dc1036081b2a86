"""The node: one process, one event loop. (Being written; NodeConfig and run_node are the stable entry points.)"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from zq.limits import DEFAULT, Limits


@dataclass(frozen=True)
class NodeConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 7100                     # ROUTER for clients and peers; pub = port+1; metrics = port+2
    data_dir: Path = Path("./data/n1")   # this node's own RocksDB folder
    cluster: str = "zq"
    seeds: tuple[str, ...] = ()          # "host:port" of other nodes' ROUTER
    voters: tuple[str, ...] = ()         # names of the nodes that hold __meta (first = its leader in this version)
    topology: object | None = None       # zq.topology.Topology when started from a file
    discovery: bool = True
    limits: Limits = field(default_factory=lambda: DEFAULT)


def run_node(config: NodeConfig, stop: threading.Event | None = None) -> None:
    """Run the node in the foreground until `stop` is set or SIGTERM/SIGINT arrives."""
    raise NotImplementedError("node event loop lands with the foundation issue")
