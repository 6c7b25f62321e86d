"""Flow replication protocol (hyperplane.fleet.sync / wire): delivery in order, loss,
latest-state resends, every rejection by its reason, key rotation, restart, and one run
over real UDP sockets in a network namespace.

Most tests drive the nodes with a fake clock and an in-memory network whose losses come
from seeded random generators, so every run is the same."""
from __future__ import annotations

import hmac
import os
import random
import select
import socket
import struct
import time
import uuid
from collections import defaultdict

import pytest

from hyperplane import netns
from hyperplane.errors import ConfigError
from hyperplane.fleet import wire
from hyperplane.fleet.sync import REJECT_REASONS, SyncNode
from hyperplane.fleet.wire import Header, Keyring

# A test record: 16-byte key (origin node, flow number, zero padding) and a 32-byte state
# (version of the flow's state, the order in which its origin queued it, filler).
RECORD = struct.Struct("!IIQQQ16s")
RECORD_SIZE, KEY_SIZE = RECORD.size, 16
assert RECORD_SIZE == 48

K1 = bytes(range(32))
K2 = bytes(range(100, 132))


def keyring() -> Keyring:
    return Keyring({1: K1}, 1)


def record(origin: int, flow: int, version: int, order: int) -> bytes:
    return RECORD.pack(origin, flow, 0, version, order, b"\xab" * 16)


def records(blob: bytes) -> list[tuple[int, int, int, int]]:
    """(origin, flow, version, order) of every record in a blob."""
    return [(o, f, v, q) for o, f, _, v, q, _ in RECORD.iter_unpack(blob)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Net:
    """An in-memory datagram network with seeded loss: drop, duplicate, and reorder
    (each batch in flight is shuffled in groups of `reorder`). Every datagram sent is
    logged, so tests can capture and replay or inspect what went on the wire."""

    def __init__(self, clock: Clock, seed: int = 0, drop: float = 0.0, dup: float = 0.0,
                 reorder: int = 0):
        self.clock = clock
        self.rng = random.Random(seed)
        self.drop, self.dup, self.reorder = drop, dup, reorder
        self.blackhole = False
        self.drop_if = None             # a predicate on (addr, datagram): drop it on purpose
        self.nodes: dict[tuple, SyncNode] = {}
        self.inflight: list[tuple[tuple, bytes]] = []
        self.log: list[tuple[tuple, bytes]] = []
        self.results: list[tuple[tuple, str | None]] = []

    def send(self, data: bytes, addr: tuple) -> None:
        self.log.append((addr, data))
        if self.blackhole or self.rng.random() < self.drop or \
                (self.drop_if is not None and self.drop_if(addr, data)):
            return
        copies = 2 if self.rng.random() < self.dup else 1
        self.inflight.extend([(addr, data)] * copies)

    def pump(self) -> int:
        batch, self.inflight = self.inflight, []
        if self.reorder > 1:
            for i in range(0, len(batch), self.reorder):
                group = batch[i:i + self.reorder]
                self.rng.shuffle(group)
                batch[i:i + self.reorder] = group
        for addr, data in batch:
            node = self.nodes.get(addr)
            if node is not None:
                self.results.append((addr, node.on_datagram(data, ("mem", 0), self.clock.now)))
        return len(batch)


class Cluster:
    """Nodes 1..n on one Net, each peering with all others, recording what they deliver."""

    def __init__(self, n: int, net: Net, clock: Clock, **kw):
        self.net, self.clock, self.kw = net, clock, kw
        self.delivered: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(list))
        self.hellos: dict[int, list[int]] = defaultdict(list)
        self.ids = list(range(1, n + 1))
        self.nodes: dict[int, SyncNode] = {}
        for node_id in self.ids:
            self.start(node_id, epoch=1)

    def addr(self, node_id: int) -> tuple:
        return ("10.9.0.%d" % node_id, 7400)

    def start(self, node_id: int, epoch: int, on_hello=None) -> SyncNode:
        """(Re)start a node: a fresh SyncNode with this epoch replaces the old one.
        on_hello defaults to recording the call in self.hellos."""
        def deliver(peer_id: int, blob: bytes, me=node_id) -> None:
            assert isinstance(blob, bytes) and len(blob) % RECORD_SIZE == 0
            self.delivered[me][peer_id].extend(records(blob))

        node = SyncNode(node_id, epoch, keyring(), record_size=RECORD_SIZE,
                        key_size=KEY_SIZE, send=self.net.send, deliver=deliver,
                        on_hello=on_hello or (lambda peer_id, me=node_id:
                                              self.hellos[me].append(peer_id)),
                        clock=self.clock, **self.kw)
        node.set_peers({i: self.addr(i) for i in self.ids})
        self.nodes[node_id] = node
        self.net.nodes[self.addr(node_id)] = node
        return node

    def step(self, dt: float = 0.001) -> None:
        now = self.clock.now
        for node in self.nodes.values():
            node.flush(now)
        self.net.pump()
        for node in self.nodes.values():
            node.tick(now)
        self.net.pump()
        self.clock.now += dt

    def run(self, until, max_steps: int = 20_000, dt: float = 0.001) -> int:
        for steps in range(max_steps):
            if until():
                return steps
            self.step(dt)
        raise AssertionError(f"not done after {max_steps} steps: {self.summary()}")

    def idle(self) -> bool:
        """Every queued record acked everywhere."""
        return all(node.backlog(p) == 0 for node in self.nodes.values()
                   for p in node.peers())

    def connected(self) -> bool:
        return all(s["epoch"] and s["hello_confirmed"]
                   for node in self.nodes.values() for s in node.stats()["peers"].values())

    def summary(self) -> dict:
        return {i: {p: {k: s[k] for k in ("pending_records", "resend_queue_records",
                                          "acked", "next_seq", "delivered_seq")}
                    for p, s in n.stats()["peers"].items()} for i, n in self.nodes.items()}


def make_updates(origin: int, n_records: int, n_keys: int, seed: int) -> list[bytes]:
    """n_records records over n_keys flows, each flow's versions increasing."""
    rng = random.Random(seed)
    version: dict[int, int] = defaultdict(int)
    out = []
    for order in range(n_records):
        flow = rng.randrange(n_keys)
        version[flow] += 1
        out.append(record(origin, flow, version[flow], order))
    return out


def queue_in_batches(cluster: Cluster, origin: int, recs: list[bytes], seed: int,
                     steps_between: int = 1) -> None:
    """Queue records to every peer in random-size batches, stepping the cluster between."""
    rng = random.Random(seed)
    node = cluster.nodes[origin]
    i = 0
    while i < len(recs):
        k = rng.randint(1, 300)
        node.queue(node.peers(), b"".join(recs[i:i + k]))
        i += k
        for _ in range(steps_between):
            cluster.step()


def check_latest_state(got: list[tuple], sent: list[bytes]) -> None:
    """Per flow: versions only go up in delivery order, nothing is delivered twice, the
    last one delivered is the last one sent, and every record that was its flow's latest
    when queued last arrived exactly once."""
    sent_recs = [records(r)[0] for r in sent]
    last: dict[int, tuple] = {}
    for rec in sent_recs:
        last[rec[1]] = rec
    seen: dict[int, int] = {}
    for origin, flow, version, order in got:
        assert version > seen.get(flow, 0), f"flow {flow} went back to version {version}"
        seen[flow] = version
    assert len(set(got)) == len(got)
    assert seen == {flow: rec[2] for flow, rec in last.items()}
    assert set(last.values()) <= set(got)


# --- the keyring and the wire format ------------------------------------------------------

def test_keyring_from_dict_rotate_retire() -> None:
    ring = Keyring.from_dict({"current": 2, "keys": {"1": K1.hex(), "2": K2.hex()}})
    assert ring.current_id == 2 and ring.ids() == [1, 2]
    assert ring.tag(1, b"ab", b"c") == hmac.digest(K1, b"abc", "sha256")
    ring.rotate(3, bytes(32))
    assert ring.current_id == 3 and ring.has(2)
    ring.retire(2)
    assert not ring.has(2) and ring.hasher(2) is None
    assert Keyring.from_dict(ring.to_dict()).to_dict() == ring.to_dict()
    with pytest.raises(ConfigError):
        ring.retire(3)                                   # the current key
    for bad in ({"current": 1, "keys": {"1": "00" * 31}},       # short key
                {"current": 2, "keys": {"1": K1.hex()}},        # current not held
                {"current": 1, "keys": {"1": "zz" * 32}},       # not hex
                {"current": 70000, "keys": {"70000": K1.hex()}},
                {"keys": {}}):
        with pytest.raises(ConfigError):
            Keyring.from_dict(bad)
    with pytest.raises(ConfigError):
        ring.rotate(1, K2)                               # id 1 holds another key


def test_header_layout() -> None:
    assert wire.HEADER_SIZE == 56 and wire.OVERHEAD == 88
    h = Header(wire.MAGIC, wire.VERSION, wire.DATA, 7, 1, 16, 0x01020304, 5, 2**40, 3,
               2**33, 9, 1, 48, 0)
    data = wire.encode(Keyring({7: K1}, 7), h, b"r" * 48)
    assert data[:2] == b"HS" and data[3] == wire.DATA and data[4:6] == b"\x00\x07"
    assert data[8:12] == b"\x01\x02\x03\x04" and data[16:24] == (2**40).to_bytes(8, "big")
    assert len(data) == 56 + 48 + 32
    assert data[-32:] == hmac.digest(K1, data[:-32], "sha256")
    header, payload = wire.peek(data)
    assert header == h and payload == b"r" * 48
    assert wire.max_records(1400, 48) == 27 and wire.max_records(8900, 48) == 183


def test_bad_configuration_is_refused() -> None:
    base = dict(record_size=48, key_size=16, send=lambda d, a: None,
                deliver=lambda p, b: None)
    for kw in ({"max_datagram": 100}, {"key_size": 49}, {"window": 0}):
        with pytest.raises(ConfigError):
            SyncNode(1, 1, keyring(), **{**base, **kw})
    with pytest.raises(ConfigError):
        SyncNode(0, 1, keyring(), **base)
    with pytest.raises(ConfigError):
        SyncNode(1, 0, keyring(), **base)
    node = SyncNode(1, 1, keyring(), **base)
    with pytest.raises(ValueError):
        node.queue([2], b"x" * 47)


# --- delivery ----------------------------------------------------------------------------

@pytest.mark.parametrize("n_nodes", [2, 3])
def test_nodes_exchange_10000_records_in_order(n_nodes: int) -> None:
    clock = Clock()
    net = Net(clock)
    cluster = Cluster(n_nodes, net, clock)
    cluster.run(cluster.connected, max_steps=100)
    sent = {i: make_updates(i, 10_000, 2_000, seed=i) for i in cluster.ids}
    for i in cluster.ids:
        queue_in_batches(cluster, i, sent[i], seed=100 + i, steps_between=0)
    cluster.run(cluster.idle, max_steps=2_000)
    for receiver in cluster.ids:
        for origin in cluster.ids:
            if origin != receiver:
                # No loss: exactly what was queued, in the order queued.
                assert cluster.delivered[receiver][origin] == \
                    [records(r)[0] for r in sent[origin]]
    for node in cluster.nodes.values():
        s = node.stats()
        assert s["rejected_total"] == 0 and s["resent_datagrams"] == 0
        assert s["sent_records"] == 10_000 * (n_nodes - 1)
        # Batching: 27 records of 48 bytes per 1400-byte datagram.
        assert s["sent_data_datagrams"] <= 10_000 * (n_nodes - 1) / 27 + 60 * (n_nodes - 1)
        assert s["acks_received"] > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lossy_network_delivers_latest_state(seed: int) -> None:
    clock = Clock()
    net = Net(clock, seed=seed, drop=0.2, dup=0.1, reorder=8)
    cluster = Cluster(3, net, clock, window=64)
    cluster.run(cluster.connected, max_steps=2_000)
    sent = {i: make_updates(i, 10_000, 1_500, seed=seed * 10 + i) for i in cluster.ids}
    for i in cluster.ids:
        queue_in_batches(cluster, i, sent[i], seed=seed * 100 + i)
    cluster.run(cluster.idle, max_steps=20_000)
    for receiver in cluster.ids:
        for origin in cluster.ids:
            if origin != receiver:
                check_latest_state(cluster.delivered[receiver][origin], sent[origin])
    total = defaultdict(int)
    for node in cluster.nodes.values():
        s = node.stats()
        for k in ("nacks_sent", "nacks_received", "resent_datagrams", "resent_records",
                  "resends_on_nack", "resends_on_timeout", "buffered_datagrams",
                  "obsolete_skipped"):
            total[k] += s[k]
        total["replay"] += s["rejected"]["replay"]
        assert s["rejected_total"] == s["rejected"]["replay"] + s["rejected"]["out_of_window"]
    # The loss paths ran: gaps NACKed and resent, reordered datagrams buffered, duplicates
    # refused, and some resends left out records that had a newer copy queued.
    assert all(total[k] > 0 for k in total), dict(total)


def drop_data_once(cluster: Cluster, sender: int, seqs: set[int]):
    """A drop_if that loses the first copy of each of sender's DATA datagrams in seqs."""
    def drop(addr, data) -> bool:
        h, _ = wire.peek(data)
        if h.type == wire.DATA and h.sender == sender and h.seq in seqs:
            seqs.discard(h.seq)
            return True
        return False
    return drop


def two_nodes(**kw) -> tuple[Cluster, Net]:
    clock = Clock()
    net = Net(clock)
    cluster = Cluster(2, net, clock, **kw)
    cluster.run(cluster.connected, max_steps=100)
    return cluster, net


def test_a_gap_is_nacked_and_filled_at_once() -> None:
    # resend_s is long: only the receiver's NACK can fill the gap within the test.
    cluster, net = two_nodes(resend_s=10.0)
    net.drop_if = drop_data_once(cluster, 1, {2})
    recs = [record(1, f, 1, f) for f in range(27 * 5)]
    cluster.nodes[1].queue([2], b"".join(recs))
    steps = cluster.run(lambda: len(cluster.delivered[2][1]) == len(recs), max_steps=20)
    assert steps <= 3                           # 1 ms steps: one round trip, no timer
    cluster.run(cluster.idle, max_steps=50)
    assert cluster.delivered[2][1] == [records(r)[0] for r in recs]
    a, b = cluster.nodes[1].stats(), cluster.nodes[2].stats()
    assert b["nacks_sent"] == 1 and b["buffered_datagrams"] == 3
    assert a["resends_on_nack"] == 1 and a["resent_datagrams"] == 1
    assert a["resends_on_timeout"] == 0


def test_a_lost_tail_is_found_through_alive() -> None:
    # The last datagram is lost and nothing follows it: the sender's ALIVE says how far
    # the stream went, the receiver NACKs the tail.
    cluster, net = two_nodes(resend_s=10.0)
    net.drop_if = drop_data_once(cluster, 1, {2})
    cluster.nodes[1].queue([2], b"".join(record(1, f, 1, f) for f in range(27 * 2)))
    cluster.run(cluster.idle, max_steps=200)
    a, b = cluster.nodes[1].stats(), cluster.nodes[2].stats()
    assert len(cluster.delivered[2][1]) == 54 and b["buffered_datagrams"] == 0
    assert a["resends_on_nack"] == 1 and a["resends_on_timeout"] == 0


def test_lost_nacks_are_covered_by_the_resend_timer() -> None:
    cluster, net = two_nodes(resend_s=0.05)
    lose = drop_data_once(cluster, 1, {2})
    net.drop_if = lambda addr, data: wire.peek(data)[0].type == wire.NACK or lose(addr, data)
    recs = [record(1, f, 1, f) for f in range(27 * 5)]
    cluster.nodes[1].queue([2], b"".join(recs))
    cluster.run(cluster.idle, max_steps=500)
    assert cluster.delivered[2][1] == [records(r)[0] for r in recs]
    a = cluster.nodes[1].stats()
    assert a["resends_on_timeout"] >= 1 and a["resends_on_nack"] == 0
    # The timer resends the oldest unacked and the newest, not the whole window.
    assert a["resent_datagrams"] <= 2 * a["resends_on_timeout"]


def test_key_updated_five_times_is_resent_only_in_its_last_state() -> None:
    clock = Clock()
    net = Net(clock)
    cluster = Cluster(2, net, clock, resend_s=0.05)
    cluster.run(cluster.connected, max_steps=100)
    a = cluster.nodes[1]
    net.blackhole = True                   # nothing arrives, nothing is acked
    first_datagram = len(net.log)
    for version in range(1, 6):
        # Each update goes out in its own datagram, next to other flows' records.
        a.queue([2], record(1, 42, version, version) +
                b"".join(record(1, 1000 * version + j, 1, 0) for j in range(3)))
        a.flush(clock.now)
    assert a.stats()["peers"][2]["unacked_datagrams"] == 5
    net.blackhole = False
    cluster.run(cluster.idle, max_steps=2_000)
    got = [r for r in cluster.delivered[2][1] if r[1] == 42]
    assert got == [(1, 42, 5, 5)]
    assert sorted(r[1] for r in cluster.delivered[2][1]) == \
        [42] + [1000 * v + j for v in range(1, 6) for j in range(3)]
    # On the wire: the first sends carried versions 1..5; every resend carried 42 only at
    # version 5 (the older copies were obsolete and never resent).
    sends: dict[int, list] = defaultdict(list)
    for addr, data in net.log[first_datagram:]:
        header, payload = wire.peek(data)
        if header.type == wire.DATA and header.sender == 1:
            sends[header.seq].append(records(payload))
    assert len(sends) == 5
    resent = [rec for copies in sends.values() for recs in copies[1:] for rec in recs]
    assert resent and [r for r in resent if r[1] == 42] == [(1, 42, 5, 5)]
    assert a.stats()["obsolete_skipped"] >= 4


def test_queue_overflow_drops_oldest_and_asks_for_resync() -> None:
    clock = Clock()
    net = Net(clock)
    cluster = Cluster(2, net, clock, max_pending=100)
    a = cluster.nodes[1]
    # The peer's epoch is not known yet: everything stays pending.
    a.queue([2], b"".join(record(1, f, 1, f) for f in range(150)))
    s = a.stats()
    assert s["overflow_dropped"] == 50 and s["peers"][2]["pending_records"] == 100
    assert a.take_resync() == [2] and a.take_resync() == []
    cluster.run(cluster.idle, max_steps=500)
    assert [r[1] for r in cluster.delivered[2][1]] == list(range(50, 150))


def _cut_between(side: set[int]):
    """A drop_if that loses every datagram between the nodes of `side` and the others."""
    def drop(addr, data) -> bool:
        h, _ = wire.peek(data)
        return (h.sender in side) != (int(addr[0].rsplit(".", 1)[1]) in side)
    return drop


@pytest.mark.parametrize("overflow", [False, True], ids=["queued", "overflowed"])
def test_a_partition_heals_and_every_holder_converges(overflow: bool) -> None:
    """Node 1 is cut off from nodes 2 and 3 on the sync network for 30 s while all three
    change flows; they stay members (the store still sees them). Within each side the
    streams go on. After the heal every node holds every origin's latest state: what was
    queued is resent, and where a queue overflowed during the cut (max_pending) the
    origin was told to resync, and its full copy of its flows (what the member sends,
    records.dump: each flow's current state) brings the peer up to date."""
    clock = Clock()
    net = Net(clock, seed=3)
    # a window of 16 datagrams holds ~450 records in flight; the rest wait in pending
    cluster = Cluster(3, net, clock, window=16, max_pending=1_000 if overflow else 100_000)
    cluster.run(cluster.connected, max_steps=200)
    sent = {i: make_updates(i, 3_000, 400, seed=i) for i in cluster.ids}
    net.drop_if = _cut_between({1})
    for i in cluster.ids:
        queue_in_batches(cluster, i, sent[i], seed=i)
    for _ in range(3_000):                         # 30 s cut
        cluster.step(0.01)
    check_latest_state(cluster.delivered[2][3], sent[3])     # each side kept going
    check_latest_state(cluster.delivered[3][2], sent[2])
    assert not cluster.delivered[2][1] and not cluster.delivered[1][2]
    net.drop_if = None
    dumps = {}
    for i, node in cluster.nodes.items():          # the member's anti-entropy: a full copy
        peers = node.take_resync()
        if peers:
            latest = {}
            for rec in sent[i]:
                latest[records(rec)[0][1]] = rec
            dumps[i] = peers
            node.queue(peers, b"".join(latest.values()))
    if overflow:
        assert dumps == {1: [2, 3], 2: [1], 3: [1]}, dumps
    else:
        assert dumps == {}
    cluster.run(cluster.idle, max_steps=20_000)
    for receiver in cluster.ids:
        for origin in cluster.ids:
            if origin == receiver:
                continue
            got = cluster.delivered[receiver][origin]
            if origin in dumps and receiver in dumps[origin]:
                # the full copy repeats a flow's latest state after what came before
                latest = {}
                for o, flow, version, order in got:
                    assert version >= latest.get(flow, 0)
                    latest[flow] = version
                want = {}
                for rec in sent[origin]:
                    want[records(rec)[0][1]] = records(rec)[0][2]
                assert latest == want
            else:
                check_latest_state(got, sent[origin])


# --- rejections ----------------------------------------------------------------------------

def test_every_bad_datagram_is_rejected_by_reason_and_changes_nothing() -> None:
    clock = Clock()
    net = Net(clock)
    cluster = Cluster(3, net, clock)
    a, b, c = (cluster.nodes[i] for i in (1, 2, 3))
    cluster.run(cluster.connected, max_steps=100)
    start = len(net.log)
    a.queue([2], b"".join(record(1, f, 1, f) for f in range(30)))
    cluster.run(cluster.idle, max_steps=100)
    captured = [d for addr, d in net.log[start:]
                if addr == cluster.addr(2) and wire.peek(d)[0].type == wire.DATA]
    data = captured[0]
    header, payload = wire.peek(data)
    ring = keyring()
    next_seq = a.stats()["peers"][2]["next_seq"]
    good = header._replace(seq=next_seq, ack=0, count=1)
    cases = {
        "bad_mac": data[:-40] + bytes([data[-40] ^ 1]) + data[-39:],
        "replay": data,
        "truncated": data[:87],
        "oversized": wire.encode(ring, good._replace(count=28), record(1, 1, 9, 9) * 28),
        "unknown_key": wire.encode(Keyring({9: K2}, 9), good, record(1, 1, 9, 9)),
        "bad_magic": wire.encode(ring, good._replace(magic=0x4854), record(1, 1, 9, 9)),
        "bad_version": wire.encode(ring, good._replace(version=2), record(1, 1, 9, 9)),
        "bad_type": wire.encode(ring, good._replace(type=9), record(1, 1, 9, 9)),
        "bad_length": wire.encode(ring, good._replace(count=2), record(1, 1, 9, 9)),
        "bad_record_size": wire.encode(ring, good._replace(record_size=40), b"x" * 40),
        "unknown_peer": wire.encode(ring, good._replace(sender=77), record(1, 1, 9, 9)),
        "wrong_epoch": wire.encode(ring, good._replace(receiver_epoch=7), record(1, 1, 9, 9)),
        "out_of_window": wire.encode(ring, good._replace(seq=next_seq + 10_000),
                                     record(1, 1, 9, 9)),
        "bad_ack": wire.encode(ring, good._replace(ack=10**6), record(1, 1, 9, 9)),
    }
    assert set(cases) | {"wrong_receiver", "old_epoch"} == set(REJECT_REASONS)
    before = list(cluster.delivered[2][1])
    for reason, bad in cases.items():
        counts = dict(b.stats()["rejected"])
        assert b.on_datagram(bad, ("mem", 0), clock.now) == reason
        after = b.stats()["rejected"]
        assert {k: after[k] - counts[k] for k in after if after[k] != counts[k]} == {reason: 1}
        assert cluster.delivered[2][1] == before
    # The same captured datagram, delivered to a node it was not addressed to.
    assert c.on_datagram(data, ("mem", 0), clock.now) == "wrong_receiver"
    assert c.stats()["rejected"]["wrong_receiver"] == 1 and not cluster.delivered[3]
    # b still works: a's next records arrive (the forged ones never did).
    a.queue([2], record(1, 500, 1, 500))
    cluster.run(cluster.idle, max_steps=200)
    assert cluster.delivered[2][1] == before + [(1, 500, 1, 500)]
    assert (1, 1, 9, 9) not in cluster.delivered[2][1]


def test_old_epoch_hello_and_data_are_rejected_after_restart() -> None:
    clock = Clock()
    net = Net(clock)
    cluster = Cluster(2, net, clock)
    cluster.run(cluster.connected, max_steps=100)
    old = [d for addr, d in net.log if addr == cluster.addr(2)]
    old_hello = next(d for d in old if wire.peek(d)[0].type == wire.HELLO)
    start = len(net.log)
    cluster.nodes[1].queue([2], record(1, 1, 1, 1))
    cluster.run(cluster.idle, max_steps=100)
    old_data = next(d for addr, d in net.log[start:]
                    if addr == cluster.addr(2) and wire.peek(d)[0].type == wire.DATA)
    cluster.start(1, epoch=2)
    cluster.run(cluster.connected, max_steps=100)
    b = cluster.nodes[2]
    hellos = list(cluster.hellos[2])
    delivered = list(cluster.delivered[2][1])
    assert b.on_datagram(old_hello, None, clock.now) == "old_epoch"
    assert b.on_datagram(old_data, None, clock.now) == "old_epoch"
    assert b.stats()["rejected"]["old_epoch"] == 2
    assert cluster.hellos[2] == hellos and cluster.delivered[2][1] == delivered
    # A HELLO of the current epoch seen twice is a duplicate: no second on_hello.
    new_hello = [d for addr, d in net.log[start:]
                 if addr == cluster.addr(2) and wire.peek(d)[0].type == wire.HELLO][-1]
    assert b.on_datagram(new_hello, None, clock.now) == "replay"
    assert cluster.hellos[2] == hellos


# --- keys and restarts ---------------------------------------------------------------------

def test_key_rotation_accepts_old_key_until_retired() -> None:
    clock = Clock()
    net = Net(clock)
    cluster = Cluster(2, net, clock, resend_s=0.02)
    a, b = cluster.nodes[1], cluster.nodes[2]
    cluster.run(cluster.connected, max_steps=100)
    b.keyring.rotate(2, K2)                  # b sends with key 2, still accepts key 1
    a.keyring.rotate(2, K2)
    a.keyring.current_id = 1                 # a still sends with key 1 (it lags behind)
    a.queue([2], record(1, 1, 1, 1))
    cluster.run(cluster.idle, max_steps=100)
    assert cluster.delivered[2][1] == [(1, 1, 1, 1)]
    assert b.stats()["rejected_total"] == 0
    b.keyring.retire(1)                      # key 1 is no longer accepted by b
    a.queue([2], record(1, 2, 1, 2))
    for _ in range(50):
        cluster.step()
    assert b.stats()["rejected"]["unknown_key"] > 0
    assert cluster.delivered[2][1] == [(1, 1, 1, 1)]
    a.keyring.rotate(2, K2)                  # a catches up: its resends use key 2
    cluster.run(cluster.idle, max_steps=200)
    assert cluster.delivered[2][1] == [(1, 1, 1, 1), (1, 2, 1, 2)]


def test_restart_with_larger_epoch_resets_stream_and_calls_on_hello() -> None:
    clock = Clock()
    net = Net(clock, seed=5)
    cluster = Cluster(2, net, clock)
    cluster.run(cluster.connected, max_steps=100)
    assert sorted(cluster.hellos[2]) == [1] and sorted(cluster.hellos[1]) == [2]
    cluster.nodes[1].queue([2], b"".join(record(1, f, 1, f) for f in range(100)))
    cluster.nodes[2].queue([1], b"".join(record(2, f, 1, f) for f in range(100)))
    cluster.run(cluster.idle, max_steps=100)
    # b has records in flight to a when a restarts: they are requeued for the new a.
    cluster.nodes[2].queue([1], b"".join(record(2, f, 2, 100 + f) for f in range(50)))
    cluster.nodes[2].flush(clock.now)
    net.inflight.clear()
    cluster.delivered[1].clear()
    a2 = cluster.start(1, epoch=2)
    cluster.run(cluster.connected, max_steps=100)
    b = cluster.nodes[2]
    assert cluster.hellos[2] == [1, 1]                 # on_hello again for a's new epoch
    assert b.stats()["stream_resets"] == 1
    assert b.stats()["peers"][1]["epoch"] == 2
    # Streaming goes on both ways in the new streams (seqs start again at 1).
    a2.queue([2], b"".join(record(1, f, 2, 200 + f) for f in range(100)))
    cluster.run(cluster.idle, max_steps=200)
    assert cluster.delivered[2][1][-100:] == [(1, f, 2, 200 + f) for f in range(100)]
    assert cluster.delivered[1][2] == [(2, f, 2, 100 + f) for f in range(50)]
    assert a2.stats()["peers"][2]["next_seq"] == 5            # 100 records: 4 datagrams
    assert b.stats()["rejected_total"] == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_restarts_under_loss_converge_to_the_latest_state(seed: int) -> None:
    """Three nodes update flows under loss while nodes restart now and then. As the agent
    will: on_hello sends the peer a full copy of this node's flows, and a restarted node
    sends its own flows to everyone (what its old process had queued is gone). At the
    end every node holds every other node's latest state of every flow."""
    clock = Clock()
    net = Net(clock, seed=seed, drop=0.2, dup=0.1, reorder=8)
    cluster = Cluster(3, net, clock, window=32)
    flows: dict[int, dict[int, bytes]] = {i: {} for i in cluster.ids}
    epochs = dict.fromkeys(cluster.ids, 1)

    def start(i: int) -> None:
        cluster.start(i, epochs[i], on_hello=lambda peer, me=i: cluster.nodes[me].queue(
            [peer], b"".join(flows[me].values())))

    for i in cluster.ids:
        start(i)
    rng = random.Random(seed)
    restarts = order = 0
    for _ in range(1500):
        origin = rng.choice(cluster.ids)
        if rng.random() < 0.5:
            batch = []
            for _ in range(rng.randint(1, 40)):
                flow = rng.randrange(300)
                order += 1
                version = records(flows[origin][flow])[0][2] + 1 if flow in flows[origin] else 1
                flows[origin][flow] = record(origin, flow, version, order)
                batch.append(flows[origin][flow])
            cluster.nodes[origin].queue(cluster.nodes[origin].peers(), b"".join(batch))
        if rng.random() < 0.004:
            victim = rng.choice(cluster.ids)
            epochs[victim] += 1
            restarts += 1
            start(victim)
            cluster.nodes[victim].queue(cluster.nodes[victim].peers(),
                                        b"".join(flows[victim].values()))
        cluster.step()
    cluster.run(cluster.idle, max_steps=20_000)
    assert restarts >= 3
    for receiver in cluster.ids:
        for origin in cluster.ids:
            if origin != receiver:
                final = {flow: version for _, flow, version, _ in
                         cluster.delivered[receiver][origin]}
                assert final == {flow: records(r)[0][2] for flow, r in flows[origin].items()}


def test_peer_that_leaves_and_returns_is_resynced() -> None:
    clock = Clock()
    net = Net(clock)
    cluster = Cluster(2, net, clock)
    a = cluster.nodes[1]
    cluster.run(cluster.connected, max_steps=100)
    net.blackhole = True
    a.queue([2], b"".join(record(1, f, 1, f) for f in range(40)))
    a.flush(clock.now)
    a.set_peers({})                                    # peer 2 left membership
    assert a.peers() == [] and a.backlog(2) == 0 and a.take_resync() == []
    assert a.stats()["left_dropped"] == 40
    a.queue([2], record(1, 99, 1, 99))                 # not a peer: not queued
    assert a.stats()["queued_unknown_peer"] == 1
    net.blackhole = False
    a.set_peers({2: cluster.addr(2)})                  # back: the stream goes on
    assert a.take_resync() == [2]
    a.queue([2], record(1, 7, 2, 100))
    cluster.run(cluster.idle, max_steps=300)
    assert cluster.delivered[2][1] == [(1, 7, 2, 100)]


# --- real sockets --------------------------------------------------------------------------

class LossyUdp:
    """A send hook over a real UDP socket: drops, duplicates and holds back datagrams
    (released after a few later ones: reordering), with a seeded generator."""

    def __init__(self, sock: socket.socket, seed: int):
        self.sock, self.rng = sock, random.Random(seed)
        self.held: list[tuple[bytes, tuple]] = []
        self.sent = self.dropped = 0

    def __call__(self, data: bytes, addr: tuple) -> None:
        r = self.rng.random()
        if r < 0.2:
            self.dropped += 1
            return
        if r < 0.3:
            self._out(data, addr)
            self._out(data, addr)
        elif r < 0.4:
            self.held.append((data, addr))
        else:
            self._out(data, addr)
        if len(self.held) >= 4 or (self.held and self.rng.random() < 0.1):
            self.rng.shuffle(self.held)
            for d, a in self.held:
                self._out(d, a)
            self.held.clear()

    def _out(self, data: bytes, addr: tuple) -> None:
        self.sent += 1
        self.sock.sendto(data, addr)


@pytest.mark.root
def test_two_nodes_over_real_udp_with_loss_in_a_namespace() -> None:
    assert os.geteuid() == 0, "this test creates a network namespace: run it as root"
    ns = f"hpsync-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    socks: list[socket.socket] = []
    netns.create(ns)
    try:
        netns.set_up(ns, "lo")
        for _ in range(2):
            s = netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
        addrs = {1: socks[0].getsockname(), 2: socks[1].getsockname()}
        got: dict[int, list] = {1: [], 2: []}
        hooks = {i: LossyUdp(socks[i - 1], seed=i) for i in (1, 2)}
        nodes = {i: SyncNode(i, time.time_ns(), keyring(), record_size=RECORD_SIZE,
                             key_size=KEY_SIZE, send=hooks[i],
                             deliver=lambda p, blob, me=i: got[me].extend(records(blob)),
                             alive_s=0.02, resend_s=0.03, window=32)
                 for i in (1, 2)}
        for i, node in nodes.items():
            node.set_peers(addrs)
        sent = {i: make_updates(i, 5_000, 800, seed=i) for i in (1, 2)}
        cursor = {1: 0, 2: 0}
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLIN)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = time.monotonic()
            for i, node in nodes.items():
                if cursor[i] < len(sent[i]) and node.backlog(3 - i) < 2_000:
                    node.queue([3 - i], b"".join(sent[i][cursor[i]:cursor[i] + 200]))
                    cursor[i] += 200
                node.flush(now)
                node.tick(now)
            # poll, not select: a long test session may hold fds >= FD_SETSIZE (1024)
            polled = {fd for fd, _ in poller.poll(5)}
            ready = [s for s in socks if s.fileno() in polled]
            for s in ready:
                node = nodes[1 if s is socks[0] else 2]
                for _ in range(256):
                    try:
                        data, addr = s.recvfrom(65535)
                    except BlockingIOError:
                        break
                    node.on_datagram(data, addr, time.monotonic())
            if all(cursor[i] == len(sent[i]) and nodes[i].backlog(3 - i) == 0
                   for i in (1, 2)):
                break
        check_latest_state(got[2], sent[1])
        check_latest_state(got[1], sent[2])
        for i in (1, 2):
            s = nodes[i].stats()
            assert hooks[i].dropped > 0 and s["resent_datagrams"] > 0
            assert s["nacks_sent"] + nodes[3 - i].stats()["nacks_sent"] > 0
    finally:
        for s in socks:
            s.close()
        netns.remove(ns)
    assert ns not in netns.list_namespaces()
