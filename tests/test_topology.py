"""Topology files: valid ones load with the right values, and every bad one gets one error that
names the file, the exact line and what to do.

Error cases mark the line they expect with `# HERE` in the TOML text, so the expected line
number is computed from the text itself and a test cannot drift from its fixture."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zq.errors import TopologyError, ZqError
from zq.topology import (
    DEFAULT_BACKOFF_INITIAL_MS,
    DEFAULT_BACKOFF_MAX_MS,
    DEFAULT_MAX_DELIVERIES,
    BYTE_UNITS,
    DURATION_UNITS_MS,
    FILE_BYTES_MAX,
    ClusterSpec,
    InvalidValue,
    NodeSpec,
    SourceMap,
    TopicSpec,
    format_bytes,
    format_duration_ms,
    load_topology,
    parse_bytes,
    parse_duration_ms,
    split_host_port,
)

REPO = Path(__file__).resolve().parent.parent

CLUSTER = """\
[cluster]
name = "t"
"""
NODES = """\
[[node]]
name = "n1"
host = "127.0.0.1"
port = 7100

[[node]]
name = "n2"
host = "127.0.0.1"
port = 7110

[[node]]
name = "n3"
host = "127.0.0.1"
port = 7120
"""
TOPIC = """\
[[topic]]
name = "orders"
partitions = 8
"""


def write(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def marked_line(text: str) -> int:
    lines = [n for n, line in enumerate(textwrap.dedent(text).splitlines(), start=1) if "# HERE" in line]
    assert len(lines) == 1, "a case marks exactly one line"
    return lines[0]


def error_of(path: Path) -> str:
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    return info.value.message


def check_error(tmp_path: Path, text: str, *fragments: str, line: int | None = None) -> str:
    """Load `text`, expect a TopologyError at the `# HERE` line (or `line`) containing every fragment."""
    path = write(tmp_path, text)
    expected_line = marked_line(text) if line is None else line
    message = error_of(path)
    assert message.startswith(f"{path}:{expected_line}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message
    assert "; " in message, f"the message should say what to do: {message}"
    return message


# ============================================================================================
# Valid files
# ============================================================================================

def test_full_file_loads_with_every_value(tmp_path: Path) -> None:
    (tmp_path / "topologies").mkdir()
    path = write(tmp_path, """\
        [cluster]
        name = "demo"
        data_dir = "../data"
        seeds = ["127.0.0.1:7100", "[::1]:7200", "db.example:7300"]
        discovery = "off"
        voters = ["n2"]

        [[node]]
        name = "n1"
        host = "127.0.0.1"
        port = 7100

        [[node]]
        name = "n2"
        host = "10.0.0.2"
        port = 7100

        [[topic]]
        name = "orders"
        partitions = 8
        replication = 2
        retention = "7d"
        retention_bytes = "100GB"
        max_deliveries = 7
        backoff = { initial = "500ms", max = "2m" }
        compact = false
        durability = "replicated"

        [security]
        mode = "curve"
        """, name="topologies/demo.toml")
    topology = load_topology(path)
    assert topology.path == path
    assert topology.cluster == ClusterSpec("demo", tmp_path / "data", ("127.0.0.1:7100", "[::1]:7200",
                                                                       "db.example:7300"), "off", ("n2",))
    assert topology.nodes == (NodeSpec("n1", "127.0.0.1", 7100, voter=False),
                              NodeSpec("n2", "10.0.0.2", 7100, voter=True))
    assert topology.topics == (TopicSpec("orders", 8, 2, 7 * 86_400_000, 100 * 10**9, 7, 500, 120_000, False,
                                         "replicated"),)
    assert topology.security == {"mode": "curve"}
    assert topology.topics[0].config() == {
        "retention_ms": 604_800_000, "retention_bytes": 100_000_000_000, "max_deliveries": 7,
        "backoff_initial_ms": 500, "backoff_max_ms": 120_000, "compact": False, "durability": "replicated"}


def test_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, CLUSTER + NODES + TOPIC, name="t.toml")
    topology = load_topology(path)
    assert topology.cluster.data_dir == tmp_path / "data"
    assert topology.cluster.discovery == "zeroconf"
    assert topology.cluster.seeds == ()
    assert topology.cluster.voters == ("n1", "n2", "n3")
    assert all(node.voter for node in topology.nodes)
    assert topology.security is None
    (orders,) = topology.topics
    assert orders == TopicSpec("orders", 8, 3)
    assert orders.config() == {"retention_ms": None, "retention_bytes": None, "max_deliveries": DEFAULT_MAX_DELIVERIES,
                               "backoff_initial_ms": DEFAULT_BACKOFF_INITIAL_MS,
                               "backoff_max_ms": DEFAULT_BACKOFF_MAX_MS, "compact": False, "durability": "fsync"}
    assert (DEFAULT_MAX_DELIVERIES, DEFAULT_BACKOFF_INITIAL_MS, DEFAULT_BACKOFF_MAX_MS) == (5, 1_000, 60_000)


def test_default_replication_and_voters_follow_the_node_count(tmp_path: Path) -> None:
    one = write(tmp_path, CLUSTER + NODES.split("\n\n")[0] + "\n" + TOPIC, name="one.toml")
    topology = load_topology(one)
    assert topology.topics[0].replication == 1
    assert topology.cluster.voters == ("n1",)
    five = CLUSTER + "".join(f'[[node]]\nname = "n{i}"\nhost = "127.0.0.1"\nport = {7100 + 10 * i}\n'
                             for i in range(5)) + TOPIC
    topology = load_topology(write(tmp_path, five, name="five.toml"))
    assert topology.topics[0].replication == 3
    assert topology.cluster.voters == ("n0", "n1", "n2")
    assert [n.voter for n in topology.nodes] == [True, True, True, False, False]


def test_backoff_max_defaults_to_at_least_initial(tmp_path: Path) -> None:
    text = CLUSTER + NODES + TOPIC + 'backoff = { initial = "2m" }\n'
    topic = load_topology(write(tmp_path, text)).topics[0]
    assert (topic.backoff_initial_ms, topic.backoff_max_ms) == (120_000, 120_000)


def test_data_dir_absolute_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = CLUSTER.replace('name = "t"', f'name = "t"\ndata_dir = "{tmp_path}/abs/./x/.."') + NODES
    assert load_topology(write(tmp_path, text)).cluster.data_dir == tmp_path / "abs"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = CLUSTER.replace('name = "t"', 'name = "t"\ndata_dir = "~/zq"') + NODES
    assert load_topology(write(tmp_path, text)).cluster.data_dir == tmp_path / "home" / "zq"


def test_relative_path_argument_gives_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "topologies").mkdir()
    write(tmp_path, CLUSTER + 'data_dir = "../data"\n' + NODES, name="topologies/x.toml")
    monkeypatch.chdir(tmp_path)
    topology = load_topology("topologies/x.toml")
    assert topology.path == tmp_path / "topologies" / "x.toml"
    assert topology.cluster.data_dir == tmp_path / "data"


def test_node_helpers(tmp_path: Path) -> None:
    text = CLUSTER + 'seeds = ["10.1.1.1:7100", "127.0.0.1:7100"]\n' + NODES
    topology = load_topology(write(tmp_path, text))
    n2 = topology.node("n2")
    assert (n2.router_port, n2.pub_port, n2.metrics_port, n2.address) == (7110, 7111, 7112, "127.0.0.1:7110")
    assert NodeSpec("v6", "::1", 7100).address == "[::1]:7100"
    assert topology.node_data_dir("n2") == tmp_path / "data" / "n2"
    assert topology.seeds_for("n1") == ("10.1.1.1:7100", "127.0.0.1:7110", "127.0.0.1:7120")
    with pytest.raises(TopologyError, match='no node "n9".*its nodes are n1, n2, n3'):
        topology.node("n9")


def test_nodes_on_this_host(tmp_path: Path) -> None:
    text = CLUSTER + """
        [[node]]
        name = "a"
        host = "203.0.113.7"
        port = 7100

        [[node]]
        name = "b"
        host = "127.0.0.1"
        port = 7100

        [[node]]
        name = "c"
        host = "198.51.100.9"
        port = 7100

        [[node]]
        name = "d"
        host = "localhost"
        port = 7200
        """
    topology = load_topology(write(tmp_path, textwrap.dedent(text)))
    # Injected addresses: 198.51.100.9 is "ours", loopback always is, 203.0.113.7 is not.
    assert [n.name for n in topology.nodes_on_this_host(["198.51.100.9"])] == ["b", "c", "d"]
    # The machine's real addresses: documentation ranges (RFC 5737) are on no real machine.
    assert [n.name for n in topology.nodes_on_this_host()] == ["b", "d"]


# ============================================================================================
# Errors, one per kind, each at its exact line
# ============================================================================================

def test_file_not_found(tmp_path: Path) -> None:
    message = error_of(tmp_path / "nope.toml")
    assert message.startswith(f"{tmp_path / 'nope.toml'}: no such topology file; check the path")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    assert "is a folder, not a topology file" in error_of(tmp_path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated, because tests may run as root, whom file permissions do not stop.
    path = write(tmp_path, CLUSTER + NODES)

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    message = error_of(path)
    assert message == f"{path}: cannot read the topology file (permission denied); make it readable by this user"


def test_relative_path_is_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "topologies").mkdir()
    write(tmp_path, CLUSTER + NODES + TOPIC + "replication = 5\n", name="topologies/bad.toml")
    monkeypatch.chdir(tmp_path)
    message = error_of(Path("topologies/bad.toml"))
    assert message == ('topologies/bad.toml:20: topic "orders" asks for replication = 5 but the topology has 3 '
                       'nodes; lower replication or add nodes')


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[cluster]\nname = "t"\n# caf\xe9\n')
    assert error_of(path) == f"{path}:3: the file is not UTF-8 text; save it as UTF-8"


def test_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_bytes(b"#" * (FILE_BYTES_MAX + 1))
    assert "too large for a topology file" in error_of(path)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + (CLUSTER + NODES).encode())
    assert load_topology(path).cluster.name == "t"


@pytest.mark.parametrize("text, fragment", [
    ('[cluster]\nname = t   # HERE\n', "put text in quotes"),
    ('[cluster]\nname = "t"\n[[node]]\nname "n1"   # HERE\n', "expected `key = value`"),
    ('[cluster]\nname = "t"\n[cluster]   # HERE\nname = "u"\n', "the table [cluster] appears twice"),
    ('[cluster]\nname = "t"\nname = "u"   # HERE\n', "a key is set twice"),
    ('[cluster]\nname = "t\n# HERE above: the column is on the line of the open quote\n', "closing quote"),
    ('[cluster\n# HERE above\n', "missing its closing ]"),
])
def test_toml_syntax_errors(tmp_path: Path, text: str, fragment: str) -> None:
    line = marked_line(text)
    if "HERE above" in text:
        line -= 1
    message = check_error(tmp_path, text, "not valid TOML at column", fragment, "fix the syntax", line=line)
    assert "(at line" not in message  # re-worded, not tomllib's own text


def test_toml_error_at_end_of_document(tmp_path: Path) -> None:
    text = '[cluster]\nname = "t"\nseeds = ["a:1",\n"b:2"\n'
    check_error(tmp_path, text, "at the end of the file", "an array is missing its closing ]", line=4)


def test_missing_cluster(tmp_path: Path) -> None:
    check_error(tmp_path, NODES, "there is no [cluster] table; add one", line=1)


def test_inline_tables_point_at_their_key(tmp_path: Path) -> None:
    text = '\n\nnode = [{ name = "n1", host = "127.0.0.1", port = 0 }]   # HERE\n' + CLUSTER
    check_error(tmp_path, text, "port = 0 is out of range")


def test_cluster_not_a_table(tmp_path: Path) -> None:
    check_error(tmp_path, 'cluster = "t"   # HERE\n' + NODES, "cluster must be a table")


def test_missing_cluster_name(tmp_path: Path) -> None:
    check_error(tmp_path, '\n[cluster]   # HERE\ndata_dir = "d"\n' + NODES, "[cluster] has no name; add name = ")


def test_no_nodes(tmp_path: Path) -> None:
    check_error(tmp_path, CLUSTER + TOPIC, "there is no [[node]] table; add one per node", line=1)


def test_cluster_is_checked_before_the_nodes(tmp_path: Path) -> None:
    check_error(tmp_path, CLUSTER + 'seeds = ["127.0.0.1"]   # HERE\n', 'seed "127.0.0.1" is not HOST:PORT')


def test_backoff_errors_name_the_dotted_key(tmp_path: Path) -> None:
    text = CLUSTER + NODES + TOPIC + 'backoff = { initial = "5x" }   # HERE\n'
    check_error(tmp_path, text, 'topic "orders": backoff.initial: duration "5x" has an unknown unit "x"',
                'e.g. initial = "1s"')


def test_single_bracket_node(tmp_path: Path) -> None:
    text = CLUSTER + '\n[node]   # HERE\nname = "n1"\nhost = "127.0.0.1"\nport = 7100\n'
    check_error(tmp_path, text, "node must be a list of tables; write [[node]] (double brackets)")


def test_duplicate_node_names(tmp_path: Path) -> None:
    text = CLUSTER + NODES + '\n[[node]]\nname = "n2"   # HERE\nhost = "127.0.0.1"\nport = 7300\n'
    check_error(tmp_path, text, 'two nodes are named "n2" (the other is [[node]] number 2)', "give each node")


def test_duplicate_address(tmp_path: Path) -> None:
    text = CLUSTER + NODES + '\n[[node]]\nname = "n4"\nhost = "127.0.0.1"\nport = 7110   # HERE\n'
    check_error(tmp_path, text, 'node "n4" has the same address 127.0.0.1:7110 as node "n2"',
                "space nodes on one host at least 10 apart")


def test_overlapping_port_ranges(tmp_path: Path) -> None:
    text = CLUSTER + NODES + '\n[[node]]\nname = "n4"\nhost = "127.0.0.1"\nport = 7129   # HERE\n'
    check_error(tmp_path, text, 'node "n4" (port 7129) and node "n3" (port 7120) are on host 127.0.0.1 and '
                                'their port ranges overlap', "each node uses 10 ports")


def test_same_port_on_other_hosts_is_fine(tmp_path: Path) -> None:
    text = CLUSTER + NODES + '\n[[node]]\nname = "n4"\nhost = "127.0.0.2"\nport = 7105\n'
    assert len(load_topology(write(tmp_path, text)).nodes) == 4


@pytest.mark.parametrize("port, fragment", [
    ("0", "port = 0 is out of range; use a number from 1 to 65526"),
    ("70000", "port = 70000 is out of range"),
    ("65530", "port = 65530 is out of range"),       # its ten ports would pass 65535
    ('"7100"', 'port must be a whole number, not the string "7100"; write port = 7100'),
    ("7100.0", "port must be a whole number, not the decimal number 7100.0"),
    ("true", "port must be a whole number, not true (true/false)"),
])
def test_bad_port(tmp_path: Path, port: str, fragment: str) -> None:
    text = CLUSTER + f'\n[[node]]\nname = "n1"\nhost = "127.0.0.1"\nport = {port}   # HERE\n'
    check_error(tmp_path, text, 'node "n1"', fragment)


@pytest.mark.parametrize("host, fragment", [
    ('"0.0.0.0"', "0.0.0.0 is not an address other nodes can dial"),
    ('"bad host"', '"bad host" is neither an IP address nor a host name'),
    ('"300.1.1.1"', "neither an IP address nor a host name"),
    ("7", "host must be a string"),
])
def test_bad_host(tmp_path: Path, host: str, fragment: str) -> None:
    text = CLUSTER + f'\n[[node]]\nname = "n1"\nhost = {host}   # HERE\nport = 7100\n'
    check_error(tmp_path, text, fragment)


def test_missing_node_keys(tmp_path: Path) -> None:
    check_error(tmp_path, CLUSTER + '\n[[node]]   # HERE\nhost = "127.0.0.1"\nport = 7100\n',
                '[[node]] number 1 has no name; add name = "n1"')
    check_error(tmp_path, CLUSTER + NODES + '\n[[node]]   # HERE\nname = "n4"\nport = 7300\n',
                'node "n4" has no host; add host = "127.0.0.1"')
    check_error(tmp_path, CLUSTER + '\n[[node]]   # HERE\nname = "n1"\nhost = "127.0.0.1"\n',
                'node "n1" has no port; add port = 7100')


@pytest.mark.parametrize("name", ['"."', '".."', '"-x"', '"a/b"', '""', '"' + "x" * 64 + '"'])
def test_bad_node_name(tmp_path: Path, name: str) -> None:
    text = CLUSTER + f'\n[[node]]\nname = {name}   # HERE\nhost = "127.0.0.1"\nport = 7100\n'
    check_error(tmp_path, text, "is not allowed; use 1 to 63 letters, digits")


def test_unknown_keys_are_named_with_the_allowed_ones(tmp_path: Path) -> None:
    text = CLUSTER + NODES + '\n[[node]]\nname = "n4"\nhost = "127.0.0.1"\nprot = 7300   # HERE\n'
    check_error(tmp_path, text, 'unknown key "prot" in node "n4"; did you mean "port"? allowed keys: name, host, port')
    text = CLUSTER + 'dicovery = "off"   # HERE\n' + NODES
    check_error(tmp_path, text, 'unknown key "dicovery" in [cluster]; did you mean "discovery"?')
    text = CLUSTER + NODES + TOPIC + 'retention_ms = 5   # HERE\n'
    check_error(tmp_path, text, 'unknown key "retention_ms" in topic "orders"', "allowed keys: name, partitions")
    text = CLUSTER + NODES + '\n[[nodes]]   # HERE\nname = "n4"\n'
    check_error(tmp_path, text, 'unknown key "nodes" in the top level of the file; did you mean "node"?')
    text = CLUSTER + NODES + TOPIC + 'backoff = { initial = "1s", maximum = "9s" }   # HERE\n'
    check_error(tmp_path, text, 'unknown key "maximum" in topic "orders" backoff; did you mean "max"?')


def test_error_in_the_nth_topic_points_at_that_topic(tmp_path: Path) -> None:
    topics = "".join(f'\n[[topic]]\nname = "t{i}"\npartitions = 1\n' for i in range(3))
    text = CLUSTER + NODES + topics + '\n[[topic]]\nname = "t3"\npartitions = 1\nreplication = 4   # HERE\n'
    check_error(tmp_path, text, 'topic "t3" asks for replication = 4 but the topology has 3 nodes; '
                                'lower replication or add nodes')


def test_replication_bounds(tmp_path: Path) -> None:
    check_error(tmp_path, CLUSTER + NODES + TOPIC + "replication = 0   # HERE\n",
                'topic "orders": replication = 0 is out of range; use a number from 1 to 3')
    one_node = CLUSTER + NODES.split("\n\n")[0] + "\n" + TOPIC + "replication = 2   # HERE\n"
    check_error(tmp_path, one_node, "but the topology has 1 node; lower replication or add nodes")


@pytest.mark.parametrize("value, fragment", [
    ("0", "partitions = 0 is out of range; use a number from 1 to 10000"),
    ("10001", "partitions = 10001 is out of range"),
    ('"8"', 'partitions must be a whole number, not the string "8"'),
])
def test_bad_partitions(tmp_path: Path, value: str, fragment: str) -> None:
    text = CLUSTER + NODES + f'\n[[topic]]\nname = "orders"\npartitions = {value}   # HERE\n'
    check_error(tmp_path, text, fragment)


def test_missing_partitions(tmp_path: Path) -> None:
    check_error(tmp_path, CLUSTER + NODES + '\n[[topic]]   # HERE\nname = "orders"\n',
                'topic "orders" has no partitions; add partitions = 8')


@pytest.mark.parametrize("name, fragment", [
    ('"bad name"', 'name "bad name" is not allowed; use 1 to 200 letters, digits'),
    ('"' + "x" * 201 + '"', "is not allowed; use 1 to 200"),
    ('""', 'name "" is not allowed'),
    ('"__meta"', "names starting with '__' are kept for zq's own topics; rename it"),
    ('"orders.dlq"', "names ending with \".dlq\" are kept for dead-letter topics"),
    ("1", "name must be a string, not the number 1"),
])
def test_bad_topic_names(tmp_path: Path, name: str, fragment: str) -> None:
    text = CLUSTER + NODES + f'\n[[topic]]\npartitions = 1\nname = {name}   # HERE\n'
    check_error(tmp_path, text, fragment)


def test_duplicate_topic(tmp_path: Path) -> None:
    text = CLUSTER + NODES + TOPIC + '\n[[topic]]\nname = "orders"   # HERE\npartitions = 2\n'
    check_error(tmp_path, text, 'two topics are named "orders" (the other is [[topic]] number 1); keep one')


@pytest.mark.parametrize("line, fragment", [
    ('retention = "7x"', 'retention: duration "7x" has an unknown unit "x"; use one of ms, s, m, h, d, w'),
    ('retention = "7"', 'duration "7" has no unit; add one of ms, s, m, h, d, w, e.g. "7s"'),
    ('retention = "soon"', '"soon" is not a duration; write a number and a unit'),
    ('retention = "1.5ms"', "is not a whole number of milliseconds; use a smaller unit"),
    ("retention = 1.5", "a duration must be a string like \"30s\" or a whole number of milliseconds"),
    ("retention = -5", "a duration cannot be negative"),
    ("retention = 0", "retention must be longer than 0; remove the key to keep messages forever"),
    ('retention_bytes = "10XB"', 'size "10XB" has an unknown unit "XB"; use B, KB'),
    ('retention_bytes = "0.5B"', "is not a whole number of bytes"),
    ('retention_bytes = "0"', "retention_bytes must be more than 0"),
    ("max_deliveries = 0", "max_deliveries = 0 is out of range; use a number from 1 to 1000"),
    ('compact = "yes"', 'compact must be true or false, not the string "yes"; write compact = false'),
    ("compact = true", "key compaction (compact = true) is not built yet; remove the key or write compact = false"),
    ('durability = "sync"', 'durability = "sync" is not known; use "fsync" or "replicated"'),
    ('backoff = "1s"', "backoff must be a table, not the string"),
    ('backoff = { initial = "soon" }', '"soon" is not a duration'),
    ('backoff = { initial = "10s", max = "1s" }', "backoff max (1s) is shorter than backoff initial (10s); make max"),
])
def test_bad_topic_settings(tmp_path: Path, line: str, fragment: str) -> None:
    text = CLUSTER + NODES + TOPIC + f"{line}   # HERE\n" + 'compact = false\n' * ("compact" not in line)
    check_error(tmp_path, text, 'topic "orders"', fragment)


def test_backoff_sub_table_points_at_the_key(tmp_path: Path) -> None:
    text = CLUSTER + NODES + TOPIC + '\n[topic.backoff]\ninitial = "1s"\nmax = "1 minute"   # HERE\n'
    check_error(tmp_path, text, 'duration "1 minute" has an unknown unit "minute"')
    text = CLUSTER + NODES + TOPIC + 'backoff.initial = "1s"\nbackoff.max = "1y"   # HERE\n'
    check_error(tmp_path, text, 'unknown unit "y"')


def test_multi_line_values_do_not_confuse_the_line_finder(tmp_path: Path) -> None:
    text = CLUSTER + '''seeds = [
  "127.0.0.1:7100",   # port = 1
  "[::1]:7110",
]
''' + NODES + '''
[security]
note = """
[[topic]]
name = "decoy"
partitions = 0
"""
other = 'a # [x]'
list = [[1, 2], [
  3]]

[[topic]]
name = "x"
partitions = 1

''' + TOPIC + "replication = 9   # HERE\n"
    check_error(tmp_path, text, 'topic "orders" asks for replication = 9')


def test_declared_groups_are_refused_until_they_are_built(tmp_path: Path) -> None:
    # Issue 9: [[group]] tables were checked and then used by nothing; now they are refused, at the
    # line of the first one.
    base = CLUSTER + NODES + TOPIC
    check_error(tmp_path, base + '\n[[group]]   # HERE\nname = "g"\ntopics = ["orders"]\n'
                                 '\n[[group]]\nname = "h"\ntopics = ["orders"]\n',
                "[[group]] tables (groups declared in the topology) are not built yet; remove them")


@pytest.mark.parametrize("seed, fragment", [
    ('"127.0.0.1"', 'seed "127.0.0.1" is not HOST:PORT (write HOST:PORT'),
    ('"127.0.0.1:99999"', "the port must be a number from 1 to 65535"),
    ('"127.0.0.1:http"', "the port must be a number"),
    ('"::1:7100"', "an IPv6 address goes in brackets"),
    ('"[::1:7100"', "an IPv6 address goes in brackets followed by the port"),
    ('":7100"', "write HOST:PORT"),
    ('"0.0.0.0:7100"', "not an address other nodes can dial"),
])
def test_bad_seeds(tmp_path: Path, seed: str, fragment: str) -> None:
    check_error(tmp_path, CLUSTER + f"seeds = [{seed}]   # HERE\n" + NODES, fragment)


def test_seeds_must_be_a_list_of_strings(tmp_path: Path) -> None:
    check_error(tmp_path, CLUSTER + 'seeds = "127.0.0.1:7100"   # HERE\n' + NODES,
                'seeds must be an array of strings, not the string "127.0.0.1:7100"; write seeds = [')


def test_bad_discovery(tmp_path: Path) -> None:
    check_error(tmp_path, CLUSTER + 'discovery = "mdns"   # HERE\n' + NODES,
                'discovery = "mdns" is not known; use "zeroconf" or "off"')


def test_bad_voters(tmp_path: Path) -> None:
    check_error(tmp_path, CLUSTER + 'voters = ["n1", "n7"]   # HERE\n' + NODES,
                'voters names "n7", which is not a [[node]] in this file; known nodes: n1, n2, n3')
    check_error(tmp_path, CLUSTER + 'voters = []   # HERE\n' + NODES, "voters is empty; name the nodes")
    check_error(tmp_path, CLUSTER + 'voters = ["n1", "n1"]   # HERE\n' + NODES, 'voters lists "n1" twice')


def test_bad_data_dir(tmp_path: Path) -> None:
    check_error(tmp_path, CLUSTER + "data_dir = 5   # HERE\n" + NODES, "data_dir must be a string (a folder path)")
    check_error(tmp_path, CLUSTER + 'data_dir = ""   # HERE\n' + NODES, "data_dir is empty; write a folder")


def test_security_must_be_a_table(tmp_path: Path) -> None:
    check_error(tmp_path, 'security = "on"   # HERE\n' + CLUSTER + NODES, "security must be a table")


# ============================================================================================
# The line finder on its own
# ============================================================================================

def test_source_map_lines() -> None:
    source = SourceMap(textwrap.dedent("""\
        top = 1
        [cluster]
        name = "x"
        "quoted key" = 2
        [[topic]]
        name = "a"
        [[topic]]
        name = "b"
        backoff = { initial = "1s" }
        [topic.backoff]
        max = "2s"
        """))
    assert source.line(("", 0), ("top",)) == 1
    assert source.line(("cluster", 0)) == 2
    assert source.line(("cluster", 0), ("name",)) == 3
    assert source.line(("cluster", 0), ("quoted key",)) == 4
    assert source.line(("topic", 0), ("name",)) == 6
    assert source.line(("topic", 1)) == 7
    assert source.line(("topic", 1), ("backoff", "initial")) == 9   # falls back to the enclosing key
    assert source.line(("topic", 1), ("backoff", "max")) == 11
    assert source.line(("topic", 1), ("missing",)) == 7             # falls back to the header
    assert source.line(("group", 0)) == 1                            # no such table: line 1


# ============================================================================================
# Durations and sizes
# ============================================================================================

@pytest.mark.parametrize("text, ms", [
    ("500ms", 500), ("30s", 30_000), ("5m", 300_000), ("2h", 7_200_000), ("7d", 604_800_000),
    ("1w", 604_800_000), (" 1.5s ", 1_500), ("0ms", 0), (250, 250), ("10 s", 10_000),
])
def test_parse_duration_ms(text: str | int, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text, size", [
    ("1024", 1024), ("10KB", 10_000), ("10kb", 10_000), ("512MiB", 512 * 2**20), ("100GB", 100 * 10**9),
    ("1TiB", 2**40), ("3B", 3), ("0.5GB", 500_000_000), (4096, 4096),
])
def test_parse_bytes(text: str | int, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["", "s", "5x", "1e3s", "-1s", "5", "1.0005s", "1.5.1s", True, 1.5, -1, None, "9" * 80])
def test_parse_duration_errors(bad: object) -> None:
    with pytest.raises(InvalidValue):
        parse_duration_ms(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "GB", "5XB", "1.5B", "-1KB", "1 0KB", False, 2.0, -1, None])
def test_parse_bytes_errors(bad: object) -> None:
    with pytest.raises(InvalidValue):
        parse_bytes(bad)  # type: ignore[arg-type]


def test_invalid_value_is_both_a_zq_error_and_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown unit"):
        parse_bytes("1XB")
    with pytest.raises(ZqError):
        parse_duration_ms("1y")


@given(st.integers(min_value=0, max_value=10**15))
def test_duration_format_then_parse_round_trips(ms: int) -> None:
    text = format_duration_ms(ms)
    assert parse_duration_ms(text) == ms
    assert len(text) <= len(f"{ms}ms")


@given(st.integers(min_value=0, max_value=10**18))
def test_bytes_format_then_parse_round_trips(size: int) -> None:
    text = format_bytes(size)
    assert parse_bytes(text) == size
    assert len(text) <= len(str(size))


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(DURATION_UNITS_MS)))
def test_duration_units_scale(number: int, unit: str) -> None:
    assert parse_duration_ms(f"{number}{unit}") == number * DURATION_UNITS_MS[unit]


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(BYTE_UNITS)))
def test_byte_units_scale(number: int, unit: str) -> None:
    assert parse_bytes(f"{number}{unit.upper()}") == number * BYTE_UNITS[unit]


def test_formats() -> None:
    assert [format_duration_ms(ms) for ms in (0, 1_500, 90_000, 3_600_000, 604_800_000)] == \
        ["0ms", "1500ms", "90s", "1h", "1w"]
    assert [format_bytes(b) for b in (0, 999, 1000, 1024, 100 * 10**9, 2**20)] == \
        ["0", "999", "1KB", "1KiB", "100GB", "1MiB"]


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:7100") == ("127.0.0.1", 7100)
    assert split_host_port("[fd00::2]:7100") == ("fd00::2", 7100)
    assert split_host_port("node-1.lan:80") == ("node-1.lan", 80)


# ============================================================================================
# The shipped files
# ============================================================================================

SHIPPED = sorted((REPO / "topologies").glob("*.toml"))


def test_shipped_topologies_exist() -> None:
    names = {path.name for path in SHIPPED}
    assert {"local.toml", "lan-example.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_topology_loads(path: Path) -> None:
    topology = load_topology(path)
    assert topology.nodes and topology.cluster.voters


def test_local_topology() -> None:
    topology = load_topology(REPO / "topologies" / "local.toml")
    assert topology.cluster.name == "zq"
    assert topology.cluster.data_dir == REPO / "data"
    assert [(n.name, n.host, n.port) for n in topology.nodes] == [
        ("n1", "127.0.0.1", 7100), ("n2", "127.0.0.1", 7110), ("n3", "127.0.0.1", 7120)]
    assert topology.cluster.seeds == ("127.0.0.1:7100", "127.0.0.1:7110", "127.0.0.1:7120")
    assert [n.name for n in topology.nodes_on_this_host()] == ["n1", "n2", "n3"]
    (orders,) = topology.topics
    assert (orders.name, orders.partitions, orders.replication) == ("orders", 8, 3)


def test_lan_example() -> None:
    topology = load_topology(REPO / "topologies" / "lan-example.toml")
    assert [n.host for n in topology.nodes] == ["192.168.1.11", "192.168.1.12", "192.168.1.13"]
    assert topology.topics[0].replication == 3
    assert topology.nodes_on_this_host(local_addresses=["192.168.1.12"]) == [topology.node("n2")]


def test_every_shipped_key_has_a_comment() -> None:
    # The files teach the format: each key is explained on its line or in the comment above it.
    for path in (REPO / "topologies" / "local.toml", REPO / "topologies" / "lan-example.toml"):
        lines = path.read_text().splitlines()
        seen: set[str] = set()
        for number, line in enumerate(lines):
            key = line.split("=", 1)[0].strip()
            if "=" not in line or line.lstrip().startswith("#") or key in seen:
                continue
            explained = "#" in line or lines[number - 1].lstrip().startswith("#")
            if path.name == "local.toml":
                assert explained, f"{path.name}:{number + 1}: {key} has no comment"
                seen.add(key)
            elif explained:
                seen.add(key)

