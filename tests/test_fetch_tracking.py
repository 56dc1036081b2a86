"""What the node holds for a client's unread fetch replies (zq.io.node_clients): every reply is
charged, and written-out replies are struck off by the latest tracked reply that libzmq has
written. A large reply is always tracked; small ones one in FETCH_TRACK_EVERY (a tracked send
costs far more CPU than a copied one). Real ROUTER and DEALER sockets on loopback."""
from __future__ import annotations

import time
from collections import Counter

import pytest
import zmq

from zq.io.node_clients import ClientsMixin
from zq.io.node_common import FETCH_TRACK_BYTES_MIN, FETCH_TRACK_EVERY


class _Shell(ClientsMixin):
    """Only what the fetch accounting reads: a ROUTER, the pending queues, the counters."""

    def __init__(self, router: zmq.Socket) -> None:
        self.router = router
        self.fetch_pending: dict = {}
        self.fetch_pending_bytes: dict = {}
        self.fetch_pending_total = 0
        self.counters: Counter = Counter()


@pytest.fixture
def pair():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"client-1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")
    assert router.poll(5_000)
    identity, _ = router.recv_multipart()
    yield _Shell(router), dealer, identity
    dealer.close(0)
    router.close(0)
    ctx.term()


def _read(dealer: zmq.Socket, n: int) -> None:
    for _ in range(n):
        assert dealer.poll(5_000)
        dealer.recv_multipart()


def _struck(shell: _Shell, identity: bytes, expect_pending: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        shell._strike_written(identity)
        pending = len(shell.fetch_pending.get(identity, ()))
        if pending == expect_pending or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert pending == expect_pending


def test_small_replies_are_tracked_one_in_n_and_struck_off_up_to_the_last_written_tracked_one(pair):
    shell, dealer, identity = pair
    n = 2 * FETCH_TRACK_EVERY + 5
    for i in range(n):
        shell._send_fetch_reply(identity, [b"header", b"batch-%d" % i], 100)
    queue = shell.fetch_pending[identity]
    tracked = [i for i, (tracker, _) in enumerate(queue) if tracker is not None]
    assert tracked == [FETCH_TRACK_EVERY - 1, 2 * FETCH_TRACK_EVERY - 1]
    assert shell.fetch_pending_bytes[identity] == shell.fetch_pending_total == 100 * n
    _read(dealer, n)
    # Everything up to the second tracked reply is known written; the 5 after it stay charged
    # until a later tracked reply is written.
    _struck(shell, identity, 5)
    assert shell.fetch_pending_bytes[identity] == shell.fetch_pending_total == 500
    for i in range(FETCH_TRACK_EVERY - 5):
        shell._send_fetch_reply(identity, [b"header", b"more-%d" % i], 100)
    _read(dealer, FETCH_TRACK_EVERY - 5)
    _struck(shell, identity, 0)
    assert identity not in shell.fetch_pending_bytes and shell.fetch_pending_total == 0


def test_a_large_reply_is_tracked_at_once_and_an_unread_one_stays_charged(pair):
    shell, dealer, identity = pair
    shell._send_fetch_reply(identity, [b"header", b"small"], 100)
    big = b"x" * FETCH_TRACK_BYTES_MIN
    shell._send_fetch_reply(identity, [b"header", big], len(big))
    assert [tracker is not None for tracker, _ in shell.fetch_pending[identity]] == [False, True]
    _read(dealer, 2)
    _struck(shell, identity, 0)
    assert shell.fetch_pending_total == 0


def test_replies_a_client_does_not_read_stay_charged(pair):
    shell, dealer, identity = pair
    dealer.setsockopt(zmq.RCVHWM, 1)
    big = b"y" * (4 * 1024 * 1024)
    for _ in range(8):   # 32 MiB: more than the kernel's buffers and the DEALER's one message take
        shell._send_fetch_reply(identity, [b"header", big], len(big))
    time.sleep(0.3)
    shell._strike_written(identity)
    assert shell.fetch_pending_bytes[identity] >= 4 * len(big)   # most of it is still ours to hold
