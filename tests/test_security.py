"""zq.io.security with real ZeroMQ sockets on 127.0.0.1: CURVE servers with a ZAP handler admit the
cluster key and allowed client keys, and refuse (and count) everything else."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq

from zq.io import security as S

REFUSED_WAIT_MS = 600      # long enough for a CURVE handshake on loopback, several times over
ALLOWED_WAIT_MS = 5_000


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    S.generate_keys(tmp_path, "cluster")
    S.generate_keys(tmp_path / "clients", "c1")
    S.generate_keys(tmp_path / "others", "stranger")
    return tmp_path


@pytest.fixture
def keys(keydir: Path) -> S.NodeKeys:
    return S.NodeKeys(S.load_key_pair(keydir / "cluster.key_secret"), S.load_allowed_keys(keydir / "clients"))


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def server(ctx: zmq.Context, keys: S.NodeKeys, kind: int = zmq.ROUTER, domain: bytes = S.ROUTER_DOMAIN):
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    S.server_socket(sock, keys, domain)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def dealer(ctx: zmq.Context, endpoint: str, client_keys: S.ClientKeys | None = None):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if client_keys is not None:
        S.client_socket(sock, client_keys)
    sock.connect(endpoint)
    return sock


def arrives(router: zmq.Socket, wait_ms: int) -> bytes | None:
    if not router.poll(wait_ms):
        return None
    return router.recv_multipart()[-1]


def client_keys(keydir: Path, secret: str, cluster: str = "cluster.key") -> S.ClientKeys:
    return S.client_keys_from_files(keydir / cluster, keydir / secret)


# --------------------------------------------------------------------------------------------
# Key files


def test_generated_keys_load_back_and_the_secret_file_is_private(tmp_path):
    public_path, secret_path = S.generate_keys(tmp_path / "k", "n1")
    assert (public_path.name, secret_path.name) == ("n1.key", "n1.key_secret")
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    pair = S.load_key_pair(secret_path)
    assert len(pair.public) == 40 and len(pair.secret) == 40
    assert S.load_public_key(public_path) == pair.public
    assert pair.secret.decode() not in public_path.read_text()   # the public file never holds the secret
    with pytest.raises(S.SecurityError, match="exists already"):
        S.generate_keys(tmp_path / "k", "n1")
    assert S.generate_keys(tmp_path / "k", "n1", overwrite=True) == (public_path, secret_path)
    assert S.load_key_pair(secret_path) != pair


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing.key_secret", "does not exist"),
    (lambda d: (d / "junk.key_secret").write_text("not a key") and d / "junk.key_secret", "cannot be read"),
    (lambda d: (d / "short.key_secret").write_text('curve\n    public-key = "abc"\n    secret-key = "def"\n')
     and d / "short.key_secret", "no valid Z85 key"),
    (lambda d: S.generate_keys(d, "pub")[0], "only a public key"),
])
def test_bad_key_files_are_one_clear_error(tmp_path, setup, message):
    with pytest.raises(S.SecurityError, match=message):
        S.load_key_pair(setup(tmp_path))


def test_node_keys_from_a_topology_table(keydir):
    class Topo:
        security = {"cluster_secret_key_file": str(keydir / "cluster.key_secret"),
                    "cluster_public_key_file": str(keydir / "cluster.key"),
                    "allowed_clients_dir": str(keydir / "clients")}
    keys = S.node_keys_from_topology(Topo)
    assert keys.cluster == S.load_key_pair(keydir / "cluster.key_secret")
    assert keys.allowed_clients == {S.load_public_key(keydir / "clients" / "c1.key")}
    Topo.security = {**Topo.security, "cluster_public_key_file": str(keydir / "others" / "stranger.key")}
    with pytest.raises(S.SecurityError, match="different key pairs"):
        S.node_keys_from_topology(Topo)
    Topo.security = None
    assert S.node_keys_from_topology(Topo) is None and S.node_keys_from_topology(None) is None


def test_client_keys_from_the_environment(keydir):
    assert S.client_keys_from_env({}) is None
    with pytest.raises(S.SecurityError, match="set both"):
        S.client_keys_from_env({S.ENV_CLUSTER_KEY: str(keydir / "cluster.key")})
    keys = S.client_keys_from_env({S.ENV_CLUSTER_KEY: str(keydir / "cluster.key"),
                                   S.ENV_CLIENT_KEY: str(keydir / "clients" / "c1.key_secret")})
    assert keys.cluster_public == S.load_public_key(keydir / "cluster.key")
    assert keys.client == S.load_key_pair(keydir / "clients" / "c1.key_secret")


# --------------------------------------------------------------------------------------------
# Real sockets


def test_an_allowed_client_gets_through_and_others_are_refused_and_counted(ctx, keys, keydir):
    auth = S.Authenticator.start(ctx, keys)
    try:
        router, endpoint = server(ctx, keys)
        stranger = dealer(ctx, endpoint, client_keys(keydir, "others/stranger.key_secret"))
        stranger.send(b"from a stranger")
        assert arrives(router, REFUSED_WAIT_MS) is None
        assert auth.counters["refused"] >= 1 and auth.counters["allowed"] == 0

        plain = dealer(ctx, endpoint)        # no CURVE at all: the handshake itself fails
        plain.send(b"in the clear")
        assert arrives(router, REFUSED_WAIT_MS) is None

        c1 = dealer(ctx, endpoint, client_keys(keydir, "clients/c1.key_secret"))
        c1.send(b"from c1")
        assert arrives(router, ALLOWED_WAIT_MS) == b"from c1"
        assert auth.counters["allowed"] == 1

        node = ctx.socket(zmq.DEALER)        # another node: the cluster key pair as client key
        node.setsockopt(zmq.LINGER, 0)
        S.peer_socket(node, keys)
        node.connect(endpoint)
        node.send(b"from a node")
        assert arrives(router, ALLOWED_WAIT_MS) == b"from a node"
        for s in (stranger, plain, c1, node, router):
            s.close(0)
    finally:
        auth.close()


def test_a_client_that_expects_another_server_key_sends_nothing(ctx, keys, keydir):
    auth = S.Authenticator.start(ctx, keys)
    try:
        router, endpoint = server(ctx, keys)
        wrong = dealer(ctx, endpoint, client_keys(keydir, "clients/c1.key_secret", cluster="others/stranger.key"))
        wrong.send(b"to an impostor?")
        assert arrives(router, REFUSED_WAIT_MS) is None
        wrong.close(0)
        router.close(0)
    finally:
        auth.close()


def test_the_replication_stream_is_for_nodes_only(ctx, keys, keydir):
    auth = S.Authenticator.start(ctx, keys)
    try:
        pub, endpoint = server(ctx, keys, zmq.PUB, S.PEER_DOMAIN)
        subs = {}
        for who, set_up in (("node", lambda s: S.peer_socket(s, keys)),
                            ("client", lambda s: S.client_socket(s, client_keys(keydir, "clients/c1.key_secret")))):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            set_up(sub)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(endpoint)
            subs[who] = sub
        got = None
        for _ in range(50):                  # PUB drops until a subscriber has joined: publish until one hears
            pub.send(b"entries")
            if subs["node"].poll(100):
                got = subs["node"].recv()
                break
        assert got == b"entries"
        assert not subs["client"].poll(REFUSED_WAIT_MS)   # an allowed client still may not read replication
        assert auth.counters["refused"] >= 1
        for s in (*subs.values(), pub):
            s.close(0)
    finally:
        auth.close()


def test_without_a_zap_handler_every_handshake_fails_closed(ctx, keys, keydir):
    router, endpoint = server(ctx, keys)     # no Authenticator on this context
    c1 = dealer(ctx, endpoint, client_keys(keydir, "clients/c1.key_secret"))
    c1.send(b"hello")
    assert arrives(router, REFUSED_WAIT_MS) is None
    c1.close(0)
    router.close(0)


def test_one_handler_per_context_shared_by_nodes_of_one_cluster(ctx, keys, keydir):
    first = S.Authenticator.start(ctx, keys)
    second = S.Authenticator.start(ctx, keys)
    assert first is second
    other = S.NodeKeys(S.load_key_pair(keydir / "others" / "stranger.key_secret"), frozenset())
    with pytest.raises(S.SecurityError, match="another cluster"):
        S.Authenticator.start(ctx, other)
    second.close()
    router, endpoint = server(ctx, keys)     # still served after one user closed
    c1 = dealer(ctx, endpoint, client_keys(keydir, "clients/c1.key_secret"))
    c1.send(b"still")
    assert arrives(router, ALLOWED_WAIT_MS) == b"still"
    c1.close(0)
    router.close(0)
    first.close()


def test_a_malformed_zap_request_is_answered_and_counted(keys):
    auth = S.Authenticator.__new__(S.Authenticator)   # reply() only: no sockets, no thread
    auth.keys, auth.counters, auth._refused_logged = keys, {"allowed": 0, "refused": 0, "bad_requests": 0}, set()
    assert auth.reply([b"2.0", b"7"])[:3] == [b"1.0", b"7", b"500"]
    assert auth.reply([b"1.0", b"8", b"zq", b"1.2.3.4", b"", b"PLAIN", b"user", b"pw"])[2] == b"400"
    assert auth.reply([b"1.0", b"9", b"zq", b"1.2.3.4", b"", b"CURVE", b"short"])[2] == b"400"
    assert auth.counters == {"allowed": 0, "refused": 2, "bad_requests": 1}


# --------------------------------------------------------------------------------------------
# zq keys generate


def test_zq_keys_generate_writes_a_pair_and_never_overwrites(tmp_path, capsys):
    from zq.cli.app import main
    with pytest.raises(SystemExit) as done:
        main(["keys", "generate", "--out", str(tmp_path), "--name", "app1", "--json"])
    assert done.value.code == 0
    import json
    doc = json.loads(capsys.readouterr().out)
    assert S.load_key_pair(Path(doc["secret_key_file"])).public.decode() == doc["public_key"]
    assert S.load_public_key(Path(doc["public_key_file"])).decode() == doc["public_key"]
    with pytest.raises(SystemExit) as again:
        main(["keys", "generate", "--out", str(tmp_path), "--name", "app1"])
    assert again.value.code != 0
    assert "exists already" in capsys.readouterr().err
    assert S.load_key_pair(Path(doc["secret_key_file"])).public.decode() == doc["public_key"]   # untouched


# --------------------------------------------------------------------------------------------
# The topology's [security] table


def test_the_security_table_of_a_topology(tmp_path):
    from zq.errors import TopologyError
    from zq.topology import load_topology
    base = '[cluster]\nname = "c"\n\n[[node]]\nname = "n1"\nhost = "127.0.0.1"\nport = 7100\n\n[security]\n'
    path = tmp_path / "t.toml"
    path.write_text(base + 'cluster_secret_key_file = "keys/cluster.key_secret"\nallowed_clients_dir = "/etc/zq/c"\n')
    assert load_topology(path).security == {"mode": "curve",
                                            "cluster_secret_key_file": str(tmp_path / "keys" / "cluster.key_secret"),
                                            "allowed_clients_dir": "/etc/zq/c"}
    for extra, message in (('cluster_secret_key = "x"   # line 10\n', "t.toml:10: unknown key"),
                           ('mode = "tls"\n', 'mode = "tls" is not known'),
                           ('cluster_secret_key_file = 3\n', "must be a string")):
        path.write_text(base + extra)
        with pytest.raises(TopologyError, match=message):
            load_topology(path)
    path.write_text(base + 'mode = "curve"\n')
    with pytest.raises(S.SecurityError, match="t.toml: \\[security\\] has no cluster_secret_key_file"):
        S.node_keys_from_topology(load_topology(path))
    path.write_text(base.replace("[security]\n", ""))
    assert S.node_keys_from_topology(load_topology(path)) is None   # no [security]: an open cluster


# --------------------------------------------------------------------------------------------
# zq.Client with keys, against a secured stand-in node (a CURVE ROUTER that answers status)


class SecuredStandIn:
    def __init__(self, ctx: zmq.Context, keys: S.NodeKeys):
        import threading
        self.auth = S.Authenticator.start(ctx, keys)
        self.router, self.endpoint = server(ctx, keys)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        from zq import protocol as P
        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            identity, *frames = self.router.recv_multipart()
            msg, _ = P.decode(frames)
            self.router.send_multipart([identity, *P.encode(P.StatusReply(msg.req_id, {"nodes": [], "who": "n1"}))])

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.router.close(0)
        self.auth.close()


def test_a_client_needs_an_allowed_key_to_reach_a_secured_node(ctx, keys, keydir, monkeypatch):
    import dataclasses

    from zq.client import Client
    from zq.errors import ConnectionFailed, Timeout
    from zq.limits import DEFAULT
    limits = dataclasses.replace(DEFAULT, request_timeout_ms=300, retry_backoff_ms=10, api_timeout_ms=1_000)
    node = SecuredStandIn(ctx, keys)
    address = node.endpoint.removeprefix("tcp://")
    try:
        with Client(bootstrap=address, security=client_keys(keydir, "clients/c1.key_secret")) as client:
            assert client.status()["who"] == "n1"
        monkeypatch.setenv(S.ENV_CLUSTER_KEY, str(keydir / "cluster.key"))     # the CLI's way: environment
        monkeypatch.setenv(S.ENV_CLIENT_KEY, str(keydir / "clients" / "c1.key_secret"))
        with Client(bootstrap=address) as client:
            assert client.status()["who"] == "n1"
        refused_before = node.auth.counters["refused"]
        monkeypatch.setenv(S.ENV_CLIENT_KEY, str(keydir / "others" / "stranger.key_secret"))
        with Client(bootstrap=address, limits=limits) as client:
            with pytest.raises((ConnectionFailed, Timeout)):
                client.status()
        assert node.auth.counters["refused"] > refused_before
        monkeypatch.delenv(S.ENV_CLUSTER_KEY)
        monkeypatch.delenv(S.ENV_CLIENT_KEY)
        with Client(bootstrap=address, limits=limits) as client:                # no keys at all
            with pytest.raises((ConnectionFailed, Timeout)):
                client.status()
    finally:
        node.close()


def test_a_secured_cluster_replicates_and_serves_only_allowed_clients(tmp_path, keydir):
    """Three real nodes with [security]: replication between them works over Curve, an allowed
    client produces and consumes, a client with a stranger's key gets nothing."""
    import dataclasses
    from types import SimpleNamespace

    from tests.nodeutil import start_nodes, wait_until
    from zq.client import Client
    from zq.errors import ConnectionFailed, Timeout
    from zq.limits import DEFAULT
    topology = SimpleNamespace(path=tmp_path / "t.toml", nodes=(), cluster=SimpleNamespace(discovery="off"), security={
        "mode": "curve", "cluster_secret_key_file": str(keydir / "cluster.key_secret"),
        "cluster_public_key_file": str(keydir / "cluster.key"), "allowed_clients_dir": str(keydir / "clients")})
    nodes = start_nodes(tmp_path, 3, topology=topology)
    try:
        bootstrap = ",".join(n.address for n in nodes)
        with Client(bootstrap=bootstrap, security=client_keys(keydir, "clients/c1.key_secret")) as client:
            wait_until(lambda: sum(n["state"] == "alive" for n in client.status()["nodes"]) == 3, 20,
                       "three secured nodes to see each other")
            wait_until(lambda: client.create_topic("secret", partitions=2, replication=3) or True, 20, "create")
            producer = client.producer(acks="quorum")
            metas = [producer.send("secret", b"m%d" % i, partition=i % 2).result(20) for i in range(10)]
            consumer = client.consumer("secret", start="earliest")
            got = []
            deadline = __import__("time").monotonic() + 20
            while len(got) < 10 and __import__("time").monotonic() < deadline:
                got += consumer.poll(timeout=0.5)
            assert sorted(m.value for m in got) == sorted(b"m%d" % i for i in range(10))
            assert all(m.epoch >= 1 for m in metas)
            rows = [r for r in client.status()["partitions"] if r["topic"] == "secret"]
            assert all(len(r["in_sync"]) == 3 for r in rows)       # followers replicate over Curve
        limits = dataclasses.replace(DEFAULT, request_timeout_ms=300, retry_backoff_ms=10, api_timeout_ms=1_000)
        with Client(bootstrap=bootstrap, limits=limits, security=client_keys(keydir, "others/stranger.key_secret")) as c:
            with pytest.raises((ConnectionFailed, Timeout)):
                c.status()
    finally:
        for n in nodes:
            n.stop()


def test_node_to_node_messages_are_refused_from_a_client_key(tmp_path, keydir):
    """Under [security] only the cluster key speaks as a node: a client key's RegisterNode,
    Replicate, LocalStatusRequest, group gossip and __meta replica fetch get not_authorised and
    change nothing; its client requests are served; the cluster key's node messages are too."""
    from types import SimpleNamespace

    from tests.nodeutil import start_nodes, wait_until
    from zq import group_protocol as G
    from zq import protocol as P
    from zq.core import repl_types as RT
    topology = SimpleNamespace(path=tmp_path / "t.toml", nodes=(), cluster=SimpleNamespace(discovery="off"), security={
        "mode": "curve", "cluster_secret_key_file": str(keydir / "cluster.key_secret"),
        "cluster_public_key_file": str(keydir / "cluster.key"), "allowed_clients_dir": str(keydir / "clients")})
    [nt] = start_nodes(tmp_path, 1, topology=topology)
    ctx = zmq.Context.instance()
    c1 = dealer(ctx, f"tcp://{nt.address}", client_keys(keydir, "clients/c1.key_secret"))
    as_node = dealer(ctx, f"tcp://{nt.address}", client_keys(keydir, "cluster.key_secret"))

    def rpc(sock, msg):
        sock.send_multipart(P.encode(msg))
        assert sock.poll(5_000), f"no answer to {type(msg).__name__}"
        return P.decode(sock.recv_multipart())[0]
    try:
        wait_until(lambda: isinstance(rpc(c1, P.MetadataRequest(1, None)), P.MetadataReply), 20, "the node to serve")
        refused = [P.RegisterNode(2, "intruder", "127.0.0.1", 9, 1),
                   P.Replicate(3, "evil", [[1, 0, P.to_array(RT.RequestVote(5, "evil", 5, 5))]]),
                   P.LocalStatusRequest(4), G.LocalGroupsRequest(5, None),
                   P.Fetch(6, "__meta", 0, 0, 1024, 0, "n9")]
        for msg in refused:
            reply = rpc(c1, msg)
            assert isinstance(reply, P.ErrorReply) and reply.code == "not_authorised", reply
            assert reply.req_id == msg.req_id and "cluster's nodes only" in reply.message
        assert nt.node.counters["not_authorised"] == len(refused)
        assert "intruder" not in nt.node.meta.nodes
        assert isinstance(rpc(c1, P.StatusRequest(7)), P.StatusReply)                # a client request
        assert isinstance(rpc(as_node, P.LocalStatusRequest(8)), P.LocalStatusReply)  # the cluster key is a node
    finally:
        c1.close(0)
        as_node.close(0)
        nt.stop()
