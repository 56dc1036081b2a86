"""Data of the replication core: log entries, wire messages, effects, configuration.

Everything here is a frozen, slotted dataclass of plain values, so the node's shell can put the
messages on the wire (CBOR) without translation. A replication message travels inside an
envelope that names the partition (the PUB topic frame, or a field of the DEALER request); the
messages themselves do not repeat it. Offsets count records: an entry (a producer's batch) of
`count` records at `base_offset` covers `[base_offset, base_offset + count)`, and the log end is
the first offset not yet written. Epochs start at 1; epoch 0 means "before any entry".

Grammar (one line per message; `entry` is `[base_offset, count, epoch, producer_id,
base_sequence, payload]`, producer_id -1 for a producer that is not idempotent):

    Append      = [epoch, sender, prev_end, prev_epoch, high_watermark, leader_end, [entry, ...], log_start]
                  leader -> followers (PUB broadcast, or a DEALER reply to Fetch); no entries = heartbeat;
                  log_start: the leader's (retention's decision), which followers follow
    AppendAck   = [epoch, sender, durable_end, wall_ms, disk_low]
                  follower -> leader; durable_end = end of the prefix it holds durably and knows
                  matches this leader's log; also the answer that tells a stale sender the newer epoch;
                  wall_ms: the follower's wall clock (0: unknown), disk_low: it is short of disk
    Fetch       = [epoch, sender, from_end, last_epoch]
                  follower -> leader: "send entries from from_end; my entry before it has last_epoch"
    Diverging   = [epoch, sender, diverging_epoch, end_offset]
                  leader -> follower: "your log diverges; my largest epoch <= yours is
                  diverging_epoch and it ends at end_offset" (KIP-101/KIP-279 truncation point)
    RequestVote = [epoch, sender, last_epoch, last_end]
                  candidate -> voters
    Vote        = [epoch, sender, granted, wall_ms]
                  voter -> candidate, sent only after the vote is durable
    TimeoutNow  = [epoch, sender]
                  leader -> one caught-up voter: "stand for election now" (leadership hand-off)
    StartAt     = [epoch, sender, offset, prev_epoch, [voter, ...]]
                  leader -> a follower that fetched below the leader's log start (retention
                  deleted what it lacks): "my log starts at offset, the entry before it is of
                  prev_epoch, and these voters were the configuration there" (Kafka's
                  OffsetOutOfRange reset; Raft's snapshot install with an empty state machine);
                  voters empty if the leader no longer remembers that configuration
    RecoveryPoll  = [epoch, sender]
                  a recovering replica (it lost its log or hard state) -> the other voters:
                  "what are your epoch and high watermark?"; epoch is the poller's, for tracing
                  only: neither side takes an epoch from these two messages
    RecoveryState = [epoch, sender, high_watermark, log_end, last_epoch]
                  voter -> the recovering replica that polled it: its own epoch, high watermark,
                  log end and the epoch of its last entry (0: none)

Each message declares `BOUNDS`, the range of every field (zq.core.bounds): `check_message` runs
them in the node (on decoding) and in the replication core (`Replica.step`), so an epoch that
would not fit the stored batch header, or an offset past 2**63, never reaches state or disk.

A configuration entry (a replica-set change) is an ordinary one-record entry, `[base_offset, 1,
epoch, -1, -1, CONFIG_PREFIX + cbor([voter, ...])]`, voters sorted; it travels in Appends like
any other entry. Its CBOR is written and read here by a few lines of the standard library (an
array of text strings is all it holds), so the core loads no codec package.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from zq.core import bounds as B
from zq.errors import ProtocolError

NO_PRODUCER = -1
"""producer_id of a batch from a producer that is not idempotent, and of a leader marker."""

MARKER_PAYLOAD = b""
"""Payload of the one-record control entry a new leader appends at the start of its epoch.

Raft commits entries of earlier epochs only by committing one of the current epoch, so a new
leader writes this marker at once; otherwise an old uncommitted tail would wait for the next
produce. It takes one offset, as Kafka's control records do: consumers skip it."""

CONFIG_PREFIX = b"\x00zq-config\x00"
"""Start of the payload of a configuration entry (a replica-set change). A produced batch always
starts with the batch magic, and a marker is empty, so neither can pass for one."""

CONFIG_VOTERS_MAX = 64
"""Voters one configuration entry may name: a peer's entry naming more is refused."""


def encode_config(voters: Iterable[str]) -> bytes:
    """The payload of a configuration entry naming `voters` (stored sorted, without repeats)."""
    out = bytearray(CONFIG_PREFIX)
    names = sorted(set(voters))
    _cbor_head(out, 4, len(names))
    for name in names:
        raw = name.encode()
        _cbor_head(out, 3, len(raw))
        out += raw
    return bytes(out)


def decode_config(payload: bytes) -> tuple[str, ...] | None:
    """The voters a configuration payload names; None if it is not one. A payload that starts
    like one but is malformed raises ProtocolError (it came from a peer)."""
    if not payload.startswith(CONFIG_PREFIX):
        return None
    voters = _cbor_text_array(payload, len(CONFIG_PREFIX))
    if (not isinstance(voters, list) or not 1 <= len(voters) <= CONFIG_VOTERS_MAX
            or not all(isinstance(v, str) and v for v in voters) or voters != sorted(set(voters))):
        raise ProtocolError(f"a configuration names 1..{CONFIG_VOTERS_MAX} distinct sorted node names, got {voters!r:.80}")
    return tuple(voters)


def _cbor_head(out: bytearray, major: int, n: int) -> None:
    """Append a CBOR head (RFC 8949 3.1) of `major` type with argument `n`, in its shortest form,
    as every CBOR encoder (cbor2 included, which wrote these entries before) does."""
    if n < 24:
        out.append(major << 5 | n)
    elif n < 1 << 8:
        out += bytes((major << 5 | 24, n))
    elif n < 1 << 16:
        out.append(major << 5 | 25)
        out += n.to_bytes(2, "big")
    else:
        out.append(major << 5 | 26)
        out += n.to_bytes(4, "big")


def _cbor_read_head(data: bytes, at: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the CBOR head at `at`. Raises ProtocolError."""
    if at >= len(data):
        raise ProtocolError("malformed configuration entry: it ends inside its CBOR")
    major, info = data[at] >> 5, data[at] & 0x1F
    if info < 24:
        return major, info, at + 1
    width = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
    if width is None or at + 1 + width > len(data):
        raise ProtocolError("malformed configuration entry: a CBOR length is indefinite or cut short")
    return major, int.from_bytes(data[at + 1:at + 1 + width], "big"), at + 1 + width


def _cbor_text_array(data: bytes, at: int) -> list[str]:
    """The CBOR array of text strings that fills `data` from `at` to its end. Raises ProtocolError."""
    major, count, at = _cbor_read_head(data, at)
    if major != 4 or count > CONFIG_VOTERS_MAX:
        raise ProtocolError(f"malformed configuration entry: not a CBOR array of at most {CONFIG_VOTERS_MAX} names")
    names = []
    for _ in range(count):
        major, size, at = _cbor_read_head(data, at)
        if major != 3 or at + size > len(data):
            raise ProtocolError("malformed configuration entry: a voter is not a CBOR text string")
        try:
            names.append(data[at:at + size].decode())
        except UnicodeDecodeError:
            raise ProtocolError("malformed configuration entry: a voter's name is not UTF-8") from None
        at += size
    if at != len(data):
        raise ProtocolError("malformed configuration entry: bytes follow its voters")
    return names


@dataclass(frozen=True, slots=True)
class Entry:
    """One batch in the log. The payload is opaque here (the node stores the batch bytes)."""

    base_offset: int
    count: int
    epoch: int
    producer_id: int
    base_sequence: int
    payload: bytes

    @property
    def end_offset(self) -> int:
        return self.base_offset + self.count

    @property
    def is_marker(self) -> bool:
        return self.producer_id == NO_PRODUCER and self.payload == MARKER_PAYLOAD and self.count == 1

    @property
    def config(self) -> tuple[str, ...] | None:
        """The voters, if this is a configuration entry (a replica-set change); else None."""
        if self.producer_id != NO_PRODUCER or self.count != 1:
            return None
        return decode_config(self.payload)

    def to_wire(self) -> list:
        return [self.base_offset, self.count, self.epoch, self.producer_id, self.base_sequence, self.payload]

    @staticmethod
    def from_wire(item: object) -> Entry:
        """An Entry from its list form; a peer's malformed entry raises ProtocolError."""
        if not isinstance(item, (list, tuple)) or len(item) != 6:
            raise ProtocolError("a replicated entry is a list of 6 fields")
        base, count, epoch, pid, seq, payload = item
        if not all(type(v) is int for v in (base, count, epoch, pid, seq)):
            raise ProtocolError("a replicated entry's first five fields are integers")
        if not isinstance(payload, bytes):
            raise ProtocolError("a replicated entry's payload is bytes")
        if (not 0 <= base <= B.OFFSET_MAX - count or not 1 <= count <= B.COUNT_MAX or not 1 <= epoch <= B.EPOCH_MAX
                or not NO_PRODUCER <= pid <= B.PRODUCER_ID_MAX or not NO_PRODUCER <= seq <= B.SEQUENCE_MAX):
            raise ProtocolError(f"replicated entry out of range: offset {base}, count {count}, epoch {epoch}, "
                                f"producer {pid}, sequence {seq} (see docs/protocol.md for the bounds)")
        if pid == NO_PRODUCER and count == 1:
            decode_config(payload)  # a malformed configuration entry is refused here, not later
        return Entry(base, count, epoch, pid, seq, payload)


ENTRY_BOUNDS = B.tuple_of(B.OFFSET, B.COUNT, B.int_range(1, B.EPOCH_MAX), B.int_range(NO_PRODUCER, B.PRODUCER_ID_MAX),
                          B.int_range(NO_PRODUCER, B.SEQUENCE_MAX), B.blob)
"""An entry in an Append, as Entry.from_wire reads it (checked before the Append changes anything)."""


@dataclass(frozen=True, slots=True)
class Append:
    epoch: int
    sender: str
    prev_end: int
    prev_epoch: int
    high_watermark: int
    leader_end: int
    entries: list = field(default_factory=list)  # of Entry.to_wire() lists
    log_start: int = 0                           # the leader's log start: followers delete below it

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "prev_end": B.OFFSET, "prev_epoch": B.EPOCH,
              "high_watermark": B.OFFSET, "leader_end": B.OFFSET, "entries": B.list_of(B.LIST_ITEMS_MAX, ENTRY_BOUNDS),
              "log_start": B.OFFSET}


@dataclass(frozen=True, slots=True)
class AppendAck:
    epoch: int
    sender: str
    durable_end: int
    wall_ms: int = 0           # the sender's wall clock when it sent this (0: unknown)
    disk_low: bool = False     # the sender is short of disk: a leader hands off to another voter

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "durable_end": B.OFFSET, "wall_ms": B.TIME_MS, "disk_low": B.boolean}


@dataclass(frozen=True, slots=True)
class Fetch:
    epoch: int
    sender: str
    from_end: int
    last_epoch: int

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "from_end": B.OFFSET, "last_epoch": B.EPOCH}


@dataclass(frozen=True, slots=True)
class Diverging:
    epoch: int
    sender: str
    diverging_epoch: int
    end_offset: int

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "diverging_epoch": B.EPOCH, "end_offset": B.OFFSET}


@dataclass(frozen=True, slots=True)
class RequestVote:
    epoch: int
    sender: str
    last_epoch: int
    last_end: int

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "last_epoch": B.EPOCH, "last_end": B.OFFSET}


@dataclass(frozen=True, slots=True)
class Vote:
    epoch: int
    sender: str
    granted: bool
    wall_ms: int = 0   # the voter's wall clock, so a new leader knows a majority's clocks at once (0: unknown)

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "granted": B.one_of(True, False), "wall_ms": B.TIME_MS}


@dataclass(frozen=True, slots=True)
class PreVote:
    """Would you vote for me in `epoch` (the asker's epoch + 1)? Asked before standing (Raft thesis
    9.6), so that a replica that cannot win, one that was paused or cut off and whose election
    timer ran out meanwhile, raises no epoch and deposes no working leader. Answering it changes
    nothing durable and moves no epoch."""
    epoch: int
    sender: str
    last_epoch: int
    last_end: int

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "last_epoch": B.EPOCH, "last_end": B.OFFSET}


@dataclass(frozen=True, slots=True)
class PreVoteReply:
    """The answer to a PreVote: `epoch` is the one asked about when granted, else the voter's own
    (an asker behind it learns it)."""
    epoch: int
    sender: str
    granted: bool

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "granted": B.one_of(True, False)}


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    epoch: int
    sender: str

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE}


@dataclass(frozen=True, slots=True)
class StartAt:
    epoch: int
    sender: str
    offset: int
    prev_epoch: int
    voters: list = field(default_factory=list)  # sorted node names; [] if unknown

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "offset": B.OFFSET, "prev_epoch": B.EPOCH,
              "voters": B.list_of(CONFIG_VOTERS_MAX, B.NODE)}


@dataclass(frozen=True, slots=True)
class RecoveryPoll:
    epoch: int
    sender: str

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE}


@dataclass(frozen=True, slots=True)
class RecoveryState:
    epoch: int
    sender: str
    high_watermark: int
    log_end: int
    last_epoch: int  # the epoch of its last entry (0: none): how up to date its log is, as in RequestVote

    BOUNDS = {"epoch": B.EPOCH, "sender": B.NODE, "high_watermark": B.OFFSET, "log_end": B.OFFSET,
              "last_epoch": B.EPOCH}


MESSAGE_TYPES = (Append, AppendAck, Fetch, Diverging, RequestVote, Vote, TimeoutNow, StartAt, RecoveryPoll,
                 RecoveryState)


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message to send. `to` None means every other replica of the set (the leader's PUB)."""

    to: str | None
    message: object


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a restart: the epoch, the vote in it, the epoch history, the high
    watermark (a hint: it only saves a restarted replica from serving less than it knew), and
    the configurations in the log.

    `configs` is ((offset, (voter, ...)), ...) ascending: offset -1 is the configuration the
    replica was created with (before its log), every other item a configuration entry of the
    log at that offset. Empty (written before replica sets could change): the `replicas` given
    to the constructor are the configuration.

    `join_epoch` is set by the shell on a replica it creates on a node that held the partition
    before (and deleted it once removed): the epoch that replica had reached, plus one. The new
    replica starts in that epoch, so no leader that node had already left behind can use it, and
    it ignores configuration entries of older epochs (written in its earlier membership). 0: none.

    `recovering` is set by the shell on a replica whose log or hard state was lost or damaged
    (a corrupt or wiped data dir, a dropped WAL tail) and cleared by the core once it has
    recovered (see "Recovering" in zq.core.replication); it is kept so that a crash during
    recovery leaves the replica recovering."""

    epoch: int = 0
    voted_for: str | None = None
    epoch_history: tuple = ()  # ((epoch, start_offset), ...) ascending
    high_watermark: int = 0
    configs: tuple = ()        # ((offset, voters), ...) ascending; see above
    join_epoch: int = 0        # see above
    recovering: bool = False   # see above


# Outcome statuses of a proposal.
COMMITTED = "committed"              # base_offset and epoch say where; duplicate=True if a retry
NOT_LEADER = "not_leader"            # retriable: leader_hint names the leader if known
BACKPRESSURE = "backpressure"        # retriable: too many proposals wait for commit
OUT_OF_ORDER = "out_of_order_sequence"  # idempotent producer skipped a sequence number
DUPLICATE_SEQUENCE = "duplicate_sequence"  # a retry older than the remembered window: written before


@dataclass(frozen=True, slots=True)
class Outcome:
    proposal_id: int
    status: str
    base_offset: int = -1
    epoch: int = 0
    leader_hint: str | None = None
    duplicate: bool = False


FOLLOWER = "follower"
CANDIDATE = "candidate"
LEADER = "leader"


@dataclass(frozen=True, slots=True)
class RoleChange:
    role: str
    epoch: int
    leader: str | None


@dataclass(frozen=True, slots=True)
class Ready:
    """Effects for the shell, applied in this order: if `reset_to` is set, delete every entry and
    make the log start and end at that offset (a follower that fell below its leader's log
    start); delete entries at or above `truncate_from`; append `entries`; write `hard_state`
    (one atomic write batch); sync if `must_sync`; then send `messages`, publish
    `high_watermark`, answer `outcomes`, report `role`. Then `advance()`."""

    truncate_from: int | None
    entries: tuple
    hard_state: HardState | None
    must_sync: bool
    messages: tuple
    high_watermark: int | None
    outcomes: tuple
    role: RoleChange | None
    log_end: int
    reset_to: int | None = None

    @property
    def has_writes(self) -> bool:
        return (self.reset_to is not None or self.truncate_from is not None or bool(self.entries)
                or self.hard_state is not None)

    @property
    def empty(self) -> bool:
        return not (self.has_writes or self.messages or self.outcomes or self.role is not None
                    or self.high_watermark is not None)


class LogReader(Protocol):
    """The shell's stable log, as of the last `advance()` (etcd-raft's Storage)."""

    def read(self, offset: int, max_bytes: int) -> list[Entry]:
        """Entries in order from the one holding `offset`: at least one if the log reaches
        `offset`, then more while their payloads total at most max_bytes. Below the log start
        (retention deleted the entry holding `offset`), from the first entry kept."""
        ...


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    """Timing and bounds of one replica. Every loop and queue in the core checks one of these."""

    election_timeout_ms: int = 300       # a follower waits a random time in [t, 2t) without a leader
    heartbeat_interval_ms: int = 50      # leader's empty Append; must be well under the timeout
    fetch_retry_ms: int = 100            # a follower keeps at most one Fetch in flight; resends after this
    append_entries_max: int = 256        # entries in one Append
    append_bytes_max: int = 1 << 20      # payload bytes in one Append (at least one entry goes)
    pending_proposals_max: int = 1024    # proposals waiting for commit before BACKPRESSURE; this
                                         # also bounds the leader's uncommitted entries in flight
    producer_batches_kept: int = 5       # per idempotent producer, recent batches remembered
    producers_max: int = 10_000          # idempotent producers remembered (least recent dropped)
    producer_scan_records_max: int = 10_000_000  # log tail read to rebuild producer state
    check_quorum: bool = True            # a leader that hears from no majority for a timeout steps down
    pre_vote: bool = True                # a replica asks a majority before it stands (PreVote)
    catch_up_records_max: int = 1000     # a learner this close to the log end (and past the high
                                         # watermark) is made a voter
    configs_kept: int = 8                # configurations remembered below the latest committed one
                                         # (whose removed nodes the leader still informs)
    append_time_ahead_ms_max: int = 1_000  # an append time runs at most this far ahead of the previous
                                         # one's plus the (monotonic) time elapsed since
    clock_agreement_ms: int = 2_000      # voters' wall clocks this close agree (a majority must, for a time)


DEFAULT_CONFIG = ReplicationConfig()
