"""Flow events from the data path's ring buffer (bpf/structs.h struct flow_event): what
happened to a flow (created, confirmed, changed, closed, expired), the flow as a portable
record (hyperplane.fleet.records), and the packets and bytes of the direction whose packet
caused the event.

bcc cannot infer the type of a ring buffer filled with ringbuf_reserve, so the event's
layout is declared here; a unit test holds it to the C struct."""
from __future__ import annotations

import ctypes
import logging
import socket
import struct
import threading
from dataclasses import dataclass

from hyperplane.datapath import ring
from hyperplane.datapath.verdicts import FlowEventType
from hyperplane.fleet.records import FIELDS, RECORD, RECORD_SIZE, FlowRecord

log = logging.getLogger("hyperplane.observe.events")


class RawFlowEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("ts_ns", ctypes.c_uint64), ("rec", ctypes.c_uint8 * RECORD_SIZE),
                ("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("twin_packets", ctypes.c_uint64), ("twin_bytes", ctypes.c_uint64),
                ("in_ifindex", ctypes.c_uint32), ("twin_in_ifindex", ctypes.c_uint32)]


REC_OFFSET = RawFlowEvent.rec.offset


EVF_REPLY = 1      # bpf/structs.h: packets/bytes are the reply direction's
EVF_VERDICT_SHIFT = 8   # FLOW_REJECTED: flags >> 8 is the dropped packet's verdict


@dataclass
class FlowEvent:
    type: FlowEventType
    record: FlowRecord
    packets: int              # of the direction whose packet caused the event
    bytes: int
    ts_ns: int
    flags: int = 0            # EVF_REPLY: that direction is the reply
    twin_packets: int = 0     # EXPIRED / REMOVED: the other direction's final counts
    twin_bytes: int = 0
    in_ifindex: int = 0       # where the direction of packets/bytes arrives
    twin_in_ifindex: int = 0

    @property
    def reply(self) -> bool:
        return bool(self.flags & EVF_REPLY)

    @property
    def verdict(self) -> int | None:
        """FLOW_REJECTED: the dropped packet's verdict (hyperplane.datapath.verdicts)."""
        return self.flags >> EVF_VERDICT_SHIFT if self.type == _REJECTED else None


_REJECTED = getattr(FlowEventType, "FLOW_REJECTED", None)


def _record(data: bytes) -> FlowRecord:
    """The event's record; a FLOW_REJECTED event's holds only the packet's tuple (kind and
    state 0, which the enums do not name)."""
    try:
        return FlowRecord.unpack(data)
    except ValueError:
        f = dict(zip(FIELDS, RECORD.unpack(data[:RECORD_SIZE])))
        ip, port = socket.inet_ntoa, (lambda b: struct.unpack(">H", b)[0])
        return FlowRecord(ip(f["key.src_ip"]), ip(f["key.dst_ip"]), port(f["key.src_port"]),
                          port(f["key.dst_port"]), f["key.proto"], ip(f["new_src_ip"]),
                          ip(f["new_dst_ip"]), port(f["new_src_port"]),
                          port(f["new_dst_port"]), f["kind"], f["tcp_state"], f["fin_seen"],
                          f["flags"], f["resource"], f["origin"], f["idle_ms"], f["age_ms"])


def decode(raw: bytes) -> FlowEvent:
    """A FlowEvent from the bytes of one ring record (struct flow_event)."""
    size = ctypes.sizeof(RawFlowEvent)
    ev = RawFlowEvent.from_buffer_copy(raw[:size].ljust(size, b"\0"))
    return FlowEvent(FlowEventType(ev.type), _record(bytes(ev.rec)), ev.packets,
                     ev.bytes, ev.ts_ns, ev.flags, ev.twin_packets, ev.twin_bytes,
                     ev.in_ifindex, ev.twin_in_ifindex)


def subscribe(dp, callback) -> None:
    """Call callback(FlowEvent) for each event, delivered by dp.bpf.ring_buffer_consume()
    (call it on a timer: the data path submits without wakeups, so a blocking poll would
    not return for new events)."""
    def on_event(_ctx, data, _size):
        callback(decode(ctypes.string_at(data, ctypes.sizeof(RawFlowEvent))))

    dp.table("flow_events").open_ring_buffer(on_event)


EVENT_SIZE = ctypes.sizeof(RawFlowEvent)


class EventRing:
    """The one reader of a data path's event ring (a BPF ring buffer has one consumer
    position): read() returns the events there as a RingBatch of whole events
    (hyperplane.datapath.ring), or an empty batch. dp is a Datapath (bcc) or a PinnedNode
    (the pinned ring, read without compiling anything). `fd` is the ring's, for poll(): a
    fleet node's data path wakes a sleeping reader.

    The ring is mapped and read a run of events at a time (ring.MappedRing) where the
    machine's memory ordering allows it (x86-64), else through libbpf's reader, one
    callback per event, collected into the same kind of batch."""

    def __init__(self, dp, mapped: bool | None = None):
        self.mapped = ring.mapped_reading() if mapped is None else mapped
        if self.mapped:
            self.fd = dp.ring_fd("flow_events") if hasattr(dp, "ring_fd") else \
                dp.table("flow_events").map_fd
            self._ring = ring.MappedRing(self.fd, EVENT_SIZE)
            self.read = self._ring.read
            return
        self._buf = bytearray()
        self._count = 0
        header = EVENT_SIZE.to_bytes(4, "little") + bytes(4)
        pad = ring.stride_of(EVENT_SIZE) - ring.HDR_SIZE

        def on_raw(data, size):   # a program older than these headers: shorter events
            self._buf += header + ctypes.string_at(data, min(size, EVENT_SIZE)).ljust(pad, b"\0")
            self._count += 1

        if hasattr(dp, "open_ring"):
            libbpf_ring = dp.open_ring("flow_events", on_raw)
            self._consume, self.fd = libbpf_ring.consume, libbpf_ring.fd
        else:
            table = dp.table("flow_events")
            table.open_ring_buffer(lambda _ctx, data, size: on_raw(data, size))
            self._consume, self.fd = dp.bpf.ring_buffer_consume, table.map_fd

    def read(self, limit: int = ring.MAX_BATCH) -> ring.RingBatch:
        """(libbpf's reader; the mapped reader's read replaces this method)"""
        self._consume()
        if not self._count:
            return ring.EMPTY
        batch = ring.RingBatch(bytes(self._buf), ring.HDR_SIZE, ring.stride_of(EVENT_SIZE),
                               self._count, EVENT_SIZE)
        self._buf.clear()
        self._count = 0
        return batch

    def pending_bytes(self) -> int | None:
        """Bytes written and not read yet (the mapped reader only; else None)."""
        return self._ring.pending_bytes() if self.mapped else None

    def close(self) -> None:
        if self.mapped:
            self._ring.close()


# The events of an unconfirmed flow (its creation, its changes). While every subscriber of
# a hub does without them, its data path does not write them (HP_F_PEER_EVENTS).
_PENDING_EVENTS = frozenset({int(FlowEventType.FLOW_CREATED), int(FlowEventType.FLOW_CHANGED)})


def peer_events_only(record_subscribers: int, event_types) -> bool:
    """Whether a hub's data path may skip an unconfirmed flow's events: it has a record
    subscriber (the fleet member, which replicates confirmed flows only) and none of its
    event subscribers (their `types`: a set, or None for every type) wants them."""
    return record_subscribers > 0 and not any(
        types is None or types & _PENDING_EVENTS for types in event_types)


class EventHub:
    """The one reader of a node's event ring, fanning each read's events out to its
    subscribers: the fleet member's replication (subscribe_batches: the whole RingBatch,
    from which it takes the columns it needs, its fast path), and whole events as bytes
    (subscribe_events: flow logs, followers), which those subscribers decode in their own
    threads.

    One thread drives it: the fleet member's sync task (which polls at 1 ms while busy),
    or on a node outside a fleet the agent's event task. `rounds` counts finished reads,
    so another thread can wait until every event submitted before it asked has been
    delivered (wait_round)."""

    # batches per consume(): bounds one call (8,192 events a batch) when the ring is full
    MAX_READS = 8

    def __init__(self, dp, ring_reader: EventRing | None = None):
        self._batch_subs: list = []
        # (callback, event types or None for all); replaced, never changed in place, so
        # other threads may subscribe while the driving thread delivers
        self._event_subs: tuple = ()
        # what deliver() reads, swapped whole: (the event subscribers, a byte per event
        # type, 1 if one of them wants it, or None when one wants every type)
        self._fanout: tuple = ((), None)
        self._ring = ring_reader or EventRing(dp)
        self.fd = self._ring.fd
        self._cond = threading.Condition()
        self.rounds = 0
        self.events = 0
        self.subscriber_errors = 0
        self._dp = dp
        self._filter_lock = threading.RLock()   # subscriber changes and what they set
        self._set_filter()

    def subscribe_batches(self, callback):
        """callback(RingBatch of whole events) per read; returns consume (the driver's).
        A batch subscriber (the fleet member) replicates confirmed flows only."""
        self._batch_subs.append(callback)
        self._set_filter()
        return self.consume

    def subscribe_events(self, callback, types=None) -> None:
        """callback(event bytes: struct flow_event) per event (of `types` only, a set of
        event type numbers, when given), in the driving thread: keep it cheap (queue the
        bytes). The hub finds the events someone wants by their type, in C."""
        with self._filter_lock:
            self._event_subs = (*self._event_subs, (callback, types))
            self._set_filter()

    def unsubscribe_events(self, callback) -> None:
        with self._filter_lock:
            self._event_subs = tuple(s for s in self._event_subs if s[0] != callback)
            self._set_filter()

    def _set_filter(self) -> None:
        """Tell the data path to skip an unconfirmed flow's events while only batch
        subscribers and event subscribers without them read here (a fleet node: a new TCP
        flow then costs one event, not three); a follower of every event turns it off."""
        from hyperplane.datapath.settings import F_PEER_EVENTS, set_flags
        with self._filter_lock:
            subs = self._event_subs
            self._fanout = (subs, None if any(t is None for _, t in subs) else bytes(
                1 if any(t in types for _, types in subs) else 0 for t in range(256)))
            # written at every (rare) change of subscribers, not compared with a copy: the
            # flag also goes off when the node leaves the fleet (FleetDataplane.leave)
            set_flags(self._dp, F_PEER_EVENTS,
                      peer_events_only(len(self._batch_subs), (t for _, t in subs)))

    def deliver(self, batch: ring.RingBatch) -> None:
        """Hand one read's events to every subscriber."""
        self.events += batch.count
        for cb in self._batch_subs:
            cb(batch)
        subs, table = self._fanout
        if not subs:
            return
        types = batch.column(0)     # event types are < 256 (held by a unit test)
        if table is None:           # someone wants every event
            at = range(batch.count)
        else:                       # only the events someone wants, found in C
            wanted = types.translate(table)
            at, i = [], wanted.find(1)
            while i >= 0:
                at.append(i)
                i = wanted.find(1, i + 1)
        data, size, stride, first = batch.data, batch.size, batch.stride, batch.first
        for i in at:
            etype = types[i]
            raw = data[first + i * stride:first + i * stride + size]
            for cb, want in subs:
                if want is not None and etype not in want:
                    continue
                try:
                    cb(raw)
                except Exception:  # noqa: BLE001 - one subscriber's bug stops no other
                    self.subscriber_errors += 1
                    log.exception("an event subscriber failed")

    def consume(self) -> int:
        """Read what the ring holds (the driving thread only). Returns the events read."""
        n = 0
        for _ in range(self.MAX_READS):
            batch = self._ring.read()
            if not batch.count:
                break
            n += batch.count
            self.deliver(batch)
        with self._cond:
            self.rounds += 1
            self._cond.notify_all()
        return n

    def wait_round(self, timeout_s: float) -> bool:
        """Wait until a read that started after this call has finished (every event
        submitted before the call is delivered); False if none did within timeout_s."""
        with self._cond:
            want = self.rounds + 2    # the read under way may have started before the call
            return self._cond.wait_for(lambda: self.rounds >= want, timeout_s)


def drive(hub: EventHub, stop: threading.Event, poll_s: float = 0.01,
          idle_poll_s: float = 0.1) -> None:
    """Read the ring until stop is set (a node outside a fleet, where no sync task does):
    every poll_s while events come, backing off to idle_poll_s when none do."""
    wait = poll_s
    while not stop.wait(wait):
        wait = poll_s if hub.consume() else min(wait * 2, idle_poll_s)
