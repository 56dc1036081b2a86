"""CurveZMQ for zq: key files, socket set-up, and the ZAP handler that decides who may connect.

Theory of operation
-------------------
Who may join is decided by keys, never by addresses or discovery records (TXT records carry no
secrets, and anyone on the LAN can announce anything).

- **One cluster key pair, shared by every node.** Every node is a CURVE server with it (its
  ROUTER and PUB sockets) and a CURVE client with it towards the other nodes (its peer DEALERs and
  its SUB). Holding the cluster *secret* key is what makes a process a node of the cluster. Since
  every node serves with the same key, a node or client needs one server public key for all.
- **A key pair per client.** A client holds the cluster *public* key and a key pair of its own;
  its public key must be in the allowed-clients folder of the nodes it talks to. Removing the file
  (and restarting the node) revokes it. The cluster key pair also works as a client key: tools run
  on a node's own machine need nothing more.
- **ZAP decides.** CURVE encrypts and proves that the client holds the secret half of the public
  key it presents; the ZAP handler (RFC 27, one thread per ZeroMQ context, `Authenticator`) then
  says whether that key may connect. Two domains: `zq` on the ROUTER (the cluster key and allowed
  client keys) and `zq-peer` on the PUB (the cluster key only: the replication stream is for
  nodes). Every refusal is counted (`Authenticator.counters["refused"]`) and logged once per key.
  Server sockets set ZAP_ENFORCE_DOMAIN, so without a running handler every handshake fails
  closed instead of being waved through.

Key files are ZeroMQ's certificate format (`zmq.auth.create_certificates`): `NAME.key` holds
the public key, `NAME.key_secret` both halves (mode 0600), as Z85 text. `zq keys generate` makes
them.

The node's calls, in order: `node_keys_from_topology(topology)` (None: no [security], the cluster is
open: log `OPEN_CLUSTER_WARNING`), `Authenticator.start(ctx, keys)` before binding anything,
`server_socket(sock, keys, ROUTER_DOMAIN)` on the ROUTER and `server_socket(sock, keys,
PEER_DOMAIN)` on the PUB before bind, `peer_socket(sock, keys)` on every peer DEALER and the SUB
before connect, `Authenticator.close()` after the sockets. A client: `client_socket(sock,
ClientKeys)` on each DEALER before connect.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import zmq
import zmq.auth
import zmq.utils.z85

from zq.errors import ZqError

log = logging.getLogger("zq.security")

NODE_USER = "node"                # the ZAP user id of a connection with the cluster key (a node)
CLIENT_USER = "client"            # ... and of one with an allowed client key; the node reads it per message
ROUTER_DOMAIN = b"zq"              # the node's ROUTER: nodes and allowed clients
PEER_DOMAIN = b"zq-peer"           # the node's PUB: nodes only
ZAP_ENDPOINT = "inproc://zeromq.zap.01"   # fixed by RFC 27
ALLOWED_KEYS_MAX = 10_000          # public key files read from the allowed-clients folder
KEY_FILE_BYTES_MAX = 64 * 1024     # a certificate is a few hundred bytes
REFUSALS_LOGGED_MAX = 1_024        # distinct refused keys logged (then only counted)
ZAP_FRAMES_MAX = 16                # a ZAP request has 7 frames for CURVE
ZAP_STOP_TIMEOUT_S = 5.0
ENV_CLUSTER_KEY = "ZQ_CLUSTER_KEY"     # client: the cluster's public key file
ENV_CLIENT_KEY = "ZQ_CLIENT_KEY"       # client: its own secret key file (NAME.key_secret)

OPEN_CLUSTER_WARNING = ("the cluster is open to anyone on the network: there is no [security] table in the "
                        "topology, so connections are neither encrypted nor authenticated; see docs/lan.md, "
                        "'Security'")


class SecurityError(ZqError):
    """A key file is missing or unreadable, or keys do not match. Fix the files; nothing started."""

    code = "security"


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes            # Z85, 40 bytes
    secret: bytes | None     # Z85, 40 bytes; None when only the public half is known


@dataclass(frozen=True, slots=True)
class NodeKeys:
    cluster: KeyPair                      # both halves
    allowed_clients: frozenset[bytes]     # Z85 public keys of clients that may use the ROUTER


@dataclass(frozen=True, slots=True)
class ClientKeys:
    cluster_public: bytes                 # Z85: the key every node serves with
    client: KeyPair                       # this client's own pair


# --------------------------------------------------------------------------------------------
# Key files


def generate_keys(out_dir: Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (both halves, mode 0600) into out_dir."""
    if not name or "/" in name or name.startswith("."):
        raise SecurityError(f"key name {name!r} must be a plain file name such as 'cluster' or 'client1'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = out_dir / f"{name}.key", out_dir / f"{name}.key_secret"
    existing = [p for p in (public_path, secret_path) if p.exists()]
    if existing and not overwrite:
        raise SecurityError(f"{existing[0]} exists already; keys are not overwritten (pick another --name, or "
                            "delete the old files first if you mean to replace them)")
    # create_certificates writes the secret file with the process umask: tighten it before any byte is written.
    old_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(out_dir), name)
    finally:
        os.umask(old_umask)
    os.chmod(public_path, 0o644)
    os.chmod(secret_path, 0o600)
    return public_path, secret_path


def _load(path: Path, what: str) -> tuple[bytes | None, bytes | None]:
    path = Path(path)
    try:
        if path.stat().st_size > KEY_FILE_BYTES_MAX:
            raise SecurityError(f"{what} {path} is too big to be a key file")
        public, secret = zmq.auth.load_certificate(str(path))
    except FileNotFoundError:
        raise SecurityError(f"{what} {path} does not exist; make keys with `zq keys generate`") from None
    except (OSError, ValueError) as e:
        raise SecurityError(f"{what} {path} cannot be read as a ZeroMQ key file: {e}") from None
    if public is None or len(public) != 40 or (secret is not None and len(secret) != 40):
        raise SecurityError(f"{what} {path} holds no valid Z85 key; make keys with `zq keys generate`")
    return public, secret


def load_key_pair(secret_path: Path, what: str = "secret key file") -> KeyPair:
    """Both halves, from a NAME.key_secret file."""
    public, secret = _load(secret_path, what)
    if secret is None:
        raise SecurityError(f"{what} {secret_path} holds only a public key; give the NAME.key_secret file")
    return KeyPair(public, secret)


def load_public_key(path: Path, what: str = "public key file") -> bytes:
    return _load(path, what)[0]


def load_allowed_keys(folder: Path) -> frozenset[bytes]:
    """The public keys of every *.key file in `folder` (at most ALLOWED_KEYS_MAX)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SecurityError(f"allowed clients folder {folder} does not exist; create it and copy clients' "
                            "NAME.key files into it")
    files = sorted(folder.glob("*.key"))
    if len(files) > ALLOWED_KEYS_MAX:
        raise SecurityError(f"{folder} holds {len(files)} key files, more than {ALLOWED_KEYS_MAX}")
    return frozenset(load_public_key(f, "allowed client key") for f in files)


def node_keys_from_topology(topology: Any) -> NodeKeys | None:
    """The node's keys from the topology's [security] table (paths already absolute), or None."""
    table = getattr(topology, "security", None) if topology is not None else None
    if not table:
        return None
    if not table.get("cluster_secret_key_file"):
        where = getattr(topology, "path", "the topology")
        raise SecurityError(f"{where}: [security] has no cluster_secret_key_file; add "
                            'cluster_secret_key_file = "keys/cluster.key_secret" (make it with `zq keys generate`)')
    cluster = load_key_pair(Path(table["cluster_secret_key_file"]), "cluster_secret_key_file")
    if table.get("cluster_public_key_file"):
        public = load_public_key(Path(table["cluster_public_key_file"]), "cluster_public_key_file")
        if public != cluster.public:
            raise SecurityError("cluster_public_key_file and cluster_secret_key_file hold different key pairs; "
                                "give the two files `zq keys generate` made together")
    allowed = load_allowed_keys(Path(table["allowed_clients_dir"])) if table.get("allowed_clients_dir") else frozenset()
    return NodeKeys(cluster, allowed)


def client_keys_from_files(cluster_key: Path, client_secret_key: Path) -> ClientKeys:
    return ClientKeys(load_public_key(cluster_key, "cluster key file"), load_key_pair(client_secret_key, "client key file"))


def client_keys_from_env(environ: Mapping[str, str] = os.environ) -> ClientKeys | None:
    """Client keys named by $ZQ_CLUSTER_KEY and $ZQ_CLIENT_KEY, or None when neither is set."""
    cluster, client = environ.get(ENV_CLUSTER_KEY), environ.get(ENV_CLIENT_KEY)
    if not cluster and not client:
        return None
    if not (cluster and client):
        raise SecurityError(f"set both {ENV_CLUSTER_KEY} (the cluster's public key file) and {ENV_CLIENT_KEY} "
                            "(this client's NAME.key_secret file), or neither")
    return client_keys_from_files(Path(cluster), Path(client))


# --------------------------------------------------------------------------------------------
# Sockets


def server_socket(sock: zmq.Socket, keys: NodeKeys, domain: bytes = ROUTER_DOMAIN) -> None:
    """Make a ROUTER or PUB a CURVE server; call before bind()."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)                  # we hold the key clients must know
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.cluster.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.cluster.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain)               # selects who may connect (see Authenticator)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)            # no ZAP handler: refuse everyone, never allow everyone


def client_socket(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make a client's DEALER a CURVE client of the cluster; call before connect()."""
    _curve_client(sock, keys.cluster_public, keys.client)


def peer_socket(sock: zmq.Socket, keys: NodeKeys) -> None:
    """Make a node's peer DEALER or SUB a CURVE client with the cluster key pair; call before connect()."""
    _curve_client(sock, keys.cluster.public, keys.cluster)


def _curve_client(sock: zmq.Socket, server_public: bytes, pair: KeyPair) -> None:
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)   # the node must prove it holds the cluster secret
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)


# --------------------------------------------------------------------------------------------
# ZAP


class Authenticator:
    """The ZAP handler of one ZeroMQ context, in a thread of its own (libzmq asks it synchronously
    during each handshake, so it must not wait on the node's event loop)."""

    _running: dict[int, Authenticator] = {}
    _lock = threading.Lock()

    def __init__(self, ctx: zmq.Context, keys: NodeKeys) -> None:
        self.ctx = ctx
        self.keys = keys
        self.counters = {"allowed": 0, "refused": 0, "bad_requests": 0}
        self._users = 0
        self._refused_logged: set[bytes] = set()
        self._zap = ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        self._stop_endpoint = f"inproc://zq-zap-stop-{id(self)}"
        self._stop_rx = ctx.socket(zmq.PAIR)
        self._stop_rx.bind(self._stop_endpoint)
        self._thread = threading.Thread(target=self._run, name="zq-zap", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, ctx: zmq.Context, keys: NodeKeys) -> Authenticator:
        """The context's handler: started now, or the running one if it has the same keys (nodes
        of one cluster in one process share it). Call before binding any server socket."""
        with cls._lock:
            auth = cls._running.get(id(ctx))
            if auth is None:
                try:
                    auth = cls(ctx, keys)
                except zmq.ZMQError as e:
                    raise SecurityError(f"cannot start the ZAP handler: {e}; another ZAP handler owns this "
                                        "ZeroMQ context") from None
                cls._running[id(ctx)] = auth
            elif auth.keys != keys:
                raise SecurityError("this process already runs a node of another cluster (other keys); "
                                    "run nodes of different clusters in different processes")
            auth._users += 1
            return auth

    def close(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            self._running.pop(id(self.ctx), None)
        stop = self.ctx.socket(zmq.PAIR)
        stop.setsockopt(zmq.LINGER, 0)
        stop.connect(self._stop_endpoint)
        stop.send(b"stop")
        self._thread.join(ZAP_STOP_TIMEOUT_S)
        stop.close(0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._stop_rx, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._stop_rx in ready:
                    return
                if self._zap in ready:
                    frames = self._zap.recv_multipart(zmq.NOBLOCK)
                    self._zap.send_multipart(self.reply(frames))
        finally:
            self._zap.close(0)
            self._stop_rx.close(0)

    def reply(self, frames: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request (RFC 27): 200 for an allowed key, 400 otherwise."""
        if len(frames) < 6 or len(frames) > ZAP_FRAMES_MAX or frames[0] != b"1.0":
            self.counters["bad_requests"] += 1
            request_id = frames[1] if len(frames) > 1 else b""
            return [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
        _, request_id, domain, address, _identity, mechanism, *credentials = frames
        key = zmq.utils.z85.encode(credentials[0]) if mechanism == b"CURVE" and credentials and \
            len(credentials[0]) == 32 else None
        if key is not None and self.allowed(domain, key):
            self.counters["allowed"] += 1
            user = (NODE_USER if key == self.keys.cluster.public else CLIENT_USER).encode()
            return [b"1.0", request_id, b"200", b"OK", user, b""]
        self.counters["refused"] += 1
        self._log_refusal(key, domain, address, mechanism)
        return [b"1.0", request_id, b"400", b"key not allowed", b"", b""]

    def allowed(self, domain: bytes, key: bytes) -> bool:
        if key == self.keys.cluster.public:
            return True
        return domain == ROUTER_DOMAIN and key in self.keys.allowed_clients

    def _log_refusal(self, key: bytes | None, domain: bytes, address: bytes, mechanism: bytes) -> None:
        marker = key or mechanism
        if marker in self._refused_logged or len(self._refused_logged) >= REFUSALS_LOGGED_MAX:
            return
        self._refused_logged.add(marker)
        who = f"key {key.decode()}" if key else f"{mechanism.decode(errors='replace')} (no CURVE key)"
        log.warning("refused a connection from %s with %s on %s: not an allowed key (logged once per key)",
                    address.decode(errors="replace"), who, domain.decode(errors="replace"))
