"""Flow replication between nodes, conntrackd-FTFW style: per ordered pair of nodes one
reliable, ordered, authenticated stream of flow records over UDP.

The library has no threads and no sockets: the caller (the node agent) owns the socket
and drives a SyncNode with four calls:

    node = SyncNode(node_id, epoch, keyring, record_size=48, key_size=16,
                    send=lambda datagram, addr: sock.sendto(datagram, addr),
                    deliver=lambda peer_id, blob: install(blob),     # n * record_size bytes
                    on_hello=lambda peer_id: dump_all_flows_to(peer_id))
    node.set_peers({2: ("10.9.0.2", 7400), 3: ("10.9.0.3", 7400)})   # membership changes
    node.queue([2, 3], blob)             # records to replicate (one bytes blob, n records)
    node.flush(now)                      # pack pending records into DATA datagrams, send
    node.on_datagram(data, addr, now)    # every datagram read from the socket
    node.tick(now)                       # timers: HELLO, resends, NACKs, delayed ACK, ALIVE
    node.stats(); node.take_resync()     # counters; peers that need a full dump

send_many=callable(datagrams, addr), optional: flush() then hands each peer's new DATA
datagrams over in one list, in seq order, all of max_datagram's full size but possibly the
last: the caller can send them with one sendmsg and UDP GSO (UDP_SEGMENT), and receive
with UDP_GRO, splitting at the segment size and calling on_datagram for each. On loopback
that cut the kernel's per-datagram cost several times (docs/benchmarks.md).

Streams. A stream runs from one incarnation of a node to one incarnation of another: every
header names sender and receiver ids *and* epochs (see wire.py). A DATA datagram carries
seq 1, 2, ... of its stream and the piggybacked ack of the reverse stream (the highest seq
received in order: a range ack). The receiver acks every ack_every datagrams, or
ack_delay_s after the first unacked one; an idle stream sends ALIVE every alive_s, which
carries the ack and the highest seq sent, so a lost tail shows too. Records are delivered
in seq order only, so a flow's final state at the receiver is the state queued last. A
gap is NACKed after nack_delay_s (1 ms: a datagram merely reordered is not resent for
nothing; 0 NACKs at once) and again every resend_s while it lasts; datagrams within
`window` after the gap are kept and delivered when it fills; farther ones are dropped
(out_of_window) and NACKed.

Sender. Unacked DATA datagrams are kept (at most `window` of them: flow control, so the
receiver's buffer never overflows) and resent at once on a NACK; when the ack has not
moved for resend_s, the oldest and the newest unacked are resent (the newest shows the
receiver what else to NACK; a peer not heard from gets only the oldest, as a probe). A
resend carries only the records that are still the latest copy of their flow: if a key
was queued again after a datagram was built, its older copy in that datagram is obsolete
and is left out (the datagram is resent with its seq, possibly empty, so the receiver's
in-order delivery never steps a flow back to an older state). Working that out needs a
key -> newest-position index; it is built lazily, only when something is resent, so the
loss-free path costs nothing per record. Records not yet sent wait in a bounded pending
queue (max_pending records); overflow drops the oldest, counts them and marks the peer as
needing a full resync (take_resync()), as does a peer leaving membership.

Epochs and HELLO. Each start of a node's agent must use a larger epoch than any before
(time.time_ns() at start does, or a counter kept in the store). A node (re)started knows
no peer's epoch: it sends HELLO (every alive_s) until the peer answers with the HELLO_SEEN
flag. The peer resets its streams with that node (the unacked records it held are
requeued, latest copies only) and calls on_hello(peer_id) once per epoch: the agent then
sends it a full copy of its flows. A HELLO means "I hold nothing from you"; the restarted
node's own flows are its agent's to send: what its previous process had queued but not
sent is gone, so after a restart the agent queues its own flows to every peer.
A datagram from an epoch older than the one known is refused (old_epoch); one addressed to
another incarnation of this node is refused (wrong_epoch): nothing captured before a
restart can be replayed after it. DATA waits until the peer's epoch is known.

Rejections never raise: each is counted by reason (REJECT_REASONS) and nothing changes.
A DATA datagram at or below the last delivered seq is a replay or a duplicate: refused,
but acked again (soon), so a sender whose ACK was lost stops resending. Control messages
(ACK, NACK, ALIVE) are idempotent within a stream (acks only move forward, a NACK only
resends what is still unacked), so a replay of one changes nothing either.

Replies always go to the address set_peers gave, never to a datagram's source address: a
forged or reflected datagram cannot make a node send anywhere else.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from hmac import compare_digest
from typing import Any

from hyperplane.errors import ConfigError
from hyperplane.fleet.wire import (ACK, ALIVE, DATA, FLAG_HELLO_SEEN, HEADER, HEADER_SIZE,
                                   HELLO, MAGIC, MAX_U32, MAX_U64, NACK, OVERHEAD, RANGE,
                                   TAG_SIZE, TYPE_NAMES, VERSION, Keyring, max_ranges,
                                   max_records)

REJECT_REASONS = (
    "truncated",        # shorter than a header and a tag
    "oversized",        # longer than max_datagram
    "bad_magic",
    "bad_version",
    "unknown_key",      # key id not in the keyring (never held, or retired)
    "bad_mac",          # tag does not match: forged or corrupted
    "wrong_receiver",   # addressed to another node id
    "unknown_peer",     # sender is not a current peer
    "bad_type",
    "old_epoch",        # sender epoch below the one known for that peer
    "wrong_epoch",      # addressed to another (earlier) incarnation of this node
    "bad_record_size",  # record or key size differs from this node's
    "bad_length",       # payload is not count whole records (or NACK ranges)
    "bad_ack",          # acks a seq this node never sent in the stream
    "replay",           # DATA seq already delivered or buffered; HELLO already seen
    "out_of_window",    # DATA seq beyond the receive window
)

_TYPES = frozenset(TYPE_NAMES)
_INF = float("inf")


class _Peer:
    """Both directions of the streams with one peer."""
    __slots__ = (
        "id", "addr", "active", "epoch", "hello_seen", "hello_confirmed", "last_hello",
        "last_heard", "last_addr", "last_sent",
        # sending: seq -> [payload, first position, records, last sent, sends, first sent]
        "next_seq", "acked", "unacked", "unacked_records", "next_due", "last_ack_at",
        "pending", "pending_records", "pend_pos", "latest", "indexed_upto",
        "needs_resync",
        # receiving
        "delivered", "highest_known", "buffer", "rx_unacked", "rx_first_unacked",
        "nack_at",
    )

    def __init__(self, peer_id: int, addr: Any):
        self.id = peer_id
        self.addr = addr
        self.active = True
        self.epoch = 0                  # the peer's epoch; 0 = not known yet
        self.hello_seen = 0             # the peer epoch whose HELLO was processed
        self.hello_confirmed = False    # the peer has processed this node's HELLO
        self.last_hello = -_INF
        self.last_heard: float | None = None
        self.last_addr: Any = None
        self.last_sent = -_INF
        self.next_seq = 1
        self.acked = 0
        self.unacked: dict[int, list] = {}
        self.unacked_records = 0
        self.next_due = _INF
        self.last_ack_at: float | None = None
        # Records not yet sent: [memoryview, start byte, end byte] chunks of queued blobs.
        # Positions number every record queued to this peer (monotonic), so "queued later"
        # is "larger position"; pend_pos is the position of the first pending record.
        self.pending: deque[list] = deque()
        self.pending_records = 0
        self.pend_pos = 0
        self.latest: dict[bytes, int] = {}   # key -> newest position (built lazily)
        self.indexed_upto = 0
        self.needs_resync = False
        self.delivered = 0              # highest seq delivered in order
        self.highest_known = 0          # highest seq the peer is known to have sent
        self.buffer: dict[int, bytes] = {}
        self.rx_unacked = 0             # DATA datagrams delivered since the last ack sent
        self.rx_first_unacked = 0.0
        self.nack_at = _INF             # when to NACK the current gaps (again)

    def reset_receive(self) -> None:
        self.delivered = 0
        self.highest_known = 0
        self.buffer = {}
        self.rx_unacked = 0
        self.nack_at = _INF


class SyncNode:
    """One node's end of the sync streams with all its peers. Not thread-safe: one caller
    drives it (the agent's sync task)."""

    def __init__(self, node_id: int, epoch: int, keyring: Keyring, *, record_size: int,
                 key_size: int, send: Callable[[bytes, Any], Any],
                 deliver: Callable[[int, bytes], Any],
                 on_hello: Callable[[int], Any] | None = None,
                 send_many: Callable[[list[bytes], Any], Any] | None = None,
                 max_datagram: int = 1400, clock: Callable[[], float] = time.monotonic,
                 alive_s: float = 0.1, resend_s: float = 0.2, window: int = 512,
                 max_pending: int = 1 << 20, ack_every: int | None = None,
                 ack_delay_s: float = 0.005, nack_delay_s: float = 0.001,
                 dead_s: float | None = None):
        if not 0 < node_id <= MAX_U32:
            raise ConfigError(f"A sync node id must be in 1..{MAX_U32}, not {node_id}.")
        if not 0 < epoch <= MAX_U64:
            raise ConfigError(f"A sync epoch must be in 1..{MAX_U64}, not {epoch}.")
        if not 0 < key_size <= min(record_size, 255) or record_size > 0xFFFF:
            raise ConfigError(f"Sync record_size {record_size} / key_size {key_size}: need "
                              "0 < key_size <= record_size, key_size <= 255.")
        if max_records(max_datagram, record_size) < 1 or max_datagram > 65507:
            raise ConfigError(f"max_datagram {max_datagram} does not fit one {record_size}-"
                              f"byte record and the {OVERHEAD}-byte header and tag.")
        if window < 1 or max_pending < 1:
            raise ConfigError("Sync window and max_pending must be at least 1.")
        self.node_id = node_id
        self.epoch = epoch
        self.keyring = keyring
        self.record_size = record_size
        self.key_size = key_size
        self.max_datagram = max_datagram
        self.alive_s = alive_s
        self.resend_s = resend_s
        self.window = window
        self.max_pending = max_pending
        self.ack_every = ack_every or max(1, window // 8)
        self.ack_delay_s = ack_delay_s
        self.nack_delay_s = nack_delay_s
        self.dead_s = dead_s if dead_s is not None else 4 * alive_s
        self._send_cb = send
        self._send_many = send_many
        self._deliver = deliver
        self._on_hello = on_hello
        self._clock = clock
        self._per_datagram = max_records(max_datagram, record_size)
        self._datagram_bytes = self._per_datagram * record_size
        self._max_ranges = max_ranges(max_datagram)
        self._peers: dict[int, _Peer] = {}
        self._n: dict[str, int] = dict.fromkeys((
            "sent_datagrams", "sent_bytes", "sent_data_datagrams", "sent_records",
            "received_datagrams", "received_data_datagrams", "received_records",
            "delivered_records", "buffered_datagrams", "acks_sent", "acks_received",
            "nacks_sent", "nacks_received", "nacked_seqs", "alives_sent", "hellos_sent",
            "hellos_received", "resent_datagrams", "resent_records", "resends_on_nack",
            "resends_on_timeout", "obsolete_skipped",
            "overflow_dropped", "left_dropped", "stream_resets", "send_errors",
            "queued_records", "queued_unknown_peer"), 0)
        self._rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)

    # --- membership -----------------------------------------------------------------

    def set_peers(self, peers: Mapping[int, Any]) -> None:
        """The current peers: {peer_id: (ip, port)}. This node's own id is ignored. A peer
        that leaves keeps its stream numbers (it may come back) but loses its queued
        records and is marked for a full resync; a new peer is greeted with HELLO."""
        for peer_id, addr in peers.items():
            if peer_id == self.node_id:
                continue
            if not 0 < peer_id <= MAX_U32:
                raise ConfigError(f"A sync peer id must be in 1..{MAX_U32}, not {peer_id}.")
            p = self._peers.get(peer_id)
            if p is None:
                self._peers[peer_id] = _Peer(peer_id, tuple(addr))
            else:
                p.addr = tuple(addr)
                p.active = True
        for peer_id, p in self._peers.items():
            if p.active and peer_id not in peers:
                self._leave(p)

    def _leave(self, p: _Peer) -> None:
        p.active = False
        dropped = p.pending_records + p.unacked_records
        p.pend_pos += p.pending_records
        p.pending = deque()
        p.pending_records = 0
        # Keep the unacked seqs as empty placeholders: if the peer comes back the stream
        # goes on, and a seq it never got must still arrive (empty) to close the gap.
        for entry in p.unacked.values():
            entry[0] = b""
            entry[2] = 0
        p.unacked_records = 0
        p.latest = {}
        p.indexed_upto = p.pend_pos
        if dropped:
            self._n["left_dropped"] += dropped
        p.needs_resync = True

    def peers(self) -> list[int]:
        return sorted(pid for pid, p in self._peers.items() if p.active)

    def take_resync(self) -> list[int]:
        """Current peers that need a full copy of the flows (records were dropped for
        them: queue overflow, or they left and came back); the marks are cleared."""
        out = []
        for pid, p in sorted(self._peers.items()):
            if p.active and p.needs_resync:
                p.needs_resync = False
                out.append(pid)
        return out

    def backlog(self, peer_id: int) -> int:
        """Records queued to peer_id and not yet acked (for pacing a full dump)."""
        p = self._peers.get(peer_id)
        return 0 if p is None else p.pending_records + p.unacked_records

    # --- sending --------------------------------------------------------------------

    def queue(self, peer_ids: Iterable[int], blob: bytes) -> None:
        """Replicate records (n * record_size bytes) to each of peer_ids. The blob is kept
        by reference, not copied, until every peer acked it (a bytearray or memoryview is
        copied once, so the caller may reuse its buffer)."""
        rs = self.record_size
        size = len(blob)
        if size % rs:
            raise ValueError(f"a record blob of {size} bytes is not a whole number of "
                             f"{rs}-byte records")
        if not size:
            return
        if not isinstance(blob, bytes):
            blob = bytes(blob)
        mv = memoryview(blob)
        n = size // rs
        for peer_id in peer_ids:
            p = self._peers.get(peer_id)
            if p is None or not p.active:
                self._n["queued_unknown_peer"] += n
                continue
            p.pending.append([mv, 0, size])
            p.pending_records += n
            self._n["queued_records"] += n
            if p.pending_records > self.max_pending:
                self._overflow(p)

    def _overflow(self, p: _Peer) -> None:
        """Drop the oldest pending records down to max_pending (never sent, so no seq is
        lost); the peer then needs a full resync to get their flows' state back."""
        rs = self.record_size
        excess = p.pending_records - self.max_pending
        dropped = 0
        while excess > 0:
            chunk = p.pending[0]
            n = (chunk[2] - chunk[1]) // rs
            take = min(n, excess)
            if take == n:
                p.pending.popleft()
            else:
                chunk[1] += take * rs
            excess -= take
            dropped += take
        p.pending_records -= dropped
        p.pend_pos += dropped
        p.needs_resync = True
        self._n["overflow_dropped"] += dropped

    def flush(self, now: float | None = None) -> int:
        """Send pending records as DATA datagrams (as many records per datagram as fit),
        while each peer's window has room. Returns the datagrams sent."""
        if now is None:
            now = self._clock()
        sent = 0
        for p in self._peers.values():
            if p.pending and p.active and p.epoch:
                sent += self._flush_peer(p, now)
        return sent

    def _flush_peer(self, p: _Peer, now: float) -> int:
        # The hot path of the sender: everything the loop touches is a local, the header
        # of each datagram is one struct.pack, its payload a slice of the queued blob (no
        # per-record work), counters are added once per flush.
        rs = self.record_size
        cap = self._datagram_bytes
        pending = p.pending
        unacked = p.unacked
        window = self.window
        key_id = self.keyring.current_id
        hasher = self.keyring.hasher(key_id)
        pack = HEADER.pack
        join = b"".join
        head = (MAGIC, VERSION, DATA, key_id,
                FLAG_HELLO_SEEN if p.hello_seen == p.epoch else 0, self.key_size,
                self.node_id, p.id, self.epoch, p.epoch)
        ack = p.delivered
        batch: list[bytes] | None = [] if self._send_many is not None else None
        send, addr = self._send_cb, p.addr
        sent = records = nbytes = errors = 0
        seq = p.next_seq
        pos = p.pend_pos
        while pending and len(unacked) < window:
            chunk = pending[0]
            mv, off, end = chunk
            if end - off >= cap:
                payload = mv[off:off + cap]
                off += cap
                if off == end:
                    pending.popleft()
                else:
                    chunk[1] = off
            else:
                # The datagram spans blobs: gather from several chunks.
                parts = []
                need = cap
                while need and pending:
                    chunk = pending[0]
                    mv, off, end = chunk
                    take = min(need, end - off)
                    parts.append(mv[off:off + take])
                    need -= take
                    if off + take == end:
                        pending.popleft()
                    else:
                        chunk[1] = off + take
                payload = join(parts)
            n = len(payload) // rs
            unacked[seq] = [payload, pos, n, now, 1, now]
            hdr = pack(*head, seq, ack, n, rs, 0)
            h = hasher.copy()
            h.update(hdr)
            h.update(payload)
            datagram = join((hdr, payload, h.digest()))
            if batch is None:
                try:
                    send(datagram, addr)
                except OSError:
                    errors += 1     # stays unacked: the resend timer sends it again
            else:
                batch.append(datagram)
            seq += 1
            pos += n
            sent += 1
            records += n
            nbytes += len(datagram)
        if not sent:
            return 0
        if batch:
            try:
                self._send_many(batch, addr)
            except OSError:
                errors += len(batch)
        p.next_seq = seq
        p.pend_pos = pos
        p.pending_records -= records
        p.unacked_records += records
        p.last_sent = now
        p.rx_unacked = 0                    # every datagram carried the ack
        c = self._n
        c["sent_datagrams"] += sent
        c["sent_data_datagrams"] += sent
        c["sent_records"] += records
        c["sent_bytes"] += nbytes
        c["send_errors"] += errors
        if p.next_due == _INF:
            p.next_due = now + self.resend_s
        return sent

    def _send(self, p: _Peer, typ: int, seq: int, count: int, payload: Any,
              now: float) -> None:
        key_id = self.keyring.current_id
        flags = FLAG_HELLO_SEEN if p.epoch and p.hello_seen == p.epoch else 0
        hdr = HEADER.pack(MAGIC, VERSION, typ, key_id, flags, self.key_size, self.node_id,
                          p.id, self.epoch, p.epoch, seq, p.delivered, count,
                          self.record_size, 0)
        h = self.keyring.hasher(key_id).copy()
        h.update(hdr)
        if payload:
            h.update(payload)
        datagram = b"".join((hdr, payload, h.digest()))
        p.last_sent = now
        p.rx_unacked = 0            # every datagram carries the ack
        n = self._n
        n["sent_datagrams"] += 1
        n["sent_bytes"] += len(datagram)
        if typ == DATA:
            n["sent_records"] += count
        try:
            self._send_cb(datagram, p.addr)
        except OSError:
            # A full socket buffer or an unreachable peer: the datagram stays unacked and
            # is resent by the timer; a control message is sent again by tick().
            n["send_errors"] += 1

    def _send_control(self, p: _Peer, typ: int, now: float, payload: bytes = b"",
                      count: int = 0) -> None:
        self._send(p, typ, p.next_seq - 1, count, payload, now)

    def _send_ack(self, p: _Peer, now: float) -> None:
        self._n["acks_sent"] += 1
        self._send_control(p, ACK, now)

    # --- resending --------------------------------------------------------------------

    def _index(self, p: _Peer) -> None:
        """Bring the key -> newest position index up to date over every record held for
        the peer (unacked and pending). Incremental: records indexed before are skipped."""
        unacked = p.unacked
        held_lo = unacked[p.acked + 1][1] if unacked else p.pend_pos
        held = p.unacked_records + p.pending_records
        if len(p.latest) > 2 * held + 4096:
            p.latest = {}                       # mostly acked keys: start over
            p.indexed_upto = held_lo
        upto = max(p.indexed_upto, held_lo)
        latest = p.latest
        rs, ks = self.record_size, self.key_size
        for entry in unacked.values():
            payload, start, n = entry[0], entry[1], entry[2]
            if start + n <= upto:
                continue
            for i in range(max(0, upto - start), n):
                off = i * rs
                latest[bytes(payload[off:off + ks])] = start + i
            upto = start + n
        pos = p.pend_pos
        for mv, off, end in p.pending:
            n = (end - off) // rs
            if pos + n > upto:
                for i in range(max(0, upto - pos), n):
                    o = off + i * rs
                    latest[bytes(mv[o:o + ks])] = pos + i
            pos += n
        p.indexed_upto = max(upto, pos)

    def _current(self, p: _Peer, entry: list) -> tuple[Any, int]:
        """The records of an unacked datagram that are still their flow's latest copy."""
        payload, start, n = entry[0], entry[1], entry[2]
        if not n:
            return b"", 0
        latest = p.latest
        rs, ks = self.record_size, self.key_size
        keep = [i for i in range(n)
                if latest.get(bytes(payload[i * rs:i * rs + ks])) == start + i]
        if len(keep) == n:
            return payload, n
        self._n["obsolete_skipped"] += n - len(keep)
        return b"".join(payload[i * rs:(i + 1) * rs] for i in keep), len(keep)

    def _resend(self, p: _Peer, seqs: list[int], now: float, why: str) -> None:
        self._index(p)
        n = self._n
        n[why] += 1
        for seq in seqs:
            entry = p.unacked.get(seq)
            if entry is None:
                continue
            payload, count = self._current(p, entry)
            entry[3] = now
            entry[4] += 1
            n["resent_datagrams"] += 1
            n["resent_records"] += count
            self._send(p, DATA, seq, count, payload, now)
        if p.unacked:
            p.next_due = min(p.next_due, now + self.resend_s)

    def _resend_due(self, p: _Peer, now: float) -> None:
        """The ack has not moved for resend_s. Resend the oldest unacked datagram (what
        blocks the receiver) and the newest (it shows the receiver how far the stream
        goes, so the receiver NACKs exactly the seqs it lacks in one round trip), not the
        whole window: most of it usually sits in the receiver's buffer behind one gap.
        A peer not heard from lately gets only the oldest, as a probe."""
        limit = self.resend_s
        due = [seq for seq, e in p.unacked.items() if now - e[3] >= limit]
        if len(due) > 1:
            due = [due[0], due[-1]] if self._alive(p, now) else due[:1]
        if due:
            self._resend(p, due, now, "resends_on_timeout")
        p.next_due = min((e[3] for e in p.unacked.values()), default=_INF) + limit

    def _reset_send(self, p: _Peer) -> None:
        """The peer restarted: start a new stream at seq 1 and requeue what it had not
        acked (latest copies only) ahead of what was still pending."""
        self._index(p)
        rs = self.record_size
        chunks: deque[list] = deque()
        records = 0
        for seq in sorted(p.unacked):
            payload, count = self._current(p, p.unacked[seq])
            if count:
                chunks.append([memoryview(bytes(payload)), 0, count * rs])
                records += count
        chunks.extend(p.pending)
        p.pending = chunks
        p.pending_records += records
        p.unacked = {}
        p.unacked_records = 0
        p.next_seq = 1
        p.acked = 0
        p.next_due = _INF
        p.pend_pos = 0
        p.latest = {}
        p.indexed_upto = 0

    def _acked(self, p: _Peer, ack: int, now: float) -> None:
        unacked = p.unacked
        freed = 0
        for seq in range(p.acked + 1, ack + 1):
            entry = unacked.pop(seq, None)
            if entry is not None:
                freed += entry[2]
        p.unacked_records -= freed
        p.acked = ack
        p.last_ack_at = now
        if not unacked:
            p.next_due = _INF

    # --- receiving --------------------------------------------------------------------

    def _reject(self, reason: str) -> str:
        self._rejected[reason] += 1
        return reason

    def on_datagram(self, data: bytes, addr: Any = None, now: float | None = None) -> str | None:
        """Verify and process one received datagram. Returns None if it was accepted, or
        the reason it was rejected (also counted); never raises for a bad datagram."""
        if now is None:
            now = self._clock()
        if not isinstance(data, bytes):
            data = bytes(data)          # payloads are delivered as bytes, never views
        n = self._n
        n["received_datagrams"] += 1
        size = len(data)
        if size < OVERHEAD:
            return self._reject("truncated")
        if size > self.max_datagram:
            return self._reject("oversized")
        (magic, version, typ, key_id, flags, key_size, sender, receiver, sender_epoch,
         receiver_epoch, seq, ack, count, record_size, _reserved) = HEADER.unpack_from(data)
        if magic != MAGIC:
            return self._reject("bad_magic")
        if version != VERSION:
            return self._reject("bad_version")
        hasher = self.keyring.hasher(key_id)
        if hasher is None:
            return self._reject("unknown_key")
        mv = memoryview(data)
        h = hasher.copy()
        h.update(mv[:size - TAG_SIZE])
        if not compare_digest(h.digest(), mv[size - TAG_SIZE:]):
            return self._reject("bad_mac")
        # Authenticated: a cluster member built it. Now: is it for this node, now?
        if receiver != self.node_id:
            return self._reject("wrong_receiver")
        p = self._peers.get(sender)
        if p is None or not p.active:
            return self._reject("unknown_peer")
        if typ not in _TYPES:
            return self._reject("bad_type")
        if sender_epoch < p.epoch:
            return self._reject("old_epoch")
        if typ != HELLO and receiver_epoch != self.epoch:
            return self._reject("wrong_epoch")
        body = size - OVERHEAD
        if typ == DATA:
            if record_size != self.record_size or key_size != self.key_size:
                return self._reject("bad_record_size")
            if count * self.record_size != body:
                return self._reject("bad_length")
        elif typ == NACK:
            if count * RANGE.size != body:
                return self._reject("bad_length")
        elif body or count:
            return self._reject("bad_length")
        restarted = p.epoch != 0 and sender_epoch > p.epoch
        ours = receiver_epoch == self.epoch     # its ack and flags are about this stream
        if ours and ack > (0 if restarted else p.next_seq - 1):
            return self._reject("bad_ack")

        # Accepted. Apply what every message says, then what its type says.
        p.last_heard = now
        p.last_addr = addr
        if restarted:
            self._n["stream_resets"] += 1
            p.reset_receive()
            self._reset_send(p)
        p.epoch = sender_epoch
        if ours:
            if flags & FLAG_HELLO_SEEN:
                p.hello_confirmed = True
            if ack > p.acked:
                self._acked(p, ack, now)

        if typ == DATA:
            return self._on_data(p, seq, count, data, size, now)
        if typ == HELLO:
            n["hellos_received"] += 1
            if p.hello_seen == sender_epoch:
                # A resent (its answer was lost) or replayed HELLO: answer, nothing else.
                self._ack_soon(p, now)
                return self._reject("replay")
            p.hello_seen = sender_epoch
            self._send_ack(p, now)          # carries HELLO_SEEN and this node's epoch
            if self._on_hello is not None:
                self._on_hello(p.id)
            return None
        if typ == ACK:
            n["acks_received"] += 1
        elif typ == NACK:
            n["nacks_received"] += 1
            self._on_nack(p, data[HEADER_SIZE:size - TAG_SIZE], now)
        self._sender_sent_upto(p, seq, now)
        return None

    def _on_data(self, p: _Peer, seq: int, count: int, data: bytes, size: int,
                 now: float) -> str | None:
        n = self._n
        n["received_data_datagrams"] += 1
        delivered = p.delivered
        if seq <= delivered or seq in p.buffer:
            self._ack_soon(p, now)
            return self._reject("replay")
        if seq - delivered > self.window:
            self._note_sent_upto(p, seq)
            self._gap_found(p, delivered + 1, delivered + self.window, now)
            return self._reject("out_of_window")
        n["received_records"] += count
        if seq != delivered + 1:
            # A gap before it: keep it, ask for what is missing (only the newly found part).
            p.buffer[seq] = data[HEADER_SIZE:size - TAG_SIZE]
            n["buffered_datagrams"] += 1
            old = p.highest_known
            self._note_sent_upto(p, seq)
            if seq - 1 > old:
                self._gap_found(p, max(delivered + 1, old + 1), seq - 1, now)
            return None
        blobs = [data[HEADER_SIZE:size - TAG_SIZE]] if count else []
        delivered = seq
        buffer = p.buffer
        while buffer:
            nxt = buffer.pop(delivered + 1, None)
            if nxt is None:
                break
            delivered += 1
            if nxt:
                blobs.append(nxt)
        done = delivered - p.delivered
        p.delivered = delivered
        if delivered >= p.highest_known:
            p.highest_known = delivered
            p.nack_at = _INF            # no gap left
        if not p.rx_unacked:
            p.rx_first_unacked = now
        p.rx_unacked += done
        if p.rx_unacked >= self.ack_every:
            self._send_ack(p, now)
        if blobs:
            blob = blobs[0] if len(blobs) == 1 else b"".join(blobs)
            n["delivered_records"] += len(blob) // self.record_size
            self._deliver(p.id, blob)
        return None

    def _ack_soon(self, p: _Peer, now: float) -> None:
        """Ack now unless an ack went out within ack_delay_s (then tick() sends one), so a
        burst of duplicates or replays costs one ack, not one each."""
        if not p.rx_unacked:
            p.rx_first_unacked = now
        p.rx_unacked += 1
        if now - p.last_sent >= self.ack_delay_s:
            self._send_ack(p, now)

    def _note_sent_upto(self, p: _Peer, seq: int) -> None:
        if seq > p.highest_known:
            p.highest_known = seq

    def _sender_sent_upto(self, p: _Peer, seq: int, now: float) -> None:
        """A control message tells the highest seq the peer sent: a lost tail shows here."""
        old = p.highest_known
        if seq > old:
            p.highest_known = seq
            self._gap_found(p, max(p.delivered + 1, old + 1), seq, now)

    def _gap_found(self, p: _Peer, lo: int, hi: int, now: float) -> None:
        """Seqs lo..hi are missing. NACK them now, or after nack_delay_s (a datagram merely
        reordered arrives meanwhile and is not resent for nothing); tick() NACKs again
        every resend_s while a gap lasts."""
        if self.nack_delay_s <= 0:
            self._nack(p, lo, hi, now)
            p.nack_at = min(p.nack_at, now + self.resend_s)
        else:
            p.nack_at = min(p.nack_at, now + self.nack_delay_s)

    def _missing(self, p: _Peer, lo: int, hi: int) -> list[tuple[int, int]]:
        """Ranges of seqs in lo..hi (clipped to the window) neither delivered nor kept."""
        lo = max(lo, p.delivered + 1)
        hi = min(hi, p.delivered + self.window)
        ranges: list[tuple[int, int]] = []
        first = None
        buffer = p.buffer
        for seq in range(lo, hi + 1):
            if seq in buffer:
                if first is not None:
                    ranges.append((first, seq - 1))
                    first = None
            elif first is None:
                first = seq
        if first is not None:
            ranges.append((first, hi))
        return ranges

    def _nack(self, p: _Peer, lo: int, hi: int, now: float) -> None:
        ranges = self._missing(p, lo, hi)[:self._max_ranges]
        if not ranges:
            return
        self._n["nacks_sent"] += 1
        self._n["nacked_seqs"] += sum(b - a + 1 for a, b in ranges)
        self._send_control(p, NACK, now, b"".join(RANGE.pack(a, b) for a, b in ranges),
                           len(ranges))

    def _on_nack(self, p: _Peer, payload: bytes, now: float) -> None:
        lo, hi = p.acked + 1, p.next_seq - 1
        seqs: list[int] = []
        for first, last in RANGE.iter_unpack(payload):
            # Clipped to what is unacked: a bogus or replayed range resends nothing else.
            seqs.extend(range(max(first, lo), min(last, hi) + 1))
        if seqs:
            self._resend(p, sorted(set(seqs)), now, "resends_on_nack")

    # --- timers ---------------------------------------------------------------------

    def _alive(self, p: _Peer, now: float) -> bool:
        return p.last_heard is not None and now - p.last_heard < self.dead_s

    def tick(self, now: float | None = None) -> None:
        """Run the timers: HELLO until the peer has seen it, resends of unacked data after
        resend_s, NACKs for gaps that persist, delayed ACKs, ALIVE after alive_s of
        silence (every message carries the ack, so ALIVE is the idle ack)."""
        if now is None:
            now = self._clock()
        for p in self._peers.values():
            if not p.active:
                continue
            # HELLO until this incarnation of the peer has seen ours. A peer that restarts
            # later is not greeted again: it lost nothing of ours; its own HELLO tells us.
            if (not p.epoch or not p.hello_confirmed) and now - p.last_hello >= self.alive_s:
                p.last_hello = now
                self._n["hellos_sent"] += 1
                self._send_control(p, HELLO, now)
            if not p.epoch:
                continue            # nothing else can be addressed to an unknown epoch
            if p.unacked and now >= p.next_due:
                self._resend_due(p, now)
            if now >= p.nack_at:
                if p.highest_known > p.delivered:
                    self._nack(p, p.delivered + 1, p.highest_known, now)
                    p.nack_at = now + self.resend_s
                else:
                    p.nack_at = _INF
            if p.rx_unacked and now - p.rx_first_unacked >= self.ack_delay_s:
                self._send_ack(p, now)
            if now - p.last_sent >= self.alive_s:
                self._n["alives_sent"] += 1
                self._send_control(p, ALIVE, now)

    # --- observation ------------------------------------------------------------------

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Counters, rejections by reason and per-peer state (plain data: JSON as is)."""
        if now is None:
            now = self._clock()
        peers = {}
        for pid, p in sorted(self._peers.items()):
            oldest = p.unacked.get(p.acked + 1)
            peers[pid] = {
                "addr": list(p.addr) if isinstance(p.addr, tuple) else p.addr,
                "member": p.active,
                "alive": self._alive(p, now),
                "last_heard_s": None if p.last_heard is None else now - p.last_heard,
                "epoch": p.epoch,
                "hello_confirmed": p.hello_confirmed,
                "next_seq": p.next_seq,
                "acked": p.acked,
                "unacked_datagrams": len(p.unacked),
                "resend_queue_records": p.unacked_records,
                "pending_records": p.pending_records,
                "ack_lag_datagrams": p.next_seq - 1 - p.acked,
                "ack_lag_s": 0.0 if oldest is None else now - oldest[5],
                "last_ack_s": None if p.last_ack_at is None else now - p.last_ack_at,
                "needs_resync": p.needs_resync,
                "delivered_seq": p.delivered,
                "receive_buffered": len(p.buffer),
            }
        return {"node_id": self.node_id, "epoch": self.epoch,
                "key_id": self.keyring.current_id, **self._n,
                "rejected": dict(self._rejected),
                "rejected_total": sum(self._rejected.values()), "peers": peers}
