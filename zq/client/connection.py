"""The client's connection layer: one I/O thread that owns every socket of one Client.

Theory of operation
-------------------
ZeroMQ sockets are not thread-safe, so one thread at a time may use them: the *I/O thread*,
which owns them (one DEALER per node address, made lazily on the first request to that address),
or a caller standing in for it. Everything the I/O thread's code touches (sockets, pending
requests, timers, and the producer's, consumer's and group's I/O-side state) is guarded by one
lock, `_io_lock`, that the I/O thread holds except while it sleeps in `poll(2)`. It sleeps on
plain file descriptors only (the wake-up pipe and each socket's ZMQ_FD), never inside libzmq, so
no socket is touched while it sleeps; each pass it reads every socket's ZMQ_EVENTS under the lock
(ZMQ_FD is edge-triggered: a send or receive may consume its edge, so events are always re-read
before sleeping).

Work reaches the I/O thread two ways. `submit(fn)` appends a plain callable to a deque and wakes
the I/O thread by writing one byte to the pipe (a thread hand-off: the I/O thread must be woken
and scheduled). `run_now_or_submit(fn)` runs `fn` on the calling thread when the I/O thread is
asleep (the lock is free) and nothing submitted before waits to run, so a lone produce request
leaves from the caller's thread with no hand-off at all; then, before letting go of the lock, it
wakes the I/O thread only if the I/O thread must now do something sooner than it planned (a
socket has input or an outbox waits, a deadline earlier than its sleep, a new socket to watch).
Otherwise it hands `fn` over with `submit`, so work keeps the order it was handed over in. Code
run either way is "on the I/O thread" for `on_io_thread()` (it holds the lock), and callbacks it
triggers run there too.

A request is `(address, message, payload, timeout_ms, callback)`. The I/O thread keeps it in
`pending` under its `req_id` with a deadline; the reply with the same `req_id` is handed to the
callback, or, when the deadline passes first, the callback gets `Timeout`. Replies that arrive
after their deadline are dropped: the callback already ran. Callbacks run on the I/O thread, so
they must be short and must not block; the producer and consumer use them to move batches along,
`call()` uses one to resolve a Future that any thread may wait on.

Sockets use ZMQ_IMMEDIATE, so a message is never queued inside libzmq for a peer that is not
connected (it would otherwise be delivered, late and unasked, when that peer comes back). A send
that libzmq cannot take right now waits in the socket's own bounded `outbox` until the socket is
writable or the request's deadline passes.

Timers (`call_later`) are a heap of deadlines; the poller sleeps until the next deadline.
Every queue here is bounded: `outbox` by `outbox_requests_max`, `pending` by the callers' own
in-flight bounds (the producer's in-flight batches, one fetch per partition), the work deque by
the callers (each submit is one batch or one request, never one record).
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import select
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from zq import protocol
from zq.errors import ConnectionFailed, ProtocolError, Timeout, ZqError, from_wire
from zq.limits import DEFAULT, Limits

log = logging.getLogger("zq.client")

Callback = Callable[[Any, list, "ZqError | None"], None]

outbox_requests_max = 10_000   # requests waiting for one not-yet-writable socket
recv_drain_max = 1_000         # replies handled from one socket per loop pass, so no socket starves the rest
reconnect_ivl_ms = 100
connect_timeout_ms = 3_000     # a request that could not even be sent by then fails (ConnectionFailed, safe to retry)
reconnect_ivl_ms_max = 2_000
# ZMTP heartbeats (answered by libzmq's I/O thread, so a busy node still answers): a node that
# stopped answering (SIGSTOP, a hung host) is disconnected after heartbeat_timeout_ms, which fails
# the requests in flight on it at once (retriable), instead of leaving them to the request timeout.
heartbeat_ivl_ms = 200
heartbeat_timeout_ms = 600     # as the nodes' own (zq.io.node_common.PEER_HEARTBEAT_TIMEOUT_MS)
# A node whose connection closed (its process ended, or it was disconnected by the heartbeat) and
# has not been reconnected since: a request for it waits this long to be sent, not connect_timeout_ms,
# then fails as not sent (retriable). Its replicas elect a new leader within a fraction of a second
# (zq.core.replication, Replica.peer_lost), and the retry asks the cluster who that is.
lost_peer_connect_ms = 100


def now_ms() -> float:
    return time.monotonic() * 1000.0


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port"; ValueError with a sentence when it is not one."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not an address of the form HOST:PORT")
    return host.strip("[]"), int(port)


class _Peer:
    """One DEALER to one node address, with the sends it could not make yet."""

    __slots__ = ("address", "socket", "outbox", "lost")

    def __init__(self, address: str, socket: zmq.Socket) -> None:
        self.address = address
        self.socket = socket
        self.outbox: collections.deque = collections.deque()
        self.lost = False   # its connection closed and no handshake has succeeded since


class Connection:
    """The I/O thread and its sockets. Thread-safe entry points: `submit`, `request`, `call`,
    `call_later`, `send_only`, `close`; everything else runs on the I/O thread."""

    def __init__(self, limits: Limits = DEFAULT, name: str = "zq-client-io", security: Any = None) -> None:
        self.limits = limits
        self.security = security  # zq.io.security.ClientKeys: every socket is a CurveZMQ client
        self._ids = itertools.count(1)
        self._work: collections.deque = collections.deque()
        self._wake_pending = False   # a wake-up byte is in the pipe, or about to be, for submitted work
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._dead = False  # set by the I/O thread as it stops: requests then fail at once
        self._ctx = zmq.Context()
        self._peers: dict[str, _Peer] = {}
        self._by_socket: dict[zmq.Socket, _Peer] = {}
        self._by_monitor: dict[zmq.Socket, _Peer] = {}
        self._pending: dict[int, tuple[Callback, float, str]] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._connect_deadlines: list[tuple[float, int]] = []   # (give up connecting at, req_id)
        self._unsent: set[int] = set()  # requests still in an outbox: their expiry means "not sent" 
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        # Who runs I/O-thread code now (the I/O thread, or a caller in run_now_or_submit): the
        # holder of _io_lock, whose thread id is _owner. _sleep_until: when the I/O thread, asleep
        # in poll(2), wakes by itself (0 while it is awake); read and written under the lock.
        self._io_lock = threading.Lock()
        self._owner: int | None = None
        self._sleep_until = 0.0
        self._fds_added = False   # a socket made by a caller: the sleeping I/O thread must watch it
        self._fds = select.poll()
        self._fds.register(self._wake_r, select.POLLIN)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- thread-safe entry points

    def new_req_id(self) -> int:
        return next(self._ids)  # itertools.count is atomic under the GIL

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the I/O thread soon."""
        if self._closed:
            raise ConnectionFailed("the client is closed; create a new zq.Client")
        self._work.append(fn)
        if not self._wake_pending:   # one byte per pass is enough, however many submits it takes
            self._wake_pending = True
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the I/O thread will run this one too

    def run_now_or_submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` as the I/O thread would, on this thread and now when the I/O thread is asleep
        and no submitted work waits (no hand-off between threads), else `submit` it. Must not be
        called with a lock held that `fn` or a callback it triggers takes."""
        if self._closed:
            raise ConnectionFailed("the client is closed; create a new zq.Client")
        me = threading.get_ident()
        if self._owner == me:   # already I/O-thread code (a callback): run it in turn, as submit would
            self.submit(fn)
            return
        lock = self._io_lock
        if self._work or not lock.acquire(blocking=False):
            self.submit(fn)
            return
        wake = False
        try:
            if self._work or self._dead:   # re-read under the lock: submitted work goes first
                self.submit(fn)
                return
            self._owner = me
            try:
                fn()
            except Exception:
                log.exception("zq client task failed")
            # The I/O thread sleeps on what it saw before: wake it if that is no longer enough.
            wake = self._fds_added or self._io_ready() or self._next_deadline() < self._sleep_until
        finally:
            self._owner = None
            lock.release()
        if wake:
            self._wake()

    def request(self, address: str, msg: Any, payload: tuple | list = (), timeout_ms: float | None = None,
                callback: Callback | None = None) -> None:
        """Send `msg` to `address`; `callback(reply, payload_frames, error)` runs on the I/O thread."""
        timeout = self.limits.request_timeout_ms if timeout_ms is None else timeout_ms
        self.submit(lambda: self.io_request(address, msg, payload, timeout, callback))

    def send_only(self, address: str, msg: Any, payload: tuple | list = ()) -> None:
        """Send without expecting a reply (acks=none)."""
        self.submit(lambda: self.io_request(address, msg, payload, self.limits.request_timeout_ms, None))

    def call(self, address: str, msg: Any, payload: tuple | list = (), timeout_ms: float | None = None) -> Future:
        """A Future of `(reply, payload_frames)`; it fails with the reply's error."""
        fut: Future = Future()

        def done(reply: Any, frames: list, error: ZqError | None) -> None:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result((reply, frames))

        self.request(address, msg, payload, timeout_ms, done)
        return fut

    def call_later(self, delay_ms: float, fn: Callable[[], None]) -> None:
        self.submit(lambda: self.io_call_later(delay_ms, fn))

    def close(self) -> None:
        """Stop the I/O thread; every pending request fails with ConnectionFailed."""
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        if not self.on_io_thread():
            self._thread.join(timeout=5.0)

    @property
    def closed(self) -> bool:
        return self._closed

    def on_io_thread(self) -> bool:
        """True in I/O-thread code: on the I/O thread, or in a caller's run_now_or_submit."""
        return self._owner == threading.get_ident()

    # ---------------------------------------------------------------- I/O thread only

    def io_call_later(self, delay_ms: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (now_ms() + delay_ms, next(self._timer_seq), fn))

    def io_request(self, address: str, msg: Any, payload: tuple | list, timeout_ms: float,
                   callback: Callback | None) -> None:
        if self._dead:
            if callback is not None:
                callback(None, [], ConnectionFailed("the client was closed before the request was sent"))
            return
        try:
            peer = self._peer(address)
        except (ValueError, zmq.ZMQError) as e:
            if callback is not None:
                callback(None, [], ConnectionFailed(f"cannot connect to {address}: {e}"))
            return
        frames = protocol.encode(msg, *payload)
        deadline = now_ms() + timeout_ms
        if callback is not None:
            self._pending[msg.req_id] = (callback, deadline, address)
            heapq.heappush(self._deadlines, (deadline, msg.req_id))
        if peer.outbox or not self._try_send(peer, frames):
            if len(peer.outbox) >= outbox_requests_max:
                self._fail(msg.req_id, ConnectionFailed(f"too many requests waiting for {address}; is the node up?"))
                return
            peer.outbox.append((frames, deadline, msg.req_id if callback is not None else None))
            if callback is not None:
                self._unsent.add(msg.req_id)
                # A node that is not there is known sooner than a request timeout: give up on
                # connecting after connect_timeout_ms (lost_peer_connect_ms for a node whose
                # connection closed), when nothing was sent and a retry is safe.
                wait = lost_peer_connect_ms if peer.lost else connect_timeout_ms
                heapq.heappush(self._connect_deadlines, (min(deadline, now_ms() + wait), msg.req_id))

    def _peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)
        if peer is not None:
            return peer
        host, port = parse_address(address)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # close() must not hang on a dead node; unanswered requests fail anyway
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not connected: it would get them late
        sock.setsockopt(zmq.SNDHWM, 1_000)  # bounded: our own in-flight limits keep us far below this
        sock.setsockopt(zmq.RCVHWM, 10_000)  # replies are drained every loop pass; this only absorbs bursts
        sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl_ms)  # a restarted node is found again quickly...
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ivl_ms_max)  # ...without hammering a dead one
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.frame_bytes_max)  # a broken peer cannot make us buffer gigabytes
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)  # notice a peer whose host vanished without a FIN
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_timeout_ms)
        if self.security is not None:
            from zq.io.security import client_socket
            client_socket(sock, self.security)  # encrypted, and our key must be one the nodes allow
        sock.connect(f"tcp://{'[' + host + ']' if ':' in host else host}:{port}")
        peer = _Peer(address, sock)
        self._peers[address] = peer
        self._by_socket[sock] = peer
        self._fds.register(sock.getsockopt(zmq.FD), select.POLLIN)   # readable: the socket's events changed
        # A lost connection fails the requests in flight on it at once (outcome unknown, retriable),
        # rather than leaving them to wait out their timeout: a dead leader costs a reconnect, not 30 s.
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._by_monitor[monitor] = peer
        self._fds.register(monitor.getsockopt(zmq.FD), select.POLLIN)
        if threading.current_thread() is not self._thread:
            self._fds_added = True
        return peer

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        peer = self._by_monitor[monitor]
        for _ in range(recv_drain_max):
            try:
                event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                peer.lost = False
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                peer.lost = True
                lost = [rid for rid, (_, _, address) in self._pending.items()
                        if address == peer.address and rid not in self._unsent]
                for rid in lost:
                    self._fail(rid, Timeout(f"the connection to {peer.address} was lost before it answered; "
                                            "the outcome is unknown", address=peer.address))
                give_up = now_ms() + lost_peer_connect_ms
                for _frames, _deadline, rid in peer.outbox:
                    if rid is not None and rid in self._unsent:
                        heapq.heappush(self._connect_deadlines, (give_up, rid))

    @staticmethod
    def _try_send(peer: _Peer, frames: list) -> bool:
        try:
            peer.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _flush_outbox(self, peer: _Peer) -> None:
        t = now_ms()
        while peer.outbox:
            frames, deadline, req_id = peer.outbox[0]
            if deadline <= t or (req_id is not None and req_id not in self._pending):
                peer.outbox.popleft()  # its caller was told already (or will be by _expire)
                continue
            if not self._try_send(peer, frames):
                return
            peer.outbox.popleft()
            self._unsent.discard(req_id)

    def _fail(self, req_id: int | None, error: ZqError) -> None:
        entry = self._pending.pop(req_id, None) if req_id is not None else None
        if entry is not None:
            self._run_callback(entry[0], None, [], error)

    @staticmethod
    def _run_callback(cb: Callback, reply: Any, frames: list, error: ZqError | None) -> None:
        try:
            cb(reply, frames, error)
        except Exception:  # a bug in one callback must not stop the I/O thread for every other
            log.exception("zq client callback failed")

    def _on_frames(self, peer: _Peer, frames: list) -> None:
        try:
            reply, payload = protocol.decode(frames, self.limits)
        except ZqError as e:
            log.warning("dropped a bad reply from %s: %s", peer.address, e)
            return
        entry = self._pending.pop(reply.req_id, None)
        if entry is None:
            return  # late reply to a request that timed out already
        if isinstance(reply, protocol.ErrorReply):
            self._run_callback(entry[0], reply, payload, from_wire(reply.code, reply.message, reply.data))
        else:
            self._run_callback(entry[0], reply, payload, None)

    def _expire(self, t: float) -> None:
        while self._connect_deadlines and self._connect_deadlines[0][0] <= t:
            _, req_id = heapq.heappop(self._connect_deadlines)
            entry = self._pending.get(req_id)
            if entry is not None and req_id in self._unsent:
                self._unsent.discard(req_id)
                self._fail(req_id, ConnectionFailed(f"could not connect to {entry[2]} within {connect_timeout_ms} ms; "
                                                    "nothing was sent. Is the node running?", address=entry[2]))
        while self._deadlines and self._deadlines[0][0] <= t:
            _, req_id = heapq.heappop(self._deadlines)
            entry = self._pending.get(req_id)
            if entry is None:
                continue
            if req_id in self._unsent:
                self._unsent.discard(req_id)
                self._fail(req_id, ConnectionFailed(f"could not connect to {entry[2]} in time; nothing was sent. "
                                                    "Is the node running?", address=entry[2]))
            else:
                self._fail(req_id, Timeout(f"no answer from {entry[2]} within the request timeout; "
                                           "the outcome is unknown", address=entry[2]))

    def _run_timers(self, t: float) -> None:
        while self._timers and self._timers[0][0] <= t:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                log.exception("zq client timer failed")

    def _run_work(self) -> None:
        try:
            while len(os.read(self._wake_r, 4096)) == 4096:
                pass
        except BlockingIOError:
            pass
        # After reading the pipe, never before: a submit that saw the flag still set queued its
        # work before this line, so the snapshot below runs it; one after it writes a byte again.
        # (Cleared before the read, a byte written meanwhile would be read with the flag left set,
        # and every later submit would skip its byte while the I/O thread sleeps.)
        self._wake_pending = False
        # Only what is queued now: work submitted by this work runs on the next pass.
        for _ in range(len(self._work)):
            fn = self._work.popleft()
            try:
                fn()
            except Exception:
                log.exception("zq client task failed")

    def _next_deadline(self) -> float:
        """The earliest time something is due (a timer, a request's deadline), or +inf."""
        nxt = float("inf")
        if self._deadlines:
            nxt = self._deadlines[0][0]
        if self._connect_deadlines:
            nxt = min(nxt, self._connect_deadlines[0][0])
        if self._timers:
            nxt = min(nxt, self._timers[0][0])
        return nxt

    def _io_ready(self) -> bool:
        """Under the lock: whether a pass has something to do now (input on a socket, an outbox
        its socket can take, submitted work). Reading ZMQ_EVENTS also re-arms each ZMQ_FD."""
        for sock, peer in self._by_socket.items():
            ev = sock.getsockopt(zmq.EVENTS)
            if ev & zmq.POLLIN or (peer.outbox and ev & zmq.POLLOUT):
                return True
        for monitor in self._by_monitor:
            if monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return True
        return bool(self._work)

    def _pass(self) -> None:
        """Under the lock: one pass over everything that may be due."""
        for sock, peer in list(self._by_socket.items()):
            ev = sock.getsockopt(zmq.EVENTS)
            if ev & zmq.POLLIN:
                self._drain(peer)
            if peer.outbox and ev & zmq.POLLOUT:
                self._flush_outbox(peer)
        for monitor in list(self._by_monitor):
            if monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._on_monitor(monitor)
        self._run_work()
        t = now_ms()
        self._run_timers(t)
        self._expire(t)

    def _run(self) -> None:
        lock = self._io_lock
        me = threading.get_ident()
        lock.acquire()
        self._owner = me
        try:
            while not self._closed:
                self._pass()
                if self._io_ready():
                    continue
                self._fds_added = False
                t = now_ms()
                timeout = max(0.0, min(t + 1_000.0, self._next_deadline()) - t)
                self._sleep_until = t + timeout
                self._owner = None
                lock.release()
                try:
                    # Plain file descriptors only: no socket is touched while the lock is free.
                    self._fds.poll(timeout)
                finally:
                    lock.acquire()
                    self._owner = me
                    self._sleep_until = 0.0
        finally:
            try:
                self._shutdown()
            finally:
                self._owner = None
                lock.release()

    def _drain(self, peer: _Peer) -> None:
        """Called with POLLIN in the socket's events: take what arrived (asking ZMQ_EVENTS between
        replies costs less than the zmq.Again a last receive would raise)."""
        sock = peer.socket
        for _ in range(recv_drain_max):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_frames(peer, frames)
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return

    def _shutdown(self) -> None:
        self._dead = True
        error = ConnectionFailed("the client was closed before the node answered")
        for req_id in list(self._pending):
            self._fail(req_id, error)
        # Work handed over before close still runs, so every request it makes fails visibly
        # instead of leaving its caller waiting; bounded, since nothing new can be submitted.
        while self._work:
            self._run_work()
        for monitor in self._by_monitor:
            monitor.close(linger=0)
        for peer in self._peers.values():
            peer.socket.close(linger=0)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)


def check_reply(reply: Any, expected: type) -> Any:
    """A reply of the expected type, or ProtocolError (peer input is checked, never asserted)."""
    if not isinstance(reply, expected):
        raise ProtocolError(f"expected {expected.__name__}, the node sent {type(reply).__name__}")
    return reply
