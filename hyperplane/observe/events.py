"""Flow events from the data path's ring buffer (bpf/structs.h struct flow_event): what
happened to a flow (created, confirmed, changed, closed, expired), the flow as a portable
record (hyperplane.fleet.records), and the packets and bytes of the direction whose packet
caused the event.

bcc cannot infer the type of a ring buffer filled with ringbuf_reserve, so the event's
layout is declared here; a unit test holds it to the C struct."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from hyperplane.datapath.verdicts import FlowEventType
from hyperplane.fleet.records import RECORD_SIZE, FlowRecord


class RawFlowEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("ts_ns", ctypes.c_uint64), ("rec", ctypes.c_uint8 * RECORD_SIZE),
                ("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


REC_OFFSET = RawFlowEvent.rec.offset


@dataclass
class FlowEvent:
    type: FlowEventType
    record: FlowRecord
    packets: int
    bytes: int
    ts_ns: int


def subscribe(dp, callback) -> None:
    """Call callback(FlowEvent) for each event, delivered by dp.bpf.ring_buffer_consume()
    (call it on a timer: the data path submits without wakeups, so a blocking poll would
    not return for new events)."""
    def on_event(_ctx, data, _size):
        ev = ctypes.cast(data, ctypes.POINTER(RawFlowEvent)).contents
        callback(FlowEvent(FlowEventType(ev.type), FlowRecord.unpack(bytes(ev.rec)),
                           ev.packets, ev.bytes, ev.ts_ns))

    dp.table("flow_events").open_ring_buffer(on_event)


def subscribe_records(dp, callback):
    """The fast path for replication: callback(event type, record bytes) per event.
    Returns the function that reads what is there (call it on a timer). dp is a Datapath
    (bcc) or a PinnedNode (the pinned ring, read without compiling anything)."""
    def on_raw(data, _size):
        raw = ctypes.string_at(data, REC_OFFSET + RECORD_SIZE)
        callback(int.from_bytes(raw[:4], "little"), raw[REC_OFFSET:])

    if hasattr(dp, "open_ring"):
        return dp.open_ring("flow_events", on_raw).consume
    dp.table("flow_events").open_ring_buffer(lambda _ctx, data, size: on_raw(data, size))
    return dp.bpf.ring_buffer_consume
