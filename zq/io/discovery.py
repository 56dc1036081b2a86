"""Zeroconf discovery: announce this node as `_zq._tcp.local.` and browse for peers of its cluster.

Discovery is advisory. It says who might be there; the membership core (zq.core.membership)
decides who is alive, and a stale record cannot bring a dead node back unless its incarnation is
newer. So every failure here (no multicast route, an interface without multicast, a name clash)
becomes one clear log line and discovery goes quiet; the node keeps running on seeds and gossip.

A node announces one service instance with these TXT records, and nothing secret:

    cluster  the cluster name          node   the node id
    inc      its incarnation           ver    zq.protocol.PROTOCOL_VERSION
    ports    "ROUTER,PUB,METRICS" port numbers (METRICS may be empty)

and binds to ONE interface, the one holding its host address (`Zeroconf(interfaces=[host])`): a node
on 127.0.0.1 multicasts on loopback alone. Browsing runs in zeroconf's own threads; each peer of the
same cluster and protocol version is put on a bounded, thread-safe queue that the node's event loop
drains with `drain()`. Peers of another cluster or version are ignored with a logged reason (once
per service name, so a busy LAN cannot flood the log).

Run `python -m zq.io.discovery announce|find ...` to see what a host sees (JSON lines).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import queue
import re
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from zq.protocol import PROTOCOL_VERSION

log = logging.getLogger("zq.discovery")

SERVICE_TYPE = "_zq._tcp.local."
PEERS_QUEUE_MAX = 1_024          # discovered peers waiting for the event loop; more are dropped and counted
IGNORED_NAMES_MAX = 1_024        # service names whose ignoring we already logged
RESOLVE_TIMEOUT_MS = 3_000       # how long one peer's SRV/TXT/A lookup may take
INSTANCE_CHARS_MAX = 63          # DNS label limit for the instance name
FIND_SETTLE_S = 0.5              # discover_cluster: after the first answer, wait this long for more


@dataclass(frozen=True, slots=True)
class Peer:
    """A node as its zeroconf record describes it."""
    name: str            # service instance name
    cluster: str
    node: str
    incarnation: int
    version: int
    host: str
    port: int            # ROUTER
    pub_port: int | None
    metrics_port: int | None


def txt_records(cluster: str, node: str, incarnation: int, port: int,
                pub_port: int | None = None, metrics_port: int | None = None,
                version: int = PROTOCOL_VERSION) -> dict[str, str]:
    ports = ",".join("" if p is None else str(p) for p in (port, pub_port, metrics_port))
    return {"cluster": cluster, "node": node, "inc": str(incarnation), "ver": str(version), "ports": ports}


def parse_peer(name: str, properties: dict, addresses: list[str], port: int | None) -> Peer:
    """A Peer from a resolved record. Raises ValueError saying what is wrong: records are peer input."""
    props = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in properties.items()}
    missing = [k for k in ("cluster", "node", "inc", "ver", "ports") if not props.get(k)]
    if missing:
        raise ValueError(f"TXT records lack {', '.join(missing)}")
    try:
        incarnation, version = int(props["inc"]), int(props["ver"])
        ports = [int(p) if p else None for p in props["ports"].split(",")]
    except ValueError:
        raise ValueError("TXT records inc, ver or ports are not numbers") from None
    while len(ports) < 3:
        ports.append(None)
    router = ports[0] or port
    if not router or not 0 < router < 65536 or incarnation < 0:
        raise ValueError("the record has no valid ROUTER port or a negative incarnation")
    ipv4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
    if not ipv4:
        raise ValueError("the record has no IPv4 address")
    return Peer(name, props["cluster"], props["node"], incarnation, version, sorted(ipv4)[0],
                router, ports[1], ports[2])


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def same_scope(local_address: str, peer_host: str) -> bool:
    """Whether a peer announced at `peer_host` belongs with a node bound to `local_address`.

    A loopback address means "this host" and is useless anywhere else, and a LAN cluster must not
    mix with a loopback cluster of the same name on one machine. Records do cross scopes: Linux
    hands multicast to every socket bound to port 5353 whatever interface it joined on, and a
    responder answers unicast queries along the routing table. So both sides are checked here."""
    if ipaddress.ip_address(local_address).is_unspecified:
        return not _is_loopback(peer_host)
    return _is_loopback(local_address) == _is_loopback(peer_host)


def instance_name(cluster: str, node: str) -> str:
    label = f"zq-{cluster}-{node}"
    if len(label.encode()) > INSTANCE_CHARS_MAX:
        import hashlib
        label = label.encode()[:INSTANCE_CHARS_MAX - 9].decode(errors="ignore") + "-" + \
            hashlib.blake2b(label.encode(), digest_size=4).hexdigest()
    return f"{label}.{SERVICE_TYPE}"


def _host_name(cluster: str, node: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"zq-{cluster}-{node}".lower())[:INSTANCE_CHARS_MAX] + ".local."


def _interfaces(host: str) -> tuple[Any, list[str]]:
    """(zeroconf interface choice, addresses to announce) for a node bound to `host`."""
    from zeroconf import InterfaceChoice
    from zeroconf._utils.net import get_all_addresses

    address = socket.gethostbyname(host)
    if ipaddress.ip_address(address).is_unspecified:
        # Bound to every interface: announce on every one, with every address.
        return InterfaceChoice.All, [a for a in get_all_addresses() if not a.startswith("127.")]
    return [address], [address]


class Discovery:
    """Announce this node and browse for peers of its cluster, until close().

    `start()` returns False (after one log line) when zeroconf cannot run here; the node then
    relies on seeds. `drain()` is called by the node's event loop; everything else happens in
    zeroconf's threads."""

    def __init__(self, cluster: str, node: str, host: str, port: int, incarnation: int = 0,
                 pub_port: int | None = None, metrics_port: int | None = None,
                 queue_max: int = PEERS_QUEUE_MAX, version: int = PROTOCOL_VERSION,
                 zeroconf_factory: Callable[..., Any] | None = None) -> None:
        self.cluster, self.node, self.host, self.port = cluster, node, host, port
        self.pub_port, self.metrics_port = pub_port, metrics_port
        self.incarnation = incarnation
        self.version = version
        self.peers: queue.Queue[Peer] = queue.Queue(maxsize=queue_max)
        self.counters = {"peers_found": 0, "peers_dropped": 0, "peers_ignored": 0, "bad_records": 0}
        self.running = False
        self._factory = zeroconf_factory
        self._zc: Any = None
        self._info: Any = None
        self._browser: Any = None
        self._ignored: set[str] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> Discovery:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> bool:
        try:
            self._start()
        except Exception as e:  # zeroconf and the socket layer raise many types; all mean "no discovery"
            log.warning("zeroconf discovery is off for node %s on %s: %s: %s; peers must come from seeds",
                        self.node, self.host, type(e).__name__, e)
            self.close()
            return False
        self.running = True
        log.info("zeroconf: node %s announces %s on %s", self.node, self._info.name, self.host)
        return True

    def _start(self) -> None:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf

        interfaces, addresses = _interfaces(self.host)
        factory = self._factory or Zeroconf
        # One interface only, IPv4 only: a node on 127.0.0.1 must multicast on loopback alone.
        self._zc = factory(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._info = self._service_info(addresses)
        # A clash means another node announces this very name: refuse rather than rename silently.
        self._zc.register_service(self._info, allow_name_change=False)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_service_state_change])

    def _service_info(self, addresses: list[str]) -> Any:
        from zeroconf import ServiceInfo

        return ServiceInfo(SERVICE_TYPE, instance_name(self.cluster, self.node), port=self.port,
                           properties=txt_records(self.cluster, self.node, self.incarnation, self.port,
                                                  self.pub_port, self.metrics_port, self.version),
                           server=_host_name(self.cluster, self.node), parsed_addresses=addresses)

    def update_incarnation(self, incarnation: int) -> None:
        """Re-announce after the membership core raised our incarnation."""
        self.incarnation = incarnation
        if not self.running:
            return
        try:
            interfaces, addresses = _interfaces(self.host)
            self._info = self._service_info(addresses)
            self._zc.update_service(self._info)
        except Exception as e:
            log.warning("zeroconf: could not re-announce node %s: %s: %s", self.node, type(e).__name__, e)

    def drain(self, max_peers: int = PEERS_QUEUE_MAX) -> list[Peer]:
        """Peers found since the last call, oldest first; never blocks."""
        out = []
        for _ in range(max_peers):
            try:
                out.append(self.peers.get_nowait())
            except queue.Empty:
                break
        return out

    def pending(self) -> bool:
        """Whether `drain` would return a peer now."""
        return not self.peers.empty()

    def close(self) -> None:
        """Unregister (so peers hear a goodbye) and stop zeroconf; safe to call twice."""
        zc, self._zc = self._zc, None
        self.running = False
        if zc is None:
            return
        try:
            if self._browser is not None:
                self._browser.cancel()
            if self._info is not None:
                zc.unregister_service(self._info)
        except Exception as e:
            log.info("zeroconf: goodbye of node %s not sent: %s: %s", self.node, type(e).__name__, e)
        finally:
            zc.close()

    # ---- zeroconf's thread

    def _on_service_state_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return  # a goodbye proves nothing: the failure detector decides who is gone
        if self._info is not None and name == self._info.name:
            return
        try:
            info = zeroconf.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)
            if info is None:
                return
            peer = parse_peer(name, info.properties, info.parsed_addresses(), info.port)
        except ValueError as e:
            self.counters["bad_records"] += 1
            self._log_ignored(name, f"bad record: {e}")
            return
        except Exception as e:  # zeroconf shutting down under us, or a resolver failure
            log.debug("zeroconf: could not resolve %s: %s", name, e)
            return
        self._offer(peer)

    def _offer(self, peer: Peer) -> None:
        if peer.cluster != self.cluster:
            self.counters["peers_ignored"] += 1
            self._log_ignored(peer.name, f"cluster {peer.cluster!r}, not {self.cluster!r}")
            return
        if peer.version != self.version:
            self.counters["peers_ignored"] += 1
            self._log_ignored(peer.name, f"protocol version {peer.version}, this node speaks {self.version}; "
                                         "run the same zq version on every node")
            return
        if peer.node == self.node:
            return
        if not same_scope(self._local_address(), peer.host):
            self.counters["peers_ignored"] += 1
            self._log_ignored(peer.name, f"address {peer.host} is not reachable in the scope of {self.host}")
            return
        try:
            self.peers.put_nowait(peer)
            self.counters["peers_found"] += 1
        except queue.Full:
            self.counters["peers_dropped"] += 1  # advisory: the peer announces again, or gossip brings it

    def _local_address(self) -> str:
        try:
            return socket.gethostbyname(self.host)
        except OSError:
            return self.host

    def _log_ignored(self, name: str, reason: str) -> None:
        with self._lock:
            if name in self._ignored or len(self._ignored) >= IGNORED_NAMES_MAX:
                return
            self._ignored.add(name)
        log.info("zeroconf: ignoring %s: %s", name, reason)


def discover_cluster(cluster: str, timeout_s: float = 2.0, interface: str | None = None) -> list[tuple[str, str, int]]:
    """(node, host, ROUTER port) of the nodes of `cluster` that answer within `timeout_s`.

    For clients without a bootstrap list. Returns FIND_SETTLE_S after the first answer (or at
    the timeout), sorted; an empty list when nothing answered or zeroconf cannot run here. With an
    `interface`, only nodes in its scope count (see same_scope); without, every interface is
    browsed and every answer counts (a client on the same host can reach loopback nodes too)."""
    from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    found: dict[str, Peer] = {}
    first = threading.Event()
    lock = threading.Lock()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        try:
            info = zeroconf.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)
            peer = parse_peer(name, info.properties, info.parsed_addresses(), info.port) if info else None
        except Exception as e:
            log.debug("zeroconf: ignoring %s: %s", name, e)
            return
        if not peer or peer.cluster != cluster or peer.version != PROTOCOL_VERSION:
            return
        if interface is None or same_scope(socket.gethostbyname(interface), peer.host):
            with lock:
                found[peer.node] = peer
            first.set()

    try:
        interfaces = [socket.gethostbyname(interface)] if interface else InterfaceChoice.All
        zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    except Exception as e:
        log.warning("zeroconf discovery cannot run here (%s: %s); pass --bootstrap HOST:PORT", type(e).__name__, e)
        return []
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        deadline = time.monotonic() + timeout_s
        if first.wait(timeout_s):
            time.sleep(max(0.0, min(FIND_SETTLE_S, deadline - time.monotonic())))
        browser.cancel()
    finally:
        zc.close()
    with lock:
        return sorted((p.node, p.host, p.port) for p in found.values())


# --------------------------------------------------------------------------------------------
# python -m zq.io.discovery: what does this host see?


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zq.io.discovery", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("announce", help="announce a node and print the peers it finds, as JSON lines")
    a.add_argument("--cluster", default="zq")
    a.add_argument("--node", required=True)
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=7100)
    a.add_argument("--incarnation", type=int, default=0)
    a.add_argument("--seconds", type=float, default=5.0)
    a.add_argument("--version", type=int, default=PROTOCOL_VERSION, help=argparse.SUPPRESS)
    f = sub.add_parser("find", help="print the nodes of a cluster, as one JSON document")
    f.add_argument("--cluster", default="zq")
    f.add_argument("--interface", default=None)
    f.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    if args.command == "find":
        nodes = discover_cluster(args.cluster, args.timeout, args.interface)
        print(json.dumps({"nodes": [{"name": n, "host": h, "port": p} for n, h, p in nodes]}), flush=True)
        return 0
    started = time.monotonic()
    d = Discovery(args.cluster, args.node, args.host, args.port, args.incarnation,
                  pub_port=args.port + 1, metrics_port=args.port + 2, version=args.version)
    print(json.dumps({"started": d.start()}), flush=True)
    try:
        while time.monotonic() - started < args.seconds:
            for peer in d.drain():
                elapsed_ms = int((time.monotonic() - started) * 1000)
                print(json.dumps({"peer": asdict(peer), "elapsed_ms": elapsed_ms}), flush=True)
            time.sleep(0.05)
    finally:
        d.close()
    print(json.dumps({"closed": True, "counters": d.counters}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
