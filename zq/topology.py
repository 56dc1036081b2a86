"""The topology file: which nodes a cluster expects, and which topics it starts with.

Theory of operation
-------------------
A topology is a TOML file (format in INTERFACE.md, "Topology file"). `load_topology` reads it in
three steps, each of which either succeeds or raises one `TopologyError` whose message reads
`FILE:LINE: what is wrong; what to do`, so that a bad file stops everything before any node
starts:

1. read the bytes (bounded by `FILE_BYTES_MAX`) and decode them as UTF-8;
2. parse them with the standard library's `tomllib`, re-wording its syntax errors;
3. check every table and key, in file order, and build frozen `Topology` values.

`tomllib` returns plain dicts with no positions, so step 3 could not say where a bad key is.
`SourceMap` fills that gap: a small scanner over the raw text that records the line of every
table header (`[cluster]`, the Nth `[[topic]]`) and of every key inside it, skipping strings,
comments and multi-line arrays so that text inside a value is never taken for a key. When a
check fails it asks the map for the line of the exact key, falling back to the enclosing key,
then to the table header, so the line it reports is always the best one the file has.

The module is pure apart from reading the file and, in `nodes_on_this_host`, asking the
operating system for this machine's addresses.

Sizes and durations
-------------------
Parsed and written by zq.units (`parse_duration_ms`, `parse_bytes`, `format_duration_ms`,
`format_bytes`, `InvalidValue`), re-exported here; the line scanner is zq.topology_source.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from zq.errors import TopologyError
from zq.limits import DEFAULT as LIMITS
from zq.topology_source import KeyPath, Section, SourceMap
from zq.units import (  # noqa: F401 (re-exported: zq.topology is where callers find them)
    BYTE_UNITS, DURATION_UNITS_MS, InvalidValue, format_bytes, format_duration_ms, parse_bytes, parse_duration_ms,
)
from zq.units import described as _describe
from zq.units import quoted as _q

# --- Defaults, spelled out so that the file's comments, the docs and the code agree. ---
DEFAULT_DATA_DIR = "data"               # relative to the topology file's folder
DEFAULT_DISCOVERY = "zeroconf"
DISCOVERY_MODES = ("zeroconf", "off")
DEFAULT_VOTERS_MAX = 3                  # voters default to the first min(3, nodes) nodes
DEFAULT_REPLICATION_MAX = 3             # replication defaults to min(3, nodes)
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_BACKOFF_INITIAL_MS = 1_000
DEFAULT_BACKOFF_MAX_MS = 60_000
DEFAULT_RETENTION_MS: int | None = None     # None: keep forever
DEFAULT_RETENTION_BYTES: int | None = None  # None: no size bound
DEFAULT_COMPACT = False                 # compact = true is refused until key compaction is built
COMPACT_NOT_BUILT = ("key compaction (compact = true) is not built yet; remove the key or write "
                     "compact = false (every message is kept until retention removes it)")
GROUPS_NOT_BUILT = ("[[group]] tables (groups declared in the topology) are not built yet; remove them: "
                    "a group starts when its first member joins (zq consume TOPIC --group NAME)")
DEFAULT_DURABILITY = "fsync"
DURABILITIES = ("fsync", "replicated")
DLQ_SUFFIX = ".dlq"

# --- Bounds. ---
FILE_BYTES_MAX = 1024 * 1024            # a topology is a hand-written file; anything bigger is a mistake
NODE_PORTS_COUNT = 10                   # a node uses at most this many consecutive ports from `port`
PORT_MIN = 1
PORT_MAX = 65_535
NODES_MAX = 1_000
TOPICS_MAX = 10_000
GROUPS_MAX = 10_000
SEEDS_MAX = 1_000
NAME_CHARS_MAX = 63                     # node, cluster: a directory name and a DNS-SD TXT value
TOPIC_NAME_CHARS_MAX = LIMITS.topic_name_chars_max
PARTITIONS_MAX = LIMITS.partitions_per_topic_max
MAX_DELIVERIES_MAX = 1_000

# --- Allowed keys per table, in the order the docs list them. ---
TOP_KEYS = ("cluster", "node", "topic", "group", "security")
CLUSTER_KEYS = ("name", "data_dir", "seeds", "discovery", "voters")
NODE_KEYS = ("name", "host", "port")
TOPIC_KEYS = ("name", "partitions", "replication", "retention", "retention_bytes", "max_deliveries",
              "backoff", "compact", "durability")
BACKOFF_KEYS = ("initial", "max")
# [security] (CurveZMQ, see zq/io/security.py): file paths are relative to the topology's folder.
SECURITY_KEYS = ("mode", "cluster_secret_key_file", "cluster_public_key_file", "allowed_clients_dir")
SECURITY_MODES = ("curve",)
SECURITY_PATH_KEYS = SECURITY_KEYS[1:]

# Node and cluster names become directory names and zeroconf TXT values: no "." or ".." and no
# leading punctuation.
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")   # DNS labels, as RFC 1123 allows


# ============================================================================================
# Values
# ============================================================================================

@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node the topology expects. It uses ports `port` .. `port + NODE_PORTS_COUNT - 1`."""

    name: str
    host: str
    port: int
    voter: bool = False     # holds a replica of `__meta`

    @property
    def router_port(self) -> int:
        return self.port

    @property
    def pub_port(self) -> int:
        return self.port + 1

    @property
    def metrics_port(self) -> int:
        return self.port + 2

    @property
    def address(self) -> str:
        """`host:port` of the ROUTER socket, with an IPv6 host in brackets."""
        return join_host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    retention_ms: int | None = DEFAULT_RETENTION_MS
    retention_bytes: int | None = DEFAULT_RETENTION_BYTES
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    backoff_initial_ms: int = DEFAULT_BACKOFF_INITIAL_MS
    backoff_max_ms: int = DEFAULT_BACKOFF_MAX_MS
    compact: bool = DEFAULT_COMPACT
    durability: str = DEFAULT_DURABILITY

    def config(self) -> dict:
        """The settings as sent in `CreateTopic.config`."""
        return {
            "retention_ms": self.retention_ms,
            "retention_bytes": self.retention_bytes,
            "max_deliveries": self.max_deliveries,
            "backoff_initial_ms": self.backoff_initial_ms,
            "backoff_max_ms": self.backoff_max_ms,
            "compact": self.compact,
            "durability": self.durability,
        }


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    name: str
    data_dir: Path                  # absolute
    seeds: tuple[str, ...] = ()     # "host:port" of nodes' ROUTER sockets, a fallback for discovery
    discovery: str = DEFAULT_DISCOVERY
    voters: tuple[str, ...] = ()    # names of the nodes that hold `__meta`


@dataclass(frozen=True, slots=True)
class Topology:
    path: Path                      # absolute
    cluster: ClusterSpec
    nodes: tuple[NodeSpec, ...]
    topics: tuple[TopicSpec, ...] = ()
    security: dict | None = None    # the [security] table as written; its keys belong to the security issue

    def node(self, name: str) -> NodeSpec:
        for spec in self.nodes:
            if spec.name == name:
                return spec
        known = ", ".join(n.name for n in self.nodes)
        raise TopologyError(f"{self.path}: there is no node {_q(name)} in this topology; its nodes are {known}")

    def node_data_dir(self, name: str) -> Path:
        """Where node `name` keeps its RocksDB: `data_dir/name`."""
        return self.cluster.data_dir / self.node(name).name

    def seeds_for(self, name: str) -> tuple[str, ...]:
        """The addresses node `name` may dial to join: the cluster's seeds, then every other node's
        address, in file order and without repeats."""
        me = self.node(name)
        out: dict[str, None] = {}
        for seed in self.cluster.seeds:
            out.setdefault(seed, None)
        for spec in self.nodes:
            if spec.name != me.name:
                out.setdefault(spec.address, None)
        out.pop(me.address, None)
        return tuple(out)

    def nodes_on_this_host(self, local_addresses: Collection[str] | None = None) -> list[NodeSpec]:
        """The nodes whose host is loopback or one of this machine's addresses, in file order.

        `local_addresses` replaces the machine's own list (tests pass one)."""
        if local_addresses is None:
            local_addresses = this_host_addresses()
        local = {_normalise_ip(a) for a in local_addresses}
        verdicts: dict[str, bool] = {}
        out = []
        for spec in self.nodes:
            if spec.host not in verdicts:
                verdicts[spec.host] = host_is_local(spec.host, local)
            if verdicts[spec.host]:
                out.append(spec)
        return out


# ============================================================================================
# Hosts and addresses
# ============================================================================================

def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"; raises ValueError saying what is wrong."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ValueError("an IPv6 address goes in brackets followed by the port, like \"[::1]:7100\"")
        host, port_text = text[1:end], text[end + 2:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("write HOST:PORT, like \"192.168.1.11:7100\"")
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets, like \"[::1]:7100\"")
    if not port_text.isdigit() or not PORT_MIN <= int(port_text) <= PORT_MAX:
        raise ValueError(f"the port must be a number from {PORT_MIN} to {PORT_MAX}")
    problem = host_problem(host)
    if problem:
        raise ValueError(problem)
    return host, int(port_text)


def host_problem(host: str) -> str | None:
    """Why `host` cannot be a node's address, or None when it can."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified or ip.is_multicast:
            return (f"{host} is not an address other nodes can dial; "
                    f"use this machine's own address, e.g. 127.0.0.1 or 192.168.1.11")
        return None
    if not HOST_NAME.match(host) or host.replace(".", "").isdigit():
        return (f"{_q(host)} is neither an IP address nor a host name; write an address like 192.168.1.11 "
                f"or a name like node1.lan")
    return None


def this_host_addresses() -> set[str]:
    """Every IP address of this machine's interfaces (through ifaddr, which zeroconf depends on)."""
    import ifaddr  # imported here so that parsing a file never needs it

    out = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            out.add(_normalise_ip(ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip))
    return out


def host_is_local(host: str, local_addresses: Collection[str]) -> bool:
    """True when `host` is loopback or resolves to one of `local_addresses`."""
    if host.lower().rstrip(".") in ("localhost", socket.gethostname().lower()):
        return True
    try:
        ip = ipaddress.ip_address(host)
        addresses = {str(ip)}
    except ValueError:
        try:
            addresses = {_normalise_ip(info[4][0]) for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False  # a name that does not resolve here is not this host
    return any(ipaddress.ip_address(a).is_loopback or a in local_addresses for a in addresses)


def _normalise_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return text


# ============================================================================================
# Loading and checking
# ============================================================================================

def load_topology(path: str | Path) -> Topology:
    """Read, parse and check a topology file; raises TopologyError naming the file and line."""
    display = str(path)
    text = _read(Path(path), display)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _syntax_error(display, text, str(error)) from None
    checker = _Checker(display, SourceMap(text), Path(os.path.normpath(Path(path).absolute())))
    return checker.topology(data)


def _read(path: Path, display: str) -> str:
    try:
        with path.open("rb") as file:
            raw = file.read(FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        raise TopologyError(f"{display}: no such topology file; check the path "
                            f"(the shipped ones are in topologies/, e.g. topologies/local.toml)") from None
    except IsADirectoryError:
        raise TopologyError(f"{display}: is a folder, not a topology file; name a .toml file inside it") from None
    except PermissionError:
        raise TopologyError(f"{display}: cannot read the topology file (permission denied); "
                            f"make it readable by this user") from None
    except OSError as error:
        raise TopologyError(f"{display}: cannot read the topology file ({error.strerror or error}); "
                            f"check the path and the disk") from None
    if len(raw) > FILE_BYTES_MAX:
        raise TopologyError(f"{display}: is larger than {FILE_BYTES_MAX} bytes, too large for a topology file; "
                            f"check that it is the right file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise TopologyError(f"{display}:{line}: the file is not UTF-8 text; save it as UTF-8") from None
    return text.removeprefix("\ufeff")  # a byte-order mark some editors add is not TOML


_TOML_POSITION = re.compile(r"^(.*) \(at (?:line (\d+), column (\d+)|end of document)\)$", re.S)
_TOML_HINTS = [
    (re.compile(r"^Cannot declare \('?([^',)]*)'?,?.*\) twice"),
     lambda m: f"the table [{m.group(1)}] appears twice; merge them into one (use [[{m.group(1)}]] for a list)"),
    (re.compile(r"^Cannot overwrite a value"),
     lambda m: "a key is set twice, or a key and a table share a name; keep one"),
    (re.compile(r"^Cannot mutate immutable namespace"), lambda m: "this extends a value that is already complete; "
                                                                  "set all its keys in one place"),
    (re.compile(r"^Invalid value"),
     lambda m: "this value is not valid TOML; put text in quotes, e.g. host = \"127.0.0.1\""),
    (re.compile(r"^Expected '=' after a key"), lambda m: "expected `key = value`"),
    (re.compile(r"^Invalid statement"), lambda m: "expected `key = value` or a [table] header"),
    (re.compile(r"^Unclosed array"), lambda m: "an array is missing its closing ]"),
    (re.compile(r"^Unclosed inline table"), lambda m: "an inline table is missing its closing }, or spans lines"),
    (re.compile(r"^Unterminated string"), lambda m: "a string is missing its closing quote"),
    (re.compile(r"^Illegal character '\\n'"), lambda m: "a string is missing its closing quote (a string ends on "
                                                           "the line it starts, unless written with triple quotes)"),
    (re.compile(r"^Expected '\]'"), lambda m: "a [table] header is missing its closing ]"),
    (re.compile(r"^Expected '\]\]'"), lambda m: "a [[table]] header is missing its closing ]]"),
]


def _syntax_error(display: str, text: str, message: str) -> TopologyError:
    match = _TOML_POSITION.match(message)
    if match is None:
        what, line, where = message, 1, ""
    elif match.group(2):
        what, line, where = match.group(1), int(match.group(2)), f" at column {match.group(3)}"
    else:
        what, line, where = match.group(1), max(len(text.splitlines()), 1), " at the end of the file"
    hint = next((make(m) for pattern, make in _TOML_HINTS if (m := pattern.match(what))), what[:1].lower() + what[1:])
    return TopologyError(f"{display}:{line}: not valid TOML{where}: {hint}; fix the syntax (TOML is described at "
                         f"https://toml.io)")




class _Checker:
    """Checks the parsed dict table by table and raises at the first problem, with its line."""

    def __init__(self, display: str, where: SourceMap, path: Path) -> None:
        self.display = display
        self.where = where
        self.path = path

    def fail(self, section: Section, key: KeyPath, message: str) -> TopologyError:
        return TopologyError(f"{self.display}:{self.where.line(section, key)}: {message}")

    # -- the whole file --

    def topology(self, data: dict) -> Topology:
        self.known_keys(("", 0), data, TOP_KEYS, "the top level of the file")
        cluster_table = data.get("cluster")
        if cluster_table is None:
            raise TopologyError(f"{self.display}:1: there is no [cluster] table; add one with at least "
                                f"name = \"...\" (see topologies/local.toml)")
        if not isinstance(cluster_table, dict):
            raise self.fail(("", 0), ("cluster",), "cluster must be a table; write [cluster] on its own line, "
                                                  "then its keys below it")
        # Checked in file order as far as the data allows: the cluster's own keys, then the nodes,
        # then the voters (which name nodes), topics and groups.
        cluster = self.cluster(cluster_table)
        node_tables = self.array_of_tables(data, "node", "node", NODES_MAX)
        if not node_tables:
            raise TopologyError(f"{self.display}:1: there is no [[node]] table; add one per node, e.g. "
                                f"[[node]] name = \"n1\" host = \"127.0.0.1\" port = 7100 (one key per line)")
        nodes = self.nodes(node_tables)
        cluster = self.voters(cluster_table, cluster, nodes)
        nodes = tuple(NodeSpec(n.name, n.host, n.port, voter=n.name in cluster.voters) for n in nodes)
        topics = self.topics(self.array_of_tables(data, "topic", "topic", TOPICS_MAX), len(nodes))
        self.no_groups(self.array_of_tables(data, "group", "group", GROUPS_MAX))
        security = data.get("security")
        if security is not None and not isinstance(security, dict):
            raise self.fail(("", 0), ("security",), "security must be a table; write [security] on its own line, "
                                                   "then its keys below it")
        if security is not None:
            security = self.security(security)
        return Topology(self.path, cluster, nodes, topics, security)

    def security(self, table: dict) -> dict:
        """The [security] table, keys checked and file paths made absolute. Whether the files exist
        and hold keys (and that cluster_secret_key_file is there at all) is checked by the node that
        reads them, zq.io.security.node_keys_from_topology: another host may keep them elsewhere."""
        section = ("security", 0)
        where = "[security]"
        self.known_keys(section, table, SECURITY_KEYS, where)
        mode = self.value(section, table, "mode", str, "a string", where, 'mode = "curve"', default="curve")
        if mode not in SECURITY_MODES:
            raise self.fail(section, ("mode",), f"{where}: mode = {_q(mode)} is not known; use "
                                                f"{' or '.join(_q(m) for m in SECURITY_MODES)}")
        out: dict[str, str] = {"mode": mode}
        for key in SECURITY_PATH_KEYS:
            text = self.value(section, table, key, str, "a string (a file path)", where,
                              f'{key} = "keys/cluster.key_secret"')
            if text is None:
                continue
            if not text.strip():
                raise self.fail(section, (key,), f"{where}: {key} is empty; write a path, e.g. "
                                                 f'{key} = "keys/cluster.key_secret"')
            path = Path(text).expanduser()
            out[key] = os.path.normpath(path if path.is_absolute() else self.path.parent / path)
        return out

    def array_of_tables(self, data: dict, name: str, noun: str, count_max: int) -> list[dict]:
        value = data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.fail((name, 0), (), f"{name} must be a list of tables; write [[{name}]] (double brackets) "
                                           f"above each {noun}'s keys")
        if len(value) > count_max:
            raise self.fail((name, count_max), (), f"there are {len(value)} [[{name}]] tables, more than the "
                                                   f"{count_max} a topology may hold; split the cluster")
        return value

    def known_keys(self, section: Section, table: dict, allowed: tuple[str, ...], where: str,
                   prefix: KeyPath = ()) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {_q(close[0])}? " if close else ""
                raise self.fail(section, prefix + (key,),
                                f"unknown key {_q(key)} in {where}; {hint}allowed keys: {', '.join(allowed)}")

    # -- typed values --

    def value(self, section: Section, table: dict, key: str, kind: type | tuple[type, ...], what: str,
              where: str, example: str, *, required: bool = False, default: Any = None,
              prefix: KeyPath = ()) -> Any:
        if key not in table:
            if required:
                raise self.fail(section, prefix, f"{where} has no {key}; add {example}")
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise self.fail(section, prefix + (key,),
                            f"{where}: {key} must be {what}, not {_describe(value)}; write {example}")
        return value

    def name(self, section: Section, table: dict, where: str, pattern: re.Pattern, chars_max: int,
             example: str) -> str:
        name = self.value(section, table, "name", str, "a string", where, f'name = "{example}"', required=True)
        if not 1 <= len(name) <= chars_max or not pattern.match(name):
            raise self.fail(section, ("name",),
                            f"{where}: name {_q(name)} is not allowed; use 1 to {chars_max} letters, digits, "
                            f"'.', '_' or '-'" + (", starting with a letter or digit" if pattern is NODE_NAME else ""))
        return name

    def int_in(self, section: Section, table: dict, key: str, where: str, low: int, high: int,
               example: str, *, default: int | None = None, required: bool = False, prefix: KeyPath = ()) -> int:
        value = self.value(section, table, key, int, "a whole number", where, example, required=required,
                           default=default, prefix=prefix)
        if not low <= value <= high:
            raise self.fail(section, prefix + (key,), f"{where}: {key} = {value} is out of range; "
                                                      f"use a number from {low} to {high}")
        return value

    def parsed(self, section: Section, table: dict, key: str, where: str, parse: Any, example: str,
               *, prefix: KeyPath = ()) -> int | None:
        if key not in table:
            return None
        value = table[key]
        try:
            return parse(value)
        except InvalidValue as error:
            label = ".".join(prefix + (key,))
            raise self.fail(section, prefix + (key,), f"{where}: {label}: {error.message}; e.g. {example}") from None

    def string_list(self, section: Section, table: dict, key: str, where: str, example: str,
                    count_max: int) -> list[str] | None:
        value = self.value(section, table, key, list, "an array of strings", where, example)
        if value is None:
            return None
        if not all(isinstance(item, str) for item in value):
            bad = next(item for item in value if not isinstance(item, str))
            raise self.fail(section, (key,), f"{where}: {key} must hold only strings, but it holds "
                                             f"{_describe(bad)}; write {example}")
        if len(value) > count_max:
            raise self.fail(section, (key,), f"{where}: {key} holds {len(value)} entries, more than "
                                             f"{count_max}; list fewer")
        seen = set()
        for item in value:
            if item in seen:
                raise self.fail(section, (key,), f"{where}: {key} lists {_q(item)} twice; remove one")
            seen.add(item)
        return value

    # -- tables --

    def nodes(self, tables: list[dict]) -> tuple[NodeSpec, ...]:
        out: list[NodeSpec] = []
        names: dict[str, int] = {}
        for index, table in enumerate(tables):
            section = ("node", index)
            label = f"[[node]] number {index + 1}"
            name = self.name(section, table, label, NODE_NAME, NAME_CHARS_MAX, f"n{index + 1}")
            where = f"node {_q(name)}"
            self.known_keys(section, table, NODE_KEYS, where)
            if name in names:
                raise self.fail(section, ("name",), f"two nodes are named {_q(name)} (the other is [[node]] number "
                                                    f"{names[name] + 1}); give each node its own name")
            names[name] = index
            host = self.value(section, table, "host", str, "a string", where, 'host = "127.0.0.1"', required=True)
            if problem := host_problem(host):
                raise self.fail(section, ("host",), f"{where}: host: {problem}")
            port = self.int_in(section, table, "port", where, PORT_MIN, PORT_MAX - NODE_PORTS_COUNT + 1,
                               "port = 7100", required=True)
            spec = NodeSpec(name, host, port)
            self.check_ports(section, spec, out)
            out.append(spec)
        return tuple(out)

    def check_ports(self, section: Section, spec: NodeSpec, earlier: list[NodeSpec]) -> None:
        for other in earlier:
            if _same_host(other.host, spec.host) and abs(other.port - spec.port) < NODE_PORTS_COUNT:
                if other.port == spec.port:
                    problem = f"node {_q(spec.name)} has the same address {spec.address} as node {_q(other.name)}"
                else:
                    problem = (f"node {_q(spec.name)} (port {spec.port}) and node {_q(other.name)} (port {other.port}) "
                               f"are on host {spec.host} and their port ranges overlap")
                raise self.fail(section, ("port",),
                                f"{problem}; each node uses {NODE_PORTS_COUNT} ports from its port, so space "
                                f"nodes on one host at least {NODE_PORTS_COUNT} apart (e.g. 7100, 7110, 7120)")

    def cluster(self, table: dict) -> ClusterSpec:
        """The [cluster] table but its voters, which need the nodes."""
        section = ("cluster", 0)
        where = "[cluster]"
        self.known_keys(section, table, CLUSTER_KEYS, where)
        name = self.name(section, table, where, NODE_NAME, NAME_CHARS_MAX, "zq-local")
        data_dir_text = self.value(section, table, "data_dir", str, "a string (a folder path)", where,
                                   'data_dir = "./data"', default=DEFAULT_DATA_DIR)
        if not data_dir_text.strip():
            raise self.fail(section, ("data_dir",),
                            f'{where}: data_dir is empty; write a folder, e.g. data_dir = "./data"')
        data_dir = Path(data_dir_text).expanduser()
        if not data_dir.is_absolute():
            data_dir = self.path.parent / data_dir
        data_dir = Path(os.path.normpath(data_dir))
        seeds = self.string_list(section, table, "seeds", where, 'seeds = ["192.168.1.11:7100"]', SEEDS_MAX) or []
        for seed in seeds:
            try:
                split_host_port(seed)
            except ValueError as error:
                raise self.fail(section, ("seeds",), f"{where}: seed {_q(seed)} is not HOST:PORT ({error}); write "
                                                     f"each seed as HOST:PORT, like \"192.168.1.11:7100\" or "
                                                     f"\"[fd00::2]:7100\"") from None
        discovery = self.value(section, table, "discovery", str, "a string", where, 'discovery = "zeroconf"',
                               default=DEFAULT_DISCOVERY)
        if discovery not in DISCOVERY_MODES:
            raise self.fail(section, ("discovery",), f"{where}: discovery = {_q(discovery)} is not known; use "
                                                     f"{' or '.join(_q(m) for m in DISCOVERY_MODES)}")
        return ClusterSpec(name, data_dir, tuple(seeds), discovery)

    def voters(self, table: dict, cluster: ClusterSpec, nodes: tuple[NodeSpec, ...]) -> ClusterSpec:
        section = ("cluster", 0)
        where = "[cluster]"
        voters = self.string_list(section, table, "voters", where, 'voters = ["n1", "n2", "n3"]', NODES_MAX)
        if voters is None:
            voters = [n.name for n in nodes[:DEFAULT_VOTERS_MAX]]
        if not voters:
            raise self.fail(section, ("voters",), f"{where}: voters is empty; name the nodes that hold the "
                                                  f"cluster's metadata, or remove the key to use the first "
                                                  f"{DEFAULT_VOTERS_MAX}")
        known = [n.name for n in nodes]
        for voter in voters:
            if voter not in known:
                raise self.fail(section, ("voters",), f"{where}: voters names {_q(voter)}, which is not a [[node]] "
                                                      f"in this file; known nodes: {', '.join(known)}")
        return ClusterSpec(cluster.name, cluster.data_dir, cluster.seeds, cluster.discovery, tuple(voters))

    def topics(self, tables: list[dict], node_count: int) -> tuple[TopicSpec, ...]:
        out: list[TopicSpec] = []
        seen: dict[str, int] = {}
        for index, table in enumerate(tables):
            spec = self.topic(("topic", index), index, table, node_count)
            if spec.name in seen:
                raise self.fail(("topic", index), ("name",), f"two topics are named {_q(spec.name)} (the other is "
                                                             f"[[topic]] number {seen[spec.name] + 1}); keep one")
            seen[spec.name] = index
            out.append(spec)
        return tuple(out)

    def topic(self, section: Section, index: int, table: dict, node_count: int) -> TopicSpec:
        label = f"[[topic]] number {index + 1}"
        name = self.name(section, table, label, TOPIC_NAME, TOPIC_NAME_CHARS_MAX, "orders")
        where = f"topic {_q(name)}"
        self.known_keys(section, table, TOPIC_KEYS, where)
        if name.startswith("__"):
            raise self.fail(section, ("name",), f"{where}: names starting with '__' are kept for zq's own topics; "
                                                f"rename it")
        if name.endswith(DLQ_SUFFIX):
            raise self.fail(section, ("name",), f"{where}: names ending with {_q(DLQ_SUFFIX)} are kept for dead-letter "
                                                f"topics, which zq creates itself; rename it")
        partitions = self.int_in(section, table, "partitions", where, 1, PARTITIONS_MAX, "partitions = 8",
                                 required=True)
        replication = self.value(section, table, "replication", int, "a whole number", where, "replication = 3",
                                 default=min(DEFAULT_REPLICATION_MAX, node_count))
        if replication < 1:
            raise self.fail(section, ("replication",), f"{where}: replication = {replication} is out of range; "
                                                       f"use a number from 1 to {node_count}")
        if replication > node_count:
            raise self.fail(section, ("replication",),
                            f"topic {_q(name)} asks for replication = {replication} but the topology has "
                            f"{node_count} node{'s' if node_count != 1 else ''}; lower replication or add nodes")
        retention_ms = self.parsed(section, table, "retention", where, parse_duration_ms, 'retention = "7d"')
        if retention_ms is not None and retention_ms < 1:
            raise self.fail(section, ("retention",), f"{where}: retention must be longer than 0; remove the key "
                                                     f"to keep messages forever")
        retention_bytes = self.parsed(section, table, "retention_bytes", where, parse_bytes,
                                      'retention_bytes = "100GB"')
        if retention_bytes is not None and retention_bytes < 1:
            raise self.fail(section, ("retention_bytes",), f"{where}: retention_bytes must be more than 0; remove "
                                                           f"the key for no size bound")
        max_deliveries = self.int_in(section, table, "max_deliveries", where, 1, MAX_DELIVERIES_MAX,
                                     "max_deliveries = 5", default=DEFAULT_MAX_DELIVERIES)
        initial_ms, max_ms = self.backoff(section, table, where)
        compact = self.value(section, table, "compact", bool, "true or false", where, "compact = false",
                             default=DEFAULT_COMPACT)
        if compact:
            raise self.fail(section, ("compact",), f"{where}: {COMPACT_NOT_BUILT}")
        durability = self.value(section, table, "durability", str, "a string", where, 'durability = "fsync"',
                                default=DEFAULT_DURABILITY)
        if durability not in DURABILITIES:
            raise self.fail(section, ("durability",), f"{where}: durability = {_q(durability)} is not known; use "
                                                      f"{' or '.join(_q(d) for d in DURABILITIES)}")
        return TopicSpec(name, partitions, replication, retention_ms, retention_bytes, max_deliveries,
                         initial_ms, max_ms, compact, durability)

    def backoff(self, section: Section, table: dict, where: str) -> tuple[int, int]:
        example = 'backoff = { initial = "1s", max = "60s" }'
        backoff = self.value(section, table, "backoff", dict, "a table", where, example, default={})
        prefix: KeyPath = ("backoff",)
        self.known_keys(section, backoff, BACKOFF_KEYS, f"{where} backoff", prefix)
        initial_ms = self.parsed(section, backoff, "initial", where, parse_duration_ms, 'initial = "1s"',
                                 prefix=prefix)
        max_ms = self.parsed(section, backoff, "max", where, parse_duration_ms, 'max = "60s"', prefix=prefix)
        initial_ms = DEFAULT_BACKOFF_INITIAL_MS if initial_ms is None else initial_ms
        max_ms = max(DEFAULT_BACKOFF_MAX_MS, initial_ms) if max_ms is None else max_ms
        if max_ms < initial_ms:
            raise self.fail(section, prefix + ("max",),
                            f"{where}: backoff max ({format_duration_ms(max_ms)}) is shorter than backoff initial "
                            f"({format_duration_ms(initial_ms)}); make max at least as long as initial")
        return initial_ms, max_ms

    def no_groups(self, tables: list[dict]) -> None:
        """Declared groups are planned, not built: a [[group]] table is refused, not silently ignored."""
        if tables:
            raise self.fail(("group", 0), (), GROUPS_NOT_BUILT)


def _same_host(a: str, b: str) -> bool:
    """Whether two host strings name the same machine, as far as the text alone can tell."""
    if a.lower().rstrip(".") == b.lower().rstrip("."):
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False
